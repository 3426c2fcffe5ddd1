"""ComponentModel: a frozen target whose chosen modules can run from masked subcomponents.

Each decomposed module is swapped in place for a `DecomposedModule` that either runs the
original module (and can record its input), or, when a mask is set, runs only the components:
the original matmul is then never computed. One forward can mask any subset of modules, which
gives the target forward, the all-layers masked forward and each layerwise forward.
"""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from spdkit.components import Components, is_decomposable, make_components
from spdkit.config import IdentitySpec, ModuleSpec
from spdkit.identity import insert_identity, match_identity_sites
from spdkit.importance import CausalImportance

_RECORD_COUNTER = itertools.count()


class DecomposedModule(nn.Module):
    """Stands in for one target module; dispatches between the original and its components."""

    def __init__(self, original: nn.Module, components: Components) -> None:
        super().__init__()
        self.original = original
        self.components = components
        self.mask: Tensor | None = None
        self.inner: Tensor | None = None  # precomputed x @ Vᵀ for this forward's input
        # batched layerwise passes: only rows [start, stop) of the batch run from the masked
        # components; every other row runs the original module
        self.rows: tuple[int, int] | None = None
        self.record_input = False
        self.recorded_input: Tensor | None = None
        self.recorded_output: Tensor | None = None
        self.recorded_version = 0  # its version counter when produced (in-place edits show)
        self.record_order = 0  # when it ran in the last recording forward
        # the target's output for this forward's input, to return instead of recomputing it
        self.known_output: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.mask is not None and self.rows is not None:
            start, stop = self.rows
            masked = self._masked(x[start:stop])
            out = self.original(x)
            return torch.cat([out[:start], masked, out[stop:]])
        if self.mask is not None:
            return self._masked(x)
        if self.known_output is not None:
            return self.known_output
        if self.record_input:
            if self.recorded_input is not None:
                raise ValueError(
                    "a decomposed module ran twice in one forward (shared weights); "
                    "decompose a module that is called once per forward"
                )
            self.recorded_input = x
            self.record_order = next(_RECORD_COUNTER)
            self.recorded_output = self.original(x)
            self.recorded_version = self.recorded_output._version
            return self.recorded_output
        return self.original(x)

    def _masked(self, x: Tensor) -> Tensor:
        if self.inner is not None:
            return self.components.outer(self.inner * self.mask)
        return self.components(x, self.mask)


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


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


class ComponentModel(nn.Module):
    """A frozen target plus, for each decomposed module, its Components and CI functions.

    The target is modified in place (its decomposed modules are wrapped) and never copied.
    """

    def __init__(
        self,
        target: nn.Module,
        specs: list[ModuleSpec],
        ci_hidden_dim: int,
        component_init: str = "target_projection",
        identity_specs: list[IdentitySpec] | None = None,
    ) -> None:
        super().__init__()
        matched = match_modules(target, specs)
        # matched against the target's own modules, before anything is inserted or wrapped
        identity_sites = match_identity_sites(target, identity_specs or [])
        target.requires_grad_(False)
        target.eval()
        self.target = target
        self.module_names: list[str] = []
        self.decomposed: dict[str, DecomposedModule] = {}
        self.ci_fns = nn.ModuleDict()
        self._ci_hidden_dim, self._component_init = ci_hidden_dim, component_init
        for name, C in matched.items():
            self._decompose(name, C)
        self.identity_modules: dict[str, int] = {}  # inserted identity name -> d
        for site, (d, C) in identity_sites.items():
            name = insert_identity(target, site, d)
            self._decompose(name, C)
            self.identity_modules[name] = d
        # decomposed modules in the order the target runs them (known after a recording forward)
        self.execution_order: list[str] = list(matched)
        self._output_versions: dict[str, int] = {}  # of the last recorded target outputs

    def set_ci_backend(self, backend: str, device: torch.device | str) -> str:
        """Run every CI function with `backend` ("auto", "fused", "compiled", "eager"); returns
        the one used. Training and evaluation must agree: the backends match only to float
        rounding, and a loaded run should reproduce its summary's numbers exactly."""
        return {ci.set_backend(backend, device) for ci in self.ci_fns.values()}.pop()

    def _decompose(self, name: str, C: int) -> None:
        """Wrap target module `name` with C subcomponents and give it CI functions."""
        original = self.target.get_submodule(name)
        components = make_components(original, C)
        if self._component_init == "target_projection":
            components.init_from_target(components.target_weight(original))
        wrapper = DecomposedModule(original, components)
        _set_submodule(self.target, name, wrapper)
        self.module_names.append(name)
        self.decomposed[name] = wrapper
        self.ci_fns[_key(name)] = CausalImportance(C, self._ci_hidden_dim)

    # --- parts -----------------------------------------------------------------------------
    def components(self, name: str) -> Components:
        return self.decomposed[name].components

    def ci_fn(self, name: str) -> CausalImportance:
        return self.ci_fns[_key(name)]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """U, V of every module and the CI MLPs' weights (the target stays frozen)."""
        params = [p for n in self.module_names for p in self.components(n).parameters()]
        return params + list(self.ci_fns.parameters())

    def target_weight(self, name: str) -> Tensor:
        wrapper = self.decomposed[name]
        return wrapper.components.target_weight(wrapper.original)

    # --- forwards --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _masks(
        self,
        masks: Mapping[str, Tensor],
        inner: Mapping[str, Tensor],
        known_outputs: Mapping[str, Tensor],
    ) -> Iterator[None]:
        for name, mask in masks.items():
            self.decomposed[name].mask = mask
            self.decomposed[name].inner = inner.get(name)
        for name, out in known_outputs.items():
            self.decomposed[name].known_output = out
        try:
            yield
        finally:
            for name in masks:
                self.decomposed[name].mask = None
                self.decomposed[name].inner = None
            for name in known_outputs:
                self.decomposed[name].known_output = None

    def forward(
        self,
        x: Tensor,
        masks: Mapping[str, Tensor] | None = None,
        inner: Mapping[str, Tensor] | None = None,
        target_outputs: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """Target forward where the modules named in `masks` run from masked components.

        `inner` may give a module's inner activations x @ Vᵀ when its input in this forward is
        known to equal the target's (a layerwise pass: every earlier module is the original),
        which saves recomputing that matmul; the result is identical.

        `target_outputs` (from `target_forward_record` on this same x) lets every unmasked
        module that runs before the first masked one return the target's output instead of
        recomputing it. That is exact: until a masked module runs, the forward *is* the
        target's forward on x, and nothing upstream is trainable, so no gradient is lost.
        """
        masks = masks or {}
        known = self.upstream_of(masks, target_outputs) if target_outputs and masks else {}
        with self._masks(masks, inner or {}, known):
            return model_output(self.target(x))

    def upstream_of(
        self, masked: Iterable[str], target_outputs: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """The target outputs of the decomposed modules that run before every module in
        `masked` (by the recorded execution order)."""
        first = min(self.execution_order.index(n) for n in masked)
        return {
            n: target_outputs[n]
            for n in self.execution_order[:first]
            # skipped if missing or edited in place since it was recorded
            if n in target_outputs and target_outputs[n]._version == self._output_versions.get(n)
        }

    def layerwise_forward(
        self, x: Tensor, masks: Mapping[str, Tensor], inner: Mapping[str, Tensor]
    ) -> list[Tensor]:
        """The L layerwise outputs (module n masked, every other module original), as one
        forward over the batch repeated L times: chunk i masks module i only. The same
        arithmetic as L separate forwards, in bigger ops; costs one extra original-module
        pass over each chunk that is masked. `inner[n]` is module n's x @ Vᵀ (target input)."""
        names = list(masks)
        B = x.shape[0]
        for i, name in enumerate(names):
            wrapper = self.decomposed[name]
            wrapper.mask, wrapper.inner, wrapper.rows = (
                masks[name],
                inner.get(name),
                (
                    i * B,
                    (i + 1) * B,
                ),
            )
        try:
            y = model_output(self.target(torch.cat([x] * len(names))))
        finally:
            for name in names:
                wrapper = self.decomposed[name]
                wrapper.mask = wrapper.inner = wrapper.rows = None
        return list(y.split(B))

    def target_forward_with_inputs(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """One no-grad target forward; returns the output and each decomposed module's input."""
        y, inputs, _ = self.target_forward_record(x)
        return y, inputs

    @torch.no_grad()
    def target_forward_record(
        self, x: Tensor
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """One no-grad target forward; returns the output and each decomposed module's input
        and output, and records the order the modules ran in."""
        for wrapper in self.decomposed.values():
            wrapper.record_input = True
        try:
            y = model_output(self.target(x))
            missing = [n for n in self.module_names if self.decomposed[n].recorded_input is None]
            if missing:
                raise ValueError(
                    f"decomposed module(s) {missing} did not run in the target's forward; "
                    "decompose only modules the forward uses"
                )
            inputs = {n: self.decomposed[n].recorded_input for n in self.module_names}
            # an output the forward edited in place no longer equals what the module returned
            outputs = {
                n: w.recorded_output
                for n, w in self.decomposed.items()
                if w.recorded_output is not None
                and w.recorded_output._version == w.recorded_version
            }
            self._output_versions = {n: t._version for n, t in outputs.items()}
            self.execution_order = sorted(
                self.module_names, key=lambda n: self.decomposed[n].record_order
            )
        finally:
            for wrapper in self.decomposed.values():
                wrapper.record_input = False
                wrapper.recorded_input = wrapper.recorded_output = None
        return y, inputs, outputs  # type: ignore[return-value]

    @property
    def first_module(self) -> str:
        """The decomposed module the target runs first: in any masked forward its input is the
        target's (nothing before it is masked), so its inner activations can be reused."""
        return self.execution_order[0]

    def inner_acts(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """h [..., C] = a @ Vᵀ for each module, from its (target) input."""
        return {n: self.components(n).inner(inputs[n]) for n in self.module_names}

    def causal_importances(
        self, inner: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Per module (g, g⁺) [..., C]: σ_H,lower (for masks) and σ_H,upper (penalised) of the
        CI MLP outputs."""
        pairs = {n: self.ci_fn(n)(inner[n]) for n in self.module_names}
        return {n: p[0] for n, p in pairs.items()}, {n: p[1] for n, p in pairs.items()}

    def ones_masks(self) -> dict[str, Tensor]:
        """Masks of all ones [C] (broadcast over the batch): the unmasked sum of components."""
        return {n: self.components(n).V.new_ones(self.components(n).C) for n in self.module_names}


def model_output(out: object) -> Tensor:
    """The tensor the divergence compares: the output itself, `.logits` of a Hugging Face
    ModelOutput, or the first element of a tuple."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(
        f"the target returned a {type(out).__name__}; spdkit needs a Tensor, a tuple starting "
        "with one, or an object with `.logits`"
    )


def _key(name: str) -> str:
    """ModuleDict keys cannot contain '.'."""
    return name.replace(".", "__")
