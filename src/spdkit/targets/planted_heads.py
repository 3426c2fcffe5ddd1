"""What a trained `planted_lm` target does with its attention heads, per task: the ground truth
at head granularity that a decomposition's ablations and attribution graphs are read against.

`planted.py` documents the mechanism each task is *expected* to need (a previous-token head and
an induction head for `induction`, one positional head for `copy`, ...). Training decides
whether the model uses it; a decomposition cannot show a circuit the target does not have. Two
measurements, both on held-out task sequences at the positions each task scores:

- **head knockout**: the task's scored CE with one head's output zeroed (its slice of the input
  to `attn.o`), every other weight as trained. A head the task needs raises it towards chance.
- **attention scores**: per head, the mean attention weight of the query position t (which
  predicts token t + 1) on the key the expected mechanism reads:
  `induction` (layer 1): the token after the earlier occurrence of ids[t] (t + 1 − m);
  `previous_token` (layer 0, on the induction task): from that key position to the one before;
  `copy` (every layer): t + 2 − k, the token k back from the predicted one.
  An expected head that exists scores near 1; uniform attention scores about 1 / t.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from spdkit.targets.transformer import Attention, Transformer, scored_token_ce


def scored_ce(logits: Tensor, ids: Tensor, scored: Tensor) -> Tensor:
    """Mean CE of the scored tokens ids[b, t] (scored[b, t]), predicted from logits[b, t − 1]."""
    return scored_token_ce(logits, ids)[scored[:, 1:]].mean()


@contextmanager
def head_off(attn: Attention, head: int) -> Iterator[None]:
    """Within the block, `attn`'s head `head` writes nothing: its slice of o's input is 0."""
    d_head = attn.q.out_features // attn.n_heads

    def zero(_: torch.nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        x = args[0].clone()  # [B, T, D]: the heads' outputs side by side
        x[..., head * d_head : (head + 1) * d_head] = 0
        return (x,)

    handle = attn.o.register_forward_pre_hook(zero)
    try:
        yield
    finally:
        handle.remove()


def head_knockout(
    model: Transformer, batches: dict[str, tuple[Tensor, Tensor]]
) -> dict[str, dict[str, float]]:
    """{task: {"none": CE, "<layer>.<head>": CE with that head zeroed}} on the scored positions."""
    out: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for task, (ids, scored) in batches.items():
            row = {"none": scored_ce(model(ids), ids, scored).item()}
            for layer, block in enumerate(model.blocks):
                for head in range(block.attn.n_heads):
                    with head_off(block.attn, head):
                        row[f"{layer}.{head}"] = scored_ce(model(ids), ids, scored).item()
            out[task] = row
    return out


def attention_patterns(model: Transformer, ids: Tensor) -> list[Tensor]:
    """Per layer, the attention weights softmax(q kᵀ / √d_head) with the causal mask,
    [B, H, T (query), T (key)], recomputed from each attention's input."""
    inputs: list[Tensor] = []
    handles = [
        b.attn.register_forward_hook(lambda _m, args, _o: inputs.append(args[0]))
        for b in model.blocks
    ]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    patterns = []
    for block, x in zip(model.blocks, inputs, strict=True):
        attn, (B, T, D) = block.attn, x.shape
        H = attn.n_heads
        q = attn.q(x).view(B, T, H, D // H).transpose(1, 2)
        k = attn.k(x).view(B, T, H, D // H).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(D // H)
        causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).triu(1)
        patterns.append(scores.masked_fill(causal, float("-inf")).softmax(-1).detach())
    return patterns


def induction_keys(scored: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(rows, s, keys) of the induction task's scored tokens ids[row, s]: keys = s − m, the
    token after the earlier occurrence of ids[s − 1] (ids[keys] = ids[s], ids[keys − 1] =
    ids[s − 1]); the task scores the repeat from its 2nd token, so a row scores m − 1."""
    rows, s = scored.nonzero(as_tuple=True)
    m = (scored.sum(1) + 1)[rows]
    return rows, s, s - m


def _mean_weight(pattern: Tensor, rows: Tensor, queries: Tensor, keys: Tensor) -> list[float]:
    """Per head, the mean of pattern[row, head, query, key] over the given triples."""
    return [pattern[rows, h, queries, keys].mean().item() for h in range(pattern.shape[1])]


def attention_scores(
    model: Transformer, batches: dict[str, tuple[Tensor, Tensor]], copy_offset: int
) -> dict[str, dict[str, float]]:
    """{score: {"<layer>.<head>": mean weight on the expected key}} (module docstring)."""
    out: dict[str, dict[str, float]] = {}

    def named(layer: int, values: list[float]) -> dict[str, float]:
        return {f"{layer}.{h}": v for h, v in enumerate(values)}

    if "induction" in batches:
        ids, scored = batches["induction"]
        rows, s, keys = induction_keys(scored)
        p = attention_patterns(model, ids)
        out["previous_token"] = named(0, _mean_weight(p[0], rows, keys, keys - 1))
        if len(p) > 1:
            out["induction"] = named(1, _mean_weight(p[1], rows, s - 1, keys))
    if "copy" in batches:
        ids, scored = batches["copy"]
        rows, s = scored.nonzero(as_tuple=True)  # ids[row, s] = ids[row, s − k]
        p = attention_patterns(model, ids)
        k = copy_offset
        out["copy"] = {
            name: v
            for layer, pl in enumerate(p)
            for name, v in named(layer, _mean_weight(pl, rows, s - 1, s - k)).items()
        }
    return out


def head_report(
    model: Transformer, batches: dict[str, tuple[Tensor, Tensor]], copy_offset: int
) -> dict[str, dict[str, dict[str, float]]]:
    """target.json's `heads`: knockout CE per task and head, and the attention scores, on the
    held-out task batches (ids, scored) of `planted.eval_task_batches`."""
    return {
        "knockout_ce": _rounded(head_knockout(model, batches)),
        "attention": _rounded(attention_scores(model, batches, copy_offset)),
    }


def _rounded(table: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {k: {h: round(v, 4) for h, v in row.items()} for k, row in table.items()}
