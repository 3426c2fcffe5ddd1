"""The causal-importance function's section (`ci_fn: {kind: ...}`), one model per kind, each
with the lower sigmoid its masks go through. The formulas are in `spdkit.method.ci.<kind>`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from spdkit.config.base import StrictModel

InputNorm = Literal["rms", "none"]
LowerSigmoid = Literal["leaky", "straight_through"]
Reads = Literal["input", "inner", "input+inner"]


def lower_sigmoid_field() -> Any:
    """Every kind's σ_H,lower, which turns its raw CI into the masks' g."""
    return Field(
        default="leaky",
        description="σ_H,lower for the masks: leaky (the paper's, 0.01·x below 0) or "
        "straight_through (VPD's: clamp, leak only in the backward of negative gradients)",
    )


def reads_field() -> Any:
    """What the kinds that read module features read of each module."""
    return Field(
        default="input",
        description="per module: its input a, its inner activations h = a Vᵀ (as the mlp kind "
        "reads; gives the CI a gradient to V), or both (input+inner); embeddings are read as h",
    )


class MLPCIConfig(StrictModel):
    """The paper's: one scalar MLP per subcomponent on its inner activation h_c."""

    kind: Literal["mlp"] = "mlp"
    lower_sigmoid: LowerSigmoid = lower_sigmoid_field()
    hidden_dim: int = Field(
        default=16, ge=1, description="hidden GELU width of each subcomponent's MLP (d_gate)"
    )
    backend: Literal["auto", "eager", "compiled", "fused"] = Field(
        default="auto",
        description="how the MLPs run: fused C++ kernel (CPU), torch.compile, or eager; "
        "auto = fused on CPU when it builds, else eager (the same values up to rounding)",
    )


class VectorMLPCIConfig(StrictModel):
    """Per module, one MLP from its input a [d_in] to all C raw CIs."""

    kind: Literal["vector_mlp"] = "vector_mlp"
    lower_sigmoid: LowerSigmoid = lower_sigmoid_field()
    reads: Reads = reads_field()
    hidden_dims: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [64], description="widths of the GELU hidden layers"
    )
    input_norm: InputNorm = Field(
        default="rms",
        description="rms: each module's input RMS-normalised (no gain) before it is read; "
        "none: as it is (keeps the input's magnitude)",
    )


class GlobalMLPCIConfig(StrictModel):
    """One MLP over every module's (RMS-normalised) input → every module's raw CIs."""

    kind: Literal["global_mlp"] = "global_mlp"
    lower_sigmoid: LowerSigmoid = lower_sigmoid_field()
    reads: Reads = reads_field()
    hidden_dims: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [256], description="widths of the GELU hidden layers"
    )
    input_norm: InputNorm = Field(
        default="rms",
        description="rms: each module's input RMS-normalised (no gain) before it is read; "
        "none: as it is (keeps the input's magnitude)",
    )


class GlobalTransformerCIConfig(StrictModel):
    """A transformer over positions reading every module's normalised input (VPD notes §4)."""

    kind: Literal["global_transformer"] = "global_transformer"
    lower_sigmoid: LowerSigmoid = lower_sigmoid_field()
    reads: Reads = reads_field()
    d_model: int = Field(default=128, ge=1, description="width of the residual stream")
    n_layers: int = Field(default=2, ge=1, description="pre-norm attention + MLP blocks")
    n_heads: int = Field(default=4, ge=1, description="attention heads (d_model divisible)")
    d_ff: int = Field(default=512, ge=1, description="hidden width of each block's MLP")
    causal: bool = Field(
        default=False, description="causal attention (default: bidirectional, as VPD)"
    )
    input_norm: InputNorm = Field(
        default="rms",
        description="rms: each module's input RMS-normalised (no gain) before it is read; "
        "none: as it is (keeps the input's magnitude)",
    )


CI_CONFIGS: tuple[type[StrictModel], ...] = (
    MLPCIConfig,
    VectorMLPCIConfig,
    GlobalMLPCIConfig,
    GlobalTransformerCIConfig,
)
CI_BY_KIND = {c.model_fields["kind"].default: c for c in CI_CONFIGS}

CIFnConfig = Annotated[
    MLPCIConfig | VectorMLPCIConfig | GlobalMLPCIConfig | GlobalTransformerCIConfig,
    Field(discriminator="kind"),
]
