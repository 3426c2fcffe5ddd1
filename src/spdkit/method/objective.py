"""The objective a run trains: SPD's step (`spdkit.method.step`, the default) or, for a config
with an `apd` section, APD's (`spdkit.method.apd_step`). The trainer, the evaluation and the
memory plan call `step_losses` and show `loss_terms`, so they run either method."""

from __future__ import annotations

from torch import Tensor

from spdkit.config import SPDConfig
from spdkit.engine.distributed import SINGLE, Parallel
from spdkit.engine.random_stream import MaskStream
from spdkit.method.adversary import PGDState
from spdkit.method.apd_step import APD_LOSS_TERMS, apd_losses
from spdkit.method.model import ComponentModel
from spdkit.method.step import LOSS_TERMS, StepResult, spd_losses


def step_losses(
    model: ComponentModel,
    x: Tensor,
    config: SPDConfig,
    stream: MaskStream,
    step: int = 0,
    pgd: PGDState | None = None,
    parallel: Parallel = SINGLE,
) -> StepResult:
    """One step's loss terms (and, with gradients enabled, their backward) by the config's
    method. APD draws no random masks: `stream`, `step` and `pgd` are SPD's."""
    if config.apd is not None:
        return apd_losses(model, x, config, parallel)
    return spd_losses(model, x, config, stream, step, pgd, parallel)


def loss_terms(config: SPDConfig) -> tuple[str, ...]:
    """The names of the method's loss terms, in the order they are shown."""
    return APD_LOSS_TERMS if config.apd is not None else LOSS_TERMS
