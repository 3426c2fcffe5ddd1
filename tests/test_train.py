"""The training loop: LR schedules, the non-finite guard, gradient clipping, the
faithfulness warm-up."""

import math

import pytest
import torch

from spdkit.config import OptimizerConfig, parse_config
from spdkit.method.losses import faithfulness_loss
from spdkit.targets import data_source, target_kind
from spdkit.training.loop import build_trainer
from spdkit.training.trainer import NonFiniteError, lr_at, nonfinite_problem, spd_losses
from tests.helpers import tiny_tms_dict, tiny_trainer


def test_lr_schedules():
    const = OptimizerConfig(lr=1.0)
    assert [lr_at(s, 10, const) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    cos = OptimizerConfig(lr=2.0, lr_schedule="cosine")
    assert lr_at(0, 100, cos) == pytest.approx(2.0)
    assert lr_at(50, 100, cos) == pytest.approx(1.0)
    assert lr_at(99, 100, cos) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0.99)))
    lin = OptimizerConfig(lr=1.0, lr_schedule="linear", warmup_frac=0.1)
    assert [lr_at(s, 100, lin) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_at(10, 100, lin) == pytest.approx(1.0)
    assert lr_at(55, 100, lin) == pytest.approx(0.5)


def poisoned_trainer(mode: str):
    trainer = tiny_trainer(on_nonfinite=mode)
    trainer.train_step()
    with torch.no_grad():
        trainer.model.components("linear1").V[0, 0] = float("nan")
    return trainer


def test_nonfinite_loss_stops_naming_the_term_and_step():
    trainer = poisoned_trainer("stop")
    before = [p.detach().clone() for p in trainer.model.trainable_parameters()]
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite loss term\(s\) faithfulness"):
        trainer.train_step()
    after = trainer.model.trainable_parameters()
    for a, b in zip(before, after, strict=True):  # no update was applied
        assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))


def test_nonfinite_loss_can_skip_the_update():
    trainer = poisoned_trainer("skip")
    ci_before = trainer.model.ci.tensors()["linear2.ci.w_in"].detach().clone()
    trainer.train_step()
    assert trainer.skipped_steps == 1 and trainer.step == 2
    assert torch.equal(trainer.model.ci.tensors()["linear2.ci.w_in"], ci_before)  # no update


@pytest.mark.parametrize("numel", [10, 100_000])  # checked concatenated / alone
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nonfinite_gradient_is_found_in_small_and_large_parameters(numel, bad):
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (3, numel, 5)]
    for p in params:
        p.grad = torch.ones_like(p)
    terms = {"total": torch.tensor(1.0), "faithfulness": torch.tensor(1.0)}
    assert nonfinite_problem(terms, params) is None
    params[1].grad[-1] = bad
    assert nonfinite_problem(terms, params) == "non-finite gradient"


def test_checkpoint_with_an_old_generator_mask_state_resumes_on_a_fresh_stretch():
    trainer = tiny_trainer()
    trainer.train_step()
    tensors, meta = trainer.state_tensors()
    assert tensors["rng.mask"].dtype == torch.int64 and tensors["rng.mask"][1] > 0
    tensors["rng.mask"] = torch.Generator().get_state()  # what spdkit wrote before
    again = tiny_trainer()
    with pytest.warns(UserWarning, match="mask random stream restarts"):
        again.load_state(tensors, meta)
    assert again.mask_stream.offset == 1 << 62 and again.step == 1
    again.train_step()


def test_fused_adamw_gives_the_plain_update():
    """The trainer's fused AdamW against the reference (for-loop) one: same parameters after
    a few steps from the same start (same data, same masks)."""
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        trainer = tiny_trainer()
        assert trainer.optimizer.param_groups[0]["fused"] is True  # the default on CPU
        for group in trainer.optimizer.param_groups:
            group["fused"] = fused
            group["foreach"] = False
        for _ in range(3):
            trainer.train_step()
        results.append([p.detach().clone() for p in trainer.model.trainable_parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_clipping_caps_each_group_norm_separately():
    torch.manual_seed(0)
    trainer = tiny_trainer(grad_clip={"components": 1e-3})
    trainer.train_step()
    trainer.optimizer.zero_grad(set_to_none=True)
    x = trainer.data.sample(trainer.config.training.batch_size, trainer.data_generator)
    spd_losses(trainer.model, x, trainer.config, trainer.mask_stream, trainer.step)
    comp, ci = trainer.model.component_parameters(), list(trainer.model.ci.parameters())
    before = [p.grad.clone() for p in comp + ci]
    norm = torch.cat([g.reshape(-1) for g in before[: len(comp)]]).norm()
    assert norm > 1e-3  # so the clip has work to do
    trainer.clip_gradients()
    after = [p.grad for p in comp + ci]
    clipped = torch.cat([g.reshape(-1) for g in after[: len(comp)]])
    assert clipped.norm() == pytest.approx(1e-3, rel=1e-4)
    for a, b in zip(before[: len(comp)], after[: len(comp)], strict=True):  # same direction
        torch.testing.assert_close(b, a * (1e-3 / norm), rtol=1e-4, atol=1e-12)
    for a, b in zip(before[len(comp) :], after[len(comp) :], strict=True):  # CI untouched
        assert torch.equal(a, b)


def test_faithfulness_warmup_runs_before_the_first_step_and_fits_W():
    torch.manual_seed(0)
    cold = tiny_trainer(component_init="normal")
    torch.manual_seed(0)
    warm = tiny_trainer(component_init="normal", faithfulness_warmup={"steps": 300, "lr": 1e-2})
    names = cold.model.module_names

    def faithfulness(t):
        return faithfulness_loss(
            [t.model.target_weight(n) for n in names],
            [t.model.components(n).weight() for n in names],
        ).item()

    start = faithfulness(cold)
    assert faithfulness(warm) == start  # same init, nothing has run yet
    after = warm.faithfulness_warmup()
    assert after < 1e-3 * start
    # a run from step 0 runs it as its first phase: warm-up + one step, as by hand
    torch.manual_seed(0)
    warmup = {"steps": 300, "lr": 1e-2}
    ran = tiny_trainer(component_init="normal", faithfulness_warmup=warmup, steps=1)
    ran.run(progress=False)
    warm.train_step()  # a step alone never warms up: warm's warm-up above is its only one
    for a, b in zip(
        ran.model.trainable_parameters(), warm.model.trainable_parameters(), strict=True
    ):
        assert torch.equal(a, b)


def test_faithfulness_warmup_weight_decay_seeks_the_smallest_norm_factorisation():
    """‖U‖² + ‖V‖² ≥ 2‖W‖_* for every U V = W; weight decay in the warm-up moves the fit
    towards that bound, without weight decay the fit keeps its larger norm."""

    def excess(weight_decay: float) -> tuple[float, float]:
        torch.manual_seed(0)
        warmup = {"steps": 2000, "lr": 1e-2, "weight_decay": weight_decay}
        t = tiny_trainer(component_init="normal", faithfulness_warmup=warmup)
        fit = t.faithfulness_warmup()
        total, bound = 0.0, 0.0
        for n in t.model.module_names:
            comp = t.model.components(n)
            total += float(comp.U.detach().square().sum() + comp.V.detach().square().sum())
            bound += 2 * float(torch.linalg.matrix_norm(t.model.target_weight(n), ord="nuc"))
        return total / bound - 1, fit

    plain, plain_fit = excess(0.0)
    decayed, decayed_fit = excess(0.1)
    assert plain_fit < 1e-4 and decayed_fit < 1e-2  # both fit W
    assert 0 <= decayed < plain / 4


def test_an_ignored_sigint_stays_ignored_during_training():
    """A shell's background job starts with SIGINT ignored: training leaves it so, as target
    training and evaluation do; SIGTERM still stops it at the next step."""
    import signal

    from spdkit.training.trainer import _stop_requests

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with _stop_requests() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGTERM)
            assert stop.is_set()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with _stop_requests() as stop:  # a SIGINT that is not ignored stops training too
            signal.raise_signal(signal.SIGINT)
            assert stop.is_set()
    finally:
        signal.signal(signal.SIGINT, before)


def test_building_a_trainer_leaves_the_callers_random_state_alone():
    """The component init is seeded by config.seed inside a fork of torch's generator: the
    same init every time, and the caller's stream goes on as if nothing had been drawn."""
    config = parse_config(tiny_tms_dict(steps=10))
    target = target_kind(config.target).build(config.target)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = build_trainer(target, data_source(config), config, "cpu")
    torch.testing.assert_close(torch.rand(3), expected)
    second = build_trainer(target, data_source(config), config, "cpu")
    pairs = zip(
        first.model.trainable_parameters(), second.model.trainable_parameters(), strict=True
    )
    for a, b in pairs:
        torch.testing.assert_close(a, b)
