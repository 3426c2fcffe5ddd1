"""`global_mlp`: one MLP reads every decomposed module's input and gives every module's CI.

    x = [rms(a^1), …, rms(a^L)]   (sorted module names)    [..., Σ_l d_in^l]
    [raw^1, …, raw^L] = MLP(x)                             [..., Σ_l C_l]

A subcomponent's importance can then depend on what happens anywhere in the network (the
paper's "more global information", VPD's global_shared_mlp). All modules must see the same
positions. Tensors: `ci.net.<i>.{weight, bias}`.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from spdkit.config.ci import InputNorm, LowerSigmoid
from spdkit.method.ci.base import CIFunction, ModuleSlot, mlp


class GlobalMLPCI(CIFunction):
    def __init__(
        self,
        slots: list[ModuleSlot],
        hidden_dims: list[int],
        input_norm: InputNorm = "rms",
        lower_sigmoid: LowerSigmoid = "leaky",
    ) -> None:
        super().__init__(slots, input_norm, lower_sigmoid)
        self.net = mlp(sum(s.width for s in slots), hidden_dims, sum(s.C for s in slots))

    def raw(self, inputs: Mapping[str, Tensor], inner: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self.split(self.net(self.concatenated(inputs, inner)))
