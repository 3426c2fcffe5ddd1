"""The language-model report: CE and KL of the masked model under every kind of mask (VPD's
table, fresh-PGD ladder included), and the contexts where the most used subcomponents fire."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from spdkit.config import EvalConfig
from spdkit.engine.memory import available_bytes_on, tensor_bytes
from spdkit.method.adversary import Ascent, adversarial_masks, fresh_pgd_ladder
from spdkit.method.losses import kl_divergence
from spdkit.method.measures import chunks, weighted_sum
from spdkit.method.model import ComponentModel
from spdkit.progress import progress_bar


def next_token_ce(logits: Tensor, ids: Tensor) -> float:
    """Mean cross-entropy (nats) of predicting ids[:, t+1] from the logits at position t."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
    ).item()


def mask_kinds(
    g: dict[str, Tensor], ev: EvalConfig, draw: Callable[[Tensor], Tensor]
) -> dict[str, dict[str, Tensor]]:
    """The evaluation's masks per kind, from the CI g: CI, stochastic g + (1 − g) r (r from
    `draw`), all ones, rounded at `ci_threshold` and at each `round_thresholds`, all zeros."""
    return {
        "ci": g,
        "stochastic": {n: v + (1 - v) * draw(v) for n, v in g.items()},
        "ones": {n: torch.ones_like(v) for n, v in g.items()},
        "rounded": {n: (v > ev.ci_threshold).to(v.dtype) for n, v in g.items()},
        **{
            f"rounded>{t:g}": {n: (v > t).to(v.dtype) for n, v in g.items()}
            for t in ev.round_thresholds
        },
        "zero": {n: torch.zeros_like(v) for n, v in g.items()},
    }


RECORDS_SHARE = 0.5  # the kept records may take at most this share of the memory available


def keep_every_record(one_chunk_bytes: int, n_chunks: int, available: int | None) -> bool:
    """Whether the fresh-PGD ladder keeps every chunk's target record (its output and module
    inputs) instead of recomputing the chunk's target forward at each ascent step: when all of
    them fit in RECORDS_SHARE of the memory available (unknown: keep only one chunk's)."""
    if n_chunks <= 1:
        return True
    return available is not None and n_chunks * one_chunk_bytes <= RECORDS_SHARE * available


@torch.no_grad()
def lm_mask_evaluation(
    model: ComponentModel,
    ids: Tensor,
    ev: EvalConfig,
    generator: torch.Generator,
    progress: bool = False,
    keep_records: bool | None = None,
) -> dict[str, dict[str, float]]:
    """CE and KL(target ‖ masked) of the masked model, every module masked, for masks = CI
    (g), stochastic (g + (1-g) r), all ones, rounded CI (1 where CI > τ, else 0: `rounded` at
    `ci_threshold`, `rounded>τ` for each of `round_thresholds`), zero, and `pgd_n`: the
    masks g + (1 − g) s with fresh PGD sources s after n ascent steps on the KL (VPD's
    adversarial evaluation; one source per module shared by the batch). Also the fraction of
    the CE gap between zero masks and the target that each recovers. Masks of C entries:
    a Δ-component is left out (VPD's table).

    `ev.batch_size` sequences at a time: each chunk's logits live only while it is scored,
    and the PGD ascent sums the chunks' source gradients (still one source vector for the
    whole batch). Each ascent step needs every chunk's target record: all are kept when they
    fit (`keep_every_record`, or `keep_records` when given), else each is recomputed per step
    and memory is that of one chunk."""
    pieces = chunks(ids, ev.batch_size)
    n_pgd = max(ev.pgd_steps, default=0)
    bar = progress_bar(len(pieces) * (2 + n_pgd) if n_pgd else len(pieces), "eval", progress)

    def r(v: Tensor) -> Tensor:  # drawn on the generator's device, used on the CI's
        return torch.rand(v.shape, generator=generator, device=generator.device).to(v.device)

    def scores(piece: Tensor, masks: dict[str, dict[str, Tensor]], record) -> dict:  # noqa: ANN001
        record = record or model.record(piece)
        out = {"target": {"ce": next_token_ce(record.output, piece)}}
        for kind, m in masks.items():
            logits = model.masked_forward(piece, m, record)
            out[kind] = {
                "ce": next_token_ce(logits, piece),
                "kl": kl_divergence(logits, record.output).item(),
            }
        return out

    per_chunk, gs, kept = [], [], []
    keep = keep_records
    for share, piece in pieces:
        record = model.record(piece)
        if keep is None:
            room = available_bytes_on(record.output.device)
            keep = keep_every_record(tensor_bytes(record), len(pieces), room)
        kept.append(record if keep and ev.pgd_steps else None)
        g, _ = model.importances(piece, record)
        gs.append(g)
        per_chunk.append((share, scores(piece, mask_kinds(g, ev, r), record)))
        del record
        bar.update(1)
    if ev.pgd_steps:

        def kl_at(piece: Tensor, g: dict[str, Tensor], record):  # noqa: ANN001
            def kl(sources: dict[str, Tensor]) -> Tensor:
                rec = record or model.record(piece)  # recomputed where not kept
                logits = model.masked_forward(piece, adversarial_masks(g, sources), rec)
                bar.update(1)
                return kl_divergence(logits, rec.output)

            return kl

        parts = [
            (share, kl_at(piece, g, rec))
            for (share, piece), g, rec in zip(pieces, gs, kept, strict=True)
        ]
        shapes = {n: (v.shape[-1],) for n, v in gs[0].items()}
        ascent = Ascent(ev.pgd_optimizer, ev.pgd_adam_betas)
        ladder = fresh_pgd_ladder(parts, shapes, ev.pgd_steps, ev.pgd_step_size, generator, ascent)
        for i, ((_, piece), g) in enumerate(zip(pieces, gs, strict=True)):
            adv = {f"pgd_{n}": adversarial_masks(g, s) for n, s in ladder.items()}
            extra = scores(piece, adv, kept[i])
            per_chunk[i][1].update({k: v for k, v in extra.items() if k != "target"})
            bar.update(1)
    bar.close()
    out = {
        kind: weighted_sum([(share, d[kind]) for share, d in per_chunk]) for kind in per_chunk[0][1]
    }
    gap = out["zero"]["ce"] - out["target"]["ce"]
    for kind in out:
        if kind != "target":
            out[kind]["ce_gap_recovered"] = (
                (out["zero"]["ce"] - out[kind]["ce"]) / gap if gap else float("nan")
            )
    return out


def most_used_contexts(
    ci: Tensor,
    ids: Tensor,
    decode: Callable[[list[int]], str],
    threshold: float,
    n_subcomponents: int = 8,
    n_contexts: int = 6,
    width: int = 12,
) -> list[dict]:
    """For the `n_subcomponents` most used subcomponents (CI > `threshold` most often, the
    evaluation's `ci_threshold`) of one module,
    the `n_contexts` positions where their CI is highest, as decoded text ending in [token].

    ci [B, T, C]; ids [B, T]; decode(list[int]) -> str.
    """
    C = ci.shape[-1]
    flat = ci.reshape(-1, C)
    freq = (flat > threshold).float().mean(0)
    used = torch.argsort(freq, descending=True)[:n_subcomponents]
    rows = []
    for c in used.tolist():
        if freq[c] == 0:
            break
        top = torch.topk(flat[:, c], min(n_contexts, flat.shape[0])).indices
        contexts = []
        for i in top.tolist():
            b, t = divmod(i, ids.shape[1])
            left = decode(ids[b, max(0, t - width) : t].tolist())
            contexts.append((f"{left}[{decode([int(ids[b, t])])}]", round(flat[i, c].item(), 3)))
        rows.append({"subcomponent": c, "frequency": round(freq[c].item(), 4), "top": contexts})
    return rows
