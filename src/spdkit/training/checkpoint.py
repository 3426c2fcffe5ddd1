"""A trainer's checkpoint: every piece of state a bit-exact resume needs, as safetensors
tensors and string metadata (the run directory's checkpoint/latest.safetensors).

    param.<i>            U, V and the CI function's weights (`trainable_parameters()` order)
    optim.<i>.<name>     AdamW's moments and step
    rng.data, rng.mask, rng.torch   the data generator, the mask stream [key, offset], torch's
    firing.<module>      CI firing counts over the last 10 % of training (global)
    pgd.<module>.{source, m, v, t}  persistent PGD's state (`PGDState`)
    meta: step, skipped_steps, firing_positions, param_groups (JSON)

Data-parallel: the checkpoint holds global state whatever the world size (firing counts
summed, per-sample PGD rows gathered), so a run resumes at any number of ranks.
"""

from __future__ import annotations

import json
import warnings
from typing import Protocol

import torch
from torch import Tensor

from spdkit.config import SPDConfig
from spdkit.engine.distributed import Parallel
from spdkit.engine.random_stream import MaskStream
from spdkit.errors import CheckpointError
from spdkit.method.adversary import PGDState
from spdkit.method.model import ComponentModel
from spdkit.store.runs import checkpoint_parameter_problems, copy_checkpoint_parameters

# persistent PGD's per-position state: one row per sample of the batch (the step count is not)
SHARDED_PGD = (".source", ".m", ".v")


class Trainer(Protocol):
    """The state of `spdkit.training.trainer.Trainer` that a checkpoint holds."""

    model: ComponentModel
    config: SPDConfig
    device: str
    parallel: Parallel
    optimizer: torch.optim.Optimizer
    data_generator: torch.Generator
    mask_stream: MaskStream
    step: int
    skipped_steps: int
    firing: dict[str, Tensor]
    firing_positions: int
    pgd: PGDState | None


def checkpoint_state(trainer: Trainer) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Everything needed to resume: parameters, Adam moments, generator states (tensors)
    and step, LR-group settings (string metadata)."""
    tensors = {f"param.{i}": p.detach() for i, p in enumerate(trainer.model.trainable_parameters())}
    opt_state = trainer.optimizer.state_dict()
    for i, state in opt_state["state"].items():
        for key, value in state.items():
            tensors[f"optim.{i}.{key}"] = value
    tensors["rng.data"] = trainer.data_generator.get_state()
    tensors["rng.mask"] = trainer.mask_stream.state()
    tensors["rng.torch"] = torch.get_rng_state()
    par = trainer.parallel  # the checkpoint holds global state, whatever the world size
    for name, counts in trainer.firing.items():
        tensors[f"firing.{name}"] = par.sum_(counts.clone())
    positions = par.sum_(torch.tensor([trainer.firing_positions], device=trainer.device))
    if trainer.pgd is not None:
        per_sample = trainer.config.adversary.scope == "position"
        for key, value in trainer.pgd.state_tensors().items():
            rows = per_sample and key.endswith(SHARDED_PGD)
            tensors[key] = par.gather_rows(value) if rows else value
    meta = {
        "step": str(trainer.step),
        "skipped_steps": str(trainer.skipped_steps),
        "firing_positions": str(int(positions.item())),
        "param_groups": json.dumps(opt_state["param_groups"]),
    }
    return tensors, meta


def restore_checkpoint_state(
    trainer: Trainer, tensors: dict[str, Tensor], meta: dict[str, str]
) -> None:
    """Restore `state_tensors()`; a checkpoint that lacks a piece or holds a tensor of the
    wrong shape is a CheckpointError naming it, before anything is changed."""
    problems = [f"missing {k}" for k in ("rng.data", "rng.mask", "rng.torch") if k not in tensors]
    problems += [f"missing metadata {k!r}" for k in ("step", "param_groups") if k not in meta]
    params = trainer.model.trainable_parameters()
    problems += checkpoint_parameter_problems(params, tensors)
    if problems:
        raise CheckpointError("checkpoint does not fit this config: " + "; ".join(problems))
    copy_checkpoint_parameters(params, tensors)
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = (
                value.to(trainer.device) if name != "step" else value
            )
    trainer.optimizer.load_state_dict(
        {"state": state, "param_groups": json.loads(meta["param_groups"])}
    )
    trainer.data_generator.set_state(tensors["rng.data"])
    if tensors["rng.mask"].dtype == torch.int64:
        trainer.mask_stream.set_state(tensors["rng.mask"])
    else:  # older checkpoints hold a torch.Generator state: continue on a fresh stretch
        warnings.warn(
            "checkpoint from an older spdkit: the mask random stream restarts here, so this "
            "run will not match one that never stopped",
            stacklevel=2,
        )
        trainer.mask_stream.offset = 1 << 62
    torch.set_rng_state(tensors["rng.torch"])
    trainer.step = int(meta["step"])
    trainer.skipped_steps = int(meta.get("skipped_steps", 0))
    # global firing counts: rank 0 carries them on, the others count from zero
    main = trainer.parallel.is_main
    for name in trainer.firing:
        if f"firing.{name}" in tensors and main:  # absent in checkpoints older than it
            trainer.firing[name] = tensors[f"firing.{name}"].to(trainer.device)
    trainer.firing_positions = int(meta.get("firing_positions", 0)) if main else 0
    if trainer.pgd is not None:
        per_sample = trainer.config.adversary.scope == "position"
        trainer.pgd = PGDState.from_tensors(
            {
                k: trainer.parallel.local(v) if per_sample and k.endswith(SHARDED_PGD) else v
                for k, v in tensors.items()
                if k.startswith("pgd.")
            },
            trainer.device,
        )
