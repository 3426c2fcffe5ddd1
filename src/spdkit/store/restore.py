"""One loader for what a run directory holds: its target and its components, as they were at
the end of the run (components.safetensors) or at the last checkpoint (checkpoint/), built the
same way either time (`ComponentModel.from_config` on the saved target)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from spdkit.config import SPDConfig
from spdkit.errors import RunDirError
from spdkit.method.model import ComponentModel
from spdkit.store import runs


def restore(
    run_dir: Path,
    device: str = "cpu",
    target: nn.Module | None = None,
    checkpoint: bool = False,
) -> tuple[ComponentModel, SPDConfig, int]:
    """(component model on `device`, config, step) of a run directory; nothing is unpickled.

    The target is rebuilt from target.json + target.safetensors, or is `target` (a fresh
    instance of the user's model, whose weights are replaced by the saved ones). The components
    are the finished run's, or with `checkpoint` those of the last checkpoint (`step` its step;
    for a finished run `config.training.steps`)."""
    run_dir = Path(run_dir)
    config = runs.load_run_config(run_dir)
    ckpt = run_dir / runs.CHECKPOINT
    if checkpoint and not ckpt.is_file():
        raise RunDirError(f"{run_dir}: no checkpoint ({ckpt} does not exist)")
    if target is None:
        if config.target is None:
            raise RunDirError(
                f"{run_dir}: a decomposition of a model passed to spdkit.decompose, which the "
                "run directory cannot rebuild: load it in Python with spdkit.load(run_dir, "
                "target=model, data=data), or make runs with --target-factory / --data-factory "
                "so that the CLI can"
            )
        target, _ = runs.load_target(run_dir, config.target)
    else:
        tensors, _ = runs.load_tensors(run_dir / "target.safetensors")
        runs.load_state_checked(target, tensors, run_dir / "target.safetensors")
    model = ComponentModel.from_config(target.to(device), config).to(device)
    if checkpoint:
        tensors, meta = runs.load_tensors(ckpt)
        params = model.trainable_parameters()
        problems = runs.checkpoint_parameter_problems(params, tensors)
        if problems:
            raise RunDirError(f"{ckpt}: checkpoint does not fit this config: {'; '.join(problems)}")
        runs.copy_checkpoint_parameters(params, tensors)
        step = int(meta.get("step", 0))
    else:
        path = run_dir / "components.safetensors"
        tensors, _ = runs.load_tensors(path)
        runs.load_component_tensors(model, tensors, path)
        step = config.training.steps
    return model, config, step
