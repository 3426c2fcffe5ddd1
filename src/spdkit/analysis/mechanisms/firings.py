"""Which subcomponents fire together: binarised CI gathered in one streaming pass.

A *sample* is one CI row: one input of a toy model, one token position of a language model.
Subcomponent c *fires* on sample t when its CI exceeds τ: g_c(t) = 1[CI_c(t) > τ]. Clustering
needs the co-activation counts s_ij = Σ_t g_i(t) g_j(t) (s_i = s_ii), and, once subcomponents
are merged, the same counts for groups whose g is the OR of their members'. Pair counts alone
cannot give those (|(g_i ∨ g_j) ∧ g_k| needs triple counts), so the pass keeps the sparse
firing record itself: per sample, the ids of the subcomponents that fired. Its size is the
number of firings (samples × mean L0), never samples × total C; the [live, live] pair counts
are computed from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from spdkit.method.measures import causal_importance
from spdkit.method.model import ComponentModel
from spdkit.progress import progress_bar
from spdkit.targets import DataSource


@dataclass(frozen=True)
class Firings:
    """The sparse firing record of `n_samples` samples over subcomponents `names`.

    names [n]: "<module>:<index>" (index = column of <module>.U, row of <module>.V).
    sample_ptr int64 [n_samples + 1], fired int32 [n_firings]: sample t's firing ids are
    fired[sample_ptr[t]:sample_ptr[t + 1]] (CSR, ascending within a sample).
    """

    names: list[str]
    sample_ptr: np.ndarray
    fired: np.ndarray

    @property
    def n_samples(self) -> int:
        return len(self.sample_ptr) - 1

    def counts(self) -> np.ndarray:
        """s_i [n]: samples on which each subcomponent fired."""
        return np.bincount(self.fired, minlength=len(self.names))

    def nbytes(self) -> int:
        return self.sample_ptr.nbytes + self.fired.nbytes

    def restricted(self, ids: np.ndarray) -> Firings:
        """The record over subcomponents `ids` only (ascending), renumbered 0..len(ids)-1."""
        new_id = np.full(len(self.names), -1, dtype=np.int64)
        new_id[ids] = np.arange(len(ids))
        mapped = new_id[self.fired]
        keep = mapped >= 0
        sample = np.repeat(np.arange(self.n_samples), np.diff(self.sample_ptr))
        per_sample = np.bincount(sample[keep], minlength=self.n_samples)
        ptr = np.concatenate([[0], np.cumsum(per_sample)]).astype(np.int64)
        return Firings([self.names[i] for i in ids], ptr, mapped[keep].astype(np.int32))

    def row_bits(self) -> np.ndarray:
        """uint8 [n, ⌈samples / 8⌉]: bit t of row i set when subcomponent i fired on sample t
        (one bit per sample: the merge's OR counts; 1/8 byte per live subcomponent and sample)."""
        n, width = len(self.names), (self.n_samples + 7) // 8
        bits = np.zeros((n, width), dtype=np.uint8)
        sample = np.repeat(np.arange(self.n_samples), np.diff(self.sample_ptr))
        np.bitwise_or.at(bits, (self.fired, sample >> 3), (128 >> (sample & 7)).astype(np.uint8))
        return bits

    def firing_ids(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position in `samples`, subcomponent id) of every firing on those samples."""
        pos, offsets = self.entries(samples)
        return pos, self.fired[offsets]

    def entries(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position in `samples`, offset into `fired`) of every firing on those samples."""
        starts = self.sample_ptr[samples]
        lens = self.sample_ptr[samples + 1] - starts
        total = int(lens.sum())
        offsets = np.repeat(starts - np.cumsum(lens) + lens, lens) + np.arange(total)
        return np.repeat(np.arange(len(samples)), lens), offsets

    def pair_counts(self, chunk: int = 4096) -> Tensor:
        """s [n, n] float64: s_ij = Σ_t g_i(t) g_j(t), from the record `chunk` samples at a
        time (a dense [chunk, n] block, never [n_samples, n])."""
        n = len(self.names)
        s = torch.zeros(n, n, dtype=torch.float64)
        for start in range(0, self.n_samples, chunk):
            rows = np.arange(start, min(start + chunk, self.n_samples))
            local, ids = self.firing_ids(rows)
            g = torch.zeros(len(rows), n)
            g[torch.from_numpy(local), torch.from_numpy(ids.astype(np.int64))] = 1.0
            s += (g.T @ g).double()  # float32 counts are exact below 2^24 per chunk
        return s


def subcomponent_names(model: ComponentModel) -> list[str]:
    """ "<module>:<index>" for every subcomponent, modules in the model's order."""
    return [f"{m}:{i}" for m in model.module_names for i in range(model.components(m).C)]


@torch.no_grad()
def gather_firings(
    model: ComponentModel,
    data: DataSource,
    n_samples: int,
    threshold: float,
    batch_rows: int,
    generator: torch.Generator,
    progress: bool = True,
    per_sequence: bool = False,
    sequence_rate: float = 0.0,
) -> Firings:
    """Stream batches of at most `batch_rows` data rows until `n_samples` samples (CI rows) are
    seen; keep only which subcomponents fired (CI > `threshold`, σ_H,upper) on each.
    `per_sequence`: a sample is a sequence, on which a piece fires if its CI exceeds the
    threshold on at least `sequence_rate` of its positions (anywhere, at 0; LM inputs only).

    Memory: the CI of one batch (what the CI functions produce anyway) and the firing ids; each
    module is thresholded on its own, so no [rows, total C] block is built, and the last batch
    asks only for the data rows still needed (an LM row is many samples: its token positions)."""
    names = subcomponent_names(model)
    offsets = np.cumsum([0] + [model.components(m).C for m in model.module_names])
    ptr_parts: list[np.ndarray] = []
    fired_parts: list[np.ndarray] = []
    seen, samples_per_row = 0, 1
    bar = progress_bar(n_samples, "co-activations", progress)
    while seen < n_samples:
        rows = min(batch_rows, -(-(n_samples - seen) // samples_per_row))
        ci = causal_importance(model, data.sample(rows, generator))
        if per_sequence:
            ci = per_sequence_ci(ci, threshold, sequence_rate)
        per_sample, fired = _batch_firings(ci, model.module_names, offsets, threshold)
        samples_per_row = max(1, len(per_sample) // rows)
        per_sample = per_sample[: n_samples - seen]
        ptr_parts.append(per_sample)
        fired_parts.append(fired[: int(per_sample.sum())])
        seen += len(per_sample)
        bar.update(len(per_sample))
    bar.close()
    ptr = np.concatenate([[0], np.cumsum(np.concatenate(ptr_parts))]).astype(np.int64)
    return Firings(names, ptr, np.concatenate(fired_parts))


def per_sequence_ci(
    ci: dict[str, Tensor], threshold: float, min_rate: float = 0.0
) -> dict[str, Tensor]:
    """CI [B, T, C] → firing [B, C] (1.0 or 0.0): a piece fires on a sequence if its CI exceeds
    `threshold` on at least `min_rate` of the sequence's positions (and on one at least: 0
    means anywhere in it)."""
    first = next(iter(ci.values()))
    if first.dim() != 3:
        raise ValueError(
            f"unit sequence: this target's CI has shape {list(first.shape)}, no positions "
            "(use unit position)"
        )
    need = max(1, math.ceil(min_rate * first.shape[1]))
    return {m: ((v > threshold).sum(dim=1) >= need).to(v.dtype) for m, v in ci.items()}


def _batch_firings(
    ci: dict[str, Tensor], modules: list[str], offsets: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """(firings per sample [rows], the global ids of the firings in row-major order) of one
    batch's CI ([..., C_m] per module), module by module."""
    rows_parts, ids_parts = [], []
    for m, offset in zip(modules, offsets, strict=False):
        hit = (ci[m].reshape(-1, ci[m].shape[-1]) > threshold).nonzero().cpu().numpy()
        rows_parts.append(hit[:, 0])
        ids_parts.append(hit[:, 1] + offset)
    n_rows = ci[modules[0]].reshape(-1, ci[modules[0]].shape[-1]).shape[0]
    rows, ids = np.concatenate(rows_parts), np.concatenate(ids_parts)
    order = np.lexsort((ids, rows))  # by row, then subcomponent id
    return np.bincount(rows, minlength=n_rows), ids[order].astype(np.int32)
