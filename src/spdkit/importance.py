"""Causal-importance functions and the leaky hard sigmoids (paper appendix).

Each subcomponent c has its own tiny MLP γ_c: R → R with one hidden GELU layer of width d_gate,
applied to its scalar inner activation h_c = V_c · a. All C MLPs of a module are evaluated as
one broadcast op over [..., C, d_gate]: there is no loop over subcomponents.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


def ci_mlp(h: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor) -> Tensor:
    """Raw CI of every subcomponent: w_out_c · GELU(w_in_c h_c + b_in_c) + b_out_c.

    h [..., C]; w_in, b_in, w_out [C, d_gate]; b_out [C] → [..., C].
    """
    hidden = F.gelu(torch.addcmul(b_in, h.unsqueeze(-1), w_in))  # [..., C, d_gate]
    return (hidden * w_out).sum(-1) + b_out


def causal_importance_pair(
    h: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor
) -> tuple[Tensor, Tensor]:
    """(g, g⁺) = (σ_H,lower, σ_H,upper) of the raw CI: the masks' g and the penalised g⁺."""
    raw = ci_mlp(h, w_in, b_in, w_out, b_out)
    return lower_leaky_hard_sigmoid(raw), upper_leaky_hard_sigmoid(raw)


class CausalImportance(nn.Module):
    """The C causal-importance MLPs of one module, as batched parameters."""

    def __init__(self, C: int, d_gate: int) -> None:
        super().__init__()
        # Init (README): w_in ~ N(0, 1) (fan-in 1), w_out ~ N(0, 1/d_gate), zero biases; the raw
        # CI then starts near 0 with unit-scale sensitivity to h.
        self.w_in = nn.Parameter(torch.randn(C, d_gate))
        self.b_in = nn.Parameter(torch.zeros(C, d_gate))
        self.w_out = nn.Parameter(torch.randn(C, d_gate) / math.sqrt(d_gate))
        self.b_out = nn.Parameter(torch.zeros(C))
        self.mlp, self.raw_mlp = causal_importance_pair, ci_mlp

    def set_backend(self, backend: str, device: torch.device | str) -> str:
        """Choose how the MLPs run; returns the backend actually used.

        "fused": the C++ kernel of `spdkit.kernels` (CPU, float32), one pass for forward and one
        for backward. "compiled": torch.compile of `ci_mlp`. Both are the same arithmetic as
        "eager" up to float rounding (tests/test_kernels.py).
        """
        from spdkit.kernels import fused_available, fused_causal_importance, fused_ci_mlp

        if backend in ("auto", "fused") and fused_available(device):
            self.mlp, self.raw_mlp, used = fused_causal_importance, fused_ci_mlp, "fused"
        elif backend == "compiled":
            self.mlp = torch.compile(causal_importance_pair, dynamic=False)
            self.raw_mlp, used = torch.compile(ci_mlp, dynamic=False), "compiled"
        else:
            self.mlp, self.raw_mlp, used = causal_importance_pair, ci_mlp, "eager"
        return used

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """(g, g⁺), each [..., C], from inner activations h [..., C]."""
        return self.mlp(h, self.w_in, self.b_in, self.w_out, self.b_out)

    def raw(self, h: Tensor) -> Tensor:
        """The raw CI [..., C] (before either sigmoid) with the same backend."""
        return self.raw_mlp(h, self.w_in, self.b_in, self.w_out, self.b_out)
