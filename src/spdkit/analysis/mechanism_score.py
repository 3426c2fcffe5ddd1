"""The mechanism score of a clustering: which clusters carry each position group's loss.

Per group, clusters are ranked by the loss their CI-gated ablation alone adds to it
(`spdkit.analysis.ablation`), and added in that order until the ablated set costs ≥ `frac`
(0.8) of what ablating everything decomposed costs (a greedy stand-in for the smallest such
set); its **selectivity** is the largest loss increase it causes in another group, as a
fraction of that group's own everything-ablated increase (0: touches no other group; 1: as bad
for another group as removing the whole decomposition). Where the groups have a chance CE
(`planted_lm`'s tasks), the **selective set** (`selective_set`) asks the converse: how far
toward chance a group can be taken by clusters that leave every other group within 10 %.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from matplotlib.figure import Figure

from spdkit.analysis.ablation import (
    CI_GATE,
    Gate,
    Groups,
    Off,
    Removal,
    everything,
    fraction,
    gate_label,
    reference_ce,
    scored_ces,
    worst_other,
)
from spdkit.analysis.mechanisms.clusters import Cluster
from spdkit.analysis.plots import removal_heatmap
from spdkit.figures import finish, new_figure
from spdkit.method.model import ComponentModel
from spdkit.progress import progress_bar


@dataclass(frozen=True)
class ScoreParams:
    """frac: the share a set must reach; max_clusters: most clusters in the plain score's set;
    max_selectivity: the largest share any other group may lose in a selective set;
    max_selective: most candidate sets the selective set measures."""

    frac: float = 0.8
    max_clusters: int = 8
    max_selectivity: float = 0.1
    max_selective: int = 32


def mechanism_score(
    model: ComponentModel,
    groups: Groups,
    clusters: Sequence[Cluster],
    params: ScoreParams = ScoreParams(),
    chance: Mapping[str, float] | None = None,
    gate: Gate = CI_GATE,
    chunk: int | None = 64,
    progress: bool = True,
    removal: Literal["gated", "static"] = "gated",
) -> dict[str, Any]:
    """Per group: the clusters (greedy by single-cluster damage) whose CI-gated ablation costs
    ≥ `params.frac` of the everything-ablated increase, at most `params.max_clusters`; the
    fraction reached, the selectivity (the largest other group's increase as a fraction of its own
    everything-ablated increase), and the same set's fractions under the static edit.

    With `chance` (a group's CE when its rule is unknown, e.g. planted_lm's tasks), also the
    **selective set** (`selective_set`): fractions there are of the way to
    reference = min(everything-ablated, chance) CE, since removing everything decomposed
    overshoots chance by also breaking what every task shares; a mechanism removed alone should
    take its task to chance, no further.

    `gate`: the masks every CI-gated removal starts from (`ablation.Gate`: m = g, or the
    rounded 1[g > τ]); recorded in each group's row as `gate`. `removal` "static": every set is
    removed from the weights instead (W − Σ U_c V_cᵀ; baseline the target, everything removed
    W − U V), what `spdkit edit` writes; recorded as `removal`."""
    every = everything(model)
    nothing: Off | None = {} if removal == "gated" else None
    base, full = scored_ces(model, groups, [(removal, nothing), (removal, every)], chunk, gate=gate)
    n_chunks = sum(-(-len(ids) // (chunk or len(ids))) for ids, _ in groups.values())
    n_sets = params.max_clusters + (params.max_selective if chance else 0)
    bar = progress_bar(n_chunks * len(clusters) + len(groups) * n_sets, "ablate", progress)
    removals: list[Removal] = [(removal, c.indices()) for c in clusters]
    ces = scored_ces(model, groups, removals, chunk, tick=lambda: bar.update(1), gate=gate)
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
        for k in order[: params.max_clusters]:
            chosen.append(k)
            (ce,) = scored_ces(model, groups, [(removal, union(by_id, chosen))], chunk, gate=gate)
            fractions = {n: fraction(ce[n], base[n], full[n]) for n in groups}
            bar.update(1)
            if fractions[group] >= params.frac:
                break
        off = union(by_id, chosen)
        (s_ce,) = scored_ces(model, groups, [("static", off)], chunk)
        static = {n: fraction(s_ce[n], s_base[n], s_full[n]) for n in groups}
        others = [fractions[n] for n in groups if n != group]
        out[group] = {
            "clusters": chosen,
            "n_subcomponents": sum(len(v) for v in off.values()),
            "fraction": fractions[group],
            "found": fractions[group] >= params.frac,
            "selectivity": worst_other(others),
            "other_fractions": {n: fractions[n] for n in groups if n != group},
            "static_fraction": static[group],
            "static_other_fractions": {n: static[n] for n in groups if n != group},
            "baseline_ce": base[group],
            "everything_ce": full[group],
            "gate": gate.describe(),
            "removal": removal,
        }
    if chance:
        reference = {n: reference_ce(base[n], full[n], chance[n]) for n in groups}

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
                params,
                chunk,
                tick=lambda: bar.update(1),
                gate=gate,
                removal=removal,
            )
    bar.close()
    return out


def selective_set(
    model: ComponentModel,
    groups: Groups,
    alone: Mapping[int, Mapping[str, float]],
    by_id: Mapping[int, Cluster],
    group: str,
    fractions_of: Callable[[Mapping[str, float]], dict[str, float]],
    params: ScoreParams,
    chunk: int | None,
    tick: Callable[[], None] = lambda: None,
    gate: Gate = CI_GATE,
    removal: Literal["gated", "static"] = "gated",
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
        return alone[k][group] - worst_other(alone[k][n] for n in others)

    candidates = sorted((k for k in alone if selective(k) > 0), key=selective, reverse=True)
    chosen: list[int] = []
    fractions = dict.fromkeys(groups, 0.0)
    for k in candidates[: params.max_selective]:
        off = union(by_id, [*chosen, k])
        (ce,) = scored_ces(model, groups, [(removal, off)], chunk, gate=gate)
        tick()
        trial = fractions_of(ce)
        if worst_other(trial[n] for n in others) <= params.max_selectivity:
            chosen, fractions = [*chosen, k], trial
            if fractions[group] >= params.frac:
                break
    off = union(by_id, chosen)
    selectivity = worst_other(fractions[n] for n in others)
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
    group's everything-ablated CE increase the row's removal causes. With selective sets (groups
    with a chance CE) a second panel shows them, as fractions of the way to min(everything
    removed, chance). A planted mechanism found selectively is a bright diagonal (≥ 0.8) on a
    dark field (≤ 0.1)."""
    groups = list(score)
    first = next(iter(score.values()), {})
    panels = [("plain", {g: score[g] for g in groups})]
    if all("selective" in score[g] for g in groups):
        panels.append(("selective", {g: score[g]["selective"] for g in groups}))
    fig, axes = new_figure(
        1,
        len(panels),
        figsize=(1.2 + 1.3 * len(groups) * len(panels), 1.2 + 0.9 * len(groups)),
        squeeze=False,
    )
    fig.subplots_adjust(wspace=0.55)
    for ax, (kind, rows) in zip(axes[0], panels, strict=True):
        labels = [f"{r}: {len(rows[r]['clusters'])} cl." for r in groups]
        im = removal_heatmap(ax, rows, groups, labels)
        ax.set_title("fewest clusters to 80 %" if kind == "plain" else "selective sets (to chance)")
    if first.get("removal") == "static":
        how = "static edit: W − Σ U_c V_c"
    else:
        how = f"CI-gated ablation, {gate_label(first.get('gate') or {'kind': 'ci'})}"
    fig.suptitle(f"mechanism score ({how})")
    fig.supxlabel("CE increase in each group (fraction of its reference)")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    return finish(fig, path)
