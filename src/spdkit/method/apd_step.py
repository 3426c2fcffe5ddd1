"""One APD training step (`apd_paper.md` appendix, "Full set of loss functions in the top-k
formulation"), the baseline's counterpart of `spdkit.method.step.spd_losses`:

    record = model.record(x)                           no grad: f(x|θ*), each module's input
    A      = gradient attributions of the components   (target's or components' gradients)
    s      = top-k(A)                                   batch top-k; no gradient
    L_faithfulness = (1/N) Σ_l ‖W_l − Σ_c P_{c,l}‖²
    L_minimality   = D(f(x | Σ_c s_c P_c), f(x|θ*))     one sparse pass
    L_simplicity   = Schatten-p of the selected components
    L_hidden       = the sparse pass's hidden activations against the target's (optional)
    total = L_faithfulness + β L_minimality + α L_simplicity + γ L_hidden

The formulas are in `spdkit.method.apd`.
"""

from __future__ import annotations

import fnmatch

from torch import Tensor

from spdkit.config import SPDConfig
from spdkit.engine.distributed import SINGLE, Parallel
from spdkit.engine.per_pass import StepLoss
from spdkit.method.apd import hidden_recon_loss, outputs_of, repeat_per_rank, schatten_penalty
from spdkit.method.losses import DIVERGENCES, faithfulness_loss
from spdkit.method.model import ComponentModel
from spdkit.method.step import StepResult, share_of_global

APD_LOSS_TERMS = ("faithfulness", "apd_minimality", "apd_simplicity", "apd_hidden")


def apd_losses(
    model: ComponentModel, x: Tensor, config: SPDConfig, parallel: Parallel = SINGLE
) -> StepResult:
    """Every APD loss term of one step on batch x (detached, "total" included) and the
    selection as masks per module; with gradients enabled, ∂total/∂θ accumulated into .grad.
    Data-parallel: the top-k runs over this rank's shard (each rank a batch of its own)."""
    apd = config.apd
    if apd is None:
        raise ValueError("apd_losses needs a config with an `apd` section")
    divergence = DIVERGENCES[config.loss.output_loss]
    names = model.module_names
    share = share_of_global(parallel)
    coeffs = {
        "faithfulness": config.loss.faithfulness_coeff,
        "apd_minimality": apd.minimality_coeff,
        "apd_simplicity": apd.simplicity_coeff,
        "apd_hidden": apd.hidden_recon_coeff,
    }
    loss = StepLoss(coeffs, per_pass=False)
    hidden = {
        n: model.target.get_submodule(n)
        for n in names
        if apd.hidden_recon_coeff > 0
        and any(fnmatch.fnmatchcase(n, p) for p in apd.hidden_recon_modules)
    }

    if apd.hidden_recon_coeff > 0 and not hidden:
        raise ValueError(
            f"apd.hidden_recon_modules {apd.hidden_recon_modules} match no decomposed module "
            f"(decomposed: {names})"
        )
    with outputs_of(hidden) as target_hidden:
        record = model.record(x)
    y_target = divergence.prepare(record.output)
    target_weights = [model.target_weight(n) for n in names]
    faithfulness = faithfulness_loss(target_weights, [model.components(n).weight() for n in names])
    s = model.apd_selection(x).to(record.output.dtype)  # [B, C]
    masks = {n: repeat_per_rank(s, model.apd_ranks[n]) for n in names}
    with outputs_of(hidden) as sparse_hidden:
        y = model.masked_forward(x, masks, record)
    loss.add("apd_minimality", share(divergence.compare(y, y_target)))
    if hidden:
        loss.add("apd_hidden", share(hidden_recon_loss(sparse_hidden, target_hidden)))
    pieces = {n: (model.components(n), model.apd_ranks[n]) for n in names}
    n_params = sum(w.numel() for w in target_weights)
    simplicity = schatten_penalty(pieces, s, apd.schatten_p, n_params)
    terms = loss.finish(faithfulness=share(faithfulness), apd_simplicity=share(simplicity))
    return StepResult(terms, {n: m.detach() for n, m in masks.items()}, None)
