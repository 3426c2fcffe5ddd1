"""`mlp`: the paper's causal-importance function, one scalar MLP per subcomponent.

    raw_c = w_out_c · GELU(w_in_c h_c + b_in_c) + b_out_c        h_c = V_c · a  (a scalar)

w_in, b_in, w_out [C, d_gate] and b_out [C] per module (d_gate = `ci_hidden_dim`). The C MLPs
of a module run as one broadcast op, or on CPU as the fused C++ kernel that also applies both
sigmoids without materialising [..., C, d_gate] (`spdkit.kernels`; the raw CI alone for
other lower sigmoids). Tensors:
`<module>.ci.{w_in, b_in, w_out, b_out}`, the run-directory names since the first release.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from spdkit.ci.base import CIFunction, ModuleSlot, key
from spdkit.importance import CausalImportance

PARAMS = ("w_in", "b_in", "w_out", "b_out")


class MLPCI(CIFunction):
    per_module = True

    def __init__(self, slots: list[ModuleSlot], d_gate: int) -> None:
        super().__init__(slots)
        self.functions = nn.ModuleDict({key(s.name): CausalImportance(s.C, d_gate) for s in slots})

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

    def set_backend(self, backend: str, device: torch.device | str) -> str:
        return {f.set_backend(backend, device) for f in self.functions.values()}.pop()  # type: ignore[operator]

    def tensors(self) -> dict[str, Tensor]:
        return {f"{s.name}.ci.{p}": getattr(self.of(s.name), p) for s in self.slots for p in PARAMS}
