"""The fused CPU kernel against the eager implementation: same values and gradients."""

import pytest
import torch

from spdkit.engine.kernels import fused_available
from spdkit.method.ci.mlp import CausalImportance

pytestmark = pytest.mark.skipif(
    not fused_available("cpu"), reason="fused kernel not buildable here"
)


SHAPES = [(37, 5), (4, 3, 7), (300, 50)]


def _ci_and_inputs(shape: tuple[int, ...], d_gate: int, zeros: float):
    """`zeros`: the fraction of exact zeros in h (some of them -0.0), which the kernel computes
    once per subcomponent instead of once per entry."""
    ci = CausalImportance(shape[-1], d_gate)
    with torch.no_grad():
        ci.b_in.normal_()
        ci.b_out.normal_()
    h = torch.randn(shape) * 2 * (torch.rand(shape) >= zeros)
    h[h.abs() < 1e-6] *= -1.0  # a mix of +0.0 and -0.0 (multiplying zero by -1 flips its sign)
    h.view(-1)[::7] = torch.where(h.view(-1)[::7] == 0, -0.0, h.view(-1)[::7])
    return ci, h


def _same_weights(ci: CausalImportance, backend: str) -> CausalImportance:
    """A CI function of another backend with ci's weights."""
    other = CausalImportance(ci.w_in.shape[0], ci.w_in.shape[1], backend=backend)
    other.load_state_dict(ci.state_dict())
    return other


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("d_gate", [1, 16, 20])
@pytest.mark.parametrize("zeros", [0.0, 0.8, 1.0])
@pytest.mark.parametrize("output", ["sigmoids", "raw"])
def test_fused_matches_eager(shape, d_gate, zeros, output):
    """Both kernel entry points: both sigmoids (the paper's), and the raw CI alone (for the
    straight-through lower sigmoid, applied in torch)."""
    ci, h = _ci_and_inputs(shape, d_gate, zeros)
    weights = torch.randn(shape)  # a loss that sees both outputs
    results = {}
    for backend in ("eager", "fused"):
        ci = _same_weights(ci, backend)
        assert ci.backend_used("cpu") == backend
        # the eager reference runs in float64: the fused kernel's float32 sums over 300 rows
        # differ from float32 eager's in the 5th digit, and either could be the better one
        dtype = torch.float64 if backend == "eager" else torch.float32
        ci.to(dtype)
        hh = h.to(dtype).requires_grad_(True)
        if output == "raw":
            raw = ci.raw(hh)
            lower, upper = raw, raw.tanh()
        else:
            lower, upper = ci(hh)
        loss = (lower * weights.to(dtype)).sum() + (upper**2).sum()
        ci.zero_grad()
        loss.backward()
        results[backend] = [lower, upper, hh.grad] + [p.grad.clone() for p in ci.parameters()]
        ci.float()
    for eager, fused in zip(results["eager"], results["fused"], strict=True):
        scale = float(eager.detach().abs().max())
        torch.testing.assert_close(fused, eager.float(), rtol=1e-5, atol=1e-6 * max(1.0, scale))


def test_fused_with_only_one_output_used():
    ci = CausalImportance(6, 16, backend="fused")
    h = torch.randn(20, 6, requires_grad=True)
    lower, _ = ci(h)
    lower.sum().backward()
    assert torch.isfinite(h.grad).all()
