"""What the residual MLPs add to a decomposition's evaluation: the ground-truth verdict from CI
on one-hot inputs, the neuron contributions of the target against each feature's W_in
subcomponent (paper Figures 6-13), and the known mechanisms (one per feature: its W_in
subcomponent in every layer; one for all dense W_out subcomponents of all layers)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from spdkit.config import SPDConfig
from spdkit.figures import finish, new_figure
from spdkit.method.measures import (
    causal_importance,
    live_columns,
    one_hot_inputs,
    subcomponents,
)
from spdkit.method.model import ComponentModel


def neuron_contributions_target(W_E: Tensor, W_in: Tensor, W_out: Tensor) -> Tensor:
    """[n_features, d_mlp]: (W_U[i] W_out) ⊙ (W_in W_E[:, i]) for every feature i (paper
    "Toy Model of Compressed Computation"). Here W_E is [n_features, d_resid] (row i embeds
    feature i) and W_U = W_Eᵀ, W_in [d_mlp, d_resid], W_out [d_resid, d_mlp]."""
    return (W_E @ W_out) * (W_E @ W_in.T)


def neuron_contributions_subcomponents(
    W_E: Tensor, U_in: Tensor, V_in: Tensor, W_out_sum: Tensor, match: list[int]
) -> Tensor:
    """[n_features, d_mlp]: (W_U[i] Σ_c U_out V_out) ⊙ (U_in[:, m] V_in[m] W_E[:, i]) with
    m = match[i], the W_in subcomponent that carries feature i (its highest CI on the one-hot
    input). W_out enters as the sum of its subcomponents: it is one dense mechanism."""
    m = torch.tensor(match, dtype=torch.long)
    inner = (W_E * V_in[m]).sum(dim=1)  # [n_features]: V_in[m(i)] · W_E[i]
    w_in_part = U_in[:, m].T * inner[:, None]  # [n_features, d_mlp]
    return (W_E @ W_out_sum) * w_in_part


def pearson_and_slope(x: Tensor, y: Tensor) -> tuple[float, float]:
    """Pearson r and the least-squares slope of y on x (with intercept), over all entries."""
    x, y = x.flatten().double(), y.flatten().double()
    xc, yc = x - x.mean(), y - y.mean()
    r = (xc @ yc) / (xc.norm() * yc.norm()).clamp_min(1e-300)
    slope = (xc @ yc) / (xc @ xc).clamp_min(1e-300)
    return r.item(), slope.item()


@dataclass(frozen=True)
class ResidVerdictRules:
    """The ground-truth verdict for residual-MLP targets, stated as numbers (README §resid).

    W_in, per layer: every feature has exactly one subcomponent with CI > `on`, and that
    subcomponent has CI < `off` on every other feature (monosemantic).
    W_out, across layers: the subcomponents with CI > `dense_ci` on at least `dense_fraction`
    of the features form the dense rank-d_mlp mechanism; their number must equal the target's
    neurons in all layers ± `dense_tolerance`.
    Everything else is dead: CI < `off` on every feature.
    A feature with one piece that is not monosemantic fails in one of two ways, counted apart
    because they have different causes: a faint leak (the piece's CI on some other feature lies
    between `off` and `on`, what a global CI function's shared hidden layer leaves; a lower p
    late in training reduces it, docs/ground_truth.md) or a shared owner (CI above `on` on
    another feature too: two features in one piece).
    A subcomponent with negligible weight (‖U_c‖·‖V_c‖ below `eval.norm_threshold` of its
    module's largest, the TMS verdict's line) that is neither monosemantic nor dense counts as
    dead whatever its CI: masking it changes nothing, so the CI of such a spare piece (which
    VPD's p = 2 importance leaves just above `off` on a feature or two) says nothing about a
    mechanism. Monosemantic and dense are read from the CI alone (a dense W_out basis may have
    small pieces). Since 2026-12-07.
    """

    on: float = 0.5
    off: float = 0.1
    dense_ci: float = 0.1
    dense_fraction: float = 0.25
    dense_tolerance: int = 2


def resid_mlp_verdict(
    ci_in: dict[str, Tensor],
    ci_out: dict[str, Tensor],
    n_neurons: int,
    rules: ResidVerdictRules = ResidVerdictRules(),  # noqa: B008 (frozen dataclass)
    live: dict[str, Tensor] | None = None,
) -> dict:
    """Counts behind the verdict, from CI on one-hot inputs ([n_features, C] per module).
    `live` ([C] bool per module: non-negligible weight) only moves pieces that are neither
    monosemantic nor dense into `dead`; those two are read from the CI as it is."""

    def spare(name: str, C: int) -> Tensor:  # [C] bool: negligible weight
        return torch.zeros(C, dtype=torch.bool) if live is None else ~live[name].cpu()

    layers_in = {}
    all_mono = True
    for name, ci in ci_in.items():
        ci = ci.detach().float().cpu()
        on = ci > rules.on  # [n_features, C]
        per_feature = on.sum(dim=1)  # [n_features]
        owner = ci.argmax(dim=1)  # [n_features]
        mono, leak, shared = [], [], []
        for i in range(ci.shape[0]):
            others = torch.cat([ci[:i, owner[i]], ci[i + 1 :, owner[i]]])
            top_other = float(others.max()) if len(others) else 0.0
            alone = bool(per_feature[i] == 1)
            mono.append(alone and top_other < rules.off)
            leak.append(alone and rules.off <= top_other <= rules.on)
            shared.append(alone and top_other > rules.on)
        mono_owners = {int(owner[i]) for i in range(ci.shape[0]) if mono[i]}
        is_owner = torch.zeros(ci.shape[1], dtype=torch.bool)
        is_owner[list(mono_owners)] = True
        quiet = ci.max(dim=0).values < rules.off
        dead = int(((quiet | spare(name, ci.shape[1])) & ~is_owner).sum())
        other = ci.shape[1] - dead - len(mono_owners)
        layers_in[name] = {
            "features_with_exactly_one": int((per_feature == 1).sum()),
            "features_with_none": int((per_feature == 0).sum()),
            "features_with_several": int((per_feature > 1).sum()),
            "features_monosemantic": sum(mono),
            "features_faint_leak": sum(leak),
            "features_shared_owner": sum(shared),
            "subcomponents_dead": dead,
            "subcomponents_other": other,
        }
        all_mono &= sum(mono) == ci.shape[0] and other == 0
    n_dense = n_dead_out = n_other_out = 0
    for name, ci in ci_out.items():
        ci = ci.detach().float().cpu()
        frac = (ci > rules.dense_ci).float().mean(dim=0)  # [C]
        dense = frac >= rules.dense_fraction
        dead = (ci.max(dim=0).values < rules.off) | (spare(name, ci.shape[1]) & ~dense)
        n_dense += int(dense.sum())
        n_dead_out += int(dead.sum())
        n_other_out += int((~dense & ~dead).sum())
    dense_ok = abs(n_dense - n_neurons) <= rules.dense_tolerance
    return {
        "rules": {**rules.__dict__, "negligible_weight_is_dead": live is not None},
        "w_in": layers_in,
        "w_out": {
            "dense": n_dense,
            "expected_dense": n_neurons,
            "dead": n_dead_out,
            "other": n_other_out,
        },
        "ground_truth": bool(all_mono and dense_ok and n_other_out == 0),
    }


def report(
    model: ComponentModel, config: SPDConfig, ci_onehot: dict[str, Tensor] | None, fig_dir: Path
) -> dict[str, Any]:
    """summary.json's `resid_mlp`: the verdict, and the neuron contributions' Pearson r and
    slope with their two figures when a layer's W_in and W_out are both decomposed."""
    assert ci_onehot is not None, "a residual MLP has input features: CI on one-hot inputs"
    target_cfg = config.target
    names_in = [n for n in model.module_names if n.endswith("mlp_in")]
    names_out = [n for n in model.module_names if n.endswith("mlp_out")]
    verdict = resid_mlp_verdict(
        {n: ci_onehot[n] for n in names_in},
        {n: ci_onehot[n] for n in names_out},
        n_neurons=target_cfg.n_layers * target_cfg.d_mlp,
        live={n: live_columns(model, n, config.eval.norm_threshold) for n in names_in + names_out},
    )
    out: dict[str, Any] = {"resid_mlp": {"verdict": verdict}}
    layers = [n.removesuffix(".mlp_in") for n in names_in if f"{n[:-7]}.mlp_out" in names_out]
    if not layers:
        return out
    W_E = model.target.W_E.detach().float().cpu()
    target_parts, sub_parts = [], []
    for layer in layers:
        W_in = model.target_weight(f"{layer}.mlp_in").detach().float().cpu()
        W_out = model.target_weight(f"{layer}.mlp_out").detach().float().cpu()
        U_in, V_in = (t.float().cpu() for t in subcomponents(model, f"{layer}.mlp_in"))
        U_out, V_out = (t.float().cpu() for t in subcomponents(model, f"{layer}.mlp_out"))
        match = ci_onehot[f"{layer}.mlp_in"].argmax(dim=1).tolist()
        target_parts.append(neuron_contributions_target(W_E, W_in, W_out))
        sub_parts.append(neuron_contributions_subcomponents(W_E, U_in, V_in, U_out @ V_out, match))
    target_nc, sub_nc = torch.cat(target_parts, dim=1), torch.cat(sub_parts, dim=1)
    r, slope = pearson_and_slope(target_nc, sub_nc)
    out["resid_mlp"]["neuron_contributions"] = {"pearson_r": r, "slope": slope}
    plot_neuron_contributions(target_nc, sub_nc, fig_dir / "neuron_contributions.png")
    plot_contribution_scatter(
        target_nc, sub_nc, fig_dir / "neuron_contribution_pairs.png", r, slope
    )
    return out


def feature_owners(model: ComponentModel, config: SPDConfig) -> dict[str, list[list[int]]]:
    """Per module and subcomponent, the features whose one-hot input (at the config's
    `eval.one_hot_value`) gives it CI above the verdict's `dense_ci` (0.1): a subcomponent
    *responds* to f, whatever threshold a clustering then uses."""
    device = next(model.parameters()).device
    x = one_hot_inputs(config.target.n_features, config.eval.one_hot_value, device)
    with torch.no_grad():
        ci = causal_importance(model, x)
    threshold = ResidVerdictRules().dense_ci
    return {
        m: [col.nonzero().flatten().tolist() for col in (g > threshold).T.cpu()]
        for m, g in ci.items()
    }


def plot_neuron_contributions(
    target: Tensor, subcomponent: Tensor, path: Path | None, n_show: int = 10
) -> Figure:
    """Paper Figure 6: per-neuron contributions to the first `n_show` features, target (top)
    vs the feature's W_in subcomponent (bottom). Inputs [n_features, n_neurons]."""
    target, subcomponent = target.detach().cpu(), subcomponent.detach().cpu()
    n_show = min(n_show, target.shape[0])
    vmax = float(max(target[:n_show].abs().max(), subcomponent[:n_show].abs().max()))
    fig, axes = new_figure(2, n_show, figsize=(1.6 * n_show, 3.6), sharey=True, squeeze=False)
    neurons = np.arange(target.shape[1])
    for i in range(n_show):
        for row, (label, data) in enumerate((("target", target), ("subcomponent", subcomponent))):
            ax = axes[row, i]
            ax.bar(neurons, data[i].numpy(), width=1.0, color="C0" if row == 0 else "C3")
            ax.set_ylim(-0.1 * vmax, 1.05 * vmax)
            ax.set_xticks([])
            if i == 0:
                ax.set_ylabel(label, fontsize=8)
            if row == 0:
                ax.set_title(f"feature {i}", fontsize=8)
    fig.supxlabel("neuron", fontsize=9)
    return finish(fig, path)


def plot_contribution_scatter(
    target: Tensor, subcomponent: Tensor, path: Path | None, r: float, slope: float
) -> Figure:
    """Paper Figures 7, 10, 11: every (feature, neuron) contribution, target vs subcomponent."""
    x = target.detach().cpu().flatten().numpy()
    y = subcomponent.detach().cpu().flatten().numpy()
    lim = float(max(np.abs(x).max(), np.abs(y).max(), 1e-9))
    fig, ax = new_figure(figsize=(4.5, 4.5))
    ax.scatter(x, y, s=4, alpha=0.5)
    ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8, ls="--", label="y = x")
    ax.set_xlim(-0.05 * lim, 1.05 * lim)
    ax.set_ylim(-0.05 * lim, 1.05 * lim)
    ax.set_xlabel("neuron contribution, target")
    ax.set_ylabel("neuron contribution, W_in subcomponent")
    ax.set_title(f"Pearson r = {r:.3f}, slope = {slope:.3f}", fontsize=9)
    ax.legend(fontsize=8)
    return finish(fig, path)


def true_components(model: ComponentModel) -> dict[str, tuple[Tensor, Tensor]]:
    """The decomposition SPD should find (paper §3.2), as (U [d_out, k], V [k, d_in]) per
    decomposed module: each W_in (`mlp_in`) as one subcomponent per feature f reading the
    feature's coordinate of the residual stream, U_f = W_in W_E[f], V = pinv(W_E)ᵀ (so that
    r V_fᵀ = x_f for r = x W_E; exact in layer 0, whose input is in W_E's span, and W_in's part
    outside that span is left out); each W_out (`mlp_out`) as one dense mechanism of d_mlp
    rank-one terms, U = W_out, V = I (all needed whenever any feature is on)."""
    W_E = model.target.W_E.detach()  # [n_features, d_resid]
    out = {}
    for name in model.module_names:
        W = model.target_weight(name).detach()
        if name.endswith("mlp_in"):
            out[name] = (W @ W_E.T, torch.linalg.pinv(W_E).T.contiguous())
        else:
            out[name] = (W, torch.eye(W.shape[1], dtype=W.dtype, device=W.device))
    return out
