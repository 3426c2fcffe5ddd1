"""How the decomposition is optimised: steps, batch, AdamW and its schedule, gradient
clipping, the faithfulness warm-up phase, logging and checkpoints (`spdkit.training`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from spdkit.config.base import StrictModel


class OptimizerConfig(StrictModel):
    lr: float = Field(gt=0, description="maximum learning rate")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        default="constant", description="decay after warm-up (to 0 for cosine and linear)"
    )
    warmup_frac: float = Field(
        default=0.0, ge=0, lt=1, description="fraction of steps of linear warm-up from 0"
    )
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay (0 = Adam)")


class GradClipConfig(StrictModel):
    """Clip the gradient's global L2 norm before each update, separately over all U, V and
    over the CI function's weights (None: no clipping; VPD clips U, V at 0.01, not the CI)."""

    components: float | None = Field(default=None, gt=0, description="max norm over all U, V")
    ci_fn: float | None = Field(default=None, gt=0, description="max norm over the CI function")


class FaithfulnessWarmupConfig(StrictModel):
    """Before SPD's first step, `steps` steps of L_faithfulness alone on U, V (AdamW, constant
    `lr`), so training starts with U V ≈ W (VPD: 400 steps at 1e-3, no weight decay). Weight
    decay pulls U V = W towards its smallest-norm factorisation, ‖U‖² + ‖V‖² → 2‖W‖_*, whose
    subcomponents are mixtures of W's singular directions (the reference implementation's TMS
    configs: 200 steps at 1e-2, weight decay 0.1; on tms_40-10 it led to dense pieces,
    docs/ground_truth.md)."""

    steps: int = Field(default=0, ge=0, description="warm-up steps (0: none)")
    lr: float = Field(default=1e-3, gt=0, description="its learning rate")
    weight_decay: float = Field(default=0.0, ge=0, description="its AdamW weight decay")


class TrainingConfig(StrictModel):
    steps: int = Field(ge=1, description="training steps")
    batch_size: int = Field(ge=1, description="training batch size")
    optimizer: OptimizerConfig
    log_every: int = Field(default=100, ge=1, description="steps between metric records")
    checkpoint_every: int = Field(default=2000, ge=1, description="steps between checkpoints")
    grad_clip: GradClipConfig = Field(default_factory=lambda: GradClipConfig())
    faithfulness_warmup: FaithfulnessWarmupConfig = Field(
        default_factory=lambda: FaithfulnessWarmupConfig()
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        default="stop",
        description="a NaN/inf loss or gradient: stop (keeping the last checkpoint) or skip the step",
    )
    candidates: int = Field(
        default=1,
        ge=1,
        description="starts tried on the same target (component init, data and mask streams "
        "from seed + 100003·i): each trains to select_frac of the schedule, the one with the "
        "lowest evaluation loss is finished (1: a single start, the paper's)",
    )
    select_frac: float = Field(
        default=0.4,
        gt=0,
        lt=1,
        description="where the candidates are compared, as a fraction of training",
    )
    track: Literal["none", "wandb", "tensorboard"] = Field(
        default="none",
        description="also send metrics, figures and the summary to an experiment tracker "
        "(the run directory stays the record; resume continues the same tracked run)",
    )
    track_project: str = Field(
        default="spdkit", min_length=1, description="W&B project of tracked runs"
    )
