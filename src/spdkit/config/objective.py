"""Sections of the training objective beyond the paper's (VPD notes §2-§5): p-annealing,
gradient clipping and the faithfulness warm-up. The formulas are in `spdkit.losses` and
`spdkit.train`; every section is off by default, which is the paper's method."""

from __future__ import annotations

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
