"""Experiment tracking (`--log tensorboard|wandb`): the curves, figures and summary read back
from what each library wrote; a resumed run continues the same tracked run."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from spdkit.cli import app
from spdkit.config import parse_config
from spdkit.training.tracking import open_tracker, tracked_id
from tests.helpers import tiny_config_file

runner = CliRunner()


def test_tensorboard_run_shows_the_curves_figures_and_summary(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config_file(tmp_path / "c.yaml", target_train_steps=200)
    out = tmp_path / "run"
    args = ["run", str(cfg), "--out", str(out), "--quiet", "--steps", "40", "--log", "tensorboard"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    steps = [e.step for e in events.Scalars("total")]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [m["step"] for m in metrics]
    assert [e.value for e in events.Scalars("total")] == pytest.approx(
        [m["total"] for m in metrics]
    )
    assert "figures/losses" in tags["images"] and "summary/mean_ci_l0/linear1" in tags["scalars"]


def test_wandb_offline_run_keeps_its_id_across_a_resume(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_config_file(tmp_path / "c.yaml", target_train_steps=200)
    out = tmp_path / "run"
    args = ["run", str(cfg), "--out", str(out), "--quiet", "--steps", "30", "--log", "wandb"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    run_id = json.loads((out / "tracking.json").read_text())["id"]
    (offline,) = (out / "wandb").glob(f"offline-run-*-{run_id}")
    history, summary = _read_wandb(offline / f"run-{run_id}.wandb")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [h for h in history if "total" in h]
    assert [h["_step"] for h in rows] == [m["step"] for m in metrics]
    assert [h["total"] for h in rows] == pytest.approx([m["total"] for m in metrics])
    saved = json.loads((out / "summary.json").read_text())
    assert summary["summary/mean_ci_l0/linear1"] == pytest.approx(saved["mean_ci_l0"]["linear1"])
    assert any(k.startswith("figures/losses/") for h in history for k in h)  # the image
    # a resumed run opens the same tracked run (same id), not a new one
    assert tracked_id(out, "wandb") == run_id
    config = parse_config(_yaml(out / "config.yaml"))
    tracker = open_tracker(config, out, start_step=30)
    assert tracker.run.id == run_id
    tracker.close()


def _read_wandb(path) -> tuple[list[dict], dict]:
    """History rows and the final summary of a W&B offline run file, read as W&B writes it:
    a 7-byte header (":W&B", magic, version), then LevelDB-log records (32 KiB blocks, each
    record a 7-byte header: CRC, length, type FULL/FIRST/MIDDLE/LAST) holding protobuf
    `Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if length == 0 and kind == 0:
            break
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    history, summary = [], {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            history.append({_key(i): json.loads(i.value_json) for i in r.history.item})
        elif r.WhichOneof("record_type") == "summary":
            summary.update({_key(i): json.loads(i.value_json) for i in r.summary.update})
    return history, summary


def _key(item) -> str:
    """A history / summary item's key: `key`, or its `nested_key` parts joined by /."""
    return item.key or "/".join(item.nested_key)


def _yaml(path):
    import yaml

    return yaml.safe_load(path.read_text())


def test_a_tracker_that_is_not_installed_is_one_line(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    cfg = tiny_config_file(tmp_path / "c.yaml", target_train_steps=50)
    args = [
        "run",
        str(cfg),
        "--out",
        str(tmp_path / "r"),
        "--quiet",
        "--steps",
        "4",
        "--log",
        "wandb",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "pip install" in result.output
    bad = runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "b"), "--log", "mlflow"])
    assert bad.exit_code == 2 and "tensorboard" in bad.output
