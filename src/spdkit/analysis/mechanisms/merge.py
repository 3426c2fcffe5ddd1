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

from spdkit.analysis.mechanisms.firings import Firings


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
    if k < 2:  # no pair to merge (and log2(k - 1) has no value)
        return torch.full((k, k), math.inf, dtype=S.dtype)
    delta = (
        S.diagonal().sum() * math.log2(1 - 1 / k) - S * math.log2(k - 1) + rank_terms(S, r, alpha)
    )
    return delta.masked_fill(~torch.ones(k, k, dtype=torch.bool).triu(1), math.inf)


def rank_terms(S: Tensor, r: Tensor, alpha: float) -> Tensor:
    """α (s_i r_j + s_j r_i − s_ij (r_i + r_j)) [k, k] from the co-activations S [k, k]
    (diagonal s_i) and ranks r [k]: the part of ΔL that does not change with k."""
    s = S.diagonal()
    return alpha * (
        s[:, None] * r[None, :] + s[None, :] * r[:, None] - S * (r[:, None] + r[None, :])
    )


@dataclass
class _Groups:
    """The merge's state, by slot: co-activations S [n, n] (diagonal s_i), ranks r [n], the
    k-independent ΔL part A [n, n] (+inf on the diagonal and for empty slots), members, and
    the rows each group fires on as bits (uint8 [n, rows / 8]: the OR of its members'), so a
    merged group's co-activation with every group is one AND + popcount over n × rows bits.
    Merging a < b keeps the union in slot a, empties b."""

    S: Tensor
    r: Tensor
    A: Tensor
    members: list[list[int]]
    bits: np.ndarray
    active: Tensor  # bool [n]

    @classmethod
    def singletons(cls, firings: Firings, pair_counts: Tensor, alpha: float) -> _Groups:
        n = pair_counts.shape[0]
        S = pair_counts.clone()
        r = torch.ones(n, dtype=torch.float64)
        A = rank_terms(S, r, alpha)
        A.fill_diagonal_(math.inf)
        members = [[i] for i in range(n)]
        active = torch.ones(n, dtype=torch.bool)
        return cls(S, r, A, members, firings.row_bits(), active)

    def merge(self, a: int, b: int, alpha: float) -> None:
        self.bits[a] |= self.bits[b]
        self.bits[b] = 0
        self.members[a] += self.members[b]
        self.members[b] = []
        self.active[b] = False
        self.r[a] += self.r[b]
        counts = np.bitwise_count(self.bits & self.bits[a]).sum(1, dtype=np.int64)
        row = torch.from_numpy(counts).double()
        for M in (self.S, self.A):
            M[b, :] = 0
            M[:, b] = 0
        self.S[a, :] = row
        self.S[:, a] = row
        terms = _row_terms(row, self.S.diagonal(), self.r, a, alpha)
        terms[~self.active] = math.inf
        terms[a] = math.inf
        self.A[a, :] = terms
        self.A[:, a] = terms
        self.A[b, :] = math.inf
        self.A[:, b] = math.inf

    def compacted(self) -> _Groups:
        """The same groups in slots 0..k-1 (dropping the empty slots)."""
        keep = self.active.nonzero().flatten()
        idx = keep.tolist()
        return _Groups(
            self.S[keep][:, keep],
            self.r[keep],
            self.A[keep][:, keep],
            [self.members[i] for i in idx],
            self.bits[idx],
            torch.ones(len(idx), dtype=torch.bool),
        )


def _row_terms(row: Tensor, s: Tensor, r: Tensor, a: int, alpha: float) -> Tensor:
    """rank_terms of the group in slot a against every slot (its co-activations `row` [n],
    every group's s and r [n]): a merge's update costs O(n), not O(n²)."""
    return alpha * (s[a] * r + s * r[a] - row * (r[a] + r))


def merge_greedy(
    firings: Firings,
    pair_counts: Tensor,
    alpha: float,
    on_merge: Callable[[int], None] | None = None,
) -> Merges:
    """Greedy MDL merging of the record's subcomponents (all live: s_i > 0), starting from
    their pair counts [n, n] (`firings.pair_counts()`).

    Since ΔL_ij = s_Σ log2(1 − 1/k) + (A_ij − log2(k − 1) s_ij) with A the rank terms, only
    the bracket decides which pair; A and s change only in the merged group's row and column,
    so an iteration is one pass over the k × k matrices (empty slots are dropped whenever
    they are half of them). `on_merge(k)` is called after each merge (progress).
    """
    groups = _Groups.singletons(firings, pair_counts, alpha)
    s0 = groups.S.diagonal()
    cost0 = description_length(s0, groups.r, alpha)
    s_sum = float(s0.sum())
    k = len(groups.members)
    deltas: list[float] = []
    score = torch.empty_like(groups.A)
    while k > 1:
        torch.add(groups.A, groups.S, alpha=-math.log2(k - 1), out=score)
        best = int(score.argmin())
        n = score.shape[0]
        a, b = sorted((best // n, best % n))
        delta = s_sum * math.log2(1 - 1 / k) + float(score[a, b])
        if delta >= 0:
            break
        s_a, s_b = float(groups.S[a, a]), float(groups.S[b, b])
        groups.merge(a, b, alpha)
        s_sum += float(groups.S[a, a]) - s_a - s_b
        k -= 1
        deltas.append(delta)
        if on_merge is not None:
            on_merge(k)
        if k < n // 2 and n > 64:
            groups = groups.compacted()
            score = torch.empty_like(groups.A)
    live = groups.active.nonzero().flatten().tolist()
    fired = [int(groups.S[i, i]) for i in live]
    s = groups.S.diagonal()[live]
    cost = description_length(s, groups.r[live], alpha)
    return Merges([groups.members[i] for i in live], fired, cost0, cost, deltas)
