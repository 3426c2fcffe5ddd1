"""The stochastic masks m = g + (1 − g) r, r ~ U(0, 1), from a counter-based random stream.

r_i is a pure function of (key, i) (SplitMix64 at counter i, top 24 bits as a float), so:
a draw is a range of counters, a checkpoint needs two integers, and the backward of the mask
regenerates r instead of storing it. On the CPU the fused kernel (csrc/masks.cpp) makes the mask
in one pass and its gradient in another; elsewhere the same r comes from torch integer ops
(`uniform`), bit for bit the same numbers (tests/test_masks.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from spdkit.engine.kernels import load_extension

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed(u: int) -> int:
    """A uint64 as the int64 with the same bits (torch and the kernel take int64)."""
    u &= _MASK64
    return u - (1 << 64) if u >= 1 << 63 else u


def _shr(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 bits (torch's >> on int64 is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x: int) -> int:
    """The SplitMix64 finaliser on a Python int (for deriving a stream key from a seed)."""
    z = x & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def uniform(n: int, key: int, offset: int, device: torch.device | str = "cpu") -> Tensor:
    """r_i for i in [offset, offset + n) as float32 [n], in torch ops (int64 multiplies wrap)."""
    i = torch.arange(offset + 1, offset + n + 1, dtype=torch.int64, device=device)
    z = _signed(key) + i * _signed(_GAMMA)
    z = (z ^ _shr(z, 30)) * _signed(_MIX1)
    z = (z ^ _shr(z, 27)) * _signed(_MIX2)
    z = z ^ _shr(z, 31)
    return _shr(z, 40).to(torch.float32) * 2.0**-24


class _FusedMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g: Tensor, key: int, offset: int) -> Tensor:
        ctx.key, ctx.offset = key, offset
        return load_extension().mask_forward(g.contiguous(), key, offset)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return load_extension().mask_backward(grad.contiguous(), ctx.key, ctx.offset), None, None


class MaskStream:
    """Where the masks' r come from: a key fixed by the seed and an offset that every draw
    advances by the number of values it used.

    Data-parallel ranks (`spdkit.engine.distributed`) share the key and the offset. A per-sample draw
    (dim 0 the batch: masks, per-position routing and sources) of n values on each of W ranks
    is one draw of W·n values of which rank r takes the r-th n, its rows of the global batch;
    a shared draw (per-batch routing and sources) is the same n values on every rank."""

    def __init__(self, seed: int, rank: int = 0, world: int = 1) -> None:
        self.key = _signed(splitmix64(seed))
        self.offset = 0
        self.rank, self.world = rank, world

    def _claim(self, n: int, per_sample: bool) -> int:
        """The first counter of this draw of n values; advances the stream past it."""
        offset = self.offset
        if per_sample and self.world > 1:
            self.offset += n * self.world
            return offset + self.rank * n
        self.offset += n
        return offset

    def masks(self, g: Tensor) -> Tensor:
        """m = g + (1 − g) r with fresh r, shaped like g (any device, float32)."""
        key, offset = self.key, self._claim(g.numel(), per_sample=True)
        if g.device.type == "cpu" and g.dtype == torch.float32 and load_extension() is not None:
            return _FusedMask.apply(g, key, offset)
        r = uniform(g.numel(), key, offset, g.device).view(g.shape).to(g.dtype)
        return g + (1 - g) * r  # the method's formula (`spdkit.method.losses.stochastic_masks`)

    def uniforms(self, n: int, device: torch.device | str, per_sample: bool = False) -> Tensor:
        """n fresh r ~ U(0, 1) [n] (float32) from the same stream (routing draws, sources);
        `per_sample`: the n belong to this rank's rows of the batch."""
        return uniform(n, self.key, self._claim(n, per_sample), device)

    def state(self) -> Tensor:
        """[key, offset] as int64, for a checkpoint."""
        return torch.tensor([self.key, self.offset], dtype=torch.int64)

    def set_state(self, state: Tensor) -> None:
        self.key, self.offset = (int(v) for v in state.tolist())
