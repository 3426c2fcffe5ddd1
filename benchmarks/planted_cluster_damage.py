"""Where do a `planted_lm` decomposition's task mechanisms live? Per cluster and per task.

    python benchmarks/planted_cluster_damage.py RUN_DIR [--n 256] [--out FILE.json]

RUN_DIR: a `planted_lm` run with clusters.json (`spdkit cluster`). For every cluster:
1. its CI-gated ablation's cost on each task, as a fraction of that task's everything-ablated
   CE increase (the mechanism score's unit);
2. where it fires: the share of its firing (any member's CI > eval.ci_threshold, per token)
   that falls on each task's sequences.
Then per task: the union of its *selective* clusters (single damage on the task > 2× their
largest damage on another) ablated together, and its CE next to the task's chance level.
With `--pieces-of 0,1`: the same single-ablation damage for every member of those clusters,
piece by piece (does a shared cluster merge task-specific pieces, or are its pieces shared?).
The analysis behind docs/mechanisms_lm.md "Second measurement".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import spdkit
from spdkit.analysis import ablation, mechanism_score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--n", type=int, default=256, help="sequences per task")
    parser.add_argument("--pieces-of", default="", help="cluster ids: damage per member too")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    decomp = spdkit.load(args.run_dir)
    model, clusters = decomp.model, decomp.clusters()
    groups = ablation.position_groups(decomp, args.n, 0)
    chunk = decomp.config.eval.batch_size
    every = ablation.everything(model)
    base, full = ablation.scored_ces(model, groups, [("gated", {}), ("gated", every)], chunk)
    removals: list[ablation.Removal] = [("gated", c.indices()) for c in clusters]
    ces = ablation.scored_ces(model, groups, removals, chunk)
    damage = {
        c.id: {g: ablation.fraction(ce[g], base[g], full[g]) for g in groups}
        for c, ce in zip(clusters, ces, strict=True)
    }
    threshold = decomp.config.eval.ci_threshold
    fires: dict[int, dict[str, float]] = {c.id: {} for c in clusters}
    with torch.no_grad():
        for task, (ids, _) in groups.items():
            g, _ = model.importances(ids, model.record(ids))
            for c in clusters:
                on = torch.zeros(ids.shape, dtype=torch.bool)
                for module, idx in c.indices().items():
                    on |= (g[module][..., idx] > threshold).any(-1).cpu()
                fires[c.id][task] = float(on.float().mean())
    share = {
        k: {t: v / max(sum(f.values()), 1e-30) for t, v in f.items()} for k, f in fires.items()
    }
    by_id = {c.id: c for c in clusters}
    selective = {}
    for task in groups:
        others = [g for g in groups if g != task]
        ids = [
            k
            for k, d in damage.items()
            if d[task] > 0.0005 and d[task] > 2 * max(d[o] for o in others)
        ]
        off = mechanism_score.union(by_id, ids)
        (ce,) = ablation.scored_ces(model, groups, [("gated", off)], chunk)
        selective[task] = {
            "clusters": ids,
            "n_subcomponents": sum(len(v) for v in off.values()),
            "ce": ce,
            "fractions": {g: ablation.fraction(ce[g], base[g], full[g]) for g in groups},
        }
    pieces = {}
    for k in [int(v) for v in args.pieces_of.split(",") if v]:
        members = [(m, i) for m, idx in by_id[k].indices().items() for i in idx]
        ces = ablation.scored_ces(model, groups, [("gated", {m: [i]}) for m, i in members], chunk)
        pieces[k] = {
            f"{m}:{i}": {g: ablation.fraction(ce[g], base[g], full[g]) for g in groups}
            for (m, i), ce in zip(members, ces, strict=True)
        }
    top = sorted(damage, key=lambda k: -max(damage[k].values()))[:5]
    lines = [f"run: {args.run_dir} ({len(clusters)} clusters)", ""]
    lines += [f"CE target: {base}", f"CE everything off: {full}", "", "largest single damages:"]
    for k in top:
        size = sum(len(v) for v in by_id[k].indices().values())
        lines.append(
            f"  cluster {k} ({size} pieces): "
            + ", ".join(f"{t} {v:.3f}" for t, v in damage[k].items())
        )
    high = [k for k, s in share.items() if max(s.values()) >= 0.8]
    lines += ["", f"clusters with ≥ 80 % of their firing on one task: {len(high)}", ""]
    for task, row in selective.items():
        lines.append(
            f"{task}: {len(row['clusters'])} selective clusters ({row['n_subcomponents']} pieces)"
            f" → CE {base[task]:.4f} → {row['ce'][task]:.4f}; fractions "
            + ", ".join(f"{t} {v:.3f}" for t, v in row["fractions"].items())
        )
    for k, rows in pieces.items():
        most = sorted(rows, key=lambda p: -max(rows[p].values()))[:12]
        lines += ["", f"cluster {k}, its pieces with the largest single damage:"]
        for p in most:
            lines.append(f"  {p}: " + ", ".join(f"{t} {v:.3f}" for t, v in rows[p].items()))
    print("\n".join(lines))
    if args.out:
        result = {
            "run": str(args.run_dir),
            "base_ce": base,
            "everything_ce": full,
            "damage": damage,
            "firing_share": share,
            "selective": selective,
            "pieces": pieces,
        }
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
