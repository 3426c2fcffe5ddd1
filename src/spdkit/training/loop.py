"""A trainer for a target, and its loop written into a run directory (metrics.jsonl, atomic
checkpoints, components.safetensors): what `spdkit.decompose` and `spdkit run` share."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from spdkit.config import SPDConfig
from spdkit.engine.distributed import SINGLE, Parallel
from spdkit.method.model import ComponentModel
from spdkit.store import runs
from spdkit.targets import DataSource
from spdkit.training.trainer import Trainer


def build_trainer(
    target: nn.Module,
    data: DataSource,
    config: SPDConfig,
    device: str,
    parallel: Parallel = SINGLE,
) -> Trainer:
    """Wrap the target and set up training; the component init is fixed by config.seed (the
    same on every data-parallel rank). The init draws from torch's CPU generator, seeded in a
    fork so that the caller's random state is the same after the call as before."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(config.seed)
        model = ComponentModel.from_config(target.to(device), config).to(device)
    return Trainer(model, data, config, device, parallel)


def train_in_run_dir(
    trainer: Trainer,
    run_dir: Path | None,
    progress: bool = True,
    on_step: Callable[[Trainer], None] | None = None,
    until: int | None = None,
    on_metrics: Callable[[int, dict[str, float]], None] | None = None,
) -> None:
    """Run the loop (to the end, or to step `until`), appending metrics and writing atomic
    checkpoints into run_dir if given (data-parallel: rank 0 writes; a checkpoint gathers
    state from every rank); components.safetensors once training is complete. `on_metrics`
    (rank 0) sees each logged record too (an experiment tracker)."""
    if run_dir is None:
        trainer.run(progress=progress, on_step=on_step, until=until)
        return
    main = trainer.parallel.is_main

    def on_log(step: int, record: dict[str, float]) -> None:
        if main:
            runs.append_metrics(run_dir, {"step": step, **record})
            if on_metrics is not None:
                on_metrics(step, record)

    def on_checkpoint(t: Trainer) -> None:
        tensors, meta = t.state_tensors()
        if main:
            runs.save_checkpoint(run_dir, tensors, meta)

    trainer.run(
        on_log=on_log, on_checkpoint=on_checkpoint, progress=progress, on_step=on_step, until=until
    )
    if main and trainer.step == trainer.config.training.steps:
        components = runs.component_tensors(trainer.model)
        runs.save_tensors(run_dir / "components.safetensors", components)
