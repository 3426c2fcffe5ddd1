"""Clusters of toy decompositions against their known mechanisms, over a range of α.

    python benchmarks/cluster_ground_truth.py RUN_DIR [RUN_DIR ...] [--alphas 1,2,3,4,6,10]
        [--checkpoint] [--out benchmarks/results/DATE_cluster_ground_truth.json]

For each run directory (finished, or at its last checkpoint with --checkpoint) and each α:
adjusted Rand index over live subcomponents, mechanisms found vs expected, live / dead counts,
the run's own ground-truth verdict where it has one (at a checkpoint: run `spdkit eval
--checkpoint RUN_DIR` first for it). Prints a markdown table, writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
from dataclasses import replace
from pathlib import Path

import spdkit
from spdkit.analysis.mechanisms.clusters import ClusterParams, cluster
from spdkit.pipeline.run import PARTIAL_DIR, load_checkpoint


def decomposition_quality(summary: dict) -> str:
    """The run's own verdict on its decomposition: MMCS (TMS), ground truth or not (resid)."""
    if "feature_match" in summary:
        return f"MMCS {summary['feature_match']['mmcs']:.4f}"
    if "resid_mlp" in summary:
        return f"ground truth: {summary['resid_mlp']['verdict']['ground_truth']}"
    return "-"


def run_summary(run_dir: Path, decomp: spdkit.Decomposition, checkpoint: bool, step: int) -> dict:
    """The finished run's summary, or `spdkit eval --checkpoint`'s one for this step if made."""
    if not checkpoint:
        return decomp.summary
    partial = run_dir / PARTIAL_DIR / f"step_{step}" / "summary.json"
    return json.loads(partial.read_text()) if partial.is_file() else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--alphas", default="1,2,3,4,6,10")
    parser.add_argument("--samples", type=int, default=ClusterParams().samples)
    parser.add_argument("--checkpoint", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    alphas = [float(a) for a in args.alphas.split(",")]
    rows = []
    print(
        "| run | step | decomposition | live | dead | "
        + " | ".join(f"α {a:g}" for a in alphas)
        + " |"
    )
    print("|---|---|---|---|---|" + "---|" * len(alphas))
    for run_dir in args.runs:
        if args.checkpoint:
            decomp, step = load_checkpoint(run_dir)
        else:
            decomp = spdkit.load(run_dir)
            step = decomp.config.training.steps
        quality = decomposition_quality(run_summary(run_dir, decomp, args.checkpoint, step))
        cells, per_alpha = [], {}
        for alpha in alphas:
            params = replace(ClusterParams(), alpha=alpha, samples=args.samples)
            found = cluster(decomp, params, progress=False)
            gt = found.info["ground_truth"]
            per_alpha[alpha] = {**gt, "n_live": found.info["n_live"], "n_dead": len(found.dead)}
            cells.append(
                f"{gt['ari']:.3f} ({gt['n_mechanisms_found']}/{gt['n_mechanisms_expected']})"
            )
        info = per_alpha[alphas[0]]
        head = f"| {run_dir.name} | {step} | {quality} | {info['n_live']} | {info['n_dead']} | "
        print(head + " | ".join(cells) + " |")
        rows.append(
            {"run": str(run_dir), "step": step, "decomposition": quality, "alphas": per_alpha}
        )
    out = args.out or Path(
        f"benchmarks/results/{datetime.date.today().isoformat()}_cluster_ground_truth.json"
    )
    out.write_text(json.dumps({"samples": args.samples, "runs": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
