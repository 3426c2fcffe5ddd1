"""The greedy MDL merge as first written, on dense k × k matrices: the specification that
`merge.py` (the one `spdkit cluster` runs) is tested and benchmarked against.

It keeps the group co-activations S [k, k], the k-independent part A [k, k] of ΔL and the
scores A − λ S (`merge.py` gives the formulas) and takes the argmin of all of them at every
merge: O(k²) memory and about O(k³) time, exact by construction. `merge.py` must make the
same merges in the same order, ties included.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from spdkit.analysis.mechanisms.firings import Firings
from spdkit.analysis.mechanisms.merge import (
    Merges,
    description_length,
    pair_scores,
    rank_terms,
    shared_term,
)


def merge_costs(S: Tensor, r: Tensor, alpha: float) -> Tensor:
    """ΔL [k, k] of merging each pair of the k groups (upper triangle; +inf elsewhere), from the
    group co-activations S [k, k] (diagonal: s_i) and ranks r [k]."""
    k = S.shape[0]
    if k < 2:  # no pair to merge (and log2(k - 1) has no value)
        return torch.full((k, k), math.inf, dtype=S.dtype)
    s = S.diagonal()
    A = rank_terms(s[:, None], r[:, None], s[None, :], r[None, :], S, alpha)
    delta = shared_term(float(s.sum()), k) + pair_scores(A, S, math.log2(k - 1))
    return delta.masked_fill(~torch.ones(k, k, dtype=torch.bool).triu(1), math.inf)


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
        s = S.diagonal()
        A = rank_terms(s[:, None], r[:, None], s[None, :], r[None, :], S, alpha)
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
    return rank_terms(s[a], r[a], s, r, row, alpha)


def merge_greedy_dense(
    firings: Firings, alpha: float, on_merge: Callable[[int], None] | None = None
) -> Merges:
    """Greedy MDL merging of the record's subcomponents (all live: s_i > 0), from their pair
    counts [n, n] (`firings.pair_counts()`).

    Since ΔL_ij = s_Σ log2(1 − 1/k) + (A_ij − log2(k − 1) s_ij) with A the rank terms, only
    the bracket decides which pair; A and s change only in the merged group's row and column,
    so an iteration is one pass over the k × k matrices (empty slots are dropped whenever
    they are half of them). `on_merge(k)` is called after each merge (progress).
    """
    groups = _Groups.singletons(firings, firings.pair_counts(), alpha)
    s0 = groups.S.diagonal()
    cost0 = description_length(s0.numpy(), groups.r.numpy(), alpha)
    s_sum = float(s0.sum())
    k = len(groups.members)
    deltas: list[float] = []
    score = torch.empty_like(groups.A)
    while k > 1:
        torch.sub(groups.A, groups.S * math.log2(k - 1), out=score)
        best = int(score.argmin())
        n = score.shape[0]
        a, b = sorted((best // n, best % n))
        delta = shared_term(s_sum, k) + float(score[a, b])
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
    cost = description_length(s.numpy(), groups.r[live].numpy(), alpha)
    return Merges([groups.members[i] for i in live], fired, cost0, cost, deltas)
