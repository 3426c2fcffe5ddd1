"""ComponentModel: a frozen target whose chosen modules can run from masked subcomponents.

The target is never wrapped or copied: its modules stay what they were. A step reads it
through two entry points, the whole of the engine:

    record = model.record(x)                          # no grad: what the target did on x
    y      = model.masked_forward(x, masks, record)   # modules in `masks` run ((a Vᵀ) ⊙ m) Uᵀ

`masked_forward` runs every masked pass of the method (all modules masked, one module, a
subset, per-position routing) by replacing the forwards of the modules it changes for the
duration of that one call (closures over the pass's masks; removed when it returns), so
nothing that describes a pass stays on a module. Its exact shortcuts are named in `Shortcuts`;
`spdkit.method.reference` calls it with them off.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from spdkit.config import CIFnConfig, IdentitySpec, MLPCIConfig, ModuleSpec, SPDConfig
from spdkit.engine.record import RUN, Record, assert_unchanged, record_forward, replay_plan
from spdkit.method.ci import CIFunction, ModuleSlot, build_ci_function
from spdkit.method.ci.base import key
from spdkit.method.components import (
    Components,
    EmbeddingComponents,
    is_decomposable,
    make_components,
)
from spdkit.method.identity import insert_identity, match_identity_sites


@dataclass(frozen=True)
class Shortcuts:
    """The exact shortcuts of `masked_forward`, each with an equivalence test
    (tests/test_shortcuts.py, tests/test_reference.py).

    reuse_inner: the first masked module's input in a pass is the target's (nothing before
        it is masked), so its h = a Vᵀ is the one the CI function already read: passed in as
        `inner`, not recomputed.
    replay_prefix: every module call that ends before the first masked module starts returns
        its recorded output instead of running (`spdkit.engine.record`): a pass that masks only layer
        k of L costs about (L − k) / L of a full forward (docs/benchmarks.md).
    """

    reuse_inner: bool = True
    replay_prefix: bool = True


ALL_SHORTCUTS = Shortcuts()
NO_SHORTCUTS = Shortcuts(reuse_inner=False, replay_prefix=False)


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


class ComponentModel(nn.Module):
    """A frozen target, each decomposed module's Components, and one causal-importance
    function over all of them (`self.ci`, of the kind `ci_fn` names; `spdkit.method.ci`)."""

    def __init__(
        self,
        target: nn.Module,
        specs: list[ModuleSpec],
        ci_hidden_dim: int | None = None,
        component_init: str = "target_projection",
        identity_specs: list[IdentitySpec] | None = None,
        ci_fn: CIFnConfig | None = None,
        prefix_replay: bool = True,
        output_field: str | None = None,
        delta: bool = False,
    ) -> None:
        """`ci_fn`: the CI function (kind, settings, lower sigmoid); without it the paper's
        `mlp` kind with d_gate `ci_hidden_dim` (default 16). `delta`: each decomposed module
        has the Δ-component W − U V as one more component, masked by `masked_forward`'s
        `delta` masks (VPD notes §2)."""
        super().__init__()
        if ci_fn is not None and ci_hidden_dim is not None:
            raise ValueError("give ci_fn (with its own settings) or ci_hidden_dim, not both")
        if ci_fn is None:
            ci_fn = MLPCIConfig(hidden_dim=ci_hidden_dim or 16, backend="eager")
        self.output_field = output_field  # which tensor of the target's output D compares
        self.delta = delta
        matched = match_modules(target, specs)
        # matched against the target's own modules, before anything is inserted
        identity_sites = match_identity_sites(target, identity_specs or [])
        target.requires_grad_(False)
        target.eval()
        self.target = target
        self.module_names: list[str] = []
        self.components_by_name = nn.ModuleDict()
        self._component_init = component_init
        # a property of the target: can its module calls be replayed (`spdkit.engine.record`)?
        self.shortcuts = Shortcuts(replay_prefix=prefix_replay)
        for name, C in matched.items():
            self._decompose(name, C)
        self.identity_modules: dict[str, int] = {}  # inserted identity name -> d
        for site, (d, C) in identity_sites.items():
            name = insert_identity(target, site, d)
            self._decompose(name, C)
            self.identity_modules[name] = d
        slots = [
            ModuleSlot(n, c.C, c.d_in, reads_inner=isinstance(c, EmbeddingComponents))
            for n, c in ((n, self.components(n)) for n in self.module_names)
        ]
        self.ci: CIFunction = build_ci_function(ci_fn, slots)

    @classmethod
    def from_config(cls, target: nn.Module, config: SPDConfig) -> ComponentModel:
        """The component model a run's config describes."""
        return cls(
            target,
            config.modules,
            component_init=config.components.init,
            identity_specs=config.insert_identity,
            ci_fn=config.ci_fn,
            prefix_replay=config.engine.prefix_replay,
            output_field=getattr(config.target, "output", None),
            delta=config.components.delta,
        )

    def _decompose(self, name: str, C: int) -> None:
        """Give target module `name` C subcomponents."""
        original = self.target.get_submodule(name)
        components = make_components(original, C)
        if self._component_init == "target_projection":
            components.init_from_target(components.target_weight(original))
        self.module_names.append(name)
        self.components_by_name[key(name)] = components

    # --- parts -----------------------------------------------------------------------------
    def components(self, name: str) -> Components:
        return self.components_by_name[key(name)]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """U, V of every module, then the CI function's weights (the target stays frozen)."""
        return self.component_parameters() + list(self.ci.parameters())

    def component_parameters(self) -> list[nn.Parameter]:
        """U, V of every module, in `module_names` order."""
        return [p for n in self.module_names for p in self.components(n).parameters()]

    def target_weight(self, name: str) -> Tensor:
        return self.components(name).target_weight(self.target.get_submodule(name))

    # --- the engine ------------------------------------------------------------------------
    def record(self, x: Tensor) -> Record:
        """The target forward on x (no grad) as a frozen `Record`: output, each decomposed
        module's input a^l, their execution order, and what a masked pass may replay."""
        return record_forward(
            self.target, x, self.module_names, lambda out: model_output(out, self.output_field)
        )

    def masked_forward(
        self,
        x: Tensor,
        masks: Mapping[str, Tensor],
        record: Record | None = None,
        *,
        inner: Mapping[str, Tensor] | None = None,
        routes: Mapping[str, Tensor] | None = None,
        shortcuts: Shortcuts | None = None,
        delta: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """f(x | W'): each module l in `masks` computes ((a Vᵀ) ⊙ m^l) Uᵀ (+ b) from its input a
        in this pass, with m^l [..., C] broadcast over the positions; every other module runs
        its original weights. The original matmul of a masked module never runs, except when
        `delta[l]` [..., 1] masks its Δ-component W − U V (`_with_delta`; a model built with
        `delta`; a module without one leaves Δ out).

        routes[l] (bool [...], optional) is subset routing: module l is masked at the
        positions where it is True and runs its original weights elsewhere.
        `record` (of this same x) enables the shortcuts; `inner[l]` is h = a Vᵀ of the
        target's input, used by `reuse_inner` for the first masked module. `shortcuts`
        defaults to the model's (`prefix_replay` from the config).
        """
        shortcuts = shortcuts or self.shortcuts
        if not masks:
            return model_output(self.target(x), self.output_field)
        if delta and not self.delta:
            raise ValueError("Δ-component masks given, but this model has no Δ-component")
        first = record.first(masks) if record is not None else None
        forwards: dict[str, Callable[..., Any]] = {}
        for name, mask in masks.items():
            reuse = shortcuts.reuse_inner and inner is not None and name == first
            forwards[name] = _masked_forward_of(
                self.components(name),
                mask,
                inner[name] if reuse else None,  # type: ignore[index]
                routes.get(name) if routes is not None else None,
                delta.get(name) if delta is not None else None,
            )
        plan = {}
        if shortcuts.replay_prefix and record is not None:
            plan = replay_plan(record, record.starts[first])  # type: ignore[index]
            forwards.update({n: _replaying(actions) for n, actions in plan.items()})
        with _forwards_replaced(self.target, forwards):
            y = model_output(self.target(x), self.output_field)
        if plan:
            assert_unchanged(record)  # type: ignore[arg-type]
        return y

    def forward(
        self,
        x: Tensor,
        masks: Mapping[str, Tensor] | None = None,
        delta: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """f(x | W') without a record (no shortcuts): the plain masked forward, for analyses."""
        return self.masked_forward(x, masks or {}, delta=delta)

    def inner_acts(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """h [..., C] = a @ Vᵀ for each module, from its (target) input."""
        return {n: self.components(n).inner(inputs[n]) for n in self.module_names}

    def causal_importances(
        self, inputs: Mapping[str, Tensor], inner: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Per module (g, g⁺) [..., C]: σ_H,lower (for masks) and σ_H,upper (penalised) of the
        CI function's output, from the record's inputs a^l and the inner activations h^l."""
        return self.ci(inputs, inner)

    def ones_masks(self) -> dict[str, Tensor]:
        """Masks of all ones [C] (broadcast over the batch): the unmasked sum of components."""
        return {n: self.components(n).V.new_ones(self.components(n).C) for n in self.module_names}


# A replaced forward receives the module's previous forward (to run the original weights)
ForwardFactory = Callable[[Callable[..., Any]], Callable[..., Any]]


def _masked_forward_of(
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
                out = _with_delta(components, h, mask, delta, y)
            else:
                out = components.outer(h * mask)
            if route is not None:
                out = torch.where(route.unsqueeze(-1), out, y)
            return out

        return forward

    return factory


def _with_delta(
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


def _replaying(actions: list[Any]) -> ForwardFactory:
    """The forward of a module whose first calls in the pass return recorded outputs."""

    def factory(original: Callable[..., Any]) -> Callable[..., Any]:
        remaining = iter(actions)

        def forward(*args: Any, **kwargs: Any) -> Any:
            action = next(remaining, RUN)
            return original(*args, **kwargs) if action is RUN else action

        return forward

    return factory


@contextlib.contextmanager
def _forwards_replaced(
    target: nn.Module, factories: Mapping[str, ForwardFactory]
) -> Iterator[None]:
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
