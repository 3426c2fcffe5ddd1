"""Does a decomposition of `planted_lm` find its planted mechanisms? One command, one table.

    python benchmarks/planted_mechanisms.py RUN_DIR [--samples 20000] [--out FILE.json]

1. `spdkit cluster` (if RUN_DIR has no clusters.json);
2. the mechanism score per task (`Decomposition.mechanism_score`: the fewest clusters whose
   CI-gated ablation costs ≥ 80 % of the task's everything-ablated CE increase, and the share
   they cost the other tasks), under both removals;
   and, for planted_lm, the selective set per task (clusters that hurt the task more than any
   other, kept while every other task loses ≤ 10 %, measured to min(everything, chance));
3. for each task whose mechanism was found, `spdkit edit` of its clusters into a temporary
   folder, reloaded: each task's CE as a fraction of its everything-removed increase;
4. a markdown table of it all (stdout, and FILE.md next to --out).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import spdkit
from spdkit.analysis.mechanisms.clusters import ClusterParams
from spdkit.pipeline.edit import edit_target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--n", type=int, default=256, help="sequences per task")
    parser.add_argument("--max-clusters", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    decomp = spdkit.load(args.run_dir)
    if not (args.run_dir / "clusters.json").exists():
        decomp.cluster(ClusterParams(samples=args.samples), progress=False)
    n_clusters = len(decomp.clusters())
    score = decomp.mechanism_score(max_clusters=args.max_clusters, n=args.n, progress=False)
    edits = {}
    for task, row in score.items():
        if not row["found"]:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            items = [f"cluster:{k}" for k in row["clusters"]]
            edits[task] = edit_target(decomp, items, Path(tmp) / "edited", n=args.n)["groups"]
    lines = [
        f"run: {args.run_dir} ({n_clusters} clusters)",
        "",
        "| task | found | clusters | subcomponents | own damage (CI-gated) | selectivity "
        "| own damage (static) | edit: own / largest other | CE target → everything |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task, row in score.items():
        edit = edits.get(task)
        edit_cell = "–"
        if edit:
            others = max((v["fraction"] for k, v in edit.items() if k != task), default=0.0)
            edit_cell = f"{edit[task]['fraction']:.2f} / {others:.2f}"
        lines.append(
            f"| {task} | {'yes' if row['found'] else 'no'} | {row['clusters']} | "
            f"{row['n_subcomponents']} | {row['fraction']:.2f} | {row['selectivity']:.3f} | "
            f"{row['static_fraction']:.2f} | {edit_cell} | "
            f"{row['baseline_ce']:.4f} → {row['everything_ce']:.4f} |"
        )
    selective = {t: r["selective"] for t, r in score.items() if "selective" in r}
    if selective:
        lines += [
            "",
            "Selective sets (every other task loses ≤ 10 %; fractions of the way from the "
            "baseline to min(everything ablated, chance)):",
            "",
            "| task | found | clusters | subcomponents | own | selectivity | candidates "
            "| CE baseline → reference (chance) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for task, sel in selective.items():
            row = score[task]
            reference = min(row["everything_ce"], row["chance_ce"])
            lines.append(
                f"| {task} | {'yes' if sel['found'] else 'no'} | {len(sel['clusters'])} | "
                f"{sel['n_subcomponents']} | {sel['fraction']:.2f} | {sel['selectivity']:.3f} | "
                f"{sel['n_candidates']} | {row['baseline_ce']:.4f} → {reference:.4f} "
                f"({row['chance_ce']:.4f}) |"
            )
    table = "\n".join(lines)
    print(table)
    if args.out:
        result = {
            "run": str(args.run_dir),
            "n_clusters": n_clusters,
            "score": score,
            "edits": edits,
        }
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
