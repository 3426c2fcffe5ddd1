"""Does the attribution graph of a repeated prompt show the induction circuit?

    python benchmarks/induction_circuit.py RUN_DIR [--prompts 8] [--nodes PATTERN ...]
                                           [--out FILE.json]

For an `induction` run or a `planted_lm` run (its induction task), on each prompt's scored
repeat: the query positions t (whose next token induction predicts) and the key positions
j = t + 1 − m (the token after the earlier occurrence of ids[t], m the repeat's offset):

- into layer-1 query nodes at the queries and key nodes at the keys: the share of incoming
  edge mass (Σ|e|) from layer-0 output / value subcomponents, and the median rank of the first
  such edge; for the keys also the share from what the previous-token head wrote (layer-0 o
  at j, layer-0 v at j − 1);
- into layer-0 output nodes at the keys: the share from layer-0 value nodes at j − 1 (the
  previous-token head's move), and the fraction of those nodes whose strongest incoming edge
  is one of them (in an attention-only model the q / k shares are 1 by construction: layer-0
  o at the same position is the only decomposed writer upstream of layer 1); with several
  layer-0 heads, the same share with each o node weighted by how much of its piece reads
  the previous-token head (‖V_c‖² on its input dimensions; the head `target.json`
  `info.heads` names), and per run the largest such weight (`o0_largest_head_alignment`);
  the reference is `o0_share_if_uniform`, the share if each key read every earlier v evenly;
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
from spdkit.targets.planted_heads import induction_keys
from spdkit.targets.transformer import RepeatedTokens


def repeated_prompts(
    decomp: spdkit.Decomposition, n: int, seed: int
) -> tuple[torch.Tensor, list[set[int]], list[set[int]]]:
    """n prompts [n, T] and, per prompt, the query positions (whose next token induction
    predicts) and the key positions (the token after the earlier occurrence of each query's
    token: where the induction head should look), from the task's scored tokens."""
    target = decomp.config.target
    gen = torch.Generator().manual_seed(seed)
    if target.kind == "planted_lm":
        ids, scored = planted.PlantedTasks(target).task_batch("induction", n, gen)
    elif target.kind == "induction":
        data = RepeatedTokens(target.vocab_size, target.seq_len, target.repeat)
        ids, scored = data.scored_batch(n, gen)
    else:
        raise SystemExit(f"{target.kind}: needs an induction or planted_lm run")
    rows, s, keys = induction_keys(scored)
    queries = [set((s[rows == b] - 1).tolist()) for b in range(n)]
    return ids, queries, [set(keys[rows == b].tolist()) for b in range(n)]


def head_alignment(decomp: spdkit.Decomposition) -> dict[int, float]:
    """Per layer-0 output piece c: the share of ‖V_c‖² on the previous-token head's input
    dimensions (o reads the heads' outputs side by side, head h at [h·d_head, (h + 1)·d_head)).
    With several heads in layer 0, only the pieces that read that head are where the
    previous-token move should show; the head is the one `target.json` `info.heads` scores
    highest on the previous token (a one-head model: head 0)."""
    target = decomp.config.target
    n_heads = getattr(target, "n_heads", 1)
    head = 0
    info = json.loads((decomp.run_dir / "target.json").read_text()).get("info", {})
    scores = info.get("heads", {}).get("attention", {}).get("previous_token", {})
    if scores:
        head = int(max(scores, key=scores.get).split(".")[1])
    _, V = decomp.subcomponents("blocks.0.attn.o")  # [C, d_model]
    per_head = V.pow(2).view(V.shape[0], n_heads, -1).sum(-1)  # [C, H]
    return dict(enumerate((per_head[:, head] / per_head.sum(-1).clamp_min(1e-30)).tolist()))


def layer_of(node: str) -> tuple[int, str] | None:
    """(layer, projection) of a 'blocks.<l>.attn.<p>:<t>:<c>' node; None for other modules."""
    module = node.rsplit(":", 2)[0]
    parts = module.split(".")
    if len(parts) == 4 and parts[0] == "blocks" and parts[2] == "attn":
        return int(parts[1]), parts[3]
    return None


def shares(
    graph: dict, queries: set[int], keys: set[int], o0_alignment: dict[int, float]
) -> dict[str, Any]:
    """Shares of incoming edge mass (Σ|e|) for the nodes of the circuit: layer-1 q at the
    query positions and layer-1 k at the key positions (from layer-0 o / v: K- and
    Q-composition), layer-0 o at the key positions (from layer-0 v one position back: the
    previous-token move; over all such nodes, and with each node's edges weighted by the
    share of its piece that reads the previous-token head, `o0_alignment`), and the predicted
    logits (from layer-1 o / v: the copy)."""
    mass = {
        k: 0.0
        for k in ("q1", "q1_l0", "k1", "k1_l0", "k1_prev", "o0", "o0_prev", "o0h", "o0h_prev")
    }
    into_logit = {"total": 0.0, "from_l1_ov": 0.0}
    logit_by_module: dict[str, float] = {}
    ranks: dict[str, list[int | None]] = {"q": [], "k": []}
    o0_top: list[bool] = []  # per layer-0 o node at a key: is its strongest source v0 at j − 1?
    by_target: dict[str, list[dict]] = {}
    for e in graph["edges"]:
        by_target.setdefault(e["target"], []).append(e)
    for target, edges in by_target.items():
        edges.sort(key=lambda e: -abs(e["value"]))
        if target.startswith("logit:"):
            if int(target.split(":")[1]) not in queries:
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
        if where is None:
            continue
        if where in ((1, "q"), (1, "k")) and t in (queries if where[1] == "q" else keys):
            name, hit = f"{where[1]}1", None
            for rank, e in enumerate(edges):
                mass[name] += abs(e["value"])
                src, s = layer_of(e["source"]), int(e["source"].rsplit(":", 2)[1])
                if src and src[0] == 0 and src[1] in ("o", "v"):
                    mass[f"{name}_l0"] += abs(e["value"])
                    hit = rank if hit is None else hit
                if name == "k1" and (src, s) in (((0, "o"), t), ((0, "v"), t - 1)):
                    mass["k1_prev"] += abs(e["value"])
            ranks[where[1]].append(hit)
        if where == (0, "o") and t in keys:
            top = edges[0]["source"]  # edges are sorted by |e|, largest first
            led = layer_of(top) == (0, "v") and int(top.rsplit(":", 2)[1]) == t - 1
            o0_top.append(led)
            weight = o0_alignment.get(int(target.rsplit(":", 1)[1]), 0.0)
            for e in edges:
                s = int(e["source"].rsplit(":", 2)[1])
                prev = layer_of(e["source"]) == (0, "v") and s == t - 1
                mass["o0"] += abs(e["value"])
                mass["o0h"] += weight * abs(e["value"])
                if prev:
                    mass["o0_prev"] += abs(e["value"])
                    mass["o0h_prev"] += weight * abs(e["value"])

    def median(xs: list[int | None]) -> int | None:
        found = sorted(x for x in xs if x is not None)
        return found[len(found) // 2] if found else None

    def share(part: str, whole: str) -> float:
        return mass[part] / max(mass[whole], 1e-30)

    return {
        "q1_share_from_l0_ov": share("q1_l0", "q1"),
        "k1_share_from_l0_ov": share("k1_l0", "k1"),
        # layer-0 o at the key itself or layer-0 v one back: what the previous-token head wrote
        "k1_share_from_l0_previous_token": share("k1_prev", "k1"),
        "q1_first_l0_ov_rank_median": median(ranks["q"]),
        "k1_first_l0_ov_rank_median": median(ranks["k"]),
        "qk1_nodes": len(ranks["q"]) + len(ranks["k"]),
        "o0_share_from_v0_previous_position": share("o0_prev", "o0"),
        "o0_nodes_led_by_v0_previous_position": sum(o0_top) / max(len(o0_top), 1),
        "o0_head_weighted_share_from_v0_previous_position": share("o0h_prev", "o0h"),
        "o0_nodes": len(o0_top),
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
    ids, queries, keys = repeated_prompts(decomp, args.prompts, args.seed)
    params = AttributionParams(
        ci_threshold=decomp.config.eval.ci_threshold,
        per_target=10**6,
        max_edges=10**9,
        nodes=tuple(args.nodes),
    )
    alignment = head_alignment(decomp)
    rows = [
        shares(prompt_graph(decomp.model, p[None], params), q, k, alignment)
        for p, q, k in zip(ids, queries, keys, strict=True)
    ]
    floats = [
        k for k in rows[0] if all(isinstance(r[k], (int, float)) for r in rows)
    ]  # numbers on every prompt (a median rank is None where no edge qualifies)
    mean: dict[str, Any] = {k: sum(r[k] for r in rows) / len(rows) for k in floats}
    modules = sorted({m for r in rows for m in r["logit_share_by_module"]})
    mean["logit_share_by_module"] = {
        m: sum(r["logit_share_by_module"].get(m, 0.0) for r in rows) / len(rows) for m in modules
    }
    mean["o0_largest_head_alignment"] = max(alignment.values())
    # what the previous-token share would be if a key j read layer-0 v evenly over 0..j
    mean["o0_share_if_uniform"] = sum(1 / (j + 1) for ks in keys for j in ks) / sum(
        len(ks) for ks in keys
    )
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
