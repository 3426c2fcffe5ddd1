"""Figures: each a function of plain tensors / lists that saves one PNG. No global state."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from torch import Tensor  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _arrows(ax: plt.Axes, cols: np.ndarray, lim: float, title: str) -> None:
    """Draw each column of cols [2, n] as an arrow from the origin, coloured by feature."""
    colors = plt.cm.tab10(np.arange(cols.shape[1]) % 10)
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


def plot_tms_vectors(W: Tensor, U: Tensor, V: Tensor, path: Path, n_show: int) -> Path:
    """Paper Figure 1 (top row): columns of W [2, n]; columns of Σ_c U_c V_cᵀ; then the
    `n_show` largest subcomponents (by norm), each drawn as its columns U[:, c] V[c, j]."""
    W, U, V = (t.detach().cpu().float() for t in (W, U, V))
    norms = (U.norm(dim=0) * V.norm(dim=1)).numpy()
    order = np.argsort(-norms)[:n_show]
    panels = [("target W", W.numpy()), ("sum of subcomponents", (U @ V).numpy())]
    panels += [
        (f"subcomp {c} (‖·‖={norms[c]:.2f})", np.outer(U[:, c], V[c]).reshape(2, -1)) for c in order
    ]
    lim = 1.15 * max(float(np.abs(W.numpy()).max()), 1e-6)
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.5))
    for ax, (title, cols) in zip(np.atleast_1d(axes), panels, strict=True):
        _arrows(ax, cols, lim, title)
    fig.suptitle("Columns of W (one colour per input feature)", fontsize=10)
    return _save(fig, path)


def plot_matrix_decomposition(
    target: Tensor, U: Tensor, V: Tensor, path: Path, n_show: int, title: str
) -> Path:
    """Paper Figure 3: the target matrix, the sum of all subcomponents, the largest ones."""
    target, U, V = (t.detach().cpu().float() for t in (target, U, V))
    norms = (U.norm(dim=0) * V.norm(dim=1)).numpy()
    order = np.argsort(-norms)[:n_show]
    panels = [("target", target.numpy()), ("sum of all", (U @ V).numpy())]
    panels += [(f"c={c}, ‖·‖={norms[c]:.2f}", np.outer(U[:, c], V[c])) for c in order]
    vmax = max(float(np.abs(p).max()) for _, p in panels[:2])
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.8))
    for ax, (name, mat) in zip(np.atleast_1d(axes), panels, strict=True):
        im = ax.imshow(mat, cmap="RdBu", vmin=-vmax, vmax=vmax)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=np.atleast_1d(axes).tolist(), shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def order_by_feature(ci: np.ndarray, threshold: float) -> np.ndarray:
    """Columns of ci [n_features, C] with max CI > threshold, greedily ordered: for each feature
    in turn, its highest-CI subcomponent not yet taken; then the remaining active ones."""
    active = set(np.nonzero(ci.max(axis=0) > threshold)[0].tolist())
    order: list[int] = []
    for i in range(ci.shape[0]):
        for c in np.argsort(-ci[i]):
            if c in active and c not in order:
                if ci[i, c] > threshold:
                    order.append(int(c))
                break
    order += sorted(active - set(order))
    return np.array(order, dtype=int)


def plot_ci_heatmaps(ci: dict[str, Tensor], path: Path, threshold: float, input_label: str) -> Path:
    """CI on one-hot inputs, one panel per module: rows = input feature, columns = the
    subcomponents that are ever active (CI > threshold), ordered to show the diagonal."""
    names = list(ci)
    fig, axes = plt.subplots(
        1, len(names), figsize=(max(3.5, 0.9 + 0.12 * 40) * len(names), 4), squeeze=False
    )
    for ax, name in zip(axes[0], names, strict=True):
        mat = ci[name].detach().cpu().float().numpy()
        order = order_by_feature(mat, threshold)
        shown = mat[:, order] if order.size else np.zeros((mat.shape[0], 1))
        im = ax.imshow(shown, aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{name}: {order.size} of {mat.shape[1]} subcomponents active", fontsize=9)
        ax.set_xlabel("subcomponent (ordered)")
        ax.set_ylabel(input_label)
        if order.size <= 40:
            ax.set_xticks(range(order.size), [str(c) for c in order], fontsize=6, rotation=90)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="causal importance")
    return _save(fig, path)


def plot_losses(records: Sequence[dict], path: Path, keys: Sequence[str]) -> Path:
    """Loss terms over training (log scale)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in records]
    for key in keys:
        vals = [r.get(key) for r in records]
        if any(v is not None and v > 0 for v in vals):
            ax.plot(steps, [v if v and v > 0 else np.nan for v in vals], label=key)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)
