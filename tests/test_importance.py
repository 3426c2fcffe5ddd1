import pytest
import torch

from spdkit.method.ci.mlp import CausalImportance, ci_mlp
from spdkit.method.ci.sigmoids import lower_leaky_hard_sigmoid, upper_leaky_hard_sigmoid

POINTS = torch.tensor([-2.0, -0.5, 0.25, 0.5, 0.75, 1.5, 3.0])


def test_lower_leaky_values_and_gradients():
    x = POINTS.clone().requires_grad_(True)
    y = lower_leaky_hard_sigmoid(x)
    torch.testing.assert_close(y, torch.tensor([-0.02, -0.005, 0.25, 0.5, 0.75, 1.0, 1.0]))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.01, 0.01, 1, 1, 1, 0, 0.0]))


def test_upper_leaky_values_and_gradients():
    x = POINTS.clone().requires_grad_(True)
    y = upper_leaky_hard_sigmoid(x)
    torch.testing.assert_close(y, torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.005, 1.02]))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0, 0, 1, 1, 1, 0.01, 0.01]))


def test_ci_mlp_matches_a_loop_over_subcomponents():
    """The batched op equals C separate scalar MLPs γ_c(h_c) (paper appendix formula)."""
    C, d = 3, 4
    ci = CausalImportance(C, d)
    with torch.no_grad():
        ci.b_in.normal_()
        ci.b_out.normal_()
    h = torch.randn(5, C)
    batched = ci_mlp(h, ci.w_in, ci.b_in, ci.w_out, ci.b_out)
    for c in range(C):
        hidden = torch.nn.functional.gelu(h[:, c : c + 1] * ci.w_in[c] + ci.b_in[c])  # [5, d]
        torch.testing.assert_close(batched[:, c], hidden @ ci.w_out[c] + ci.b_out[c])


def test_ci_pair_is_both_sigmoids_of_the_same_raw_values():
    ci = CausalImportance(4, 8)
    h = torch.randn(6, 4) * 3
    lower, upper = ci(h)
    raw = ci_mlp(h, ci.w_in, ci.b_in, ci.w_out, ci.b_out)
    torch.testing.assert_close(lower, lower_leaky_hard_sigmoid(raw))
    torch.testing.assert_close(upper, upper_leaky_hard_sigmoid(raw))


@pytest.mark.parametrize("backend", ["eager", "bogus"])
def test_an_unknown_backend_runs_eager(backend):
    assert CausalImportance(2, 2, backend=backend).backend_used("cpu") == "eager"


def test_a_kernel_that_does_not_apply_falls_back_per_call():
    """The fused kernel is CPU float32 only: float64 inputs run the eager formula."""
    ci = CausalImportance(3, 4, backend="auto").double()
    h = torch.randn(5, 3, dtype=torch.float64)
    lower, upper = ci(h)
    raw = ci_mlp(h, ci.w_in, ci.b_in, ci.w_out, ci.b_out)
    torch.testing.assert_close(lower, lower_leaky_hard_sigmoid(raw))
    torch.testing.assert_close(upper, upper_leaky_hard_sigmoid(raw))
