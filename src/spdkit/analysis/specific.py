"""Pieces specific to one group of sequences: a mechanism found by where it fires, removed as a
weight edit.

Given groups of held-out sequences (`planted_lm`: one per task), a subcomponent c's firing rate
on group G is the fraction of G's positions (every position after the first, which holds the
group's task token: its label, not its mechanism) where its CI exceeds τ (`eval.ci_threshold`):

    r_G(c) = mean over G's positions of 1[g_c > τ]
    s_G(c) = r_G(c) / Σ_H r_H(c)              (its specificity to G; 1: fires on G only)

The set S_G(θ) holds every alive piece (max_H r_H(c) ≥ `min_rate`) with s_G(c) ≥ θ. For each
θ of a sweep (most specific first) S_G(θ) is removed from the weights (the static edit
W' = W − Σ_{c ∈ S} U_c V_cᵀ, `spdkit edit`), and the chosen θ is the one that takes G furthest
towards chance while every other group H loses at most `max_selectivity` of its way:

    fraction_H(S) = (CE_H(W') − CE_H(W)) / (ref_H − CE_H(W)),  ref_H = min(CE_H(W − U V), chance_H)

(ref_H = CE_H(W − U V) where the model is no better than chance on H; under the CI-gated
ablation the same with the masked model: baseline m = g, everything removed m = 0.)

If that set stops short of `frac`, the pieces below θ (down to the sweep's last θ) are tried
one at a time, most specific first, at most `max_trials`: a piece stays if it raises G's
fraction and keeps every other group within `max_selectivity`, until G reaches `frac` (a
previous-token head serves two tasks: its pieces fall between the thresholds, the other
pieces of the task below them). Everything is chosen on one draw of sequences (the one the
rates come from); the chosen set, the specific set, is then measured on a fresh draw, under
the static edit and the CI-gated ablation (m = g, the set's masks 0) side by side; "found":
static fraction ≥ `frac` and static selectivity ≤ `max_selectivity` ("selectivity" is, as
in `mechanism_score`, the largest share another group loses: lower is more selective).
Inserted identity matrices (`insert_identity`) are left out: they are not the target's weights.

Why, next to the co-activation clusters (`mechanism_score`): clusters group pieces that fire
together anywhere, so a task's own pieces end up merged with the pieces every task shares
(the layout of the residual stream, the task token's reading) and no cluster set is selective
(docs/mechanisms_lm.md, eighth measurement). Where each group's positions are known, the
contrast between groups says which pieces belong to one of them, with no clustering at all.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor

from spdkit.analysis.ablation import (
    Groups,
    Off,
    Removal,
    everything,
    fraction,
    reference_ce,
    scored_ces,
    worst_other,
)
from spdkit.analysis.plots import removal_heatmap
from spdkit.figures import finish, new_figure
from spdkit.method.model import ComponentModel
from spdkit.progress import progress_bar

THETAS = (0.99, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)
Piece = tuple[float, str, int]  # (specificity to the group, module, index)


@dataclass(frozen=True)
class SpecificParams:
    """thetas: the specificity thresholds swept (most specific first); min_rate: the firing
    rate on some group below which a piece counts as dead; frac / max_selectivity: what a
    set must reach on its group / may cost any other (fractions of the way to the reference);
    max_trials: most single pieces tried after the sweep."""

    thetas: tuple[float, ...] = THETAS
    min_rate: float = 0.01
    frac: float = 0.8
    max_selectivity: float = 0.1
    max_trials: int = 64

    def __post_init__(self) -> None:
        t = self.thetas
        if not t or any(not 0 <= x <= 1 for x in t) or list(t) != sorted(t, reverse=True):
            raise ValueError(f"thetas must be in [0, 1], most specific first; got {t}")


def firing_rates(
    model: ComponentModel, groups: Groups, threshold: float, chunk: int | None = 64
) -> dict[str, dict[str, Tensor]]:
    """r_G(c) [C] per group G and module: the fraction of G's positions 1.. where g_c > τ."""
    rates: dict[str, dict[str, Tensor]] = {}
    with torch.no_grad():
        for group, (ids, _) in groups.items():
            counts: dict[str, Tensor] = {}
            size = chunk or len(ids)
            for start in range(0, len(ids), size):
                part = ids[start : start + size]
                g, _ = model.importances(part, model.record(part))
                for module, gm in g.items():  # [b, T, C]
                    fired = (gm[:, 1:] > threshold).sum((0, 1)).double().cpu()
                    counts[module] = counts.get(module, 0) + fired
            n_positions = ids.shape[0] * (ids.shape[1] - 1)
            rates[group] = {m: (c / n_positions).float() for m, c in counts.items()}
    return rates


def specificity(rates: Mapping[str, Mapping[str, Tensor]]) -> dict[str, dict[str, Tensor]]:
    """s_G(c) = r_G(c) / Σ_H r_H(c) (0 where a piece never fires)."""
    groups = list(rates)
    out: dict[str, dict[str, Tensor]] = {g: {} for g in groups}
    for module in rates[groups[0]]:
        total = sum(rates[g][module] for g in groups)
        for g in groups:
            out[g][module] = rates[g][module] / total.clamp_min(1e-30)
    return out


def ranked_pieces(
    rates: Mapping[str, Mapping[str, Tensor]], group: str, min_rate: float
) -> list[Piece]:
    """(s_G(c), module, index) of every alive piece, most specific to `group` first."""
    share = specificity(rates)[group]
    out = []
    for module, s in share.items():
        alive = torch.stack([rates[g][module] for g in rates]).amax(0) >= min_rate
        out += [(float(s[i]), module, int(i)) for i in torch.nonzero(alive).flatten()]
    return sorted(out, key=lambda p: (-p[0], p[1], p[2]))


def as_off(pieces: Sequence[Piece]) -> Off:
    off: Off = {}
    for _, module, index in pieces:
        off.setdefault(module, []).append(index)
    return off


def _fractions(
    ce: Mapping[str, float], base: Mapping[str, float], reference: Mapping[str, float]
) -> dict[str, float]:
    return {g: fraction(ce[g], base[g], reference[g]) for g in ce}


def _references(
    model: ComponentModel,
    groups: Groups,
    chance: Mapping[str, float],
    chunk: int | None,
    kinds: Sequence[str] = ("static", "gated"),
) -> dict[str, tuple[dict[str, float], dict[str, float]]]:
    """Per removal kind ("static", "gated"): (baseline CE, reference CE) per group."""
    every = {m: v for m, v in everything(model).items() if m not in model.identity_modules}
    nothing = {"static": None, "gated": {}}
    removals: list[Removal] = [r for k in kinds for r in ((k, nothing[k]), (k, every))]
    ces = scored_ces(model, groups, removals, chunk)
    out = {}
    for i, kind in enumerate(kinds):
        base, full = ces[2 * i], ces[2 * i + 1]
        out[kind] = (base, {g: reference_ce(base[g], full[g], chance[g]) for g in groups})
    return out


def _row(
    group: str, ce: Mapping[str, float], base: Mapping[str, float], ref: Mapping[str, float]
) -> dict[str, Any]:
    """One removal's numbers for `group`'s set: its own fraction and every other group's."""
    fr = _fractions(ce, base, ref)
    others = {g: v for g, v in fr.items() if g != group}
    return {
        "fraction": fr[group],
        "other_fractions": others,
        "selectivity": worst_other(others.values()),
        "ce": dict(ce),
        "baseline_ce": dict(base),
        "reference_ce": dict(ref),
    }


def grow(
    pieces: Sequence[Piece],
    below: Sequence[Piece],
    start: Mapping[str, float],
    measure: Callable[[Sequence[Piece]], Mapping[str, float]],
    params: SpecificParams,
) -> tuple[list[Piece], dict[str, float], int]:
    """The set `pieces` (scored `start`: its fraction and selectivity) grown one piece of
    `below` at a time, in order, at most `params.max_trials` tried: a piece stays if the
    grown set's fraction rises and its selectivity stays ≤ `params.max_selectivity`; stops
    once the fraction reaches `params.frac`. Returns the set, its score, the pieces tried."""
    chosen, current, trials = list(pieces), dict(start), 0
    for piece in below[: params.max_trials]:
        if current["fraction"] >= params.frac:
            break
        trial = measure([*chosen, piece])
        trials += 1
        if (
            trial["fraction"] > current["fraction"]
            and trial["selectivity"] <= params.max_selectivity
        ):
            chosen, current = [*chosen, piece], dict(trial)
    return chosen, current, trials


def choose_theta(sweep: Sequence[Mapping[str, Any]], max_selectivity: float) -> int:
    """Index of the sweep entry with the largest own fraction among those whose selectivity is
    ≤ `max_selectivity`; if none is, the least unselective one."""
    within = [i for i, e in enumerate(sweep) if e["selectivity"] <= max_selectivity]
    if within:
        return max(within, key=lambda i: sweep[i]["fraction"])
    return min(range(len(sweep)), key=lambda i: sweep[i]["selectivity"])


def specific_sets(
    model: ComponentModel,
    select: Groups,
    report: Groups,
    chance: Mapping[str, float],
    threshold: float,
    params: SpecificParams = SpecificParams(),
    chunk: int | None = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Per group, the specific set chosen on `select` (θ swept under the static edit) and
    measured on `report`, a fresh draw of the same groups (module docstring)."""
    if len(select) < 2:
        raise ValueError(
            "specific sets compare position groups: this target has only one "
            f"({', '.join(select)}); planted_lm has one per task"
        )
    rates = firing_rates(model, select, threshold, chunk)
    for group_rates in rates.values():  # not the target's weights: never in a set
        for name in model.identity_modules:
            group_rates.pop(name, None)
    # an upper bound: the one-at-a-time trials stop early once a group reaches `frac`
    steps = len(select) * (len(params.thetas) + params.max_trials + 2) + 2
    bar = progress_bar(steps, "specific sets", progress)
    s_base, s_ref = _references(model, select, chance, chunk, ("static",))["static"]
    bar.update(1)
    refs = _references(model, report, chance, chunk)
    bar.update(1)

    def on_selection(pieces: Sequence[Piece], group: str) -> dict[str, float]:
        """The static edit of `pieces` on the selection draw: `group`'s fraction, selectivity."""
        bar.update(1)
        if not pieces:
            return {"fraction": 0.0, "selectivity": 0.0}
        (ce,) = scored_ces(model, select, [("static", as_off(pieces))], chunk)
        row = _row(group, ce, s_base, s_ref)
        return {"fraction": row["fraction"], "selectivity": row["selectivity"]}

    out: dict[str, Any] = {}
    for group in select:
        ranked = ranked_pieces(rates, group, params.min_rate)
        sweep = []
        for theta in params.thetas:
            within = [p for p in ranked if p[0] >= theta]
            scored = on_selection(within, group)
            sweep.append({"theta": theta, "n_subcomponents": len(within)} | scored)
        chosen = sweep[choose_theta(sweep, params.max_selectivity)]
        pieces, current, trials = grow(
            [p for p in ranked if p[0] >= chosen["theta"]],
            [p for p in ranked if params.thetas[-1] <= p[0] < chosen["theta"]],
            {"fraction": chosen["fraction"], "selectivity": chosen["selectivity"]},
            lambda trial, group=group: on_selection(trial, group),
            params,
        )
        off = as_off(pieces)
        rows = {}
        for kind in ("static", "gated"):
            base, ref = refs[kind]
            (ce,) = scored_ces(model, report, [(kind, off)], chunk) if off else (base,)
            rows[kind] = _row(group, ce, base, ref)
            bar.update(1)
        out[group] = {
            "theta": chosen["theta"],
            "n_added": len(pieces) - chosen["n_subcomponents"],
            "n_trials": trials,
            "selection": current,
            "n_subcomponents": _size(off),
            "items": [f"{m}:{i}" for m, idx in off.items() for i in idx],
            "static": rows["static"],
            "gated": rows["gated"],
            "found": bool(off)
            and rows["static"]["fraction"] >= params.frac
            and rows["static"]["selectivity"] <= params.max_selectivity,
            "sweep": sweep,
        }
    bar.close()
    return {"params": asdict(params) | {"threshold": threshold}, "groups": out}


def _size(off: Off) -> int:
    return sum(len(v) for v in off.values())


SPECIFIC_FILE = "specific.json"


def read_items(run_dir: Path) -> dict[str, list[str]] | None:
    """{group: items} of RUN_DIR/specific.json, or None where there is none; a file that is
    not one is a ValueError naming it."""
    path = run_dir / SPECIFIC_FILE
    if not path.exists():
        return None
    try:
        groups = json.loads(path.read_text())["groups"]
        return {g: list(row["items"]) for g, row in groups.items()}
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a specific.json of `spdkit ablate`: {e!r}") from None


def plot_specific_sets(result: Mapping[str, Any], path: Path | None) -> Figure:
    """Two panels, the static edit and the CI-gated ablation of each group's specific set: rows
    the removed set, columns the groups, cells the fraction of the way to the reference. A
    mechanism removed selectively is a bright diagonal (≥ 0.8) on a dark field (≤ 0.1)."""
    groups = list(result["groups"])
    fig, axes = new_figure(
        1, 2, figsize=(2.4 + 2.2 * len(groups), 1.2 + 0.9 * len(groups)), squeeze=False
    )
    fig.subplots_adjust(wspace=0.08)
    for ax, kind in zip(axes[0], ("static", "gated"), strict=True):
        labels = [f"{r}: {result['groups'][r]['n_subcomponents']} pieces" for r in groups]
        rows = {r: result["groups"][r][kind] for r in groups}
        im = removal_heatmap(ax, rows, groups, labels if kind == "static" else [])
        ax.set_title("static edit" if kind == "static" else "CI-gated ablation (m = g)")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.supxlabel("CE rise in each group: fraction of the way to min(everything removed, chance)")
    fig.suptitle("specific sets: the pieces that fire mostly on one group, removed")
    return finish(fig, path)
