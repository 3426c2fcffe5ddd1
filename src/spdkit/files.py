"""Files that survive a kill: write to a temp file beside the target, fsync, rename over it.
The bottom layer (figures draw their PNGs through it); `spdkit.store.atomic` builds the run
directory's safetensors and readers on it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from spdkit.errors import RunWriteError

__all__ = ["UMASK", "atomic_copy", "atomic_write_bytes", "atomic_write_text"]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, rename over it, fsync the directory: a reader
    (or a resume after a crash) sees the old file or the new one, never a mix. If any step
    fails (disk full, no permission) the temp file is removed and the old file is untouched."""
    try:
        _replace_with(path, lambda fd: _write_all(fd, data))
    except OSError as err:
        raise RunWriteError.of(path, err) from err


def atomic_copy(src: Path, dst: Path) -> None:
    """`src` copied to `dst` as `atomic_write_bytes` writes: a kill mid-copy leaves the old
    `dst` (or none), never a truncated one. Streamed, so a large safetensors file is not held
    in memory whole."""
    try:
        with open(src, "rb") as source:
            _replace_with(dst, lambda fd: _copy_into(source, fd))
    except OSError as err:
        raise RunWriteError.of(dst, err) from err


def _copy_into(source: BinaryIO, fd: int, chunk: int = 1 << 22) -> None:
    while block := source.read(chunk):
        _write_all(fd, block)


def _replace_with(path: Path, write: Callable[[int], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp makes 0600; a run dir is for sharing
            write(fd)
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


UMASK = _current_umask()


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """Unbuffered, so a failed write (ENOSPC) raises here and not later in a close()."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
