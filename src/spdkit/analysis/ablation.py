"""Mechanisms measured by what they do: the loss a set of subcomponents costs when removed.

Two ways to remove subcomponents c ∈ S, side by side (`spdkit ablate`):

- **CI-gated** (the decomposition's own semantics): the masked model with masks m = g (the CI
  of this input) and m_c = 0 for c ∈ S. Its baseline is the masked model with m = g; ablating
  everything decomposed is m = 0. With `Gate("rounded", τ)` the masks start from 1[g > τ]
  instead: every piece the CI calls needed counts whole (a piece with τ < g < 1 is half
  removed already under m = g, so a decomposition whose CI sits between τ and 1 can lose a
  task at its own baseline while its rounded masks keep it).
- **static edit** (what a weight edit does): the target with W' = W − Σ_{c∈S} U[:, c] V[c, :]
  in every module S touches, for every input. Its baseline is the target itself; ablating
  everything decomposed leaves W − U V (the part of W no subcomponent holds).

The loss is next-token cross-entropy on *position groups*: a target with planted mechanisms
gives one group per task (its scored positions, `TargetKind.position_groups`); any other
language model one group, `all`, every position of held-out sequences.

What a clustering's sets of clusters cost, scored per group: `spdkit.analysis.mechanism_score`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.func import functional_call

from spdkit.analysis.decomposed import Decomposed
from spdkit.analysis.mechanisms.clusters import Cluster
from spdkit.method.forwards import model_output
from spdkit.method.model import ComponentModel
from spdkit.targets import eval_data_source, reports_lm, target_kind
from spdkit.targets.transformer import scored_token_ce

Off = dict[str, list[int]]  # module -> subcomponent indices removed
Groups = dict[str, tuple[Tensor, Tensor]]  # group -> (ids [B, T], scored [B, T] bool)


def position_groups(decomp: Decomposed, n: int, seed: int = 0) -> Groups:
    """The position groups an ablation is scored on: the target's own (`planted_lm`: one per
    task) or `all`: every position of n held-out sequences. Drawn from seed run seed + 5000 +
    `seed`, apart from the training and evaluation draws."""
    config = decomp.config
    if not reports_lm(config.target):
        raise ValueError(
            "ablations are measured as next-token CE: this run's target is not a language model"
        )
    device = next(decomp.model.parameters()).device
    draw_seed = config.seed + 5000 + seed
    groups = target_kind(config.target).position_groups  # type: ignore[arg-type]
    if groups is not None:
        return groups(config.target, n, draw_seed, device)
    gen = torch.Generator(device=device).manual_seed(draw_seed)
    ids = eval_data_source(config, decomp.data).sample(n, gen)
    scored = torch.ones_like(ids, dtype=torch.bool)
    scored[:, 0] = False
    return {"all": (ids, scored)}


def names_specific(items: Sequence[str]) -> bool:
    """Whether any item is a specific set (`specific:<group>`)."""
    return any(item.startswith("specific:") for item in items)


def measured_draw(items: Sequence[str], seed: int | None) -> int:
    """The draw of held-out sequences a removal is measured on: `seed` if given, else 1 where
    an item is a specific set (chosen on draw 0 by `spdkit ablate --specific`: draw 1 is the
    fresh one), else 0."""
    if seed is not None:
        return seed
    return 1 if names_specific(items) else 0


def parse_items(
    items: Sequence[str],
    clusters: Sequence[Cluster],
    sizes: Mapping[str, int],
    specific: Mapping[str, Sequence[str]] | None = None,
) -> Off:
    """`cluster:<id>` (its members, from clusters.json), `specific:<group>` (the group's
    specific set, from specific.json: `analysis/specific.py`) or `<module>:<index>` to
    {module: indices}; ValueError naming the first item that is not one."""
    by_id = {c.id: c for c in clusters}
    off: Off = {}
    for item in items:
        head, _, tail = item.rpartition(":")
        if head == "specific":
            if specific is None:
                raise ValueError(
                    f"{item}: this run has no specific.json (run `spdkit ablate RUN --specific`)"
                )
            if tail not in specific:
                raise ValueError(f"{item}: no such group (groups: {', '.join(specific)})")
            members = list(specific[tail])
            if not members:
                raise ValueError(f"{item}: {tail}'s specific set is empty (specific.json)")
        elif head == "cluster":
            if not clusters:
                raise ValueError(f"{item}: this run has no clusters.json (run `spdkit cluster`)")
            if not tail.isdigit() or int(tail) not in by_id:
                raise ValueError(f"{item}: no such cluster (ids 0..{len(clusters) - 1})")
            members = by_id[int(tail)].members
        else:
            members = [item]
        for name in members:
            module, _, index = name.rpartition(":")
            if module not in sizes or not index.isdigit() or int(index) >= sizes[module]:
                raise ValueError(
                    f"{item!r} is not a subcomponent: write <module>:<index> (modules: "
                    f"{', '.join(sizes)}), cluster:<id> or specific:<group>"
                )
            if int(index) not in off.setdefault(module, []):
                off[module].append(int(index))
    return off


def everything(model: ComponentModel) -> Off:
    """Every subcomponent of every decomposed module."""
    return {n: list(range(model.components(n).C)) for n in model.module_names}


@dataclass(frozen=True)
class Gate:
    """The masks a CI-gated removal starts from: `ci`, m = g (the masked model the paper
    trains), or `rounded`, m = 1[g > threshold] (the pieces the CI calls needed, whole)."""

    kind: Literal["ci", "rounded"] = "ci"
    threshold: float = 0.0

    @staticmethod
    def named(kind: str, threshold: float) -> Gate:
        """`ci` or `rounded` (at `threshold`); ValueError naming the choices otherwise."""
        if kind not in ("ci", "rounded"):
            raise ValueError(f"masks={kind!r}: use 'ci' (m = g) or 'rounded' (m = 1[g > τ])")
        return Gate(kind, threshold)  # type: ignore[arg-type]

    def masks(self, g: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The baseline masks of CI g (each [..., C])."""
        if self.kind == "ci":
            return dict(g)
        return {n: (v > self.threshold).to(v.dtype) for n, v in g.items()}

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "threshold": self.threshold if self.kind == "rounded" else None}


CI_GATE = Gate()  # m = g: the masked model the decomposition was trained as


def gate_label(described: Mapping[str, Any]) -> str:
    """A gate as recorded (`Gate.describe`, in ablation.json / mechanism_score.json), in words."""
    if described["kind"] == "ci":
        return "m = g"
    return f"m = 1[g > {described['threshold']:g}]"


def gated_masks(base: Mapping[str, Tensor], off: Off) -> dict[str, Tensor]:
    """CI-gated ablation: the baseline masks (`Gate.masks`), with m_c = 0 for the removed c
    (every position)."""
    masks = {n: v.clone() for n, v in base.items()}
    for module, indices in off.items():
        masks[module][..., indices] = 0.0
    return masks


def edited_weights(model: ComponentModel, off: Off) -> dict[str, Tensor]:
    """Static edit: W' = W − Σ_{c ∈ off} U[:, c] V[c, :], as {parameter name: weight in the
    module's own layout} (an nn.Embedding or Conv1D stores Wᵀ)."""
    out = {}
    for module, indices in off.items():
        comps = model.components(module)
        U, V = comps.U.detach(), comps.V.detach()
        W = model.target_weight(module).detach() - U[:, indices] @ V[indices]
        own = model.target.get_submodule(module).weight
        out[f"{module}.weight"] = W if W.shape == own.shape else W.T
    return out


def edited_forward(model: ComponentModel, off: Off) -> Callable[[Tensor], Tensor]:
    """x -> the target's output with the static edit's weights (the target is not changed)."""
    weights = edited_weights(model, off)

    def forward(x: Tensor) -> Tensor:
        return model_output(functional_call(model.target, weights, (x,)), model.output_field)

    return forward


Removal = tuple[str, "Off | None"]  # ("gated" | "static", off); ("static", None): the target


@dataclass(frozen=True)
class Chunk:
    """A piece of one position group with what every removal of it reuses: the target's
    record of it and its baseline masks (the gate's masks of its CI)."""

    ids: Tensor  # [b, T]
    scored: Tensor  # [b, T] bool
    record: Any
    base: dict[str, Tensor]  # module -> [b, T, C]


def group_chunks(
    model: ComponentModel, ids: Tensor, scored: Tensor, size: int | None, gate: Gate = CI_GATE
) -> Iterator[Chunk]:
    """The group's chunks of `size` sequences (None: all), one at a time (a record lives only
    while its chunk is measured: memory is that of one chunk, whatever n)."""
    size = size or ids.shape[0]
    for start in range(0, ids.shape[0], size):
        piece = ids[start : start + size]
        with torch.no_grad():
            record = model.record(piece)
            g, _ = model.importances(piece, record)
        yield Chunk(piece, scored[start : start + size], record, gate.masks(g))


@torch.no_grad()
def token_ce(model: ComponentModel, chunk: Chunk, removal: Removal) -> Tensor:
    """Per-token CE [b, T − 1] of the chunk under one removal: `gated` is the masked model
    with the chunk's baseline masks minus `off`; `static` the target with `off` subtracted
    from its weights (off None: the target itself)."""
    kind, off = removal
    if kind == "gated":
        logits = model.masked_forward(chunk.ids, gated_masks(chunk.base, off or {}), chunk.record)
    elif off is None:
        logits = chunk.record.output
    else:
        logits = edited_forward(model, off)(chunk.ids)
    return scored_token_ce(logits, chunk.ids)


def scored_ces(
    model: ComponentModel,
    groups: Groups,
    removals: Sequence[Removal],
    chunk: int | None = 64,
    tick: Callable[[], object] = lambda: None,
    gate: Gate = CI_GATE,
) -> list[dict[str, float]]:
    """Mean CE of each group's scored positions under each removal: one pass over the data,
    every removal measured on each chunk while its record is alive (only per-token CE is
    kept, so many removals cost time, not memory). `tick` after each removal of a chunk."""
    out: list[dict[str, float]] = [{} for _ in removals]
    for name, (ids, scored) in groups.items():
        sums = [0.0] * len(removals)
        count = int(scored[:, 1:].sum())
        for piece in group_chunks(model, ids, scored, chunk, gate):
            mask = piece.scored[:, 1:]
            for i, removal in enumerate(removals):
                sums[i] += token_ce(model, piece, removal)[mask].sum().item()
                tick()
        for i in range(len(removals)):
            out[i][name] = sums[i] / max(1, count)
    return out


def fraction(ablated: float, base: float, full: float) -> float:
    """(ablated − base) / (full − base): the share of everything-removed damage."""
    return (ablated - base) / (full - base) if full != base else float("nan")


def worst_other(others: Iterable[float]) -> float:
    """Selectivity: the largest fraction another group loses (0 with none). A group whose reference equals
    its baseline has nothing to lose (its fraction is NaN): it is left out, so one such group
    cannot decide a comparison by where it falls in the order."""
    return max((f for f in others if not math.isnan(f)), default=0.0)


def reference_ce(base: float, full: float, chance: float) -> float:
    """What removing one group's mechanism alone should cost: min(everything removed, chance).
    Removing everything decomposed overshoots chance (it also breaks what every group shares),
    while a model that has lost only this group's rule sits at chance. A group the model does
    no better than chance on keeps the everything-removed reference."""
    return min(full, chance) if chance > base else full


def measure(
    model: ComponentModel,
    groups: Groups,
    off: Off,
    decode: Callable[[list[int]], str] | None = None,
    n_tokens: int = 10,
    chunk: int | None = 64,
    gate: Gate = CI_GATE,
) -> dict[str, Any]:
    """Per group, CE of the scored positions for both kinds of removal: baseline, with `off`
    removed, with everything decomposed removed, and `fraction` (CI-gated: from `gate`'s
    masks). With `decode`, the `n_tokens` positions whose CE rises most under the CI-gated
    ablation, as text ending in [the predicted token]."""
    every = everything(model)
    removals: list[Removal] = [
        ("gated", {}), ("gated", off), ("gated", every),
        ("static", None), ("static", off), ("static", every),
    ]  # fmt: skip
    ces = scored_ces(model, groups, removals, chunk, gate=gate)
    out: dict[str, Any] = {}
    for name in groups:
        row: dict[str, Any] = {}
        for kind, (b, a, f) in (("gated", ces[0:3]), ("static", ces[3:6])):
            row[kind] = {
                "baseline": b[name],
                "ablated": a[name],
                "everything": f[name],
                "fraction": fraction(a[name], b[name], f[name]),
            }
        if decode is not None:
            row["most_moved"] = most_moved(
                model, groups[name], off, decode, n_tokens, chunk, gate=gate
            )
        out[name] = row
    return out


def most_moved(
    model: ComponentModel,
    group: tuple[Tensor, Tensor],
    off: Off,
    decode: Callable[[list[int]], str],
    n: int,
    chunk: int | None = 64,
    width: int = 12,
    gate: Gate = CI_GATE,
) -> list[dict[str, Any]]:
    """The n scored positions whose CE rises most under the CI-gated ablation, as the
    context before the predicted token and the token in brackets."""
    found: list[tuple[float, list[int], int]] = []  # (rise, ids of the sequence, position)
    for piece in group_chunks(model, *group, chunk, gate):
        rise = token_ce(model, piece, ("gated", off)) - token_ce(model, piece, ("gated", {}))
        rise = rise.masked_fill(~piece.scored[:, 1:], -torch.inf)
        k = min(n, int(piece.scored[:, 1:].sum()))
        values, flat = rise.flatten().topk(k)
        for v, f in zip(values.tolist(), flat.tolist(), strict=True):
            b, t = divmod(f, rise.shape[1])
            found.append((v, piece.ids[b].tolist(), t))
        found = sorted(found, key=lambda item: -item[0])[:n]
    return [
        {
            "context": f"{decode(ids[max(0, t + 1 - width) : t + 1])} [{decode([ids[t + 1]])}]",
            "ce_rise": v,
        }
        for v, ids, t in found
    ]
