"""Mechanisms measured by what they do: the loss a set of subcomponents costs when removed.

Two ways to remove subcomponents c ∈ S, side by side (`spdkit ablate`):

- **CI-gated** (the decomposition's own semantics): the masked model with masks m = g (the CI
  of this input) and m_c = 0 for c ∈ S. Its baseline is the masked model with m = g; ablating
  everything decomposed is m = 0.
- **static edit** (what a weight edit does): the target with W' = W − Σ_{c∈S} U[:, c] V[c, :]
  in every module S touches, for every input. Its baseline is the target itself; ablating
  everything decomposed leaves W − U V (the part of W no subcomponent holds).

The loss is next-token cross-entropy on *position groups*: a target with planted mechanisms
gives one group per task (its scored positions, `TargetKind.position_groups`); any other
language model one group, `all`, every position of held-out sequences.

The mechanism score of a clustering (`mechanism_score`): per group, clusters are ranked by the
loss their ablation alone adds to it, and added in that order until the ablated set costs
≥ `frac` (0.8) of what ablating everything decomposed costs (a greedy stand-in for the smallest
such set); its **selectivity** is the largest loss increase it causes in another group, as a
fraction of that group's own everything-ablated increase (0: touches no other group; 1: as
bad for another group as removing the whole decomposition). Where the groups have a chance CE
(`planted_lm`'s tasks), the **selective set** (`selective_set`) asks the converse: how far
toward chance a group can be taken by clusters that leave every other group within 10 %.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor
from torch.func import functional_call

from spdkit.analysis.decomposed import Decomposed
from spdkit.analysis.mechanisms.clusters import Cluster
from spdkit.figures import finish, new_figure
from spdkit.method.forwards import model_output
from spdkit.method.model import ComponentModel
from spdkit.progress import progress_bar
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


def parse_items(items: Sequence[str], clusters: Sequence[Cluster], sizes: Mapping[str, int]) -> Off:
    """`cluster:<id>` (its members, from clusters.json) or `<module>:<index>` to {module:
    indices}; ValueError naming the first item that is not one."""
    by_id = {c.id: c for c in clusters}
    off: Off = {}
    for item in items:
        head, _, tail = item.rpartition(":")
        if head == "cluster":
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
                    f"{', '.join(sizes)}) or cluster:<id>"
                )
            if int(index) not in off.setdefault(module, []):
                off[module].append(int(index))
    return off


def everything(model: ComponentModel) -> Off:
    """Every subcomponent of every decomposed module."""
    return {n: list(range(model.components(n).C)) for n in model.module_names}


def gated_masks(g: Mapping[str, Tensor], off: Off) -> dict[str, Tensor]:
    """CI-gated ablation: m = g, with m_c = 0 for the removed c (every position)."""
    masks = {n: v.clone() for n, v in g.items()}
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
    record of it and its CI masks g."""

    ids: Tensor  # [b, T]
    scored: Tensor  # [b, T] bool
    record: Any
    g: dict[str, Tensor]


def group_chunks(model: ComponentModel, ids: Tensor, scored: Tensor, size: int | None):  # noqa: ANN201
    """The group's chunks of `size` sequences (None: all), one at a time (a record lives only
    while its chunk is measured: memory is that of one chunk, whatever n)."""
    size = size or ids.shape[0]
    for start in range(0, ids.shape[0], size):
        piece = ids[start : start + size]
        with torch.no_grad():
            record = model.record(piece)
            g, _ = model.importances(piece, record)
        yield Chunk(piece, scored[start : start + size], record, g)


@torch.no_grad()
def token_ce(model: ComponentModel, chunk: Chunk, removal: Removal) -> Tensor:
    """Per-token CE [b, T − 1] of the chunk under one removal: `gated` is the masked model
    with masks g minus `off`; `static` the target with `off` subtracted from its weights
    (off None: the target itself)."""
    kind, off = removal
    if kind == "gated":
        logits = model.masked_forward(chunk.ids, gated_masks(chunk.g, off or {}), chunk.record)
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
) -> list[dict[str, float]]:
    """Mean CE of each group's scored positions under each removal: one pass over the data,
    every removal measured on each chunk while its record is alive (only per-token CE is
    kept, so many removals cost time, not memory). `tick` after each removal of a chunk."""
    out: list[dict[str, float]] = [{} for _ in removals]
    for name, (ids, scored) in groups.items():
        sums = [0.0] * len(removals)
        count = int(scored[:, 1:].sum())
        for piece in group_chunks(model, ids, scored, chunk):
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


def measure(
    model: ComponentModel,
    groups: Groups,
    off: Off,
    decode: Callable[[list[int]], str] | None = None,
    n_tokens: int = 10,
    chunk: int | None = 64,
) -> dict[str, Any]:
    """Per group, CE of the scored positions for both kinds of removal: baseline, with `off`
    removed, with everything decomposed removed, and `fraction`. With `decode`, the
    `n_tokens` positions whose CE rises most under the CI-gated ablation, as text ending
    in [the predicted token]."""
    every = everything(model)
    removals: list[Removal] = [
        ("gated", {}), ("gated", off), ("gated", every),
        ("static", None), ("static", off), ("static", every),
    ]  # fmt: skip
    ces = scored_ces(model, groups, removals, chunk)
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
            row["most_moved"] = most_moved(model, groups[name], off, decode, n_tokens, chunk)
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
) -> list[dict[str, Any]]:
    """The n scored positions whose CE rises most under the CI-gated ablation, as the
    context before the predicted token and the token in brackets."""
    found: list[tuple[float, list[int], int]] = []  # (rise, ids of the sequence, position)
    for piece in group_chunks(model, *group, chunk):
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


def mechanism_score(
    model: ComponentModel,
    groups: Groups,
    clusters: Sequence[Cluster],
    frac: float = 0.8,
    max_clusters: int = 8,
    progress: bool = True,
    chunk: int | None = 64,
    chance: Mapping[str, float] | None = None,
    max_selectivity: float = 0.1,
    max_selective: int = 32,
) -> dict[str, Any]:
    """Per group: the clusters (greedy by single-cluster damage) whose CI-gated ablation costs
    ≥ `frac` of the everything-ablated increase, at most `max_clusters`; the fraction
    reached, the selectivity (the largest other group's increase as a fraction of its own
    everything-ablated increase), and the same set's fractions under the static edit.

    With `chance` (a group's CE when its rule is unknown, e.g. planted_lm's tasks), also the
    **selective set** (`selective_set`): fractions there are of the way to
    reference = min(everything-ablated, chance) CE, since removing everything decomposed
    overshoots chance by also breaking what every task shares; a mechanism removed alone should
    take its task to chance, no further."""
    every = everything(model)
    base, full = scored_ces(model, groups, [("gated", {}), ("gated", every)], chunk)
    n_chunks = sum(-(-len(ids) // (chunk or len(ids))) for ids, _ in groups.values())
    n_sets = max_clusters + (max_selective if chance else 0)
    bar = progress_bar(n_chunks * len(clusters) + len(groups) * n_sets, "ablate", progress)
    removals: list[Removal] = [("gated", c.indices()) for c in clusters]
    ces = scored_ces(model, groups, removals, chunk, tick=lambda: bar.update(1))
    single = {
        c.id: {n: ce[n] - base[n] for n in groups} for c, ce in zip(clusters, ces, strict=True)
    }
    by_id = {c.id: c for c in clusters}
    s_base, s_full = scored_ces(model, groups, [("static", None), ("static", every)], chunk)
    out: dict[str, Any] = {}
    for group in groups:
        order = sorted(single, key=lambda k: single[k][group], reverse=True)
        chosen: list[int] = []
        fractions: dict[str, float] = {}
        for k in order[:max_clusters]:
            chosen.append(k)
            (ce,) = scored_ces(model, groups, [("gated", union(by_id, chosen))], chunk)
            fractions = {n: fraction(ce[n], base[n], full[n]) for n in groups}
            bar.update(1)
            if fractions[group] >= frac:
                break
        off = union(by_id, chosen)
        (s_ce,) = scored_ces(model, groups, [("static", off)], chunk)
        static = {n: fraction(s_ce[n], s_base[n], s_full[n]) for n in groups}
        others = [fractions[n] for n in groups if n != group]
        out[group] = {
            "clusters": chosen,
            "n_subcomponents": sum(len(v) for v in off.values()),
            "fraction": fractions[group],
            "found": fractions[group] >= frac,
            "selectivity": max(others) if others else 0.0,
            "other_fractions": {n: fractions[n] for n in groups if n != group},
            "static_fraction": static[group],
            "static_other_fractions": {n: static[n] for n in groups if n != group},
            "baseline_ce": base[group],
            "everything_ce": full[group],
        }
    if chance:
        # a group the model does better than chance on is lost at chance; one it does not
        # (an untrained target) keeps the everything-ablated reference
        reference = {n: min(full[n], chance[n]) if chance[n] > base[n] else full[n] for n in groups}

        def to_reference(ce: Mapping[str, float]) -> dict[str, float]:
            return {n: fraction(ce[n], base[n], reference[n]) for n in groups}

        alone = {c.id: to_reference(ce) for c, ce in zip(clusters, ces, strict=True)}
        for group in groups:
            out[group]["chance_ce"] = chance[group]
            out[group]["selective"] = selective_set(
                model,
                groups,
                alone,
                by_id,
                group,
                to_reference,
                SelectiveParams(frac, max_selectivity, max_selective),
                chunk,
                tick=lambda: bar.update(1),
            )
    bar.close()
    return out


@dataclass(frozen=True)
class SelectiveParams:
    """frac: the share of the way to the reference a set must reach; max_selectivity: the
    largest share any other group may lose; max_sets: most candidate sets measured."""

    frac: float = 0.8
    max_selectivity: float = 0.1
    max_sets: int = 32


def selective_set(
    model: ComponentModel,
    groups: Groups,
    alone: Mapping[int, Mapping[str, float]],
    by_id: Mapping[int, Cluster],
    group: str,
    fractions_of: Callable[[Mapping[str, float]], dict[str, float]],
    params: SelectiveParams,
    chunk: int | None,
    tick: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """The clusters that remove `group`'s mechanism and nothing else, greedily: candidates in
    order of selective damage alone[k][group] − max_{other} alone[k][other] (each cluster's
    own ablation, as a fraction of the reference), only those whose selective damage is
    positive; a candidate stays in the set if the set's selectivity (the largest fraction any
    other group loses) stays ≤ `max_selectivity`; stops at `frac` of the way to the reference.

    Why: the plain score ranks clusters by damage alone and so starts from what every group
    shares; this one asks how much of a group can be removed *selectively*, however many
    clusters it takes (a memorised table's entries fire on disjoint inputs, so co-activation
    keeps them in separate clusters)."""
    others = [n for n in groups if n != group]

    def selective(k: int) -> float:
        return alone[k][group] - max((alone[k][n] for n in others), default=0.0)

    candidates = sorted((k for k in alone if selective(k) > 0), key=selective, reverse=True)
    chosen: list[int] = []
    fractions = dict.fromkeys(groups, 0.0)
    for k in candidates[: params.max_sets]:
        (ce,) = scored_ces(model, groups, [("gated", union(by_id, [*chosen, k]))], chunk)
        tick()
        trial = fractions_of(ce)
        if max((trial[n] for n in others), default=0.0) <= params.max_selectivity:
            chosen, fractions = [*chosen, k], trial
            if fractions[group] >= params.frac:
                break
    off = union(by_id, chosen)
    selectivity = max((fractions[n] for n in others), default=0.0)
    return {
        "clusters": chosen,
        "n_subcomponents": sum(len(v) for v in off.values()),
        "fraction": fractions[group],
        "selectivity": selectivity,
        "found": fractions[group] >= params.frac and selectivity <= params.max_selectivity,
        "n_candidates": len(candidates),
        "other_fractions": {n: fractions[n] for n in others},
    }


def union(by_id: Mapping[int, Cluster], ids: Sequence[int]) -> Off:
    """The members of the clusters `ids`, as one removal."""
    off: Off = {}
    for k in ids:
        for module, indices in by_id[k].indices().items():
            off.setdefault(module, []).extend(indices)
    return off


def plot_mechanism_score(score: dict[str, Any], path: Path | None) -> Figure:
    """Rows: each group's chosen clusters; columns: the groups; cell: the fraction of that
    group's everything-ablated CE increase the row's ablation causes. A planted mechanism
    found selectively is a bright diagonal (≥ 0.8) on a dark field (≤ 0.1)."""
    groups = list(score)
    grid = [
        [score[r]["fraction"] if c == r else score[r]["other_fractions"][c] for c in groups]
        for r in groups
    ]
    fig, ax = new_figure(figsize=(1.2 + 1.1 * len(groups), 1.0 + 0.9 * len(groups)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k")
    ax.set_xticks(range(len(groups)), groups)
    labels = [f"{r}: {len(score[r]['clusters'])} cl." for r in groups]
    ax.set_yticks(range(len(groups)), labels)
    ax.set_xlabel("CE increase in group (fraction of everything ablated)")
    ax.set_title("mechanism score (CI-gated ablation)")
    fig.colorbar(im, ax=ax, shrink=0.8)
    return finish(fig, path)
