"""The training objective: the loss terms and their coefficients (`loss`), the importance
penalty (`importance`), subset routing and the adversary (VPD notes §2-§5). The formulas are
in `spdkit.method.losses`, `spdkit.method.routing` and `spdkit.method.adversary`; every term
beyond the paper's is off by default, which is the paper's method."""

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


class LossConfig(StrictModel):
    """The loss terms of one step and their weights (the paper's β, VPD's additions)."""

    faithfulness_coeff: float = Field(default=1.0, ge=0, description="weight of L_faithfulness")
    stochastic_recon_coeff: float = Field(
        default=1.0, ge=0, description="weight of L_stochastic-recon (β1)"
    )
    stochastic_recon_layerwise_coeff: float = Field(
        default=1.0, ge=0, description="weight of L_stochastic-recon-layerwise (β2)"
    )
    stochastic_recon_subset_coeff: float = Field(
        default=0.0,
        ge=0,
        description="weight of L_stochastic-recon-subset: masks a random subset of modules per "
        "position, the others run their original weights (VPD notes §2.2)",
    )
    adversarial_recon_coeff: float = Field(
        default=0.0,
        ge=0,
        description="weight of L_adversarial: D under masks whose sources were chosen by "
        "gradient ascent to maximise it (VPD notes §2.3; settings in `adversary`)",
    )
    importance_minimality_coeff: float = Field(
        ge=0, description="weight of L_importance-minimality (β3)"
    )
    frequency_minimality_coeff: float = Field(
        default=0.0,
        ge=0,
        description="weight of L_frequency: (1/BT) Σ_c s_c log2(1 + s_c), s_c = Σ_bt of the "
        "penalty (VPD notes §2.5)",
    )
    frequency_reference_count: int | None = Field(
        default=None,
        ge=1,
        description="L_frequency's count taken at this many positions: log2(1 + s·N/BT) "
        "(None: the absolute count, VPD's paper; its later configs add a reference count)",
    )
    n_mask_samples: int = Field(default=1, ge=1, description="mask samples per step (S)")
    output_loss: Literal["mse", "kl"] = Field(
        default="mse", description="divergence D between masked and target outputs"
    )
    subset_routing: SubsetRoutingConfig = Field(
        default_factory=lambda: SubsetRoutingConfig(),
        description="how the subset term picks the masked modules",
    )


class ImportanceConfig(StrictModel):
    """The per-CI penalty that importance (and frequency) minimality sum: |g⁺|^p, p annealed
    or fixed, or a smooth L0."""

    pnorm: float = Field(gt=0, description="p of the importance-minimality loss")
    pnorm_anneal: PAnnealConfig | None = Field(
        default=None, description="anneal p of the importance penalty (None: p fixed)"
    )
    penalty: Literal["lp", "smooth_l0"] = Field(
        default="lp",
        description="per-CI penalty: lp = |g⁺|^p (the paper's); smooth_l0 = 1 − exp(−g⁺/σ), "
        "a saturating L0 stand-in with a finite gradient at 0 (spdkit.method.losses)",
    )
    smooth_l0_scale: float = Field(
        default=0.1, gt=0, description="σ of the smooth_l0 penalty (CI ≫ σ costs about 1)"
    )
    warmup_frac: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="the minimality coefficients (importance and frequency) ramp linearly from "
        "0 over this fraction of training (0: full from the first step, the paper's)",
    )


class APDConfig(StrictModel):
    """Attribution-based Parameter Decomposition (APD paper §2, appendix "Practical loss: Top-k
    formulation"), the baseline spdkit compares SPD with. Each of a module spec's C components
    is one parameter component P_c spanning every decomposed module, P_{c,l} = U_{c,l} V_{c,l}
    of rank `rank`; the inputs' top-k components by gradient attribution run the sparse pass."""

    rank: int | None = Field(
        default=None,
        ge=1,
        description="rank of each component's matrix in each module (None: full, "
        "min(d_in, d_out), the paper's)",
    )
    top_k: float = Field(
        gt=0,
        description="active components per input: batch top-k keeps top_k × batch of the "
        "batch's (input, component) attributions; per-input top-k keeps top_k (an integer)",
    )
    batch_top_k: bool = Field(
        default=True, description="select over the whole batch (the paper's experiments)"
    )
    minimality_coeff: float = Field(
        default=1.0, ge=0, description="β: weight of L_minimality, D(f(x|κ(x)), f(x|θ*))"
    )
    simplicity_coeff: float = Field(
        ge=0, description="α: weight of L_simplicity, the active components' Schatten-p norms"
    )
    schatten_p: float = Field(
        default=1.0, gt=0, le=1, description="p of the Schatten norm (p ≤ 1 favours low rank)"
    )
    hidden_recon_coeff: float = Field(
        default=0.0,
        ge=0,
        description="weight of the hidden-activation term of L_minimality: the sparse pass's "
        "outputs of `hidden_recon_modules` (after ReLU) against the target's (the paper's "
        "residual MLPs: 1)",
    )
    hidden_recon_modules: list[str] = Field(
        default_factory=list,
        description="glob patterns of decomposed modules whose ReLU'd outputs the hidden term "
        "matches (the residual MLPs: layers.*.mlp_in)",
    )
    attributions_from: Literal["target", "components"] = Field(
        default="target",
        description="whose gradients the attributions use: the target's (the paper's), or the "
        "sum of the components' (the paper's adjustment for TMS 5-2)",
    )

    @model_validator(mode="after")
    def _integer_top_k(self) -> APDConfig:
        if not self.batch_top_k and not float(self.top_k).is_integer():
            raise ValueError(f"apd.top_k must be an integer without batch_top_k, got {self.top_k}")
        if self.hidden_recon_coeff > 0 and not self.hidden_recon_modules:
            raise ValueError("apd.hidden_recon_coeff > 0 needs apd.hidden_recon_modules")
        return self
