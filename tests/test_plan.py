"""The memory plan: probes leave the run unchanged, and a run that will not fit is refused
in one line. (Its accuracy against measured peak RSS is an OS/allocator figure, measured in
docs/hf.md, never asserted here.)"""

import dataclasses

import pytest
import torch
import yaml
from typer.testing import CliRunner

from spdkit.cli import app
from spdkit.pipeline import plan
from tests.helpers import tiny_tms_dict, tiny_trainer


def test_probing_leaves_the_training_unchanged():
    """The probes use their own data and mask numbers and leave no gradients behind: a run
    planned first trains exactly as one that was not."""
    params = []
    for planned in (False, True):
        torch.manual_seed(0)  # the untrained target's init
        trainer = tiny_trainer()
        if planned:
            result = plan.make_plan(trainer)
            assert (
                result.train_flops > 0 and result.batch_size == trainer.config.training.batch_size
            )
        for _ in range(6):
            trainer.train_step()
        params.append([p.detach().clone() for p in trainer.model.trainable_parameters()])
    for a, b in zip(*params, strict=True):
        assert torch.equal(a, b)


def example_plan(**changes) -> plan.Plan:
    base = plan.Plan(
        batch_size=64,
        tokens_per_sample=128,
        base_bytes=2 * plan.GIB,
        peak_bytes=10 * plan.GIB,
        per_sample_bytes=plan.GIB // 8,
        optimizer_bytes=0,
        persistent_bytes=0,
        eval_peak_bytes=3 * plan.GIB,
        train_flops=1e12,
        eval_flops=1e13,
        available=4 * plan.GIB,
    )
    return dataclasses.replace(base, **changes)


def test_a_plan_that_does_not_fit_is_one_line_naming_numbers_and_knobs():
    with pytest.raises(ValueError) as err:
        plan.check_fits(example_plan())
    message = str(err.value)
    assert "\n" not in message and "10.00 GiB" in message and "4.00 GiB is available" in message
    assert "batch_size" in message and "seq_len" in message
    plan.check_fits(example_plan(available=9 * plan.GIB))  # needs 8 more than it has: fits
    assert example_plan(peak_bytes=None).fits is None  # not measurable: never refused


def test_run_refuses_a_run_that_will_not_fit(tmp_path, monkeypatch):
    """The wiring: `run` stops on a plan that does not fit (a fixed plan: how much a real
    probe measures is the allocator's business, never asserted)."""
    import spdkit.pipeline.run

    monkeypatch.setattr(spdkit.pipeline.run, "make_plan", lambda trainer: example_plan())
    cfg = tmp_path / "c.yaml"
    data = tiny_tms_dict(steps=5)
    data["target"]["train_steps"] = 50
    cfg.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["run", str(cfg), "--out", str(tmp_path / "r"), "--quiet"])
    assert result.exit_code == 2 and "available" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(app, ["plan", str(cfg)])
    assert result.exit_code == 0 and "training step peak" in result.output


def test_the_plan_counts_flops_as_the_profiler_does():
    """`spdkit plan` and `step_flops` (the benchmark's count) agree on a step's FLOPs,
    the fused CI kernel's included: the plan's batch-1 count × B is the profiler's count at
    B up to the batch-independent faithfulness term."""
    from spdkit.training.profiling import step_flops

    trainer = tiny_trainer()
    made = plan.make_plan(trainer)
    planned = made.train_flops
    # a time estimate for the step, the run and the evaluation, printed with the plan
    assert made.train_seconds > 0 and made.eval_seconds > 0 and made.steps == 10
    text = plan.format_plan(made)
    assert "time, at most about:" in text and "for 10 steps" in text
    profiled = step_flops(trainer)
    if trainer.ci_backend == "fused":
        assert profiled["ci_fused"] > 0
    assert planned == pytest.approx(profiled["total"], rel=0.05)
