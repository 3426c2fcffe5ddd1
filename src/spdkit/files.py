"""Files that survive a kill: write to a temp file beside the target, fsync, rename over it.
The bottom layer (figures draw their PNGs through it); `spdkit.store.atomic` builds the run
directory's safetensors and readers on it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from spdkit.errors import RunWriteError

__all__ = ["atomic_write_bytes", "atomic_write_text"]


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
