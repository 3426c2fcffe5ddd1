"""Runs that share a machine: step time alone, two side by side, and alone next to a busy core.

    python benchmarks/concurrent_runs.py [--config tms_5-2] [--steps 3000] [--json out.json]

Each case starts `spdkit run CONFIG --steps N` processes (reusing one trained target) with the
given OMP_NUM_THREADS / OMP_WAIT_POLICY and reads each run's training ms per step from its
summary. "busy core" runs a pure-Python spin loop in another process meanwhile (a core that
someone else's job occupies). Throughput of two concurrent runs against running them back to
back: 2 · ms(alone) / mean ms(concurrent) (1.0: no loss; the issue's goal is ≥ 0.8).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SPDKIT = [sys.executable, "-m", "spdkit"]
SPIN = "import time\nwhile True: pass"


def start(config: str, steps: int, out: Path, target: Path | None, env: dict) -> subprocess.Popen:
    cmd = [*SPDKIT, "run", config, "--steps", str(steps), "--out", str(out), "--quiet"]
    if target is not None:
        cmd += ["--target", str(target)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def ms_per_step(out: Path) -> float:
    return json.loads((out / "summary.json").read_text())["timing"]["ms_per_step"]


def case(
    name: str, n: int, threads: int, policy: str | None, busy: bool, opts, work: Path, target
) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        env.pop(var, None)
    if policy and policy.startswith("spin="):
        env["GOMP_SPINCOUNT"] = policy.removeprefix("spin=")
    elif policy:
        env["OMP_WAIT_POLICY"] = policy
    spinner = subprocess.Popen([sys.executable, "-c", SPIN]) if busy else None
    try:
        outs = [work / f"{name}-{i}" for i in range(n)]
        procs = [start(opts.config, opts.steps, o, target, env) for o in outs]
        for p in procs:
            _, err = p.communicate()
            if p.returncode != 0:
                raise SystemExit(f"{name} failed:\n{err.decode()[-2000:]}")
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    times = [ms_per_step(o) for o in outs]
    row = {"case": name, "processes": n, "threads": threads, "policy": policy or "default"}
    row |= {"busy_core": busy, "ms_per_step": times}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tms_5-2")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--policies",
        default="default,PASSIVE",
        help="comma-separated: default, PASSIVE, ACTIVE (OMP_WAIT_POLICY) or spin=N "
        "(GOMP_SPINCOUNT=N)",
    )
    parser.add_argument("--cases", default="alone,two,two-half,busy")
    opts = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        first = start(opts.config, 1, work / "target", None, dict(os.environ))
        first.communicate()
        target = work / "target"
        rows = []
        cases, half = opts.cases.split(","), max(1, cores // 2)
        for tag in opts.policies.split(","):
            policy = None if tag == "default" else tag
            if "alone" in cases:
                rows.append(case(f"alone-{tag}", 1, cores, policy, False, opts, work, target))
            if "two" in cases:
                rows.append(
                    case(f"two-{cores}t-{tag}", 2, cores, policy, False, opts, work, target)
                )
            if "two-half" in cases:
                rows.append(case(f"two-{half}t-{tag}", 2, half, policy, False, opts, work, target))
            if "busy" in cases:
                rows.append(case(f"busy-core-{tag}", 1, cores, policy, True, opts, work, target))
    alone = {r["policy"]: r["ms_per_step"][0] for r in rows if r["case"].startswith("alone")}
    for r in rows:
        if r["processes"] == 2 and r["policy"] in alone:
            mean = sum(r["ms_per_step"]) / 2
            r["throughput_vs_back_to_back"] = round(2 * alone[r["policy"]] / mean, 3)
        print(r["case"], r["ms_per_step"], r.get("throughput_vs_back_to_back", ""))
    if opts.json:
        meta = {"config": opts.config, "steps": opts.steps, "cores": cores}
        opts.json.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
