"""The module forwards of one masked pass: closures over that pass's masks, installed on the
target's modules for the duration of one `ComponentModel.masked_forward` call and removed when
it returns (also when it fails), so nothing that describes a pass stays on a module.

    masked module      ((a Vᵀ) ⊙ m) Uᵀ (+ b)          (+ m_Δ · a Δᵀ with the Δ-component)
    routed module      torch.where(route, masked, original) per position
    replayed module    the recorded output of its first calls (prefix replay, `engine.record`)

Also how a target's output is read (`model_output`: a tensor, or one field of a model output
object such as Hugging Face's `logits`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from spdkit.engine.record import RUN
from spdkit.method.components import Components

# A replaced forward receives the module's previous forward (to run the original weights)
ForwardFactory = Callable[[Callable[..., Any]], Callable[..., Any]]


def masked_forward_of(
    components: Components,
    mask: Tensor,
    inner: Tensor | None,
    route: Tensor | None,
    delta: Tensor | None = None,
) -> ForwardFactory:
    """The forward of a masked module: ((a Vᵀ) ⊙ m) Uᵀ (+ b), h reused if given; with a Δ
    mask, the Δ-component too; with a route, torch.where(route, masked, original) per
    position."""

    def factory(original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Tensor:
            if mask.shape[-1] != components.C:
                raise ValueError(
                    f"a mask needs C = {components.C} entries, got {mask.shape[-1]} (the "
                    "Δ-component's mask is given apart: masked_forward(..., delta=...))"
                )
            a = args[0] if args else next(iter(kwargs.values()))
            h = inner if inner is not None else components.inner(a)
            # the original weights' output, when the Δ-component or a route needs it
            y = original(*args, **kwargs) if delta is not None or route is not None else None
            if delta is not None:
                out = with_delta(components, h, mask, delta, y)
            else:
                out = components.outer(h * mask)
            if route is not None:
                out = torch.where(route.unsqueeze(-1), out, y)
            return out

        return forward

    return factory


def with_delta(
    components: Components, h: Tensor, m: Tensor, m_delta: Tensor, y_target: Tensor
) -> Tensor:
    """The masked module with the Δ-component (VPD notes §2): m [..., C], m_Δ [..., 1],

        y = ((a Vᵀ) ⊙ m) Uᵀ + m_Δ · a Δᵀ + b,   Δ = W − U V   (not detached: U, V learn
                                                  through it too)
          = ((a Vᵀ) ⊙ (m − m_Δ)) Uᵀ + m_Δ · (a Wᵀ) + b

    with a Wᵀ = y_target − b the module's own output without its bias: at m = 1, m_Δ = 1 the
    module is exactly the target's, whatever U V is."""
    bias = components.bias if components.bias is not None else 0.0
    return components.outer(h * (m - m_delta)) + m_delta * (y_target - bias)


def replaying(actions: list[Any]) -> ForwardFactory:
    """The forward of a module whose first calls in the pass return recorded outputs."""

    def factory(original: Callable[..., Any]) -> Callable[..., Any]:
        remaining = iter(actions)

        def forward(*args: Any, **kwargs: Any) -> Any:
            action = next(remaining, RUN)
            return original(*args, **kwargs) if action is RUN else action

        return forward

    return factory


@contextlib.contextmanager
def forwards_replaced(target: nn.Module, factories: Mapping[str, ForwardFactory]) -> Iterator[None]:
    """While open, module `name`'s forward is `factories[name](its previous forward)` (an
    instance attribute, so hooks still run); on exit every module is as it was."""
    saved: list[tuple[nn.Module, Any]] = []
    try:
        for name, factory in factories.items():
            module = target.get_submodule(name)
            saved.append((module, module.__dict__.get("forward")))
            module.forward = factory(module.forward)
        yield
    finally:
        for module, previous in reversed(saved):
            if previous is None:
                del module.forward
            else:
                module.forward = previous


def model_output(out: object, field: str | None = None) -> Tensor:
    """The tensor the divergence compares: the output's `field` (a Hugging Face ModelOutput's
    `last_hidden_state`, say) if one is named, else the output itself, its `.logits`, or the
    first element of a tuple."""
    if field is not None:
        value = out.get(field) if isinstance(out, Mapping) else getattr(out, field, None)
        if isinstance(value, Tensor):
            return value
        raise ValueError(
            f"target.output {field!r}: the target's {type(out).__name__} has no such tensor "
            f"(it has: {', '.join(output_fields(out)) or 'none'})"
        )
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise ValueError(
        f"the target returned a {type(out).__name__} without logits; name the tensor to compare "
        f"with target.output (it has: {', '.join(output_fields(out)) or 'none'})"
    )


def output_fields(out: object) -> list[str]:
    """The tensor fields of a model's output (a ModelOutput is a Mapping of them)."""
    items = out.items() if isinstance(out, Mapping) else vars(out).items()
    return [k for k, v in items if isinstance(v, Tensor)]


def split_delta_slot(
    masks: Mapping[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Masks drawn with the Δ-component's slot last ([..., C + 1], `with_delta_slot`) →
    (the components' masks [..., C], the Δ-component's [..., 1]), for `masked_forward`."""
    return {n: m[..., :-1] for n, m in masks.items()}, {n: m[..., -1:] for n, m in masks.items()}
