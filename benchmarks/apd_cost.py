"""SPD against APD, cost per training step on the same engine (claim 5 of the seed post: APD,
with a full-rank parameter vector per component, is computationally heavy where SPD is not).

    python benchmarks/apd_cost.py [--pairs tms_5-2 resid_mlp1 ...] [--steps 5] [--threads 2]
        [--equal-c] [--json benchmarks/results/<date>_apd_cost.json]

For each bundled toy config NAME and its APD twin NAME-apd (each as bundled: SPD's C
rank-one subcomponents, APD's C full-rank components), in a fresh process each (peak RSS is
a process's high-water mark; with --equal-c the APD twin gets the SPD config's C, so that C
rank-one subcomponents face C full-rank components): median ms per training step over `--steps` steps after two
warm-up steps at the config's own batch size, the trainable parameter count and the peak RSS.
The target is built untrained: the cost of a step does not depend on its weights.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from spdkit.config import load_config
from spdkit.targets import data_source, target_kind
from spdkit.training.loop import build_trainer

DEFAULT_PAIRS = ["tms_5-2", "tms_40-10", "resid_mlp1", "resid_mlp2"]


def measure(name: str, steps: int, threads: int, C: int | None = None) -> dict:
    """One config in this process (every module's C set to `C` if given): ms per step,
    parameters, peak RSS."""
    torch.set_num_threads(threads)
    config = load_config(name)
    if C is not None:
        n = len(config.modules)
        config = load_config(name, {f"modules.{i}.C": C for i in range(n)})
    target = target_kind(config.target).build(config.target)
    trainer = build_trainer(target, data_source(config), config, "cpu")
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        trainer.train_step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return {
        "config": name,
        "method": "apd" if config.apd is not None else "spd",
        "batch_size": config.training.batch_size,
        "C": config.modules[0].C,
        "trainable_parameters": sum(p.numel() for p in trainer.model.trainable_parameters()),
        "ms_per_step": round(1000 * statistics.median(times), 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", default=DEFAULT_PAIRS)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--equal-c", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: measure this config
    parser.add_argument("--C", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.steps, args.threads, args.C)))
        return
    rows = []
    print(f"{'config':<16}{'method':>7}{'C':>6}{'params':>12}{'ms/step':>11}{'peak MB':>9}")
    for base in args.pairs:
        spd_C = load_config(base).modules[0].C
        for name in (base, f"{base}-apd"):
            same = ["--C", str(spd_C)] if args.equal_c and name != base else []
            out = subprocess.run(
                [sys.executable, __file__, "--one", name, "--steps", str(args.steps)]
                + ["--threads", str(args.threads), *same],
                capture_output=True,
                text=True,
                check=True,
            )
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"{name:<16}{row['method']:>7}{row['C']:>6}{row['trainable_parameters']:>12,}"
                f"{row['ms_per_step']:>11.1f}{row['peak_rss_mb']:>9.0f}",
                flush=True,
            )
    if args.json:
        result = {"threads": args.threads, "equal_c": args.equal_c, "rows": rows}
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
