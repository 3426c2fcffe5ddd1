"""The decomposition loop: the paper's pseudocode (appendix), step by step.

`spd_losses` (step.py) is one training step, in the pseudocode's order (APD's step for an APD
config, `spdkit.method.objective`); `Trainer` adds the
optimiser, the LR schedule, seeded generators for data and masks, and the state a checkpoint
needs to resume bit-exactly.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from spdkit.config import OptimizerConfig, SPDConfig
from spdkit.engine.distributed import SINGLE, Parallel, shard_size
from spdkit.engine.random_stream import MaskStream
from spdkit.errors import NonFiniteError
from spdkit.method.adversary import PGDState
from spdkit.method.losses import faithfulness_loss
from spdkit.method.model import ComponentModel
from spdkit.method.objective import loss_terms, step_losses
from spdkit.method.step import LOSS_TERMS, spd_losses
from spdkit.progress import progress_bar
from spdkit.targets import DataSource
from spdkit.training.checkpoint import checkpoint_state, restore_checkpoint_state

__all__ = ["LOSS_TERMS", "Trainer", "lr_at", "spd_losses"]


def nonfinite_problem(terms: dict[str, Tensor], params: list[torch.nn.Parameter]) -> str | None:
    """None if every loss term and gradient is finite, else which ones are not."""
    grads = [p.grad for p in params if p.grad is not None]
    # small gradients are checked in one concatenated tensor: a per-tensor check is ~5 small
    # ops each, which shows in a toy model's short step (docs/benchmarks.md); large ones
    # alone, so a big model does not copy its gradients every step
    small = [g.reshape(-1) for g in grads if g.numel() <= 1 << 16]
    large = [g for g in grads if g.numel() > 1 << 16]
    if (
        bool(torch.isfinite(terms["total"]))
        and (not small or bool(torch.isfinite(torch.cat(small)).all()))
        and all(bool(torch.isfinite(g).all()) for g in large)
    ):
        return None
    bad = [k for k, v in terms.items() if k != "total" and not bool(torch.isfinite(v))]
    if bad:
        return f"non-finite loss term(s) {', '.join(bad)}"
    return "non-finite gradient"


def lr_at(step: int, total_steps: int, opt: OptimizerConfig) -> float:
    """Learning rate at `step` (0-based): linear warm-up from 0, then constant / cosine / linear
    decay to 0 at `total_steps`. A pure function of the step, so resuming needs only the step."""
    warmup = int(opt.warmup_frac * total_steps)
    if step < warmup:
        return opt.lr * (step + 1) / warmup
    if opt.lr_schedule == "constant":
        return opt.lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    if opt.lr_schedule == "cosine":
        return opt.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return opt.lr * (1.0 - progress)


class Trainer:
    """Optimises a ComponentModel; owns every piece of state a bit-exact resume needs.
    With `parallel` (one of several torchrun ranks) it trains on its shard of each batch and
    agrees with the other ranks on gradients, loss values and stopping (`spdkit.engine.distributed`)."""

    def __init__(
        self,
        model: ComponentModel,
        data: DataSource,
        config: SPDConfig,
        device: str,
        parallel: Parallel = SINGLE,
    ):
        self.model, self.data, self.config, self.device = model, data, config, device
        self.parallel = parallel
        shard_size(
            config.training.batch_size, parallel.world
        )  # a batch that does not split: error now
        if parallel.active:  # the same target and initial components on every rank
            sums = torch.stack([t.detach().double().sum() for t in model.state_dict().values()])
            parallel.check_same(sums, "models (target weights or initial components)")
        self.optimizer = torch.optim.AdamW(
            model.trainable_parameters(),
            lr=config.training.optimizer.lr,
            weight_decay=config.training.optimizer.weight_decay,
            # one kernel per parameter instead of ~10 elementwise ops each: the same update
            # (tests/test_train.py), a visible share of a toy step (docs/benchmarks.md)
            fused=torch.device(device).type in ("cpu", "cuda"),
        )
        self.data_generator = torch.Generator(device=device).manual_seed(config.seed + 1000)
        self.mask_stream = MaskStream(config.seed + 2000, parallel.rank, parallel.world)
        self.stop_agreed = False  # every rank's stop request, combined at the last step
        self.step = 0
        self.skipped_steps = 0  # steps whose update was skipped for a non-finite loss/gradient
        # how often each subcomponent's CI exceeded eval.ci_threshold, over the last 10% of
        # steps (alive / dead subcomponents at the end of the run)
        self.firing = {
            n: torch.zeros(model.components(n).C, dtype=torch.long, device=device)
            for n in model.module_names
        }
        self.firing_positions = 0
        self.ci_backend = model.ci.backend_used(device)  # what the CI function runs with here
        # persistent PGD's sources and their Adam state (VPD): each step returns the next
        self.pgd: PGDState | None = (
            PGDState()
            if config.adversary.persistent and config.loss.adversarial_recon_coeff > 0
            else None
        )

    def train_step(
        self, stop_requested: bool = False
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One optimiser step; `stop_requested` (this rank's SIGTERM) is combined with the
        other ranks' into `stop_agreed`, so that every rank stops after the same step."""
        lr = lr_at(self.step, self.config.training.steps, self.config.training.optimizer)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # the global batch on every rank (the same numbers per sample at any world size)
        x = self.parallel.local(
            self.data.sample(self.config.training.batch_size, self.data_generator)
        )
        self.optimizer.zero_grad(set_to_none=True)
        # + grads
        terms, ci_lower, self.pgd = step_losses(
            self.model, x, self.config, self.mask_stream, self.step, self.pgd, self.parallel
        )
        if self.parallel.active:
            self.parallel.sum_gradients(self.model.trainable_parameters())
            terms, self.stop_agreed = self._agree(terms, stop_requested)
        else:
            self.stop_agreed = stop_requested
        problem = nonfinite_problem(terms, self.model.trainable_parameters())
        if problem is None:
            self.clip_gradients()
            self.optimizer.step()
        elif self.config.training.on_nonfinite == "stop":
            raise NonFiniteError(f"step {self.step + 1}: {problem}; the last checkpoint is kept")
        else:
            self.skipped_steps += 1
        self.step += 1
        if self.step > self.config.training.steps - max(1, self.config.training.steps // 10):
            self._count_firing(ci_lower)
        return terms, ci_lower

    def _agree(self, terms: dict[str, Tensor], stop: bool) -> tuple[dict[str, Tensor], bool]:
        """The ranks' loss shares summed into the global terms, and whether any rank asked to
        stop: one all-reduce of a short vector."""
        names = list(terms)
        flat = torch.stack([terms[n].float() for n in names] + [torch.tensor(float(stop))])
        flat = self.parallel.sum_(flat.to(self.device)).cpu()
        return {n: flat[i] for i, n in enumerate(names)}, bool(flat[-1] > 0)

    def clip_gradients(self) -> None:
        """Scale the gradients of all U, V (and, separately, of the CI function) down to a
        global L2 norm of at most `grad_clip.components` (`grad_clip.ci_fn`)."""
        clip = self.config.training.grad_clip
        if clip.components is not None:
            torch.nn.utils.clip_grad_norm_(self.model.component_parameters(), clip.components)
        if clip.ci_fn is not None:
            torch.nn.utils.clip_grad_norm_(list(self.model.ci.parameters()), clip.ci_fn)

    def faithfulness_warmup(self) -> float:
        """`faithfulness_warmup.steps` AdamW steps (constant lr and weight decay) on L_faithfulness
        alone over U, V, before SPD's first step (VPD notes §5): SPD then starts from
        U V ≈ W. It needs no data or random numbers, so it is a pure function of the init and
        a run resumed from any checkpoint (step ≥ 1) has it already; returns the final loss."""
        warm = self.config.training.faithfulness_warmup
        params = self.model.component_parameters()
        opt = torch.optim.AdamW(params, lr=warm.lr, weight_decay=warm.weight_decay)
        names = self.model.module_names
        targets = [self.model.target_weight(n) for n in names]
        loss = torch.zeros(())
        for _ in range(warm.steps):
            opt.zero_grad(set_to_none=True)
            loss = faithfulness_loss(targets, [self.model.components(n).weight() for n in names])
            loss.backward()
            opt.step()
        for p in params:
            p.grad = None
        return float(loss.detach())

    @torch.no_grad()
    def _count_firing(self, ci_lower: dict[str, Tensor]) -> None:
        threshold = self.config.eval.ci_threshold
        for name, g in ci_lower.items():
            fired = (g > threshold).reshape(-1, g.shape[-1])  # [positions, C]
            self.firing[name] += fired.sum(0)
        self.firing_positions += fired.shape[0]

    def run(
        self,
        on_log: Callable[[int, dict[str, float]], None] | None = None,
        on_checkpoint: Callable[[Trainer], None] | None = None,
        progress: bool = True,
        on_step: Callable[[Trainer], None] | None = None,
        until: int | None = None,
    ) -> None:
        """Train from the current step to config.training.steps (or to step `until`, on the
        same schedule, with a checkpoint there); log and checkpoint on the way.
        A run from step 0 first runs the faithfulness warm-up phase, if configured.

        On Ctrl-C or SIGTERM a checkpoint is written before the interrupt propagates, so
        nothing is lost and `spdkit resume` continues exactly.
        """
        cfg = self.config
        if self.step == 0 and cfg.training.faithfulness_warmup.steps > 0:
            self.faithfulness_warmup()  # phase 1 (VPD notes §5): U V ≈ W before SPD's steps
        end = cfg.training.steps if until is None else min(until, cfg.training.steps)
        bar = progress_bar(
            end,
            "apd" if self.config.apd else "spd",
            progress and self.parallel.is_main,
            initial=self.step,
        )
        seq_len = getattr(cfg.target, "seq_len", None)  # language models: tokens per second
        tokens_per_step = cfg.training.batch_size * seq_len if seq_len else 0
        with _stop_requests() as stop:
            try:
                while self.step < end:
                    terms, ci_lower = self.train_step(stop.is_set())
                    bar.update(1)
                    if on_step:
                        on_step(self)
                    last = self.step == cfg.training.steps
                    if self.step % cfg.training.log_every == 0 or last:
                        record = step_record(self, terms, ci_lower)
                        shown = ("total", *loss_terms(self.config))
                        postfix = {k: f"{record[k]:.3g}" for k in shown if k in record}
                        rate = bar.format_dict.get("rate")
                        if tokens_per_step and rate:
                            postfix = {"tok/s": f"{rate * tokens_per_step:,.0f}", **postfix}
                        bar.set_postfix(postfix)
                        if on_log:
                            on_log(self.step, record)
                    due = self.step % cfg.training.checkpoint_every == 0 or self.step == end
                    # together: the ranks' requests as of this step's reduction
                    stopping = self.stop_agreed if self.parallel.active else stop.is_set()
                    if on_checkpoint and (due or stopping):
                        on_checkpoint(self)
                    if stopping:
                        raise KeyboardInterrupt("stopped by signal; checkpoint written")
            finally:
                bar.close()

    # --- checkpoint state (`spdkit.training.checkpoint`) --------------------------------------
    def state_tensors(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """Everything needed to resume, as tensors and string metadata."""
        return checkpoint_state(self)

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
        """Restore `state_tensors()` (a CheckpointError names what does not fit)."""
        restore_checkpoint_state(self, tensors, meta)


@contextlib.contextmanager
def _stop_requests() -> Iterator[threading.Event]:
    """SIGINT (Ctrl-C) and SIGTERM set an event that the loop checks between steps, so a stop
    never lands inside an optimiser update: the loop writes a checkpoint and exits. A second
    signal interrupts at once."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):  # noqa: ARG001
        if stop.is_set():
            raise KeyboardInterrupt(f"signal {signum}")
        stop.set()

    # a SIGINT the process was started to ignore (a shell's background job) stays ignored, as
    # it is before and after training
    signals = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signals.append(signal.SIGINT)
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def step_record(
    trainer: Trainer, terms: dict[str, Tensor], ci_lower: dict[str, Tensor]
) -> dict[str, float]:
    """One metrics.jsonl row: loss terms, LR, and mean CI-L0 per module on this batch (on
    the global batch: every data-parallel rank calls this at the same steps)."""
    record = {k: v.item() for k, v in terms.items()}
    record["lr"] = trainer.optimizer.param_groups[0]["lr"]
    if trainer.skipped_steps:
        record["skipped_steps"] = trainer.skipped_steps
    threshold = trainer.config.eval.ci_threshold
    l0 = torch.stack([(g.detach() > threshold).float().sum(-1).mean() for g in ci_lower.values()])
    l0 = trainer.parallel.sum_(l0) / trainer.parallel.world if trainer.parallel.active else l0
    for name, value in zip(ci_lower, l0.tolist(), strict=True):
        record[f"l0/{name}"] = value
    return record
