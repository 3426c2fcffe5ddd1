"""Attribution graphs: which subcomponents drive which, for one prompt and over a dataset.

A **node** is a subcomponent c of a decomposed module at a position t; its activation is the
coefficient its rank-one piece carries in the masked forward with the run's CI masks,

    h̃_c[t] = m_c[t] · (a[t] · V_c),      m = g (the CI of this input),

so a node the CI switches off has (almost) no activation. Output nodes are the logits of
chosen tokens at chosen positions.

An **edge** is gradient × activation, one hop:

    e(src → tgt) = h̃_src · ∂h̃_tgt / ∂h̃_src

where every decomposed module's h̃ enters the rest of the pass as a detached leaf, so the
gradient runs from a target back to the *nearest* decomposed modules only: through the
residual stream, LayerNorm, non-decomposed layers and attention, never through another
subcomponent. Attention makes the cross-position edges: a key or value subcomponent at
position s drives the output projection (and everything after it) at every t ≥ s, through
the softmax pattern (k) and the weighted sum (v); the gradient carries both and nothing is
split by hand. A module with a Δ-component adds a Δᵀ computed from its detached input: the
part of W no subcomponent holds is a constant of the graph, not a path around it.

**Node modules** (`nodes`, fnmatch patterns; default: all). A decomposed module left out is
*transparent*: it runs masked by the CI but its h̃ stays in the graph, so an edge between node
modules sums every path through it. Why: a one-hop graph credits the logits to the last MLP's
pieces alone; with the MLPs transparent, the attention pieces' effect through them shows.

Nodes are alive where g > `ci_threshold`; only alive nodes are sources or targets. Target
nodes are processed `batch_nodes` at a time (one batched backward each) and only each
target's `per_target` strongest incoming edges (by |e|) are kept, then the `max_edges`
strongest overall: memory is bounded by the batch, not by prompt length × modules².

**Over a dataset** (`dataset_attributions`): the same edges between subcomponents (not
positions), summed over every position of `n_tokens` held-out tokens and divided by their
number: a target's h̃ is summed over the batch and its alive positions before one backward
(sources count where they are alive, as in a prompt graph), so each
batch costs one backward per alive target subcomponent (batched), and the sums are dense
[C_src, C_tgt] per pair of modules (streamed batch by batch). The logit target there is the
logit of each position's actual next token.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from spdkit.method.forwards import ForwardFactory, forwards_replaced, model_output
from spdkit.method.model import ComponentModel
from spdkit.progress import progress_bar

FORMAT = 1


@dataclass(frozen=True)
class AttributionParams:
    """ci_threshold: a node is alive where g > this; per_target: incoming edges kept per
    target node; max_edges: edges kept in all; batch_nodes: target nodes per backward;
    nodes: fnmatch patterns of the decomposed modules whose subcomponents are nodes (empty:
    all; the others are transparent, module docstring)."""

    ci_threshold: float = 0.1
    per_target: int = 8
    max_edges: int = 1000
    batch_nodes: int = 64
    nodes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        checks = {
            "ci_threshold": 0 <= self.ci_threshold < 1,
            "per_target": self.per_target >= 1,
            "max_edges": self.max_edges >= 1,
            "batch_nodes": self.batch_nodes >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"attribution {name} = {getattr(self, name)} is out of range")


# --- the pass with leaves -------------------------------------------------------------------
@dataclass
class Leaves:
    """One module's h̃ in a leaf pass: `value` as computed from the module's input (a function
    of the upstream leaves: the edges' target), `leaf` the detached copy the rest of the
    pass reads (the edges' source)."""

    value: Tensor  # [B, T, C]
    leaf: Tensor  # [B, T, C], requires grad


def _leaf_forward(
    model: ComponentModel, name: str, mask: Tensor, store: dict, is_node: bool = True
) -> ForwardFactory:
    components = model.components(name)

    def factory(original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Tensor:
            if name in store:
                raise ValueError(
                    f"{name} runs twice in one forward: attribution graphs need each "
                    "decomposed module called once per pass"
                )
            a = args[0] if args else next(iter(kwargs.values()))
            value = components.inner(a) * mask
            if is_node:
                leaf = value.detach().requires_grad_(True)
                store[name] = Leaves(value, leaf)
            else:  # transparent: the gradient runs through it
                leaf = value
            out = components.outer(leaf)
            if model.delta:  # a Δᵀ from the detached input: a constant of the graph
                with torch.no_grad():  # (a W^T + b) − (a (U V)^T + b): the bias once
                    y = original(a.detach(), *args[1:], **kwargs)
                    delta = y - components.outer(components.inner(a.detach()))
                out = out + delta  # outside no_grad: the leaf's gradient path stays
            return out

        return forward

    return factory


def node_modules(model: ComponentModel, patterns: tuple[str, ...] = ()) -> list[str]:
    """The decomposed modules `patterns` match (all when empty); an unmatched one is an error."""
    if not patterns:
        return list(model.module_names)
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in model.module_names):
            raise ValueError(
                f"attribution nodes: {p!r} matches no decomposed module (they are: "
                f"{', '.join(model.module_names)})"
            )
    return [n for n in model.module_names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


@contextlib.contextmanager
def leaf_pass(
    model: ComponentModel, masks: Mapping[str, Tensor], nodes: list[str] | None = None
) -> Iterator[dict[str, Leaves]]:
    """While open, a forward of `model.target` runs every decomposed module masked by `masks`,
    with the h̃ of each of `nodes` (default: all) as a leaf (filled into the yielded dict,
    module → Leaves) and the others transparent."""
    store: dict[str, Leaves] = {}
    chosen = set(model.module_names if nodes is None else nodes)
    factories = {
        n: _leaf_forward(model, n, masks[n], store, n in chosen) for n in model.module_names
    }
    with forwards_replaced(model.target, factories), torch.enable_grad():
        yield store


def ci_masks(model: ComponentModel, ids: Tensor) -> dict[str, Tensor]:
    """The run's CI masks g [B, T, C] of the input (no gradient)."""
    with torch.no_grad():
        record = model.record(ids)
        g, _ = model.importances(ids, record)
    return g


def _batched_grads(
    output: Tensor, picks: list[tuple[int, ...]], inputs: list[Tensor]
) -> list[Tensor | None]:
    """∂output[pick] / ∂inputs for each pick (an index into output), in one batched
    backward: [len(picks), *input.shape] per input (None where unconnected)."""
    grad_out = output.new_zeros(len(picks), *output.shape)
    for i, pick in enumerate(picks):
        grad_out[(i, *pick)] = 1.0
    return list(
        torch.autograd.grad(
            output, inputs, grad_out, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
    )


# --- one prompt -----------------------------------------------------------------------------
def prompt_graph(
    model: ComponentModel,
    ids: Tensor,
    params: AttributionParams,
    logit_tokens: Mapping[int, int] | None = None,
    decode: Callable[[list[int]], str] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The attribution graph of one prompt ids [1, T] (the graph file's content: README
    "attribution graphs"). `logit_tokens` {position: token} picks the output nodes (default:
    each position's next token in the prompt, and the top prediction at the last)."""
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"one prompt at a time: ids [1, T], got {list(ids.shape)}")
    g = ci_masks(model, ids)
    with leaf_pass(model, g, node_modules(model, params.nodes)) as store:
        logits = model_output(model.target(ids), model.output_field)  # [1, T, vocab]
    names = [n for n in model.module_names if n in store]
    alive = {n: (g[n][0] > params.ci_threshold) for n in names}  # [T, C]
    if logit_tokens is None:
        T = ids.shape[1]
        logit_tokens = {t: int(ids[0, t + 1]) for t in range(T - 1)}
        logit_tokens[T - 1] = int(logits[0, T - 1].argmax())
    sources = [store[n].leaf for n in names]
    targets: list[tuple[str, Tensor, list[tuple[int, ...]], list[str]]] = []
    for n in names:
        picks = [(0, t, c) for t, c in alive[n].nonzero().tolist()]
        targets.append((n, store[n].value, picks, [node_id(n, t, c) for _, t, c in picks]))
    logit_picks = [(0, t, tok) for t, tok in sorted(logit_tokens.items())]
    targets.append(("logits", logits, logit_picks, [f"logit:{t}:{k}" for _, t, k in logit_picks]))
    n_batches = sum(-(-len(p) // params.batch_nodes) for _, _, p, _ in targets)
    bar = progress_bar(n_batches, "attribute", progress)
    edges: list[tuple[float, str, str]] = []
    total_mass = 0.0
    for _, output, picks, ids_of in targets:
        for start in range(0, len(picks), params.batch_nodes):
            batch = picks[start : start + params.batch_nodes]
            grads = _batched_grads(output, batch, sources)
            for i, target_id in enumerate(ids_of[start : start + params.batch_nodes]):
                found, mass = _incoming(names, grads, i, store, alive, params.per_target)
                total_mass += mass
                edges.extend((v, s, target_id) for v, s in found)
            bar.update(1)
    bar.close()
    edges.sort(key=lambda e: -abs(e[0]))
    kept = edges[: params.max_edges]
    return {
        "format": FORMAT,
        "kind": "prompt",
        "ids": ids[0].tolist(),
        "tokens": [decode([i]) for i in ids[0].tolist()] if decode else None,
        "params": asdict(params),
        "nodes": _nodes(names, store, g, alive),
        "logits": [
            {
                "id": f"logit:{t}:{k}",
                "position": t,
                "token": k,
                "text": decode([k]) if decode else str(k),
                "logit": logits[0, t, k].item(),
            }
            for _, t, k in logit_picks
        ],
        "edges": [{"source": s, "target": t, "value": v} for v, s, t in kept],
        "edge_mass": {"kept": sum(abs(v) for v, _, _ in kept), "total": total_mass},
    }


def node_id(module: str, position: int, index: int) -> str:
    """ "<module>:<position>:<index>" (clusters.json names a subcomponent "<module>:<index>")."""
    return f"{module}:{position}:{index}"


def _incoming(
    names: list[str],
    grads: list[Tensor | None],
    i: int,
    store: Mapping[str, Leaves],
    alive: Mapping[str, Tensor],
    k: int,
) -> tuple[list[tuple[float, str]], float]:
    """The k strongest alive edges into batch entry i, and the |e| of all of them."""
    values, where = [], []
    for n, grad in zip(names, grads, strict=True):
        if grad is None:
            continue
        e = (grad[i, 0] * store[n].leaf[0]).detach()  # [T, C]
        e = torch.where(alive[n], e, torch.zeros_like(e))
        values.append(e.flatten())
        where.append(n)
    if not values:
        return [], 0.0
    flat = torch.cat(values)
    mass = flat.abs().sum().item()
    top = flat.abs().topk(min(k, int((flat != 0).sum()))).indices.tolist()
    sizes = [v.numel() for v in values]
    out = []
    for j in top:
        m = 0
        while j >= sizes[m]:
            j -= sizes[m]
            m += 1
        C = store[where[m]].leaf.shape[-1]
        out.append((flat[sum(sizes[:m]) + j].item(), node_id(where[m], j // C, j % C)))
    return out, mass


def _nodes(
    names: list[str], store: Mapping[str, Leaves], g: Mapping[str, Tensor], alive: Mapping
) -> list[dict[str, Any]]:
    out = []
    for n in names:
        for t, c in alive[n].nonzero().tolist():
            out.append(
                {
                    "id": node_id(n, t, c),
                    "module": n,
                    "position": t,
                    "index": c,
                    "ci": round(g[n][0, t, c].item(), 5),
                    "activation": store[n].leaf[0, t, c].item(),
                }
            )
    return out


# --- over a dataset -------------------------------------------------------------------------
def dataset_attributions(
    model: ComponentModel,
    batches: Iterator[Tensor],
    n_tokens: int,
    params: AttributionParams,
    progress: bool = False,
) -> dict[str, Any]:
    """Edges between subcomponents summed over every position of ≥ `n_tokens` tokens (the
    batches [B, T] of token ids are read until then) and divided by the number of tokens;
    the `per_target` strongest into each target subcomponent and into the next-token logit
    are kept (the graph file's `dataset` kind)."""
    acc: dict[tuple[str, str], Tensor] = {}  # (source module, target module) -> [C_s, C_t]
    to_logit: dict[str, Tensor] = {}
    seen = 0
    bar = progress_bar(n_tokens, "attribute (dataset)", progress)
    nodes = node_modules(model, params.nodes)
    for ids in batches:
        g = ci_masks(model, ids)
        with leaf_pass(model, g, nodes) as store:
            logits = model_output(model.target(ids), model.output_field)
        names = [n for n in model.module_names if n in store]
        sources = [store[n].leaf for n in names]
        alive = {n: (g[n] > params.ci_threshold).to(g[n].dtype) for n in names}  # [B, T, C]
        for tgt in names:
            value = store[tgt].value  # [B, T, C]
            live = alive[tgt].flatten(0, -2).any(0).nonzero().flatten()
            for start in range(0, len(live), params.batch_nodes):
                cs = live[start : start + params.batch_nodes].tolist()
                grad_out = value.new_zeros(len(cs), *value.shape)
                for i, c in enumerate(cs):
                    grad_out[i, ..., c] = alive[tgt][..., c]  # Σ over its alive positions
                grads = torch.autograd.grad(
                    value, sources, grad_out, retain_graph=True, allow_unused=True,
                    is_grads_batched=True,
                )  # fmt: skip
                for src, grad in zip(names, grads, strict=True):
                    if grad is None:
                        continue
                    e = grad * (store[src].leaf * alive[src]).detach()
                    e = e.flatten(1, -2).sum(1)  # [N, C_s]
                    C_s, C_t = e.shape[1], value.shape[-1]
                    block = acc.setdefault((src, tgt), e.new_zeros(C_s, C_t))
                    block[:, cs] += e.T.detach()
        next_logit = logits[:, :-1].gather(-1, ids[:, 1:, None]).sum()
        grads = torch.autograd.grad(next_logit, sources, allow_unused=True)
        for src, grad in zip(names, grads, strict=True):
            if grad is not None:
                e = (grad * (store[src].leaf * alive[src]).detach()).flatten(0, -2).sum(0)
                to_logit[src] = to_logit.get(src, 0) + e.detach()
        seen += ids.numel()
        bar.update(min(ids.numel(), max(0, n_tokens - (seen - ids.numel()))))
        if seen >= n_tokens:
            break
    bar.close()
    return {
        "format": FORMAT,
        "kind": "dataset",
        "n_tokens": seen,
        "params": asdict(params),
        "edges": _top_dataset_edges(acc, seen, params.per_target),
        "into_next_token_logit": _top_logit_edges(to_logit, seen, params.max_edges),
    }


def _top_dataset_edges(
    acc: Mapping[tuple[str, str], Tensor], n: int, k: int
) -> list[dict[str, Any]]:
    """The k strongest (by |mean e|) incoming edges of each target subcomponent."""
    by_target: dict[str, list[tuple[float, str]]] = {}
    for (src, tgt), block in acc.items():
        mean = block / max(1, n)
        for c_t in (mean.abs().sum(0) > 0).nonzero().flatten().tolist():
            col = mean[:, c_t]
            top = col.abs().topk(min(k, col.numel())).indices.tolist()
            by_target.setdefault(f"{tgt}:{c_t}", []).extend(
                (col[c].item(), f"{src}:{c}") for c in top if col[c] != 0
            )
    out = []
    for tgt, found in by_target.items():
        found.sort(key=lambda e: -abs(e[0]))
        out.extend({"source": s, "target": tgt, "value": v} for v, s in found[:k])
    return out


def _top_logit_edges(to_logit: Mapping[str, Tensor], n: int, k: int) -> list[dict[str, Any]]:
    found = [
        (v.item() / max(1, n), f"{src}:{c}")
        for src, e in to_logit.items()
        for c, v in enumerate(e)
        if v != 0
    ]
    found.sort(key=lambda e: -abs(e[0]))
    return [{"source": s, "target": "logit:next", "value": v} for v, s in found[:k]]
