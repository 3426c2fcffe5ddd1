"""spdkit's CPU kernels (csrc/), built on first use: the fused causal-importance MLPs
(ci_mlp.cpp, here) and the stochastic masks (masks.cpp, used by spdkit.masks).

Why: in eager PyTorch the CI MLPs materialise [B, C, d_gate] several times (GELU, its backward,
broadcasts); on TMS that is most of the step. The kernel computes forward and backward in one
pass each, vectorised over rows, with the erf GELU (erf to a few float ulps). It is checked
against the eager `ci_mlp` in tests/test_kernels.py. If it cannot be built (no compiler),
spdkit falls back to eager with a warning.
"""

from __future__ import annotations

import hashlib
import logging
import os
from functools import cache
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

log = logging.getLogger(__name__)
SOURCES = [Path(__file__).parent / "csrc" / f for f in ("ci_mlp.cpp", "masks.cpp", "bindings.cpp")]


def _cpu_tag() -> str:
    """Builds use -march=native; key the build cache by the CPU's flags."""
    try:
        flags = next(
            line
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        flags = "unknown"
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


@cache
def load_extension() -> ModuleType | None:
    """Compile (once per machine, cached by torch) and import the kernel; None if impossible."""
    if os.environ.get("SPDKIT_NO_FUSED"):
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(
            name=f"spdkit_kernels_{_cpu_tag()}",
            sources=[str(p) for p in SOURCES],
            extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
            extra_ldflags=["-fopenmp", "-lmvec"],
            verbose=False,
        )
    except Exception as err:  # a missing compiler or ninja must not stop a run
        log.warning("fused CI kernel unavailable (%s); using the eager implementation", err)
        return None


class FusedCausalImportance(torch.autograd.Function):
    """(σ_H,lower(raw), σ_H,upper(raw)) with raw = ci_mlp(h, w_in, b_in, w_out, b_out), by the
    fused kernel's forward and backward."""

    @staticmethod
    def forward(ctx, h: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor):
        ext = load_extension()
        params = [t.contiguous() for t in (w_in, b_in, w_out, b_out)]
        h = h.contiguous()
        lower, upper, raw = ext.forward(h, *params)
        ctx.save_for_backward(raw, h, *params[:3])
        return lower, upper

    @staticmethod
    def backward(ctx, g_lower: Tensor | None, g_upper: Tensor | None) -> tuple[Tensor, ...]:
        raw, h, w_in, b_in, w_out = ctx.saved_tensors
        g_lower = torch.zeros_like(raw) if g_lower is None else g_lower.contiguous()
        g_upper = torch.zeros_like(raw) if g_upper is None else g_upper.contiguous()
        return tuple(load_extension().backward(g_lower, g_upper, raw, h, w_in, b_in, w_out))


def fused_causal_importance(
    h: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor
) -> tuple[Tensor, Tensor]:
    return FusedCausalImportance.apply(h, w_in, b_in, w_out, b_out)


def fused_available(device: torch.device | str) -> bool:
    return torch.device(device).type == "cpu" and load_extension() is not None
