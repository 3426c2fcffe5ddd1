"""Would bf16 autocast on the masked forwards be a safe speed-up? (a benchmark, not a test)

    python benchmarks/bf16_masked_passes.py [--run runs/resid_mlp1] [--batches 3] [--threads 2]

Two questions, for a finished run directory (its config and trained decomposition):
1. numerics: for a few batches (same data, same masks), the loss terms and the gradient of the
   total loss with the masked forwards under `torch.autocast("cpu", bfloat16)` against fp32
   (the CI functions and the target forward stay fp32 in both);
2. speed: ms per training step of the same config, fp32 against autocast.

Prints one line per batch (relative change of each loss term, gradient cosine and relative
error) and the two step times.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from spdkit.api import load
from spdkit.engine.random_stream import MaskStream
from spdkit.method.model import ComponentModel
from spdkit.targets import data_source, target_kind
from spdkit.training.loop import build_trainer
from spdkit.training.trainer import spd_losses


@contextlib.contextmanager
def bf16_masked_forwards(model: ComponentModel, enabled: bool) -> Iterator[None]:
    """Run every ComponentModel.forward (the masked passes) under bf16 autocast, output fp32."""
    if not enabled:
        yield
        return
    plain = type(model).forward

    def forward(self, *args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return plain(self, *args, **kwargs).float()

    model.forward = forward.__get__(model)  # type: ignore[method-assign]
    try:
        yield
    finally:
        del model.forward


def loss_and_grad(model: ComponentModel, config, x: torch.Tensor, seed: int, bf16: bool):
    with bf16_masked_forwards(model, bf16):
        terms = spd_losses(model, x, config, MaskStream(seed)).terms
    terms["total"].backward()
    params = model.trainable_parameters()
    grad = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
    for p in params:
        p.grad = None
    return {k: float(v.detach()) for k, v in terms.items()}, grad


def step_ms(run: Path, bf16: bool, steps: int) -> float:
    config = load(run).config
    target = target_kind(config.target).build(config.target)
    trainer = build_trainer(target, data_source(config), config, "cpu")
    times = []
    with bf16_masked_forwards(trainer.model, bf16):
        for i in range(steps + 3):
            t0 = time.perf_counter()
            trainer.train_step()
            if i >= 3:
                times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/resid_mlp1"))
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.run / "components.safetensors").is_file():
        raise SystemExit(f"error: {args.run} is not a finished run (spdkit run resid_mlp1 first)")
    decomp = load(args.run)
    model, config = decomp.model, decomp.config
    data = data_source(config)
    print(f"{args.run}: bf16 autocast on the masked forwards against fp32")
    for b in range(args.batches):
        x = data.sample(config.training.batch_size, torch.Generator().manual_seed(b))
        ref, g_ref = loss_and_grad(model, config, x, 7 + b, bf16=False)
        low, g_low = loss_and_grad(model, config, x, 7 + b, bf16=True)
        changes = ", ".join(
            f"{k} {(low[k] - ref[k]) / abs(ref[k]) * 100:+.2f}%" for k in ref if ref[k] != 0
        )
        cos = float(torch.nn.functional.cosine_similarity(g_ref, g_low, dim=0))
        rel = float((g_low - g_ref).norm() / g_ref.norm())
        print(f"batch {b}: {changes}; gradient cosine {cos:.4f}, relative error {rel:.3f}")
    fp32, bf16 = step_ms(args.run, False, args.steps), step_ms(args.run, True, args.steps)
    print(
        f"ms/step ({args.threads} threads): fp32 {fp32:.1f}, bf16 masked forwards {bf16:.1f} "
        f"({fp32 / bf16:.2f}x)"
    )


if __name__ == "__main__":
    main()
