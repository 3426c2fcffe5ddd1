"""Milliseconds per SPD training step for bundled configs (a benchmark, not a test).

    python benchmarks/bench_step.py [--configs tms_5-2 resid_mlp1] [--steps 30] [--threads 2]
        [--ci-backend auto|eager|compiled|fused] [--device cpu|cuda] [--json out.json]
        [--set key=value ...]   # config overrides, e.g. --set per_pass_backward=false
        [--reference]           # also time the plain implementation (spdkit.method.reference)

For each config: median / min / max ms per step over `--steps` timed steps after `--warmup`
steps; FLOPs of one step (matmuls counted op by op by torch's FlopCounterMode, forward and
backward, plus the fused CI kernel's multiply-adds from its shapes; see
`spdkit.training.profiling.step_flops`); achieved GFLOP/s; that as a fraction of this machine's matmul
peak, measured in the same run (best of a few 2048³ matmuls, fp32 and bf16, same threads);
peak RSS; and one forward + backward of the target itself on the same batch (its weights
made trainable for that, a mean-square loss on its output), timed in the same process, with
the SPD step as a multiple of it. The target is built untrained: step time does not depend
on its weights.
With --reference, the plain implementation of the same step (`spdkit.method.reference`: the paper's
loss as written, eager PyTorch, a plain AdamW; no fused kernels or shared work) is timed too,
after the fast steps on the same model, and the table gains its median ms and the speed-up.

Peak RSS is the process high-water mark, so it only grows down the table; run one config per
process for per-config memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from collections.abc import Callable

import torch
import yaml

from spdkit.config import bundled_config_names, load_config
from spdkit.engine.malloc import keep_freed_memory
from spdkit.method.forwards import model_output
from spdkit.method.reference import reference_spd_losses
from spdkit.targets import data_source, target_kind
from spdkit.training.loop import build_trainer
from spdkit.training.profiling import matmul_peak_gflops, step_flops
from spdkit.training.trainer import Trainer


def time_config(
    name: str,
    steps: int,
    warmup: int,
    ci_backend: str,
    device: str,
    overrides: dict,
    reference: bool = False,
) -> dict:
    config = load_config(name, {"ci_backend": ci_backend, **overrides})
    target = target_kind(config.target).build(config.target)
    trainer = build_trainer(target, data_source(config), config, device)
    trainer.faithfulness_warmup()  # a run's first phase (Trainer.run); none if not configured
    for _ in range(warmup):
        trainer.train_step()
    flops = step_flops(trainer)
    times = [timed(trainer.train_step, device) for _ in range(steps)]
    plain_times = []
    if reference:  # after the fast steps: alternating with them, the plain step's [B, C, d_gate]
        # tensors evicted the fast step's data from the caches (docs/benchmarks.md)
        plain_step = reference_step(trainer)
        for _ in range(warmup):
            plain_step()
        plain_times = [timed(plain_step, device) for _ in range(steps)]
    fwd_bwd = target_forward_backward(trainer)
    for _ in range(2):
        fwd_bwd()
    base = statistics.median(timed(fwd_bwd, device) for _ in range(max(5, steps // 3)))
    median = statistics.median(times)
    row = {
        "config": name,
        "batch_size": config.training.batch_size,
        "ms_median": round(median, 3),
        "ms_min": round(min(times), 3),
        "ms_max": round(max(times), 3),
        "gflop_per_step": round(flops["total"] / 1e9, 4),
        "gflops": round(flops["total"] / 1e9 / (median / 1000), 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "ci_backend": trainer.ci_backend,
        "target_fwd_bwd_ms": round(base, 3),
        "step_over_fwd_bwd": round(median / base, 2),
    }
    if plain_times:
        row["reference_ms_median"] = round(statistics.median(plain_times), 3)
        row["speedup_over_reference"] = round(row["reference_ms_median"] / median, 2)
    return row


def timed(step: Callable[[], object], device: str) -> float:
    """Milliseconds of one call (device-synchronised on CUDA)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0)


def target_forward_backward(trainer: Trainer) -> Callable[[], None]:
    """One forward + backward of the undecomposed target on a batch of the trainer's data:
    the yardstick a step's cost is quoted against."""
    target = trainer.model.target
    x = trainer.data.sample(trainer.config.training.batch_size, trainer.data_generator)
    params = [p for p in target.parameters() if p.is_floating_point()]

    def step() -> None:
        for p in params:
            p.requires_grad_(True)
        model_output(target(x)).float().square().mean().backward()
        for p in params:
            p.requires_grad_(False)
            p.grad = None

    return step


def reference_step(trainer: Trainer) -> Callable[[], None]:
    """One training step of the plain implementation (`spdkit.method.reference`: the paper's loss as
    written, eager PyTorch, a plain AdamW) on the trainer's model, data and mask stream."""
    optimizer = torch.optim.AdamW(
        trainer.model.trainable_parameters(),
        lr=trainer.config.training.optimizer.lr,
        weight_decay=trainer.config.training.optimizer.weight_decay,
    )

    def step() -> None:
        x = trainer.data.sample(trainer.config.training.batch_size, trainer.data_generator)
        terms = reference_spd_losses(trainer.model, x, trainer.config, trainer.mask_stream)
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        optimizer.step()

    return step


def default_configs() -> list[str]:
    """Every bundled config whose target spdkit can build by itself (hf_lm needs a model
    directory: name it with --configs and --set target.path=DIR)."""
    return [n for n in bundled_config_names() if load_config(n).target.kind != "hf"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="*", default=default_configs())
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--ci-backend", default="auto", choices=["auto", "eager", "compiled", "fused"]
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--reference",
        action="store_true",
        help="also time the plain implementation (spdkit.method.reference) after the fast steps",
    )
    parser.add_argument(
        "--set", action="append", default=[], help="config override key=value (repeatable)"
    )
    args = parser.parse_args()
    keep_freed_memory()  # as `spdkit run` does
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16)}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    print(f"matmul peak (2048^3): fp32 {peak['fp32']:.1f} GFLOP/s, bf16 {peak['bf16']:.1f} GFLOP/s")
    header = f"{'config':<14}{'batch':>6}{'ms/step':>9}{'min':>8}{'max':>8}"
    header += f"{'GFLOP':>8}{'GFLOP/s':>9}{'% fp32':>8}{'RSS MB':>8}"
    header += f"{'plain ms':>10}{'speed-up':>9}" if args.reference else ""
    header += f"{'fwd+bwd':>9}{'ratio':>7}  CI"
    print(header)
    rows = []
    for name in args.configs:
        row = time_config(
            name, args.steps, args.warmup, args.ci_backend, args.device, overrides, args.reference
        )
        row["fraction_of_fp32_peak"] = round(row["gflops"] / peak["fp32"], 4)
        rows.append(row)
        print(
            f"{name:<14}{row['batch_size']:>6}{row['ms_median']:>9.2f}{row['ms_min']:>8.2f}"
            f"{row['ms_max']:>8.2f}{row['gflop_per_step']:>8.2f}{row['gflops']:>9.1f}"
            f"{100 * row['fraction_of_fp32_peak']:>7.1f}%{row['peak_rss_mb']:>8.0f}"
            + (
                f"{row['reference_ms_median']:>10.2f}{row['speedup_over_reference']:>8.2f}x"
                if args.reference
                else ""
            )
            + f"{row['target_fwd_bwd_ms']:>9.2f}{row['step_over_fwd_bwd']:>6.1f}x"
            + f"  {row['ci_backend']}",
            flush=True,
        )
    if args.json:
        result = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": args.device,
            "matmul_peak_gflops": peak,
            "overrides": overrides,
            "rows": rows,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
