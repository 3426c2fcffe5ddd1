"""The SPD losses (paper §2 and the appendix pseudocode), each one small pure function."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
    return sum(_power(g + eps, pnorm).sum(-1).mean() for g in ci_upper)  # type: ignore[return-value]


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
