"""The counter-based mask stream: the fused kernel against torch ops, and its properties."""

import pytest
import torch

from spdkit.engine.kernels import load_extension
from spdkit.engine.random_stream import MaskStream, splitmix64, uniform
from spdkit.method.losses import stochastic_masks

needs_kernel = pytest.mark.skipif(load_extension() is None, reason="kernels not buildable here")


def test_splitmix64_reference_values():
    # SplitMix64 seeded with 0 (state advanced by gamma before each mix) starts with these
    # outputs in the published reference implementation (Vigna's splitmix64.c)
    gamma = 0x9E3779B97F4A7C15
    outs = [splitmix64(k * gamma) for k in (1, 2, 3)]
    assert outs == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def test_uniform_is_a_pure_function_of_the_counter():
    a = uniform(1000, key=123, offset=0)
    assert torch.equal(uniform(400, key=123, offset=600), a[600:])
    assert not torch.equal(uniform(1000, key=124, offset=0), a)
    assert a.min() >= 0 and a.max() < 1


def test_uniform_statistics():
    r = uniform(200_000, key=splitmix64(7), offset=0).double()
    assert abs(r.mean() - 0.5) < 0.005
    assert abs(r.var() - 1 / 12) < 0.002
    counts = torch.histc(r, bins=10, min=0, max=1)
    assert (counts - 20_000).abs().max() < 600  # ~4 sigma
    lag1 = torch.corrcoef(torch.stack([r[:-1], r[1:]]))[0, 1]
    assert abs(lag1) < 0.01


@needs_kernel
@pytest.mark.parametrize("offset", [0, 5, (1 << 62) + 3])
def test_kernel_draws_equal_torch_draws_bit_for_bit(offset):
    key = MaskStream(42).key
    torch.testing.assert_close(
        load_extension().mask_uniform(10_001, key, offset),
        uniform(10_001, key, offset),
        rtol=0,
        atol=0,
    )


@needs_kernel
def test_fused_mask_matches_eager_values_and_gradient():
    g = torch.rand(300, 7) * 1.2 - 0.1
    weights = torch.randn(300, 7)
    stream = MaskStream(3)
    r = uniform(g.numel(), stream.key, stream.offset).view(g.shape)

    g_fused = g.clone().requires_grad_(True)
    m_fused = stream.masks(g_fused)
    (m_fused * weights).sum().backward()
    assert stream.offset == g.numel()

    g_eager = g.clone().requires_grad_(True)
    m_eager = stochastic_masks(g_eager, r)
    (m_eager * weights).sum().backward()
    # the same r; only the rounding of the arithmetic may differ (a float ulp)
    torch.testing.assert_close(m_fused, m_eager, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_fused.grad, g_eager.grad, rtol=1e-6, atol=1e-6)


def test_stream_state_round_trip_continues_the_same_numbers():
    a, b = MaskStream(5), MaskStream(99)
    g = torch.full((64, 3), 0.25)
    a.masks(g)
    b.set_state(a.state())
    torch.testing.assert_close(a.masks(g), b.masks(g), rtol=0, atol=0)


def test_masks_lie_between_ci_and_one():
    g = torch.rand(1000, 4)
    m = MaskStream(0).masks(g)
    assert (m >= g).all() and (m <= 1).all()
