"""Files that survive a kill and errors that name the file: atomic writes, safetensors
loading that never unpickles, and readers whose failures say what is wrong with the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import Tensor

from spdkit.errors import RunDirError
from spdkit.files import atomic_write_bytes  # the write half, one layer down

SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors format's own limit on the JSON header


def save_tensors(
    path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    atomic_write_bytes(path, st_save(unshared_cpu(tensors), metadata=metadata))


def unshared_cpu(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The tensors on the CPU, contiguous, no two sharing storage (safetensors refuses shared
    ones, e.g. tied weights): a tensor is copied only when it must be. Copying every tensor
    made a checkpoint's save hold three times its size (the copies, then the file's bytes)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, value in tensors.items():
        v = value.detach().to("cpu").contiguous()
        storage = v.untyped_storage().data_ptr()
        if storage in seen:
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        out[name] = v
    return out


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


def read_nonempty_text(path: Path) -> str:
    """`read_text`, and an empty (or all-blank) file is a RunDirError too."""
    text = read_text(path)
    if not text.strip():
        raise RunDirError(f"{path}: empty file")
    return text


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding one object, or a RunDirError saying why not."""
    text = read_nonempty_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise RunDirError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: not a JSON object (got {type(data).__name__})")
    return data
