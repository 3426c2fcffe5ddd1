"""Run directory: contents, save -> load round trip, resume, seeds, corrupt files."""

import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from spdkit import api as api_module
from spdkit.api import load
from spdkit.cli import app
from spdkit.config import ModuleSpec, parse_config
from spdkit.errors import ConfigError
from spdkit.pipeline import run as run_module
from spdkit.pipeline.run import resume_run, run_experiment
from spdkit.store import runs
from tests.helpers import tiny_tms_dict


def small_config(**kw):
    base = tiny_tms_dict(steps=40, checkpoint_every=10, log_every=10)
    base["target"]["train_steps"] = 200
    base.update(kw)
    return parse_config(base)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r"
    summary = run_experiment(small_config(), out, progress=False)
    return out, summary


def test_run_directory_contract(finished_run):
    out, summary = finished_run
    for name in [
        "config.yaml",
        "target.safetensors",
        "target.json",
        "components.safetensors",
        "metrics.jsonl",
        "summary.json",
        "checkpoint/latest.safetensors",
        "figures/losses.png",
        "figures/ci_one_hot.png",
        "figures/vectors_linear1.png",
    ]:
        assert (out / name).is_file(), name
    comps, _ = runs.load_tensors(out / "components.safetensors")
    assert comps["linear1.U"].shape == (2, 8) and comps["linear1.V"].shape == (8, 5)
    assert comps["linear2.U"].shape == (5, 8) and comps["linear2.V"].shape == (8, 2)
    target, _ = runs.load_tensors(out / "target.safetensors")
    assert set(target) == {"linear1.weight", "linear2.weight", "linear2.bias"}
    torch.testing.assert_close(target["linear2.weight"], target["linear1.weight"].T)
    meta = json.loads((out / "target.json").read_text())
    assert meta["kind"] == "tms" and meta["config"]["n_features"] == 5
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    assert {
        "total",
        "faithfulness",
        "stochastic_recon",
        "importance_minimality",
        "l0/linear1",
    } <= set(rows[0])


def test_save_load_round_trip(finished_run):
    out, summary = finished_run
    decomp = load(out)
    x = torch.rand(16, 5)
    ci = decomp.causal_importance(x)
    assert set(ci) == {"linear1", "linear2"} and ci["linear1"].shape == (16, 8)
    U, V = decomp.subcomponents("linear1")
    comps, _ = runs.load_tensors(out / "components.safetensors")
    torch.testing.assert_close(U, comps["linear1.U"])
    torch.testing.assert_close(V, comps["linear1.V"])
    with pytest.raises(KeyError, match="not decomposed"):
        decomp.subcomponents("nope")


def test_same_seed_same_numbers_and_other_seed_differs(tmp_path):
    a = run_experiment(small_config(steps=15), tmp_path / "a", progress=False)
    b = run_experiment(small_config(steps=15), tmp_path / "b", progress=False)
    run_experiment(small_config(steps=15, seed=1), tmp_path / "c", progress=False)
    assert a["final_losses"] == b["final_losses"]
    ta, _ = runs.load_tensors(tmp_path / "a" / "components.safetensors")
    tb, _ = runs.load_tensors(tmp_path / "b" / "components.safetensors")
    tc, _ = runs.load_tensors(tmp_path / "c" / "components.safetensors")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not torch.equal(ta["linear1.V"], tc["linear1.V"])


@pytest.mark.parametrize("stop_step", [20, 38])  # 38: inside the firing-count window (37-40)
def test_resume_continues_bit_exactly(tmp_path, monkeypatch, stop_step):
    """SIGTERM during a step -> checkpoint there and a clean stop; resume; compare bit for bit
    (components, and the final checkpoint's firing counts)."""
    full = tmp_path / "full"
    run_experiment(small_config(), full, progress=False)

    from spdkit.training import trainer as train

    original = train.Trainer.train_step

    def interrupting(self, *args):
        out = original(self, *args)
        if self.step == stop_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(train.Trainer, "train_step", interrupting)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(small_config(), part, progress=False)
    monkeypatch.setattr(train.Trainer, "train_step", original)
    assert not (part / "components.safetensors").exists()
    _, meta = runs.load_tensors(part / runs.CHECKPOINT)
    assert meta["step"] == str(stop_step)
    resume_run(part, progress=False)
    a, _ = runs.load_tensors(full / "components.safetensors")
    b, _ = runs.load_tensors(part / "components.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    firing_a, firing_b = runs.read_firing(full), runs.read_firing(part)
    assert firing_a[1] == firing_b[1] == 4 * 256  # last 10% of 40 steps, batch 256
    assert all(torch.equal(firing_a[0][n], firing_b[0][n]) for n in firing_a[0])
    steps = [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30, 40]


def test_existing_run_dir_is_not_overwritten(finished_run):
    out, _ = finished_run
    with pytest.raises(FileExistsError, match="spdkit resume"):
        run_experiment(small_config(), out, progress=False)


def test_a_run_that_failed_before_its_first_step_does_not_block_its_fix(tmp_path, monkeypatch):
    """A bad pattern stops a run after config.yaml and the target are written: the corrected
    command into the same --out replaces them (issue 34 item 4)."""
    out = tmp_path / "r"
    bad = small_config().model_copy(update={"modules": [ModuleSpec(pattern="lin*r9", C=4)]})
    with pytest.raises(ValueError, match="matches nothing"):
        run_experiment(bad, out, progress=False)
    assert (out / "config.yaml").exists() and (out / "target.safetensors").exists()
    said = []  # what the module logs, whatever another test did to logging's configuration
    monkeypatch.setattr(run_module.log, "warning", lambda msg, *args: said.append(msg % args))
    run_experiment(small_config(), out, progress=False)
    assert any("replacing a run that stopped before its first step" in m for m in said)
    assert runs.load_run_config(out).modules == small_config().modules


def test_a_target_that_cannot_be_read_leaves_no_run_to_resume(tmp_path):
    """A mistyped --target: nothing for `resume` to pick up and silently train afresh."""
    out = tmp_path / "r"
    with pytest.raises(Exception, match="missing"):
        run_experiment(small_config(), out, target_path=tmp_path / "missing", progress=False)
    assert not (out / "config.yaml").exists()
    with pytest.raises(Exception, match="config.yaml"):
        resume_run(out, progress=False)


def test_reuse_a_trained_target(finished_run, tmp_path):
    out, _ = finished_run
    run_experiment(small_config(steps=5), tmp_path / "r2", target_path=out, progress=False)
    t1, _ = runs.load_tensors(out / "target.safetensors")
    t2, _ = runs.load_tensors(tmp_path / "r2" / "target.safetensors")
    assert all(torch.equal(t1[k], t2[k]) for k in t1)


def test_target_architecture_mismatch_is_clear(finished_run, tmp_path):
    out, _ = finished_run
    cfg = small_config()
    cfg = cfg.model_copy(update={"target": cfg.target.model_copy(update={"n_hidden": 3})})
    with pytest.raises(runs.RunDirError, match="n_hidden: file 2 vs config 3"):
        run_experiment(cfg, tmp_path / "r3", target_path=out, progress=False)


RUN_FILES = [
    "config.yaml",
    "target.json",
    "target.safetensors",
    "components.safetensors",
    "checkpoint/latest.safetensors",
    "metrics.jsonl",
    "summary.json",
    "figures/losses.png",
]
READ_BY = {  # which command cannot do without the file's content
    "config.yaml": {"eval", "resume"},
    "target.json": {"eval", "resume"},
    "target.safetensors": {"eval", "resume"},
    "components.safetensors": {"eval"},  # resume rewrites it from the checkpoint
    "checkpoint/latest.safetensors": {"resume"},
}
# resume rebuilds a missing checkpoint by training from step 0 (the same result, only slower).
# A missing target is retrained only while no checkpoint exists (test_kill_resume); here one
# does, and retraining elsewhere could differ silently, so it is an error.
REBUILT_BY_RESUME = {"checkpoint/latest.safetensors"}


def damage(path: Path, how: str) -> None:
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # bytes that are neither UTF-8 nor a safetensors header
        path.write_bytes(b"\xff\xfe\x00garbage\x80" * 8)


def expected_problem(victim: str, how: str) -> str:
    """What the one-line error must say is wrong with the file."""
    if how == "missing":
        return "missing|not found|no config.yaml"
    if victim.endswith(".safetensors"):
        return "truncated" if how == "truncated" else "not a valid safetensors file"
    if how == "garbage":
        return "not valid UTF-8"
    # half a YAML file may still parse, and then fails validation
    return {"config.yaml": "not valid YAML|invalid config", "target.json": "not valid JSON"}[victim]


@pytest.mark.parametrize("how", ["missing", "truncated", "garbage"])
@pytest.mark.parametrize("victim", RUN_FILES)
def test_damaged_run_directory_is_a_clear_error(finished_run, tmp_path, victim, how):
    """Each file of a finished run deleted, cut in half, or overwritten with junk: `spdkit eval`
    and `spdkit resume` either fail with one line naming the file and what is wrong with it,
    or (a file they do not need, or can rebuild exactly) still give the same results."""
    out, summary = finished_run
    original, _ = runs.load_tensors(out / "components.safetensors")
    for command in ("eval", "resume"):
        copy = tmp_path / command
        shutil.copytree(out, copy)
        damage(copy / victim, how)
        result = CliRunner().invoke(app, [command, str(copy)] + ["--quiet"] * (command == "resume"))
        rebuilt = command == "resume" and how == "missing" and victim in REBUILT_BY_RESUME
        if command in READ_BY.get(victim, set()) and not rebuilt:
            assert result.exit_code == 2, (command, result.output)
            lines = result.output.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), result.output
            assert victim in lines[0] and re.search(expected_problem(victim, how), lines[0]), (
                command,
                lines[0],
            )
            continue
        assert result.exit_code == 0, (command, result.output)
        again = json.loads((copy / "summary.json").read_text())
        assert again["final_losses"] == summary["final_losses"], command
        got, _ = runs.load_tensors(copy / "components.safetensors")
        assert all(torch.equal(got[k], original[k]) for k in original), command


def test_a_pickle_checkpoint_is_refused_without_running_it(tmp_path):
    import pickle  # only to craft the malicious file; spdkit itself never unpickles

    class Boom:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'pwned')!r}, 'w').write('pwned')",))

    path = tmp_path / "latest.safetensors"
    path.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(runs.RunDirError, match="a pickle / torch.save file, not safetensors"):
        runs.load_tensors(path)
    assert not (tmp_path / "pwned").exists()


def test_components_with_wrong_shape_or_dtype_are_named(finished_run, tmp_path):
    out, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    tensors, _ = runs.load_tensors(copy / "components.safetensors")
    tensors["linear1.U"] = torch.zeros(3, 8)
    tensors["linear2.U"] = tensors["linear2.U"].double()  # would be silently cast back
    tensors["linear3.U"] = torch.zeros(1)
    del tensors["linear2.V"]
    runs.save_tensors(copy / "components.safetensors", tensors)
    with pytest.raises(runs.RunDirError) as err:
        load(copy)
    assert str(err.value) == (
        f"{copy / 'components.safetensors'}: missing tensor 'linear2.V'; "
        "unexpected tensor 'linear3.U'; 'linear1.U' has shape [3, 8], expected [2, 8]; "
        "'linear2.U' has dtype torch.float64, expected torch.float32"
    )


def test_decompose_and_load_a_user_model(tmp_path):
    """The API on a model that is not a bundled target."""
    from torch import nn

    import spdkit

    class Data:
        def sample(self, batch_size, generator):
            return torch.randn(batch_size, 4, generator=generator)

    def make():
        torch.manual_seed(5)
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    data = tiny_tms_dict(modules=[{"pattern": "0", "C": 6}, {"pattern": "2", "C": 5}], steps=10)
    del data["target"]
    config = parse_config(data)
    decomp = spdkit.decompose(make(), Data(), config, run_dir=tmp_path / "mine", progress=False)
    assert decomp.subcomponents("0")[0].shape == (8, 6)
    # an API run directory is complete: summary and figures as `spdkit run` writes them
    summary = json.loads((tmp_path / "mine" / "summary.json").read_text())
    assert set(summary["modules"]) == {"0", "2"} and summary == decomp.summary
    assert (tmp_path / "mine" / "figures" / "ci_histograms.png").is_file()
    again = decomp.evaluate(tmp_path / "elsewhere", progress=False)
    assert again["output_losses"] == summary["output_losses"]
    with pytest.raises(runs.RunDirError, match=r"spdkit.load\(run_dir, target=model, data=data\)"):
        load(tmp_path / "mine")
    again = load(tmp_path / "mine", target=make())
    for name in ("0", "2"):
        for a, b in zip(decomp.subcomponents(name), again.subcomponents(name), strict=True):
            assert torch.equal(a, b)
    x = torch.randn(3, 4)
    torch.testing.assert_close(again.causal_importance(x)["2"], decomp.causal_importance(x)["2"])


def test_a_checkpoint_missing_state_or_with_wrong_shapes_is_named(finished_run, tmp_path):
    out, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    ckpt = copy / runs.CHECKPOINT
    tensors, meta = runs.load_tensors(ckpt)
    del tensors["rng.data"]
    tensors["param.0"] = torch.zeros(3, 3)
    runs.save_tensors(ckpt, tensors, meta)
    result = CliRunner().invoke(app, ["resume", str(copy), "--quiet"])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "latest.safetensors" in line and "missing rng.data" in line
    assert "param.0 has shape [3, 3]" in line


def test_the_readme_snippet_on_a_user_model_with_a_bundled_config(tmp_path, monkeypatch):
    """README "Python API": load_config("tms_5-2") then decompose a model of one's own: the
    TMS target section is dropped with one line (its data would not fit the model), and the
    run directory stays usable: cluster, evaluate, load with the model and its data."""
    from torch import nn

    import spdkit

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear1, self.linear2 = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            return self.linear2(torch.relu(self.linear1(x)))

    class Data:
        def sample(self, batch_size, generator):
            return torch.rand(batch_size, 8, generator=generator)

    torch.manual_seed(0)
    config = spdkit.load_config(
        "tms_5-2", {"training.steps": 10, "training.batch_size": 64, "eval.n_eval_samples": 128}
    )
    said = []
    monkeypatch.setattr(api_module.log, "warning", lambda msg, *args: said.append(msg % args))
    decomp = spdkit.decompose(MLP(), Data(), config, run_dir=tmp_path / "mine", progress=False)
    assert any("ignoring the config's target section (kind tms)" in m for m in said)
    assert decomp.config.target is None
    assert decomp.cluster(progress=False).clusters
    assert decomp.evaluate(tmp_path / "again", progress=False)["modules"].keys() == {
        "linear1",
        "linear2",
    }
    loaded = load(tmp_path / "mine", target=MLP(), data=Data())
    assert loaded.cluster(progress=False).clusters
    with pytest.raises(ConfigError, match="whose data spdkit does not keep"):
        load(tmp_path / "mine", target=MLP()).cluster(progress=False)
