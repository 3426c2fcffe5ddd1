"""Time and memory of `spdkit cluster`, and how they grow with the number of live subcomponents.

    python benchmarks/cluster_scaling.py --run RUN_DIR [--thresholds 0.5,0.1,0.01]
        [--samples 20000] [--synthetic 250,500,1000,2000,4000] [--out FILE.json]

--run: `spdkit cluster RUN_DIR` (a fresh process each, so peak memory is its own) at each
threshold τ: a lower τ leaves more subcomponents live. --synthetic: planted firing records
(pairs of subcomponents firing together on 2 % of rows each) with that many live
subcomponents, clustered in a fresh process: the merge's own growth, without a model.
Prints a markdown table and writes JSON (benchmarks/results/ by default).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

SYNTHETIC = r"""
import json, resource, sys, time
import numpy as np
from spdkit.analysis.mechanisms.merge import merge_greedy
from spdkit.analysis.mechanisms.firings import Firings
n_live, n_rows = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
rows, cols = [], []
for k in range(n_live // 2):
    on = np.flatnonzero(rng.random(n_rows) < 0.02)
    for c in (2 * k, 2 * k + 1):
        hit = on[rng.random(len(on)) < 0.9]
        rows.append(hit); cols.append(np.full(len(hit), c))
rows, cols = np.concatenate(rows), np.concatenate(cols)
order = np.lexsort((cols, rows))
ptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_rows))])
f = Firings([f"m:{i}" for i in range(n_live)], ptr.astype(np.int64), cols[order].astype(np.int32))
t0 = time.perf_counter(); pairs = f.pair_counts(); t1 = time.perf_counter()
merges = merge_greedy(f, pairs, 3.0); t2 = time.perf_counter()
print(json.dumps({"n_live": n_live, "n_clusters": len(merges.groups), "firings": len(f.fired),
    "pair_seconds": t1 - t0, "merge_seconds": t2 - t1,
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def real(run_dir: Path, thresholds: list[float], samples: int) -> list[dict]:
    rows = []
    for tau in thresholds:
        cmd = [sys.executable, "-m", "spdkit", "cluster", str(run_dir), "--quiet"]
        cmd += ["--threshold", str(tau), "--samples", str(samples)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        data = json.loads((run_dir / "clusters.json").read_text())
        rows.append(
            {
                "threshold": tau,
                "samples": data["n_samples"],
                "n_live": data["n_live"],
                "n_dead": len(data["dead"]),
                "n_clusters": len(data["clusters"]),
                **data["cost"],
            }
        )
        r = rows[-1]
        print(
            f"| τ {tau:g} | {r['n_live']} | {r['n_clusters']} | {r['firings']} | "
            f"{r['gather_seconds']:.1f} | {r['merge_seconds']:.1f} | "
            f"{r['record_bytes'] / 2**20:.1f} | {r['pair_count_bytes'] / 2**20:.1f} | "
            f"{r['peak_rss_bytes'] / 2**20:.0f} |"
        )
    return rows


def synthetic(sizes: list[int], n_rows: int) -> list[dict]:
    rows = []
    for n_live in sizes:
        out = subprocess.run(
            [sys.executable, "-c", SYNTHETIC, str(n_live), str(n_rows)],
            check=True,
            capture_output=True,
            text=True,
            env=os.environ,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(
            f"| synthetic | {n_live} | {r['n_clusters']} | {r['firings']} | - | "
            f"{r['merge_seconds']:.1f} | - | {8 * n_live**2 / 2**20:.1f} | "
            f"{r['peak_rss_bytes'] / 2**20:.0f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path)
    parser.add_argument("--thresholds", default="0.5,0.1,0.01")
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--synthetic", default="")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    print(
        "| case | live | clusters | firings | gather s | merge s | record MiB | pairs MiB | peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    result: dict = {"threads": os.environ.get("OMP_NUM_THREADS"), "samples": args.samples}
    if args.run:
        result["run"] = str(args.run)
        result["real"] = real(
            args.run, [float(t) for t in args.thresholds.split(",")], args.samples
        )
    if args.synthetic:
        result["synthetic"] = synthetic([int(n) for n in args.synthetic.split(",")], args.samples)
    out = args.out or Path(
        f"benchmarks/results/{datetime.date.today().isoformat()}_cluster_scaling.json"
    )
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
