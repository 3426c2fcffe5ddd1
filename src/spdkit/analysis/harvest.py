"""Harvest: one streaming pass over held-out text that keeps, for every subcomponent that fires,
what a reader needs to say what it does (`spdkit harvest`).

A subcomponent *fires* at a token where its CI (σ_H,upper, the plotted value) is above τ
(`eval.ci_threshold`). Over N tokens, per subcomponent:

- firing count and density (count / N), mean CI when firing;
- the `top_k` firing positions of highest CI and `random_k` firing positions drawn uniformly
  (each firing gets a random key; the smallest keys are kept: a reservoir sample without
  replacement), each as a window of `window` tokens ending at the firing token;
- the input tokens (the firing token) and next tokens most associated with firing: counts,
  precision P(token | fires), recall P(fires | token) and PMI log P(fires, token) /
  (P(fires) P(token));
- clusters (from clusters.json) as rows `cluster:<id>` too: CI the members' largest;
- the subcomponents it fires with most (co-firing counts, ranked by Jaccard |A∩B| / |A∪B| so
  that subcomponents firing everywhere do not top every list), when the decomposition has at most
  `max_cofiring` subcomponents (a dense [C, C] count; larger ones skip it).

Memory: the kept contexts are [C, k, window] whatever N; token associations are counted
sparsely (one entry per (subcomponent, token) pair seen), reduced every few batches.

Output (a public contract, `RUN_DIR/harvest/`): `subcomponents.parquet` (one row per
subcomponent that fired), `contexts.parquet` (one row per kept context), `meta.json`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from spdkit import files
from spdkit.analysis.harvest_state import KeptContexts, TokenCounts, add_cofiring, window_ci
from spdkit.analysis.mechanisms.clusters import Cluster
from spdkit.method.measures import causal_importance
from spdkit.method.model import ComponentModel
from spdkit.progress import progress_bar
from spdkit.store import atomic

HARVEST_DIR = "harvest"


@dataclass(frozen=True)
class HarvestParams:
    """tokens: N to read; top_k / random_k: contexts kept per subcomponent; window: tokens
    per context (ending at the firing token); n_tokens_kept: associated tokens listed per
    subcomponent; max_cofiring: co-firing is counted up to this many subcomponents."""

    tokens: int = 100_000
    threshold: float = 0.1
    top_k: int = 10
    random_k: int = 10
    window: int = 16
    n_tokens_kept: int = 10
    max_cofiring: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("tokens", "window", "n_tokens_kept"):
            if getattr(self, name) < 1:
                raise ValueError(f"harvest {name} = {getattr(self, name)}: must be ≥ 1")
        for name in ("top_k", "random_k", "max_cofiring"):
            if getattr(self, name) < 0:
                raise ValueError(f"harvest {name} = {getattr(self, name)}: must be ≥ 0")
        if not 0 <= self.threshold < 1:
            raise ValueError(f"harvest threshold = {self.threshold}: must be in [0, 1)")


@dataclass
class HarvestResult:
    names: list[str]  # "<module>:<index>", in the flat order
    n_tokens: int
    fire: Tensor  # [C] firing counts
    ci_sum: Tensor  # [C] Σ CI when firing
    top: KeptContexts
    random: KeptContexts
    inputs: TokenCounts
    nexts: TokenCounts
    token_totals: np.ndarray  # [vocab] occurrences of each token (as input)
    next_totals: np.ndarray  # [vocab] occurrences as the next token
    cofire: Tensor | None  # [C, C] or None


def harvest(
    model: ComponentModel,
    batches: Iterator[Tensor],
    vocab: int,
    params: HarvestParams,
    chunk: int | None = None,
    progress: bool = True,
    clusters: Sequence[Cluster] = (),
) -> HarvestResult:
    """The streaming pass over token batches [B, T] until `params.tokens` tokens are read.
    Each cluster is one more row, `cluster:<id>`: its CI at a token is its members' largest,
    so it fires where any member fires."""
    names = [f"{m}:{c}" for m in model.module_names for c in range(model.components(m).C)]
    column = {name: i for i, name in enumerate(names)}
    members = [torch.tensor([column[m] for m in c.members if m in column]) for c in clusters]
    names += [f"cluster:{c.id}" for c in clusters]
    C, W = len(names), params.window
    top, rand = KeptContexts(C, params.top_k, W), KeptContexts(C, params.random_k, W)
    fire, ci_sum = torch.zeros(C, dtype=torch.long), torch.zeros(C, dtype=torch.float64)
    inputs, nexts = TokenCounts(vocab), TokenCounts(vocab)
    totals, next_totals = np.zeros(vocab, np.int64), np.zeros(vocab, np.int64)
    cofire = torch.zeros(C, C, dtype=torch.long) if params.max_cofiring >= C else None
    gen = torch.Generator().manual_seed(params.seed)
    seen = 0
    bar = progress_bar(params.tokens, "harvest", progress)
    for ids in batches:
        ids = ids.cpu()
        with torch.no_grad():
            ci = causal_importance(model, ids.to(next(model.parameters()).device), chunk=chunk)
        flat = torch.cat([ci[m].float().cpu() for m in model.module_names], -1).flatten(0, 1)
        if members:
            per_cluster = [flat[:, idx].amax(1) if len(idx) else flat[:, 0] * 0 for idx in members]
            flat = torch.cat([flat, torch.stack(per_cluster, 1)], 1)
        fires = flat > params.threshold  # [n, C]
        n = flat.shape[0]
        B, T = ids.shape
        # windows ending at each position: [n, W], −1 before the sequence start
        padded = torch.cat([torch.full((B, W - 1), -1, dtype=torch.long), ids], 1)
        windows = padded.unfold(1, W, 1).reshape(n, W)
        per_pos = flat.view(B, T, -1)
        ci_pad = torch.cat([per_pos.new_zeros(B, W - 1, per_pos.shape[-1]), per_pos], 1)
        ci_of = window_ci(ci_pad.unfold(1, W, 1))  # [B, T, C, W], a view

        next_ids = torch.cat([ids[:, 1:], torch.full((B, 1), -1, dtype=torch.long)], 1).flatten()
        fire += fires.sum(0)
        ci_sum += torch.where(fires, flat, 0.0).sum(0).double()
        top.add(torch.where(fires, flat, -math.inf).T, flat.T, windows, ci_of)  # key: the CI
        keys = torch.rand(C, n, generator=gen)
        rand.add(torch.where(fires.T, keys, -math.inf), flat.T, windows, ci_of)
        pos, sub = fires.nonzero(as_tuple=True)
        inputs.add(sub, ids.flatten()[pos])
        has_next = next_ids[pos] >= 0
        nexts.add(sub[has_next], next_ids[pos][has_next])
        totals += np.bincount(ids.flatten().numpy(), minlength=vocab)
        valid = next_ids[next_ids >= 0].numpy()
        next_totals += np.bincount(valid, minlength=vocab)
        if cofire is not None:
            add_cofiring(cofire, fires)
        seen += n
        bar.update(min(n, max(0, params.tokens - (seen - n))))
        if seen >= params.tokens:
            break
    bar.close()
    return HarvestResult(
        names, seen, fire, ci_sum, top, rand, inputs, nexts, totals, next_totals, cofire
    )


def _associations(
    counts: TokenCounts, fire: Tensor, totals: np.ndarray, n: int, k: int
) -> dict[int, list[dict[str, Any]]]:
    """Per subcomponent, its k tokens of highest PMI among those seen with it at least twice
    (or once, if none twice), with count, precision, recall and PMI."""
    sub, tok, cnt = counts.by_subcomponent()
    fires = fire.numpy()[sub].astype(np.float64)
    tot = totals[tok].astype(np.float64)
    precision = cnt / np.maximum(fires, 1)
    recall = cnt / np.maximum(tot, 1)
    pmi = np.log(np.maximum(cnt * n, 1e-30) / np.maximum(fires * tot, 1e-30))
    out: dict[int, list[dict[str, Any]]] = {}
    order = np.lexsort((-pmi, sub))
    for i in order:
        rows = out.setdefault(int(sub[i]), [])
        if len(rows) < k and (cnt[i] >= 2 or fires[i] < 2 * k):
            rows.append(
                {
                    "token": int(tok[i]),
                    "count": int(cnt[i]),
                    "precision": round(float(precision[i]), 5),
                    "recall": round(float(recall[i]), 5),
                    "pmi": round(float(pmi[i]), 4),
                }
            )
    return out


def write_harvest(
    result: HarvestResult,
    out_dir: Path,
    params: HarvestParams,
    decode: Callable[[list[int]], str] | None = None,
) -> dict[str, Any]:
    """subcomponents.parquet, contexts.parquet and meta.json into `out_dir` (atomically each)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            "spdkit harvest writes Parquet: pip install -c constraints.txt -e '.[hf]' (pyarrow)"
        ) from None
    text = decode or (lambda ids: " ".join(map(str, ids)))
    n = result.n_tokens
    live = (result.fire > 0).nonzero().flatten().tolist()
    ins = _associations(result.inputs, result.fire, result.token_totals, n, params.n_tokens_kept)
    nxt = _associations(result.nexts, result.fire, result.next_totals, n, params.n_tokens_kept)

    def named(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**r, "text": text([r["token"]])} for r in rows]

    sub_rows = []
    for c in live:
        module, _, index = result.names[c].rpartition(":")  # a cluster: "cluster", its id
        neighbours: list[dict[str, Any]] = []
        if result.cofire is not None:  # ranked by Jaccard: raw counts favour dense ones
            both = result.cofire[c].double()
            jaccard = both / (result.fire[c] + result.fire - both).clamp_min(1)
            jaccard[c] = 0
            top = jaccard.topk(min(10, jaccard.numel()))
            neighbours = [
                {"name": result.names[j], "count": int(both[j]), "jaccard": round(v, 4)}
                for v, j in zip(top.values.tolist(), top.indices.tolist(), strict=True)
                if v > 0
            ]
        sub_rows.append(
            {
                "name": result.names[c],
                "module": module,
                "index": int(index),
                "n_fire": int(result.fire[c]),
                "density": float(result.fire[c]) / max(1, n),
                "mean_ci": float(result.ci_sum[c]) / max(1, int(result.fire[c])),
                "input_tokens": named(ins.get(c, [])),
                "next_tokens": named(nxt.get(c, [])),
                "cofiring": neighbours,
            }
        )
    ctx_rows = []
    for kind, kept in (("top", result.top), ("random", result.random)):
        for c in live:
            for rank in range(kept.key.shape[1]):
                if kept.key[c, rank] == -math.inf:
                    continue
                window = kept.windows[c, rank]
                ids = window[window >= 0].tolist()
                ci_tokens = kept.ci_windows[c, rank][window >= 0]
                ctx_rows.append(
                    {
                        "name": result.names[c],
                        "kind": kind,
                        "rank": rank,
                        "ci": float(kept.ci[c, rank]),
                        "tokens": ids,
                        "token_texts": [text([i]) for i in ids],
                        "ci_tokens": [round(v, 3) for v in ci_tokens.tolist()],
                        "text": text(ids[:-1]) + " [" + text(ids[-1:]) + "]",
                    }
                )
    for name, rows in (("subcomponents", sub_rows), ("contexts", ctx_rows)):
        buffer = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows), buffer)
        files.atomic_write_bytes(out_dir / f"{name}.parquet", buffer.getvalue().to_pybytes())
    meta = {
        "format": 1,
        "n_tokens": n,
        "n_subcomponents": len(result.names),
        "n_fired": len(live),
        "params": asdict(params),
        "cofiring": result.cofire is not None,
    }
    files.atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=1) + "\n")
    return meta


def read_harvest(run_dir: Path) -> dict[str, dict[str, Any]] | None:
    """RUN_DIR/harvest/ as {subcomponent name: its row of subcomponents.parquet with "top" and
    "random" context lists (tokens as text, CI per token, index of the firing token) and, once
    `spdkit label` ran, its "label" {"text", "source"}}; None when the run has no harvest (or
    pyarrow is missing)."""
    folder = Path(run_dir) / HARVEST_DIR
    if not (folder / "subcomponents.parquet").is_file():
        return None
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return None
    meta = atomic.read_json_object(folder / "meta.json")
    out = {
        row["name"]: {**row, "top": [], "random": []} for row in _rows(pq, folder, "subcomponents")
    }
    for ctx in _rows(pq, folder, "contexts"):
        entry = out.get(ctx["name"])
        if entry is not None:
            entry[ctx["kind"]].append(
                {"tokens": ctx["token_texts"], "ci": ctx["ci_tokens"], "at": len(ctx["tokens"]) - 1}
            )
    labels = folder / "labels.parquet"  # `spdkit label` (spdkit.analysis.labels)
    named = {r["name"]: r for r in _rows(pq, folder, "labels")} if labels.is_file() else {}
    for name, entry in out.items():
        entry["n_tokens"] = meta.get("n_tokens")
        if name in named:
            row = named[name]
            entry["label"] = {"text": row["label"], "source": row["source"]}
            for key in ("statistics_label", "detection", "statistics_detection"):
                if row.get(key) is not None:
                    entry["label"][key] = row[key]
    return out


def _rows(pq: Any, folder: Path, name: str) -> list[dict[str, Any]]:
    return pq.read_table(folder / f"{name}.parquet").to_pylist()
