"""glibc malloc settings for training loops: reuse freed memory instead of returning it.

An SPD step allocates and frees the same large tensors (activations of several passes) every
step. With glibc's defaults a freed block at the top of the heap is trimmed back to the OS and
a large one lives in its own mmap, so the next step faults every page in again and the kernel
zeroes it, several milliseconds of system time per step on the toy models (figures in
docs/benchmarks.md). The freed memory stays with the process for reuse.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def keep_freed_memory(trim_threshold: int = 1 << 30, mmap_threshold: int = 1 << 25) -> bool:
    """Trim the heap only when 1 GiB is free at its top, and serve blocks up to 32 MiB (glibc's
    largest allowed mmap threshold) from the heap. Process-wide, so applications call it (the
    command line and the benchmarks do), not the library; False where it does not apply."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows)
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, trim_threshold)) and bool(
        mallopt(M_MMAP_THRESHOLD, mmap_threshold)
    )


def release_free_memory() -> bool:
    """Give the heap's free memory back to the OS now (glibc malloc_trim): afterwards RSS
    counts live memory only, which is what a memory probe must start from. False where it
    does not apply."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):
        return False
    return bool(trim(0)) or True
