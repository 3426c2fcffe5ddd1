"""Does a decomposition of `planted_lm` find its planted mechanisms? One command, one table.

    python benchmarks/planted_mechanisms.py RUN_DIR [--samples 20000] [--masks ci|rounded]
        [--out FILE.json]

1. `spdkit cluster` (if RUN_DIR has no clusters.json);
2. the mechanism score per task (`Decomposition.mechanism_score`: the fewest clusters whose
   CI-gated ablation costs ≥ 80 % of the task's everything-ablated CE increase, and the share
   they cost the other tasks), under both removals;
   and, for planted_lm, the selective set per task (clusters that hurt the task more than any
   other, kept while every other task loses ≤ 10 %, measured to min(everything, chance));
3. for each task whose mechanism was found, `spdkit edit` of its clusters into a temporary
   folder, reloaded: each task's CE as a fraction of its everything-removed increase; and
   the same for every task's selective set, as fractions of the way to min(everything
   removed, chance) (the edit passes when its own task reaches 0.8 and no other passes 0.1);
4. a markdown table of it all (stdout, and FILE.md next to --out).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import spdkit
from spdkit.analysis.ablation import reference_ce
from spdkit.analysis.mechanisms.clusters import ClusterParams
from spdkit.pipeline.edit import edit_target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--n", type=int, default=256, help="sequences per task")
    parser.add_argument("--max-clusters", type=int, default=8)
    parser.add_argument("--masks", default="ci", help="CI-gated baseline: ci (m = g) or rounded")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    decomp = spdkit.load(args.run_dir)
    if not (args.run_dir / "clusters.json").exists():
        decomp.cluster(ClusterParams(samples=args.samples), progress=False)
    n_clusters = len(decomp.clusters())
    score = decomp.mechanism_score(
        max_clusters=args.max_clusters, n=args.n, progress=False, masks=args.masks
    )

    def edit(clusters: list[int]) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            items = [f"cluster:{k}" for k in clusters]
            return edit_target(decomp, items, Path(tmp) / "edited", n=args.n)["groups"]

    edits = {task: edit(row["clusters"]) for task, row in score.items() if row["found"]}
    selective_edits = {
        task: edit(row["selective"]["clusters"])
        for task, row in score.items()
        if row.get("selective", {}).get("clusters")
    }
    lines = [
        f"run: {args.run_dir} ({n_clusters} clusters; CI-gated removals from masks "
        f"{'m = g' if args.masks == 'ci' else 'm = 1[g > τ]'})",
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
            reference = reference_ce(row["baseline_ce"], row["everything_ce"], row["chance_ce"])
            lines.append(
                f"| {task} | {'yes' if sel['found'] else 'no'} | {len(sel['clusters'])} | "
                f"{sel['n_subcomponents']} | {sel['fraction']:.2f} | {sel['selectivity']:.3f} | "
                f"{sel['n_candidates']} | {row['baseline_ce']:.4f} → {reference:.4f} "
                f"({row['chance_ce']:.4f}) |"
            )
    if selective_edits:
        lines += [
            "",
            "The selective sets as weight edits (`spdkit edit`, reloaded; fractions of the way "
            "from the target to min(everything removed, chance)):",
            "",
            "| task | clusters | own | largest other | passes (own ≥ 0.8, others ≤ 0.1) "
            "| CE target → edited | reload max abs diff |",
            "|---|---|---|---|---|---|---|",
        ]
        for task, groups in selective_edits.items():
            own = groups[task]["fraction_to_reference"]
            other = max(v["fraction_to_reference"] for k, v in groups.items() if k != task)
            diff = max(v["reload_max_abs_diff"] for v in groups.values())
            lines.append(
                f"| {task} | {len(score[task]['selective']['clusters'])} | {own:.2f} | "
                f"{other:.3f} | {'yes' if own >= 0.8 and other <= 0.1 else 'no'} | "
                f"{groups[task]['target']:.4f} → {groups[task]['edited']:.4f} | {diff:.1e} |"
            )
    table = "\n".join(lines)
    print(table)
    if args.out:
        result = {
            "run": str(args.run_dir),
            "n_clusters": n_clusters,
            "score": score,
            "masks": args.masks,
            "edits": edits,
            "selective_edits": selective_edits,
        }
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
