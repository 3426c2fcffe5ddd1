"""Data-parallel SPD (spdkit.engine.distributed): per-sample random numbers, and 2 gloo ranks under
torchrun against one process with the same global batch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from spdkit.engine.distributed import Parallel, shard_size
from spdkit.engine.random_stream import MaskStream
from spdkit.store import runs
from tests.helpers import tiny_config_file, tiny_tms_dict

SPDKIT = [sys.executable, "-m", "spdkit"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]

# every term whose numbers or sums cross samples: stochastic masks, per-position subset
# routing, persistent PGD with per-position sources and Adam state, frequency minimality
VPD_TERMS = {
    "stochastic_recon_subset_coeff": 1.0,
    "subset_routing": {"kind": "uniform_k", "scope": "position"},
    "adversarial_recon_coeff": 1.0,
    "pgd": {"persistent": True, "optimizer": "adam", "step_size": 0.05, "n_steps": 2},
    "frequency_minimality_coeff": 1e-3,
}


def test_a_ranks_mask_draws_are_its_rows_of_the_global_draw():
    g = torch.rand(8, 3)
    whole = MaskStream(5)
    shards = [MaskStream(5, rank=r, world=2) for r in range(2)]
    for _ in range(2):  # the streams stay aligned draw after draw
        expected = whole.masks(g)
        got = torch.cat([s.masks(g[4 * r : 4 * (r + 1)]) for r, s in enumerate(shards)])
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        per_sample = whole.uniforms(8, "cpu", per_sample=True)
        parts = [s.uniforms(4, "cpu", per_sample=True) for s in shards]
        assert torch.equal(torch.cat(parts), per_sample)
        shared = whole.uniforms(3, "cpu")  # a draw for the whole batch: the same everywhere
        assert all(torch.equal(s.uniforms(3, "cpu"), shared) for s in shards)
    assert all(s.offset == whole.offset for s in shards)


def test_shards_split_the_batch_evenly_or_say_why_not():
    assert [Parallel(rank=r, world=4).rows(8) for r in range(4)] == [
        slice(0, 2),
        slice(2, 4),
        slice(4, 6),
        slice(6, 8),
    ]
    with pytest.raises(ValueError, match="batch_size 10 does not split into 4 equal shards"):
        shard_size(10, 4)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _config(tmp: Path, **overrides) -> Path:
    return tiny_config_file(tmp / "c.yaml", 300, **{**VPD_TERMS, **overrides})


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _relative_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-30)) for k in a)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("one")
    config = _config(tmp)
    result = _run([*SPDKIT, "run", str(config), "--out", str(tmp / "run"), "--quiet"])
    assert result.returncode == 0, result.stderr
    return config, tmp / "run"


def test_two_gloo_ranks_compute_what_one_process_computes(one_process, tmp_path):
    config, single = one_process
    out = tmp_path / "run"
    result = _run(
        [*TORCHRUN, "--nproc_per_node=2", "-m", "spdkit", "run", str(config), "--out", str(out)]
        + ["--quiet", "--target", str(single)]
    )
    assert result.returncode == 0, result.stderr
    expected, _ = runs.load_tensors(single / "components.safetensors")
    got, _ = runs.load_tensors(out / "components.safetensors")
    assert _relative_gap(expected, got) < 1e-5
    # the checkpoint holds the global state: sources of the whole batch, firing over it
    tensors, meta = runs.load_tensors(out / runs.CHECKPOINT)
    ref_tensors, ref_meta = runs.load_tensors(single / runs.CHECKPOINT)
    assert meta["firing_positions"] == ref_meta["firing_positions"]
    for key, value in ref_tensors.items():
        if key.startswith(("pgd.", "firing.")):
            assert tensors[key].shape == value.shape, key
    # metrics: the global losses, logged once
    lines = [yaml.safe_load(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ref = [yaml.safe_load(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [x["step"] for x in ref]
    assert lines[-1]["total"] == pytest.approx(ref[-1]["total"], rel=1e-4)
    assert "== spdkit summary ==" in result.stdout and result.stdout.count("spdkit summary") == 1


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of torchrun worker `rank` under the launcher process (Linux /proc)."""
    todo = _children(launcher)
    while todo:
        pid = todo.pop()
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"LOCAL_RANK" in b" ".join(environ):
            return pid
        todo += _children(pid)
    return None


def _start_two_ranks(config: Path, out: Path) -> subprocess.Popen:
    cmd = [*TORCHRUN, "--nproc_per_node=2", "-m", "spdkit", "run", str(config)]
    return _start_until_checkpoint([*cmd, "--out", str(out), "--quiet"], out)


def _start_until_checkpoint(cmd: list[str], out: Path) -> subprocess.Popen:
    """Start cmd; return once out has a checkpoint (or after 120 s)."""
    proc = subprocess.Popen(
        cmd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (out / runs.CHECKPOINT).exists() and time.time() < deadline:
        time.sleep(0.05)
    return proc


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds ranks through /proc")
def test_sigkill_of_one_rank_stops_the_others_and_resume_continues(tmp_path):
    config = _config(tmp_path, steps=3000, checkpoint_every=20)
    out = tmp_path / "run"
    proc = _start_two_ranks(config, out)
    rank1 = _rank_pid(proc.pid, 1)
    assert rank1 is not None, "no rank 1 under torchrun"
    os.kill(rank1, signal.SIGKILL)
    t0 = time.time()
    _, stderr = proc.communicate(timeout=120)  # no hang
    assert proc.returncode != 0
    assert time.time() - t0 < 120
    _, meta = runs.load_tensors(out / runs.CHECKPOINT)
    stopped_at = int(meta["step"])
    assert 0 < stopped_at < 3000
    result = _run([*SPDKIT, "resume", str(out), "--quiet"], timeout=600)
    assert result.returncode == 0, result.stderr
    _, meta = runs.load_tensors(out / runs.CHECKPOINT)
    assert int(meta["step"]) == 3000


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds ranks through /proc")
def test_sigterm_to_one_rank_stops_both_after_the_same_step(one_process, tmp_path):
    """SIGTERM to rank 1 alone: the ranks agree to stop, rank 0 writes one checkpoint; the run
    then finishes in one process (another world size: equal to 1e-5, not bit for bit)."""
    config, single = one_process
    out = tmp_path / "run"
    proc = _start_two_ranks(config, out)
    rank1 = _rank_pid(proc.pid, 1)
    if rank1 is None or proc.poll() is not None:
        pytest.skip("the run finished before the signal could be sent")
    os.kill(rank1, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert (
        stderr.count(f"interrupted: continue from the last checkpoint with `spdkit resume {out}`")
        == 1
    )
    result = _run([*SPDKIT, "resume", str(out), "--quiet"])
    assert result.returncode == 0, result.stderr
    expected, _ = runs.load_tensors(single / "components.safetensors")
    got, _ = runs.load_tensors(out / "components.safetensors")
    assert _relative_gap(expected, got) < 1e-5


@pytest.mark.parametrize(
    "code,env,expected",
    [
        ("import spdkit.cli", {}, "1000"),  # the command line first: libgomp will spin briefly
        ("import spdkit.cli", {"GOMP_SPINCOUNT": "7"}, "7"),  # the user's setting wins
        ("import torch, spdkit.cli", {}, None),  # too late: torch has loaded libgomp
        ("import spdkit; spdkit.decompose", {}, None),  # the library changes nothing
    ],
)
def test_openmp_threads_spin_briefly_unless_told_otherwise(code, env, expected):
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    script = f"{code}; import os; print(os.environ.get('GOMP_SPINCOUNT'))"
    result = subprocess.run(
        [sys.executable, "-c", script], env={**base, **env}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(expected)


def test_a_one_process_run_continues_on_two_ranks(one_process, tmp_path):
    """1 → 2: SIGTERM a one-process run after its first checkpoint, `spdkit resume --nproc 2`;
    the same data, masks and sources per sample, so within float rounding of never stopping."""
    config, single = one_process
    out = tmp_path / "run"
    proc = _start_until_checkpoint([*SPDKIT, "run", str(config), "--out", str(out), "--quiet"], out)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    result = _run([*SPDKIT, "resume", str(out), "--quiet", "--nproc", "2"])
    assert result.returncode == 0, result.stderr
    expected, _ = runs.load_tensors(single / "components.safetensors")
    got, _ = runs.load_tensors(out / "components.safetensors")
    assert _relative_gap(expected, got) < 1e-5


class _PoisonedRows:
    """The config's data, with NaN in the last row (rank 1's shard) of the `at`-th batch."""

    def __init__(self, data, at: int) -> None:
        self.data, self.at, self.calls = data, at, 0

    def sample(self, batch_size, generator):
        x = self.data.sample(batch_size, generator)
        self.calls += 1
        if self.calls == self.at:
            x = x.clone()
            x[-1] = float("nan")
        return x


def _rank_with_poison(rank: int, store_path: str, mode: str, out: str) -> None:
    """One of 2 gloo ranks training the tiny config on data poisoned in rank 1's shard."""
    import json

    from spdkit.config import parse_config
    from spdkit.engine.distributed import Parallel, leave
    from spdkit.targets import data_source, target_kind
    from spdkit.training.loop import build_trainer
    from spdkit.training.trainer import NonFiniteError

    torch.set_num_threads(1)
    store = torch.distributed.FileStore(store_path, 2)
    torch.distributed.init_process_group("gloo", store=store, rank=rank, world_size=2)
    config = parse_config(tiny_tms_dict(on_nonfinite=mode, steps=6))
    torch.manual_seed(0)  # the same (untrained) target on both ranks
    target = target_kind(config.target).build(config.target)
    data = _PoisonedRows(data_source(config), at=3)
    trainer = build_trainer(target, data, config, "cpu", Parallel(rank, 2, rank, 2))
    outcome = "finished"
    try:
        trainer.run(progress=False)
    except NonFiniteError as err:
        outcome = str(err)
    params = [p.detach().sum().item() for p in trainer.model.trainable_parameters()]
    result = {"outcome": outcome, "step": trainer.step, "skipped": trainer.skipped_steps}
    Path(out, f"rank{rank}.json").write_text(json.dumps({**result, "params": params}))
    # as the command line's ranks leave (`spdkit.engine.distributed.leave`): gloo's teardown
    # in destroy_process_group aborted a rank now and then ("terminate called without an
    # active exception", SIGABRT), after its results were written
    torch.distributed.barrier()
    leave()


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_a_nonfinite_loss_on_one_rank_is_decided_on_every_rank(tmp_path, mode):
    import json

    torch.multiprocessing.spawn(
        _rank_with_poison, args=(str(tmp_path / "store"), mode, str(tmp_path)), nprocs=2
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["step"] == ranks[1]["step"]
    assert ranks[0]["params"] == ranks[1]["params"]  # still the same model on both
    if mode == "stop":
        assert all("step 3: non-finite" in r["outcome"] for r in ranks)
    else:
        assert all(r["outcome"] == "finished" and r["skipped"] == 1 for r in ranks)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds ranks through /proc")
def test_resume_at_the_same_world_size_is_bit_exact(one_process, tmp_path):
    config, single = one_process
    whole = tmp_path / "whole"
    cmd = [*TORCHRUN, "--nproc_per_node=2", "-m", "spdkit", "run", str(config), "--quiet"]
    result = _run([*cmd, "--out", str(whole), "--target", str(single)])
    assert result.returncode == 0, result.stderr
    out = tmp_path / "run"
    proc = _start_two_ranks(config, out)
    rank1 = _rank_pid(proc.pid, 1)
    if rank1 is None or proc.poll() is not None:
        pytest.skip("the run finished before the signal could be sent")
    os.kill(rank1, signal.SIGTERM)
    proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    result = _run([*SPDKIT, "resume", str(out), "--quiet", "--nproc", "2"])
    assert result.returncode == 0, result.stderr
    expected, _ = runs.load_tensors(whole / "components.safetensors")
    got, _ = runs.load_tensors(out / "components.safetensors")
    assert all(torch.equal(got[k], expected[k]) for k in expected)
