"""`planted_lm`: a language model whose mechanisms are known, to check that a decomposition
finds them.

A small transformer (`transformer.Transformer`: LayerNorm, GELU MLPs) is trained on a mixture of
synthetic tasks. Every sequence starts with its task's token (ids `n_tokens + task index`); the
content tokens are 0 .. n_tokens − 1. Each task scores only the positions its rule determines
(the others are random tokens), so the model's cross-entropy on those positions says whether it
learnt the task, and the change of that CE under an ablation says whether the ablated
subcomponents carry the task's mechanism. The tasks are chosen to need mechanisms different in
kind:

| task | sequence (after the task token) | scored | expected mechanism |
|---|---|---|---|
| `induction` | r₁ … r_m r₁ … r_m, then random (m = half the sequence, or random in [n/4, n/2] with `induction_repeat: random`) | the repeat from its 2nd token | a previous-token head in layer 0, an induction head in layer 1 (K-composition: its key reads the previous-token head's output; its OV copies the token) |
| `lookup` | k₁ f(k₁) k₂ f(k₂) … (f a fixed random map) | every f(k) | memorised in the MLPs: key embedding in, value unembedding out; attention only says which task it is |
| `copy` | fresh random tokens at odd positions; an even position j > k repeats position j − k (k = `copy_offset`, odd) | the repeats | one positional head attending k − 1 back from the query, its OV copying the token |
| `sum` | a b s a b s … with a, b < p and s = (a + b) mod p (p = `sum_modulus`) | every s | a previous-token head brings a to b's position; the MLPs compute (a + b) mod p |

`copy` defeats induction on purpose: the token before a repeat is fresh (never seen before), so
looking up its previous occurrence finds nothing. With `induction_repeat: fixed` (the default,
kept for runs made before the option) the repeat always starts halfway, so a positional head
attending half a sequence back solves `induction` too: the bundled config uses `random`. `sum`'s gather shares its kind (attend one
back) with induction's previous-token head; whether the model reuses one head for both is a
fact about the trained model that the ablation table shows.

The table says what each task is *expected* to need; `target.json`'s `info.heads`
(`planted_heads.py`) measures what the trained model uses: per task, the CE with each head
knocked out and each head's attention on the expected key. Measured (docs/mechanisms_lm.md):
with 48 tokens and 33 positions `induction` was solved without an induction head; with the
bundled 64 tokens and 65 positions the model has a previous-token head and induction heads.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor

from spdkit.config import PlantedLMTargetConfig, SPDConfig
from spdkit.figures import finish, new_figure
from spdkit.method.model import ComponentModel
from spdkit.targets.data import seeded_build
from spdkit.targets.planted_heads import head_report, scored_ce
from spdkit.targets.transformer import (
    RepeatedTokens,
    Transformer,
    gpt_like,
    parse_token_ids,
    train_next_token,
)

log = logging.getLogger(__name__)


def lookup_table(config: PlantedLMTargetConfig) -> Tensor:
    """The lookup task's fixed map f: [n_tokens] → content token, from `table_seed` alone, so
    every run of one config shares it (the data source is rebuilt from the config)."""
    gen = torch.Generator().manual_seed(config.table_seed)
    return torch.randint(0, config.n_tokens, (config.n_tokens,), generator=gen)


@dataclass(frozen=True)
class PlantedTasks:
    """The planted-mechanism data: `sample` draws the training mixture (each sequence's task
    uniform over `config.tasks`); `task_batch` draws one task's sequences with the mask of the
    positions it scores."""

    config: PlantedLMTargetConfig
    table: Tensor = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "table", lookup_table(self.config))

    def task_token(self, task: str) -> int:
        return self.config.n_tokens + self.config.tasks.index(task)

    def task_batch(
        self, task: str, batch_size: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """(ids [batch, seq_len], scored [batch, seq_len]): scored[b, t] says that ids[b, t] is
        determined by the task's rule (predicted from position t − 1)."""
        c, dev = self.config, generator.device
        n = c.seq_len - 1  # content positions 1 .. seq_len − 1

        def rand(high: int, shape: tuple[int, ...]) -> Tensor:
            return torch.randint(0, high, shape, generator=generator, device=dev)

        pos = torch.arange(1, c.seq_len, device=dev)  # ids position of each content token
        if task == "induction" and c.induction_repeat == "random":
            # first occurrence of random length m in [n/4, n/2], its repeat, random filler
            repeated = RepeatedTokens(c.n_tokens, n, "random")
            content, scored_rows = repeated.scored_batch(batch_size, generator)
            start = torch.full((batch_size, 1), self.task_token(task), device=dev)
            ids = torch.cat([start, content], dim=1)
            no_first = torch.zeros(batch_size, 1, dtype=torch.bool, device=dev)
            return ids, torch.cat([no_first, scored_rows], dim=1)
        if task == "induction":
            h = n // 2
            first = rand(c.n_tokens, (batch_size, h))
            content = torch.cat([first, first, first[:, : n - 2 * h]], dim=1)
            scored = (pos >= h + 2) & (pos <= 2 * h)
        elif task == "lookup":
            keys = rand(c.n_tokens, (batch_size, (n + 1) // 2))
            pairs = torch.stack([keys, self.table.to(dev)[keys]], dim=2).flatten(1)
            content = pairs[:, :n]
            scored = pos % 2 == 0
        elif task == "copy":
            k = c.copy_offset
            content = rand(c.n_tokens, (batch_size, n))
            scored = (pos % 2 == 0) & (pos > k)
            for j in pos[scored].tolist():  # sources j − k are odd: fresh, never overwritten
                content[:, j - 1] = content[:, j - 1 - k]
        elif task == "sum":
            p = c.sum_modulus
            ab = rand(p, (batch_size, (n + 2) // 3, 2))
            s = ab.sum(dim=2, keepdim=True) % p
            content = torch.cat([ab, s], dim=2).flatten(1)[:, :n]
            scored = pos % 3 == 0
        else:
            raise ValueError(f"unknown planted task {task!r}; known: {', '.join(c.tasks)}")
        start = torch.full((batch_size, 1), self.task_token(task), device=dev)
        ids = torch.cat([start, content], dim=1)
        scored = torch.cat([torch.zeros(1, dtype=torch.bool, device=dev), scored])
        return ids, scored.expand(batch_size, -1)

    def sample(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """[batch, seq_len]: each sequence's task uniform over the config's tasks."""
        which = torch.randint(
            0, len(self.config.tasks), (batch_size,), generator=generator, device=generator.device
        )
        ids = torch.empty(batch_size, self.config.seq_len, dtype=torch.long, device=which.device)
        for i, task in enumerate(self.config.tasks):
            ids[which == i] = self.task_batch(task, batch_size, generator)[0][which == i]
        return ids


def chance_ce(config: PlantedLMTargetConfig, task: str) -> float:
    """CE of a model that knows the task's token range but not its rule: ln p for `sum`
    (s < p), ln n_tokens for the others. The gap a task closes is chance − trained."""
    return math.log(config.sum_modulus if task == "sum" else config.n_tokens)


def eval_task_batches(
    config: PlantedLMTargetConfig, n: int, seed: int, device: str | torch.device = "cpu"
) -> dict[str, tuple[Tensor, Tensor]]:
    """n held-out sequences per task (ids, scored), fixed by `seed`: what every per-task CE
    (target, masked, ablated, edited) is measured on, so the numbers compare."""
    data = PlantedTasks(config)
    gen = torch.Generator(device=device).manual_seed(seed)
    return {task: data.task_batch(task, n, gen) for task in config.tasks}


def task_ces(
    forward: Callable[[Tensor], Tensor],  # ids [b, t] -> logits [b, t, vocab]
    batches: dict[str, tuple[Tensor, Tensor]],
) -> dict[str, float]:
    """Per-task CE of the scored positions under any forward (target, masked, edited)."""
    with torch.no_grad():
        return {
            task: scored_ce(forward(ids), ids, sc).item() for task, (ids, sc) in batches.items()
        }


def report(
    model: ComponentModel, config: SPDConfig, ci_onehot: object, fig_dir: Path
) -> dict[str, Any]:
    """summary.json's `planted_tasks`: each task's scored CE for the target and the masked
    model under CI masks g, rounded CI (> `eval.ci_threshold`), all ones and all zeros
    (every decomposed subcomponent ablated), with chance; and figures/planted_tasks.png. Each
    task keeps its mechanism if its CE under CI masks stays near the target's."""
    target_config: PlantedLMTargetConfig = config.target  # type: ignore[assignment]
    device = next(model.parameters()).device
    n = max(8, config.eval.n_eval_samples // len(target_config.tasks))
    batches = eval_task_batches(target_config, n, config.seed + 4000, device)
    out: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for task, (ids, scored) in batches.items():
            record = model.record(ids)
            g, _ = model.importances(ids, record)
            masks = {
                "ci": g,
                "rounded": {k: (v > config.eval.ci_threshold).to(v.dtype) for k, v in g.items()},
                "ones": {k: torch.ones_like(v) for k, v in g.items()},
                "zero": {k: torch.zeros_like(v) for k, v in g.items()},
            }
            row = {"target": scored_ce(record.output, ids, scored).item()}
            for kind, m in masks.items():
                row[kind] = scored_ce(model.masked_forward(ids, m, record), ids, scored).item()
            row["chance"] = chance_ce(target_config, task)
            out[task] = {k: round(v, 5) for k, v in row.items()}
    plot_task_ces(out, fig_dir / "planted_tasks.png")
    return {"planted_tasks": out}


def plot_task_ces(table: dict[str, dict[str, float]], path: Path | None) -> Figure:
    """Grouped bars: per task, scored CE for each model (target, masked kinds, chance)."""
    kinds = ["target", "ci", "rounded", "ones", "zero", "chance"]
    fig, ax = new_figure(figsize=(1.6 + 1.4 * len(table), 3.2))
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        xs = [j + (i - len(kinds) / 2 + 0.5) * width for j in range(len(table))]
        ax.bar(xs, [table[t][kind] for t in table], width, label=kind)
    ax.set_xticks(range(len(table)), list(table))
    ax.set_ylabel("CE of the scored positions (nats)")
    ax.set_title("planted tasks: target and masked model")
    ax.legend(fontsize=7, ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    return finish(fig, path)


def build_planted_lm(config: PlantedLMTargetConfig) -> Transformer:
    return gpt_like(config.n_tokens + len(config.tasks), config)


def train_planted_lm(
    config: PlantedLMTargetConfig, seed: int, device: str = "cpu", progress: bool = False
) -> tuple[Transformer, dict]:
    """AdamW on next-token CE over the task mixture (every position: the random ones teach
    the model that they are random), then each task's scored CE on held-out sequences."""
    model = seeded_build(lambda: build_planted_lm(config), seed).to(device)
    train_next_token(model, PlantedTasks(config), config, seed, device, progress)
    model = model.cpu().eval()
    batches = eval_task_batches(config, 512, seed + 1000)
    ces = task_ces(model, batches)
    info = {
        "trained_seed": seed,
        "task_ce": {t: round(v, 5) for t, v in ces.items()},
        "task_ce_chance": {t: round(chance_ce(config, t), 5) for t in config.tasks},
        # which heads each task uses in this trained model (planted_heads: the ground truth
        # at head granularity; the expected mechanisms above are what training may find)
        "heads": head_report(model, batches, config.copy_offset),
    }
    log.info("planted_lm target: scored CE per task %s", info["task_ce"])
    return model.requires_grad_(False), info


def decode(config: PlantedLMTargetConfig, ids: list[int]) -> str:
    """Ids to text: content tokens as numbers, task tokens as <task>."""
    return " ".join(
        str(i) if i < config.n_tokens else f"<{config.tasks[i - config.n_tokens]}>" for i in ids
    )


def encode(config: PlantedLMTargetConfig, text: str) -> list[int]:
    """ "<induction> 3 17 5 ..." to ids: numbers are content tokens, <task> a task token."""
    ids = []
    for word in text.split():
        if word.startswith("<") and word.endswith(">"):
            if word[1:-1] not in config.tasks:
                raise ValueError(f"unknown task token {word}; known: {', '.join(config.tasks)}")
            ids.append(config.n_tokens + config.tasks.index(word[1:-1]))
        else:
            ids.extend(parse_token_ids(word, config.n_tokens))
    return ids
