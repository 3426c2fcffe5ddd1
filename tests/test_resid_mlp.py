"""Residual-MLP targets, their ground-truth analysis (neuron contributions, the verdict), and
the sweep command."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from spdkit.analysis.metrics import greedy_feature_order
from spdkit.cli import app
from spdkit.config import ModuleSpec, ResidMLPTargetConfig, load_config, parse_config
from spdkit.method.model import NO_SHORTCUTS, ComponentModel
from spdkit.pipeline.run import run_experiment
from spdkit.pipeline.sweep import across_seeds
from spdkit.store import runs
from spdkit.targets.data import sample_sparse_features
from spdkit.targets.resid_mlp import ResidMLP, labels, train_resid_mlp
from spdkit.targets.resid_mlp_analysis import (
    neuron_contributions_subcomponents,
    neuron_contributions_target,
    pearson_and_slope,
    resid_mlp_verdict,
)
from tests.helpers import tiny_resid_dict


def test_model_shapes_embedding_and_labels():
    model = ResidMLP(n_features=10, d_resid=40, n_layers=3, d_mlp=5)
    assert torch.allclose(model.W_E.norm(dim=1), torch.ones(10))
    x = sample_sparse_features(64, 10, 0.1, torch.Generator().manual_seed(0), -1.0, 1.0)
    assert torch.allclose(model.embed(x), x @ model.W_E, atol=1e-6)
    assert model(x).shape == (64, 10)
    assert [n for n, _ in model.named_modules() if n.endswith("mlp_in")] == [
        "layers.0.mlp_in",
        "layers.1.mlp_in",
        "layers.2.mlp_in",
    ]
    assert torch.equal(labels(torch.tensor([-0.5, 0.0, 0.5])), torch.tensor([-0.5, 0.0, 1.0]))


def test_masked_passes_replay_the_embedding_instead_of_recomputing_it():
    """The embedding is a module call before the first decomposed module: a masked pass with
    the step's record returns its recorded output (exact), without the shortcut it recomputes."""
    model = ResidMLP(n_features=10, d_resid=40, n_layers=2, d_mlp=5)
    comp = ComponentModel(model, [ModuleSpec(pattern="layers.*.mlp_*", C=4)], ci_hidden_dim=2)
    x = sample_sparse_features(64, 10, 0.3, torch.Generator().manual_seed(0), -1.0, 1.0)
    record = comp.record(x)
    computed = []
    compute = model.embedding.forward
    model.embedding.forward = lambda *a: computed.append(1) or compute(*a)
    masks = {n: torch.rand(64, 4) for n in comp.module_names}
    fast = comp.masked_forward(x, masks, record)
    assert computed == []
    plain = comp.masked_forward(x, masks, record, shortcuts=NO_SHORTCUTS)
    assert computed == [1]
    torch.testing.assert_close(fast, plain)


def test_training_computes_relus_beyond_the_residual_stream():
    cfg = ResidMLPTargetConfig(
        n_features=12, d_resid=64, n_layers=1, d_mlp=6, feature_probability=0.05, train_steps=300
    )
    _, info = train_resid_mlp(cfg, seed=0)
    # the MLP must remove a good part of the ReLU(x) error the identity path leaves
    assert info["mse"] < 0.6 * info["mse_without_mlps"], info


def test_bundled_configs_match_the_paper_appendix():
    c1, c2, c3 = (load_config(f"resid_mlp{i}") for i in (1, 2, 3))
    assert (c1.target.n_layers, c1.target.d_mlp, c1.target.n_features) == (1, 50, 100)
    assert (c2.target.n_layers, c2.target.d_mlp, c3.target.n_features) == (2, 25, 102)
    assert (c3.target.n_layers, c3.target.d_mlp, c3.ci_fn.hidden_dim) == (3, 17, 128)
    assert [m.C for m in c1.modules] == [100, 100] and c2.modules[0].C == 400
    assert (c1.loss.importance_minimality_coeff, c1.training.optimizer.lr) == (1e-5, 2e-3)
    assert c1.training.steps == 30_000
    assert c3.loss.importance_minimality_coeff == 0.5e-5 and c1.eval.one_hot_value == 0.75
    assert all(c.importance.pnorm == 2 and c.training.batch_size == 2048 for c in (c1, c2, c3))


def test_neuron_contributions_match_a_loop():
    g = torch.Generator().manual_seed(0)
    W_E, W_in, W_out = torch.randn(7, 20, generator=g), torch.randn(5, 20), torch.randn(20, 5)
    got = neuron_contributions_target(W_E, W_in, W_out)
    for i in range(7):
        expected = (W_E[i] @ W_out) * (W_in @ W_E[i])
        assert torch.allclose(got[i], expected, atol=1e-5)


def test_subcomponent_contributions_equal_the_target_for_an_exact_per_feature_split():
    # W_E = identity: feature i lives on axis i; W_in split into one rank-one piece per feature
    n, d_mlp = 4, 3
    W_E = torch.eye(n)
    W_in, W_out = torch.randn(d_mlp, n), torch.randn(n, d_mlp)
    U_in, V_in = W_in.clone(), torch.eye(n)  # U_in[:, m] V_in[m] = W_in[:, m] e_mᵀ
    sub = neuron_contributions_subcomponents(W_E, U_in, V_in, W_out, match=list(range(n)))
    assert torch.allclose(sub, neuron_contributions_target(W_E, W_in, W_out), atol=1e-6)
    r, slope = pearson_and_slope(neuron_contributions_target(W_E, W_in, W_out), sub)
    assert r == pytest.approx(1.0) and slope == pytest.approx(1.0)


def test_pearson_and_slope():
    x = torch.linspace(-1, 1, 50)
    r, slope = pearson_and_slope(x, 2 * x + 1)
    assert r == pytest.approx(1.0) and slope == pytest.approx(2.0)
    r, _ = pearson_and_slope(x, -x)
    assert r == pytest.approx(-1.0)


def test_greedy_order_puts_each_feature_on_the_diagonal():
    ci = torch.zeros(3, 5)
    ci[0, 4], ci[1, 2], ci[2, 0], ci[2, 3] = 1.0, 0.9, 0.8, 0.3
    assert greedy_feature_order(ci, 0.1) == [4, 2, 0, 3, 1]


def _perfect_ci(n_features=10, C=16, n_dense=5):
    ci_in = torch.zeros(n_features, C)
    ci_in[torch.arange(n_features), torch.arange(n_features)] = 1.0
    ci_out = torch.zeros(n_features, C)
    ci_out[:, :n_dense] = torch.rand(n_features, n_dense) * 0.5 + 0.5
    return ci_in, ci_out


def test_verdict_accepts_the_ground_truth_and_counts_what_breaks_it():
    ci_in, ci_out = _perfect_ci()
    v = resid_mlp_verdict({"l0.in": ci_in}, {"l0.out": ci_out}, n_neurons=5)
    assert v["ground_truth"]
    assert v["w_in"]["l0.in"]["features_monosemantic"] == 10
    assert v["w_in"]["l0.in"]["subcomponents_dead"] == 6
    assert v["w_out"] == {"dense": 5, "expected_dense": 5, "dead": 11, "other": 0}

    # β3 too low: features 0-2 also light up a second W_in subcomponent
    low = ci_in.clone()
    low[0:3, 12] = 1.0
    v = resid_mlp_verdict({"l0.in": low}, {"l0.out": ci_out}, n_neurons=5)
    assert not v["ground_truth"]
    assert v["w_in"]["l0.in"]["features_with_several"] == 3
    assert v["w_in"]["l0.in"]["subcomponents_other"] >= 1

    # β3 too high: W_out split into one subcomponent per feature
    per_feature = torch.zeros(10, 16)
    per_feature[torch.arange(10), torch.arange(10)] = 0.6
    v = resid_mlp_verdict({"l0.in": ci_in}, {"l0.out": per_feature}, n_neurons=5)
    assert not v["ground_truth"] and v["w_out"]["dense"] == 0 and v["w_out"]["other"] == 10


def test_verdict_tells_a_faint_leak_from_a_shared_owner():
    """Feature 0's piece with CI 0.2 on feature 5 is a faint leak; with CI 0.8 there it is a
    shared owner (and feature 5 then has two pieces on)."""
    ci_in, ci_out = _perfect_ci()
    v = resid_mlp_verdict({"l0.in": ci_in}, {"l0.out": ci_out}, n_neurons=5)["w_in"]["l0.in"]
    assert v["features_faint_leak"] == v["features_shared_owner"] == 0
    ci_in[5, 0] = 0.2
    v = resid_mlp_verdict({"l0.in": ci_in}, {"l0.out": ci_out}, n_neurons=5)
    w_in = v["w_in"]["l0.in"]
    assert not v["ground_truth"]
    assert (w_in["features_monosemantic"], w_in["features_faint_leak"]) == (9, 1)
    assert w_in["features_shared_owner"] == 0
    ci_in[5, 0] = 0.8
    w_in = resid_mlp_verdict({"l0.in": ci_in}, {"l0.out": ci_out}, n_neurons=5)["w_in"]["l0.in"]
    assert (w_in["features_shared_owner"], w_in["features_faint_leak"]) == (1, 0)
    assert w_in["features_with_several"] == 1


def test_verdict_counts_a_negligible_spare_piece_as_dead():
    """A spare piece with CI just above `off` on two features breaks the verdict while its
    weight counts; once its weight is marked negligible it is dead, and the truth stands.
    Monosemantic and dense pieces are read from the CI alone, whatever their weight."""
    ci_in, ci_out = _perfect_ci()
    ci_out[3:5, 9] = 0.15
    ci_in[6:8, 12] = 0.2
    v = resid_mlp_verdict({"l0.in": ci_in}, {"l0.out": ci_out}, n_neurons=5)
    assert not v["ground_truth"]
    assert v["w_out"]["other"] == 1 and v["w_in"]["l0.in"]["subcomponents_other"] == 1
    live = {"l0.in": torch.ones(16, dtype=torch.bool), "l0.out": torch.ones(16, dtype=torch.bool)}
    live["l0.out"][9] = live["l0.in"][12] = False
    live["l0.out"][2] = live["l0.in"][4] = False  # a dense piece and a feature's owner: small
    v = resid_mlp_verdict({"l0.in": ci_in}, {"l0.out": ci_out}, n_neurons=5, live=live)
    assert v["ground_truth"] and v["rules"]["negligible_weight_is_dead"]
    assert v["w_out"] == {"dense": 5, "expected_dense": 5, "dead": 11, "other": 0}
    assert v["w_in"]["l0.in"]["subcomponents_dead"] == 6
    assert v["w_in"]["l0.in"]["features_monosemantic"] == 10


def test_short_resid_run_writes_the_analysis(tmp_path):
    config = parse_config(tiny_resid_dict())
    summary = run_experiment(config, tmp_path / "run", progress=False)
    res = summary["resid_mlp"]
    assert set(res["verdict"]["w_in"]) == {"layers.0.mlp_in", "layers.1.mlp_in"}
    figures = {p.name for p in (tmp_path / "run" / "figures").iterdir()}
    assert {
        "ci_one_hot.png",
        "neuron_contributions.png",
        "neuron_contribution_pairs.png",
    } <= figures
    meta = json.loads((tmp_path / "run" / "target.json").read_text())
    assert meta["info"]["mse"] < meta["info"]["mse_without_mlps"]


@pytest.mark.slow  # 6000 steps: about 2 minutes on 2 cores; `pytest -m slow` runs it
def test_short_spd_run_on_a_small_resid_mlp_finds_the_ground_truth(tmp_path):
    """Compressed computation, scaled down: 20 features through 10 ReLU neurons (d_resid 100).
    The right answer is 20 monosemantic W_in subcomponents, 10 dense W_out subcomponents (one
    rank-10 mechanism) and everything else dead. Measured (seed 0, 6000 steps): exactly that,
    neuron-contribution r = 0.9966, on 1 and on 2 threads. The assertions can fail: β3 = 1e-4
    (3000 steps) left 19 of 20 features on several W_in subcomponents; β3 = 1e-3 with 3000
    steps left 2 features not monosemantic; seeds 1 and 2 with these settings missed by 1 and
    3 W_in subcomponents that were neither monosemantic nor dead, so the seed stays 0."""
    target = {"n_features": 20, "d_resid": 100, "n_layers": 1, "d_mlp": 10}
    data = tiny_resid_dict(
        modules=[{"pattern": "layers.*.mlp_in", "C": 40}, {"pattern": "layers.*.mlp_out", "C": 40}],
        importance_minimality_coeff=1e-3,
        steps=6000,
        batch_size=256,
        optimizer={"lr": 2e-3, "lr_schedule": "constant"},
        log_every=500,
        eval={"one_hot_value": 0.75, "n_eval_samples": 1024},
    )
    data["target"].update(target, train_steps=2000, train_batch_size=1024)
    summary = run_experiment(parse_config(data), tmp_path / "run", progress=False)
    verdict = summary["resid_mlp"]["verdict"]
    w_in = verdict["w_in"]["layers.0.mlp_in"]
    assert w_in["features_monosemantic"] == 20 and w_in["subcomponents_other"] == 0
    assert w_in["subcomponents_dead"] == 20
    assert verdict["w_out"] == {"dense": 10, "expected_dense": 10, "dead": 30, "other": 0}
    assert verdict["ground_truth"]
    assert summary["resid_mlp"]["neuron_contributions"]["pearson_r"] > 0.95


def test_an_unfinished_run_is_evaluated_at_its_checkpoint(tmp_path, monkeypatch):
    """`spdkit eval --checkpoint` on a run stopped at step 25 (last checkpoint: 20) writes the
    full analysis into partial/step_20/ and touches nothing the finished-run contract owns."""
    from spdkit.training.trainer import Trainer

    train_step = Trainer.train_step

    def stop_at_25(self, *args):
        if self.step == 25:
            raise KeyboardInterrupt
        return train_step(self, *args)

    monkeypatch.setattr(Trainer, "train_step", stop_at_25)
    config = parse_config(tiny_resid_dict(steps=40, checkpoint_every=20))
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, run, progress=False)
    monkeypatch.undo()
    assert not (run / "summary.json").exists() and not (run / "figures").exists()

    result = CliRunner().invoke(app, ["eval", str(run), "--checkpoint"])
    assert result.exit_code == 0, result.output
    assert "step 20 of 40" in result.output and "verdict:" in result.output
    out = run / "partial" / "step_20"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["partial"] == {"step": 20, "steps": 40}
    assert set(summary["resid_mlp"]["verdict"]["w_in"]) == {"layers.0.mlp_in", "layers.1.mlp_in"}
    assert all("n_alive" not in m for m in summary["modules"].values())
    assert (out / "figures" / "ci_one_hot.png").stat().st_size > 0
    assert not (run / "summary.json").exists() and not (run / "figures").exists()

    result = CliRunner().invoke(app, ["eval", str(tmp_path), "--checkpoint"])
    assert result.exit_code != 0 and "error:" in result.output and "Traceback" not in result.output


def test_sweep_runs_a_grid_shares_the_target_and_reuses_finished_runs(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_resid_dict(steps=10)))
    out = tmp_path / "sweep"
    args = ["sweep", str(cfg), "--set", "importance_minimality_coeff=1e-5,1e-3"]
    args += ["--seeds", "0", "--out", str(out), "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["importance_minimality_coeff"] for r in rows] == [1e-5, 1e-3]
    assert (out / "sweep.png").stat().st_size > 0 and "| run |" in (out / "sweep.md").read_text()
    second = json.loads((out / rows[1]["run"] / "target.json").read_text())
    assert second["info"]["loaded_from"] == str(out / rows[0]["run"])  # target trained once
    mtime = (out / rows[0]["run"] / "summary.json").stat().st_mtime
    assert CliRunner().invoke(app, args).exit_code == 0
    assert (out / rows[0]["run"] / "summary.json").stat().st_mtime == mtime  # reused


def test_sweep_rejects_a_malformed_axis(tmp_path):
    result = CliRunner().invoke(app, ["sweep", "resid_mlp1", "--set", "pnorm"])
    assert result.exit_code == 2 and "key=v1,v2" in result.output
    result = CliRunner().invoke(app, ["sweep", "resid_mlp1", "--set", "pnorm=-1"])
    assert result.exit_code == 2 and "pnorm" in result.output


def test_sweep_summarises_each_value_across_seeds():
    def row(coeff, seed, mono, truth):
        return {"run": f"c{coeff}s{seed}", "label": "", "run_dir": "", "pnorm": 2.0,
                "importance_minimality_coeff": coeff, "seed": seed,
                "w_in_monosemantic": mono, "ground_truth": truth}  # fmt: skip

    rows = [row(1e-5, 0, 100, True), row(1e-5, 1, 97, False), row(1e-4, 0, 40, False)]
    summary = across_seeds(rows)
    assert [(s["importance_minimality_coeff"], s["pnorm"], s["seeds"]) for s in summary] == [
        (1e-5, 2.0, 2),
        (1e-4, 2.0, 1),
    ]
    assert summary[0]["ground_truth"] == "1/2" and summary[1]["ground_truth"] == "0/1"
    assert summary[0]["w_in_monosemantic"] == "98.5 [97, 100]"
    assert summary[1]["w_in_monosemantic"] == "40 [40, 40]"


def test_sweep_with_jobs_runs_points_side_by_side_and_matches_one_at_a_time(tmp_path):
    """--jobs 2: child processes with half the cores each; the same runs as --jobs 1 (a
    run's numbers do not depend on its thread count here: CPU kernels reduce in a fixed order
    for these sizes), each with its log.txt, the target trained once per seed."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_resid_dict(steps=10)))
    grid = ["--set", "importance_minimality_coeff=1e-5,1e-3", "--seeds", "0,1", "--quiet"]
    one = CliRunner().invoke(app, ["sweep", str(cfg), *grid, "--out", str(tmp_path / "a")])
    assert one.exit_code == 0, one.output
    two = CliRunner().invoke(
        app, ["sweep", str(cfg), *grid, "--out", str(tmp_path / "b"), "--jobs", "2"]
    )
    assert two.exit_code == 0, two.output
    rows = json.loads((tmp_path / "b" / "sweep.json").read_text())
    assert len(rows) == 4
    for row in rows:
        run = tmp_path / "b" / row["run"]
        assert (run / "log.txt").exists()
        a, _ = runs.load_tensors(tmp_path / "a" / row["run"] / "components.safetensors")
        b, _ = runs.load_tensors(run / "components.safetensors")
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7)
    info = [json.loads((tmp_path / "b" / r["run"] / "target.json").read_text()) for r in rows]
    assert sum("loaded_from" in i["info"] for i in info) == 2  # one trained target per seed


def test_sweep_columns_use_the_paper_symbols_for_old_and_grouped_keys():
    from spdkit.pipeline.sweep import _short

    assert _short("importance_minimality_coeff") == "β3"
    assert _short("loss.importance_minimality_coeff") == "β3"
    assert _short("importance.pnorm") == _short("pnorm") == "p"
    assert _short("training.optimizer.lr") == "lr"
