"""`global_transformer`: VPD's CI function for language models (VPD notes §4), small.

    x   = [rms(a^1), …, rms(a^L)]              [B, T, Σ_l d_in^l]  (sorted module names)
    z   = W_in x + b_in                         [B, T, d_model]
    z  += Attn(rms(z));  z += FFN(rms(z))       × n_layers (pre-norm, parameter-free RMSNorm;
                                                attention over positions with RoPE, no biases,
                                                bidirectional unless `causal`; FFN d_ff, GELU)
    [raw^1, …, raw^L] = W_out z + b_out          [B, T, Σ_l C_l]   (no final norm, as VPD)

A subcomponent's CI at position t can use every decomposed module's input at every position
(or every earlier one, causal). For targets without a sequence axis (TMS, residual MLPs;
inputs [B, d]) each sample is a sequence of one position: attention then only mixes a position
with itself, and the function is a position-wise residual network over all modules' inputs.
Tensors: `ci.in_proj.*`, `ci.blocks.<i>.{qkv, out, ff_in, ff_out}.*`, `ci.out_proj.*`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spdkit.config.ci import InputNorm, LowerSigmoid
from spdkit.method.ci.base import CIFunction, ModuleSlot


def rms(x: Tensor) -> Tensor:
    """x / sqrt(mean(x², last axis) + ε) with no learnt gain (torch's default ε): the blocks'
    pre-norm."""
    return F.rms_norm(x, (x.shape[-1],))


def rope(x: Tensor, base: float = 10_000.0) -> Tensor:
    """Rotary position embedding of x [B, H, T, d_head] (d_head even): pairs of channels
    (i, i + d/2) rotated by angle t · base^(−2i/d)."""
    T, d = x.shape[-2], x.shape[-1]
    freqs = base ** (-torch.arange(0, d // 2, device=x.device, dtype=torch.float32) * 2 / d)
    angles = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * freqs  # [T, d/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.ff_in = nn.Linear(d_model, d_ff)
        self.ff_out = nn.Linear(d_ff, d_model)

    def forward(self, z: Tensor, causal: bool) -> Tensor:
        B, T, D = z.shape
        if T == 1:
            # one position (TMS, residual MLPs): softmax over a single key is 1, so attention
            # returns v, and q, k get zero gradient; computing v alone is the same function
            # without SDPA's per-sample overhead (tests/test_ci.py checks it against SDPA)
            att = F.linear(rms(z), self.qkv.weight[2 * D :])  # [B, 1, D]
            z = z + self.out(att)
            return z + self.ff_out(F.gelu(self.ff_in(rms(z))))
        H = self.n_heads
        q, k, v = self.qkv(rms(z)).view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=causal)  # [B,H,T,dh]
        z = z + self.out(att.transpose(1, 2).reshape(B, T, D))
        return z + self.ff_out(F.gelu(self.ff_in(rms(z))))


class GlobalTransformerCI(CIFunction):
    def __init__(
        self,
        slots: list[ModuleSlot],
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_ff: int,
        causal: bool,
        input_norm: InputNorm = "rms",
        lower_sigmoid: LowerSigmoid = "leaky",
    ) -> None:
        super().__init__(slots, input_norm, lower_sigmoid)
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(
                f"ci_fn: d_model {d_model} must split into {n_heads} heads of an even width"
            )
        self.causal = causal
        self.in_proj = nn.Linear(sum(s.width for s in slots), d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff) for _ in range(n_layers))
        self.out_proj = nn.Linear(d_model, sum(s.C for s in slots))

    def raw(self, inputs: Mapping[str, Tensor], inner: Mapping[str, Tensor]) -> dict[str, Tensor]:
        x = self.concatenated(inputs, inner)  # [B, T, D] or [B, D]
        if x.dim() not in (2, 3):
            raise ValueError(
                f"ci_fn global_transformer reads [batch, positions, d] or [batch, d] inputs, "
                f"got {list(x.shape[:-1])} leading dims"
            )
        z = self.in_proj(x if x.dim() == 3 else x.unsqueeze(1))
        for block in self.blocks:
            z = block(z, self.causal)
        out = self.out_proj(z)
        return self.split(out if x.dim() == 3 else out.squeeze(1))
