"""Run directory: contents, save -> load round trip, resume, seeds, corrupt files."""

import json
import os
import signal

import pytest
import torch

from spdkit import runs
from spdkit.config import parse_config
from spdkit.decomposition import load
from spdkit.experiment import resume_run, run_experiment
from tests.conftest import tiny_tms_dict


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
    assert 0 <= summary["feature_match"]["mmcs"] <= 1


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


def test_resume_continues_bit_exactly(tmp_path, monkeypatch):
    """SIGTERM during step 20 -> checkpoint at 20 and a clean stop; resume; compare bit for bit."""
    full = tmp_path / "full"
    run_experiment(small_config(), full, progress=False)

    from spdkit import train

    original = train.Trainer.train_step

    def interrupting(self):
        out = original(self)
        if self.step == 20:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(train.Trainer, "train_step", interrupting)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(small_config(), part, progress=False)
    monkeypatch.setattr(train.Trainer, "train_step", original)
    assert not (part / "components.safetensors").exists()
    _, meta = runs.load_tensors(part / runs.CHECKPOINT)
    assert meta["step"] == "20"
    resume_run(part, progress=False)
    a, _ = runs.load_tensors(full / "components.safetensors")
    b, _ = runs.load_tensors(part / "components.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30, 40]


def test_existing_run_dir_is_not_overwritten(finished_run):
    out, _ = finished_run
    with pytest.raises(FileExistsError, match="spdkit resume"):
        run_experiment(small_config(), out, progress=False)


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


@pytest.mark.parametrize(
    "victim", ["components.safetensors", "target.safetensors", "config.yaml", "target.json"]
)
def test_damaged_run_directory_is_a_clear_error(finished_run, tmp_path, victim):
    import shutil

    out, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / victim).write_bytes(b"\x00garbage")
    with pytest.raises(runs.RunDirError, match=victim.replace(".", r"\.")):
        load(copy)
    (copy / victim).unlink()
    with pytest.raises(runs.RunDirError):
        load(copy)


def test_a_pickle_checkpoint_is_refused_without_running_it(tmp_path):
    import pickle  # only to craft the malicious file; spdkit itself never unpickles

    class Boom:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'pwned')!r}, 'w').write('pwned')",))

    path = tmp_path / "latest.safetensors"
    path.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(runs.RunDirError, match="not a readable safetensors file"):
        runs.load_tensors(path)
    assert not (tmp_path / "pwned").exists()


def test_components_with_wrong_shape_are_named(finished_run, tmp_path):
    import shutil

    out, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    tensors, _ = runs.load_tensors(copy / "components.safetensors")
    tensors["linear1.U"] = torch.zeros(3, 8)
    del tensors["linear2.V"]
    runs.save_tensors(copy / "components.safetensors", tensors)
    with pytest.raises(
        runs.RunDirError, match=r"missing tensor 'linear2\.V'.*'linear1\.U' has shape \[3, 8\]"
    ):
        load(copy)


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
    with pytest.raises(runs.RunDirError, match="pass load"):
        load(tmp_path / "mine")
    again = load(tmp_path / "mine", target=make())
    for name in ("0", "2"):
        for a, b in zip(decomp.subcomponents(name), again.subcomponents(name), strict=True):
            assert torch.equal(a, b)
    x = torch.randn(3, 4)
    torch.testing.assert_close(again.causal_importance(x)["2"], decomp.causal_importance(x)["2"])
