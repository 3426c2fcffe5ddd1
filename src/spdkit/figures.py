"""A figure of its own and its PNG: what every figure function of spdkit draws on. No pyplot
state and no GUI backend (matplotlib's backend is never chosen on import), so drawing leaves
nothing behind in the process."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from spdkit.files import atomic_write_bytes


def new_figure(*grid: int, figsize: tuple[float, float], **kwargs) -> tuple[Figure, Any]:
    """A figure of its own with its axes: a `Figure` object, not pyplot's global state, so
    drawing needs no GUI backend and leaves nothing behind (matplotlib's backend is not
    chosen on import)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, **kwargs)


def save_figure(fig: Figure, path: Path) -> Path:
    """The PNG drawn in memory, then written atomically: a run killed while saving leaves the
    old figure or the new one, never a truncated file."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def finish(fig: Figure, path: Path | None) -> Figure:
    """The figure saved as a PNG at `path` if one is given, and returned either way (a notebook
    cell shows a returned Figure; a script may keep drawing on it)."""
    if path is not None:
        save_figure(fig, path)
    return fig
