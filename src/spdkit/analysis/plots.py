"""Figures: each a function of plain tensors / lists that saves one PNG. No global state."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from spdkit.analysis.metrics import greedy_feature_order
from spdkit.figures import finish, new_figure


def plot_matrix_decomposition(
    target: Tensor, U: Tensor, V: Tensor, path: Path | None, n_show: int, title: str
) -> Figure:
    """Paper Figure 3: the target matrix, the sum of all subcomponents, the largest ones."""
    target, U, V = (t.detach().cpu().float() for t in (target, U, V))
    norms = (U.norm(dim=0) * V.norm(dim=1)).numpy()
    order = np.argsort(-norms)[:n_show]
    panels = [("target", target.numpy()), ("sum of all", (U @ V).numpy())]
    panels += [(f"c={c}, ‖·‖={norms[c]:.2f}", np.outer(U[:, c], V[c])) for c in order]
    vmax = max(float(np.abs(p).max()) for _, p in panels[:2])
    fig, axes = new_figure(1, len(panels), figsize=(2.6 * len(panels), 2.8))
    for ax, (name, mat) in zip(np.atleast_1d(axes), panels, strict=True):
        im = ax.imshow(mat, cmap="RdBu", vmin=-vmax, vmax=vmax)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=np.atleast_1d(axes).tolist(), shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return finish(fig, path)


def plot_ci_heatmaps(
    ci: dict[str, Tensor],
    path: Path | None,
    threshold: float,
    input_label: str,
    show_all: bool = False,
    ncols: int | None = None,
) -> Figure:
    """CI on one-hot inputs, one panel per module: rows = input feature, columns = subcomponents
    greedily ordered to show the diagonal (paper Figures 8, 12, 13); only the ever-active ones
    (CI > threshold) unless `show_all`."""
    names = list(ci)
    ncols = ncols or len(names)
    nrows = math.ceil(len(names) / ncols)
    fig, axes = new_figure(
        nrows, ncols, figsize=(max(3.5, 0.9 + 0.12 * 40) * ncols, 3.6 * nrows), squeeze=False
    )
    fig.subplots_adjust(hspace=0.45)  # room for the x-label above each lower panel's title
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names, strict=False):
        mat = ci[name].detach().cpu().float()
        n_active = int((mat.max(dim=0).values > threshold).sum())
        order = greedy_feature_order(mat, threshold)
        order = order if show_all else order[:n_active]
        shown = mat[:, order].numpy() if order else np.zeros((mat.shape[0], 1))
        im = ax.imshow(
            shown.clip(0, 1), aspect="auto", cmap="Reds", vmin=0, vmax=1, interpolation="nearest"
        )
        ax.set_title(f"{name}: {n_active} of {mat.shape[1]} active", fontsize=9)
        ax.set_xlabel("subcomponent (ordered)")
        ax.set_ylabel(input_label)
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # feature indices
        if len(order) <= 40:
            ax.set_xticks(range(len(order)), [str(c) for c in order], fontsize=6, rotation=90)
    fig.colorbar(im, ax=axes.flatten().tolist(), shrink=0.8, label="causal importance")
    return finish(fig, path)


def plot_ci_grid(
    runs_ci: dict[str, dict[str, Tensor]], path: Path | None, threshold: float, title: str = ""
) -> Figure:
    """Sweep figure (paper Figure 8): one column per run, one row per module, CI on one-hot
    inputs with columns greedily ordered."""
    labels = list(runs_ci)
    modules = list(next(iter(runs_ci.values())))
    fig, axes = new_figure(
        len(modules),
        len(labels),
        figsize=(3.2 * len(labels), 2.9 * len(modules)),
        squeeze=False,
    )
    for j, label in enumerate(labels):
        for i, name in enumerate(modules):
            mat = runs_ci[label][name].detach().cpu().float()
            order = greedy_feature_order(mat, threshold)
            im = axes[i, j].imshow(
                mat[:, order].numpy().clip(0, 1),
                aspect="auto",
                cmap="Reds",
                vmin=0,
                vmax=1,
                interpolation="nearest",
            )
            if i == 0:
                axes[i, j].set_title(label, fontsize=9)
            if j == 0:
                axes[i, j].set_ylabel(f"{name}\ninput feature", fontsize=8)
            axes[i, j].set_xlabel("subcomponent (ordered)", fontsize=7)
    fig.colorbar(im, ax=axes.flatten().tolist(), shrink=0.6, label="causal importance")
    if title:
        fig.suptitle(title)
    return finish(fig, path)


def plot_losses(records: Sequence[dict], path: Path | None, keys: Sequence[str]) -> Figure:
    """Loss terms over training (log scale)."""
    fig, ax = new_figure(figsize=(7, 4))
    steps = [r["step"] for r in records]
    for key in keys:
        vals = [r.get(key) for r in records]
        if any(v is not None and v > 0 for v in vals):
            ax.plot(steps, [v if v and v > 0 else np.nan for v in vals], label=key)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.set_title("no metrics recorded", fontsize=9)
    ax.grid(alpha=0.3)
    return finish(fig, path)


def plot_l0_over_training(records: Sequence[dict], path: Path | None) -> Figure:
    """Mean CI-L0 per module (subcomponents with CI > threshold per input/token) over training."""
    keys = sorted({k for r in records for k in r if k.startswith("l0/")})
    fig, ax = new_figure(figsize=(7, 4))
    steps = [r["step"] for r in records]
    for key in keys:
        ax.plot(steps, [r.get(key, np.nan) for r in records], label=key.removeprefix("l0/"))
    ax.set_xlabel("step")
    ax.set_ylabel("mean CI-L0 (training batch)")
    if any(r.get(k, 0) > 0 for r in records for k in keys):  # log of nothing positive: linear
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if keys:
        ax.legend(fontsize=7)
    else:
        ax.set_title("no metrics recorded", fontsize=9)
    return finish(fig, path)


def plot_ci_histograms(ci: dict[str, Tensor], path: Path | None) -> Figure:
    """Distribution of CI values per module over an evaluation batch (log counts): a good
    decomposition has most mass at 0 and a clear bump at 1."""
    names = list(ci)
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = new_figure(nrows, ncols, figsize=(3.6 * ncols, 2.6 * nrows), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    bins = np.linspace(0, 1.05, 43)
    for ax, name in zip(axes.flat, names, strict=False):
        values = ci[name].detach().float().cpu().clamp(0, 1.05).flatten().numpy()
        ax.hist(values, bins=bins, log=True, color="C0")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("causal importance", fontsize=7)
    return finish(fig, path)


def plot_top_contexts(table: dict[str, list[dict]], path: Path | None) -> Figure:
    """Text panel: for the most used subcomponents of each module, the contexts where their CI
    is highest (the token at the right end, marked with brackets)."""
    lines = []
    for name, rows in table.items():
        lines.append(name)
        for row in rows:
            shown = " | ".join(ctx for ctx, _ in row["top"][:4])
            lines.append(f"  c={row['subcomponent']:<4} freq {row['frequency']:.3f}  {shown}")
    height = 0.18 * max(4, len(lines)) + 0.4
    fig, ax = new_figure(figsize=(11, height))
    ax.axis("off")
    ax.text(
        0, 1, "\n".join(lines) or "no subcomponents fired", va="top", family="monospace", fontsize=7
    )
    return finish(fig, path)


def plot_pareto(
    points: Sequence[dict], path: Path | None, measures: Sequence[str], title: str = ""
) -> Figure:
    """Sparsity against faithfulness, one point per run: x = CI-L0 per token (summed over
    modules), y = each KL in `measures` (one marker per measure, one colour per run). The
    better decomposition of two at the same L0 is the lower one; an adversarial KL far above
    the stochastic one means the CI lets through ablations that break the model."""
    fig, ax = new_figure(figsize=(6.5, 4.5))
    markers = ["o", "s", "^", "D", "v", "P"]
    for i, p in enumerate(points):
        colour = f"C{i % 10}"
        for j, m in enumerate(measures):
            if p.get(m) is None:
                continue
            ax.scatter(
                p["l0"],
                p[m],
                color=colour,
                marker=markers[j % len(markers)],
                s=50,
                label=f"{p['label']}: {m}",
            )
        ax.annotate(p["label"], (p["l0"], max(p.get(m) or 0 for m in measures)), fontsize=7)
    ax.set_xlabel("CI-L0 per token, summed over modules")
    ax.set_ylabel("KL(target ‖ masked) [nats]")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, loc="best")
    return finish(fig, path)


def plot_coactivation(
    pair_counts: Tensor, sizes: Sequence[int], names: Sequence[str], path: Path | None
) -> Figure:
    """The co-activation matrix of live subcomponents ordered by cluster, normalised as
    s_ij / √(s_i s_j) (1: always fire together, 0: never), each cluster's block outlined;
    `names` label the axes when there are few."""
    s = pair_counts.double()
    d = s.diagonal().clamp_min(1).sqrt()
    norm = (s / d[:, None] / d[None, :]).numpy()
    n = norm.shape[0]
    side = min(12.0, max(4.0, 0.04 * n + 3))
    fig, ax = new_figure(figsize=(side + 1.2, side))
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    start = 0
    for size in sizes:
        if size > 1 or len(sizes) <= 200:
            ax.add_patch(
                Rectangle((start - 0.5, start - 0.5), size, size, fill=False, ec="red", lw=0.8)
            )
        start += size
    n_multi = sum(1 for size in sizes if size > 1)
    ax.set_title(f"{n} live subcomponents in {len(sizes)} clusters ({n_multi} of 2 or more)")
    ax.set_xlabel("subcomponent (ordered by cluster)")
    ax.set_ylabel("subcomponent (ordered by cluster)")
    if n <= 60:
        ax.set_xticks(range(n), names, fontsize=7, rotation=90)
        ax.set_yticks(range(n), names, fontsize=7)
    fig.colorbar(im, ax=ax, shrink=0.8, label=r"co-activation $s_{ij} / \sqrt{s_i s_j}$")
    return finish(fig, path)


def plot_prompt_graph(graph: dict[str, Any], path: Path | None, n_edges: int = 60) -> Figure:
    """Nodes at (position, layer order of their module), the `n_edges` strongest edges as
    lines (width ∝ |e|; blue positive, red negative), logits on the top row."""
    modules = list(dict.fromkeys(node["module"] for node in graph["nodes"]))
    rows = {m: i for i, m in enumerate(modules)}
    rows["logit"] = len(modules)
    edges = graph["edges"][:n_edges]
    used = {e["source"] for e in edges} | {e["target"] for e in edges}

    def place(node: str) -> tuple[float, float]:
        if node.startswith("logit:"):
            return float(node.split(":")[1]), float(rows["logit"])
        module, t, c = node.rsplit(":", 2)
        return int(t) + 0.35 * ((int(c) % 7) / 7 - 0.5), float(rows[module])

    T = len(graph["ids"])
    fig, ax = new_figure(figsize=(max(6.0, 0.35 * T + 2), 1.0 + 0.45 * len(rows)))
    top = max((abs(e["value"]) for e in edges), default=1.0) or 1.0
    for e in edges:
        (x0, y0), (x1, y1) = place(e["source"]), place(e["target"])
        color = "tab:blue" if e["value"] > 0 else "tab:red"
        ax.plot([x0, x1], [y0, y1], color=color, lw=0.3 + 3 * abs(e["value"]) / top, alpha=0.6)
    xs, ys = zip(*(place(n) for n in used), strict=True) if used else ((), ())
    ax.scatter(xs, ys, s=10, c="k", zorder=3)
    ax.set_yticks(range(len(rows)), list(rows))
    tokens = graph.get("tokens") or [str(i) for i in graph["ids"]]
    ax.set_xticks(range(T), tokens, fontsize=6, rotation=90)
    ax.set_title(f"attribution graph: {len(edges)} strongest edges")
    return finish(fig, path)


def removal_heatmap(
    ax: Any, rows: dict[str, dict[str, Any]], groups: Sequence[str], labels: Sequence[str]
) -> Any:
    """One panel of a removal table: row r is the set removed for group r, column c a group,
    the cell the share of c's way to its reference that removing r's set costs
    (rows[r]["fraction"] on the diagonal, rows[r]["other_fractions"][c] off it). A mechanism
    removed selectively is a bright diagonal (≥ 0.8) on a dark field (≤ 0.1). Returns the
    image, for a colour bar."""
    grid = [
        [rows[r]["fraction"] if c == r else rows[r]["other_fractions"][c] for c in groups]
        for r in groups
    ]
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            text = f"{0.0 if abs(v) < 0.005 else v:.2f}"
            ax.text(j, i, text, ha="center", va="center", color="w" if v < 0.6 else "k")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_yticks(range(len(groups)), labels)
    return im
