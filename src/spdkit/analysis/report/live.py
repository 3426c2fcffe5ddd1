"""The live answers of `spdkit serve`: CI of a typed input, and the output with mechanisms or
subcomponents switched off. Pure functions of a decomposition and an input."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from spdkit.analysis.attribution import AttributionParams, prompt_graph
from spdkit.analysis.decomposed import Decomposed
from spdkit.analysis.mechanisms.clusters import Cluster
from spdkit.analysis.report.content import page_of
from spdkit.method.measures import causal_importance
from spdkit.targets import reports_lm, target_kind

TOP_K = 10


def input_kind(decomp: Decomposed) -> str:
    """ "text" (an LM with an encoder), "vector" (a toy with input features) or "none"."""
    target = decomp.config.target
    if target is None:
        return "none"
    kind = target_kind(target)
    if reports_lm(target) and kind.encoder is not None and kind.encoder(target) is not None:
        return "text"
    return "vector" if hasattr(target, "n_features") else "none"


CHARS_PER_TOKEN = 16  # a prompt may be this many characters per context token, at most


def max_input_chars(decomp: Decomposed) -> int:
    """The longest input text accepted: CHARS_PER_TOKEN × the target's context length (a
    prompt is cut to its last `seq_len` tokens anyway; this bounds the tokenizer's work), or
    32 characters per feature of a toy's input vector; 16384 without either."""
    target = decomp.config.target
    if input_kind(decomp) == "vector":
        return 32 * target.n_features + 64
    return CHARS_PER_TOKEN * int(getattr(target, "seq_len", None) or 1024)


def parse_input(decomp: Decomposed, text: str) -> Tensor:
    """A prompt (LM targets: token ids [1, T], cut to the context length) or a feature vector
    (toy targets: "0.5, 0, 1, ..." → [1, n_features]); ValueError naming what is wrong."""
    target = decomp.config.target
    device = next(decomp.model.parameters()).device
    kind = input_kind(decomp)
    limit = max_input_chars(decomp)
    if len(text) > limit:
        raise ValueError(f"the input has {len(text)} characters; at most {limit} are read here")
    if kind == "text":
        ids = target_kind(target).encoder(target)(text)
        if not ids:
            raise ValueError("type a prompt first")
        seq_len = getattr(target, "seq_len", None)
        ids = ids[-seq_len:] if seq_len else ids
        return torch.tensor([ids], device=device)
    if kind == "vector":
        try:
            values = [float(v) for v in text.replace(",", " ").split()]
        except ValueError:
            raise ValueError(f"expected {target.n_features} numbers, got {text!r}") from None
        if not all(math.isfinite(v) for v in values):
            raise ValueError("the input's numbers must be finite")
        if len(values) != target.n_features:
            raise ValueError(f"expected {target.n_features} numbers, got {len(values)}")
        return torch.tensor([values], device=device)
    raise ValueError("live inputs need a language model with a tokenizer or a toy target")


def tokens_of(decomp: Decomposed, x: Tensor) -> list[str] | None:
    target = decomp.config.target
    decoder = target_kind(target).decoder if target is not None else None
    decode = decoder(target) if decoder is not None else None
    if decode is None or input_kind(decomp) != "text":
        return None
    return [visible(decode([int(t)])) for t in x[0].tolist()]


def visible(token: str) -> str:
    """A token as a label: spaces shown as ␣ (an axis label or table cell would hide them)."""
    return token.replace(" ", "␣") if token.strip() == "" or token != token.strip() else token


@torch.no_grad()
def ci_table(decomp: Decomposed, x: Tensor, threshold: float) -> dict[str, Any]:
    """Per module, the subcomponents with CI > τ somewhere on x and their CI per position:
    {"tokens": [...] | None, "modules": {m: {"indices": [c...], "ci": [[per c] per position]}}}."""
    ci = causal_importance(decomp.model, x)
    modules = {}
    for name, g in ci.items():
        g = g[0].float().cpu()  # [T, C] or [C]
        g = g if g.dim() == 2 else g[None]
        active = (g > threshold).any(0).nonzero().flatten()
        modules[name] = {
            "indices": active.tolist(),
            "ci": [[round(v, 4) for v in row] for row in g[:, active].tolist()],
        }
    return {"tokens": tokens_of(decomp, x), "modules": modules}


def ablation_masks(
    decomp: Decomposed, clusters: list[Cluster], off_clusters: list[int], off: list[str]
) -> dict[str, Tensor]:
    """Masks of ones with the members of `off_clusters` and the subcomponents `off`
    ("<module>:<index>") set to zero."""
    masks = decomp.model.ones_masks()
    by_id = {c.id: c for c in clusters}
    names = [m for k in off_clusters for m in by_id[k].members] if clusters else []
    for name in [*names, *off]:
        module, _, index = name.rpartition(":")
        if module not in masks or not index.isdigit() or int(index) >= masks[module].numel():
            raise ValueError(f"no subcomponent {name!r} (write <module>:<index>)")
        masks[module][int(index)] = 0.0
    return masks


@torch.no_grad()
def ablation(decomp: Decomposed, x: Tensor, masks: dict[str, Tensor]) -> dict[str, Any]:
    """The target's output against the decomposition with all subcomponents on and with `masks`:
    LMs, next-token top-k at the last position and KL(target ‖ ·) there and averaged over
    positions; toys, the output vectors and the MSE to the target's."""
    model = decomp.model
    target = model.masked_forward(x, {})
    all_on = model(x, model.ones_masks())
    ablated = model(x, masks)
    if input_kind(decomp) == "text":
        decode = target_kind(decomp.config.target).decoder(decomp.config.target)

        def kl(a: Tensor, b: Tensor) -> Tensor:  # KL(a ‖ b) per position, [T]
            return (F.softmax(a, -1) * (F.log_softmax(a, -1) - F.log_softmax(b, -1))).sum(-1)

        def top(logits: Tensor) -> list[dict[str, Any]]:
            p = F.softmax(logits[0, -1].float(), -1)
            v, i = p.topk(min(TOP_K, p.numel()))
            return [
                {"token": decode([int(t)]), "p": round(float(q), 4)}
                for q, t in zip(v, i, strict=True)
            ]

        return {
            "kind": "text",
            "top": {"target": top(target), "all_on": top(all_on), "ablated": top(ablated)},
            "kl_last": {
                "all_on": float(kl(target, all_on)[0, -1]),
                "ablated": float(kl(target, ablated)[0, -1]),
            },
            "kl_mean": {
                "all_on": float(kl(target, all_on).mean()),
                "ablated": float(kl(target, ablated).mean()),
            },
        }
    return {
        "kind": "vector",
        "outputs": {
            "target": [round(v, 4) for v in target[0].float().tolist()],
            "all_on": [round(v, 4) for v in all_on[0].float().tolist()],
            "ablated": [round(v, 4) for v in ablated[0].float().tolist()],
        },
        "mse": {
            "all_on": float(F.mse_loss(all_on, target)),
            "ablated": float(F.mse_loss(ablated, target)),
        },
    }


GRAPH_PARAMS = {"per_target": 4, "max_edges": 150}  # a graph a browser draws at once


def attribution_graph(decomp: Decomposed, ids: Tensor, threshold: float, pages: set[str]) -> dict:
    """The attribution graph of a typed prompt (`analysis.attribution.prompt_graph`, its 150
    strongest edges), each node with its subcomponent page where the report has one."""
    params = AttributionParams(ci_threshold=threshold, **GRAPH_PARAMS)
    target = decomp.config.target
    decoder = target_kind(target).decoder if target is not None else None
    graph = prompt_graph(decomp.model, ids, params, decode=decoder(target) if decoder else None)
    for node in graph["nodes"]:
        page = page_of(f"{node['module']}:{node['index']}")
        node["page"] = page if page in pages else None
    return graph


def search_harvest(
    harvested: dict[str, dict[str, Any]], query: str, pages: set[str], limit: int = 50
) -> dict[str, Any]:
    """Which subcomponents fire on `query`, and where, from the harvest: per subcomponent, the
    kept contexts whose text contains it, and how many of those fire *on* it (the firing token
    is the query); subcomponents with most firings on it first, then most contexts."""
    query = query.strip()
    if not query:
        raise ValueError("type a string or token to search for")
    found = []
    for name, entry in harvested.items():
        hits = [
            ctx
            for ctx in entry["top"] + entry["random"]
            if query in "".join(ctx["tokens"]) or query in " ".join(ctx["tokens"])
        ]
        if not hits:
            continue
        on_it = sum(ctx["tokens"][ctx["at"]].strip() == query for ctx in hits)
        page = page_of(name)
        found.append(
            {
                "name": name,
                "page": page if page in pages else None,
                "fires_on_query": on_it,
                "n_contexts": len(hits),
                "density": entry["density"],
                "contexts": hits[:3],
            }
        )
    found.sort(key=lambda r: (-r["fires_on_query"], -r["n_contexts"], r["name"]))
    return {"query": query, "n_subcomponents": len(found), "results": found[:limit]}
