"""The command line: runs, lists, evaluates; user errors are one line and exit status 2."""

import json

import yaml
from typer.testing import CliRunner

from spdkit.cli import app
from tests.helpers import tiny_config_file

runner = CliRunner()


def write_config(tmp_path, **overrides):
    return tiny_config_file(tmp_path / "tiny.yaml", 100, **{"steps": 20, **overrides})


def test_run_then_eval_then_resume_finished(tmp_path):
    cfg = write_config(tmp_path)
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(cfg), "--out", str(out), "--quiet", "--steps", "12"])
    assert result.exit_code == 0, result.output
    assert "MMCS" in result.output and "run directory" in result.output
    assert yaml.safe_load((out / "config.yaml").read_text())["training"]["steps"] == 12
    summary = json.loads((out / "summary.json").read_text())
    result = runner.invoke(app, ["resume", str(out), "--quiet"])  # finished: evaluated again
    assert result.exit_code == 0, result.output
    t = summary["timing"]  # the run's own timing is printed again, not the resume's (zero)
    assert f"training: {t['train_seconds']:.1f} s, {t['ms_per_step']:.2f} ms/step" in result.output
    assert t["ms_per_step"] > 0
    assert json.loads((out / "summary.json").read_text())["timing"] == summary["timing"]
    (out / "summary.json").unlink()
    result = runner.invoke(app, ["eval", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["final_losses"] == summary["final_losses"]
    result = runner.invoke(app, ["resume", str(out), "--quiet"])  # already finished: re-evaluates
    assert result.exit_code == 0, result.output
    # --set changes this evaluation only, says so in summary.json, and only eval.* fields
    result = runner.invoke(app, ["eval", str(out), "--set", "eval.n_eval_samples=64"])
    assert result.exit_code == 0, result.output
    again = json.loads((out / "summary.json").read_text())
    assert again["eval_overrides"] == {"eval.n_eval_samples": 64}
    assert yaml.safe_load((out / "config.yaml").read_text())["eval"]["n_eval_samples"] != 64
    result = runner.invoke(app, ["eval", str(out), "--set", "training.steps=3"])
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: spdkit eval --set changes the evaluation only (eval.*), not training.steps"
    )


def test_list_shows_bundled_configs():
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    for name in ["tms_5-2", "tms_40-10", "tms_5-2-id", "tms_40-10-id"]:
        assert name in result.output


def test_check_prints_resolved_config_or_errors(tmp_path):
    result = runner.invoke(app, ["check", "tms_5-2"])
    assert result.exit_code == 0 and '"hidden_dim": 16' in result.output
    bad = write_config(tmp_path, pnorm=-1, stepz=3)
    result = runner.invoke(app, ["check", str(bad)])
    assert result.exit_code == 2
    assert "pnorm: Input should be greater than 0" in result.output
    assert "stepz: unknown field" in result.output
    assert "Traceback" not in result.output


def test_user_errors_are_one_line_and_exit_2(tmp_path):
    cases = [
        (["run", "no_such_config"], "unknown config 'no_such_config'"),
        (["run", "tms_5-2", "--set", "optimizer.lr_schedule=step"], "optimizer.lr_schedule"),
        (["run", "tms_5-2", "--set", "oops"], "--set expects key=value"),
        (["run", "tms_5-2", "--device", "tpu"], "--device must be cpu or cuda"),
        (["run", "tms_5-2", "--target", str(tmp_path / "missing")], "target file not found"),
        (["eval", str(tmp_path)], "not a run directory"),
        (["resume", str(tmp_path / "nothing")], "not a run directory"),
    ]
    for args, message in cases:
        result = runner.invoke(
            app, [*args, "--out", str(tmp_path / "o")] if args[0] == "run" else args
        )
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output


def test_set_takes_globs_and_names_the_field_when_invalid():
    """`*.mlp.*` starts a YAML alias; --set reads what YAML cannot parse as the text itself."""
    result = runner.invoke(app, ["check", "tiny_lm", "--set", "modules.0.pattern=*.mlp.*"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["modules"][0]["pattern"] == "*.mlp.*"
    result = runner.invoke(app, ["check", "tiny_lm", "--set", "modules.0.C=*"])
    assert result.exit_code == 2 and "modules.0.C" in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_out_of_range_cli_values_are_rejected():
    result = runner.invoke(app, ["run", "tms_5-2", "--steps", "0"])
    assert result.exit_code == 2
    assert "steps" in result.output


def test_schema_is_json_with_every_field_described():
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    props = schema["properties"]
    assert {"loss", "importance", "modules", "training", "engine", "adversary"} <= set(props)
    loss = schema["$defs"]["LossConfig"]["properties"]
    assert "β3" in loss["importance_minimality_coeff"]["description"]
    assert "pnorm" in schema["$defs"]["ImportanceConfig"]["properties"]


def test_modules_lists_the_targets_matrices_and_what_patterns_pick():
    result = runner.invoke(app, ["modules", "tiny_lm", "--pattern", "blocks.0.attn.*:32"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    row = next(line for line in lines if line.startswith("blocks.1.mlp.fc_in "))
    assert row.split()[1:6] == ["Linear", "64", "x", "256", "16,384"]
    assert "256 via blocks.*.mlp.* (256)" in row
    assert "pattern 'blocks.*.mlp.*' (C 256): 4 modules, 65,536 parameters" in result.output
    assert "pattern 'blocks.0.attn.*' (C 32): 4 modules, 16,384 parameters" in result.output
    attn = next(line for line in lines if line.startswith("blocks.0.attn.q "))
    assert "32 via blocks.0.attn.*" in attn  # a --pattern's rows are marked as it picks them
    result = runner.invoke(app, ["modules", "tms_5-2", "--pattern", "nothing*"])
    assert "pattern 'nothing*': matches no decomposable module" in result.output


def test_the_printed_summary_reads_each_number_against_its_reference(capsys, tmp_path):
    from spdkit.cli.training import _print_summary

    module = {"C": 4, "n_non_negligible": 2, "n_alive": 3, "weight_error": 0.01}
    summary = {
        "final_losses": {"total": 0.1},
        "output_losses": {"ci_masked": 0.2},
        "mean_ci_l0": {"m": 1.5},
        "modules": {"m": module},
        "feature_match": {
            "module": "m",
            "mmcs": 0.96,
            "ml2r": 0.9,
            "paper": {"mmcs": 1.0, "ml2r": 0.993},
            "ground_truth": False,
            "non_negligible": {"m": 2},
            "expected": {"m": 5},
        },
        "lm": {
            "target": {"ce": 1.0},
            "ci": {"ce": 1.5, "kl": 0.4, "ce_gap_recovered": 0.75},
            "zero": {"ce": 3.0, "kl": 2.0, "ce_gap_recovered": 0.0},
        },
    }
    _print_summary(summary, tmp_path)
    out = capsys.readouterr().out
    assert "(paper Table 1: 1.000, 0.993)" in out
    assert "m 2/5; ground truth: no (MMCS ≥ 0.999" in out
    assert "ci 1.5000 (KL 0.4000, gap recovered 75%)" in out and "1 = the target's CE" in out
    assert "alive 3" in out and "alive: CI > τ" in out and "σ_H,upper" in out
    far = {**summary, "modules": {"m": {**module, "weight_error": 0.9}}}
    _print_summary(far, tmp_path)
    assert "set components.delta" in capsys.readouterr().out
    _print_summary({**far, "delta": True}, tmp_path)
    out = capsys.readouterr().out
    assert "the Δ-component W − UV carries the rest" in out and "set components.delta" not in out
