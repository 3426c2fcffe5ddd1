"""The whole run's configuration, `SPDConfig`: one section per concern.

    seed, target, modules, insert_identity    what is decomposed
    components     U, V: init, the Δ-component
    ci_fn          the causal-importance function (kind, its settings, the lower sigmoid)
    loss           the loss terms and their coefficients, mask samples, D, subset routing
    importance     the penalty the minimality terms sum (p, its anneal, smooth L0)
    adversary      the PGD adversary of the adversarial term
    engine         how a step is computed (exact shortcuts, masked-pass precision)
    training       steps, batch, optimiser, clipping, the faithfulness warm-up, checkpoints
    eval           the end-of-run evaluation

Every model forbids unknown keys, so a misspelt field is an error that names it instead of a
setting silently dropped. Field names follow the papers' words; the symbol is in each field's
description. The flat layout of spdkit ≤ 0.1 is still read (`spdkit.config.legacy`).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from spdkit.config.base import StrictModel
from spdkit.config.ci import CIFnConfig, MLPCIConfig
from spdkit.config.legacy import group_flat_keys
from spdkit.config.objective import ImportanceConfig, LossConfig, PGDConfig
from spdkit.config.sections import (
    ComponentsConfig,
    EngineConfig,
    EvalConfig,
    IdentitySpec,
    ModuleSpec,
)
from spdkit.config.targets import TargetConfig
from spdkit.config.training import TrainingConfig


class SPDConfig(StrictModel):
    """One decomposition run: target, what to decompose, the SPD losses, optimisation."""

    seed: int = Field(default=0, ge=0, description="fixes target training, init, data and masks")
    target: TargetConfig | None = Field(
        default=None, description="bundled toy target to train or load (None for your own model)"
    )
    modules: list[ModuleSpec] = Field(min_length=1, description="modules to decompose")
    insert_identity: list[IdentitySpec] = Field(
        default_factory=list,
        description="identities inserted before matched modules and decomposed too (a check)",
    )
    components: ComponentsConfig = Field(default_factory=lambda: ComponentsConfig())
    ci_fn: CIFnConfig = Field(
        default_factory=lambda: MLPCIConfig(),
        description="the causal-importance function: mlp (the paper's), vector_mlp, "
        "global_mlp, global_transformer",
    )
    loss: LossConfig
    importance: ImportanceConfig
    adversary: PGDConfig = Field(default_factory=lambda: PGDConfig())
    engine: EngineConfig = Field(default_factory=lambda: EngineConfig())
    training: TrainingConfig
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="before")
    @classmethod
    def _flat_keys(cls, data: Any) -> Any:
        """The flat layout of spdkit ≤ 0.1: old run directories and configs still load."""
        return group_flat_keys(data)

    @model_validator(mode="after")
    def _output_loss_fits_output(self) -> SPDConfig:
        output = getattr(self.target, "output", None)
        if output not in (None, "logits") and self.loss.output_loss == "kl":
            raise ValueError(
                f"loss.output_loss kl compares logits, but target.output is {output!r}: "
                "use output_loss: mse"
            )
        return self

    @model_validator(mode="after")
    def _unique_patterns(self) -> SPDConfig:
        patterns = [m.pattern for m in self.modules]
        dupes = sorted({p for p in patterns if patterns.count(p) > 1})
        if dupes:
            raise ValueError(f"modules: pattern(s) listed twice: {dupes}")
        return self
