"""A whole run of a bundled toy target: train (or load) the target, decompose it, evaluate, draw.

This is what `spdkit run / resume / eval` call; the library API is `spdkit.api`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from spdkit.analysis.evaluation import evaluate
from spdkit.api import Decomposition, load
from spdkit.config import SPDConfig, load_config
from spdkit.engine.distributed import SINGLE, Parallel, finish
from spdkit.errors import CheckpointError, ConfigError, RunDirError
from spdkit.pipeline.candidates import select_start
from spdkit.pipeline.plan import GIB, Plan, check_fits, make_plan, plan_time
from spdkit.store import runs
from spdkit.store.restore import restore
from spdkit.targets import data_source, target_kind
from spdkit.training.loop import build_trainer, train_in_run_dir
from spdkit.training.profiling import StepProfiler
from spdkit.training.tracking import open_tracker
from spdkit.training.trainer import Trainer

log = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    """`device` checked before anything is built: cpu, cuda or cuda:N, and CUDA present."""
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available on this machine")
    return device


# what a run writes before its first step: a run that stopped there (a bad pattern, a missing
# corpus) left only these, and rerunning the corrected command replaces them
BEFORE_FIRST_STEP = ("config.yaml", "target.json", "target.safetensors")


def prepare_run_dir(out: Path) -> Path:
    """`out`, created and checked writable. A run directory that already trained is refused
    (resume it instead); one that stopped before its first step (only `BEFORE_FIRST_STEP`
    files) is replaced, so the corrected command can simply be rerun."""
    if (out / "config.yaml").exists():
        trained = (runs.CHECKPOINT, Path("components.safetensors"), Path("candidates"))
        started = any((out / name).exists() for name in trained)
        if started:
            raise FileExistsError(
                f"{out} already holds a run; continue it with `spdkit resume {out}` or pick "
                "another --out"
            )
        log.warning("%s: replacing a run that stopped before its first step", out)
        for name in BEFORE_FIRST_STEP:
            (out / name).unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise OSError(f"output directory {out} is not writable ({err.strerror})") from None
    return out


def run_experiment(
    config: SPDConfig,
    out: Path,
    device: str = "cpu",
    target_path: Path | None = None,
    progress: bool = True,
    profile: bool = False,
    parallel: Parallel = SINGLE,
) -> dict[str, Any]:
    """Train or load the target, decompose it into `out`, then evaluate and draw figures.
    With `profile`, steps 6-15 run under torch.profiler and profile.txt is written.
    Data-parallel ranks all call this; rank 0 writes the run directory and evaluates, the
    others return an empty summary."""
    device = resolve_device(device)
    if config.target is None:
        raise ValueError("the config has no `target` section: `spdkit run` needs a bundled target")
    out = Path(out)
    if parallel.is_main:
        config = create_run_dir(config, out, target_path)
    else:
        config = with_architecture(config)
    return _decompose_into(out, config, device, progress, profile, parallel)


def with_architecture(config: SPDConfig) -> SPDConfig:
    """A Hugging Face target's config with its architecture recorded (`hf_config`): the run
    directory must rebuild the model on its own."""
    if config.target is None or config.target.kind != "hf" or config.target.hf_config is not None:
        return config
    from spdkit.targets.hf import read_hf_config

    hf_config = read_hf_config(config.target.path)
    return config.model_copy(
        update={"target": config.target.model_copy(update={"hf_config": hf_config})}
    )


def create_run_dir(config: SPDConfig, out: Path, target_path: Path | None = None) -> SPDConfig:
    """A new run directory holding the config (and a copy of a trained target to reuse):
    `spdkit resume` then runs it from the start. Returns the config as saved."""
    config = with_architecture(config)
    prepare_run_dir(out)
    if target_path is not None:  # first: a target that cannot be read leaves no run to resume
        copy_target(target_path, out, config)
    runs.save_config(out, config)
    return config


def copy_target(source: Path, out: Path, config: SPDConfig) -> None:
    """The trained target of `source` (a run directory or .safetensors) saved into run `out`."""
    target, info = runs.load_target(source, config.target)
    runs.save_target(out, target, config.target, {**info, "loaded_from": str(source)})


def resume_run(
    run_dir: Path, device: str = "cpu", progress: bool = True, parallel: Parallel = SINGLE
) -> dict[str, Any]:
    """Continue a killed or interrupted run from its last checkpoint, then finish it (at any
    world size: see docs/distributed.md for what changes with it).

    A run killed before its target was saved trains the target again (same seed, same target).
    """
    device = resolve_device(device)
    run_dir = Path(run_dir)
    config = runs.load_run_config(run_dir)
    if config.target is None:
        raise RunDirError(f"{run_dir}: `spdkit resume` needs a bundled target in config.yaml")
    return _decompose_into(run_dir, config, device, progress, parallel=parallel)


def _decompose_into(
    run_dir: Path,
    config: SPDConfig,
    device: str,
    progress: bool,
    profile: bool = False,
    parallel: Parallel = SINGLE,
) -> dict:
    """Target (saved one, else trained and saved), then training from the last checkpoint.
    Data-parallel: rank 0 trains or loads the target, the others then read the saved one."""
    ckpt = run_dir / runs.CHECKPOINT
    if parallel.is_main:
        target = _target_of(run_dir, config, device, progress)
    parallel.barrier()
    if not parallel.is_main:
        target, _ = runs.load_target(run_dir, config.target)
    if config.training.candidates > 1 and not ckpt.exists():
        if parallel.active:
            raise ConfigError(
                "training.candidates > 1 runs in one process: drop --nproc, or set "
                "training.candidates=1"
            )
        select_start(run_dir, target, config, device, progress)
    trainer = build_trainer(target, data_source(config, progress), config, device, parallel)
    if ckpt.exists():
        tensors, meta = runs.load_tensors(ckpt)
        try:
            trainer.load_state(tensors, meta)
        except CheckpointError as err:
            raise RunDirError(f"{ckpt}: {err}") from None
        log.info("resuming %s from step %d", run_dir, trainer.step)
    log.info(
        "planning: probing a training step and the evaluation at a few batch sizes "
        "(memory and time; a minute or more on a large model)"
    )
    plan = make_plan(trainer)
    check_fits(plan)  # a run that will not fit stops here, not at step 0 by the OOM killer
    if plan.peak_bytes is not None:
        log.info(
            "memory plan: peak %.2f GiB (training), %.2f GiB (evaluation); %.2f GiB available%s",
            plan.peak_bytes / GIB,
            (plan.eval_peak_bytes or 0) / GIB,
            (plan.available or 0) / GIB,
            f"; {plan_time(plan)}" if plan.train_seconds is not None else "",
        )
    if parallel.is_main:
        runs.truncate_metrics(run_dir, trainer.step)
    on_step = StepProfiler(run_dir) if profile and parallel.is_main else None
    return _train_and_finish(trainer, run_dir, progress, on_step)


def _target_of(run_dir: Path, config: SPDConfig, device: str, progress: bool):  # noqa: ANN202
    """The run's saved target, else the target trained now and saved."""
    ckpt = run_dir / runs.CHECKPOINT
    if runs.has_target(run_dir):
        target, _ = runs.load_target(run_dir, config.target)
    elif ckpt.exists():
        # the checkpoint was trained against the saved target; retraining it on another
        # machine or torch build could give a different one, silently
        raise RunDirError(
            f"{run_dir / 'target.safetensors'} is missing but {ckpt} exists: restore the "
            "target file the run was trained against, or start a new run"
        )
    else:
        t0 = time.perf_counter()
        kind = target_kind(config.target)
        target, info = kind.train(config.target, config.seed, device, progress=progress)
        info["train_seconds"] = round(time.perf_counter() - t0, 2)
        if runs.is_referenced(config.target):
            log.info("hashing the model's weight files (target.json refers to them)")
        else:
            log.info("saving the target into %s", run_dir / "target.safetensors")
        runs.save_target(run_dir, target, config.target, info)
    return target


def _train_and_finish(
    trainer: Trainer, run_dir: Path, progress: bool, on_step: Callable | None = None
) -> dict[str, Any]:
    t0 = time.perf_counter()
    start_step = trainer.step
    main = trainer.parallel.is_main
    tracker = open_tracker(trainer.config, run_dir if main else None, start_step)
    try:
        train_in_run_dir(trainer, run_dir, progress, on_step, on_metrics=tracker.log)
        finish(trainer.parallel)
        if not main:
            return {}
        summary = _evaluate_finished(trainer, run_dir, t0, start_step, progress)
        figures = sorted((run_dir / "figures").glob("*.png"))
        tracker.finish(trainer.step, summary, figures)
        return summary
    finally:
        tracker.close()


def _evaluate_finished(
    trainer: Trainer, run_dir: Path, t0: float, start_step: int, progress: bool
) -> dict[str, Any]:
    seconds = time.perf_counter() - t0
    decomp = Decomposition(trainer.model, trainer.config, run_dir)
    timing = {
        "train_seconds": round(seconds, 2),
        "steps_this_session": trainer.step - start_step,
        "ms_per_step": round(1000 * seconds / max(1, trainer.step - start_step), 3),
        "device": trainer.device,
    }
    if trainer.step == start_step:  # a finished run resumed: re-evaluated, timing kept
        log.info("%s: already finished; evaluating it again", run_dir)
        timing = runs.read_summary(run_dir).get("timing") or timing
    return evaluate(decomp, run_dir, timing, progress=progress)


def plan_config(config: SPDConfig, device: str = "cpu") -> Plan:
    """`spdkit plan`: the plan of a config's run, on its target built untrained (the same
    shapes and memory as the trained one; nothing is trained or read but a model directory)."""
    device = resolve_device(device)
    if config.target is None:
        raise ConfigError("the config names no target to plan for")
    kind = target_kind(config.target)
    if kind.loaded:
        target, _ = kind.train(config.target, config.seed, device)  # loaded, not trained
    else:
        target = kind.build(config.target).to(device)
    return make_plan(build_trainer(target, data_source(config), config, device))


def with_eval_overrides(
    decomp: Decomposition, run_dir: Path, overrides: dict[str, Any] | None
) -> Decomposition:
    """The decomposition with `eval.*` overrides applied to its config (`spdkit eval --set`):
    only how it is evaluated may change, not what was trained."""
    if not overrides:
        return decomp
    other = sorted(k for k in overrides if not k.startswith("eval."))
    if other:
        raise ConfigError(
            f"spdkit eval --set changes the evaluation only (eval.*), not {', '.join(other)}"
        )
    config = load_config(Path(run_dir) / "config.yaml", overrides)
    decomp.config = decomp.config.model_copy(update={"eval": config.eval})
    return decomp


def evaluate_run_dir(
    run_dir: Path, device: str = "cpu", overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`spdkit eval`: recompute the summary and figures of a finished run."""
    decomp = with_eval_overrides(load(run_dir, resolve_device(device)), run_dir, overrides)
    previous = decomp.summary.get("timing")
    summary = evaluate(decomp, Path(run_dir), previous)
    if overrides:  # summary.json says how it differs from config.yaml's evaluation
        summary["eval_overrides"] = overrides
        runs.write_summary(Path(run_dir), summary)
    return summary


PARTIAL_DIR = "partial"


def evaluate_checkpoint(
    run_dir: Path, device: str = "cpu", overrides: dict[str, Any] | None = None
) -> tuple[dict[str, Any], Path]:
    """`spdkit eval --checkpoint`: the end-of-run metrics and figures of an unfinished run, at
    its last checkpoint, into `<run_dir>/partial/step_<N>/` (the run's own summary.json and
    figures/ are left alone: they describe finished runs only). Returns (summary, out_dir)."""
    decomp, step = load_checkpoint(run_dir, device)
    decomp = with_eval_overrides(decomp, run_dir, overrides)
    out_dir = Path(run_dir) / PARTIAL_DIR / f"step_{step}"
    partial = {"step": step, "steps": decomp.config.training.steps}
    if overrides:
        partial["eval_overrides"] = overrides
    return evaluate(decomp, Path(run_dir), out_dir=out_dir, partial=partial), out_dir


def load_checkpoint(run_dir: Path, device: str = "cpu") -> tuple[Decomposition, int]:
    """The decomposition of an unfinished run at its last checkpoint, and that step."""
    model, config, step = restore(Path(run_dir), resolve_device(device), checkpoint=True)
    return Decomposition(model, config, Path(run_dir)), step
