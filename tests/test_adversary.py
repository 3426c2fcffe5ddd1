"""The adversary (spdkit.method.adversary): ascent updates by hand, the projection, persistent
sources across steps and through a checkpoint."""

import pytest
import torch

from spdkit.engine.random_stream import MaskStream, uniform
from spdkit.method.adversary import Ascent, ascend, initial_sources, source_shape
from tests.helpers import tiny_trainer


def test_sign_ascent_by_hand_and_projected_onto_the_unit_interval():
    s = torch.tensor([0.5, 0.5, 0.5, 0.95, 0.05])
    grad = torch.tensor([2.0, -3.0, 0.0, 1.0, -1.0])
    out = Ascent("sign", (0.5, 0.99)).update("m", s, grad, lr=0.2)
    torch.testing.assert_close(out, torch.tensor([0.7, 0.3, 0.5, 1.0, 0.0]))


def test_adam_ascent_by_hand():
    ascent = Ascent("adam", (0.5, 0.99))
    s, g1, g2 = torch.tensor([0.5]), torch.tensor([4.0]), torch.tensor([-1.0])
    # t = 1: m̂ = g, v̂ = g²: a step of lr in the gradient's sign
    s1 = ascent.update("m", s, g1, lr=0.1)
    torch.testing.assert_close(s1, torch.tensor([0.6]), atol=1e-6, rtol=0)
    # t = 1 left m = 0.5·4 = 2, v = 0.01·16 = 0.16; t = 2: m = 0.5·2 + 0.5·(−1) = 0.5,
    # v = 0.99·0.16 + 0.01·1 = 0.1684; bias-corrected m̂ = 0.5/0.75, v̂ = 0.1684/(1 − 0.99²)
    m_hat, v_hat = 0.5 / 0.75, 0.1684 / (1 - 0.99**2)
    s2 = ascent.update("m", s1, g2, lr=0.1)
    expected = 0.6 + 0.1 * m_hat / (v_hat**0.5 + 1e-8)
    torch.testing.assert_close(s2, torch.tensor([expected]), atol=1e-6, rtol=0)


def test_ascend_climbs_to_the_farthest_corner():
    """D(s) = Σ (s − 0.3)² on [0, 1]: from 0.5, sign steps of 0.2 go 0.7, 0.9, 1.0 (clamped),
    the maximum; the gradient is taken with respect to the sources only."""
    seen = []

    def divergence(sources):
        seen.append(sources["a"].detach().clone())
        return ((sources["a"] - 0.3) ** 2).sum()

    out = ascend(divergence, {"a": torch.tensor([0.5, 0.2])}, 3, Ascent("sign", (0.5, 0.99)), 0.2)
    torch.testing.assert_close(out["a"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(seen[1], torch.tensor([0.7, 0.0]))


def test_initial_sources_and_scopes():
    g = torch.zeros(4, 3, 5)
    assert source_shape(g, "position") == (4, 3, 5) and source_shape(g, "batch") == (5,)
    stream = MaskStream(0)
    r = initial_sources({"a": (4, 3, 5), "b": (5,)}, "random", stream, "cpu")
    assert stream.offset == 60 + 5  # drawn from the step's stream, in order
    torch.testing.assert_close(r["a"].reshape(-1), uniform(60, stream.key, 0))
    torch.testing.assert_close(r["b"], uniform(5, stream.key, 60))
    ones = initial_sources({"a": (5,)}, "ones", MaskStream(0), "cpu")["a"]
    assert torch.equal(ones, torch.ones(5))


def _trainer(**pgd):
    torch.manual_seed(0)
    persistent = {"persistent": True, "optimizer": "adam", "step_size": 0.05, **pgd}
    return tiny_trainer(adversarial_recon_coeff=1.0, pgd=persistent)


def test_persistent_sources_carry_over_and_resume_bit_exactly():
    whole = _trainer()
    whole.train_step()
    first = {n: s.clone() for n, s in whole.pgd.sources.items()}
    assert set(first) == {"linear1", "linear2"} and first["linear1"].shape == (256, 8)
    whole.train_step()
    assert not torch.equal(first["linear1"], whole.pgd.sources["linear1"])
    tensors, meta = whole.state_tensors()
    tensors = {k: v.clone() for k, v in tensors.items()}  # the parameters change in place
    assert int(tensors["pgd.linear1.t"]) == 2  # one Adam update per step (n_steps 1)
    for _ in range(3):
        whole.train_step()

    part = _trainer()
    part.load_state(tensors, meta)
    for _ in range(3):
        part.train_step()
    for a, b in zip(
        whole.model.trainable_parameters(), part.model.trainable_parameters(), strict=True
    ):
        assert torch.equal(a, b)
    for name, s in whole.pgd.sources.items():
        assert torch.equal(s, part.pgd.sources[name])


def test_persistent_position_sources_need_a_fixed_batch_shape():
    trainer = _trainer()
    trainer.train_step()
    with pytest.raises(ValueError, match="adversary.scope=batch"):
        trainer.pgd.starting(
            {"linear1": (3, 9)}, trainer.config.adversary, trainer.mask_stream, torch.device("cpu")
        )


def test_the_adversarial_loss_can_be_evaluated_without_gradients():
    from spdkit.training.trainer import spd_losses

    trainer = _trainer(persistent=False)
    x = trainer.data.sample(32, trainer.data_generator)
    with torch.no_grad():
        terms = spd_losses(trainer.model, x, trainer.config, MaskStream(1)).terms
    assert terms["adversarial_recon"] > 0


def test_the_evaluation_ladder_is_one_trajectory_read_at_each_count():
    from spdkit.method.adversary import fresh_pgd_ladder

    def divergence(sources):
        return ((sources["a"] - 0.3) ** 2 * torch.arange(4.0)).sum()

    ladder = fresh_pgd_ladder(
        divergence, {"a": (4,)}, [3, 1], 0.1, torch.Generator().manual_seed(0)
    )
    start = torch.rand(4, generator=torch.Generator().manual_seed(0))
    for n in (1, 3):  # the same as n ascent steps from the same fresh start
        alone = ascend(divergence, {"a": start}, n, Ascent("sign", (0.5, 0.99)), 0.1)
        torch.testing.assert_close(ladder[n]["a"], alone["a"])


def test_an_ascent_over_weighted_parts_equals_the_ascent_of_their_sum():
    """A batch attacked in chunks (one backward per chunk) takes the same steps as the batch
    whole: ∇ Σ_i w_i D_i, accumulated part by part."""
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))

    def d_of(rows):
        return lambda s: ((x[rows] * s["a"]).sum(-1) ** 2).mean()

    start = {"a": torch.full((3,), 0.5)}
    adam = (0.5, 0.99)
    whole = ascend(d_of(slice(0, 6)), start, 4, Ascent("adam", adam), 0.05)
    parts = [(4 / 6, d_of(slice(0, 4))), (2 / 6, d_of(slice(4, 6)))]
    chunked = ascend(parts, start, 4, Ascent("adam", adam), 0.05)
    torch.testing.assert_close(chunked["a"], whole["a"])
