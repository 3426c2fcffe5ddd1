"""The TMS targets: architecture, data, training to a pentagon, and the feature check."""

import pytest
import torch

from spdkit.config import TMSTargetConfig
from spdkit.targets.tms import (
    TMSModel,
    check_features,
    sample_sparse_features,
    train_tms,
    train_tms_once,
)


def test_forward_is_relu_of_wt_w_x_plus_b():
    model = TMSModel(5, 2, n_hidden_layers=1)
    x = torch.rand(7, 5)
    W, b = model.linear1.weight, model.linear2.bias
    torch.testing.assert_close(model(x), torch.relu(x @ W.T @ W + b))
    torch.testing.assert_close(model.tied_forward(x), model(x))
    assert torch.equal(model.hidden_layers[0].weight, torch.eye(2))
    assert not model.hidden_layers[0].weight.requires_grad


def test_sparse_features_statistics():
    gen = torch.Generator().manual_seed(0)
    x = sample_sparse_features(20000, 10, 0.05, gen)
    active = x > 0
    assert abs(active.float().mean().item() - 0.05) < 0.003
    assert x[active].min() >= 0 and x[active].max() <= 1
    assert abs(x[active].mean().item() - 0.5) < 0.02


def test_sampling_is_fixed_by_the_generator():
    a = sample_sparse_features(8, 5, 0.3, torch.Generator().manual_seed(3))
    b = sample_sparse_features(8, 5, 0.3, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_trained_5_2_target_is_a_pentagon():
    cfg = TMSTargetConfig(n_features=5, n_hidden=2, train_steps=3000)
    model, info = train_tms(cfg, seed=0)
    assert info["attempts"][-1]["ok"]
    gaps = info["pairwise_angles_deg"]
    assert len(gaps) == 5 and all(abs(g - 72) < 6 for g in gaps), gaps
    norms = model.linear1.weight.norm(dim=0)
    assert norms.min() > 0.8 * norms.max()
    torch.testing.assert_close(model.linear2.weight, model.linear1.weight.T)


def test_unlearned_feature_is_detected_and_retried(monkeypatch):
    model = TMSModel(5, 2)
    with torch.no_grad():
        angles = torch.arange(5) * 2 * torch.pi / 5
        model.linear1.weight.copy_(torch.stack([angles.cos(), angles.sin()]))
        assert check_features(model).ok
        model.linear1.weight[:, 3] = 0.003
    check = check_features(model)
    assert not check.ok and "features [3]" in check.message

    from spdkit.targets import tms

    calls = []
    real = tms.train_tms_once

    def flaky(config, seed, device="cpu", progress=False):
        calls.append(seed)
        m = real(config, seed, device, progress)
        if seed == 0:
            with torch.no_grad():
                m.linear1.weight[:, 1] = 0.0
        return m

    monkeypatch.setattr(tms, "train_tms_once", flaky)
    cfg = TMSTargetConfig(n_features=5, n_hidden=2, train_steps=300)
    _, info = tms.train_tms(cfg, seed=0)
    assert calls == [0, 1]
    assert [a["ok"] for a in info["attempts"]] == [False, True]


def test_no_seed_works_is_a_clear_error(monkeypatch):
    from spdkit.targets import tms

    def dead(config, seed, device="cpu", progress=False):
        model = TMSModel(5, 2)
        with torch.no_grad():
            model.linear1.weight[:, 0] = 0.0
        return model

    monkeypatch.setattr(tms, "train_tms_once", dead)
    with pytest.raises(RuntimeError, match="no seed in 0..1"):
        tms.train_tms(TMSTargetConfig(n_features=5, n_hidden=2, max_train_attempts=2), seed=0)


def test_training_a_target_leaves_the_callers_rng_alone():
    """The target's initial weights are drawn from a seeded fork of torch's generator: the same
    weights whatever the caller's random state, and the caller's stream goes on unchanged."""
    config = TMSTargetConfig(n_features=5, n_hidden=2, train_steps=3)
    torch.manual_seed(1)
    expected = torch.rand(4)
    torch.manual_seed(1)
    first = train_tms_once(config, seed=0).linear1.weight
    assert torch.equal(torch.rand(4), expected)
    torch.manual_seed(99)
    assert torch.equal(train_tms_once(config, seed=0).linear1.weight, first)
