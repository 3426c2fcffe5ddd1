"""The causal-importance function's interface: one object for the whole decomposition.

    Γ : ({a^l}, {h^l}) ↦ {raw^l [..., C_l]}           a^l [..., d_in] the module inputs of the
    g^l = σ_H,lower(raw^l),  g⁺^l = σ_H,upper(raw^l)    step record, h^l = a^l Vˡᵀ [..., C_l]

Each kind (`spdkit.method.ci.<kind>`) implements `raw`; the leaky hard sigmoids are applied here, the
same for every kind (the `mlp` kind fuses them into its CPU kernel). `tensors()` names the
function's tensors as the run directory stores them in components.safetensors:
`<module>.ci.<param>` for kinds with one function per module, `ci.<param>` for global kinds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spdkit.config.ci import InputNorm, LowerSigmoid, Reads
from spdkit.method.ci.sigmoids import LOWER_SIGMOIDS, upper_leaky_hard_sigmoid


@dataclass(frozen=True)
class ModuleSlot:
    """What a CI function needs to know of one decomposed module, and what the kinds that read
    module features read of it (`reads`): its input a [d_in], its inner activations
    h = a Vᵀ [C], or both side by side. An embedding's input is token ids, so it is read as h."""

    name: str
    C: int
    d_in: int
    reads: Reads = "input"

    @property
    def width(self) -> int:
        """Width of the feature a reading function sees."""
        return {"input": self.d_in, "inner": self.C, "input+inner": self.d_in + self.C}[self.reads]


def key(name: str) -> str:
    """ModuleDict keys cannot contain '.'."""
    return name.replace(".", "__")


class CIFunction(nn.Module):
    """Base of every kind: `raw` per kind, the sigmoids and the serialised names here."""

    per_module = False  # one function per module (tensors named `<module>.ci.*`)

    def __init__(
        self,
        slots: list[ModuleSlot],
        input_norm: InputNorm = "rms",
        lower_sigmoid: LowerSigmoid = "leaky",
    ) -> None:
        super().__init__()
        self.slots = list(slots)
        self.input_norm = input_norm
        self.lower_sigmoid = lower_sigmoid  # the masks' sigmoid (`LOWER_SIGMOIDS`)

    def raw(self, inputs: Mapping[str, Tensor], inner: Mapping[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def forward(
        self, inputs: Mapping[str, Tensor], inner: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(g, g⁺) per module, each [..., C]: σ_H,lower (the masks'; the paper's leaky one or
        VPD's straight-through clamp) and σ_H,upper (penalised)."""
        raw = self.raw(inputs, inner)
        lower = LOWER_SIGMOIDS[self.lower_sigmoid]
        return (
            {n: lower(r) for n, r in raw.items()},
            {n: upper_leaky_hard_sigmoid(r) for n, r in raw.items()},
        )

    def backend_used(self, device: torch.device | str) -> str:
        """How the function runs on `device`; only the `mlp` kind has other backends."""
        return "eager"

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor under its run-directory name (the live parameters, for loading)."""
        if self.per_module:
            return {
                f"{slot.name}.ci.{k}": v
                for slot in self.slots
                for k, v in self.functions[key(slot.name)].state_dict(keep_vars=True).items()  # type: ignore[index]
            }
        return {f"ci.{k}": v for k, v in self.state_dict(keep_vars=True).items()}

    # --- shared by the kinds that read module inputs -----------------------------------------
    def feature(
        self, slot: ModuleSlot, inputs: Mapping[str, Tensor], inner: Mapping[str, Tensor]
    ) -> Tensor:
        """What the slot reads (its input a, its h = a Vᵀ, or both), each part RMS-normalised
        over its last dimension (no gain) with `input_norm: rms`: every module then enters at
        the same scale (VPD notes §4), but the magnitude is lost (a one-hot input of any size
        maps to the same point). `input_norm: none` passes it as it is. h carries a gradient
        to V: the CI function's use of it shapes the directions, as the paper's per-subcomponent
        function does, where a CI read from a alone leaves V to the reconstruction losses."""
        parts = {"input": [inputs], "inner": [inner], "input+inner": [inputs, inner]}[slot.reads]
        feats = [self._normed(part[slot.name].float()) for part in parts]
        return feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)

    def _normed(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],)) if self.input_norm == "rms" else x

    def concatenated(self, inputs: Mapping[str, Tensor], inner: Mapping[str, Tensor]) -> Tensor:
        """[..., Σ widths]: every module's feature, in the slots' (sorted-name) order."""
        feats = [self.feature(s, inputs, inner) for s in self.slots]
        shapes = {tuple(f.shape[:-1]) for f in feats}
        if len(shapes) > 1:
            raise ValueError(
                "a global CI function needs every decomposed module to see the same positions; "
                f"got leading shapes {sorted(shapes)} (use ci_fn kind mlp or vector_mlp)"
            )
        return torch.cat(feats, dim=-1)

    def split(self, out: Tensor) -> dict[str, Tensor]:
        """[..., Σ C] → {module: [..., C]} in the slots' order."""
        parts = out.split([s.C for s in self.slots], dim=-1)
        return {s.name: p for s, p in zip(self.slots, parts, strict=True)}


def mlp(d_in: int, hidden: list[int], d_out: int) -> nn.Sequential:
    """Linear → GELU → … → Linear."""
    layers: list[nn.Module] = []
    widths = [d_in, *hidden]
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.GELU()]
    layers.append(nn.Linear(widths[-1], d_out))
    return nn.Sequential(*layers)
