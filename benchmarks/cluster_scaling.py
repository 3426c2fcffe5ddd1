"""Time and memory of `spdkit cluster`, and how they grow with the number of live subcomponents.

    python benchmarks/cluster_scaling.py --run RUN_DIR [--thresholds 0.5,0.1,0.01]
        [--samples 20000] [--live 1000,10000,40000] [--density 0.02] [--exact-up-to 2000]
        [--out FILE.json]

--run: `spdkit cluster RUN_DIR` (a fresh process each, so peak memory is its own) at each
threshold τ: a lower τ leaves more subcomponents live. --live: planted records with known
groups and LM-like co-firing density (`planted_record`), merged in a fresh process each: time,
peak memory, ARI against the planted groups and, up to --exact-up-to live, against the dense
reference merge (`merge_reference.py`), with whether every merge was identical.
Prints markdown tables and writes JSON (benchmarks/results/ by default).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from spdkit.analysis.mechanisms.firings import Firings

SYNTHETIC = r"""
import json, resource, sys, time
import numpy as np
from sklearn.metrics import adjusted_rand_score
sys.path.insert(0, sys.argv[5])
from cluster_scaling import planted_record
from spdkit.analysis.mechanisms.merge import merge_greedy
from spdkit.analysis.mechanisms.merge_reference import merge_greedy_dense
n_live, n_rows, density, exact = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
f, truth = planted_record(n_live, n_rows, density)
def labels(groups):
    out = np.empty(n_live, np.int64)
    for i, g in enumerate(groups):
        out[g] = i
    return out
t0 = time.perf_counter(); merges = merge_greedy(f, 3.0); t1 = time.perf_counter()
row = {"n_live": n_live, "samples": n_rows, "density": density, "firings": len(f.fired),
    "mean_l0": len(f.fired) / n_rows, "n_clusters": len(merges.groups), "merge_seconds": t1 - t0,
    "ari_vs_planted": adjusted_rand_score(truth, labels(merges.groups))}
if exact:
    t2 = time.perf_counter(); dense = merge_greedy_dense(f, 3.0); t3 = time.perf_counter()
    row["exact_seconds"] = t3 - t2
    row["identical_to_exact"] = dense.groups == merges.groups and dense.deltas == merges.deltas
    row["ari_vs_exact"] = adjusted_rand_score(labels(dense.groups), labels(merges.groups))
row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(row))
"""


def planted_record(
    n_live: int, n_samples: int, density: float = 0.02, seed: int = 0
) -> tuple[Firings, np.ndarray]:
    """A firing record with known mechanisms and LM-like density: groups of 1-6 subcomponents,
    each group active on a log-uniform 0.2-5 % of samples (rescaled so that on average a
    fraction `density` of the live subcomponents fires per sample: VPD's decomposition has mean
    L0 205 over 9,972 alive, 0.021), each member firing on 90 % of its group's samples; a tenth
    of all firings is independent noise, so most pairs co-fire somewhere. Returns (record,
    planted group of each subcomponent)."""
    rng = np.random.default_rng(seed)
    sizes: list[int] = []
    while sum(sizes) < n_live:
        sizes.append(int(rng.integers(1, 7)))
    sizes[-1] -= sum(sizes) - n_live
    sizes = [size for size in sizes if size > 0]
    rate = np.exp(rng.uniform(np.log(0.002), np.log(0.05), len(sizes)))
    rate *= 0.9 * density / ((rate * np.array(sizes) * 0.9).sum() / n_live)
    noise = 0.1 * density
    rows, cols, truth, col = [], [], np.empty(n_live, np.int64), 0
    for group, (size, p) in enumerate(zip(sizes, rate, strict=True)):
        on = np.flatnonzero(rng.random(n_samples) < min(p, 1.0))
        for _ in range(size):
            hit = np.union1d(
                on[rng.random(len(on)) < 0.9], np.flatnonzero(rng.random(n_samples) < noise)
            )
            rows.append(hit)
            cols.append(np.full(len(hit), col))
            truth[col] = group
            col += 1
    row, column = np.concatenate(rows), np.concatenate(cols)
    order = np.lexsort((column, row))
    ptr = np.concatenate([[0], np.cumsum(np.bincount(row, minlength=n_samples))])
    names = [f"m:{i}" for i in range(n_live)]
    return Firings(names, ptr.astype(np.int64), column[order].astype(np.int32)), truth


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
            f"{r['record_bytes'] / 2**20:.1f} | "
            f"{r['peak_rss_bytes'] / 2**20:.0f} |"
        )
    return rows


def synthetic(sizes: list[int], n_rows: int, density: float, exact_up_to: int) -> list[dict]:
    print(
        "| live | samples | mean L0 | clusters | merge s | exact merge s | identical | ARI vs exact | ARI vs planted | peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for n_live in sizes:
        exact = "1" if n_live <= exact_up_to else "0"
        args = [str(n_live), str(n_rows), str(density), exact, str(Path(__file__).parent)]
        out = subprocess.run(
            [sys.executable, "-c", SYNTHETIC, *args],
            check=True,
            capture_output=True,
            text=True,
            env=os.environ,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(
            f"| {n_live} | {n_rows} | {r['mean_l0']:.0f} | {r['n_clusters']} | "
            f"{r['merge_seconds']:.1f} | {r.get('exact_seconds', float('nan')):.1f} | "
            f"{r.get('identical_to_exact', '-')} | {r.get('ari_vs_exact', float('nan')):.4f} | "
            f"{r['ari_vs_planted']:.4f} | {r['peak_rss_bytes'] / 2**20:.0f} |",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path)
    parser.add_argument("--thresholds", default="0.5,0.1,0.01")
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument(
        "--live", default="", help="planted records of these sizes, e.g. 1000,10000"
    )
    parser.add_argument("--density", type=float, default=0.02)
    parser.add_argument("--exact-up-to", type=int, default=2000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result: dict = {"threads": os.environ.get("OMP_NUM_THREADS"), "samples": args.samples}
    if args.run:
        print("| τ | live | clusters | firings | gather s | merge s | record MiB | peak RSS MiB |")
        print("|---|---|---|---|---|---|---|---|")
        result["run"] = str(args.run)
        result["real"] = real(
            args.run, [float(t) for t in args.thresholds.split(",")], args.samples
        )
    if args.live:
        sizes = [int(n) for n in args.live.split(",")]
        result["planted"] = synthetic(sizes, args.samples, args.density, args.exact_up_to)
    out = args.out or Path(
        f"benchmarks/results/{datetime.date.today().isoformat()}_cluster_scaling.json"
    )
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
