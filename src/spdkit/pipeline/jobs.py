"""Run directories run side by side: child processes that share the machine's cores.

Each child is `python -m spdkit resume RUN_DIR` (a prepared run directory runs from its start,
an interrupted one continues) with cores / jobs threads: processes that each start one thread
per core fight over the cores (measured in docs/distributed.md), processes that split them do
not. A child's output goes to RUN_DIR/log.txt.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from spdkit.engine.threads import threads_per_process
from spdkit.errors import JobsFailed
from spdkit.progress import progress_bar

LOG = "log.txt"


def child_env(jobs: int) -> dict[str, str]:
    """The environment of one of `jobs` concurrent runs: its share of the cores."""
    env = os.environ.copy()
    threads = str(threads_per_process(jobs))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = threads
    return env


def run_jobs(
    run_dirs: Sequence[Path], jobs: int, device: str = "cpu", progress: bool = True
) -> None:
    """Run every directory (at most `jobs` at once) to its end; JobsFailed names the ones that
    failed after all others have finished. Ctrl-C reaches the children too (same process
    group): each writes its checkpoint and stops."""
    pending, running, failed = list(run_dirs), {}, []
    env = child_env(jobs)
    bar = progress_bar(len(pending), f"runs ({jobs} at a time)", progress)
    try:
        while pending or running:
            while pending and len(running) < jobs:
                run_dir = pending.pop(0)
                log = (run_dir / LOG).open("a")
                cmd = [sys.executable, "-m", "spdkit", "resume", str(run_dir), "--quiet"]
                proc = subprocess.Popen(
                    [*cmd, "--device", device], stdout=log, stderr=subprocess.STDOUT, env=env
                )
                running[proc] = (run_dir, log)
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                run_dir, log = running.pop(proc)
                log.close()
                if proc.returncode != 0:
                    failed.append(f"{run_dir} (exit {proc.returncode}; see {run_dir / LOG})")
                bar.update(1)
    finally:
        for proc, (_, log) in running.items():
            proc.wait()
            log.close()
        bar.close()
    if failed:
        raise JobsFailed("run(s) failed: " + "; ".join(failed))
