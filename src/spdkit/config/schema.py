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
    apd            set: the run is APD (the baseline), not SPD (`spdkit.method.apd`)

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
from spdkit.config.objective import APDConfig, ImportanceConfig, LossConfig, PGDConfig
from spdkit.config.sections import (
    ComponentsConfig,
    EngineConfig,
    EvalConfig,
    IdentitySpec,
    ModuleSpec,
)
from spdkit.config.targets import TargetConfig
from spdkit.config.training import TrainingConfig

# the SPD terms an APD run leaves off (its own terms are in `apd`)
APD_LOSS_DEFAULTS: dict[str, float] = {
    "stochastic_recon_coeff": 0.0,
    "stochastic_recon_layerwise_coeff": 0.0,
    "stochastic_recon_subset_coeff": 0.0,
    "adversarial_recon_coeff": 0.0,
    "importance_minimality_coeff": 0.0,
    "frequency_minimality_coeff": 0.0,
}


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
    apd: APDConfig | None = Field(
        default=None,
        description="decompose with APD (the baseline of the APD paper) instead of SPD",
    )

    @model_validator(mode="before")
    @classmethod
    def _flat_keys(cls, data: Any) -> Any:
        """The flat layout of spdkit ≤ 0.1: old run directories and configs still load."""
        data = group_flat_keys(data)
        if isinstance(data, dict) and data.get("apd") is not None:
            # APD has no importance penalty: the section is not asked for
            data.setdefault("importance", {"pnorm": 1.0})
            data.setdefault("loss", {})
            if isinstance(data["loss"], dict):
                data["loss"] = {**APD_LOSS_DEFAULTS, **data["loss"]}
        return data

    @model_validator(mode="after")
    def _apd_is_apd(self) -> SPDConfig:
        """APD's objective is faithfulness + minimality + simplicity: no SPD term may be on,
        and every module has the same C (a component spans all decomposed modules)."""
        if self.apd is None:
            return self
        on = [k for k in APD_LOSS_DEFAULTS if getattr(self.loss, k) != 0]
        if on:
            raise ValueError(f"apd: SPD loss terms must be 0 in an APD run, got {on} on")
        Cs = sorted({m.C for m in self.modules})
        if len(Cs) > 1:
            raise ValueError(f"apd: every module needs the same C (one P_c spans all), got {Cs}")
        if self.components.delta:
            raise ValueError("apd: components.delta is SPD-only")
        return self

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
