"""Experiment tracking (`training.track`, `spdkit run --log wandb|tensorboard`): metrics as they
are logged, then the figures and the summary, sent to W&B or TensorBoard.

The run directory stays the record (metrics.jsonl, summary.json, figures/); a tracker is a
copy for watching long runs. A resumed run continues the same tracked run: W&B through the
run id kept in RUN_DIR/tracking.json (`resume="allow"`), TensorBoard through the same log
directory (RUN_DIR/tensorboard/) with the events after the checkpoint's step purged, as
metrics.jsonl drops its rows past the checkpoint. W&B's offline mode (WANDB_MODE=offline)
works as W&B documents it: the run is written under RUN_DIR/wandb/ for `wandb sync`.
Both libraries are optional (`pip install -c constraints.txt -e '.[track]'`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from spdkit import files
from spdkit.config import SPDConfig, dump_config
from spdkit.errors import ConfigError
from spdkit.store import atomic

TRACKING_FILE = "tracking.json"


class Tracker(Protocol):
    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def finish(self, step: int, summary: Mapping[str, Any], figures: list[Path]) -> None: ...

    def close(self) -> None: ...


class NoTracker:
    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def finish(self, step: int, summary: Mapping[str, Any], figures: list[Path]) -> None:
        pass

    def close(self) -> None:
        pass


def scalars(summary: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """The summary's numbers as (slash/joined/key, value); lists and strings are skipped."""
    for k, v in summary.items():
        name = f"{prefix}{k}"
        if isinstance(v, int | float):  # bool included
            yield name, float(v)
        elif isinstance(v, Mapping):
            yield from scalars(v, name + "/")


class TensorBoardTracker:
    """Events in RUN_DIR/tensorboard/: a scalar per metric, the figures as images, the
    summary's numbers under summary/ at the last step and the whole summary as text."""

    def __init__(self, run_dir: Path, start_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "training.track: tensorboard needs the tensorboard package: "
                "pip install -c constraints.txt -e '.[track]'"
            ) from None
        log_dir = run_dir / "tensorboard"
        self.writer = SummaryWriter(str(log_dir), purge_step=start_step or None)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def finish(self, step: int, summary: Mapping[str, Any], figures: list[Path]) -> None:
        from matplotlib.image import imread

        for k, v in scalars(summary):
            self.writer.add_scalar(f"summary/{k}", v, step)
        self.writer.add_text(
            "summary", "```\n" + json.dumps(summary, indent=1)[:60000] + "\n```", step
        )
        for path in figures:
            image = imread(path)[..., :3]  # RGBA PNG -> RGB floats in [0, 1]
            self.writer.add_image(f"figures/{path.stem}", image, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run with the id kept in RUN_DIR/tracking.json (resumed, not duplicated), the
    resolved config, a history row per logged step, the figures and the summary."""

    def __init__(self, run_dir: Path, config: SPDConfig) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "training.track: wandb needs the wandb package: "
                "pip install -c constraints.txt -e '.[track]'"
            ) from None
        self.wandb = wandb
        run_id = tracked_id(run_dir, "wandb")
        self.run = wandb.init(
            project=config.training.track_project,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            name=run_dir.name,
            config={"spdkit": dump_config(config)},
            settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def finish(self, step: int, summary: Mapping[str, Any], figures: list[Path]) -> None:
        images = {f"figures/{p.stem}": self.wandb.Image(str(p)) for p in figures}
        if images:
            self.run.log(images, step=step)
        for k, v in scalars(summary):
            self.run.summary[f"summary/{k}"] = v

    def close(self) -> None:
        self.run.finish()


def tracked_id(run_dir: Path, kind: str) -> str:
    """The tracked run's id, created once and kept in RUN_DIR/tracking.json."""
    path = run_dir / TRACKING_FILE
    if path.is_file():
        data = atomic.read_json_object(path)
        if data.get("kind") == kind and isinstance(data.get("id"), str):
            return data["id"]
    run_id = uuid.uuid4().hex[:12]
    files.atomic_write_text(path, json.dumps({"kind": kind, "id": run_id}) + "\n")
    return run_id


def open_tracker(config: SPDConfig, run_dir: Path | None, start_step: int) -> Tracker:
    """The tracker `training.track` names (none without a run directory)."""
    kind = config.training.track
    if kind == "none" or run_dir is None:
        return NoTracker()
    if kind == "tensorboard":
        return TensorBoardTracker(run_dir, start_step)
    return WandbTracker(run_dir, config)
