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

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

from spdkit.config import (
    APDConfig,
    CIFnConfig,
    IdentitySpec,
    MLPCIConfig,
    ModuleSpec,
    SPDConfig,
)
from spdkit.engine.record import Record, assert_unchanged, record_forward, replay_plan
from spdkit.method.apd import (
    APDSelection,
    batch_top_k,
    full_rank,
    gradient_attributions,
    repeat_per_rank,
)
from spdkit.method.ci import CIFunction, ModuleSlot, build_ci_function
from spdkit.method.ci.base import key
from spdkit.method.components import (
    Components,
    EmbeddingComponents,
    make_components,
)
from spdkit.method.forwards import (
    forwards_replaced,
    masked_forward_of,
    model_output,
    replaying,
)
from spdkit.method.identity import insert_identity, match_identity_sites
from spdkit.method.inventory import match_modules


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
        apd: APDConfig | None = None,
    ) -> None:
        """`ci_fn`: the CI function (kind, settings, lower sigmoid); without it the paper's
        `mlp` kind with d_gate `ci_hidden_dim` (default 16). `delta`: each decomposed module
        has the Δ-component W − U V as one more component, masked by `masked_forward`'s
        `delta` masks (VPD notes §2). `apd`: the model is APD's (`spdkit.method.apd`): a
        module spec's C counts parameter components, each r rank-one subcomponents here, and
        no CI function is learnt."""
        super().__init__()
        if ci_fn is not None and ci_hidden_dim is not None:
            raise ValueError("give ci_fn (with its own settings) or ci_hidden_dim, not both")
        if ci_fn is None:
            ci_fn = MLPCIConfig(hidden_dim=ci_hidden_dim or 16, backend="eager")
        self.output_field = output_field  # which tensor of the target's output D compares
        self.delta = delta
        self.apd = apd
        self.apd_ranks: dict[str, int] = {}  # APD: each module's component rank r
        matched = match_modules(target, specs)
        # matched against the target's own modules, before anything is inserted
        identity_sites = match_identity_sites(target, identity_specs or [])
        if identity_sites:  # inserting adds modules and hooks: to a copy, not the caller's model
            target = copy.deepcopy(target)
        target.requires_grad_(False)
        target.eval()
        self.target = target
        self.module_names: list[str] = []
        self.components_by_name = nn.ModuleDict()
        self._component_init = component_init
        # a property of the target: can its module calls be replayed (`spdkit.engine.record`)?
        self.shortcuts = Shortcuts(replay_prefix=prefix_replay)
        for name, spec in matched.items():
            self._decompose(name, spec.C, spec.blocks, spec.block_axis)
        self.identity_modules: dict[str, int] = {}  # inserted identity name -> d
        for site, (d, C) in identity_sites.items():
            name = insert_identity(target, site, d)
            self._decompose(name, C)
            self.identity_modules[name] = d
        reads = getattr(ci_fn, "reads", "input")
        slots = [
            ModuleSlot(n, c.C, c.d_in, "inner" if isinstance(c, EmbeddingComponents) else reads)
            for n, c in ((n, self.components(n)) for n in self.module_names)
        ]
        self.ci: CIFunction = APDSelection(slots) if apd else build_ci_function(ci_fn, slots)

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
            apd=config.apd,
        )

    def _decompose(
        self, name: str, C: int, blocks: int = 1, block_axis: Literal["out", "in"] = "out"
    ) -> None:
        """Give target module `name` C subcomponents, in `blocks` blocks along `block_axis`
        (`Components.restrict_to_blocks`)."""
        original = self.target.get_submodule(name)
        if self.apd is not None:  # C components of rank r: C·r rank-one subcomponents
            if blocks > 1:
                raise ValueError(f"module {name!r}: blocks are not supported with objective apd")
            rank = self.apd.rank or full_rank(make_components(original, 1))
            self.apd_ranks[name] = rank
            C = C * rank
        components = make_components(original, C)
        try:
            components.restrict_to_blocks(blocks, block_axis)
        except ValueError as e:
            raise ValueError(f"module {name!r}: {e}") from None
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
        `delta[l]` [..., 1] masks its Δ-component W − U V (`with_delta`; a model built with
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
            forwards[name] = masked_forward_of(
                self.components(name),
                mask,
                inner[name] if reuse else None,  # type: ignore[index]
                routes.get(name) if routes is not None else None,
                delta.get(name) if delta is not None else None,
            )
        plan = {}
        if shortcuts.replay_prefix and record is not None:
            plan = replay_plan(record, record.starts[first])  # type: ignore[index]
            forwards.update({n: replaying(actions) for n, actions in plan.items()})
        with forwards_replaced(self.target, forwards):
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

    def importances(self, x: Tensor, record: Record) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Per module (g, g⁺) [..., C] on input x (`record` = `self.record(x)`): the CI
        function's (SPD), or APD's top-k selection s(x) repeated over each component's rank-one
        pieces (both entries the same binary mask). Every analysis reads a run's importances
        here, so it reads an APD run the same way."""
        if self.apd is None:
            return self.causal_importances(record.inputs, self.inner_acts(record.inputs))
        s = self.apd_selection(x).to(record.output.dtype)
        masks = {n: repeat_per_rank(s, self.apd_ranks[n]) for n in self.module_names}
        return masks, masks

    def apd_selection(self, x: Tensor) -> Tensor:
        """APD's s(x) (bool [B, C]): batch top-k (or per-input top-k) of the components'
        gradient attributions, with the target's gradients or the summed components'."""
        apd = self.apd
        if apd is None:
            raise ValueError("apd_selection: this model is SPD's, not APD's")
        modules = {n: self.target.get_submodule(n) for n in self.module_names}
        pieces = {n: (self.components(n), self.apd_ranks[n]) for n in self.module_names}
        if apd.attributions_from == "target":
            run = lambda: model_output(self.target(x), self.output_field)  # noqa: E731
        else:
            run = lambda: self.masked_forward(x, self.ones_masks())  # noqa: E731
        return batch_top_k(gradient_attributions(run, modules, pieces), apd.top_k, apd.batch_top_k)

    def causal_importances(
        self, inputs: Mapping[str, Tensor], inner: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Per module (g, g⁺) [..., C]: σ_H,lower (for masks) and σ_H,upper (penalised) of the
        CI function's output, from the record's inputs a^l and the inner activations h^l."""
        return self.ci(inputs, inner)

    def ones_masks(self) -> dict[str, Tensor]:
        """Masks of all ones [C] (broadcast over the batch): the unmasked sum of components."""
        return {n: self.components(n).V.new_ones(self.components(n).C) for n in self.module_names}
