"""The smaller sections of a run's config: what to decompose, the components, the engine
switches, the evaluation."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from spdkit.config.base import StrictModel


class ModuleSpec(StrictModel):
    """Which modules of the target to decompose, and into how many subcomponents."""

    pattern: str = Field(
        min_length=1,
        description="fnmatch pattern over the target's module names, e.g. 'layers.*.mlp_in'",
    )
    C: int = Field(ge=1, description="number of rank-one subcomponents per matched module (C)")
    blocks: int = Field(
        default=1,
        ge=1,
        description="split each matched matrix into this many equal blocks along `block_axis`, "
        "each with C / blocks subcomponents that never leave it (attention heads: q, k, v "
        "along 'out', o along 'in'; docs/mechanisms_lm.md)",
    )
    block_axis: Literal["out", "in"] = Field(
        default="out",
        description="'out': blocks of rows of W [d_out, d_in] (U is block-structured); "
        "'in': blocks of columns (V is)",
    )

    @model_validator(mode="after")
    def _blocks_divide_C(self) -> ModuleSpec:
        if self.C % self.blocks:
            raise ValueError(
                f"blocks: {self.blocks} does not divide C {self.C} (each block gets C / blocks)"
            )
        return self


class IdentitySpec(StrictModel):
    """An identity matrix to insert before matched modules and decompose (paper appendix check:
    SPD should use it as one dense group of rank d)."""

    pattern: str = Field(
        min_length=1, description="fnmatch pattern over the target's nn.Linear / Conv1D names"
    )
    C: int | None = Field(
        default=None, ge=1, description="subcomponents of each identity (default 2 × its width)"
    )


class ComponentsConfig(StrictModel):
    """The rank-one subcomponents U[:, c] V[c, :] of every decomposed module."""

    init: Literal["target_projection", "normal"] = Field(
        default="target_projection",
        description="U, V init: random rank-one terms scaled by their overlap with W, or "
        "V ~ N(0, 1/d_in), U ~ N(0, 1/C)",
    )
    delta: bool = Field(
        default=False,
        description="Δ = W − U V as one more component per module with its own stochastic "
        "mask (CI ≡ 0), so the masked model is the target at m = 1 (VPD notes §2)",
    )


class EngineConfig(StrictModel):
    """How a step is computed. None of these changes the losses beyond float rounding
    (docs/engine.md; each shortcut has an exactness test)."""

    prefix_replay: bool = Field(
        default=True,
        description="a masked pass returns the recorded output of every module call before "
        "its first masked module (exact for modules whose only effect is their output); off "
        "for targets whose modules leave state for later ones",
    )
    per_pass_backward: bool = Field(
        default=True,
        description="differentiate each masked pass as soon as its loss is known (memory of one "
        "pass plus the CI graph); false keeps every pass in one graph (same gradients)",
    )
    masked_pass_dtype: Literal["float32", "bfloat16"] = Field(
        default="float32",
        description="bfloat16: masked passes under torch.autocast (for GPUs; on CPU it was "
        "measured to move gradients by ~10%); the CI function and losses stay float32",
    )


class EvalConfig(StrictModel):
    n_eval_samples: int = Field(default=4096, ge=1, description="batch used for end-of-run metrics")
    norm_threshold: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="a subcomponent is non-negligible if ‖U_c V_cᵀ‖_F ≥ this × the module's largest",
    )
    ci_threshold: float = Field(
        default=0.1, ge=0, lt=1, description="CI above this counts as active (for L0)"
    )
    one_hot_value: float = Field(
        default=1.0, description="feature value used for CI on one-hot inputs (1.0 TMS, 0.75 resid)"
    )
    round_thresholds: list[Annotated[float, Field(ge=0, lt=1)]] = Field(
        default_factory=lambda: [0.0, 0.1, 0.5],
        description="LM targets: CE / KL with masks 1[g > τ] for each τ (VPD's table)",
    )
    pgd_steps: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [20, 40, 80],
        description="LM targets: KL under fresh PGD sources (one per module, shared by "
        "the batch) after each number of ascent steps; [] for none",
    )
    pgd_step_size: float = Field(default=0.1, gt=0, description="the evaluation PGD's step")
    pgd_optimizer: Literal["sign", "adam"] = Field(
        default="sign", description="the evaluation PGD's ascent: sign (VPD's) or adam"
    )
    pgd_adam_betas: tuple[float, float] = Field(
        default=(0.5, 0.99), description="its Adam β1, β2 (pgd_optimizer adam)"
    )
    batch_size: int | None = Field(
        default=None,
        ge=1,
        description="samples per evaluation chunk: bounds its memory (a large LM's logits); "
        "null: the whole evaluation batch at once",
    )
