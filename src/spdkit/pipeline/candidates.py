"""Several starts on one target; the one the objective prefers is finished
(`training.candidates`).

Why (docs/ground_truth.md): on the toy targets the objective prefers the true decomposition
(started there, training keeps it, at a lower loss than the minimum a failed run finds), but
from some random starts the optimiser settles in another minimum, and by about 40 % of the
schedule the starts' losses already tell them apart. So: train k starts to `select_frac` of
the schedule, score each on the run's evaluation batch (the same samples and masks for all),
and continue the lowest. Start i draws its init, data and masks from seed + 100003·i (start 0
is the plain run), so the finished run is bit-identical to a single run from the chosen start.

Run directory: `candidates/<i>/` (checkpoint/, metrics.jsonl of start i up to the selection)
and `candidates.json` (each start's seed and evaluation losses, and the choice). A selection
killed midway resumes each start from its checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spdkit import files
from spdkit.analysis.evaluation import evaluation_losses
from spdkit.config import SPDConfig
from spdkit.files import atomic_write_text
from spdkit.store import runs
from spdkit.targets import data_source, eval_data_source
from spdkit.training.loop import build_trainer, train_in_run_dir

log = logging.getLogger(__name__)

SEED_STRIDE = 100003  # start i's seed is seed + SEED_STRIDE · i
RECORD = "candidates.json"


def candidate_config(config: SPDConfig, index: int) -> SPDConfig:
    """Start `index`'s config: the run's, with its own seed (init, data and mask streams)."""
    return config.model_copy(update={"seed": config.seed + SEED_STRIDE * index})


def selection_step(config: SPDConfig) -> int:
    """The step where the starts are compared."""
    steps = config.training.steps
    return min(steps - 1, max(1, round(config.training.select_frac * steps)))


def select_start(
    run_dir: Path, target: nn.Module, config: SPDConfig, device: str, progress: bool
) -> dict[str, Any]:
    """Train `config.training.candidates` starts to the selection step and keep the one with
    the lowest total evaluation loss (candidates.json, written once the choice is made): its
    metrics and checkpoint become the run's, from which the run continues."""
    record = run_dir / RECORD
    result = json.loads(record.read_text()) if record.exists() else None
    if result is None:
        result = _compare_starts(run_dir, target, config, device, progress)
        atomic_write_text(record, json.dumps(result, indent=1))
    source = run_dir / "candidates" / str(result["chosen"])
    files.atomic_copy(source / "metrics.jsonl", run_dir / "metrics.jsonl")
    # last, whole or not at all: the run continues from it
    files.atomic_copy(source / runs.CHECKPOINT, run_dir / runs.CHECKPOINT)
    return result


def _compare_starts(
    run_dir: Path, target: nn.Module, config: SPDConfig, device: str, progress: bool
) -> dict[str, Any]:
    until = selection_step(config)
    gen = torch.Generator(device=device).manual_seed(config.seed + 3000)
    x = eval_data_source(config, data_source(config, progress)).sample(
        config.eval.n_eval_samples, gen
    )
    scores = []
    for i in range(config.training.candidates):
        where = run_dir / "candidates" / str(i)
        where.mkdir(parents=True, exist_ok=True)
        start = candidate_config(config, i)
        # each start wraps its own copy: inserted identities change the module tree
        trainer = build_trainer(copy.deepcopy(target), data_source(start), start, device)
        ckpt = where / runs.CHECKPOINT
        if ckpt.exists():
            trainer.load_state(*runs.load_tensors(ckpt))
            runs.truncate_metrics(where, trainer.step)
        log.info("start %d of %d (seed %d)", i + 1, config.training.candidates, start.seed)
        train_in_run_dir(trainer, where, progress, until=until)
        with torch.no_grad():
            losses = evaluation_losses(trainer.model, x, config, until)
        scores.append({"index": i, "seed": start.seed, **losses})
    chosen = min(range(len(scores)), key=lambda i: scores[i]["total"])
    log.info(
        "chose start %d at step %d (total %.6g; the others %s)",
        chosen,
        until,
        scores[chosen]["total"],
        ", ".join(f"{s['total']:.6g}" for s in scores if s["index"] != chosen),
    )
    return {"selection_step": until, "chosen": chosen, "candidates": scores}
