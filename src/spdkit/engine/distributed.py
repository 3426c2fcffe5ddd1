"""Data-parallel SPD over torch.distributed: one process per device, started by torchrun.

Every rank holds the whole component model (U, V, the CI function and the frozen target) and
the global batch of `batch_size` rows is split into equal contiguous shards, rank r taking
rows [r·B/W, (r+1)·B/W). Three rules make W ranks compute what one process computes:

* **Random numbers per sample.** The data generator draws the global batch on every rank and
  each keeps its rows; the counter-based mask stream (`masks.MaskStream`) gives each rank the
  counters of its rows of the global draw. Sample i sees the same numbers at any world size,
  so a run is reproducible for a given world size, and (up to float summation order) the same
  run as in one process.
* **Shares of the global loss.** Each rank's loss is its share of the global mean: a mean
  over its rows divided by W (equal shards: (1/W)·Σ_r mean_r = mean), the batch-independent
  faithfulness term divided by W, and frequency minimality computed from the globally summed
  firing (`losses.frequency_minimality_loss`), its value divided by W. The shares sum to the
  global loss and their gradients to its gradient.
* **One reduction per step.** After the step's backward the gradients of every trainable
  parameter are summed across ranks in one flattened all-reduce, with the loss values and the
  stop flag in a second small one; every rank then holds the same gradients and values, so
  the optimiser step, gradient clipping, the non-finite check and a stop request (SIGTERM to
  any rank) are decided identically everywhere.

Why not `DistributedDataParallel`: a step runs several backward calls (one per masked pass,
`engine.per_pass.StepLoss`), persistent PGD's ascent differentiates with `torch.autograd.grad`, and
the faithfulness warm-up has its own loop; DDP's hooks would all-reduce on every backward or
need `no_sync` juggling. One explicit all-reduce after the step is what DDP does for a step
with one backward, without the hooks.

Rank 0 alone writes the run directory (config, target, metrics, checkpoints, figures) and
evaluates at the end. Persistent PGD's per-position sources are gathered into the checkpoint
and sliced again on resume, so a checkpoint does not depend on the world size.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from spdkit.engine.threads import threads_per_process
from spdkit.errors import PeerLostError

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@dataclass(frozen=True)
class Parallel:
    """This process's place among the data-parallel ranks (rank 0 of 1 when alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, batch: int) -> slice:
        """This rank's rows of a global batch of `batch` rows."""
        per = shard_size(batch, self.world)
        return slice(self.rank * per, (self.rank + 1) * per)

    def local(self, x: Tensor) -> Tensor:
        """This rank's rows (dim 0) of a global batch."""
        return x[self.rows(x.shape[0])] if self.active else x

    # --- collectives (no-ops in one process) -------------------------------------------------
    def sum_(self, t: Tensor) -> Tensor:
        """t summed over ranks, in place (returned)."""
        if self.active:
            _collective(torch.distributed.all_reduce, t)
        return t

    def sum_dict(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each tensor summed over ranks (one flattened all-reduce)."""
        if not self.active or not tensors:
            return dict(tensors)
        names = list(tensors)
        flat = self.sum_(torch.cat([tensors[n].reshape(-1) for n in names]))
        out, at = {}, 0
        for n in names:
            size = tensors[n].numel()
            out[n] = flat[at : at + size].view_as(tensors[n])
            at += size
        return out

    def gather_rows(self, t: Tensor) -> Tensor:
        """The ranks' shards [b, ...] concatenated into the global [W·b, ...] (every rank)."""
        if not self.active:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        _collective(torch.distributed.all_gather, parts, t.contiguous())
        return torch.cat(parts)

    def barrier(self) -> None:
        if self.active:
            _collective(torch.distributed.barrier)

    def check_same(self, fingerprint: Tensor, what: str) -> None:
        """A ValueError on every rank unless all ranks hold the same `fingerprint` [n]."""
        if not self.active:
            return
        low, high = fingerprint.double().clone(), fingerprint.double().clone()
        _collective(torch.distributed.all_reduce, low, torch.distributed.ReduceOp.MIN)
        _collective(torch.distributed.all_reduce, high, torch.distributed.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise ValueError(f"the ranks hold different {what}: every rank must start alike")

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Every parameter's .grad summed over ranks in one flattened all-reduce. A parameter
        without a gradient on every rank keeps none (as one process would: AdamW skips it);
        one with a gradient somewhere gets zeros where it had none."""
        if not self.active:
            return
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
        has = self.sum_(has.to(params[0].device))
        live = [p for p, h in zip(params, has.tolist(), strict=True) if h > 0]
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if not live:
            return
        flat = self.sum_(torch.cat([p.grad.reshape(-1) for p in live]))
        at = 0
        for p in live:
            p.grad.copy_(flat[at : at + p.numel()].view_as(p))
            at += p.numel()


SINGLE = Parallel()


def shard_size(batch: int, world: int) -> int:
    """Each rank's share of the global batch. Equal shards only: the all-reduced mean of the
    ranks' mean losses is then the single-process mean over the whole batch."""
    if batch % world:
        raise ValueError(
            f"batch_size {batch} does not split into {world} equal shards: use a multiple of {world}"
        )
    return batch // world


def _collective(fn, *args) -> None:
    """fn(*args), a torch.distributed collective; a lost peer becomes PeerLostError."""
    try:
        fn(*args)
    except (RuntimeError, torch.distributed.DistError) as err:
        rank = torch.distributed.get_rank()
        raise PeerLostError(
            f"rank {rank}: lost contact with another rank ({str(err).splitlines()[0]}); "
            "the last checkpoint is kept and `spdkit resume` continues from it"
        ) from None


def launched_by_torchrun() -> bool:
    return all(v in os.environ for v in ENV_VARS) and int(os.environ["WORLD_SIZE"]) > 1


def init_from_env(device: str, timeout_s: float = 3600.0) -> tuple[Parallel, str]:
    """Join the torchrun job this process belongs to (gloo on CPU, NCCL on CUDA, one device
    per local rank); returns (its Parallel, the device it runs on). Outside torchrun:
    (SINGLE, device). `timeout_s` bounds a wait on a rank that is alive but silent: the other
    ranks wait at a barrier while rank 0 trains the target (a dead rank is noticed at once)."""
    if not launched_by_torchrun():
        return SINGLE, device
    par = Parallel(
        rank=int(os.environ["RANK"]),
        world=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ["LOCAL_RANK"]),
        local_world=int(os.environ["LOCAL_WORLD_SIZE"]),
    )
    if device.startswith("cuda"):
        device = f"cuda:{par.local_rank}"
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun sets 1 unless told; --nproc sets it
        torch.set_num_threads(threads_per_process(par.local_world))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return par, device


def finish(parallel: Parallel) -> None:
    """Training is over on every rank (a barrier): rank 0 then evaluates alone and the others
    leave (`leave`)."""
    if parallel.active:
        parallel.barrier()


def leave() -> None:
    """End a data-parallel rank other than 0 at once, without running gloo's teardown while
    rank 0 is still alive (that teardown aborted a rank now and then: "terminate called
    without an active exception")."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
