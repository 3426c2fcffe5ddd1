"""What this process and this machine have in memory: resident size, its peak, and what a new
allocation can still get (Linux /proc; None elsewhere). The memory plan and the evaluation's
choices read them."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch


def status_kib(field: str) -> int | None:
    """A field of /proc/self/status (VmRSS, VmHWM) in KiB; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Set the peak RSS (VmHWM) to the current RSS; False where the OS cannot (not Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return status_kib("VmHWM") is not None


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (what a new allocation can get without swapping)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def available_bytes_on(device: torch.device) -> int | None:
    """Free memory where tensors on `device` live: the GPU's (cudaMemGetInfo) for CUDA, else
    the host's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return available_bytes()


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor reachable in obj (tensors, mappings, sequences, dataclasses'
    fields), each storage counted once."""
    seen: set[int] = set()
    total = 0

    def walk(x: Any) -> None:
        nonlocal total
        if isinstance(x, torch.Tensor):
            key = x.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += x.untyped_storage().nbytes()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list | tuple):
            for v in x:
                walk(v)
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            for f in dataclasses.fields(x):
                walk(getattr(x, f.name))

    walk(obj)
    return total
