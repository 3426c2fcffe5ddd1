"""Metrics of any decomposition: CI-L0, the inserted-identity check, output losses under CI,
all-ones and all-zero masks, the order that shows a CI-on-one-hot diagonal. What a target
adds (TMS feature match, the residual-MLP verdict) is its own (`spdkit.targets`); the LM
report is `spdkit.analysis.lm`; norms and CI are `spdkit.method.measures`."""

from __future__ import annotations

import torch
from torch import Tensor

from spdkit.method.losses import Divergence
from spdkit.method.measures import chunks, non_negligible, weighted_sum
from spdkit.method.model import ComponentModel


def mean_l0(ci: dict[str, Tensor], threshold: float) -> dict[str, float]:
    """Mean number of subcomponents per input with CI > threshold, per module."""
    return {n: (g > threshold).float().sum(-1).mean().item() for n, g in ci.items()}


def identity_check(
    ci: Tensor, norms: Tensor, d: int, ci_threshold: float, norm_threshold: float
) -> dict[str, int | bool]:
    """How an inserted d×d identity was decomposed (paper appendix heuristic).

    ci [..., C] on evaluation inputs, norms [C]. A rank-d identity should be d subcomponents
    that are active together on (nearly) every input: one dense group. "dense" = CI above the
    threshold on at least half of the positions; the check passes when exactly d are dense
    and they are all the non-negligible ones.
    """
    active = (ci > ci_threshold).flatten(0, -2).float().mean(0)  # [C] fraction of positions
    dense = active >= 0.5
    live = non_negligible(norms, norm_threshold)
    return {
        "d": d,
        "C": int(norms.numel()),
        "n_non_negligible": int(live.sum()),
        "n_dense": int(dense.sum()),
        "n_ever_active": int((active > 0).sum()),
        "one_dense_group_of_rank_d": bool(int(dense.sum()) == d and bool((dense == live).all())),
    }


@torch.no_grad()
def output_losses(
    model: ComponentModel, x: Tensor, divergence: Divergence, chunk: int | None = None
) -> dict[str, float]:
    """D(masked output, target output) for masks = CI (lower-leaky g), all ones (the unmasked
    sum of components) and all zeros (every subcomponent ablated); `chunk` rows at a time."""
    ones = model.ones_masks()
    zeros = {n: torch.zeros_like(m) for n, m in ones.items()}
    parts = []
    for share, piece in chunks(x, chunk):
        record = model.record(piece)
        ci, _ = model.importances(piece, record)
        kinds = (("ci_masked", ci), ("unmasked", ones), ("zero_masked", zeros))
        out = {
            name: divergence(model.masked_forward(piece, masks, record), record.output).item()
            for name, masks in kinds
        }
        parts.append((share, out))
    return weighted_sum(parts)


def greedy_feature_order(ci: Tensor, threshold: float) -> list[int]:
    """Column order of ci [n_features, C] that shows the diagonal (paper Figures 8, 12, 13): for
    each feature in turn, its highest-CI subcomponent not yet taken (if above `threshold`);
    then the remaining subcomponents active on some feature, then the rest."""
    ci = ci.detach().float().cpu()
    active = set(torch.nonzero(ci.max(dim=0).values > threshold).flatten().tolist())
    order: list[int] = []
    taken: set[int] = set()
    for row in ci:
        for c in torch.argsort(row, descending=True).tolist():
            if c in active and c not in taken:
                if row[c] > threshold:
                    order.append(c)
                    taken.add(c)
                break
    order += sorted(active - taken)
    return order + sorted(set(range(ci.shape[1])) - set(order))
