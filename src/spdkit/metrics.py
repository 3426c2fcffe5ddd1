"""Metrics of a decomposition: geometry against the target (MMCS, ML2R), subcomponent norms,
causal importance on one-hot inputs, CI-L0, and output losses under several masks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from spdkit.losses import Divergence
from spdkit.model import ComponentModel


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
def causal_importance(model: ComponentModel, x: Tensor, upper: bool = True) -> dict[str, Tensor]:
    """CI per module [..., C] on inputs x: σ_H,upper (the penalised, plotted value) by default,
    σ_H,lower (the masks' g) otherwise."""
    _, inputs = model.target_forward_with_inputs(x)
    g_lower, g_upper = model.causal_importances(model.inner_acts(inputs))
    return g_upper if upper else g_lower


def one_hot_inputs(n_features: int, value: float, device: str | torch.device = "cpu") -> Tensor:
    """[n_features, n_features]: feature i alone active at `value`."""
    return value * torch.eye(n_features, device=device)


def mean_l0(ci: dict[str, Tensor], threshold: float) -> dict[str, float]:
    """Mean number of subcomponents per input with CI > threshold, per module."""
    return {n: (g > threshold).float().sum(-1).mean().item() for n, g in ci.items()}


@torch.no_grad()
def output_losses(model: ComponentModel, x: Tensor, divergence: Divergence) -> dict[str, float]:
    """D(masked output, target output) for masks = CI (lower-leaky g), all ones (the unmasked
    sum of components) and all zeros (every subcomponent ablated)."""
    y_target, _ = model.target_forward_with_inputs(x)
    ci = causal_importance(model, x, upper=False)
    ones = model.ones_masks()
    zeros = {n: torch.zeros_like(m) for n, m in ones.items()}
    return {
        "ci_masked": divergence(model(x, ci), y_target).item(),
        "unmasked": divergence(model(x, ones), y_target).item(),
        "zero_masked": divergence(model(x, zeros), y_target).item(),
    }
