"""The fused CPU kernel against the eager implementation: same values and gradients."""

import pytest
import torch

from spdkit.importance import CausalImportance
from spdkit.kernels import fused_available

pytestmark = pytest.mark.skipif(
    not fused_available("cpu"), reason="fused kernel not buildable here"
)


@pytest.mark.parametrize("shape", [(37, 5), (4, 3, 7), (300, 50)])
@pytest.mark.parametrize("d_gate", [1, 16, 20])
def test_fused_matches_eager(shape, d_gate):
    C = shape[-1]
    ci = CausalImportance(C, d_gate)
    with torch.no_grad():
        ci.b_in.normal_()
        ci.b_out.normal_()
    h = torch.randn(shape) * 2
    weights = torch.randn(shape)  # a loss that sees both outputs
    results = {}
    for backend in ("eager", "fused"):
        assert ci.set_backend(backend, "cpu") == backend
        hh = h.clone().requires_grad_(True)
        lower, upper = ci(hh)
        loss = (lower * weights).sum() + (upper**2).sum()
        ci.zero_grad()
        loss.backward()
        results[backend] = [lower, upper, hh.grad] + [p.grad.clone() for p in ci.parameters()]
    for eager, fused in zip(results["eager"], results["fused"], strict=True):
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)


def test_fused_with_only_one_output_used():
    ci = CausalImportance(6, 16)
    ci.set_backend("fused", "cpu")
    h = torch.randn(20, 6, requires_grad=True)
    lower, _ = ci(h)
    lower.sum().backward()
    assert torch.isfinite(h.grad).all()
