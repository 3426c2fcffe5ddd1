"""Group rank-one subcomponents into mechanisms by minimum description length (VPD §7).

Describe the samples by naming, for each sample, the groups that fire on it and, for each,
the rank-one pieces it is made of. With k groups, group i firing on s_i samples and made of
r_i subcomponents, the cost in bits is

    L = Σ_i s_i (log2 k + α r_i)

(log2 k bits to name a group, α per rank-one piece it brings; the one-off dictionary is
ignored). A group's firing is the OR of its members', so merging i and j into a group firing on
s_∪ = s_i + s_j − s_ij samples (s_ij: samples where both fire) changes the cost by

    ΔL_ij = s_Σ log2(1 − 1/k) + A_ij − λ s_ij,   λ = log2(k − 1),
    A_ij  = α (s_i r_j + s_j r_i − s_ij (r_i + r_j))

(s_Σ = Σ_i s_i): every firing's name gets shorter, a joint firing is named once instead of
twice, and whenever one fires without the other the other's pieces are paid for too. This is
the VPD paper's ΔL with its merged count read as the OR count (as its code does), simplified.

Merging starts from singletons and always takes the pair with the smallest ΔL (ties: the pair
whose groups' lowest ids come first). It stops when no merge shortens the description
(min ΔL ≥ 0): the clustering is a local minimum of L, and the number of mechanisms is what the
data asks for, not a user's choice. (VPD merges to one group and keeps the iteration where ΔL
crosses 0, sampling pairs stochastically; greedy selection makes that the first such
iteration and the result deterministic.)

How it scales. The first term of ΔL is the same for every pair, so the merge needs the pair
with the smallest score A_ij − λ s_ij: a line in λ per pair, and λ falls as k does. Instead of
k × k matrices (`merge_reference.py`, the specification this module is tested against), each
group keeps only its best partner's line and a *certificate*: the λ down to which no other
line of its row can undercut it (lines with a larger s_ij rise faster as λ falls and never
do). A merge of a and b changes only lines that touch a or b, so after it the new group's row
is counted once, every other row compares its best with its new line to a (O(k)), and only
rows whose best was a or b, or whose certificate λ has been passed, are counted again, and
only while their *floor* (a lower bound on their best score: scores only rise as λ falls, and
each new line lowers it) could beat the best certified score. A
row's counts s_i· come from the firing record restricted to the samples group i fires on
(O(s_i × L0), L0 the firings per sample), or, for a group firing on most samples of a dense
record, from its row bits (O(k × samples / 64)); memory is the record, O(k) and the bits (kept
only while they take at most _BITS_BUDGET), never O(k²).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse

from spdkit.analysis.mechanisms.firings import Firings

_ROW_BLOCK_ELEMENTS = 1 << 22  # rows counted at once × k: bounds the [rows, k] working blocks
_CERTIFICATE_SLACK = 1e-12  # relative float error allowed for when certificates are checked
_RECOUNT_BATCH = 64  # rows without a certificate counted at once, lowest floors first
_BITS_BUDGET = 1 << 30  # bytes the groups' row bits may take (else every count walks samples)
_WORD_VS_FIRING = 0.15  # cost of one 64-row word AND + popcount, in firing-record entries


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


def description_length(s: np.ndarray, r: np.ndarray, alpha: float) -> float:
    """L = Σ_i s_i (log2 k + α r_i) over the k groups with firing counts s [k], ranks r [k]."""
    s, r = np.asarray(s, dtype=np.float64), np.asarray(r, dtype=np.float64)
    k = s.size
    return float((s * (math.log2(k) + alpha * r)).sum()) if k > 1 else float(alpha * (s * r).sum())


def rank_terms(
    s_i: np.ndarray,
    r_i: np.ndarray,
    s_j: np.ndarray,
    r_j: np.ndarray,
    s_ij: np.ndarray,
    alpha: float,
) -> np.ndarray:
    """A_ij = α (s_i r_j + s_j r_i − s_ij (r_i + r_j)): the part of ΔL that does not change with
    k (arrays broadcast; the bracket is an exact integer in float64, so every caller gets the
    same float)."""
    return alpha * (s_i * r_j + s_j * r_i - s_ij * (r_i + r_j))


def pair_scores(A: np.ndarray, s_ij: np.ndarray, lam: float) -> np.ndarray:
    """A_ij − λ s_ij: what decides which pair merges (ΔL less the term shared by all pairs)."""
    return A - lam * s_ij


def shared_term(s_sum: float, k: int) -> float:
    """s_Σ log2(1 − 1/k): the part of ΔL every pair has (each firing's name gets shorter)."""
    return s_sum * math.log2(1 - 1 / k)


@dataclass
class _Groups:
    """The groups, by slot (slot = the group's lowest subcomponent id): which group each
    subcomponent is in (`label` [n]), firing counts s [n], ranks r [n], members, the sorted
    samples each fires on, whether the slot holds a group, and the record's firings that still
    count (`alive` [firings]): one per group and sample, so that counting a group's firings on
    a sample needs no deduplication (a merge retires b's firings on the samples a fires on)."""

    label: np.ndarray
    s: np.ndarray
    r: np.ndarray
    members: list[list[int]]
    samples: list[np.ndarray]
    active: np.ndarray
    alive: np.ndarray
    entries_of: list[np.ndarray]  # per subcomponent: its offsets into the record, by sample
    sample_of: np.ndarray  # per firing: its sample
    bits: np.ndarray | None  # uint64 [n, ⌈samples / 64⌉]: the samples each group fires on
    firings_per_sample: float

    @classmethod
    def singletons(cls, firings: Firings) -> _Groups:
        n = len(firings.names)
        sample_of = np.repeat(np.arange(firings.n_samples), np.diff(firings.sample_ptr))
        order = np.argsort(firings.fired, kind="stable")  # by subcomponent, samples ascending
        bounds = np.concatenate([[0], np.cumsum(np.bincount(firings.fired, minlength=n))])
        entries_of = [order[bounds[i] : bounds[i + 1]] for i in range(n)]
        samples = [sample_of[e] for e in entries_of]
        words = -(-firings.n_samples // 64)
        bits = None
        if n * words * 8 <= _BITS_BUDGET:
            packed = np.zeros((n, words * 8), dtype=np.uint8)
            packed[:, : -(-firings.n_samples // 8)] = firings.row_bits()
            bits = packed.view(np.uint64)
        return cls(
            label=np.arange(n),
            s=np.diff(bounds).astype(np.float64),
            r=np.ones(n),
            members=[[i] for i in range(n)],
            samples=samples,
            active=np.ones(n, bool),
            alive=np.ones(len(firings.fired), bool),
            entries_of=entries_of,
            sample_of=sample_of,
            bits=bits,
            firings_per_sample=len(firings.fired) / max(1, firings.n_samples),
        )

    def merge(self, a: int, b: int) -> None:
        """Group b joins group a (a < b keeps the union in slot a)."""
        both = np.intersect1d(self.samples[a], self.samples[b], assume_unique=True)
        if len(both):
            b_entries = np.concatenate([self.entries_of[m] for m in self.members[b]])
            on_both = np.isin(self.sample_of[b_entries], both, assume_unique=False)
            self.alive[b_entries[on_both]] = False
        if self.bits is not None:
            self.bits[a] |= self.bits[b]
            self.bits[b] = 0
        self.label[self.members[b]] = a
        self.members[a] += self.members[b]
        self.members[b] = []
        self.samples[a] = np.union1d(self.samples[a], self.samples[b])
        self.samples[b] = self.samples[b][:0]
        self.s[a] = len(self.samples[a])
        self.s[b] = 0.0
        self.r[a] += self.r[b]
        self.r[b] = 0.0
        self.active[b] = False

    def coactivations(self, firings: Firings, rows: np.ndarray) -> np.ndarray:
        """s_i· [len(rows), n] float64: samples on which group `rows[t]` and each slot's group
        both fire. Each row the cheaper way: from the record's live firings on the samples
        its group fires on (O(s_i × L0)), or, for a group firing on many samples of a dense
        record, one AND + popcount of its row bits with every group's (O(n × samples / 64))."""
        out = np.empty((len(rows), len(self.label)))
        by_bits = np.zeros(len(rows), dtype=bool)
        if self.bits is not None:
            words = self.bits.size
            by_bits = self.s[rows] * self.firings_per_sample > _WORD_VS_FIRING * words
        for t in np.flatnonzero(by_bits):
            out[t] = np.bitwise_count(self.bits & self.bits[rows[t]]).sum(1, dtype=np.int64)
        if (~by_bits).any():
            out[~by_bits] = self._coactivations_from_samples(firings, rows[~by_bits])
        return out

    def _coactivations_from_samples(self, firings: Firings, rows: np.ndarray) -> np.ndarray:
        n = len(self.label)
        lens = np.array([len(self.samples[i]) for i in rows], dtype=np.int64)
        samples = np.concatenate([self.samples[i] for i in rows])
        pos, offsets = firings.entries(samples)
        keep = self.alive[offsets]
        row = np.repeat(np.arange(len(rows)), lens)[pos[keep]]
        flat = row * n + self.label[firings.fired[offsets[keep]]]
        return np.bincount(flat, minlength=len(rows) * n).reshape(len(rows), n).astype(np.float64)


@dataclass
class _Bests:
    """What is known about each row's best partner: its slot (−1: the line is gone), the
    pair's A and s_ij, the certificate `until` (the partner stays the row's best, ties to the
    lower slot, at every λ above it) and `floor`, a lower bound on the row's best score at every
    λ from now on. Scores only rise as λ falls, so the best score when the row was last counted
    stays a floor, lowered by each new line the row is offered; a row whose floor is above the
    best certified score cannot hold the minimum and is not counted again. `counted_at`: the λ
    of the row's last count (its best is exact at that λ even where the certificate is not
    above it, as at a near-tie)."""

    partner: np.ndarray
    A: np.ndarray
    S: np.ndarray
    until: np.ndarray
    floor: np.ndarray
    counted_at: np.ndarray

    @classmethod
    def empty(cls, n: int) -> _Bests:
        never = np.full(n, np.nan)
        return cls(
            np.full(n, -1), np.zeros(n), np.zeros(n), never, np.full(n, -np.inf), never.copy()
        )

    def certified(self, active: np.ndarray, lam: float) -> np.ndarray:
        """Rows whose best is exact at λ: a line still there, certified or counted at λ."""
        return active & (self.partner >= 0) & ((self.until < lam) | (self.counted_at == lam))

    def scores(self, lam: float) -> np.ndarray:
        return pair_scores(self.A, self.S, lam)


def _certificates(
    A_p: np.ndarray, S_p: np.ndarray, A: np.ndarray, S: np.ndarray, lam: float
) -> np.ndarray:
    """λ* at which a line (A, S) undercuts the best line (A_p, S_p) as λ falls,
    λ* = (A − A_p) / (S − S_p), for lines rising slower (S < S_p; else −inf), raised by the
    float error of comparing the two scores so that above it the float argmin is unchanged."""
    gap = S_p - S
    with np.errstate(divide="ignore", invalid="ignore"):
        crossing = (A_p - A) / gap
        slack = (np.abs(A) + np.abs(A_p) + abs(lam) * (S + S_p)) / gap
        return np.where(gap > 0, crossing + _CERTIFICATE_SLACK * (1 + slack), -np.inf)


def _count_rows(
    groups: _Groups, bests: _Bests, firings: Firings, rows: np.ndarray, lam: float, alpha: float
) -> None:
    """Count `rows` exactly, in blocks bounded by _ROW_BLOCK_ELEMENTS."""
    block = max(1, _ROW_BLOCK_ELEMENTS // max(len(groups.label), 1))
    for start in range(0, len(rows), block):
        part = rows[start : start + block]
        _set_bests(groups, bests, part, groups.coactivations(firings, part), lam, alpha)


def _count_all(groups: _Groups, bests: _Bests, firings: Firings, lam: float, alpha: float) -> None:
    """The first count, of every row before any merge: blocks of one sparse product of the
    record (samples × subcomponents) with itself, O(N × L0²) for N samples."""
    n = len(groups.label)
    ones = np.ones(len(firings.fired), dtype=np.float32)  # counts exact below 2^24
    H = scipy.sparse.csr_matrix((ones, firings.fired, firings.sample_ptr), (firings.n_samples, n))
    Ht = H.T.tocsr()
    block = max(1, _ROW_BLOCK_ELEMENTS // max(n, 1))
    for start in range(0, n, block):
        part = np.arange(start, min(start + block, n))
        S = (Ht[start : start + len(part)] @ H).toarray().astype(np.float64)
        _set_bests(groups, bests, part, S, lam, alpha)


def _set_bests(
    groups: _Groups, bests: _Bests, rows: np.ndarray, S: np.ndarray, lam: float, alpha: float
) -> None:
    """From the rows' exact counts S [len(rows), n]: each row's best partner is the argmin of
    A_ij − λ s_ij at this λ (lowest slot on ties), its certificate the highest λ at which
    another of its lines undercuts it, its floor its best score now."""
    s, r = groups.s, groups.r
    idx = np.arange(len(rows))
    A = rank_terms(s[rows, None], r[rows, None], s[None, :], r[None, :], S, alpha)
    score = pair_scores(A, S, lam)
    score[:, ~groups.active] = np.inf
    score[idx, rows] = np.inf
    p = score.argmin(1)
    A_p, S_p = A[idx, p], S[idx, p]
    crossing = _certificates(A_p[:, None], S_p[:, None], A, S, lam)
    crossing[~np.isfinite(score)] = -np.inf
    bests.partner[rows], bests.A[rows], bests.S[rows] = p, A_p, S_p
    bests.until[rows] = crossing.max(1)
    bests.floor[rows] = score[idx, p]
    bests.counted_at[rows] = lam


def _offer_new_group(
    groups: _Groups, bests: _Bests, a: int, S_a: np.ndarray, lam: float, alpha: float
) -> None:
    """After a merge into slot a: every other row gets its new line to a. Where the row still
    has its best line, the two are compared at this λ (a wins if lower, or equal and a is the
    lower slot) and the certificate covers both (the crossing, if the loser rises slower);
    every row's floor drops to the new line's score if that is lower."""
    s, r = groups.s, groups.r
    rows = np.flatnonzero(groups.active)
    rows = rows[rows != a]
    A_a = rank_terms(s[rows], r[rows], s[a], r[a], S_a[rows], alpha)
    S_ra = S_a[rows]
    sc_a = pair_scores(A_a, S_ra, lam)
    bests.floor[rows] = np.minimum(bests.floor[rows], sc_a)
    known = bests.partner[rows] >= 0
    rows, A_a, S_ra, sc_a = rows[known], A_a[known], S_ra[known], sc_a[known]
    A_p, S_p, p = bests.A[rows], bests.S[rows], bests.partner[rows]
    sc_p = pair_scores(A_p, S_p, lam)
    a_wins = (sc_a < sc_p) | ((sc_a == sc_p) & (a < p))
    win_A, win_S = np.where(a_wins, A_a, A_p), np.where(a_wins, S_ra, S_p)
    lose_A, lose_S = np.where(a_wins, A_p, A_a), np.where(a_wins, S_p, S_ra)
    bests.partner[rows] = np.where(a_wins, a, p)
    bests.A[rows], bests.S[rows] = win_A, win_S
    bests.until[rows] = np.maximum(
        bests.until[rows], _certificates(win_A, win_S, lose_A, lose_S, lam)
    )


def _best_pair(
    groups: _Groups, bests: _Bests, firings: Firings, lam: float, alpha: float
) -> tuple[int, float]:
    """The row holding the smallest score at this λ (the lowest such row: its partner is the
    lowest slot above it) and that score. Certified rows give their score at once; a row
    without a certificate is counted only while its floor could still beat the best certified
    score, lowest floors first."""
    slots = np.arange(len(groups.label))
    while True:
        certified = bests.certified(groups.active, lam)
        current = np.where(certified, bests.scores(lam), np.inf)
        row = int(current.argmin())
        best = float(current[row])
        open_ = groups.active & ~certified
        need = open_ & ((bests.floor < best) | ((bests.floor == best) & (slots < row)))
        rows = np.flatnonzero(need)
        if len(rows) == 0:
            return row, best
        rows = rows[np.argsort(bests.floor[rows], kind="stable")[:_RECOUNT_BATCH]]
        _count_rows(groups, bests, firings, rows, lam, alpha)


def merge_greedy(
    firings: Firings, alpha: float, on_merge: Callable[[int], None] | None = None
) -> Merges:
    """Greedy MDL merging of the record's subcomponents (all live: s_i > 0), exactly as
    `merge_reference.merge_greedy_dense` merges them, in memory O(record + k) (+ row bits).
    `on_merge(k)` is called after each merge (progress)."""
    groups = _Groups.singletons(firings)
    n = len(groups.label)
    cost0 = description_length(groups.s, groups.r, alpha)
    s_sum = float(groups.s.sum())
    bests = _Bests.empty(n)
    if n > 1:
        _count_all(groups, bests, firings, math.log2(n - 1), alpha)
    deltas: list[float] = []
    k = n
    while k > 1:
        lam = math.log2(k - 1)
        a, score = _best_pair(groups, bests, firings, lam, alpha)
        delta = shared_term(s_sum, k) + score
        if delta >= 0:
            break
        b = int(bests.partner[a])
        assert a < b, "the lowest row at the minimum has its partner above it"
        s_a, s_b = groups.s[a], groups.s[b]
        groups.merge(a, b)
        s_sum += groups.s[a] - s_a - s_b
        k -= 1
        deltas.append(delta)
        bests.partner[(bests.partner == a) | (bests.partner == b)] = -1
        if k > 1:
            lam_next = math.log2(k - 1)
            S_a = groups.coactivations(firings, np.array([a]))
            _set_bests(groups, bests, np.array([a]), S_a, lam_next, alpha)
            _offer_new_group(groups, bests, a, S_a[0], lam_next, alpha)
        if on_merge is not None:
            on_merge(k)
    live = np.flatnonzero(groups.active).tolist()
    fired = [int(groups.s[i]) for i in live]
    cost = description_length(groups.s[live], groups.r[live], alpha)
    return Merges([groups.members[i] for i in live], fired, cost0, cost, deltas)
