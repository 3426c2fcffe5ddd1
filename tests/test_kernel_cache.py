"""The kernel build cache survives killed processes: no later `spdkit` may wait forever."""

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from spdkit import kernels

LOAD = "from spdkit.kernels import load_extension as f; assert f() is not None, 'no kernel'"


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


def test_a_build_in_progress_is_waited_for_not_imported(finished_build, tmp_path):
    """Without the `built` mark (written last) the library may be half-written: a second
    process waits for the builder's flock instead of importing it (here it is garbage)."""
    build = tmp_path / finished_build.name
    build.mkdir()
    (build / f"{build.name}.so").write_bytes(b"half a library")
    with open(build / "build.flock", "w") as held:  # a live builder holds the flock
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(subprocess.TimeoutExpired):
            load_in_subprocess(tmp_path, timeout=3)


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
