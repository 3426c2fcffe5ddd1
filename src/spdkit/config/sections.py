"""The smaller sections of a run's config: what to decompose, the optimiser, the
evaluation, subset routing."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from spdkit.config.base import StrictModel


class ModuleSpec(StrictModel):
    """Which modules of the target to decompose, and into how many subcomponents."""

    pattern: str = Field(
        min_length=1,
        description="fnmatch pattern over the target's module names, e.g. 'layers.*.mlp_in'",
    )
    C: int = Field(ge=1, description="number of rank-one subcomponents per matched module (C)")


class IdentitySpec(StrictModel):
    """An identity matrix to insert before matched modules and decompose (paper appendix check:
    SPD should use it as one dense group of rank d)."""

    pattern: str = Field(
        min_length=1, description="fnmatch pattern over the target's nn.Linear / Conv1D names"
    )
    C: int | None = Field(
        default=None, ge=1, description="subcomponents of each identity (default 2 × its width)"
    )


class OptimizerConfig(StrictModel):
    lr: float = Field(gt=0, description="maximum learning rate")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        default="constant", description="decay after warm-up (to 0 for cosine and linear)"
    )
    warmup_frac: float = Field(
        default=0.0, ge=0, lt=1, description="fraction of steps of linear warm-up from 0"
    )
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay (0 = Adam)")


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
        description="LM targets: KL under fresh sign-PGD sources (one per module, shared by "
        "the batch) after each number of ascent steps; [] for none",
    )
    pgd_step_size: float = Field(default=0.1, gt=0, description="the evaluation PGD's step")
    batch_size: int | None = Field(
        default=None,
        ge=1,
        description="samples per evaluation chunk: bounds its memory (a large LM's logits); "
        "null: the whole evaluation batch at once",
    )


class SubsetRoutingConfig(StrictModel):
    """Which modules a subset-reconstruction pass masks (spdkit.method.routing has the formulas)."""

    kind: Literal["uniform_k", "bernoulli"] = Field(
        default="uniform_k",
        description="uniform_k: k ~ U{1..L}, then k modules uniformly (VPD); bernoulli: each "
        "module independently with probability p",
    )
    p: float = Field(default=0.5, gt=0, le=1, description="bernoulli: routing probability")
    scope: Literal["position", "batch"] = Field(
        default="position",
        description="one subset per position (VPD) or one per pass for the whole batch",
    )
