"""Adversarial masks (VPD notes §2.3): sources chosen by projected gradient ascent.

    m = g + (1 − g) ⊙ s,   s ∈ [0, 1]                      (s = r ~ U(0, 1): SPD's masks)
    L_adversarial = max_s D(f(x | W'(m)), f(x | W))         (VPD's adversarial reconstruction)

The maximum is approximated by n ascent steps on s from an initial point, each projected back
onto [0, 1]:

    sign:  s ← clamp(s + η · sign(∇_s D), 0, 1)
    adam:  m ← β1 m + (1 − β1) ∇,  v ← β2 v + (1 − β2) ∇²,
           s ← clamp(s + η · m̂ / (√v̂ + ε), 0, 1)          (m̂, v̂ bias-corrected; ascent)

then the loss is D at the final s, with s held fixed: U, V and the CI function minimise it,
the sources maximise it. Stochastic masks check random ablations; the adversary checks the
worst one the CI allows, so a decomposition cannot hide a subcomponent it needs behind a low
but non-zero CI.

Scope: `position`, one source per datapoint and position ([..., C] like g); `batch`, one
source vector per module shared over the whole batch ([C]): it cannot exploit one sample's
noise (the VPD paper's argument; its evaluation uses it). With the Δ-component, sources have
C + 1 entries and Δ's is attacked too.

Persistent PGD (`PGDState`): the sources and their Adam moments carry over from one
training step to the next (each step continues the ascent instead of restarting it), and they
are part of the checkpoint, so a resumed run continues bit-exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from spdkit.config import PGDConfig
from spdkit.engine.random_stream import MaskStream

ADAM_EPS = 1e-8


def source_shape(g: Tensor, scope: str) -> tuple[int, ...]:
    """A module's source shape for masks shaped like g [..., C(+1)]."""
    return tuple(g.shape) if scope == "position" else (g.shape[-1],)


def initial_sources(
    shapes: Mapping[str, tuple[int, ...]],
    init: str,
    stream: MaskStream,
    device: torch.device | str,
    per_sample: bool = False,
) -> dict[str, Tensor]:
    """s⁰ per module: U(0, 1) from the step's counter stream (so a resumed run draws the same
    numbers), or all ones (the unablated model), or all zeros (m = g, the CI masks).
    `per_sample`: the shapes' dim 0 is the batch (scope position), so each data-parallel
    rank draws its rows of the global draw."""
    out = {}
    for name, shape in shapes.items():
        if init == "random":
            out[name] = stream.uniforms(math.prod(shape), device, per_sample).view(shape)
        else:
            fill = 1.0 if init == "ones" else 0.0
            out[name] = torch.full(shape, fill, device=device)
    return out


def adversarial_masks(g: Mapping[str, Tensor], sources: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """m = g + (1 − g) ⊙ s per module (s broadcast over g's leading dims for scope batch)."""
    return {n: g[n] + (1.0 - g[n]) * s for n, s in sources.items()}


class Ascent:
    """One projected ascent update of a set of sources: `sign` or `adam` (state per source:
    the moments and count it starts from, its own dicts from then on)."""

    def __init__(
        self,
        kind: str,
        betas: tuple[float, float],
        moments: Mapping[str, tuple[Tensor, Tensor]] | None = None,
        t: Mapping[str, int] | None = None,
    ) -> None:
        self.kind, self.betas = kind, betas
        self.moments: dict[str, tuple[Tensor, Tensor]] = dict(moments or {})
        self.t: dict[str, int] = dict(t or {})

    @torch.no_grad()
    def update(self, name: str, s: Tensor, grad: Tensor, lr: float) -> Tensor:
        """s moved uphill by one step of size lr, clamped to [0, 1] (a new tensor)."""
        if self.kind == "sign":
            return (s + lr * grad.sign()).clamp_(0.0, 1.0)
        b1, b2 = self.betas
        m, v = self.moments.get(name, (torch.zeros_like(s), torch.zeros_like(s)))
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad * grad
        t = self.t.get(name, 0) + 1
        self.moments[name], self.t[name] = (m, v), t
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        return (s + lr * m_hat / (v_hat.sqrt() + ADAM_EPS)).clamp_(0.0, 1.0)


SourceObjective = Callable[[dict[str, Tensor]], Tensor]  # s ↦ D at the masks s makes


def source_gradients(
    parts: Sequence[tuple[float, SourceObjective]], sources: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """∇_s Σ_i w_i D_i(s) with respect to the sources only, one backward per part: a batch
    attacked in chunks holds one chunk's graph at a time (the evaluation of a large model).
    Gradients are on even under no_grad: evaluating the adversarial loss needs its ascent."""
    total: dict[str, Tensor | None] = dict.fromkeys(sources)
    for weight, divergence_at in parts:
        live = {n: s.detach().requires_grad_(True) for n, s in sources.items()}
        with torch.enable_grad():
            d = divergence_at(live)
            grads = torch.autograd.grad(d, list(live.values()), allow_unused=True)
        for n, gr in zip(live, grads, strict=True):
            if gr is not None:
                gr = gr if weight == 1.0 else weight * gr
                total[n] = gr if total[n] is None else total[n] + gr
    return {n: torch.zeros_like(sources[n]) if t is None else t for n, t in total.items()}


def ascend(
    divergence_at: SourceObjective | Sequence[tuple[float, SourceObjective]],
    sources: dict[str, Tensor],
    n_steps: int,
    ascent: Ascent,
    lr: float,
    reduce: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
) -> dict[str, Tensor]:
    """n projected ascent steps on `sources` of D = `divergence_at(sources)`, or of the
    weighted sum Σ_i w_i D_i of a sequence of (w_i, D_i) parts. Returns the new sources.
    `reduce` combines the gradients of sources shared across data-parallel ranks."""
    parts = [(1.0, divergence_at)] if callable(divergence_at) else list(divergence_at)
    for _ in range(n_steps):
        grads = source_gradients(parts, sources)
        if reduce is not None:
            grads = reduce(grads)
        sources = {n: ascent.update(n, s.detach(), grads[n], lr) for n, s in sources.items()}
    return sources


@dataclass(frozen=True)
class PGDState:
    """Persistent PGD's state between training steps (VPD's training adversary): per module
    the sources s and, for Adam ascent, their moments (m, v) and update count t. A value: a
    step starts from one and returns the next (`spdkit.method.step.spd_losses`); the trainer
    keeps it and checkpoints it (`state_tensors`), so a resumed run continues bit-exactly."""

    sources: Mapping[str, Tensor] = field(default_factory=dict)
    moments: Mapping[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    t: Mapping[str, int] = field(default_factory=dict)

    def starting(
        self,
        shapes: Mapping[str, tuple[int, ...]],
        config: PGDConfig,
        stream: MaskStream,
        device: torch.device,
    ) -> dict[str, Tensor]:
        """The sources these modules start this step from: the kept ones, s⁰ for a module
        seen for the first time (drawn from the step's stream)."""
        missing = {n: s for n, s in shapes.items() if n not in self.sources}
        drawn = initial_sources(missing, config.init, stream, device, config.scope == "position")
        sources = {**self.sources, **drawn}
        wrong = [n for n, s in shapes.items() if tuple(sources[n].shape) != tuple(s)]
        if wrong:
            raise ValueError(
                f"persistent PGD sources of {wrong[0]} have shape "
                f"{list(sources[wrong[0]].shape)}, this batch needs {list(shapes[wrong[0]])} "
                "(scope position needs a fixed batch shape; use adversary.scope=batch)"
            )
        return {n: sources[n] for n in shapes}

    def after(self, sources: Mapping[str, Tensor], ascent: Ascent) -> PGDState:
        """The next state: these modules' sources (detached) and the ascent's moments."""
        kept = {**self.sources, **{n: s.detach() for n, s in sources.items()}}
        return PGDState(kept, dict(ascent.moments), dict(ascent.t))

    # --- checkpoint --------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Tensor]:
        out = {}
        for name, s in self.sources.items():
            out[f"pgd.{name}.source"] = s
            if name in self.moments:
                m, v = self.moments[name]
                out[f"pgd.{name}.m"], out[f"pgd.{name}.v"] = m, v
                out[f"pgd.{name}.t"] = torch.tensor(self.t[name], dtype=torch.int64)
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], device: torch.device | str) -> PGDState:
        sources, moments, t = {}, {}, {}
        for key, value in tensors.items():
            if not key.startswith("pgd."):
                continue
            name, part = key[len("pgd.") :].rsplit(".", 1)
            if part == "source":
                sources[name] = value.to(device)
            elif part == "t":
                t[name] = int(value)
        for name in sources:
            if f"pgd.{name}.m" in tensors:
                moments[name] = (
                    tensors[f"pgd.{name}.m"].to(device),
                    tensors[f"pgd.{name}.v"].to(device),
                )
        return cls(sources, moments, t)


def persistent_lr(config: PGDConfig, step: int, steps: int) -> float:
    """Persistent PGD's ascent step size, warmed up linearly over `warmup_frac` of training."""
    warm = int(config.warmup_frac * steps)
    return config.step_size * (min(1.0, (step + 1) / warm) if warm else 1.0)


def fresh_pgd_ladder(
    divergence_at: SourceObjective | Sequence[tuple[float, SourceObjective]],
    shapes: Mapping[str, tuple[int, ...]],
    n_steps: list[int],
    step_size: float,
    generator: torch.Generator,
    ascent: Ascent | None = None,
) -> dict[int, dict[str, Tensor]]:
    """VPD's evaluation adversary: fresh sources s⁰ ~ U(0, 1) (from `generator`), ascent steps
    of `step_size` (`ascent`, default sign ascent as VPD's; `eval.pgd_optimizer`), and the
    sources after each count in `n_steps`. Attacks of growing
    strength from the same start are one trajectory read at several points, so the ladder
    costs max(n_steps) ascent passes, not their sum."""
    device = generator.device
    sources = {
        n: torch.rand(shape, generator=generator, device=device) for n, shape in shapes.items()
    }
    ascent = ascent or Ascent("sign", (0.5, 0.99))  # the betas only matter for adam
    done, out = 0, {}
    for n in sorted(set(n_steps)):
        sources = ascend(divergence_at, sources, n - done, ascent, step_size)
        done, out[n] = n, sources
    return out
