"""Group rank-one subcomponents into mechanisms by minimum description length (VPD §7).

Describe the samples by naming, for each sample, the groups that fire on it and, for each,
the rank-one pieces it is made of. With k groups, group i firing on s_i samples and made of
r_i subcomponents, the cost in bits is

    L = Σ_i s_i (log2 k + α r_i)

(log2 k bits to name a group, α per rank-one piece it brings; the one-off dictionary is
ignored). A group's g is the OR of its members', so merging i and j into a group firing on
s_∪ = s_i + s_j − s_ij samples (s_ij: samples where both fire) changes the cost by

    ΔL_ij = s_Σ log2(1 − 1/k) − s_ij log2(k − 1) + α (s_i r_j + s_j r_i − s_ij (r_i + r_j))

(s_Σ = Σ_i s_i): every firing's name gets shorter, a joint firing is named once instead of
twice, and whenever one fires without the other the other's pieces are paid for too. This is
the VPD paper's ΔL with its merged count read as the OR count (as its code does), simplified.

Merging starts from singletons and always takes the pair with the smallest ΔL. It stops when
no merge shortens the description (min ΔL ≥ 0): the clustering is a local minimum of L, and the
number of mechanisms is what the data asks for, not a user's choice. (VPD merges to one group
and keeps the iteration where ΔL crosses 0, sampling pairs stochastically; greedy selection
makes that the first such iteration and the result deterministic.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from spdkit.coactivation import Firings


@dataclass(frozen=True)
class Merges:
    """The outcome: groups as lists of subcomponent ids (into the record's names), the samples
    each group fires on (s of the OR), the cost L before any merge and after the last, and ΔL
    of each merge made."""

    groups: list[list[int]]
    fired: list[int]
    cost_singletons: float
    cost_final: float
    deltas: list[float]


def description_length(s: Tensor, r: Tensor, alpha: float) -> float:
    """L = Σ_i s_i (log2 k + α r_i) over the k groups with firing counts s [k], ranks r [k]."""
    k = s.numel()
    return float((s * (math.log2(k) + alpha * r)).sum()) if k > 1 else float(alpha * (s * r).sum())


def merge_costs(S: Tensor, r: Tensor, alpha: float) -> Tensor:
    """ΔL [k, k] of merging each pair of the k groups (upper triangle; +inf elsewhere), from the
    group co-activations S [k, k] (diagonal: s_i) and ranks r [k]."""
    k = S.shape[0]
    s = S.diagonal()
    delta = (
        s.sum() * math.log2(1 - 1 / k)
        - S * math.log2(k - 1)
        + alpha
        * (s[:, None] * r[None, :] + s[None, :] * r[:, None] - S * (r[:, None] + r[None, :]))
    )
    return delta.masked_fill(~torch.ones(k, k, dtype=torch.bool).triu(1), math.inf)


def _group_row(firings: Firings, samples: np.ndarray, slot_of: np.ndarray, n_slots: int) -> Tensor:
    """Co-activation of one group (firing on `samples`) with every group: the number of those
    samples on which each group fires at least once (an OR over its members)."""
    local, ids = firings.firing_ids(samples)
    pairs = np.unique(local * n_slots + slot_of[ids])
    return torch.from_numpy(np.bincount(pairs % n_slots, minlength=n_slots)).double()


def merge_greedy(
    firings: Firings,
    pair_counts: Tensor,
    alpha: float,
    on_merge: Callable[[int], None] | None = None,
) -> Merges:
    """Greedy MDL merging of the record's subcomponents (all live: s_i > 0), starting from
    their pair counts [n, n] (`firings.pair_counts()`).

    Groups live in slots 0..n-1 (the singletons); merging i < j puts the union in slot i and
    empties slot j. Each iteration works on the active slots only, so its cost is O(k²).
    `on_merge(k)` is called after each merge (progress).
    """
    n = len(firings.names)
    S = pair_counts.clone()  # group co-activations, by slot
    r = torch.ones(n, dtype=torch.float64)
    members: list[list[int]] = [[i] for i in range(n)]
    fired_on = firings.samples_of()
    slot_of = np.arange(n)
    active = torch.arange(n)  # slot ids of the current groups
    cost0 = description_length(S.diagonal(), r, alpha)
    deltas: list[float] = []
    while len(active) > 1:
        sub = S[active][:, active]
        costs = merge_costs(sub, r[active], alpha)
        best = int(costs.argmin())
        delta = float(costs.view(-1)[best])
        if delta >= 0:
            break
        a, b = (int(active[best // len(active)]), int(active[best % len(active)]))
        fired_on[a] = np.union1d(fired_on[a], fired_on[b])
        fired_on[b] = fired_on[b][:0]
        members[a] += members[b]
        members[b] = []
        slot_of[members[a]] = a
        row = _group_row(firings, fired_on[a], slot_of, n)
        S[a, :] = row
        S[:, a] = row
        S[a, a] = len(fired_on[a])
        S[b, :] = 0
        S[:, b] = 0
        r[a] += r[b]
        active = active[active != b]
        deltas.append(delta)
        if on_merge is not None:
            on_merge(len(active))
    groups = [members[int(i)] for i in active]
    fired = [int(S[i, i]) for i in active]
    cost = description_length(S.diagonal()[active], r[active], alpha)
    return Merges(groups, fired, cost0, cost, deltas)
