"""The run directory: a public contract other tools read (documented in the README).

    config.yaml              fully resolved SPDConfig
    target.safetensors       the target's state dict (`<module>.weight` = original weights)
    target.json              {"kind", "config", "info"}: how to rebuild the target
    components.safetensors   `<module>.U` [d_out, C], `<module>.V` [C, d_in], `<module>.ci.*`
    checkpoint/latest.safetensors   training state for `spdkit resume` (metadata: step, ...)
    metrics.jsonl            one JSON object per logged step
    summary.json             end-of-run metrics
    figures/*.png

Weights are only ever written as safetensors and loaded with safetensors (never unpickled);
the file primitives are in `spdkit.store.atomic`.
Every file is written atomically: temp file, fsync, rename; a reader sees the old or the new.
A damaged file is reported by name with what is wrong (missing, empty, truncated, not valid
...); a failed write (disk full, no permission) names the file and leaves the old one intact.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from spdkit.config import ConfigError, SPDConfig, TargetConfig, dump_config, parse_config
from spdkit.errors import RunDirError, RunWriteError  # re-exported as runs.<name>
from spdkit.files import atomic_write_text
from spdkit.method.model import ComponentModel
from spdkit.store.atomic import (  # re-exported: callers use runs.<name> for run-directory files
    load_tensors,
    read_json_object,
    read_nonempty_text,
    save_tensors,
)
from spdkit.targets import hf, target_kind

log = logging.getLogger(__name__)


# --- the target ------------------------------------------------------------------------------
def target_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The target's own state dict (spdkit never wraps or renames its modules)."""
    target = model.target if isinstance(model, ComponentModel) else model
    return dict(target.state_dict())


def save_target(run_dir: Path, model: nn.Module, config: TargetConfig, info: dict) -> None:
    """target.json first: a run killed in between has no target.safetensors and retrains.
    A Hugging Face target without `copy_weights` is referenced: target.json only, with the
    content hash of the weight files it loads from."""
    meta = {"kind": config.kind, "config": config.model_dump(mode="json"), "info": info}
    if is_referenced(config):
        from spdkit.targets import hf

        meta.update(weights="referenced", content_hash=hf.weights_hash(config.path))
        atomic_write_text(run_dir / "target.json", json.dumps(meta, indent=2))
        return
    atomic_write_text(run_dir / "target.json", json.dumps(meta, indent=2))
    save_tensors(run_dir / "target.safetensors", target_state_dict(model))


def is_referenced(config: TargetConfig | None) -> bool:
    """Are this target's weights referenced (a Hugging Face model not copied) rather than
    stored in target.safetensors?"""
    return config is not None and config.kind == "hf" and not config.copy_weights


def has_target(run_dir: Path) -> bool:
    """Does the run directory hold its target: target.safetensors, or a target.json that
    references the weights?"""
    run_dir = Path(run_dir)
    if (run_dir / "target.safetensors").is_file():
        return True
    json_path = run_dir / "target.json"
    return json_path.is_file() and read_json_object(json_path).get("weights") == "referenced"


def load_target(path: Path, config: TargetConfig) -> tuple[nn.Module, dict]:
    """Rebuild the target of `config` from a run directory or a target.safetensors file."""
    path = Path(path)
    st_path = path / "target.safetensors" if path.is_dir() else path
    json_path = st_path.with_name("target.json")
    if not st_path.is_file() and json_path.is_file() and config.kind == "hf":
        meta = read_json_object(json_path)
        if meta.get("weights") == "referenced":  # weights named by path and content hash
            model = _referenced_hf_target(config, json_path, meta.get("content_hash"))
            return model, meta.get("info", {})
    if not st_path.is_file():
        raise RunDirError(f"target file not found: {st_path}")
    if not json_path.is_file():
        raise RunDirError(f"missing {json_path} (kind and constructor args of the target)")
    meta = read_json_object(json_path)
    saved = meta.get("config")
    if not isinstance(saved, dict):
        raise RunDirError(f"{json_path}: no `config` object (the target's constructor args)")
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


def _referenced_hf_target(
    config: TargetConfig, json_path: Path, content_hash: str | None
) -> nn.Module:
    """The target whose weights stay where they came from (`target.path`: a Hub id in the
    local cache or a folder), checked against the content hash and the architecture the run
    recorded: a changed or moved model is one line, never a silent other model."""
    from spdkit.targets import hf

    try:
        found_hash = hf.weights_hash(config.path) if content_hash else None
    except (OSError, ValueError) as err:
        raise RunDirError(
            f"{json_path}: the run's model ({config.path}) cannot be read: {err}; restore it "
            "there, or rerun with target.copy_weights=true to keep the weights in the run"
        ) from None
    if content_hash and found_hash != content_hash:
        raise RunDirError(
            f"{json_path}: the weights at {config.path} changed since the run (content hash "
            f"{found_hash[:12]}, recorded {content_hash[:12]}): point target.path at the "
            "original model"
        )
    model = hf.load_hf_model(config.path)
    found = hf.read_hf_config(config.path)
    recorded = config.hf_config or {}
    differ = [k for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
              if k in recorded and recorded.get(k) != found.get(k)]  # fmt: skip
    if differ:
        raise RunDirError(
            f"{json_path}: the target at {config.path} is not the one decomposed "
            f"({', '.join(f'{k}: {recorded[k]} vs {found.get(k)}' for k in differ)})"
        )
    return model


def check_tensors(expected: dict[str, Tensor], tensors: dict[str, Tensor], path: Path) -> None:
    """Every inconsistency between a file's tensors and what the config builds, in one error;
    loading would otherwise fail later and vaguely, or (a dtype) silently convert."""
    problems = [f"missing tensor {k!r}" for k in expected if k not in tensors]
    problems += [f"unexpected tensor {k!r}" for k in tensors if k not in expected]
    for k, v in tensors.items():
        if k in expected and v.shape != expected[k].shape:
            problems.append(f"{k!r} has shape {list(v.shape)}, expected {list(expected[k].shape)}")
        elif k in expected and v.dtype != expected[k].dtype:
            problems.append(f"{k!r} has dtype {v.dtype}, expected {expected[k].dtype}")
    if problems:
        raise RunDirError(f"{path}: " + "; ".join(problems))


def load_state_checked(model: nn.Module, tensors: dict[str, Tensor], path: Path) -> None:
    check_tensors(model.state_dict(), tensors, path)
    model.load_state_dict(tensors)


# --- components ------------------------------------------------------------------------------
def component_tensors(model: ComponentModel) -> dict[str, Tensor]:
    """`<module>.U`, `<module>.V` for every decomposed module, then the CI function's tensors
    under their run-directory names (`spdkit.method.ci`: `<module>.ci.*` or `ci.*`, by kind)."""
    out: dict[str, Tensor] = {}
    for name in model.module_names:
        comps = model.components(name)
        out[f"{name}.U"] = comps.U
        out[f"{name}.V"] = comps.V
    return {**out, **model.ci.tensors()}


def load_component_tensors(model: ComponentModel, tensors: dict[str, Tensor], path: Path) -> None:
    expected = component_tensors(model)
    check_tensors(expected, tensors, path)
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
    text = read_nonempty_text(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RunDirError(f"{path}: not valid YAML ({_yaml_problem(err)})") from None
    try:
        return parse_config(data)
    except ConfigError as err:  # one line: a damaged file can have many problems
        problems = "; ".join(str(err).splitlines())
        raise RunDirError(f"{path}: invalid config (damaged or edited?): {problems}") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's message spans several lines with a caret; the CLI prints one line."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """One line per record; on resume, rows past the checkpoint step are dropped first."""
    path = run_dir / "metrics.jsonl"
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:
        raise RunWriteError.of(path, err) from err


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Drop the metric rows after `last_step` (the checkpoint a resume continues from), and a
    torn last line: the resumed run logs those steps again, so each step appears once."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    rows = [line for line in _read_log(path).splitlines() if line.strip()]
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
    for line in _read_log(path).splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _read_log(path: Path) -> str:
    """metrics.jsonl is a log, not state: damaged lines (a torn write, stray bytes) become
    unparsable rows that readers skip, instead of making the whole run unreadable."""
    return path.read_text(encoding="utf-8", errors="replace")


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))


def read_summary(run_dir: Path) -> dict[str, Any]:
    """summary.json, or {} if it is missing or damaged: it is an output that `spdkit eval`
    recomputes, so a bad one must not stop the run from being loaded."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return {}
    try:
        return read_json_object(path)
    except RunDirError as err:
        log.warning("ignoring %s", err)
        return {}


CHECKPOINT = Path("checkpoint") / "latest.safetensors"


def save_checkpoint(run_dir: Path, tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
    """The checkpoint is one safetensors file (tensors + metadata), replaced atomically, so it
    is always complete and self-consistent. latest.json mirrors its metadata for people; it is
    never read back. A failed write leaves the last complete checkpoint in place, and the error
    says so: the user should fix the cause and resume, not start again."""
    try:
        save_tensors(run_dir / CHECKPOINT, tensors, meta)
    except RunWriteError as err:
        hint = f"the last complete checkpoint is kept; once fixed, `spdkit resume {run_dir}`"
        raise RunWriteError(f"{err}; {hint}", err.errno) from err
    readable = {k: json.loads(v) if k == "param_groups" else v for k, v in meta.items()}
    atomic_write_text(run_dir / CHECKPOINT.with_suffix(".json"), json.dumps(readable, indent=2))


def read_firing(run_dir: Path) -> tuple[dict[str, Tensor], int] | None:
    """Per-module firing counts [C] over the last 10% of training and the number of positions
    they were counted over, from the final checkpoint; None if there is no usable checkpoint
    (the counts only describe the run, so their absence must not stop an evaluation)."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        return None
    try:
        tensors, meta = load_tensors(path)
    except RunDirError as err:
        log.warning("no firing counts: %s", err)
        return None
    counts = {k.removeprefix("firing."): v for k, v in tensors.items() if k.startswith("firing.")}
    if not counts or "firing_positions" not in meta:
        return None
    return counts, int(meta["firing_positions"])


def checkpoint_parameter_problems(
    params: list[nn.Parameter], tensors: dict[str, Tensor]
) -> list[str]:
    """What keeps a checkpoint's `param.<i>` tensors (`ComponentModel.trainable_parameters()`
    order) from restoring `params`: each missing or mis-shaped one, named; [] when they fit."""
    problems = []
    for i, p in enumerate(params):
        saved = tensors.get(f"param.{i}")
        if saved is None:
            problems.append(f"missing param.{i}")
        elif saved.shape != p.shape:
            problems.append(f"param.{i} has shape {list(saved.shape)}, expected {list(p.shape)}")
    return problems


def copy_checkpoint_parameters(params: list[nn.Parameter], tensors: dict[str, Tensor]) -> None:
    """params ← the checkpoint's `param.<i>` (checked first: `checkpoint_parameter_problems`)."""
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"param.{i}"])


def local_folder(path: str | Path) -> Path:
    """A run directory or export folder: `path` itself, or for a Hub id `org/name[@rev]` its
    snapshot in the local Hugging Face cache (`spdkit export` folders pushed to the Hub)."""
    local = Path(path)
    if local.exists() or "/" not in str(path) or str(path).startswith((".", "/", "~")):
        return local
    try:
        return hf.model_dir(str(path))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: no such run directory, and {err}") from None
    except ImportError:
        raise FileNotFoundError(
            f"{path}: no such run directory (a Hub id needs huggingface_hub: the [hf] extra)"
        ) from None
