"""The leaky hard sigmoids (paper appendix) that turn a raw CI into the masks' g and the
penalised g⁺, and VPD's straight-through lower sigmoid; the same for every CI-function kind."""

from __future__ import annotations

import torch
from torch import Tensor

LEAK = 0.01  # slope of the leaky parts of both hard sigmoids (paper appendix)


def lower_leaky_hard_sigmoid(x: Tensor) -> Tensor:
    """σ_H,lower: 0.01·x for x ≤ 0, x on [0, 1], 1 above. Gives the masks' g.

    The leak below 0 keeps a gradient for subcomponents whose CI was pushed negative: a
    subcomponent that does not matter can be scaled below zero without changing the output.
    """
    return torch.where(x < 0, LEAK * x, x.clamp(max=1.0))


class _LowerHardSigmoidSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        below = torch.where(grad < 0, LEAK * grad, torch.zeros_like(grad))
        return torch.where(x <= 0, below, torch.where(x > 1, torch.zeros_like(grad), grad))


def lower_hard_sigmoid_ste(x: Tensor) -> Tensor:
    """VPD's lower sigmoid: forward clamp(x, 0, 1); backward grad on (0, 1], 0 above 1, and
    below 0 only 0.01·grad when grad < 0, else 0 (VPD notes §3).

    The paper's leak is in the forward, so masks can go below 0 (a subcomponent subtracted);
    VPD found that unstable. Here masks stay in [0, 1], and a subcomponent whose CI was
    pushed below 0 still gets the "raise me" gradient (grad < 0 means increasing x lowers the
    loss) but never a push further down, so x cannot drift ever more negative.
    """
    return _LowerHardSigmoidSTE.apply(x)


LOWER_SIGMOIDS = {"leaky": lower_leaky_hard_sigmoid, "straight_through": lower_hard_sigmoid_ste}


def upper_leaky_hard_sigmoid(x: Tensor) -> Tensor:
    """σ_H,upper: 0 for x ≤ 0, x on [0, 1], 1 + 0.01·(x − 1) above. Gives the CI that is penalised.

    CI cannot go below 0 (the penalty would reward it), but may exceed 1 in the penalty.
    """
    return torch.where(x > 1, 1.0 + LEAK * (x - 1.0), x.clamp(min=0.0))
