"""The SPD training loss written plainly, as the paper's pseudocode reads: the yardstick.

`spd_losses` (train.py) computes the same loss with every shortcut spdkit has: fused C++ kernels
for the CI MLPs and the masks, the first module's inner activations shared between passes,
layerwise passes that return recorded target outputs upstream of the masked module, memoised
embeddings. This module has none of them: each masked forward runs the whole target from its
input with forward hooks that replace a module's output by its masked components, the CI MLPs
materialise their [..., C, d_gate] hidden layer, and every loss is its formula. Each forward gets its own copy of the batch, so a target that
memoises work on its input (the residual MLPs' embedding) recomputes it.

It exists for two jobs: tests/test_reference.py checks that `spd_losses` gives the same loss
terms and gradients (same batch, same random numbers), and `benchmarks/bench_step.py
--reference` times it as the plain eager step the fast one is measured against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from spdkit.config import SPDConfig
from spdkit.masks import MaskStream, uniform
from spdkit.model import ComponentModel, model_output


@contextlib.contextmanager
def _replaced_by_components(model: ComponentModel, masks: Mapping[str, Tensor]) -> Iterator[None]:
    """While open, each module named in `masks` computes ((a Vᵀ) ⊙ m) Uᵀ (+ b) from its input a
    instead of its original weights (an instance-level `forward`); every other module runs its
    original weights."""

    def masked_forward(name: str):
        comps, mask = model.components(name), masks[name]
        return lambda a: comps.outer(comps.inner(a) * mask)

    for n in masks:
        model.decomposed[n].forward = masked_forward(n)
    try:
        yield
    finally:
        for n in masks:
            del model.decomposed[n].forward


def _inputs_of_decomposed_modules(model: ComponentModel, x: Tensor) -> tuple[Tensor, dict]:
    """The target's output and the input a^l of each decomposed module, by forward hooks."""
    inputs: dict[str, Tensor] = {}
    handles = [
        model.decomposed[n].register_forward_hook(
            lambda _m, args, _out, n=n: inputs.__setitem__(n, args[0])
        )
        for n in model.module_names
    ]
    try:
        with torch.no_grad():
            y = model_output(model.target(x.clone()))
    finally:
        for handle in handles:
            handle.remove()
    return y, inputs


def _divergence(kind: str, y_masked: Tensor, y_target: Tensor) -> Tensor:
    if kind == "mse":
        return ((y_masked - y_target) ** 2).mean()
    p_target = F.softmax(y_target, dim=-1)
    kl = p_target * (F.log_softmax(y_target, dim=-1) - F.log_softmax(y_masked, dim=-1))
    return kl.sum(-1).mean()


def reference_spd_losses(
    model: ComponentModel, x: Tensor, config: SPDConfig, mask_stream: MaskStream
) -> dict[str, Tensor]:
    """Every SPD loss term and "total" for batch x, drawing r from `mask_stream` in the order
    `spd_losses` does (per mask sample, one draw per module in `model.module_names` order)."""
    names = model.module_names
    y_target, inputs = _inputs_of_decomposed_modules(model, x)
    terms: dict[str, Tensor] = {}

    # 1. faithfulness: (1/N) Σ_l ‖W^l − U^l V^l‖²
    sq = sum(((model.target_weight(n) - model.components(n).weight()) ** 2).sum() for n in names)
    terms["faithfulness"] = sq / sum(model.target_weight(n).numel() for n in names)

    # 2. causal importances: γ_c(h_c) = w_out_c · GELU(w_in_c h_c + b_in_c) + b_out_c
    g_lower, g_upper = {}, {}
    for n in names:
        h = model.components(n).inner(inputs[n])  # [..., C]
        ci = model.ci_fn(n)
        hidden = F.gelu(h.unsqueeze(-1) * ci.w_in + ci.b_in)  # [..., C, d_gate]
        raw = (hidden * ci.w_out).sum(-1) + ci.b_out
        g_lower[n] = torch.where(raw <= 0, 0.01 * raw, torch.clamp(raw, max=1.0))
        g_upper[n] = torch.where(raw >= 1, 1 + 0.01 * (raw - 1), torch.clamp(raw, min=0.0))

    # 3. importance minimality: Σ_l Σ_c (g⁺)^p, averaged over the batch
    terms["importance_minimality"] = sum((g**config.pnorm).sum(-1).mean() for g in g_upper.values())

    # 4. S stochastic masks m = g + (1 − g) r; all modules masked, then each one alone
    full, layerwise = [], []
    for _ in range(config.n_mask_samples):
        masks = {}
        for n in names:
            g = g_lower[n]
            r = uniform(g.numel(), mask_stream.key, mask_stream.offset, g.device).view(g.shape)
            mask_stream.offset += g.numel()
            masks[n] = g + (1 - g) * r
        with _replaced_by_components(model, masks):
            full.append(model_output(model.target(x.clone())))
        for n in names:
            with _replaced_by_components(model, {n: masks[n]}):
                layerwise.append(model_output(model.target(x.clone())))

    div = config.output_loss
    terms["stochastic_recon"] = sum(_divergence(div, y, y_target) for y in full) / len(full)
    terms["stochastic_recon_layerwise"] = sum(
        _divergence(div, y, y_target) for y in layerwise
    ) / len(layerwise)
    terms["total"] = (
        config.faithfulness_coeff * terms["faithfulness"]
        + config.stochastic_recon_coeff * terms["stochastic_recon"]
        + config.stochastic_recon_layerwise_coeff * terms["stochastic_recon_layerwise"]
        + config.importance_minimality_coeff * terms["importance_minimality"]
    )
    return terms
