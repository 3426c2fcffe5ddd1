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
        self.mlp = ci_mlp

    def compile(self) -> None:  # type: ignore[override]
        """Fuse the MLP into one kernel (forward and backward) with torch.compile.

        Exact up to float rounding: the same arithmetic, without materialising [..., C, d_gate]
        in memory between ops, which is where eager time goes.
        """
        self.mlp = torch.compile(ci_mlp, dynamic=False)

    def forward(self, h: Tensor) -> Tensor:
        """Raw (pre-sigmoid) causal importances [..., C] from inner activations h [..., C]."""
        return self.mlp(h, self.w_in, self.b_in, self.w_out, self.b_out)
