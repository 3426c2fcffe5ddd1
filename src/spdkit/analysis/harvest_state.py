"""The harvest's streaming state, bounded whatever the number of tokens read: the kept contexts
per subcomponent (a top-k by key), sparse (subcomponent, token) counts, and the co-firing
counts (`spdkit.analysis.harvest` drives them batch by batch)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import scipy.sparse
import torch
from torch import Tensor


class KeptContexts:
    """Per subcomponent, the k events of largest key seen so far: key [C, k] (−inf: empty),
    the CI there [C, k] and its token window [C, k, W]. Merging a batch is one top-k over
    the kept and the new events: the state never grows with the number of tokens."""

    def __init__(self, C: int, k: int, window: int) -> None:
        self.key = torch.full((C, k), -math.inf)
        self.ci = torch.zeros(C, k)
        self.windows = torch.full((C, k, window), -1, dtype=torch.long)
        self.ci_windows = torch.zeros(C, k, window)  # its CI on every token of the window

    def add(
        self, key: Tensor, ci: Tensor, windows: Tensor, ci_of: Callable[[Tensor, Tensor], Tensor]
    ) -> None:
        """key, ci [C, n] (−inf: not an event), windows [n, W] shared by every subcomponent;
        ci_of(events [C, k], subcomponents [C, k]) gives the CI windows [C, k, W] of just
        the events kept (never all n × C windows at once)."""
        k = self.key.shape[1]
        if k == 0:
            return
        # only rows where a new event could enter: the batch's best ≥ the row's k-th kept key
        # (a row whose new keys are all below every kept one keeps its state exactly)
        rows = (key.amax(1) >= self.key[:, -1]).nonzero().flatten()
        if len(rows) == 0:
            return
        key, ci = key[rows], ci[rows]
        n = key.shape[1]
        top = key.topk(min(k, n), dim=1)  # the batch's best per subcomponent first: [R, k']
        subs = rows[:, None].expand_as(top.indices)
        cand_key = torch.cat([self.key[rows], top.values], 1)
        cand_ci = torch.cat([self.ci[rows], ci.gather(1, top.indices)], 1)
        cand_win = torch.cat([self.windows[rows], windows[top.indices]], 1)
        cand_ciw = torch.cat([self.ci_windows[rows], ci_of(top.indices, subs)], 1)
        best = cand_key.topk(k, dim=1).indices
        per_token = best[..., None].expand(-1, -1, cand_win.shape[-1])
        self.key[rows] = cand_key.gather(1, best)
        self.ci[rows] = cand_ci.gather(1, best)
        self.windows[rows] = cand_win.gather(1, per_token)
        self.ci_windows[rows] = cand_ciw.gather(1, per_token)


class TokenCounts:
    """Sparse counts of (subcomponent, token) pairs: keys sub × vocab + token, reduced with
    np.unique every `every` batches (memory: the distinct pairs seen, not C × vocab)."""

    def __init__(self, vocab: int, every: int = 16) -> None:
        self.vocab, self.every = vocab, every
        self.keys = np.zeros(0, dtype=np.int64)
        self.counts = np.zeros(0, dtype=np.int64)
        self.pending: list[np.ndarray] = []

    def add(self, sub: Tensor, token: Tensor) -> None:
        self.pending.append((sub.long() * self.vocab + token.long()).numpy())
        if len(self.pending) >= self.every:
            self._reduce()

    def _reduce(self) -> None:
        if not self.pending:
            return
        keys = np.concatenate([self.keys, *self.pending])
        weights = np.concatenate(
            [self.counts, np.ones(sum(len(p) for p in self.pending), np.int64)]
        )
        uniq, inverse = np.unique(keys, return_inverse=True)
        self.keys, self.counts = uniq, np.bincount(inverse, weights=weights).astype(np.int64)
        self.pending = []

    def by_subcomponent(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sub, token, count) of every pair seen."""
        self._reduce()
        return self.keys // self.vocab, self.keys % self.vocab, self.counts


def add_cofiring(cofire: Tensor, fires: Tensor) -> None:
    """cofire [C, C] += fᵀ f for the batch's firings f [n, C] (bool): a dense product when
    firings are dense, else one sparse product over the firings (O(n × L0²), L0 the firings
    per token, instead of O(n × C²)). Both are exact counts."""
    n, C = fires.shape
    pos, sub = fires.nonzero(as_tuple=True)
    if len(pos) * 16 >= n * C:
        f = fires.to(torch.float32)
        cofire += (f.T @ f).round().long()
        return
    f = scipy.sparse.csr_matrix(
        (np.ones(len(pos), np.int64), (pos.numpy(), sub.numpy())), shape=(n, C)
    )
    pairs = (f.T @ f).tocoo()
    index = torch.from_numpy(pairs.row.astype(np.int64) * C + pairs.col)
    cofire.view(-1).index_add_(0, index, torch.from_numpy(pairs.data.astype(np.int64)))


def window_ci(ci_windows: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """(events [C, k] as flat positions b·T + t, subcomponents [C, k]) → their CI windows
    [C, k, W], read from the [B, T, C, W] view without materialising it."""
    T = ci_windows.shape[1]
    return lambda events, subs: ci_windows[events // T, events % T, subs]
