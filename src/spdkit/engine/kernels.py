"""spdkit's CPU kernels (csrc/), built on first use: the fused causal-importance MLPs
(ci_mlp.cpp, here) and the stochastic masks (masks.cpp, used by spdkit.engine.random_stream).

Why: in eager PyTorch the CI MLPs materialise [B, C, d_gate] several times (GELU, its backward,
broadcasts); on TMS that is most of the step. The kernel computes forward and backward in one
pass each, vectorised over rows, with the erf GELU (erf to a few float ulps). It is checked
against the eager `ci_mlp` in tests/test_kernels.py. If it cannot be built (no compiler),
spdkit falls back to eager with a warning. Builds live in `cache_root()`, one directory per
`build_name()`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from functools import cache
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

log = logging.getLogger(__name__)
SOURCES = [Path(__file__).parent / "csrc" / f for f in ("ci_mlp.cpp", "masks.cpp", "bindings.cpp")]


CFLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp")
LDFLAGS = ("-fopenmp", "-lmvec")


def _cpu_flags() -> str:
    """Builds use -march=native, so the CPU's flags are part of the build's identity."""
    try:
        return next(
            line
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        return "unknown"


def build_name() -> str:
    """One name per (sources, flags, torch, CPU): a changed input is a new build directory,
    never a rebuild in place under a process that may have the old library loaded."""
    digest = hashlib.sha1()
    for part in [*(p.read_bytes() for p in SOURCES), *map(str.encode, CFLAGS + LDFLAGS)]:
        digest.update(part)
    digest.update(torch.__version__.encode())
    digest.update(_cpu_flags().encode())
    return f"spdkit_kernels_{digest.hexdigest()[:12]}"


def cache_root() -> Path:
    """$SPDKIT_KERNEL_CACHE, else $XDG_CACHE_HOME/spdkit/kernels (~/.cache by default)."""
    if os.environ.get("SPDKIT_KERNEL_CACHE"):
        return Path(os.environ["SPDKIT_KERNEL_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "spdkit" / "kernels"


@cache
def load_extension() -> ModuleType | None:
    """The compiled kernels (built once per machine); None if they cannot be built."""
    if os.environ.get("SPDKIT_NO_FUSED"):
        return None
    try:
        return _load_or_build(cache_root() / build_name())
    except Exception as err:  # a missing compiler or ninja must not stop a run
        log.warning(
            "fused CI kernel unavailable (%s); using the eager implementation "
            "(SPDKIT_NO_FUSED=1 skips the attempt)",
            build_problem(err),
        )
        return None


def build_problem(err: Exception, limit: int = 160) -> str:
    """One line of a failed build's error (the compiler's output spans many): the last line
    that says what went wrong, else the first, cut to `limit` characters."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    telling = [
        line
        for line in lines
        if any(w in line.lower() for w in ("not found", "no such file", "error:", "fatal"))
    ]
    line = (telling or lines or [type(err).__name__])[-1 if telling else 0]
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _load_or_build(build_dir: Path) -> ModuleType:
    """Import a finished build without taking any lock; otherwise build it under a lock
    that dies with its holder.

    Why not plain `torch.utils.cpp_extension.load` on every start: it takes a lock *file*
    on every call, even when nothing needs building, and a process killed while holding
    it (SIGKILL, a cut-off session) leaves the file behind; every later process then
    waits on it forever. Here a finished build is marked by `built`, written last, and
    imported directly. A build runs under `flock`, which the kernel releases when its
    holder dies, and clears torch's stale lock file first: holding the flock proves no
    one else is building.
    """
    name = build_dir.name
    done = build_dir / "built"
    if not done.exists():
        import fcntl  # POSIX; elsewhere the ImportError means the eager fallback

        build_dir.mkdir(parents=True, exist_ok=True)
        with open(build_dir / "build.flock", "w") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            if not done.exists():  # nobody finished it while we waited
                module = _build(build_dir)
                tmp = done.with_suffix(".tmp")
                tmp.write_text(torch.__version__)
                os.replace(tmp, done)
                return module
    spec = importlib.util.spec_from_file_location(name, build_dir / f"{name}.so")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {build_dir / name}.so")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(build_dir: Path) -> ModuleType:
    """Compile and import with torch's JIT builder; the caller holds the build flock."""
    from torch.utils.cpp_extension import load

    (build_dir / "lock").unlink(missing_ok=True)  # torch's lock file, left by a killed build
    return load(
        name=build_dir.name,
        sources=[str(p) for p in SOURCES],
        extra_cflags=list(CFLAGS),  # torch appends to these lists
        extra_ldflags=list(LDFLAGS),
        build_directory=str(build_dir),
        verbose=False,
    )


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


class FusedRawCI(torch.autograd.Function):
    """raw = ci_mlp(h, w_in, b_in, w_out, b_out) alone, by the fused kernel: for lower
    sigmoids the kernel does not have (the sigmoids then run on [..., C] in torch)."""

    @staticmethod
    def forward(ctx, h: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor):
        params = [t.contiguous() for t in (w_in, b_in, w_out, b_out)]
        h = h.contiguous()
        raw = load_extension().forward(h, *params)[2]
        ctx.save_for_backward(h, *params[:3])
        return raw

    @staticmethod
    def backward(ctx, g_raw: Tensor) -> tuple[Tensor, ...]:
        h, w_in, b_in, w_out = ctx.saved_tensors
        return tuple(load_extension().backward_raw(g_raw.contiguous(), h, w_in, b_in, w_out))


def fused_causal_importance(
    h: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor
) -> tuple[Tensor, Tensor]:
    return FusedCausalImportance.apply(h, w_in, b_in, w_out, b_out)


def fused_ci_mlp(h: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor) -> Tensor:
    return FusedRawCI.apply(h, w_in, b_in, w_out, b_out)


def fused_available(device: torch.device | str) -> bool:
    return torch.device(device).type == "cpu" and load_extension() is not None
