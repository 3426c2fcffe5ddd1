"""The kernel build cache survives killed processes: no later `spdkit` may wait forever."""

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spdkit.engine import kernels

LOAD = "from spdkit.engine.kernels import load_extension as f; assert f() is not None, 'no kernel'"


def load_in_subprocess(cache, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPDKIT_KERNEL_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def finished_build():
    if kernels.load_extension() is None:
        pytest.skip("no C++ compiler here: the kernels cannot be built")
    return kernels.cache_root() / kernels.build_name()


def test_a_stale_lock_file_does_not_block_a_finished_build(finished_build, tmp_path):
    """torch's JIT loader leaves `lock` behind when killed while holding it, and its next
    call waits for the file to go. spdkit must import a finished build without looking."""
    build = tmp_path / finished_build.name
    shutil.copytree(finished_build, build)
    (build / "lock").touch()
    result = load_in_subprocess(tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr


def blocked_on_flock(pid: int) -> bool:
    """/proc/locks lists a process waiting for a flock as `N: -> FLOCK ... <pid> ...`."""
    return any(
        "->" in line and line.split()[5] == str(pid)
        for line in Path("/proc/locks").read_text().splitlines()
    )


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux /proc/locks")
def test_a_build_in_progress_is_waited_for_then_used(finished_build, tmp_path):
    """While a builder holds the flock, its library may be half-written (here: garbage) and
    has no `built` mark: a second process must wait on the flock, then import the finished
    build once the builder is done, not the garbage and not a build of its own."""
    build = tmp_path / finished_build.name
    build.mkdir()
    library = build / f"{build.name}.so"
    library.write_bytes(b"half a library")
    env = {**os.environ, "SPDKIT_KERNEL_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    with open(build / "build.flock", "w") as held:  # we are the builder
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = subprocess.Popen([sys.executable, "-c", LOAD], env=env, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while not blocked_on_flock(proc.pid) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert blocked_on_flock(proc.pid), "the second process did not wait for the builder"
        shutil.copy(finished_build / library.name, library)  # the build finishes
        (build / "built").write_text("")
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr.decode()
    assert not (build / "build.ninja").exists()  # it did not build again


@pytest.mark.slow
def test_a_build_killed_midway_is_finished_by_the_next_process(tmp_path):
    """SIGKILL a process while it compiles (torch's lock file exists), then load again:
    the second process takes the flock its dead holder released, clears the stale lock
    file and finishes the build (two compiles: about a minute on 2 cores)."""
    build = tmp_path / kernels.build_name()
    env = {**os.environ, "SPDKIT_KERNEL_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", LOAD], env=env, start_new_session=True)
    deadline = time.time() + 60
    while not (build / "lock").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (build / "lock").exists(), "the build never started"
    time.sleep(2.0)  # mid-compile
    os.killpg(proc.pid, signal.SIGKILL)  # python, ninja and the compilers
    proc.wait()
    assert (build / "lock").exists() and not (build / "built").exists()
    result = load_in_subprocess(tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (build / "built").exists() and not (build / "lock").exists()


def test_a_failed_build_is_reported_in_one_telling_line():
    from spdkit.engine.kernels import build_problem

    err = RuntimeError(
        "Error building extension 'k': [1/4] /x/c++ -MMD -c a.cpp\n"
        "/bin/sh: 1: /x/c++: not found\nninja: build stopped: subcommand failed."
    )
    assert build_problem(err) == "/bin/sh: 1: /x/c++: not found"
    assert build_problem(RuntimeError("x" * 500)).endswith("…")
    assert build_problem(RuntimeError("")) == "RuntimeError"
