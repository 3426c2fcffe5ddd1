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
A damaged file is reported by name with what is wrong (missing, empty, truncated, not valid
...); a failed write (disk full, no permission) names the file and leaves the old one intact.
"""

from __future__ import annotations

import json
import logging
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
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors format's own limit on the JSON header

log = logging.getLogger(__name__)


class RunDirError(ValueError):
    """A run directory (or target file) that is missing, corrupt or inconsistent."""


class RunWriteError(OSError):
    """A run file could not be written (disk full, no permission, ...).

    An OSError (with the original errno), so callers that handle OS errors still do; its
    message is one line naming the file and the OS's reason, which the bare OSError of a failed
    write does not (`[Errno 28] No space left on device`, no file).
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno

    @classmethod
    def of(cls, path: Path, err: OSError) -> RunWriteError:
        return cls(f"cannot write {path}: {(err.strerror or str(err)).lower()}", err.errno)


# --- atomic file writes ----------------------------------------------------------------------
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, rename over it, fsync the directory: a reader
    (or a resume after a crash) sees the old file or the new one, never a mix. If any step
    fails (disk full, no permission) the temp file is removed and the old file is untouched."""
    try:
        _replace_with(path, data)
    except OSError as err:
        raise RunWriteError.of(path, err) from err


def _replace_with(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a run dir is for sharing
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _write_all(fd: int, data: bytes) -> None:
    """Unbuffered, so a failed write (ENOSPC) raises here and not later in a close()."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


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
    except OSError as err:
        raise RunDirError(f"{path}: cannot read ({err.strerror or err})") from None
    except (SafetensorError, ValueError) as err:
        raise RunDirError(f"{path}: {safetensors_problem(path, err)}") from None
    return tensors, meta


def safetensors_problem(path: Path, err: Exception) -> str:
    """What is wrong with a file safetensors refused: the library's messages ("invalid header
    length") do not tell a user that the file is merely cut short, or is a pickle."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n_header = int.from_bytes(head, "little") if len(head) == 8 else 0
        plausible = 0 < n_header <= SAFETENSORS_MAX_HEADER
        header = f.read(n_header) if plausible else b""
    if size == 0:
        return "empty file"
    if head[:1] == b"\x80" or head[:2] == b"PK":
        return "a pickle / torch.save file, not safetensors (refused: spdkit never unpickles)"
    if size < 8 or (plausible and size < 8 + n_header):
        return f"truncated ({size} bytes; its header alone needs {8 + n_header})"
    needed = _safetensors_size(header, n_header)
    if needed is not None and size < needed:
        return f"truncated ({size} bytes; its tensors need {needed})"
    return f"not a valid safetensors file ({err})"


def _safetensors_size(header: bytes, n_header: int) -> int | None:
    """The file size a safetensors header promises, or None if the header is not readable."""
    try:
        entries = json.loads(header)
        ends = [v["data_offsets"][1] for k, v in entries.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None
    return 8 + n_header + max(ends, default=0)


def read_text(path: Path) -> str:
    """A run directory's text file; bytes that are not UTF-8 are a RunDirError naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RunDirError(
            f"{path}: not valid UTF-8 text (bad byte at offset {err.start})"
        ) from None


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding one object, or a RunDirError saying why not."""
    text = read_text(path)
    if not text.strip():
        raise RunDirError(f"{path}: empty file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise RunDirError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: not a JSON object (got {type(data).__name__})")
    return data


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
    text = read_text(path)
    if not text.strip():
        raise RunDirError(f"{path}: empty file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RunDirError(f"{path}: not valid YAML ({_yaml_problem(err)})") from None
    try:
        return parse_config(data)
    except ConfigError as err:
        raise RunDirError(f"{path}: invalid config: {err}") from None


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
