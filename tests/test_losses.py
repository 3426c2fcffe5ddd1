"""Each loss on a tiny case computed by hand."""

import math

import pytest
import torch

from spdkit.method.ci.sigmoids import lower_hard_sigmoid_ste, lower_leaky_hard_sigmoid
from spdkit.method.losses import (
    faithfulness_loss,
    frequency_minimality_loss,
    importance_minimality_loss,
    kl_divergence,
    mse_divergence,
    pnorm_at,
    smooth_l0_penalty,
    stochastic_masks,
)


def test_faithfulness_is_squared_error_over_all_entries():
    W1, UV1 = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 2.0]])  # error 1
    W2, UV2 = torch.tensor([[1.0], [1.0]]), torch.tensor([[3.0], [1.0]])  # error 4
    # (1 + 4) / (2 + 2 entries)
    assert faithfulness_loss([W1, W2], [UV1, UV2]).item() == pytest.approx(5 / 4)


def test_importance_minimality_sums_over_modules_and_C_averages_batch():
    g1 = torch.tensor([[0.5, 0.0], [1.0, 0.25]])  # batch 2, C 2
    g2 = torch.tensor([[0.1], [0.3]])  # batch 2, C 1
    # p = 1: batch 0: 0.5 + 0 + 0.1; batch 1: 1 + 0.25 + 0.3 -> mean = (0.6 + 1.55) / 2
    assert importance_minimality_loss([g1, g2], 1.0).item() == pytest.approx(1.075, abs=1e-6)
    # p = 2: batch 0: 0.25 + 0.01; batch 1: 1 + 0.0625 + 0.09 -> mean
    assert importance_minimality_loss([g1, g2], 2.0).item() == pytest.approx(
        (0.26 + 1.1525) / 2, abs=1e-6
    )


def test_stochastic_masks_interpolate_between_g_and_one():
    g = torch.tensor([0.0, 0.5, 1.0, 0.2])
    r = torch.tensor([0.3, 0.5, 0.9, 0.0])
    torch.testing.assert_close(stochastic_masks(g, r), torch.tensor([0.3, 0.75, 1.0, 0.2]))


def test_mse_divergence():
    assert mse_divergence(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0])).item() == 2.5


def test_kl_divergence_by_hand():
    target = torch.log(torch.tensor([[0.5, 0.5]]))
    masked = torch.log(torch.tensor([[0.25, 0.75]]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_divergence(masked, target).item() == pytest.approx(expected, abs=1e-6)
    assert kl_divergence(target, target).item() == pytest.approx(0.0, abs=1e-7)


def test_prepared_target_gives_the_same_kl_as_a_direct_call():
    torch.manual_seed(0)
    target = torch.randn(3, 5, 11)
    outs = [torch.randn(3, 5, 11) for _ in range(4)]
    prepared = kl_divergence.prepare(target)
    for o in outs:
        assert torch.equal(kl_divergence.compare(o, prepared), kl_divergence(o, target))


def test_frequency_minimality_by_hand():
    # one module, 2 batch × 2 positions, C 2: subcomponent 0 fires on 3 positions at 1,
    # subcomponent 1 on one position at 0.5
    phi = torch.tensor([[[1.0, 0.0], [1.0, 0.5]], [[1.0, 0.0], [0.0, 0.0]]])
    # s = (3, 0.5): (3 log2 4 + 0.5 log2 1.5) / 4 positions
    expected = (3 * 2 + 0.5 * math.log2(1.5)) / 4
    assert frequency_minimality_loss([phi]).item() == pytest.approx(expected, abs=1e-6)
    # superlinear: one subcomponent firing on 4 positions costs more than two firing on 2 each
    one = torch.tensor([[1.0, 0.0]] * 4)
    two = torch.tensor([[1.0, 0.0]] * 2 + [[0.0, 1.0]] * 2)
    assert frequency_minimality_loss([one]) > frequency_minimality_loss([two])
    # two data-parallel ranks holding the same shard: s = 2 (3, 0.5) over 8 positions, the
    # gradient of the global loss with respect to this rank's φ: log2(1 + S) + S / ((1 + S) ln 2)
    leaf = phi.clone().requires_grad_(True)
    doubled = frequency_minimality_loss([leaf], global_sum=lambda s: 2 * s, world=2)
    assert doubled.item() == pytest.approx((6 * math.log2(7) + 1 * math.log2(2)) / 8, abs=1e-6)
    doubled.backward()
    S = torch.tensor([6.0, 1.0])
    per_c = (torch.log2(1 + S) + S / ((1 + S) * math.log(2))) / 8
    torch.testing.assert_close(leaf.grad, per_c.expand_as(phi))


def test_frequency_reference_count_takes_the_count_at_a_fixed_size():
    """log2(1 + s·N/BT): at N = BT the paper's value; a batch twice as large with the same
    firing rates costs the same per position."""
    phi = torch.tensor([[[1.0, 0.0], [1.0, 0.5]], [[1.0, 0.0], [0.0, 0.0]]])
    paper = frequency_minimality_loss([phi]).item()
    assert frequency_minimality_loss([phi], reference_count=4).item() == pytest.approx(paper)
    twice = torch.cat([phi, phi])
    assert frequency_minimality_loss([twice]).item() > paper  # absolute count: one bit more
    assert frequency_minimality_loss([twice], reference_count=4).item() == pytest.approx(paper)
    # s = (3, 0.5) at N = 1: (3 log2(1 + 3/4) + 0.5 log2(1 + 0.5/4)) / 4
    expected = (3 * math.log2(1.75) + 0.5 * math.log2(1.125)) / 4
    assert frequency_minimality_loss([phi], reference_count=1).item() == pytest.approx(expected)


def test_smooth_l0_penalty_saturates_and_has_a_finite_slope_at_zero():
    g = torch.tensor([0.0, 0.1, 1.0], requires_grad=True)
    phi = smooth_l0_penalty(g, scale=0.1)
    torch.testing.assert_close(
        phi.detach(), torch.tensor([0.0, 1 - math.exp(-1), 1 - math.exp(-10)])
    )
    phi.sum().backward()
    # φ'(g) = exp(−g/σ)/σ: 10 at 0 (finite, unlike p g^(p−1) for p < 1), ~0 once saturated
    torch.testing.assert_close(g.grad, torch.tensor([10.0, 10 * math.exp(-1), 10 * math.exp(-10)]))


def test_pnorm_anneal_is_linear_between_its_fractions():
    at = [pnorm_at(s, 100, 2.0, 0.4, 0.2, 0.6) for s in (0, 20, 40, 60, 99)]
    assert at == pytest.approx([2.0, 2.0, 1.2, 0.4, 0.4])


def test_straight_through_lower_sigmoid_clamps_and_leaks_only_negative_gradients():
    x = torch.tensor([-1.0, -1.0, 0.5, 0.5, 2.0], requires_grad=True)
    y = lower_hard_sigmoid_ste(x)
    torch.testing.assert_close(y.detach(), torch.tensor([0.0, 0.0, 0.5, 0.5, 1.0]))
    grad_out = torch.tensor([-2.0, 3.0, -2.0, 3.0, -5.0])
    y.backward(grad_out)
    # below 0: 0.01 × a negative gradient (raising x helps), 0 for a positive one; inside
    # (0, 1]: the gradient; above 1: 0
    torch.testing.assert_close(x.grad, torch.tensor([-0.02, 0.0, -2.0, 3.0, 0.0]))
    # the paper's: the leak is in the forward, masks go below 0
    assert lower_leaky_hard_sigmoid(torch.tensor([-1.0])).item() == pytest.approx(-0.01)
