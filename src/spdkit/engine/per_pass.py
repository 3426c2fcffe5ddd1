"""Shortcut 3 of the step (docs/engine.md): per-pass backward. The terms of one step are
accumulated here; with the shortcut on, each masked pass is differentiated as soon as its term
is known, so a step's memory is one pass plus the CI graph, whatever the number of passes.
Exact up to float summation order (tests/test_step.py)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


class StepLoss:
    """The weighted terms of one step and their backward.

    Per-pass backward (`per_pass_backward`, on by default) is a memory shortcut, exact up to
    float summation order: the masked passes read the CI outputs g and the inner activations h
    through detached copies (`cut`); each pass's term is differentiated as soon as it is
    known, which frees that pass's graph and adds ∂L_pass/∂g to the copy's .grad; `finish`
    then runs one backward through the CI graph with those gradients (the chain rule):

        ∂total/∂θ = ∂(rest)/∂θ + Σ_pass [∂L_pass/∂θ]_direct + Σ_pass ⟨∂L_pass/∂g, ∂g/∂θ⟩

    so peak memory is one masked pass plus the CI graph, not 1 + L (+ 1) passes at once.
    With it off, every term stays in one graph and one backward runs at the end.
    """

    def __init__(self, coeffs: Mapping[str, float], per_pass: bool) -> None:
        self.coeffs = coeffs
        self.grad = torch.is_grad_enabled()
        self.per_pass = per_pass and self.grad
        self.values: dict[str, Tensor] = {}  # detached
        self.graph: list[Tensor] = []  # weighted terms still holding their graph
        self.cuts: list[tuple[Tensor, Tensor]] = []  # (source in the CI graph, its copy)

    def cut(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if not self.per_pass:
            return dict(tensors)
        copies = {}
        for name, t in tensors.items():
            copies[name] = t.detach().requires_grad_(t.requires_grad)
            self.cuts.append((t, copies[name]))
        return copies

    def add(self, name: str, value: Tensor) -> None:
        """One pass's share of term `name` (its value, with graph)."""
        previous = self.values.get(name)
        self.values[name] = value.detach() if previous is None else previous + value.detach()
        weighted = self.coeffs[name] * value
        if not weighted.requires_grad:
            return
        if self.per_pass:
            weighted.backward()
        else:
            self.graph.append(weighted)

    def finish(self, **rest: Tensor) -> dict[str, Tensor]:
        """Add the terms computed once per step (with graph), run the remaining backward and
        return every term's value and "total"."""
        for name, value in rest.items():
            self.values[name] = value.detach()
            self.graph.append(self.coeffs[name] * value)
        if self.grad:
            outputs = [t for t in self.graph if t.requires_grad]
            grads: list[Tensor | None] = [None] * len(outputs)
            for source, copy in self.cuts:
                if copy.grad is not None and source.requires_grad:
                    outputs.append(source)
                    grads.append(copy.grad)
            if outputs:
                torch.autograd.backward(outputs, grads)
        terms = {k: self.values[k] for k in self.coeffs if k in self.values}  # canonical order
        terms["total"] = sum(self.coeffs[k] * v for k, v in terms.items())  # type: ignore[assignment]
        return terms
