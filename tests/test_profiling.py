"""Profiling and FLOP counting: `spdkit run --profile` and the benchmark's numbers."""

from __future__ import annotations

from spdkit.config import parse_config
from spdkit.pipeline.run import run_experiment
from spdkit.targets import data_source, target_kind
from spdkit.training.loop import build_trainer
from spdkit.training.profiling import step_flops
from tests.helpers import tiny_tms_dict


def test_profile_writes_a_summary_and_leaves_results_unchanged(tmp_path):
    config = parse_config(tiny_tms_dict(steps=20))
    run_experiment(config, tmp_path / "plain", progress=False)
    run_experiment(config, tmp_path / "profiled", "cpu", tmp_path / "plain", False, profile=True)
    text = (tmp_path / "profiled" / "profile.txt").read_text()
    assert "steps 6-15" in text and "ms/step" in text and "aten::mm" in text
    assert not (tmp_path / "plain" / "profile.txt").exists()
    a = (tmp_path / "plain" / "components.safetensors").read_bytes()
    b = (tmp_path / "profiled" / "components.safetensors").read_bytes()
    assert a == b


def test_step_flops_counts_at_least_the_unavoidable_matmuls():
    config = parse_config(tiny_tms_dict(ci_backend="eager"))
    target = target_kind(config.target).build(config.target)
    trainer = build_trainer(target, data_source(config), config, "cpu")
    flops = step_flops(trainer)
    B, n, h, C = config.training.batch_size, 5, 2, 8
    # target forward (2 matmuls) + inner acts x Vᵀ (2 modules) alone, forward only
    lower_bound = 2 * B * (n * h + h * n) + 2 * B * (n * C + h * C)
    assert flops["counted"] > lower_bound
    assert flops["ci_fused"] == 0 and flops["total"] == flops["counted"]
