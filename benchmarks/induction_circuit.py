"""Does the attribution graph of a repeated prompt show the induction circuit?

    python benchmarks/induction_circuit.py RUN_DIR [--prompts 8] [--nodes PATTERN ...]
                                           [--out FILE.json]

For an `induction` run (the prompt: random tokens, then the same tokens again) or a
`planted_lm` run (its induction task), on the second half of each prompt (positions that
induction predicts):

- into layer-1 query / key nodes: the share of incoming edge mass (Σ|e|) from layer-0 output
  (and value) subcomponents, and the rank of the first such edge;
- into layer-0 output nodes at second-half positions: the share from layer-0 value nodes at
  the previous position (the previous-token head's move);
- into the predicted token's logit: the share from layer-1 output / value subcomponents.

Edges are the one-hop graph of `spdkit.analysis.attribution` with every edge kept
(`per_target` large), so the shares are of all the mass, not of the kept edges. `--nodes
'blocks.*.attn.*'` makes the MLPs transparent: edges between attention pieces (and into the
logits) then run through the MLPs, as the induction circuit's do in a model with MLPs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

import spdkit
from spdkit.analysis.attribution import AttributionParams, prompt_graph
from spdkit.targets import planted
from spdkit.targets.transformer import RepeatedTokens


def repeated_prompts(
    decomp: spdkit.Decomposition, n: int, seed: int
) -> tuple[torch.Tensor, list[set[int]]]:
    """n prompts [n, T] and, per prompt, the positions whose next token induction predicts
    (`planted_lm`: the task's scored tokens, one position earlier, whatever the repeat's
    offset; `induction`: the second half)."""
    target = decomp.config.target
    gen = torch.Generator().manual_seed(seed)
    if target.kind == "planted_lm":
        ids, scored = planted.PlantedTasks(target).task_batch("induction", n, gen)
        return ids, [{t - 1 for t in row.nonzero().flatten().tolist()} for row in scored]
    if target.kind == "induction":
        ids = RepeatedTokens(target.vocab_size, target.seq_len).sample(n, gen)
        half = target.seq_len // 2
        return ids, [set(range(half, target.seq_len)) for _ in range(n)]
    raise SystemExit(f"{target.kind}: needs an induction or planted_lm run")


def layer_of(node: str) -> tuple[int, str] | None:
    """(layer, projection) of a 'blocks.<l>.attn.<p>:<t>:<c>' node; None for other modules."""
    module = node.rsplit(":", 2)[0]
    parts = module.split(".")
    if len(parts) == 4 and parts[0] == "blocks" and parts[2] == "attn":
        return int(parts[1]), parts[3]
    return None


def shares(graph: dict, positions: set[int]) -> dict[str, Any]:
    into_qk = {"total": 0.0, "from_l0_ov": 0.0}
    into_o0 = {"total": 0.0, "from_v0_prev": 0.0}
    into_logit = {"total": 0.0, "from_l1_ov": 0.0}
    logit_by_module: dict[str, float] = {}
    ranks = []
    by_target: dict[str, list[dict]] = {}
    for e in graph["edges"]:
        by_target.setdefault(e["target"], []).append(e)
    for target, edges in by_target.items():
        edges.sort(key=lambda e: -abs(e["value"]))
        if target.startswith("logit:"):
            if int(target.split(":")[1]) not in positions:
                continue
            for e in edges:
                into_logit["total"] += abs(e["value"])
                module = e["source"].rsplit(":", 2)[0]
                logit_by_module[module] = logit_by_module.get(module, 0.0) + abs(e["value"])
                where = layer_of(e["source"])
                if where and where[0] == 1 and where[1] in ("o", "v"):
                    into_logit["from_l1_ov"] += abs(e["value"])
            continue
        where, t = layer_of(target), int(target.rsplit(":", 2)[1])
        if where is None or t not in positions:
            continue
        if where[0] == 1 and where[1] in ("q", "k"):
            hit = None
            for rank, e in enumerate(edges):
                into_qk["total"] += abs(e["value"])
                src = layer_of(e["source"])
                if src and src[0] == 0 and src[1] in ("o", "v"):
                    into_qk["from_l0_ov"] += abs(e["value"])
                    hit = rank if hit is None else hit
            ranks.append(hit)
        if where == (0, "o"):
            for e in edges:
                into_o0["total"] += abs(e["value"])
                s = int(e["source"].rsplit(":", 2)[1])
                if layer_of(e["source"]) == (0, "v") and s == t - 1:
                    into_o0["from_v0_prev"] += abs(e["value"])
    found = [r for r in ranks if r is not None]
    return {
        "qk1_share_from_l0_ov": into_qk["from_l0_ov"] / max(into_qk["total"], 1e-30),
        "qk1_first_l0_ov_rank_median": sorted(found)[len(found) // 2] if found else None,
        "qk1_nodes": len(ranks),
        "o0_share_from_v0_previous_position": into_o0["from_v0_prev"]
        / max(into_o0["total"], 1e-30),
        "logit_share_from_l1_ov": into_logit["from_l1_ov"] / max(into_logit["total"], 1e-30),
        "logit_share_by_module": {
            k: v / max(into_logit["total"], 1e-30) for k, v in sorted(logit_by_module.items())
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nodes", nargs="*", default=[], help="node modules (fnmatch)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    decomp = spdkit.load(args.run_dir)
    ids, positions = repeated_prompts(decomp, args.prompts, args.seed)
    params = AttributionParams(
        ci_threshold=decomp.config.eval.ci_threshold,
        per_target=10**6,
        max_edges=10**9,
        nodes=tuple(args.nodes),
    )
    rows = [
        shares(prompt_graph(decomp.model, p[None], params), pos)
        for p, pos in zip(ids, positions, strict=True)
    ]
    keys = [k for k in rows[0] if isinstance(rows[0][k], float)]
    mean: dict[str, Any] = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    modules = sorted({m for r in rows for m in r["logit_share_by_module"]})
    mean["logit_share_by_module"] = {
        m: sum(r["logit_share_by_module"].get(m, 0.0) for r in rows) / len(rows) for m in modules
    }
    result = {
        "run": str(args.run_dir),
        "prompts": args.prompts,
        "nodes": args.nodes,
        "mean": mean,
        "per_prompt": rows,
    }
    print(json.dumps(mean, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
