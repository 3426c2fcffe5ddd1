"""Milliseconds per SPD training step for bundled configs (a benchmark, not a test).

    python benchmarks/bench_step.py [--configs tms_5-2 tms_40-10] [--steps 30] [--threads 2]
        [--ci-backend auto|eager|compiled|fused] [--json out.json]

The target is built untrained (step time does not depend on its weights). Prints a table of
median / min / max ms per step over `--steps` timed steps after `--warmup` steps.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from spdkit.config import bundled_config_names, load_config
from spdkit.decomposition import build_trainer, data_source
from spdkit.targets import target_kind


def time_config(name: str, steps: int, warmup: int, ci_backend: str, device: str) -> dict:
    overrides = {"ci_backend": ci_backend}
    config = load_config(name, overrides)
    target = target_kind(config.target).build(config.target)
    trainer = build_trainer(target, data_source(config), config, device)
    for _ in range(warmup):
        trainer.train_step()
    times = []
    for _ in range(steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.train_step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t0))
    return {
        "config": name,
        "batch_size": config.batch_size,
        "ms_median": round(statistics.median(times), 3),
        "ms_min": round(min(times), 3),
        "ms_max": round(max(times), 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "ci_backend": trainer.ci_backend,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--configs", nargs="*", default=[n for n in bundled_config_names() if n.startswith("tms")]
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--ci-backend", default="auto", choices=["auto", "eager", "compiled", "fused"]
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    print(f"{'config':<14}{'batch':>7}{'ms/step':>10}{'min':>9}{'max':>9}{'RSS MB':>9}")
    rows = []
    for name in args.configs:
        row = time_config(name, args.steps, args.warmup, args.ci_backend, args.device)
        rows.append(row)
        print(
            f"{name:<14}{row['batch_size']:>7}{row['ms_median']:>10.2f}{row['ms_min']:>9.2f}"
            f"{row['ms_max']:>9.2f}{row['peak_rss_mb']:>9.0f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
