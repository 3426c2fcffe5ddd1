"""SIGKILL a real `spdkit run` at random moments, `spdkit resume`, compare bit for bit."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from spdkit.store import runs
from tests.helpers import tiny_config_file

SPDKIT = [sys.executable, "-c", "from spdkit.cli import main; main()"]


# VPD's training adversary: persistent sources with Adam state, in the checkpoint
PERSISTENT_PGD = {
    "adversarial_recon_coeff": 1.0,
    "pgd": {"persistent": True, "optimizer": "adam", "step_size": 0.05, "warmup_frac": 0.1},
}


def write_config(path, **overrides):
    tiny_config_file(
        path, 300, **{"steps": 150, "checkpoint_every": 7, "log_every": 5, **overrides}
    )


def spdkit(*args, env):
    return subprocess.run([*SPDKIT, *args], env=env, capture_output=True, text=True, timeout=300)


def uninterrupted(tmp, **overrides):
    write_config(tmp / "c.yaml", **overrides)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = spdkit("run", str(tmp / "c.yaml"), "--out", str(tmp / "run"), "--quiet", env=env)
    assert result.returncode == 0, result.stderr
    tensors, _ = runs.load_tensors(tmp / "run" / "components.safetensors")
    return tmp / "c.yaml", tensors, env


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return uninterrupted(tmp_path_factory.mktemp("ref"))


@pytest.fixture(scope="module")
def reference_pgd(tmp_path_factory):
    return uninterrupted(tmp_path_factory.mktemp("ref_pgd"), **PERSISTENT_PGD)


def start_run(config, out, env, wait_for: str) -> subprocess.Popen:
    """Start `spdkit run` in a subprocess and return once out/wait_for exists."""
    proc = subprocess.Popen(
        [*SPDKIT, "run", str(config), "--out", str(out), "--quiet"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (out / wait_for).exists() and time.time() < deadline:
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize(
    "which,kill_point",
    [("reference", k) for k in range(5)] + [("reference_pgd", 1), ("reference_pgd", 3)],
)
def test_sigkill_then_resume_is_bit_identical(request, tmp_path, which, kill_point):
    config, expected, env = request.getfixturevalue(which)
    out = tmp_path / "run"
    proc = start_run(config, out, env, "config.yaml")
    # from "target training" through "training + checkpoints" to "evaluation"
    time.sleep(random.Random(kill_point).uniform(0.0, 4.0))
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    result = spdkit("resume", str(out), "--quiet", env=env)
    assert result.returncode == 0, result.stderr
    got, _ = runs.load_tensors(out / "components.safetensors")
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    steps = [
        yaml.safe_load(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(5, 151, 5))


@pytest.mark.parametrize("wait_for", ["config.yaml", "metrics.jsonl"])
def test_sigterm_stops_cleanly_with_a_hint_and_resumes_exactly(reference, tmp_path, wait_for):
    """SIGTERM early (target training) or in the loop (which checkpoints first): exit 130,
    a one-line hint, no traceback; a slow machine may put it in the evaluation instead."""
    config, expected, env = reference
    out = tmp_path / "run"
    proc = start_run(config, out, env, wait_for)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130, stderr
    assert f"spdkit resume {out}" in stderr and "Traceback" not in stderr
    if wait_for == "metrics.jsonl":
        _, meta = runs.load_tensors(out / runs.CHECKPOINT)
        assert 0 < int(meta["step"]) <= 150
    result = spdkit("resume", str(out), "--quiet", env=env)
    assert result.returncode == 0, result.stderr
    got, _ = runs.load_tensors(out / "components.safetensors")
    assert all(torch.equal(got[k], expected[k]) for k in expected)
