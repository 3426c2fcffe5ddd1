"""`mlp`: the paper's causal-importance function, one scalar MLP per subcomponent.

    raw_c = w_out_c · GELU(w_in_c h_c + b_in_c) + b_out_c        h_c = V_c · a  (a scalar)

w_in, b_in, w_out [C, d_gate] and b_out [C] per module (d_gate = `ci_hidden_dim`). The C MLPs
of a module run as one broadcast op, or on CPU as the fused C++ kernel that also applies both
sigmoids without materialising [..., C, d_gate] (`spdkit.engine.kernels`; the raw CI alone for
other lower sigmoids). Tensors:
`<module>.ci.{w_in, b_in, w_out, b_out}`, the run-directory names since the first release.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spdkit.config.ci import LowerSigmoid
from spdkit.engine.kernels import fused_available, fused_causal_importance, fused_ci_mlp
from spdkit.method.ci.base import CIFunction, ModuleSlot, key
from spdkit.method.ci.sigmoids import lower_leaky_hard_sigmoid, upper_leaky_hard_sigmoid

PARAMS = ("w_in", "b_in", "w_out", "b_out")


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

    def __init__(self, C: int, d_gate: int, backend: str = "eager") -> None:
        """`backend`, how the MLPs run: "fused", the C++ kernel of `spdkit.engine.kernels`
        (CPU, float32), one pass for forward and one for backward; "compiled", torch.compile
        of the formula; "eager"; "auto" = fused where it applies. All are the same arithmetic
        up to float rounding (tests/test_kernels.py); a kernel that does not apply to an input
        (another device or dtype) falls back to eager for that call."""
        super().__init__()
        # Init (README): w_in ~ N(0, 1) (fan-in 1), w_out ~ N(0, 1/d_gate), zero biases; the raw
        # CI then starts near 0 with unit-scale sensitivity to h.
        self.w_in = nn.Parameter(torch.randn(C, d_gate))
        self.b_in = nn.Parameter(torch.zeros(C, d_gate))
        self.w_out = nn.Parameter(torch.randn(C, d_gate) / math.sqrt(d_gate))
        self.b_out = nn.Parameter(torch.zeros(C))
        self.backend = backend
        self._compiled = (
            (
                torch.compile(causal_importance_pair, dynamic=False),
                torch.compile(ci_mlp, dynamic=False),
            )
            if backend == "compiled"
            else None
        )

    def kernels(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> tuple:
        """(backend used, the (g, g⁺) function, the raw-CI function) for inputs on `device`."""
        if self.backend in ("auto", "fused") and dtype == torch.float32 and fused_available(device):
            return "fused", fused_causal_importance, fused_ci_mlp
        if self._compiled is not None:
            return "compiled", *self._compiled
        return "eager", causal_importance_pair, ci_mlp

    def backend_used(self, device: torch.device | str) -> str:
        return self.kernels(device)[0]

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """(g, g⁺), each [..., C], from inner activations h [..., C]."""
        _, pair, _ = self.kernels(h.device, h.dtype)
        return pair(h, self.w_in, self.b_in, self.w_out, self.b_out)

    def raw(self, h: Tensor) -> Tensor:
        """The raw CI [..., C] (before either sigmoid) with the same backend."""
        _, _, raw = self.kernels(h.device, h.dtype)
        return raw(h, self.w_in, self.b_in, self.w_out, self.b_out)


class MLPCI(CIFunction):
    per_module = True

    def __init__(
        self,
        slots: list[ModuleSlot],
        d_gate: int,
        lower_sigmoid: LowerSigmoid = "leaky",
        backend: str = "eager",
    ) -> None:
        super().__init__(slots, lower_sigmoid=lower_sigmoid)
        self.functions = nn.ModuleDict(
            {key(s.name): CausalImportance(s.C, d_gate, backend) for s in slots}
        )

    def of(self, name: str) -> CausalImportance:
        """The C scalar MLPs of one module."""
        return self.functions[key(name)]  # type: ignore[return-value]

    def raw(self, inputs: Mapping[str, Tensor], inner: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {s.name: self.of(s.name).raw(inner[s.name]) for s in self.slots}

    def forward(
        self, inputs: Mapping[str, Tensor], inner: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Both sigmoids with the chosen backend (fused on CPU): the same values as the base
        class's path up to float rounding (tests/test_kernels.py). The kernel has the paper's
        leaky lower sigmoid only; another one goes through `raw` (still fused) and torch."""
        if self.lower_sigmoid != "leaky":
            return super().forward(inputs, inner)
        pairs = {s.name: self.of(s.name)(inner[s.name]) for s in self.slots}
        return {n: p[0] for n, p in pairs.items()}, {n: p[1] for n, p in pairs.items()}

    def backend_used(self, device: torch.device | str) -> str:
        return {f.backend_used(device) for f in self.functions.values()}.pop()  # type: ignore[operator]

    def tensors(self) -> dict[str, Tensor]:
        return {f"{s.name}.ci.{p}": getattr(self.of(s.name), p) for s in self.slots for p in PARAMS}
