"""Small transformer targets trained in-process: an induction-head model and a tiny char-level LM.

    x = embed(ids) + pos_embed(positions)
    per block: x += attn(ln1(x));  x += mlp(ln2(x))     (attention-only: no MLP, no LayerNorm)
    logits = unembed(ln_f(x))

Every matrix is an nn.Linear or nn.Embedding with a stable name (`embed`, `blocks.{i}.attn.q`,
`.k`, `.v`, `.o`, `blocks.{i}.mlp.fc_in`, `.fc_out`, `unembed`), so configs decompose them by
pattern. Attention is causal, one or more heads, through scaled_dot_product_attention.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spdkit.config import InductionTargetConfig, PlantedLMTargetConfig, TinyLMTargetConfig
from spdkit.targets.data import seeded_build, training_steps
from spdkit.targets.text import TokenWindows, corpus_text

log = logging.getLogger(__name__)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model, bias=False)
        self.o = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        H = self.n_heads

        def heads(t: Tensor) -> Tensor:  # [B, T, D] -> [B, H, T, D/H]
            return t.view(B, T, H, D // H).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), is_causal=True
        )
        return self.o(out.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, d_model: int, d_mlp: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d_model, d_mlp)
        self.fc_out = nn.Linear(d_mlp, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_mlp: int, layer_norm: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model) if layer_norm else nn.Identity()
        self.attn = Attention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model) if layer_norm and d_mlp else nn.Identity()
        self.mlp = MLP(d_model, d_mlp) if d_mlp else None

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        if self.mlp is not None:
            x = x + self.mlp(self.ln2(x))
        return x


class Transformer(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_mlp: int = 0,
        layer_norm: bool = False,
    ) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos_embed = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, d_mlp, layer_norm) for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model) if layer_norm else nn.Identity()
        self.unembed = nn.Linear(d_model, vocab_size, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=1 / math.sqrt(p.shape[-1]))

    def forward(self, ids: Tensor) -> Tensor:
        n_pos = ids.shape[-1]
        if n_pos > self.seq_len:
            raise ValueError(f"sequence length {n_pos} exceeds the model's {self.seq_len}")
        x = self.embed(ids) + self.pos_embed(torch.arange(n_pos, device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln_f(x))  # [B, T, vocab]


def next_token_loss(logits: Tensor, ids: Tensor, start: int = 0) -> Tensor:
    """Mean cross-entropy of predicting ids[:, t+1] from position t, for t ≥ start."""
    return F.cross_entropy(
        logits[:, start:-1].reshape(-1, logits.shape[-1]), ids[:, start + 1 :].reshape(-1)
    )


def scored_token_ce(logits: Tensor, ids: Tensor) -> Tensor:
    """Per-token cross-entropy [B, T − 1]: entry t is the loss of predicting ids[:, t + 1]
    from logits[:, t] (so a mask over ids' positions 1.. selects the scored ones)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none"
    ).view(ids.shape[0], -1)


# --- induction ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RepeatedTokens:
    """[batch, seq_len] sequences that repeat their first part. `fixed`: random tokens
    t_0..t_{h-1} (h = seq_len // 2), then t_0..t_{h-1} again. `random`: a first occurrence of
    random length m in [n/4, n/2] (n = seq_len), its repeat, then random tokens: only induction
    (find the previous occurrence of the current token, copy what followed it) predicts the
    repeat, where with `fixed` a head attending h − 1 back by position does too."""

    vocab_size: int
    seq_len: int
    repeat: str = "fixed"

    def sample(self, batch_size: int, generator: torch.Generator) -> Tensor:
        return self.scored_batch(batch_size, generator)[0]

    def scored_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(ids [batch, seq_len], scored [batch, seq_len]): scored[b, t] says that ids[b, t]
        is determined by induction from position t − 1 (the repeat from its 2nd token)."""
        n, dev = self.seq_len, generator.device
        i = torch.arange(n, device=dev)[None, :]
        if self.repeat == "random":
            m = torch.randint(n // 4, n // 2 + 1, (batch_size, 1), generator=generator, device=dev)
            ids = torch.randint(
                0, self.vocab_size, (batch_size, n), generator=generator, device=dev
            )
            ids = ids.gather(1, torch.where((i >= m) & (i < 2 * m), i - m, i).expand_as(ids))
            return ids, (i > m) & (i < 2 * m)
        half = n // 2
        first = torch.randint(
            0, self.vocab_size, (batch_size, half), generator=generator, device=dev
        )
        seq = torch.cat([first, first], dim=1)
        if n % 2:
            seq = torch.cat([seq, first[:, :1]], dim=1)
        return seq, ((i > half) & (i < 2 * half)).expand(batch_size, n)


def build_induction(config: InductionTargetConfig) -> Transformer:
    return Transformer(
        config.vocab_size, config.seq_len, config.d_model, config.n_layers, config.n_heads
    )


def induction_losses(model: nn.Module, data: RepeatedTokens, seed: int) -> dict[str, float]:
    """Cross-entropy on the first occurrence (unpredictable: ln vocab) and on the second (in
    context: near 0 once the model does induction)."""
    gen = torch.Generator().manual_seed(seed + 1000)
    ids, scored = data.scored_batch(512, gen)
    half = data.seq_len // 2
    with torch.no_grad():
        logits = model(ids)
    return {
        "ce_first_half": next_token_loss(logits[:, :half], ids[:, :half]).item(),
        "ce_second_half": next_token_loss(logits, ids, start=half).item(),
        # the positions induction decides (the repeat from its 2nd token), either layout
        "ce_repeat": scored_token_ce(logits, ids)[scored[:, 1:]].mean().item(),
        "ce_uniform": math.log(data.vocab_size),
    }


def train_induction(
    config: InductionTargetConfig, seed: int, device: str = "cpu", progress: bool = False
) -> tuple[Transformer, dict]:
    """AdamW on next-token prediction over repeated random sequences (loss on every position)."""
    model = seeded_build(lambda: build_induction(config), seed).to(device)
    data = RepeatedTokens(config.vocab_size, config.seq_len, config.repeat)
    train_next_token(model, data, config, seed, device, progress)
    info = {"trained_seed": seed, **induction_losses(model.cpu(), data, seed)}
    log.info("induction target: %s", info)
    return model.eval().requires_grad_(False), info


# --- tiny language model -------------------------------------------------------------------
def parse_token_ids(text: str, vocab_size: int) -> list[int]:
    """ "3 17 5 ..." to ids (the induction target's prompts), each checked against the vocabulary."""
    try:
        ids = [int(t) for t in text.split()]
    except ValueError:
        raise ValueError(f"expected token ids separated by spaces, got {text!r}") from None
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    return ids


@dataclass(frozen=True)
class CharCorpus:
    """Char-level tokens of `corpus_text()` with a fixed vocabulary (printable ASCII + newline;
    anything else maps to '?'), split 90/10 into train and validation streams."""

    seq_len: int
    split: str = "train"

    VOCAB = "\n" + "".join(chr(i) for i in range(32, 127))

    @classmethod
    def decode(cls, ids: list[int]) -> str:
        """Ids to text, newlines shown as ⏎ so a context stays on one line."""
        return "".join(cls.VOCAB[i] for i in ids).replace("\n", "⏎")

    @classmethod
    def encode(cls, text: str) -> list[int]:
        """Text to ids; characters outside the vocabulary become '?'."""
        lookup = {ch: i for i, ch in enumerate(cls.VOCAB)}
        return [lookup.get(ch, lookup["?"]) for ch in text]

    def tokens(self) -> Tensor:
        ids = torch.tensor(self.encode(corpus_text()), dtype=torch.long)
        cut = int(0.9 * ids.numel())
        return ids[:cut] if self.split == "train" else ids[cut:]

    def sample(self, batch_size: int, generator: torch.Generator) -> Tensor:
        return TokenWindows(_split_tokens(self.split), self.seq_len).sample(batch_size, generator)


@cache
def _split_tokens(split: str) -> Tensor:
    """One split's token stream, encoded once per process: it does not depend on seq_len, so
    every window length shares it (at most two tensors: train and validation)."""
    return CharCorpus(seq_len=1, split=split).tokens()


def gpt_like(vocab_size: int, config: TinyLMTargetConfig | PlantedLMTargetConfig) -> Transformer:
    """A GPT-style transformer (LayerNorm, GELU MLPs) of a language-model target's sizes."""
    return Transformer(
        vocab_size,
        config.seq_len,
        config.d_model,
        config.n_layers,
        config.n_heads,
        config.d_mlp,
        layer_norm=True,
    )


def build_tiny_lm(config: TinyLMTargetConfig) -> Transformer:
    return gpt_like(len(CharCorpus.VOCAB), config)


def train_tiny_lm(
    config: TinyLMTargetConfig, seed: int, device: str = "cpu", progress: bool = False
) -> tuple[Transformer, dict]:
    model = seeded_build(lambda: build_tiny_lm(config), seed).to(device)
    train_next_token(model, CharCorpus(config.seq_len), config, seed, device, progress)
    model = model.cpu().eval()
    gen = torch.Generator().manual_seed(seed + 1000)
    ids = CharCorpus(config.seq_len, "validation").sample(256, gen)
    with torch.no_grad():
        val_ce = next_token_loss(model(ids), ids).item()
    info = {
        "trained_seed": seed,
        "validation_ce": val_ce,
        "ce_uniform": math.log(len(CharCorpus.VOCAB)),
        "vocab": CharCorpus.VOCAB,
    }
    log.info("tiny_lm target: validation CE %.3f nats/char", val_ce)
    return model.requires_grad_(False), info


def train_next_token(
    model: Transformer, data, config, seed: int, device: str, progress: bool
) -> None:
    """AdamW, linear warm-up (5%) then cosine decay, next-token cross-entropy."""
    gen = torch.Generator(device=device).manual_seed(seed)
    opt = torch.optim.AdamW(
        model.parameters(), lr=config.train_lr, weight_decay=config.train_weight_decay
    )
    warmup = max(1, config.train_steps // 20)
    for step in training_steps(config.train_steps, progress, config.kind):
        scale = (
            min(1.0, (step + 1) / warmup)
            * 0.5
            * (1 + math.cos(math.pi * step / config.train_steps))
        )
        for group in opt.param_groups:
            group["lr"] = config.train_lr * scale
        ids = data.sample(config.train_batch_size, gen)
        loss = next_token_loss(model(ids), ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
