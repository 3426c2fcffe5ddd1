"""Each loss on a tiny case computed by hand."""

import math

import pytest
import torch

from spdkit.losses import (
    faithfulness_loss,
    importance_minimality_loss,
    kl_divergence,
    mse_divergence,
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
