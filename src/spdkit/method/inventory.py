"""What a model offers to decompose (`spdkit modules`): every decomposable module with its
kind, matrix shape and parameter count, which config pattern picks it, and a suggested C.

Models are built on PyTorch's meta device (shapes, no memory, no weights read), so listing a
large model is instant.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from spdkit.config import ModuleSpec
from spdkit.method.components import _components_class, is_decomposable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModuleRow:
    name: str
    kind: str  # the module's class
    d_in: int
    d_out: int
    pattern: str | None  # the first config pattern matching it
    C: int | None  # that pattern's C
    tied_to: str | None = None  # an earlier module holding the same weight (a tied lm_head)

    @property
    def params(self) -> int:
        return self.d_in * self.d_out

    @property
    def suggested_C(self) -> int:
        """max(d_in, d_out): VPD's choice for its 67M LM (c_fc 768 → 3072: C 3072), a start
        to be brought within ~2x of the alive count after a first run (VPD recipe)."""
        return max(self.d_in, self.d_out)


def module_rows(
    model: nn.Module,
    specs: list[ModuleSpec],
    extra: Sequence[tuple[str, int | None]] = (),
) -> list[ModuleRow]:
    """One row per decomposable module of `model`, in the model's order, with the config
    pattern (the first of `specs`) that picks it, else the first of the `extra` patterns
    (`spdkit modules --pattern P[:C]`) that would."""
    rows = []
    owner: dict[int, str] = {}  # id of a weight Parameter -> the first module holding it
    for name, module in model.named_modules():
        cls = _components_class(module) if name else None
        if cls is None:
            continue
        d_out, d_in = cls.target_weight(module).shape
        picks = [(s.pattern, s.C) for s in specs] + list(extra)
        pattern, C = next(((p, c) for p, c in picks if fnmatch.fnmatchcase(name, p)), (None, None))
        rows.append(
            ModuleRow(
                name,
                type(module).__name__,
                int(d_in),
                int(d_out),
                pattern,
                C,
                owner.get(id(module.weight)),
            )
        )
        owner.setdefault(id(module.weight), name)
    return rows


def format_rows(rows: list[ModuleRow], patterns: list[tuple[str, int | None]]) -> str:
    """A text table, then per (pattern, C or None) what it matches, or that it matches nothing."""
    width = max([len(r.name) for r in rows] + [6])
    lines = [
        f"{'module':<{width}}  {'kind':<10} {'d_in x d_out':>13} {'params':>11}  C (suggested)"
    ]
    for r in rows:
        chosen = f"{'?' if r.C is None else r.C} via {r.pattern}" if r.pattern else "-"
        tied = f"  tied to {r.tied_to}" if r.tied_to else ""
        lines.append(
            f"{r.name:<{width}}  {r.kind:<10} {f'{r.d_in} x {r.d_out}':>13} {r.params:>11,}  "
            f"{chosen} ({r.suggested_C}){tied}"
        )
    total = sum(r.params for r in rows if r.tied_to is None)  # a tied weight counts once
    lines.append(f"{len(rows)} decomposable modules, {total:,} parameters in their matrices")
    for pattern, C in patterns:
        matched = [r for r in rows if fnmatch.fnmatchcase(r.name, pattern)]
        n_params = sum(r.params for r in matched)
        head = f"pattern {pattern!r}" + (f" (C {C})" if C is not None else "")
        lines.append(
            f"{head}: {len(matched)} modules, {n_params:,} parameters"
            if matched
            else f"{head}: matches no decomposable module"
        )
    return "\n".join(lines)


def on_meta_device(build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` with every tensor on the meta device: shapes only, nothing allocated."""
    with torch.device("meta"):
        return build()


def decomposable_listing(model: nn.Module, shown: int = 12) -> str:
    """'(decomposable modules: a, b, ...)' for an error message: the first `shown` names, then
    how many more and where to see them all (a 135M LM has hundreds)."""
    names = [n for n, m in model.named_modules() if n and is_decomposable(m)]
    if not names:
        return "(the model has no decomposable module: nn.Linear, nn.Embedding, GPT-2 Conv1D)"
    head = ", ".join(names[:shown])
    more = len(names) - shown
    tail = f", ... and {more} more; `spdkit modules` lists them all" if more > 0 else ""
    return f"(decomposable modules: {head}{tail})"


def match_modules(model: nn.Module, specs: list[ModuleSpec]) -> dict[str, ModuleSpec]:
    """Module name → the spec (C, blocks) for every decomposable module matched by a pattern.

    Matched modules without weights of their own (activations, dropout, containers) are skipped,
    so `*.mlp.*` means "the MLP's matrices"; so are modules whose weights are all elementwise
    (LayerNorm, RMSNorm: `layers.0.*` means the layer's matrices), with a logged line. A pattern
    is an error if it matches nothing, only such modules, or a module that holds a weight
    matrix spdkit cannot decompose (a Conv2d): leaving those out would misdescribe the
    decomposition.
    """
    listing = decomposable_listing(model)
    modules = dict(model.named_modules())
    matched: dict[str, ModuleSpec] = {}
    for spec in specs:
        names = [n for n in modules if n and fnmatch.fnmatchcase(n, spec.pattern)]
        if not names:
            raise ValueError(f"module pattern {spec.pattern!r} matches nothing {listing}")
        for name in names:
            module = modules[name]
            own = list(module.parameters(recurse=False))
            if is_decomposable(module) or not own:
                continue
            if all(p.dim() <= 1 for p in own):  # LayerNorm, RMSNorm: no matrix to decompose
                log.info(
                    "pattern %r: skipping %s (%s): elementwise weights only, no matrix",
                    spec.pattern,
                    name,
                    type(module).__name__,
                )
                continue
            raise ValueError(
                f"pattern {spec.pattern!r} matches {name!r}, a {type(module).__name__} "
                f"that cannot be decomposed {listing}"
            )
        chosen = [n for n in names if is_decomposable(modules[n])]
        if not chosen:
            kinds = ", ".join(f"{n} ({type(modules[n]).__name__})" for n in names[:5])
            raise ValueError(
                f"pattern {spec.pattern!r} matches only modules that cannot be decomposed: "
                f"{kinds} {listing}"
            )
        for name in chosen:
            if name in matched:
                raise ValueError(f"module {name!r} is matched by more than one pattern")
            matched[name] = spec
    return matched
