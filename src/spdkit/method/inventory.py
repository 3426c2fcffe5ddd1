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
from spdkit.method.components import _components_class


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
