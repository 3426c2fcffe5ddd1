"""Metrics of a decomposition: geometry against the target (MMCS, ML2R), subcomponent norms,
causal importance on one-hot inputs, CI-L0, and output losses under several masks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from spdkit.config import EvalConfig
from spdkit.method.losses import Divergence
from spdkit.method.model import ComponentModel


def subcomponent_norms(U: Tensor, V: Tensor) -> Tensor:
    """‖U_c V_cᵀ‖_F = ‖U[:, c]‖ ‖V[c, :]‖ for each c → [C]."""
    return U.norm(dim=0) * V.norm(dim=1)


def non_negligible(norms: Tensor, rel_threshold: float) -> Tensor:
    """bool [C]: norm ≥ rel_threshold × the largest norm in the module (and > 0).

    Relative to the module's largest subcomponent so the rule is scale-free; near-zero
    subcomponents are what SPD leaves unused, and must not count as matches or mechanisms.
    """
    return (norms >= rel_threshold * norms.max()) & (norms > 0)


@dataclass(frozen=True)
class FeatureMatch:
    mmcs: float
    ml2r: float
    match: list[int]  # index of the matched subcomponent, per feature (column of W)
    cosine: list[float]
    l2_ratio: list[float]


def mmcs_ml2r(W: Tensor, U: Tensor, V: Tensor, candidates: Tensor) -> FeatureMatch:
    """Mean max cosine similarity and mean L2 ratio between the columns of W [d_out, n] and the
    matching columns U[:, c] V[c, j] of the subcomponents (paper §3.1).

    Only `candidates` (bool [C], the non-negligible subcomponents) may be matched: a near-zero
    subcomponent can win the cosine by accident and would make ML2R meaningless.
    """
    W, U, V = W.detach().float(), U.detach().float(), V.detach().float()
    idx = torch.nonzero(candidates).flatten()
    if idx.numel() == 0:
        raise ValueError("no candidate subcomponents to match (all have negligible norm)")
    U_c, V_c = U[:, idx], V[idx]  # [d_out, k], [k, n]
    w_norm = W.norm(dim=0).clamp_min(1e-12)  # [n]
    u_norm = U_c.norm(dim=0).clamp_min(1e-12)  # [k]
    # cos(U_c V_cj, W_j) = sign(V_cj) · (U_c · W_j) / (‖U_c‖ ‖W_j‖)
    cos = torch.sign(V_c) * (U_c.T @ W) / (u_norm[:, None] * w_norm[None, :])  # [k, n]
    best = cos.argmax(dim=0)  # [n]
    cols = torch.arange(W.shape[1])
    best_cos = cos[best, cols]
    ratio = u_norm[best] * V_c[best, cols].abs() / w_norm
    return FeatureMatch(
        mmcs=best_cos.mean().item(),
        ml2r=ratio.mean().item(),
        match=idx[best].tolist(),
        cosine=best_cos.tolist(),
        l2_ratio=ratio.tolist(),
    )


@torch.no_grad()
def chunks(x: Tensor, size: int | None) -> list[tuple[float, Tensor]]:
    """x split along its first dim into pieces of `size` (None: x whole), each with its share
    of the rows: a mean over x is the share-weighted sum of the pieces' means."""
    pieces = [x] if size is None else list(x.split(size))
    return [(len(p) / len(x), p) for p in pieces]


def weighted_sum(parts: list[tuple[float, dict[str, float]]]) -> dict[str, float]:
    """Σ_i w_i d_i key by key (the chunked mean of per-chunk means)."""
    keys = parts[0][1].keys()
    return {k: sum(w * d[k] for w, d in parts) for k in keys}


def causal_importance(
    model: ComponentModel, x: Tensor, upper: bool = True, chunk: int | None = None
) -> dict[str, Tensor]:
    """CI per module [..., C] on inputs x: σ_H,upper (the penalised, plotted value) by default,
    σ_H,lower (the masks' g) otherwise; computed `chunk` rows at a time."""
    parts = []
    for _, piece in chunks(x, chunk):
        record = model.record(piece)
        g_lower, g_upper = model.causal_importances(record.inputs, model.inner_acts(record.inputs))
        parts.append(g_upper if upper else g_lower)
    return {n: torch.cat([p[n] for p in parts]) for n in parts[0]}


def one_hot_inputs(n_features: int, value: float, device: str | torch.device = "cpu") -> Tensor:
    """[n_features, n_features]: feature i alone active at `value`."""
    return value * torch.eye(n_features, device=device)


def mean_l0(ci: dict[str, Tensor], threshold: float) -> dict[str, float]:
    """Mean number of subcomponents per input with CI > threshold, per module."""
    return {n: (g > threshold).float().sum(-1).mean().item() for n, g in ci.items()}


def identity_check(
    ci: Tensor, norms: Tensor, d: int, ci_threshold: float, norm_threshold: float
) -> dict[str, int | bool]:
    """How an inserted d×d identity was decomposed (paper appendix heuristic).

    ci [..., C] on evaluation inputs, norms [C]. A rank-d identity should be d subcomponents
    that are active together on (nearly) every input: one dense group. "dense" = CI above the
    threshold on at least half of the positions; the check passes when exactly d are dense
    and they are all the non-negligible ones.
    """
    active = (ci > ci_threshold).flatten(0, -2).float().mean(0)  # [C] fraction of positions
    dense = active >= 0.5
    live = non_negligible(norms, norm_threshold)
    return {
        "d": d,
        "C": int(norms.numel()),
        "n_non_negligible": int(live.sum()),
        "n_dense": int(dense.sum()),
        "n_ever_active": int((active > 0).sum()),
        "one_dense_group_of_rank_d": bool(int(dense.sum()) == d and bool((dense == live).all())),
    }


@torch.no_grad()
def output_losses(
    model: ComponentModel, x: Tensor, divergence: Divergence, chunk: int | None = None
) -> dict[str, float]:
    """D(masked output, target output) for masks = CI (lower-leaky g), all ones (the unmasked
    sum of components) and all zeros (every subcomponent ablated); `chunk` rows at a time."""
    ones = model.ones_masks()
    zeros = {n: torch.zeros_like(m) for n, m in ones.items()}
    parts = []
    for share, piece in chunks(x, chunk):
        record = model.record(piece)
        ci, _ = model.causal_importances(record.inputs, model.inner_acts(record.inputs))
        kinds = (("ci_masked", ci), ("unmasked", ones), ("zero_masked", zeros))
        out = {
            name: divergence(model.masked_forward(piece, masks, record), record.output).item()
            for name, masks in kinds
        }
        parts.append((share, out))
    return weighted_sum(parts)


# --- residual-MLP ground truth (paper: compressed computation, distributed representations) ---
def greedy_feature_order(ci: Tensor, threshold: float) -> list[int]:
    """Column order of ci [n_features, C] that shows the diagonal (paper Figures 8, 12, 13): for
    each feature in turn, its highest-CI subcomponent not yet taken (if above `threshold`);
    then the remaining subcomponents active on some feature, then the rest."""
    ci = ci.detach().float().cpu()
    active = set(torch.nonzero(ci.max(dim=0).values > threshold).flatten().tolist())
    order: list[int] = []
    taken: set[int] = set()
    for row in ci:
        for c in torch.argsort(row, descending=True).tolist():
            if c in active and c not in taken:
                if row[c] > threshold:
                    order.append(c)
                    taken.add(c)
                break
    order += sorted(active - taken)
    return order + sorted(set(range(ci.shape[1])) - set(order))


def neuron_contributions_target(W_E: Tensor, W_in: Tensor, W_out: Tensor) -> Tensor:
    """[n_features, d_mlp]: (W_U[i] W_out) ⊙ (W_in W_E[:, i]) for every feature i (paper
    "Toy Model of Compressed Computation"). Here W_E is [n_features, d_resid] (row i embeds
    feature i) and W_U = W_Eᵀ, W_in [d_mlp, d_resid], W_out [d_resid, d_mlp]."""
    return (W_E @ W_out) * (W_E @ W_in.T)


def neuron_contributions_subcomponents(
    W_E: Tensor, U_in: Tensor, V_in: Tensor, W_out_sum: Tensor, match: list[int]
) -> Tensor:
    """[n_features, d_mlp]: (W_U[i] Σ_c U_out V_out) ⊙ (U_in[:, m] V_in[m] W_E[:, i]) with
    m = match[i], the W_in subcomponent that carries feature i (its highest CI on the one-hot
    input). W_out enters as the sum of its subcomponents: it is one dense mechanism."""
    m = torch.tensor(match, dtype=torch.long)
    inner = (W_E * V_in[m]).sum(dim=1)  # [n_features]: V_in[m(i)] · W_E[i]
    w_in_part = U_in[:, m].T * inner[:, None]  # [n_features, d_mlp]
    return (W_E @ W_out_sum) * w_in_part


def pearson_and_slope(x: Tensor, y: Tensor) -> tuple[float, float]:
    """Pearson r and the least-squares slope of y on x (with intercept), over all entries."""
    x, y = x.flatten().double(), y.flatten().double()
    xc, yc = x - x.mean(), y - y.mean()
    r = (xc @ yc) / (xc.norm() * yc.norm()).clamp_min(1e-300)
    slope = (xc @ yc) / (xc @ xc).clamp_min(1e-300)
    return r.item(), slope.item()


@dataclass(frozen=True)
class ResidVerdictRules:
    """The ground-truth verdict for residual-MLP targets, stated as numbers (README §resid).

    W_in, per layer: every feature has exactly one subcomponent with CI > `on`, and that
    subcomponent has CI < `off` on every other feature (monosemantic).
    W_out, across layers: the subcomponents with CI > `dense_ci` on at least `dense_fraction`
    of the features form the dense rank-d_mlp mechanism; their number must equal the target's
    neurons in all layers ± `dense_tolerance`.
    Everything else is dead: CI < `off` on every feature.
    """

    on: float = 0.5
    off: float = 0.1
    dense_ci: float = 0.1
    dense_fraction: float = 0.25
    dense_tolerance: int = 2


def resid_mlp_verdict(
    ci_in: dict[str, Tensor],
    ci_out: dict[str, Tensor],
    n_neurons: int,
    rules: ResidVerdictRules = ResidVerdictRules(),  # noqa: B008 (frozen dataclass)
) -> dict:
    """Counts behind the verdict, from CI on one-hot inputs ([n_features, C] per module)."""
    layers_in = {}
    all_mono = True
    for name, ci in ci_in.items():
        ci = ci.detach().float().cpu()
        on = ci > rules.on  # [n_features, C]
        per_feature = on.sum(dim=1)  # [n_features]
        owner = ci.argmax(dim=1)  # [n_features]
        mono = []
        for i in range(ci.shape[0]):
            others = torch.cat([ci[:i, owner[i]], ci[i + 1 :, owner[i]]])
            mono.append(bool(per_feature[i] == 1 and (others < rules.off).all()))
        dead = int((ci.max(dim=0).values < rules.off).sum())
        mono_owners = {int(owner[i]) for i in range(ci.shape[0]) if mono[i]}
        other = ci.shape[1] - dead - len(mono_owners)
        layers_in[name] = {
            "features_with_exactly_one": int((per_feature == 1).sum()),
            "features_with_none": int((per_feature == 0).sum()),
            "features_with_several": int((per_feature > 1).sum()),
            "features_monosemantic": sum(mono),
            "subcomponents_dead": dead,
            "subcomponents_other": other,
        }
        all_mono &= sum(mono) == ci.shape[0] and other == 0
    n_dense = n_dead_out = n_other_out = 0
    for ci in ci_out.values():
        ci = ci.detach().float().cpu()
        frac = (ci > rules.dense_ci).float().mean(dim=0)  # [C]
        dense = frac >= rules.dense_fraction
        dead = ci.max(dim=0).values < rules.off
        n_dense += int(dense.sum())
        n_dead_out += int(dead.sum())
        n_other_out += int((~dense & ~dead).sum())
    dense_ok = abs(n_dense - n_neurons) <= rules.dense_tolerance
    return {
        "rules": rules.__dict__,
        "w_in": layers_in,
        "w_out": {
            "dense": n_dense,
            "expected_dense": n_neurons,
            "dead": n_dead_out,
            "other": n_other_out,
        },
        "ground_truth": bool(all_mono and dense_ok and n_other_out == 0),
    }


# --- language models ---------------------------------------------------------------------
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


@torch.no_grad()
def lm_mask_evaluation(
    model: ComponentModel,
    ids: Tensor,
    ev: EvalConfig,
    generator: torch.Generator,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """CE and KL(target ‖ masked) of the masked model, every module masked, for masks = CI
    (g), stochastic (g + (1-g) r), all ones, rounded CI (1 where CI > τ, else 0: `rounded` at
    `ci_threshold`, `rounded>τ` for each of `round_thresholds`), zero, and `pgd_n`: the
    masks g + (1 − g) s with fresh sign-PGD sources s after n ascent steps on the KL (VPD's
    adversarial evaluation; one source per module shared by the batch). Also the fraction of
    the CE gap between zero masks and the target that each recovers. Masks of C entries:
    a Δ-component is left out (VPD's table).

    `ev.batch_size` sequences at a time: each chunk's logits live only while it is scored,
    and the PGD ascent sums the chunks' source gradients (still one source vector for the
    whole batch), so memory is that of one chunk."""
    from spdkit.method.adversary import adversarial_masks, fresh_pgd_ladder
    from spdkit.method.losses import kl_divergence
    from spdkit.progress import progress_bar

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

    per_chunk, gs, kept = [], [], None
    for share, piece in pieces:
        record = model.record(piece)
        kept = record if len(pieces) == 1 else None  # one chunk: its record serves the PGD
        g, _ = model.causal_importances(record.inputs, model.inner_acts(record.inputs))
        gs.append(g)
        per_chunk.append((share, scores(piece, mask_kinds(g, ev, r), record)))
        del record
        bar.update(1)
    if ev.pgd_steps:

        def kl_at(piece: Tensor, g: dict[str, Tensor]):
            def kl(sources: dict[str, Tensor]) -> Tensor:
                record = kept or model.record(piece)  # else recomputed: none is kept
                logits = model.masked_forward(piece, adversarial_masks(g, sources), record)
                bar.update(1)
                return kl_divergence(logits, record.output)

            return kl

        parts = [(share, kl_at(piece, g)) for (share, piece), g in zip(pieces, gs, strict=True)]
        shapes = {n: (v.shape[-1],) for n, v in gs[0].items()}
        ladder = fresh_pgd_ladder(parts, shapes, ev.pgd_steps, ev.pgd_step_size, generator)
        for i, ((_, piece), g) in enumerate(zip(pieces, gs, strict=True)):
            adv = {f"pgd_{n}": adversarial_masks(g, s) for n, s in ladder.items()}
            extra = scores(piece, adv, kept)
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


def top_contexts(
    ci: Tensor, ids: Tensor, decode, n_subcomponents: int = 8, n_contexts: int = 6, width: int = 12
) -> list[dict]:
    """For the `n_subcomponents` most used subcomponents (CI > 0.1 most often) of one module,
    the `n_contexts` positions where their CI is highest, as decoded text ending in [token].

    ci [B, T, C]; ids [B, T]; decode(list[int]) -> str.
    """
    C = ci.shape[-1]
    flat = ci.reshape(-1, C)
    freq = (flat > 0.1).float().mean(0)
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
