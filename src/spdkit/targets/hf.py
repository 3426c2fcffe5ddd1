"""Hugging Face `transformers` models as targets, and token data sources for language models.

Nothing here reaches the network: models load from a local directory only
(`local_files_only=True`), and `transformers` is imported only when a model is loaded
(install it with `pip install -c constraints.txt -e '.[hf]'`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn


def load_hf_causal_lm(path: str | Path) -> nn.Module:
    """A causal LM from a local `transformers` model directory (config.json + weights)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a local transformers model directory (no config.json); spdkit never "
            "downloads models: save one with `model.save_pretrained(DIR)` first"
        )
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ImportError(
            "loading a Hugging Face model needs transformers: "
            "pip install -c constraints.txt -e '.[hf]'"
        ) from None
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    return model.eval()


@dataclass(frozen=True)
class RandomTokens:
    """Uniformly random token ids [batch, seq_len]: enough to exercise a model's parameters
    (tests, smoke runs); use `TokenWindows` on real text for real decompositions."""

    vocab_size: int
    seq_len: int

    def sample(self, batch_size: int, generator: torch.Generator) -> Tensor:
        return torch.randint(
            0,
            self.vocab_size,
            (batch_size, self.seq_len),
            generator=generator,
            device=generator.device,
        )


@dataclass(frozen=True)
class TokenWindows:
    """Random windows [batch, seq_len] of a 1-D token stream (a tokenised corpus)."""

    tokens: Tensor  # [n_tokens], int64
    seq_len: int

    def __post_init__(self) -> None:
        if self.tokens.dim() != 1 or self.tokens.numel() <= self.seq_len:
            raise ValueError(
                f"need a 1-D token stream longer than seq_len {self.seq_len}, "
                f"got shape {list(self.tokens.shape)}"
            )

    def sample(self, batch_size: int, generator: torch.Generator) -> Tensor:
        n_starts = self.tokens.numel() - self.seq_len
        starts = torch.randint(0, n_starts, (batch_size, 1), generator=generator)
        offsets = torch.arange(self.seq_len)
        return self.tokens[starts + offsets].to(generator.device)
