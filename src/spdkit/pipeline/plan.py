"""A memory and compute plan before a run (`spdkit plan`, and the check in `spdkit run`).

A step's memory is hard to derive from shapes alone for an arbitrary model (which tensors its
forward saves for the backward, what the allocator keeps), and easy to measure. So the plan
measures it: one probe step (the real loss and backward, no optimiser update, its own random
numbers, so the run is unchanged) at batch 1 and at a small batch b, each from the live memory
(glibc malloc_trim) with the process's peak RSS reset before it (Linux
`/proc/self/clear_refs`). Memory is affine in the batch:

    peak(B) ≈ peak(1) + (B − 1) · (peak(b) − peak(1)) / (b − 1)
              + Adam's two moments of U, V and the CI function (allocated at the first update)
              + persistent PGD's sources and moments (3 tensors [B, T, C(+1)] per module)

FLOPs are counted on the same probes (matmuls by torch's FlopCounterMode, plus the fused CI
kernel's from its shapes, as `spdkit.training.profiling.step_flops` counts them), affine in B;
the evaluation's on probes of the evaluation's own calls (`measure_batch`, and the LM report
with a one-step attack; its module imports matplotlib, so that is resident in the base), with
the attack's further steps priced by a two-step probe at one sample. Where the peak cannot be reset (not Linux), the plan says so and gives FLOPs only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from spdkit.analysis.evaluation import measure_batch
from spdkit.analysis.lm import keep_every_record, lm_mask_evaluation
from spdkit.engine.malloc import release_free_memory
from spdkit.engine.memory import (
    available_bytes,
    available_bytes_on,
    reset_peak_rss,
    status_kib,
    tensor_bytes,
)
from spdkit.engine.random_stream import MaskStream
from spdkit.method.objective import step_losses
from spdkit.targets import reports_lm
from spdkit.training.profiling import fused_ci_flops, positions_per_sample
from spdkit.training.trainer import Trainer

PROBE_BATCH = 8  # the second training probe's batch (the first is 1)
PROBE_EVAL = 64  # the second evaluation probe's samples
MEASURABLE = 16 * 2**20  # bytes two probes must differ by for a per-sample slope
PROBE_SEED = 1_000_003  # the probes' own data and mask numbers
GIB = 2**30


@dataclass(frozen=True)
class Plan:
    batch_size: int
    tokens_per_sample: int  # seq_len for language models, else 1
    base_bytes: int | None  # RSS before the probes: weights, components, CI function, data
    peak_bytes: int | None  # the training step's peak RSS at batch_size
    per_sample_bytes: int | None
    optimizer_bytes: int
    persistent_bytes: int
    eval_peak_bytes: int | None
    train_flops: float  # per step
    eval_flops: float  # per evaluation
    available: int | None  # MemAvailable now
    train_seconds: float | None = None  # per step, estimated (module docstring)
    eval_seconds: float | None = None  # per evaluation, estimated
    steps: int | None = None  # the run's training steps
    eval_records_bytes: int | None = None  # the fresh-PGD ladder's target records, all chunks
    eval_keeps_records: bool | None = None  # kept (else recomputed per ascent step); LM only

    @property
    def fits(self) -> bool | None:
        if self.peak_bytes is None or self.available is None or self.base_bytes is None:
            return None
        need = max(self.peak_bytes, self.eval_peak_bytes or 0) - self.base_bytes
        return need <= self.available


def _trainable_bytes(trainer: Trainer) -> int:
    return sum(p.numel() * p.element_size() for p in trainer.model.trainable_parameters())


def _total_C(trainer: Trainer) -> int:
    return sum(trainer.model.components(n).C for n in trainer.model.module_names)


def _persistent_pgd_bytes(trainer: Trainer, batch: int, tokens: int) -> int:
    """Persistent PGD keeps source, m, v per module: [B, T, C(+1)] each (scope position)."""
    cfg = trainer.config
    if cfg.loss.adversarial_recon_coeff == 0 or not cfg.adversary.persistent:
        return 0
    extra = 1 if cfg.components.delta else 0
    per = sum(trainer.model.components(n).C + extra for n in trainer.model.module_names)
    rows = batch * tokens if cfg.adversary.scope == "position" else 1
    n_tensors = 3 if cfg.adversary.optimizer == "adam" else 1
    return 4 * n_tensors * rows * per


def probe(
    trainer: Trainer, batch: int, evaluation: bool = False, attack_steps: int = 1
) -> tuple[int | None, float, float]:
    """(peak RSS in bytes, FLOPs, seconds) of one training step's losses and backward at `batch`, or
    with `evaluation` of the end-of-run evaluation's work on `batch` samples (the losses
    without gradients, CI, output losses and, for token inputs, the LM report with an
    `attack_steps`-step attack), leaving the trainer as it was."""
    model, cfg = trainer.model, trainer.config
    gen = torch.Generator(device=trainer.device).manual_seed(PROBE_SEED)
    x = trainer.data.sample(batch, gen)
    release_free_memory()  # RSS = live memory, not what earlier probes left to reuse
    measured = reset_peak_rss()
    start = time.perf_counter()
    with FlopCounterMode(display=False) as counter:
        if evaluation:
            _evaluation_work(trainer, x, gen, attack_steps)
        else:
            step_losses(model, x, cfg, MaskStream(PROBE_SEED), trainer.step, None)
    seconds = time.perf_counter() - start
    for p in model.trainable_parameters():
        p.grad = None
    peak = status_kib("VmHWM") if measured else None
    rows = batch * positions_per_sample(cfg)
    # the fused CI kernel's work, invisible to the counter (as `step_flops` counts it)
    flops = float(counter.get_total_flops()) + fused_ci_flops(trainer, rows, not evaluation)
    return (peak * 1024 if peak is not None else None), flops, seconds


def _evaluation_work(
    trainer: Trainer, x: torch.Tensor, gen: torch.Generator, attack_steps: int = 1
) -> None:
    """What the end-of-run evaluation computes, on x: the same calls (`measure_batch`, and
    for language models the mask report with an `attack_steps`-step attack)."""
    model, cfg = trainer.model, trainer.config
    measure_batch(model, cfg, x, trainer.step)
    if reports_lm(cfg.target):
        ev = cfg.eval.model_copy(update={"pgd_steps": [attack_steps], "batch_size": None})
        lm_mask_evaluation(model, x, ev, gen)


def _affine_fit(
    trainer: Trainer, target: int, start: int, evaluation: bool
) -> tuple[int | None, float, float]:
    """(peak RSS, FLOPs, seconds) at `target` samples from probes at 1 and b, both affine in
    the batch (a per-sample part and a fixed one, such as L_faithfulness's U V): b from
    `start`, ×8 until the probes differ by MEASURABLE bytes (a small model's per-sample memory
    drowns in allocator noise at a few samples) or b reaches `target` (then measured, not
    extrapolated). Seconds: probe b's, scaled by FLOPs (an upper estimate, module docstring)."""
    p1, f1, s1 = probe(trainer, 1, evaluation)
    b = min(target, start)
    while True:
        pb, fb, sb = probe(trainer, b, evaluation) if b > 1 else (p1, f1, s1)
        flops = fb if b == target else f1 + (target - 1) * (fb - f1) / max(1, b - 1)
        seconds = sb * flops / fb if fb > 0 else sb
        if p1 is None or pb is None:
            return None, flops, seconds
        if b == target:
            return pb, flops, seconds
        if pb - p1 >= MEASURABLE:
            return int(p1 + (target - 1) * max(0.0, (pb - p1) / (b - 1))), flops, seconds
        b = min(target, 8 * b)


def make_plan(trainer: Trainer) -> Plan:
    """Probe the trainer's step and extrapolate to config.training.batch_size; the evaluation likewise
    to its chunk (plus the CI of the whole evaluation batch, held while chunks are scored).
    A data-parallel rank plans its shard of the batch and, on a CPU, its share of the
    machine's memory."""
    cfg, par = trainer.config, trainer.parallel
    B = cfg.training.batch_size // par.world
    tokens = positions_per_sample(cfg)

    release_free_memory()
    rss = status_kib("VmRSS")
    base = rss * 1024 if rss is not None else None
    measured, train_flops, train_seconds = _affine_fit(trainer, B, PROBE_BATCH, evaluation=False)
    opt = 2 * _trainable_bytes(trainer)
    persistent = _persistent_pgd_bytes(trainer, B, tokens)
    peak = int(measured + opt + persistent) if measured is not None else None
    chunk = min(cfg.eval.batch_size or cfg.eval.n_eval_samples, cfg.eval.n_eval_samples)
    eval_measured, chunk_flops, chunk_seconds = _affine_fit(
        trainer, chunk, PROBE_EVAL, evaluation=True
    )
    n_chunks = cfg.eval.n_eval_samples / chunk
    eval_flops = n_chunks * (chunk_flops + chunk * _attack_step_flops(trainer))
    eval_seconds = eval_flops * chunk_seconds / chunk_flops if chunk_flops > 0 else chunk_seconds
    eval_peak = None
    if eval_measured is not None:
        held_ci = 4 * cfg.eval.n_eval_samples * tokens * _total_C(trainer)
        eval_peak = int(eval_measured + held_ci + opt + persistent)
    per_sample = None
    if peak is not None and base is not None:
        per_sample = max(0, int((measured - base) / B))
    available = _share(available_bytes(), par.local_world)
    records, keeps = _pgd_records(trainer, chunk)
    if keeps and records is not None and eval_peak is not None:
        eval_peak += records  # (the one chunk's record the probe held is a small overcount)
    return Plan(
        batch_size=B,
        tokens_per_sample=tokens,
        base_bytes=base,
        peak_bytes=peak,
        per_sample_bytes=per_sample,
        optimizer_bytes=opt,
        persistent_bytes=persistent,
        eval_peak_bytes=eval_peak,
        train_flops=train_flops,
        eval_flops=eval_flops,
        available=available,
        train_seconds=train_seconds,
        eval_seconds=eval_seconds,
        steps=cfg.training.steps,
        eval_records_bytes=records,
        eval_keeps_records=keeps,
    )


def _pgd_records(trainer: Trainer, chunk: int) -> tuple[int | None, bool | None]:
    """The bytes of every evaluation chunk's target record (one sample's, measured, × the
    evaluation's samples) and whether the fresh-PGD ladder will keep them
    (`keep_every_record`, the rule the evaluation applies); (None, None) without a ladder."""
    cfg = trainer.config
    if not (reports_lm(cfg.target) and cfg.eval.pgd_steps):
        return None, None
    gen = torch.Generator(device=trainer.device).manual_seed(PROBE_SEED)
    with torch.no_grad():
        one = tensor_bytes(trainer.model.record(trainer.data.sample(1, gen)))
    n = cfg.eval.n_eval_samples
    room = available_bytes_on(torch.device(trainer.device))
    return one * n, keep_every_record(one * chunk, math.ceil(n / chunk), room)


def _share(available: int | None, processes: int) -> int | None:
    return available // processes if available is not None else None


def _attack_step_flops(trainer: Trainer) -> float:
    """FLOPs per sample of the fresh-PGD ladder beyond the probes' one-step attack: an ascent
    step costs (FLOPs of a 2-step probe − a 1-step probe, at one sample); the ladder is one
    trajectory of max(pgd_steps) steps read at each entry (one scoring pass per entry, counted
    as a step: an upper estimate). 0 without a ladder."""
    cfg = trainer.config
    if not (reports_lm(cfg.target) and cfg.eval.pgd_steps):
        return 0.0
    _, one, _ = probe(trainer, 1, evaluation=True, attack_steps=1)
    _, two, _ = probe(trainer, 1, evaluation=True, attack_steps=2)
    per_step = max(0.0, two - one)
    # less the one step and the one scoring pass the probes already ran
    return per_step * (max(cfg.eval.pgd_steps) - 1 + len(cfg.eval.pgd_steps) - 1)


def _gib(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB / 4 else f"{n / 2**20:.1f} MiB"


def _flops(n: float) -> str:
    if n <= 0:
        return "0"
    exp = min(int(math.log10(n)) // 3, 5)
    return f"{n / 10 ** (3 * exp):.2f} {['', 'k', 'M', 'G', 'T', 'P'][exp]}FLOP"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{1000 * seconds:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def plan_time(plan: Plan) -> str:
    """ "time, at most about: … per step (… for N steps), … per evaluation"."""
    step = plan.train_seconds or 0.0
    total = f" ({_duration(step * plan.steps)} for {plan.steps} steps)" if plan.steps else ""
    evaluation = f", {_duration(plan.eval_seconds)} per evaluation" if plan.eval_seconds else ""
    return f"time, at most about: {_duration(step)} per step{total}{evaluation}"


def format_plan(plan: Plan) -> str:
    tok = f" x {plan.tokens_per_sample} tokens" if plan.tokens_per_sample > 1 else ""
    lines = [
        f"batch {plan.batch_size}{tok}",
        f"  memory before the first step: {_gib(plan.base_bytes)} (weights, components, CI, data)",
        f"  training step peak:           {_gib(plan.peak_bytes)} "
        f"({_gib(plan.per_sample_bytes)} per sample; Adam {_gib(plan.optimizer_bytes)}; "
        f"persistent PGD {_gib(plan.persistent_bytes)})",
        f"  evaluation peak:              {_gib(plan.eval_peak_bytes)}",
        *(
            [
                f"  fresh-PGD target records:     {_gib(plan.eval_records_bytes)}, "
                + (
                    "kept (each ascent step reuses them)"
                    if plan.eval_keeps_records
                    else "recomputed at each ascent step (more than half the memory available)"
                )
            ]
            if plan.eval_records_bytes is not None
            else []
        ),
        f"  available now:                {_gib(plan.available)}",
        f"  compute: {_flops(plan.train_flops)} per step (matmuls), "
        f"{_flops(plan.eval_flops)} per evaluation",
    ]
    if plan.train_seconds is not None:
        lines.append(f"  {plan_time(plan)} (probe steps scaled by FLOPs)")
    if plan.peak_bytes is None:
        lines.append("  (peak memory not measurable here: /proc/self/clear_refs is Linux only)")
    return "\n".join(lines)


def check_fits(plan: Plan) -> None:
    """A ValueError (one line: the numbers and the knobs) for a run that will not fit."""
    if plan.fits is False:
        need = max(plan.peak_bytes or 0, plan.eval_peak_bytes or 0)
        raise ValueError(
            f"this run needs about {_gib(need)} at its peak ({_gib(plan.per_sample_bytes)} per "
            f"sample at batch {plan.batch_size}) but {_gib(plan.available)} is available: "
            "lower batch_size, target.seq_len or eval.batch_size, decompose fewer modules "
            "(modules patterns), or mask a subset per pass (stochastic_recon_subset_coeff "
            "instead of the layerwise term); `spdkit plan` shows the estimate"
        )
