"""`vector_mlp`: per module, one MLP from the module's whole input to its C raw CIs.

    raw^l = MLP^l(rms(a^l))        a^l [..., d_in] → hidden widths (GELU) → [..., C]

Unlike the paper's scalar MLPs it sees the full input vector, so it can tell inputs apart
that give a subcomponent the same h_c. An embedding's MLP reads its h [..., C] (its input is
token ids). Tensors: `<module>.ci.net.<i>.{weight, bias}`.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from spdkit.config.ci import InputNorm, LowerSigmoid
from spdkit.method.ci.base import CIFunction, ModuleSlot, key, mlp


class VectorMLPCI(CIFunction):
    per_module = True

    def __init__(
        self,
        slots: list[ModuleSlot],
        hidden_dims: list[int],
        input_norm: InputNorm = "rms",
        lower_sigmoid: LowerSigmoid = "leaky",
    ) -> None:
        super().__init__(slots, input_norm, lower_sigmoid)
        self.functions = nn.ModuleDict(
            {key(s.name): _Net(mlp(s.width, hidden_dims, s.C)) for s in slots}
        )

    def raw(self, inputs: Mapping[str, Tensor], inner: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {
            s.name: self.functions[key(s.name)](self.feature(s, inputs, inner)) for s in self.slots
        }


class _Net(nn.Module):
    """Holds the MLP as `net`, so its tensors are named `<module>.ci.net.<i>.*`."""

    def __init__(self, net: nn.Sequential) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
