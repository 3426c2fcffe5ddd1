"""One SPD training step: the paper's pseudocode (appendix), plus VPD's subset term.

    record   = model.record(x)                       no grad: f(x|W), each module's input a^l
    h^l      = a^l Vˡᵀ                                inner activations
    g, g⁺    = σ_H,lower/upper(Γ(h))                 causal importances
    for s in 1..S:
        m^l  = g^l + (1 − g^l) ⊙ r,  r ~ U(0, 1)        (+ m_Δ = r for the Δ-component)
        L_stochastic-recon           += D(f(x | all modules masked), f(x|W)) / S
        L_stochastic-recon-layerwise += Σ_l D(f(x | module l masked), f(x|W)) / (S L)
        L_stochastic-recon-subset    += D(f(x | a routed subset masked), f(x|W)) / S
    L_adversarial = D(f(x | m = g + (1 − g) ⊙ s*), f(x|W)),  s* = PGD ascent on D    (VPD)
    L_importance-minimality = Σ_l mean_b Σ_c φ(g⁺),  φ = (g⁺)^p  (p annealed with the step)
    L_frequency-minimality  = Σ_l Σ_c s_c log2(1 + s_c) / BT,  s_c = Σ_bt φ(g⁺)    (VPD)
    L_faithfulness = Σ_l ‖W − UV‖² / N
    total = Σ coefficient × term

`StepLoss` holds the weighted terms and runs their backward: per pass by default, so a step's
memory is one masked pass plus the CI graph, whatever the number of passes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from spdkit.config import (
    ImportanceConfig,
    LossConfig,
    PGDConfig,
    SPDConfig,
    SubsetRoutingConfig,
)
from spdkit.engine.distributed import SINGLE, Parallel
from spdkit.engine.per_pass import StepLoss
from spdkit.engine.random_stream import MaskStream
from spdkit.method.adversary import (
    Ascent,
    PGDState,
    adversarial_masks,
    ascend,
    initial_sources,
    persistent_lr,
    source_shape,
)
from spdkit.method.forwards import split_delta_slot
from spdkit.method.losses import (
    DIVERGENCES,
    faithfulness_loss,
    frequency_minimality_loss,
    lp_penalty,
    minimality_loss,
    pnorm_at,
    smooth_l0_penalty,
)
from spdkit.method.model import ComponentModel
from spdkit.method.routing import subset_masks

LOSS_TERMS = (
    "faithfulness",
    "stochastic_recon",
    "stochastic_recon_layerwise",
    "stochastic_recon_subset",
    "adversarial_recon",
    "importance_minimality",
    "frequency_minimality",
)


class StepResult(NamedTuple):
    """What one step computes: every loss term (detached, "total" included), g per module
    (detached, for L0 and firing counts), and persistent PGD's state after the step (None
    without it)."""

    terms: dict[str, Tensor]
    ci_lower: dict[str, Tensor]
    pgd: PGDState | None = None


def loss_coefficients(loss: LossConfig, minimality_scale: float = 1.0) -> dict[str, float]:
    """Each term's coefficient; the minimality terms' times `minimality_scale` (their warm-up)."""
    return {
        "faithfulness": loss.faithfulness_coeff,
        "stochastic_recon": loss.stochastic_recon_coeff,
        "stochastic_recon_layerwise": loss.stochastic_recon_layerwise_coeff,
        "stochastic_recon_subset": loss.stochastic_recon_subset_coeff,
        "adversarial_recon": loss.adversarial_recon_coeff,
        "importance_minimality": loss.importance_minimality_coeff * minimality_scale,
        "frequency_minimality": loss.frequency_minimality_coeff * minimality_scale,
    }


def minimality_warmup(importance: ImportanceConfig, step: int, steps: int) -> float:
    """The minimality coefficients' factor at `step` (0-based): min(1, step / (warmup_frac ·
    steps)), 1 without a warm-up. While it is small, no subcomponent pays for being used, so
    none is pushed to zero norm before the reconstruction losses have sorted out which input
    needs which: a subcomponent at U = V = 0 gets no gradient and never comes back. A pure
    function of the step: resume exact."""
    if importance.warmup_frac == 0:
        return 1.0
    return min(1.0, step / (importance.warmup_frac * steps))


def current_pnorm(importance: ImportanceConfig, step: int, steps: int) -> float:
    """p of the importance penalty at `step`: `pnorm`, or its anneal (`pnorm_anneal`)."""
    a = importance.pnorm_anneal
    if a is None:
        return importance.pnorm
    return pnorm_at(step, steps, importance.pnorm, a.p_end, a.start_frac, a.end_frac)


def importance_penalties(
    ci_upper: Mapping[str, Tensor], importance: ImportanceConfig, p: float
) -> dict[str, Tensor]:
    """φ(g⁺) per module [..., C]: (g⁺)^p (the paper's) or the smooth-L0 penalty."""
    if importance.penalty == "smooth_l0":
        return {n: smooth_l0_penalty(g, importance.smooth_l0_scale) for n, g in ci_upper.items()}
    return {n: lp_penalty(g, p) for n, g in ci_upper.items()}


def spd_losses(
    model: ComponentModel,
    x: Tensor,
    config: SPDConfig,
    stream: MaskStream,
    step: int = 0,
    pgd: PGDState | None = None,
    parallel: Parallel = SINGLE,
) -> StepResult:
    """Every loss term of one step on batch x, detached ("total" included), g per module, and
    persistent PGD's next state. `step` (0-based) sets the annealed p; `pgd` is persistent
    PGD's state at the start of the step (None: the adversary starts afresh, or is off).

    Data-parallel (`parallel.active`): x is this rank's shard and every term is its share of
    the global term (`spdkit.engine.distributed`): the shares and their gradients sum over ranks to
    the global ones.

    With gradients enabled (training), ∂total/∂θ is accumulated into each trainable
    parameter's `.grad` on the way (zero them first). `stream` gives the masks' r and the
    routing draws: per mask sample, one draw per module in `model.module_names` order, then
    the subset term's routes.
    """
    divergence = DIVERGENCES[config.loss.output_loss]
    warm = minimality_warmup(config.importance, step, config.training.steps)
    coeffs = loss_coefficients(config.loss, warm)
    names = model.module_names
    loss = StepLoss(coeffs, per_pass=config.engine.per_pass_backward)

    share = share_of_global(parallel)

    record = model.record(x)
    y_target = divergence.prepare(record.output)
    faithfulness = faithfulness_loss(
        [model.target_weight(n) for n in names], [model.components(n).weight() for n in names]
    )
    inner = model.inner_acts(record.inputs)
    ci_lower, ci_upper = model.causal_importances(record.inputs, inner)
    p = current_pnorm(config.importance, step, config.training.steps)
    penalties = importance_penalties(ci_upper, config.importance, p)
    per_step = {
        "faithfulness": share(faithfulness),
        "importance_minimality": share(minimality_loss(list(penalties.values()))),
    }
    if config.loss.frequency_minimality_coeff > 0:
        frequency = frequency_minimality_loss(
            list(penalties.values()),
            parallel.sum_ if parallel.active else None,
            parallel.world,
            config.loss.frequency_reference_count,
        )  # the global value on every rank, with this rank's gradient
        per_step["frequency_minimality"] = _value_share(frequency, parallel.world)
    g, h = loss.cut(ci_lower), loss.cut(inner)  # what the masked passes differentiate

    def D(masks: Mapping[str, Tensor], routes: Mapping[str, Tensor] | None = None) -> Tensor:
        """D(f(x | W' on the modules in `masks`), f(x | W)): one masked pass. With the
        Δ-component, each mask's last slot is Δ's."""
        masks, delta = split_delta_slot(masks) if model.delta else (masks, None)
        with masked_pass_precision(config.engine.masked_pass_dtype, x.device):
            y = model.masked_forward(x, masks, record, inner=h, routes=routes, delta=delta)
        return share(divergence.compare(y.float(), y_target))

    S, L = config.loss.n_mask_samples, len(names)
    for _ in range(S):
        # m = g + (1 − g) ⊙ r; with the Δ-component, g_Δ ≡ 0: m_Δ = r
        masks = {n: stream.masks(with_delta_slot(g[n], model.delta)) for n in names}
        if coeffs["stochastic_recon"] > 0:
            loss.add("stochastic_recon", D(masks) / S)
        if coeffs["stochastic_recon_layerwise"] > 0:
            for n in names:
                loss.add("stochastic_recon_layerwise", D({n: masks[n]}) / (S * L))
        if coeffs["stochastic_recon_subset"] > 0:
            routed, routes = subset_masks(masks, config.loss.subset_routing, stream)
            # nothing routed anywhere: the pass is the target itself, D = 0
            d = D(routed, routes) if routed else record.output.new_zeros(())
            loss.add("stochastic_recon_subset", d / S)

    if coeffs["adversarial_recon"] > 0:
        gx = {n: with_delta_slot(g[n], model.delta) for n in names}
        adversary = config.adversary
        problems = adversarial_problems(gx, adversary.routing, config.loss.subset_routing, stream)
        for group, routes, weight in problems:
            d, pgd = adversarial_divergence(
                D, group, routes, adversary, stream, (step, config.training.steps), pgd, parallel
            )
            loss.add("adversarial_recon", d * weight)

    terms = loss.finish(**per_step)
    return StepResult(terms, {n: t.detach() for n, t in ci_lower.items()}, pgd)


def share_of_global(parallel: Parallel) -> Callable[[Tensor], Tensor]:
    """A rank's share of a term that is a mean over its shard (or the same on every rank):
    term / W, so that the shares of W equal shards sum to the global mean. Identity alone."""
    if not parallel.active:
        return lambda t: t
    return lambda t: t / parallel.world


def _value_share(term: Tensor, world: int) -> Tensor:
    """A term every rank computes in full (the global value, each with its own φ's gradient):
    value term / W, gradient unchanged, so values sum to the term and gradients to its own."""
    if world == 1:
        return term
    return term + (term / world - term).detach()


def adversarial_problems(
    g: Mapping[str, Tensor],
    routing: str,
    subset_routing: SubsetRoutingConfig,
    stream: MaskStream,
) -> list[tuple[dict[str, Tensor], dict[str, Tensor] | None, float]]:
    """The adversary's passes by `routing`, each (g of its masked modules, routes, weight):
    all modules at once; a routed subset (routes drawn like the subset term's); or each
    module alone with weight 1/L, like the layerwise term."""
    if routing == "all":
        return [(dict(g), None, 1.0)]
    if routing == "layerwise":
        return [({n: v}, None, 1.0 / len(g)) for n, v in g.items()]
    routed, routes = subset_masks(g, subset_routing, stream)
    return [(routed, routes, 1.0)] if routed else []


def adversarial_divergence(
    D: Callable[[Mapping[str, Tensor], Mapping[str, Tensor] | None], Tensor],
    g: Mapping[str, Tensor],
    routes: Mapping[str, Tensor] | None,
    pgd: PGDConfig,
    stream: MaskStream,
    progress: tuple[int, int],
    persistent: PGDState | None,
    parallel: Parallel = SINGLE,
) -> tuple[Tensor, PGDState | None]:
    """(D at adversarial masks m = g + (1 − g) ⊙ s*, persistent PGD's next state): s* after
    `adversary.n_steps` ascent steps on D with g held fixed, from fresh sources or from the
    persistent ones (whose next state holds s* and the ascent's moments); gradients of D reach
    U, V and the CI function, not s*. Sources shared by the batch (scope batch) ascend the
    global D: their gradients are summed over ranks. `progress` (step, steps) warms up the
    persistent ascent's step size."""
    device = next(iter(g.values())).device
    shapes = {n: source_shape(v, pgd.scope) for n, v in g.items()}
    per_sample = pgd.scope == "position"
    if persistent is not None:
        start = persistent.starting(shapes, pgd, stream, device)
        ascent = Ascent(pgd.optimizer, pgd.adam_betas, persistent.moments, persistent.t)
        lr = persistent_lr(pgd, *progress)
    else:
        start = initial_sources(shapes, pgd.init, stream, device, per_sample)
        ascent, lr = Ascent(pgd.optimizer, pgd.adam_betas), pgd.step_size
    fixed = {n: v.detach() for n, v in g.items()}
    reduce = parallel.sum_dict if parallel.active and not per_sample else None
    sources = ascend(
        lambda s: D(adversarial_masks(fixed, s), routes),
        start,
        pgd.n_steps,
        ascent,
        lr,
        reduce,
    )
    after = persistent.after(sources, ascent) if persistent is not None else None
    return D(adversarial_masks(g, sources), routes), after


def with_delta_slot(g: Tensor, delta: bool) -> Tensor:
    """g [..., C] → [..., C + 1] with the Δ-component's CI (≡ 0) last, when the model has
    one: its masks are then drawn (and attacked) with the others' in one draw."""
    if not delta:
        return g
    return torch.cat([g, g.new_zeros(*g.shape[:-1], 1)], dim=-1)


def masked_pass_precision(dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    """torch.autocast to bfloat16 for the masked passes when the config asks for it. The
    divergence is computed in float32 from the (autocast) output."""
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
