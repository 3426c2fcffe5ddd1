"""The run directory: a public contract other tools read (documented in the README).

    config.yaml              fully resolved SPDConfig
    target.safetensors       the target's state dict (`<module>.weight` = original weights)
    target.json              {"kind", "config", "info"}: how to rebuild the target
    components.safetensors   `<module>.U` [d_out, C], `<module>.V` [C, d_in], `<module>.ci.*`
    checkpoint/latest.safetensors   training state for `spdkit resume` (metadata: step, ...)
    metrics.jsonl            one JSON object per logged step
    summary.json             end-of-run metrics
    figures/*.png

Weights are only ever written as safetensors and loaded with safetensors (never unpickled).
Every file is written atomically: temp file, fsync, rename; a reader sees the old or the new.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import Tensor, nn

from spdkit.config import ConfigError, SPDConfig, TargetConfig, dump_config, parse_config
from spdkit.model import ComponentModel
from spdkit.targets import target_kind

CI_PARAMS = ("w_in", "b_in", "w_out", "b_out")


class RunDirError(ValueError):
    """A run directory (or target file) that is missing, corrupt or inconsistent."""


# --- atomic file writes ----------------------------------------------------------------------
def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_tensors(
    path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save(cpu, metadata=metadata))


def load_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; never unpickles."""
    if not path.is_file():
        raise RunDirError(f"missing file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, ValueError, OSError) as err:
        raise RunDirError(f"{path}: not a readable safetensors file ({err})") from None
    return tensors, meta


# --- the target ------------------------------------------------------------------------------
def target_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The target's own state dict, as before any of its modules were wrapped."""
    target = model.target if isinstance(model, ComponentModel) else model
    out = {}
    for key, value in target.state_dict().items():
        if ".components." in f".{key}":
            continue
        out[key.replace(".original.", ".").removeprefix("original.")] = value
    return out


def save_target(run_dir: Path, model: nn.Module, config: TargetConfig, info: dict) -> None:
    """target.json first: a run killed in between has no target.safetensors and retrains."""
    meta = {"kind": config.kind, "config": config.model_dump(mode="json"), "info": info}
    atomic_write_text(run_dir / "target.json", json.dumps(meta, indent=2))
    save_tensors(run_dir / "target.safetensors", target_state_dict(model))


def load_target(path: Path, config: TargetConfig) -> tuple[nn.Module, dict]:
    """Rebuild the target of `config` from a run directory or a target.safetensors file."""
    path = Path(path)
    st_path = path / "target.safetensors" if path.is_dir() else path
    json_path = st_path.with_name("target.json")
    if not st_path.is_file():
        raise RunDirError(f"target file not found: {st_path}")
    if not json_path.is_file():
        raise RunDirError(f"missing {json_path} (kind and constructor args of the target)")
    try:
        meta = json.loads(json_path.read_text())
    except json.JSONDecodeError as err:
        raise RunDirError(f"{json_path}: not valid JSON ({err})") from None
    saved = meta.get("config", {})
    if saved.get("kind") != config.kind:
        raise RunDirError(
            f"{st_path}: target kind {saved.get('kind')!r} does not match the config's "
            f"{config.kind!r}"
        )
    arch_keys = [k for k in target_kind(config).architecture if k in saved]
    mismatch = {
        k: (saved[k], getattr(config, k)) for k in arch_keys if saved[k] != getattr(config, k)
    }
    if mismatch:
        detail = ", ".join(f"{k}: file {a!r} vs config {b!r}" for k, (a, b) in mismatch.items())
        raise RunDirError(f"target {st_path} does not match the config's target ({detail})")
    model = target_kind(config).build(config)
    tensors, _ = load_tensors(st_path)
    load_state_checked(model, tensors, st_path)
    return model.eval(), meta.get("info", {})


def load_state_checked(model: nn.Module, tensors: dict[str, Tensor], path: Path) -> None:
    expected = model.state_dict()
    problems = [f"missing tensor {k!r}" for k in expected if k not in tensors]
    problems += [f"unexpected tensor {k!r}" for k in tensors if k not in expected]
    for k, v in tensors.items():
        if k in expected and v.shape != expected[k].shape:
            problems.append(f"{k!r} has shape {list(v.shape)}, expected {list(expected[k].shape)}")
        elif k in expected and v.dtype != expected[k].dtype:
            problems.append(f"{k!r} has dtype {v.dtype}, expected {expected[k].dtype}")
    if problems:
        raise RunDirError(f"{path}: " + "; ".join(problems))
    model.load_state_dict(tensors)


# --- components ------------------------------------------------------------------------------
def component_tensors(model: ComponentModel) -> dict[str, Tensor]:
    """`<module>.U`, `<module>.V` and `<module>.ci.<param>` for every decomposed module."""
    out: dict[str, Tensor] = {}
    for name in model.module_names:
        comps, ci = model.components(name), model.ci_fn(name)
        out[f"{name}.U"] = comps.U
        out[f"{name}.V"] = comps.V
        for p in CI_PARAMS:
            out[f"{name}.ci.{p}"] = getattr(ci, p)
    return out


def load_component_tensors(model: ComponentModel, tensors: dict[str, Tensor], path: Path) -> None:
    expected = component_tensors(model)
    problems = [f"missing tensor {k!r}" for k in expected if k not in tensors]
    problems += [
        f"{k!r} has shape {list(tensors[k].shape)}, expected {list(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if problems:
        raise RunDirError(f"{path}: " + "; ".join(problems))
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(tensors[k])


# --- config, metrics, summary ----------------------------------------------------------------
def save_config(run_dir: Path, config: SPDConfig) -> None:
    atomic_write_text(run_dir / "config.yaml", dump_config(config))


def load_run_config(run_dir: Path) -> SPDConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise RunDirError(f"not a run directory (no config.yaml): {run_dir}")
    try:
        data = yaml.safe_load(path.read_text())
        return parse_config(data)
    except (yaml.YAMLError, ConfigError) as err:
        raise RunDirError(f"{path}: invalid config: {err}") from None


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """One line per record; on resume, rows past the checkpoint step are dropped first."""
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [r for r in rows if _row_step(r) is not None and _row_step(r) <= last_step]
    atomic_write_text(path, "".join(r + "\n" for r in keep))


def _row_step(row: str) -> int | None:
    try:
        return int(json.loads(row)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a torn last line from a kill


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))


CHECKPOINT = Path("checkpoint") / "latest.safetensors"


def save_checkpoint(run_dir: Path, tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
    """The checkpoint is one safetensors file (tensors + metadata), replaced atomically, so it
    is always complete and self-consistent. latest.json mirrors its metadata for people; it is
    never read back."""
    save_tensors(run_dir / CHECKPOINT, tensors, meta)
    readable = {k: json.loads(v) if k == "param_groups" else v for k, v in meta.items()}
    atomic_write_text(run_dir / CHECKPOINT.with_suffix(".json"), json.dumps(readable, indent=2))
