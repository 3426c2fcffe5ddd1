"""What TMS adds to a decomposition's evaluation: the feature match of paper §3.1 (MMCS and
ML2R of W's columns against the subcomponents), the vectors figure (paper Figure 1), and its
known mechanisms (one per feature: its `linear1` and its `linear2` subcomponent).

An APD run (`spdkit.method.apd`) is measured the way the APD paper measures it: against its
parameter components P_c (each r rank-one subcomponents here), not the rank-one pieces."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from spdkit.config import SPDConfig
from spdkit.figures import finish, new_figure
from spdkit.method.measures import non_negligible, piece_norms, pieces, subcomponents
from spdkit.method.model import ComponentModel

FEATURE_MODULE = "linear1"  # its weight columns are the ground-truth feature directions

# paper Table 1 (MMCS, ML2R on W), by (n_features, n_hidden, with the hidden identity)
PAPER_TABLE_1 = {
    (5, 2, False): (1.000, 0.993),
    (40, 10, False): (1.000, 1.010),
    (5, 2, True): (1.000, 0.992),
    (40, 10, True): (1.000, 1.031),
}
# APD paper §3.1 table (MMCS, ML2R of its components on W), by (n_features, n_hidden)
APD_PAPER_TABLE = {(5, 2): (0.998, 0.893), (40, 10): (0.996, 0.935)}


@dataclass(frozen=True)
class FeatureMatch:
    mmcs: float
    ml2r: float
    match: list[int]  # index of the matched subcomponent, per feature (column of W)
    cosine: list[float]
    l2_ratio: list[float]


def mmcs_ml2r(W: Tensor, U: Tensor, V: Tensor, candidates: Tensor) -> FeatureMatch:
    """Mean max cosine similarity and mean L2 ratio between the columns of W [d_out, n] and the
    matching columns U[:, c] V[c, j] of the subcomponents (paper §3.1): the rank-one case of
    `component_mmcs_ml2r`.

    Only `candidates` (bool [C], the non-negligible subcomponents) may be matched: a near-zero
    subcomponent can win the cosine by accident and would make ML2R meaningless.
    """
    return component_mmcs_ml2r(W, U.detach().T[:, :, None] * V.detach()[:, None, :], candidates)


def component_mmcs_ml2r(W: Tensor, P: Tensor, candidates: Tensor) -> FeatureMatch:
    """MMCS and ML2R of W [d_out, n] against the columns of component matrices P [K, d_out, n]
    (APD paper §3.1: P_{c,:,j} against W_{:,j}); only `candidates` (bool [K]) are matched."""
    W, P = W.detach().float(), P.detach().float()
    idx = torch.nonzero(candidates).flatten()
    if idx.numel() == 0:
        raise ValueError("no candidate components to match (all have negligible norm)")
    cols = P[idx]  # [k, d_out, n]
    col_norm = cols.norm(dim=1).clamp_min(1e-12)  # [k, n]
    w_norm = W.norm(dim=0).clamp_min(1e-12)  # [n]
    cos = (cols * W[None]).sum(1) / (col_norm * w_norm[None, :])  # [k, n]
    best = cos.argmax(dim=0)
    j = torch.arange(W.shape[1])
    ratio = col_norm[best, j] / w_norm
    return FeatureMatch(
        mmcs=cos[best, j].mean().item(),
        ml2r=ratio.mean().item(),
        match=idx[best].tolist(),
        cosine=cos[best, j].tolist(),
        l2_ratio=ratio.tolist(),
    )


def report(
    model: ComponentModel, config: SPDConfig, ci_onehot: dict[str, Tensor] | None, fig_dir: Path
) -> dict[str, Any]:
    """summary.json's `feature_match` (MMCS / ML2R on `linear1`, paper §3.1) and, for a
    2-dimensional hidden space, figures/vectors_linear1.png (paper Figure 1)."""
    if FEATURE_MODULE not in model.module_names:
        return {}
    W = model.target_weight(FEATURE_MODULE)
    live = non_negligible(piece_norms(model, FEATURE_MODULE), config.eval.norm_threshold)
    match = component_mmcs_ml2r(W, pieces(model, FEATURE_MODULE), live)
    if W.shape[0] == 2:
        n_show = min(int(live.sum()) + 1, 8)
        path = fig_dir / f"vectors_{FEATURE_MODULE}.png"
        plot_tms_vectors(W, pieces(model, FEATURE_MODULE), path, n_show=n_show)
    return {
        "feature_match": {
            "module": FEATURE_MODULE,
            "mmcs": match.mmcs,
            "ml2r": match.ml2r,
            "matched_subcomponent": match.match,  # APD: the matched component
            "counted": "components" if model.apd is not None else "subcomponents",
            **tms_verdict(model, config, match.mmcs),
            **paper_values(config),
        }
    }


def paper_values(config: SPDConfig) -> dict[str, Any]:
    """{"paper": {"mmcs", "ml2r"}} of paper Table 1 for this TMS architecture, if it has a row."""
    t = config.target
    if config.apd is not None:
        row = APD_PAPER_TABLE.get((t.n_features, t.n_hidden)) if not t.n_hidden_layers else None
        return {"paper": {"mmcs": row[0], "ml2r": row[1], "table": "APD paper §3.1"}} if row else {}
    row = PAPER_TABLE_1.get((t.n_features, t.n_hidden, t.n_hidden_layers > 0))
    return {"paper": {"mmcs": row[0], "ml2r": row[1]}} if row else {}


@dataclass(frozen=True)
class TMSVerdictRules:
    """The ground-truth verdict for TMS targets, as numbers (paper Table 1, Figures 1-3):
    MMCS ≥ `mmcs_min` on `linear1`'s columns, and exactly as many non-negligible subcomponents
    as the true decomposition has in every module: n_features in `linear1` and `linear2`
    (one per feature, no split or shared column), and the rank of each identity layer (TMS +ID's
    hidden layers, identities inserted by `insert_identity`)."""

    mmcs_min: float = 0.999


def tms_verdict(
    model: ComponentModel,
    config: SPDConfig,
    mmcs: float,
    rules: TMSVerdictRules = TMSVerdictRules(),
) -> dict[str, Any]:
    """{"ground_truth": bool, "non_negligible": {module: n}, "expected": {module: n}}."""
    expected = {n: U.shape[1] for n, (U, _) in true_components(model).items()}
    counts = {
        n: int(non_negligible(piece_norms(model, n), config.eval.norm_threshold).sum())
        for n in model.module_names
    }
    return {
        "ground_truth": mmcs >= rules.mmcs_min and counts == expected,
        "non_negligible": counts,
        "expected": expected,
    }


def feature_owners(
    model: ComponentModel, config: SPDConfig, purity: float = 0.5
) -> dict[str, list[list[int]]]:
    """The feature each subcomponent belongs to, from its weights: `linear1` reads the
    features (V_c's largest coordinate), `linear2` writes them (U_c's); [f] when that
    coordinate holds at least `purity` of the squared norm, [] otherwise. (CI on one-hot
    inputs cannot tell: at the largest feature value `linear2`'s CI also responds to the
    neighbouring features.) An APD run: each component's feature, from its matrix P_c, for
    every one of its rank-one pieces."""
    out = {}
    for module, side in (("linear1", "V"), ("linear2", "U")):
        if module not in model.module_names:
            continue
        if model.apd is None:
            U, V = subcomponents(model, module)
            w = (V if side == "V" else U.T).float().cpu() ** 2  # [C, n_features]
        else:  # an APD component's pieces all belong to the component's feature
            P = pieces(model, module).float().cpu() ** 2  # [K, d_out, d_in]
            w = P.sum(1) if side == "V" else P.sum(2)  # [K, n_features]
        share, f = (w / w.sum(-1, keepdim=True).clamp_min(1e-30)).max(-1)
        owners = [[int(fi)] if si >= purity else [] for si, fi in zip(share, f, strict=True)]
        if model.apd is not None:
            owners = [o for o in owners for _ in range(model.apd_ranks[module])]
        out[module] = owners
    return out


def _arrows(ax: Axes, cols: np.ndarray, lim: float, title: str) -> None:
    """Draw each column of cols [2, n] as an arrow from the origin, coloured by feature."""
    colors = matplotlib.colormaps["tab10"](np.arange(cols.shape[1]) % 10)
    for j in range(cols.shape[1]):
        x, y = cols[:, j]
        if np.hypot(x, y) > 1e-3 * lim:
            ax.annotate(
                "",
                xy=(x, y),
                xytext=(0, 0),
                arrowprops={"arrowstyle": "->", "color": colors[j], "lw": 2},
            )
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.axhline(0, color="0.85", lw=0.5, zorder=0)
    ax.axvline(0, color="0.85", lw=0.5, zorder=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)


PANELS_PER_ROW = 6


def plot_tms_vectors(W: Tensor, P: Tensor, path: Path | None, n_show: int) -> Figure:
    """Paper Figure 1 (top row): columns of W [2, n]; columns of the sum of the pieces
    P [K, 2, n] (rank-one subcomponents U_c V_cᵀ, or APD's components); then the `n_show`
    largest pieces (by norm), each drawn as its columns."""
    W, P = W.detach().cpu().float(), P.detach().cpu().float()
    norms = P.flatten(1).norm(dim=1).numpy()
    order = np.argsort(-norms)[:n_show]
    panels = [("target W", W.numpy()), ("sum of pieces", P.sum(0).numpy())]
    panels += [(f"piece {c} (‖·‖={norms[c]:.2f})", P[c].numpy()) for c in order]
    lim = 1.15 * max(float(np.abs(W.numpy()).max()), 1e-6)
    # rows of at most PANELS_PER_ROW, so that the figure stays legible at a page's width
    n_cols = min(len(panels), PANELS_PER_ROW)
    n_rows = -(-len(panels) // n_cols)
    fig, axes = new_figure(n_rows, n_cols, figsize=(2.2 * n_cols, 2.3 * n_rows + 0.3))
    axes = np.atleast_1d(axes).reshape(-1)
    for ax, (title, cols) in zip(axes, panels, strict=False):
        _arrows(ax, cols, lim, title)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle("Columns of W (one colour per input feature)", fontsize=10)
    return finish(fig, path)


def true_components(model: ComponentModel) -> dict[str, tuple[Tensor, Tensor]]:
    """The decomposition SPD should find, as (U [d_out, k], V [k, d_in]) per decomposed module
    (paper §3.1, Figures 1-3): `linear1` W [h, n] as its n columns read from one feature each
    (U = W, V = I_n); `linear2` [n, h] as its n rows written to one feature each (U = I_n,
    V = W); any other module (the identity layers) as U = W, V = I_d, d rank-one terms that
    are all needed on every input. `spdkit.analysis.mechanisms.ground_truth` starts training
    from it, to tell a wrong objective from an optimiser that cannot reach the answer."""
    out = {}
    for name in model.module_names:
        W = model.target_weight(name).detach()
        d_out, d_in = W.shape
        eye = torch.eye(d_out if name == "linear2" else d_in, dtype=W.dtype, device=W.device)
        out[name] = (eye, W) if name == "linear2" else (W, eye)
    return out
