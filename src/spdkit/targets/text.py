"""Token streams shared by the language-model targets: random windows of a tokenised corpus,
and the English text that ships with CPython (the pydoc topics) for targets that need no
download."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def corpus_text() -> str:
    """English text that ships with every CPython: the pydoc topic help (no download). Its
    exact content follows the Python version; the target records its vocabulary."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@dataclass(frozen=True)
class TokenWindows:
    """Random windows [batch, seq_len] of a 1-D token stream (a tokenised corpus): a tensor,
    or a numpy array / memmap (a corpus on disk, of which only the sampled windows are read).
    `heldout`: the windows the evaluation draws from, if the corpus has a held-out part."""

    tokens: Tensor | np.ndarray  # [n_tokens], integer
    seq_len: int
    heldout: TokenWindows | None = None

    def __post_init__(self) -> None:
        if self.tokens.ndim != 1 or self.tokens.shape[0] <= self.seq_len:
            raise ValueError(
                f"need a 1-D token stream longer than seq_len {self.seq_len}, "
                f"got shape {list(self.tokens.shape)}"
            )

    def sample(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """Drawn on the generator's device (a CUDA generator draws on the GPU), gathered from
        the token stream where it lives, returned on the generator's device as int64."""
        n_starts = self.tokens.shape[0] - self.seq_len
        starts = torch.randint(
            0, n_starts, (batch_size, 1), generator=generator, device=generator.device
        )
        if isinstance(self.tokens, np.ndarray):
            index = (starts.cpu() + torch.arange(self.seq_len)).numpy()
            windows = torch.from_numpy(self.tokens[index].astype(np.int64))
            return windows.to(generator.device)
        starts = starts.to(self.tokens.device)
        offsets = torch.arange(self.seq_len, device=self.tokens.device)
        return self.tokens[starts + offsets].to(generator.device)
