"""Sparse-feature data shared by the toy targets: each feature independently active."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

M = TypeVar("M", bound=torch.nn.Module)


def seeded_build(build: Callable[[], M], seed: int) -> M:
    """`build()` (a target's initial weights, drawn on the CPU) with torch's CPU generator
    seeded to `seed` inside a fork: the weights are those of `torch.manual_seed(seed);
    build()`, and the caller's random state is the same after the call as before (training a
    bundled target inside someone's script must not reseed their RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return build()


def training_steps(n: int, progress: bool, what: str) -> Iterable[int]:
    """range(n), shown as a progress bar ("train <what> target") when `progress`: training a
    bundled target takes seconds to minutes before the decomposition starts."""
    from spdkit.progress import progress_bar

    bar = progress_bar(n, f"train {what} target", progress, leave=False)
    try:
        for i in range(n):
            yield i
            bar.update(1)
    finally:
        bar.close()


def sample_sparse_features(
    batch_size: int,
    n_features: int,
    probability: float,
    generator: torch.Generator,
    low: float = 0.0,
    high: float = 1.0,
) -> Tensor:
    """[batch, n_features]: each feature independently active with `probability`, value U[low, high]."""
    device = generator.device
    active = torch.rand(batch_size, n_features, generator=generator, device=device) < probability
    values = torch.rand(batch_size, n_features, generator=generator, device=device)
    return torch.where(active, low + (high - low) * values, 0.0)


@dataclass(frozen=True)
class SparseFeatureData:
    """The SPD data source of a toy target: the distribution it was trained on."""

    n_features: int
    probability: float
    low: float = 0.0
    high: float = 1.0

    def sample(self, batch_size: int, generator: torch.Generator) -> Tensor:
        return sample_sparse_features(
            batch_size, self.n_features, self.probability, generator, self.low, self.high
        )
