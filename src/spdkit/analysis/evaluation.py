"""The end-of-run evaluation: summary.json (losses, L0, norms, alive counts, the LM CE / KL
report, and what the target kind adds: `TargetKind.report`, e.g. the TMS feature match or
the residual-MLP verdict) and figures/."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from spdkit.analysis import plots
from spdkit.analysis.decomposed import Decomposed
from spdkit.analysis.lm import lm_mask_evaluation, most_used_contexts
from spdkit.analysis.metrics import identity_check, mean_l0, output_losses
from spdkit.config import SPDConfig
from spdkit.engine.malloc import release_free_memory
from spdkit.engine.random_stream import MaskStream
from spdkit.method.losses import DIVERGENCES
from spdkit.method.measures import (
    causal_importance,
    chunks,
    non_negligible,
    one_hot_inputs,
    piece_norms,
    subcomponent_norms,
    weighted_sum,
)
from spdkit.method.model import ComponentModel
from spdkit.method.objective import loss_terms, step_losses
from spdkit.progress import progress_bar
from spdkit.store import runs
from spdkit.targets import eval_data_source, reports_lm, target_kind


def evaluate(
    decomp: Decomposed,
    run_dir: Path,
    timing: dict[str, Any] | None = None,
    out_dir: Path | None = None,
    partial: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """All end-of-run metrics into summary.json, and the figures into figures/, both in
    `out_dir` (default: the run directory). `partial` marks the evaluation of an unfinished
    run (its step); firing counts are then left out, as they cover only the last 10 % of
    training."""
    out_dir = run_dir if out_dir is None else out_dir
    config, model = decomp.config, decomp.model
    release_free_memory()  # what training kept for reuse: the evaluation's shapes differ
    device = next(model.parameters()).device
    ev = config.eval
    gen = torch.Generator(device=device).manual_seed(config.seed + 3000)
    x = eval_data_source(config, decomp.data).sample(ev.n_eval_samples, gen)
    step = partial["step"] if partial else config.training.steps  # the annealed p of that step
    bar = progress_bar(len(chunks(x, ev.batch_size)) + 2, "eval losses", progress)
    final_losses, ci_data, outputs = measure_batch(model, config, x, step, lambda: bar.update(1))
    bar.close()
    summary: dict[str, Any] = {
        "final_losses": final_losses,
        "output_losses": outputs,
        "mean_ci_l0": mean_l0(ci_data, ev.ci_threshold),
        "modules": {},
    }
    if model.delta:  # Δ = W − U V is a component: the masked model at m = 1 (Δ on) is the target
        summary["delta"] = True
    ci_onehot = None  # toy targets with input features: CI of each feature alone
    if hasattr(config.target, "n_features"):
        onehot = one_hot_inputs(config.target.n_features, ev.one_hot_value, device)
        ci_onehot = causal_importance(model, onehot)
    firing = None if partial else runs.read_firing(run_dir)
    for name in model.module_names:
        U, V = decomp.subcomponents(name)
        norms = subcomponent_norms(U, V)
        live = non_negligible(norms, ev.norm_threshold)
        W = model.target_weight(name).detach()
        summary["modules"][name] = {
            "C": U.shape[1],
            # ‖W − U V‖_F / ‖W‖_F: near 0 once the components sum to the target's matrix
            "weight_error": round(((W - U @ V).norm() / W.norm().clamp_min(1e-30)).item(), 5),
            "n_non_negligible": int(live.sum()),
            "norms_sorted": [round(v, 5) for v in norms.sort(descending=True).values.tolist()],
        }
        if ci_onehot is not None:
            active = int((ci_onehot[name].max(0).values > ev.ci_threshold).sum())
            summary["modules"][name]["n_active_on_one_hot"] = active
        if firing is not None and name in firing[0]:
            counts, positions = firing[0][name], firing[1]
            alive = counts > 0
            freq = (counts.float() / max(1, positions)).sort(descending=True).values
            summary["modules"][name].update(
                {
                    "n_alive": int(alive.sum()),
                    "n_dead": int((~alive).sum()),
                    "firing_frequency_sorted": [round(v, 6) for v in freq.tolist()],
                }
            )
    if model.apd is not None:
        summary["apd"] = apd_summary(model, ci_data, ev.norm_threshold)
    if model.identity_modules:
        summary["identity_check"] = {
            name: identity_check(
                ci_data[name],
                subcomponent_norms(*decomp.subcomponents(name)),
                d,
                ev.ci_threshold,
                ev.norm_threshold,
            )
            for name, d in model.identity_modules.items()
        }
    fig_dir = out_dir / "figures"
    if reports_lm(config.target):
        release_free_memory()  # the losses' freed blocks fit the report's tensors badly
        summary.update(lm_report(decomp, fig_dir, progress))
    if config.target is not None and target_kind(config.target).report is not None:
        summary.update(target_kind(config.target).report(model, config, ci_onehot, fig_dir))
    if ci_onehot is not None:
        summary["ci_one_hot"] = {
            "input_value": ev.one_hot_value,
            "ci": {
                n: [[round(v, 4) for v in row] for row in g.tolist()] for n, g in ci_onehot.items()
            },
        }
    if timing:
        summary["timing"] = timing
    if partial:
        summary["partial"] = partial
    runs.write_summary(out_dir, summary)
    draw_figures(decomp, run_dir, ci_onehot, ci_data, out_dir / "figures")
    return summary


def apd_summary(
    model: ComponentModel, ci_data: dict[str, Tensor], norm_threshold: float
) -> dict[str, Any]:
    """An APD run counted in its own units, parameter components (the per-module lines count
    the rank-one pieces that store them): C, each module's rank, the components with a
    non-negligible matrix per module, and the mean number selected per input."""
    first = model.module_names[0]
    selected = ci_data[first].reshape(-1, ci_data[first].shape[-1])[:, :: model.apd_ranks[first]]
    return {
        "C": model.components(first).C // model.apd_ranks[first],
        "ranks": dict(model.apd_ranks),
        "n_non_negligible": {
            n: int(non_negligible(piece_norms(model, n), norm_threshold).sum())
            for n in model.apd_ranks
        },
        "mean_selected": round(float(selected.sum(-1).mean()), 4),
    }


def measure_batch(
    model: ComponentModel,
    config: SPDConfig,
    x: Tensor,
    step: int,
    tick: Callable[[], object] = lambda: None,
) -> tuple[dict[str, float], dict[str, Tensor], dict[str, float]]:
    """The evaluation's work on its batch x, in chunks of `eval.batch_size`: the loss terms
    (as in training, without gradients), CI per module [n, ..., C], and the output losses
    under CI, all-ones and all-zero masks. `spdkit plan` measures this same call."""
    chunk = config.eval.batch_size
    final_losses = evaluation_losses(model, x, config, step, on_chunk=tick)
    ci = causal_importance(model, x, chunk=chunk)
    tick()
    outputs = output_losses(model, x, DIVERGENCES[config.loss.output_loss], chunk)
    tick()
    return final_losses, ci, outputs


def evaluation_losses(
    model: ComponentModel,
    x: Tensor,
    config: SPDConfig,
    step: int,
    on_chunk: Callable[[], object] | None = None,
) -> dict[str, float]:
    """The training loss terms on the evaluation batch x [n, ...], in chunks of
    `eval.batch_size`, weighted by chunk size. One mask stream (seed + 3000) for the whole
    batch: each chunk draws its own random numbers, so the result does not depend on how the
    batch is chunked beyond which counter each sample's r comes from."""
    stream = MaskStream(config.seed + 3000)
    losses = []
    for share, piece in chunks(x, config.eval.batch_size):
        with torch.no_grad():
            terms = step_losses(model, piece, config, stream, step).terms
        losses.append(
            (share, {k: terms[k].item() for k in ("total", *loss_terms(config)) if k in terms})
        )
        if on_chunk is not None:
            on_chunk()
    return weighted_sum(losses)


def lm_report(decomp: Decomposed, fig_dir: Path, progress: bool = False) -> dict[str, Any]:
    """Language-model targets: CE / KL under each kind of mask, CE gap recovered, and the
    contexts of each module's most used subcomponents."""
    config, model = decomp.config, decomp.model
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(config.seed + 4000)
    ids = eval_data_source(config, decomp.data).sample(config.eval.n_eval_samples, gen)
    out: dict[str, Any] = {"lm": lm_mask_evaluation(model, ids, config.eval, gen, progress)}
    decoder = target_kind(config.target).decoder
    decode = decoder(config.target) if decoder is not None else None
    if decode is not None:
        ci = causal_importance(model, ids, chunk=config.eval.batch_size)
        threshold = config.eval.ci_threshold
        table = {
            name: most_used_contexts(ci[name].cpu(), ids.cpu(), decode, threshold) for name in ci
        }
        out["lm"]["top_contexts"] = table
        plots.plot_top_contexts(table, fig_dir / "top_contexts.png")
    return out


def draw_figures(
    decomp: Decomposed, run_dir: Path, ci_onehot: dict | None, ci_data: dict, fig_dir: Path
) -> None:
    """The figures into fig_dir; the training curves from run_dir's metrics.jsonl."""
    config, model = decomp.config, decomp.model
    ev = config.eval
    records = runs.read_metrics(run_dir)
    plots.plot_losses(records, fig_dir / "losses.png", ["total", *loss_terms(config)])
    plots.plot_l0_over_training(records, fig_dir / "l0.png")
    plots.plot_ci_histograms(ci_data, fig_dir / "ci_histograms.png")
    if ci_onehot is not None:
        paired = config.target is not None and target_kind(config.target).one_hot_all_columns
        plots.plot_ci_heatmaps(
            ci_onehot,
            fig_dir / "ci_one_hot.png",
            ev.ci_threshold,
            f"input feature (value {ev.one_hot_value})",
            # residual MLPs: all C columns as in the paper, W_in | W_out side by side per layer
            show_all=paired,
            ncols=2 if paired else None,
        )
    for name in model.module_names:
        U, V = decomp.subcomponents(name)
        W = model.target_weight(name)
        n_live = int(non_negligible(subcomponent_norms(U, V), ev.norm_threshold).sum())
        safe = name.replace(".", "_")
        if W.shape[0] == W.shape[1] and W.shape[0] <= 64:
            plots.plot_matrix_decomposition(
                W, U, V, fig_dir / f"matrix_{safe}.png", n_show=min(n_live + 1, 6), title=name
            )
