"""Sections of the training objective beyond the paper's (VPD notes §2-§5): p-annealing,
gradient clipping, the faithfulness warm-up and the adversary. The formulas are in `spdkit.method.losses` and
`spdkit.training.trainer`; every section is off by default, which is the paper's method."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from spdkit.config.base import StrictModel


class PAnnealConfig(StrictModel):
    """p of the importance penalty: `pnorm` until `start_frac` of training, linear to `p_end`
    at `end_frac`, then `p_end` (VPD: 2.0 → 0.4 over the whole run)."""

    p_end: float = Field(gt=0, description="p at the end of the anneal")
    start_frac: float = Field(default=0.0, ge=0, lt=1, description="fraction where it starts")
    end_frac: float = Field(default=1.0, gt=0, le=1, description="fraction where it ends")

    @model_validator(mode="after")
    def _ordered(self) -> PAnnealConfig:
        if self.start_frac >= self.end_frac:
            raise ValueError(
                f"start_frac ({self.start_frac}) must be below end_frac ({self.end_frac})"
            )
        return self


class GradClipConfig(StrictModel):
    """Clip the gradient's global L2 norm before each update, separately over all U, V and
    over the CI function's weights (None: no clipping; VPD clips U, V at 0.01, not the CI)."""

    components: float | None = Field(default=None, gt=0, description="max norm over all U, V")
    ci_fn: float | None = Field(default=None, gt=0, description="max norm over the CI function")


class FaithfulnessWarmupConfig(StrictModel):
    """Before SPD's first step, `steps` steps of L_faithfulness alone on U, V (AdamW, weight
    decay 0, constant `lr`), so training starts with U V ≈ W (VPD: 400 steps at 1e-3)."""

    steps: int = Field(default=0, ge=0, description="warm-up steps (0: none)")
    lr: float = Field(default=1e-3, gt=0, description="its learning rate")


class PGDConfig(StrictModel):
    """The adversary of L_adversarial (spdkit.method.adversary has the formulas; VPD notes §2.3)."""

    n_steps: int = Field(default=1, ge=1, description="ascent steps on the sources per step")
    step_size: float = Field(default=0.1, gt=0, description="η: sign step, or Adam's lr")
    optimizer: Literal["sign", "adam"] = Field(
        default="sign", description="sign: s += η sign(∇); adam: Adam ascent (β = adam_betas)"
    )
    adam_betas: tuple[float, float] = Field(default=(0.5, 0.99), description="Adam's β1, β2")
    init: Literal["random", "ones", "zeros"] = Field(
        default="random", description="s⁰: U(0, 1), ones (no ablation) or zeros (m = g)"
    )
    scope: Literal["position", "batch"] = Field(
        default="position",
        description="one source per datapoint and position, or one per module shared by all",
    )
    routing: Literal["all", "subset", "layerwise"] = Field(
        default="all",
        description="which modules an adversarial pass masks: all, a routed subset "
        "(subset_routing), or each alone (one adversary each)",
    )
    persistent: bool = Field(
        default=False,
        description="keep sources (and Adam state) across steps, in the checkpoint (VPD's "
        "training adversary); false: fresh sources every step",
    )
    warmup_frac: float = Field(
        default=0.0, ge=0, lt=1, description="persistent: linear warm-up of η over this fraction"
    )
