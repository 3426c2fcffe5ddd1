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
bad for another group as removing the whole decomposition).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from spdkit.analysis.decomposed import Decomposed
from spdkit.analysis.mechanisms.clusters import Cluster
from spdkit.figures import new_figure, save_figure
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


@dataclass(frozen=True)
class GroupRecord:
    """One position group, what every ablation of it reuses: ids, the scored positions, the
    target's record and the CI masks g."""

    ids: Tensor
    scored: Tensor
    record: Any
    g: dict[str, Tensor]


def prepare(model: ComponentModel, groups: Groups) -> dict[str, GroupRecord]:
    out = {}
    with torch.no_grad():
        for name, (ids, scored) in groups.items():
            record = model.record(ids)
            g, _ = model.causal_importances(record.inputs, model.inner_acts(record.inputs))
            out[name] = GroupRecord(ids, scored, record, g)
    return out


@torch.no_grad()
def gated_ce(model: ComponentModel, rec: GroupRecord, off: Off) -> Tensor:
    """Per-token CE [B, T − 1] of the masked model with masks g minus `off`."""
    logits = model.masked_forward(rec.ids, gated_masks(rec.g, off), rec.record)
    return scored_token_ce(logits, rec.ids)


@torch.no_grad()
def static_ce(model: ComponentModel, rec: GroupRecord, off: Off | None) -> Tensor:
    """Per-token CE [B, T − 1] of the target with `off` subtracted from its weights (None:
    the target itself)."""
    logits = rec.record.output if off is None else edited_forward(model, off)(rec.ids)
    return scored_token_ce(logits, rec.ids)


def mean_scored(ce: Tensor, scored: Tensor) -> float:
    return ce[scored[:, 1:]].mean().item()


def measure(
    model: ComponentModel,
    recs: dict[str, GroupRecord],
    off: Off,
    decode: Callable[[list[int]], str] | None = None,
    n_tokens: int = 10,
) -> dict[str, Any]:
    """Per group, CE of the scored positions for both kinds of removal: baseline, with `off`
    removed, with everything decomposed removed, and `fraction`: (ablated − baseline) /
    (everything − baseline). With `decode`, the `n_tokens` positions whose CE rises most
    under the CI-gated ablation, as text ending in [the predicted token]."""
    every = everything(model)
    out: dict[str, Any] = {}
    for name, rec in recs.items():
        row: dict[str, Any] = {}
        for kind, ce_of in (
            ("gated", lambda o, rec=rec: gated_ce(model, rec, o)),
            ("static", lambda o, rec=rec: static_ce(model, rec, o)),
        ):
            base_ce = gated_ce(model, rec, {}) if kind == "gated" else static_ce(model, rec, None)
            ablated_ce = ce_of(off)
            base = mean_scored(base_ce, rec.scored)
            ablated = mean_scored(ablated_ce, rec.scored)
            full = mean_scored(ce_of(every), rec.scored)
            row[kind] = {
                "baseline": base,
                "ablated": ablated,
                "everything": full,
                "fraction": (ablated - base) / (full - base) if full != base else float("nan"),
            }
            if kind == "gated" and decode is not None:
                row["most_moved"] = most_moved(ablated_ce - base_ce, rec, decode, n_tokens)
        out[name] = row
    return out


def most_moved(
    delta: Tensor, rec: GroupRecord, decode: Callable[[list[int]], str], n: int, width: int = 12
) -> list[dict[str, Any]]:
    """The n scored positions whose CE rose most ([B, T − 1] `delta`), as the context before
    the predicted token and the token in brackets."""
    moved = torch.where(rec.scored[:, 1:], delta, torch.full_like(delta, -torch.inf))
    top = moved.flatten().topk(min(n, int(rec.scored[:, 1:].sum()))).indices
    out = []
    for flat in top.tolist():
        b, t = divmod(flat, delta.shape[1])
        ids = rec.ids[b].tolist()
        context = decode(ids[max(0, t + 1 - width) : t + 1])
        out.append(
            {"context": f"{context} [{decode([ids[t + 1]])}]", "ce_rise": delta[b, t].item()}
        )
    return out


def mechanism_score(
    model: ComponentModel,
    recs: dict[str, GroupRecord],
    clusters: Sequence[Cluster],
    frac: float = 0.8,
    max_clusters: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Per group: the clusters (greedy by single-cluster damage) whose CI-gated ablation costs
    ≥ `frac` of the everything-ablated increase, at most `max_clusters`; the fraction
    reached, the selectivity (the largest other group's increase as a fraction of its own
    everything-ablated increase), and the same set's numbers under the static edit."""
    base = {n: mean_scored(gated_ce(model, r, {}), r.scored) for n, r in recs.items()}
    full = {
        n: mean_scored(gated_ce(model, r, everything(model)), r.scored) for n, r in recs.items()
    }
    bar = progress_bar(len(clusters), "ablate clusters", progress)
    single: dict[int, dict[str, float]] = {}
    for c in clusters:
        single[c.id] = {
            n: mean_scored(gated_ce(model, r, c.indices()), r.scored) - base[n]
            for n, r in recs.items()
        }
        bar.update(1)
    bar.close()
    by_id = {c.id: c for c in clusters}
    out: dict[str, Any] = {}
    for group in recs:
        order = sorted(single, key=lambda k: single[k][group], reverse=True)
        chosen: list[int] = []
        fractions: dict[str, float] = {}
        for k in order[:max_clusters]:
            chosen.append(k)
            fractions = _fractions(model, recs, _union(by_id, chosen), base, full)
            if fractions[group] >= frac:
                break
        others = [fractions[n] for n in recs if n != group]
        off = _union(by_id, chosen)
        static = measure_static_fractions(model, recs, off)
        out[group] = {
            "clusters": chosen,
            "n_subcomponents": sum(len(v) for v in off.values()),
            "fraction": fractions[group],
            "found": fractions[group] >= frac,
            "selectivity": max(others) if others else 0.0,
            "other_fractions": {n: fractions[n] for n in recs if n != group},
            "static_fraction": static[group],
            "static_other_fractions": {n: static[n] for n in recs if n != group},
            "baseline_ce": base[group],
            "everything_ce": full[group],
        }
    return out


def _union(by_id: Mapping[int, Cluster], ids: Sequence[int]) -> Off:
    off: Off = {}
    for k in ids:
        for module, indices in by_id[k].indices().items():
            off.setdefault(module, []).extend(indices)
    return off


def _fractions(
    model: ComponentModel,
    recs: dict[str, GroupRecord],
    off: Off,
    base: Mapping[str, float],
    full: Mapping[str, float],
) -> dict[str, float]:
    out = {}
    for n, r in recs.items():
        rise = mean_scored(gated_ce(model, r, off), r.scored) - base[n]
        out[n] = rise / (full[n] - base[n]) if full[n] != base[n] else float("nan")
    return out


def measure_static_fractions(
    model: ComponentModel, recs: dict[str, GroupRecord], off: Off
) -> dict[str, float]:
    """Per group, (edited − target) / (everything edited − target) CE of the scored positions."""
    every = everything(model)
    out = {}
    for n, r in recs.items():
        base = mean_scored(static_ce(model, r, None), r.scored)
        rise = mean_scored(static_ce(model, r, off), r.scored) - base
        gap = mean_scored(static_ce(model, r, every), r.scored) - base
        out[n] = rise / gap if gap else float("nan")
    return out


def plot_mechanism_score(score: dict[str, Any], path: Path) -> Path:
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
    return save_figure(fig, path)
