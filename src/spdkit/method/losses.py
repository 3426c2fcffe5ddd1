"""The SPD losses (paper §2 and the appendix pseudocode), each one small pure function."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


class Divergence:
    """D(masked output, target output). `prepare` does the work that depends on the target
    alone, once per step: a step compares 1 + L masked outputs with the same target."""

    def prepare(self, y_target: Tensor) -> Any:
        return y_target

    def compare(self, y_masked: Tensor, prepared: Any) -> Tensor:
        raise NotImplementedError

    def __call__(self, y_masked: Tensor, y_target: Tensor) -> Tensor:
        return self.compare(y_masked, self.prepare(y_target))


class MSEDivergence(Divergence):
    """D = mean over all elements of (y_masked − y_target)²: the toy models' divergence."""

    def compare(self, y_masked: Tensor, prepared: Tensor) -> Tensor:
        return F.mse_loss(y_masked, prepared)


class KLDivergence(Divergence):
    """D = KL(target ‖ masked) = Σ_v p_t (log p_t − log p_m), summed over the last (vocabulary)
    dimension and averaged over every other position: the language-model divergence. The
    target's log-probabilities and probabilities are the prepared part."""

    def prepare(self, y_target: Tensor) -> tuple[Tensor, Tensor]:
        logp_target = F.log_softmax(y_target, dim=-1)
        return logp_target, logp_target.exp()

    def compare(self, y_masked: Tensor, prepared: tuple[Tensor, Tensor]) -> Tensor:
        logp_target, p_target = prepared
        logp_masked = F.log_softmax(y_masked, dim=-1)
        return (p_target * (logp_target - logp_masked)).sum(-1).mean()


mse_divergence = MSEDivergence()
kl_divergence = KLDivergence()
DIVERGENCES: dict[str, Divergence] = {"mse": mse_divergence, "kl": kl_divergence}


def faithfulness_loss(
    target_weights: Sequence[Tensor], component_weights: Sequence[Tensor]
) -> Tensor:
    """L_faithfulness = (1/N) Σ_l Σ_ij (W^l_ij − Σ_c U^l_ic V^l_cj)²   (paper §2.2).

    N is the number of entries of the decomposed matrices (the paper's "parameters of the target
    model"; the two differ only by the target's biases and undecomposed matrices).
    """
    sq = sum(((w - uv) ** 2).sum() for w, uv in zip(target_weights, component_weights, strict=True))
    n = sum(w.numel() for w in target_weights)
    return sq / n


def importance_minimality_loss(
    ci_upper: Sequence[Tensor], pnorm: float, eps: float = 1e-12
) -> Tensor:
    """L_importance-minimality = (1/B) Σ_b Σ_l Σ_c |g⁺^l_{b,c}|^p   (paper §2.3, pseudocode step 4).

    `ci_upper` holds σ_H,upper of the raw CI per module, each [..., C] with every leading dim a
    batch dim (averaged). g⁺ ≥ 0, so |g⁺|^p = (g⁺ + eps)^p; eps keeps the gradient finite at 0
    when p < 1.
    """
    return minimality_loss([lp_penalty(g, pnorm, eps) for g in ci_upper])


def minimality_loss(penalties: Sequence[Tensor]) -> Tensor:
    """(1/B) Σ_b Σ_l Σ_c φ^l_{b,c}: the importance-minimality term for per-CI penalties φ
    (each [..., C], every leading dim a batch dim)."""
    return sum(phi.sum(-1).mean() for phi in penalties)  # type: ignore[return-value]


def lp_penalty(g_upper: Tensor, pnorm: float, eps: float = 1e-12) -> Tensor:
    """φ(g) = (g + eps)^p, elementwise: the paper's penalty (g ≥ 0)."""
    return _power(g_upper + eps, pnorm)


def smooth_l0_penalty(g_upper: Tensor, scale: float) -> Tensor:
    """φ(g) = 1 − exp(−g / σ), elementwise: a smooth, saturating stand-in for 1[g > 0].

    The concave exponential approximation of the L0 norm (Bradley & Mangasarian, "Feature
    selection via concave minimization and support vector machines", ICML 1998). Unlike |g|^p
    with p < 1, whose gradient p g^(p−1) is infinite at 0 (a cliff: the first bit of CI is the
    most expensive), φ'(0) = 1/σ is finite, and φ saturates at 1 for g ≫ σ, so a subcomponent
    that is clearly needed costs about one unit however large its CI: an L0 count, not a mass.
    """
    return 1.0 - torch.exp(-g_upper / scale)


def frequency_minimality_loss(
    penalties: Sequence[Tensor],
    global_sum: Callable[[Tensor], Tensor] | None = None,
    world: int = 1,
    reference_count: int | None = None,
) -> Tensor:
    """L_frequency = (1/BT) Σ_l Σ_c s^l_c · log2(1 + s^l_c),   s^l_c = Σ_{b,t} φ(g⁺^l_{b,t,c})

    (VPD notes §2.5). φ is the importance penalty per element (|g⁺ + ε|^p, or the smooth-L0
    φ), one [..., C] tensor per module. Σ_c s_c log2(1 + s_c) is slightly superlinear in how
    often a subcomponent fires, so one subcomponent firing on two unrelated sets of inputs
    costs more than two that fire on one set each: it splits "bisemantic" subcomponents.

    Data parallelism: the sums run over the global batch, not one rank's shard of it.
    `global_sum(s)` [C] → [C] sums over the `world` ranks (equal shards), and s enters as
    s_rank + (Σ_ranks s − s_rank) held constant, so every rank returns the global value, and
    its gradient with respect to this rank's φ is the global loss's.

    `reference_count` N: the count inside the log is taken at N positions, log2(1 + s·N/BT),
    so the penalty no longer grows with the batch (s is an absolute count: doubling B·T adds
    one bit to every log). N = BT is the paper's. A small N makes the term small beside
    importance minimality: with f = s/BT ≤ 1, N = 1 gives s·log2(1 + f) ≈ s·f / ln 2, so a
    subcomponent firing everywhere pays about one extra unit per firing, not log2(1 + BT)
    (≈ 11 at BT 2048); it then barely favours splitting a dense mechanism (docs/ground_truth.md).
    """
    total = None
    for phi in penalties:
        s = phi.reshape(-1, phi.shape[-1]).sum(0)  # [C]
        if global_sum is not None:
            local = s.detach()
            s = s + (global_sum(local.clone()) - local)
        n_pos = phi[..., 0].numel() * world
        inside = s if reference_count is None else s * (reference_count / n_pos)
        term = (s * torch.log2(1.0 + inside)).sum() / n_pos
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


def pnorm_at(
    step: int, steps: int, p_start: float, p_end: float, start: float, end: float
) -> float:
    """p of the importance penalty at `step` (0-based) of `steps`: p_start until the fraction
    `start` of training, then linear to p_end at `end`, p_end after (VPD notes §2.4: 2.0 → 0.4
    over the whole run). Large p first penalises only large CIs, so subcomponents can form
    before small p pushes their CI towards 0 or 1. A pure function of the step: resume exact."""
    t = step / steps
    if t <= start:
        return p_start
    if t >= end:
        return p_end
    return p_start + (p_end - p_start) * (t - start) / (end - start)


def _power(x: Tensor, p: float) -> Tensor:
    """x ** p, with the paper's p = 1 and p = 2 as an identity and a square: the same values and
    gradients, without the general power's exp/log in forward and backward (a tenth of a TMS
    step)."""
    if p == 1:
        return x
    if p == 2:
        return x * x
    return x**p


def stochastic_masks(ci_lower: Tensor, r: Tensor) -> Tensor:
    """m = g + (1 − g) ⊙ r with r ~ U(0, 1): a reparametrised sample of U(g, 1)   (paper §2.3)."""
    return ci_lower + (1.0 - ci_lower) * r
