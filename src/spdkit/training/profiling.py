"""Where a training step's time goes: FLOPs per step, this machine's matmul peak, and a
torch.profiler summary of real steps (`spdkit run --profile`, `benchmarks/bench_step.py`)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from spdkit.config import SPDConfig
from spdkit.store import runs
from spdkit.training.trainer import Trainer


def matmul_peak_gflops(
    dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 8
) -> float:
    """Best-of-`repeats` GFLOP/s of an n×n×n matmul with the current thread count: the
    practical ceiling that a step's matmuls can approach on this machine."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up (and oneDNN kernel selection for bf16)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def fused_ci_flops(trainer: Trainer, rows: int, backward: bool = True) -> float:
    """The fused CI kernel's matmul-like work on `rows` positions, which FlopCounterMode cannot
    see: per element of [rows, C, d_gate] one multiply-add in and one out (4 FLOPs) forward,
    twice that backward. 0 when the kernel is not the backend in use."""
    if trainer.ci_backend != "fused":
        return 0.0
    model, d_gate = trainer.model, ci_hidden_dim(trainer.config)
    per_element = 12.0 if backward else 4.0
    return sum(per_element * rows * model.components(n).C * d_gate for n in model.module_names)


def step_flops(trainer: Trainer) -> dict[str, float]:
    """FLOPs of one training step (forward + backward), counted op by op on a real step.

    Matmuls (mm/bmm/einsum, in forward and backward) are counted by torch's FlopCounterMode;
    the fused CI kernel's from its shapes (`fused_ci_flops`). Elementwise work (GELU,
    sigmoids, masks) is not counted: FLOP/s here is matmul throughput, comparable with the
    matmul peak. `spdkit plan` counts the same way.
    """
    with FlopCounterMode(display=False) as counter:
        trainer.train_step()
    total = float(counter.get_total_flops())
    rows = trainer.config.training.batch_size * positions_per_sample(trainer.config)
    ci = fused_ci_flops(trainer, rows)
    return {"counted": total, "ci_fused": ci, "total": total + ci}


def positions_per_sample(config: SPDConfig) -> int:
    """Token positions per sample (a sequence target's seq_len; 1 otherwise): the rows a
    per-position computation (CI, masks) runs on, per sample."""
    return int(getattr(config.target, "seq_len", 1) or 1)


def ci_hidden_dim(config: SPDConfig) -> int:
    return int(getattr(config.ci_fn, "hidden_dim", 0))


def _activities(device: str) -> list:
    from torch.profiler import ProfilerActivity

    acts = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        acts.append(ProfilerActivity.CUDA)
    return acts


def profile_table(prof, device: str) -> str:
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    by_op = prof.key_averages().table(sort_by=sort, row_limit=20)
    by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=15)
    return f"== by op ==\n{by_op}\n== by op and input shape ==\n{by_shape}"


class StepProfiler:
    """Profiles `n_steps` real steps of a run from step `start` and writes profile.txt into
    the run directory. They are the run's ordinary steps: results do not change.

    Pass as `Trainer.run(on_step=...)`; it is called after every step.
    """

    def __init__(self, run_dir: Path, start: int = 5, n_steps: int = 10) -> None:
        self.run_dir, self.start, self.n_steps = run_dir, start, n_steps
        self._prof = None
        self._first = 0
        self._t0 = 0.0
        self.done = False

    def __call__(self, trainer: Trainer) -> None:
        from torch.profiler import profile

        last = trainer.config.training.steps
        if self.done:
            return
        if self._prof is None:
            if self.start <= trainer.step < last:
                self._prof = profile(activities=_activities(trainer.device), record_shapes=True)
                self._prof.start()
                self._first, self._t0 = trainer.step, time.perf_counter()
            return
        if trainer.step - self._first >= self.n_steps or trainer.step >= last:
            self._prof.stop()
            self.done = True
            n = trainer.step - self._first
            ms = 1000 * (time.perf_counter() - self._t0) / n
            head = (
                f"steps {self._first + 1}-{trainer.step}: {ms:.2f} ms/step under the profiler "
                f"(device {trainer.device}, threads {torch.get_num_threads()}, "
                f"CI backend {trainer.ci_backend}, batch {trainer.config.training.batch_size})\n\n"
            )
            text = head + profile_table(self._prof, trainer.device)
            runs.atomic_write_text(self.run_dir / "profile.txt", text)
