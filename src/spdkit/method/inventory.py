"""What a model offers to decompose (`spdkit modules`): every decomposable module with its
kind, matrix shape and parameter count, which config pattern picks it, and a suggested C.

Models are built on PyTorch's meta device (shapes, no memory, no weights read), so listing a
large model is instant.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from spdkit.config import ModuleSpec
from spdkit.method.components import _components_class, is_decomposable


@dataclass(frozen=True)
class ModuleRow:
    name: str
    kind: str  # the module's class
    d_in: int
    d_out: int
    pattern: str | None  # the first config pattern matching it
    C: int | None  # that pattern's C

    @property
    def params(self) -> int:
        return self.d_in * self.d_out

    @property
    def suggested_C(self) -> int:
        """max(d_in, d_out): VPD's choice for its 67M LM (c_fc 768 → 3072: C 3072), a start
        to be brought within ~2x of the alive count after a first run (VPD recipe)."""
        return max(self.d_in, self.d_out)


def module_rows(model: nn.Module, specs: list[ModuleSpec]) -> list[ModuleRow]:
    """One row per decomposable module of `model`, in the model's order, with the config
    pattern (the first of `specs`) that picks it."""
    rows = []
    for name, module in model.named_modules():
        cls = _components_class(module) if name else None
        if cls is None:
            continue
        d_out, d_in = cls.target_weight(module).shape
        spec = next((s for s in specs if fnmatch.fnmatchcase(name, s.pattern)), None)
        rows.append(
            ModuleRow(
                name,
                type(module).__name__,
                int(d_in),
                int(d_out),
                spec.pattern if spec else None,
                spec.C if spec else None,
            )
        )
    return rows


def format_rows(rows: list[ModuleRow], patterns: list[tuple[str, int | None]]) -> str:
    """A text table, then per (pattern, C or None) what it matches, or that it matches nothing."""
    width = max([len(r.name) for r in rows] + [6])
    lines = [
        f"{'module':<{width}}  {'kind':<10} {'d_in x d_out':>13} {'params':>11}  C (suggested)"
    ]
    for r in rows:
        chosen = f"{r.C} via {r.pattern}" if r.pattern else "-"
        lines.append(
            f"{r.name:<{width}}  {r.kind:<10} {f'{r.d_in} x {r.d_out}':>13} {r.params:>11,}  "
            f"{chosen} ({r.suggested_C})"
        )
    total = sum(r.params for r in rows)
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


def on_meta_device(build) -> nn.Module:  # noqa: ANN001
    """`build()` with every tensor on the meta device: shapes only, nothing allocated."""
    with torch.device("meta"):
        return build()


def match_modules(model: nn.Module, specs: list[ModuleSpec]) -> dict[str, int]:
    """Module name → C for every decomposable module matched by a pattern.

    Matched modules without weights of their own (activations, dropout, containers) are skipped,
    so `*.mlp.*` means "the MLP's matrices". A pattern is an error if it matches nothing, only
    such modules, or a module that holds weights spdkit cannot decompose (a LayerNorm, a Conv2d):
    silently leaving those out would misdescribe the decomposition.
    """
    decomposable = [n for n, m in model.named_modules() if n and is_decomposable(m)]
    listing = f"(decomposable modules: {', '.join(decomposable) or 'none'})"
    modules = dict(model.named_modules())
    matched: dict[str, int] = {}
    for spec in specs:
        names = [n for n in modules if n and fnmatch.fnmatchcase(n, spec.pattern)]
        if not names:
            raise ValueError(f"module pattern {spec.pattern!r} matches nothing {listing}")
        for name in names:
            module = modules[name]
            if not is_decomposable(module) and any(True for _ in module.parameters(recurse=False)):
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
            matched[name] = spec.C
    return matched
