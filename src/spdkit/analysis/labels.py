"""Labels in words for harvested subcomponents and clusters: the token-statistics label, built
from `spdkit harvest`'s token tables alone, and, with an OpenAI-compatible chat endpoint, a
language model's label from the same evidence plus the top contexts, each scored by detection.
The token-statistics label is the baseline the model's label has to beat, and stands alone
when no endpoint is given.

A token t describes a subcomponent's firing well when both P(t | fires) (precision: how much
of the firing it covers) and P(fires | t) (recall: how reliably it fires on t) are high; the
label names the input tokens, then the next tokens, with the best F1 = 2PR / (P + R):

    in "the" (P 0.62, R 0.91), " a" (P 0.20, R 0.85); next "cat" (P 0.40, R 0.30)

**Detection score** (how well a label predicts firing on held-out text): k contexts where the
subcomponent fires and k where it does not, drawn from a fresh held-out pass (not the
contexts the labeller saw), shuffled, shown to the endpoint with the label; it answers the
numbers of the contexts it predicts firing on. Balanced accuracy = (TPR + TNR) / 2: 0.5 is
chance. Both labels are scored the same way, by the same endpoint, on the same contexts.

`RUN_DIR/harvest/labels.parquet` (a public contract, with the harvest): one row per labelled
name: `name`, `label`, `source` ("token statistics" or the endpoint's model name), `f1` (of the
best token, 0 when none passed `min_f1`); with an endpoint also `statistics_label`,
`detection` and `statistics_detection` (balanced accuracies, null when not scored). Endpoint
answers are kept in `harvest/label_requests.jsonl` as they come, so a rerun resumes.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from spdkit import files
from spdkit.analysis.harvest import HARVEST_DIR, read_harvest
from spdkit.method.measures import causal_importance
from spdkit.method.model import ComponentModel

LABELS_FILE = "labels.parquet"
REQUESTS_FILE = "label_requests.jsonl"
STATISTICS = "token statistics"


def f1(row: Mapping[str, Any]) -> float:
    """2PR / (P + R) of one token-table row."""
    p, r = float(row["precision"]), float(row["recall"])
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def best_tokens(
    rows: Sequence[Mapping[str, Any]], n: int = 3, min_f1: float = 0.1
) -> list[Mapping[str, Any]]:
    """The n token rows with the highest F1, those with F1 ≥ min_f1 only."""
    ranked = sorted(rows, key=f1, reverse=True)
    return [r for r in ranked[:n] if f1(r) >= min_f1]


def statistics_label(entry: Mapping[str, Any], n: int = 3, min_f1: float = 0.1) -> str:
    """A short label from a harvested row's input / next token tables (module docstring); for a
    subcomponent no token describes, its density."""
    parts = []
    for side, key in (("in", "input_tokens"), ("next", "next_tokens")):
        best = best_tokens(entry.get(key) or [], n, min_f1)
        if best:
            shown = ", ".join(
                f"{r['text']!r} (P {float(r['precision']):.2f}, R {float(r['recall']):.2f})"
                for r in best
            )
            parts.append(f"{side} {shown}")
    if parts:
        return "; ".join(parts)
    return (
        f"no token describes it (fires on {100 * float(entry.get('density', 0)):.2g} % of tokens)"
    )


def label_rows(harvested: Mapping[str, Mapping[str, Any]], top: int | None) -> list[dict[str, Any]]:
    """One labels.parquet row per name, the `top` most-firing ones (all when None)."""
    names = sorted(harvested, key=lambda k: -int(harvested[k].get("n_fire", 0)))
    rows = []
    for name in names[:top] if top is not None else names:
        entry = harvested[name]
        best = [
            f1(r)
            for key in ("input_tokens", "next_tokens")
            for r in best_tokens(entry.get(key) or [], 1)
        ]
        rows.append(
            {
                "name": name,
                "label": statistics_label(entry),
                "source": STATISTICS,
                "f1": round(max(best, default=0.0), 4),
            }
        )
    return rows


def label_prompt(entry: Mapping[str, Any], n_contexts: int = 8) -> str:
    """What the labeller sees: the top contexts (firing token in [brackets]) and the token
    statistics, and what to answer."""
    contexts = "\n".join(f"- {context_text(c)}" for c in (entry.get("top") or [])[:n_contexts])
    return (
        "A component of a language model fires on the token in [brackets] in these texts:\n"
        f"{contexts}\nToken statistics: {statistics_label(entry)}\n"
        "Describe in at most 12 words what it responds to. Answer with the description only."
    )


def context_text(context: Mapping[str, Any]) -> str:
    """A harvested context as text with its firing token in [brackets]."""
    tokens, at = context["tokens"], context["at"]
    return "".join(tokens[:at]) + "[" + tokens[at] + "]" + "".join(tokens[at + 1 :])


def parse_label(answer: str) -> str:
    """The first non-empty line of the answer, without quotes or a 'Label:' prefix, ≤ 120
    characters."""
    line = next((x.strip() for x in answer.splitlines() if x.strip()), "")
    line = re.sub(r"^(label|description)\s*:\s*", "", line, flags=re.IGNORECASE).strip("\"' ")
    return line[:120] or "(no label)"


def detection_prompt(label: str, texts: Sequence[str]) -> str:
    numbered = "\n".join(f"{i + 1}. {t}" for i, t in enumerate(texts))
    return (
        f'A component of a language model is described as: "{label}".\n'
        "In which of these texts does it fire on the token in [brackets]?\n"
        f"{numbered}\nAnswer with the numbers only, separated by commas (none: 0)."
    )


def parse_detection(answer: str, n: int) -> list[bool]:
    """Which of the n numbered texts the answer picks (numbers outside 1..n are ignored)."""
    picked = {int(x) for x in re.findall(r"\d+", answer)}
    return [i + 1 in picked for i in range(n)]


def balanced_accuracy(predicted: Sequence[bool], fired: Sequence[bool]) -> float:
    """(TPR + TNR) / 2 over contexts with known firing (both kinds present)."""
    pos = [p for p, f in zip(predicted, fired, strict=True) if f]
    neg = [p for p, f in zip(predicted, fired, strict=True) if not f]
    if not pos or not neg:
        raise ValueError("balanced accuracy needs firing and non-firing contexts")
    return 0.5 * (sum(pos) / len(pos) + sum(not p for p in neg) / len(neg))


def detection(
    ask: Callable[[str], str], label: str, contexts: Sequence[tuple[str, bool]], seed: int = 0
) -> float:
    """Balanced accuracy of the endpoint's firing predictions from `label` on `contexts`
    (text, fired), shown in a seeded shuffle so position tells nothing."""
    order = list(range(len(contexts)))
    random.Random(seed).shuffle(order)
    texts = [contexts[i][0] for i in order]
    predicted = parse_detection(ask(detection_prompt(label, texts)), len(texts))
    return balanced_accuracy(predicted, [contexts[i][1] for i in order])


def held_out_contexts(
    model: ComponentModel,
    batches: Iterator[Tensor],
    names: Sequence[str],
    clusters: Mapping[str, Sequence[str]],
    decode: Callable[[list[int]], str],
    threshold: float,
    k: int = 10,
    window: int = 16,
    max_tokens: int = 20_000,
    seed: int = 0,
) -> dict[str, list[tuple[str, bool]]]:
    """Up to k contexts (`window` tokens ending at the token, firing token in [brackets]) where
    each name fires (CI > threshold; a cluster: any member) and k where it does not, from
    token batches [B, T] read until every name has both or `max_tokens` are read; positions
    drawn at random within each batch."""
    gen = torch.Generator().manual_seed(seed)
    found: dict[str, dict[bool, list[str]]] = {n: {True: [], False: []} for n in names}
    seen = 0
    for ids in batches:
        ci = causal_importance(model, ids)
        flat_ids = ids.cpu().flatten()
        T = ids.shape[1]
        for name in names:
            if all(len(found[name][f]) >= k for f in (True, False)):
                continue
            members = clusters.get(name, [name])
            fires = torch.zeros(ids.shape, dtype=torch.bool)
            for member in members:
                module, _, index = member.rpartition(":")
                fires |= (ci[module][..., int(index)] > threshold).cpu()
            fires = fires.flatten()
            for fired in (True, False):
                need = k - len(found[name][fired])
                where = (fires == fired).nonzero().flatten()
                pick = where[torch.randperm(len(where), generator=gen)[: max(0, need)]]
                for pos in pick.tolist():
                    start = pos - min(pos % T, window - 1)  # within its sequence
                    tokens = [decode([i]) for i in flat_ids[start : pos + 1].tolist()]
                    found[name][fired].append("".join(tokens[:-1]) + "[" + tokens[-1] + "]")
        seen += ids.numel()
        done = all(len(found[n][f]) >= k for n in names for f in (True, False))
        if done or seen >= max_tokens:
            break
    return {n: [(t, f) for f in (True, False) for t in found[n][f]] for n in names}


def read_journal(journal: Path) -> list[dict[str, Any]]:
    """The answers a labelling run has appended so far. A run killed mid-append leaves its
    last line cut off: that line is dropped (its label is asked again) and cut from the file,
    so the next append starts on a line of its own."""
    if not journal.is_file():
        return []
    text = journal.read_text()
    lines = text.splitlines()
    if text and not text.endswith("\n"):
        lines.pop()
        files.atomic_write_text(journal, "".join(line + "\n" for line in lines))
    return [json.loads(line) for line in lines if line]


def endpoint_label_rows(
    harvested: Mapping[str, Mapping[str, Any]],
    rows: list[dict[str, Any]],
    ask: Callable[[str], str],
    source: str,
    contexts: Mapping[str, Sequence[tuple[str, bool]]],
    journal: Path,
    on_row: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """The model's label for each of `rows` (token-statistics rows) and both labels' detection
    scores where `contexts` has the name's held-out contexts; answers already in `journal`
    (JSON lines) are reused, new ones appended as they come."""
    done = {e["name"]: e for e in read_journal(journal) if e.get("source") == source}
    out = []
    with journal.open("a") as log:
        for row in rows:
            name = row["name"]
            if name not in done:
                entry = {"name": name, "source": source}
                entry["label"] = parse_label(ask(label_prompt(harvested[name])))
                ctx = contexts.get(name)
                ok = ctx is not None and any(f for _, f in ctx) and not all(f for _, f in ctx)
                entry["detection"] = detection(ask, entry["label"], ctx) if ok else None
                entry["statistics_detection"] = detection(ask, row["label"], ctx) if ok else None
                log.write(json.dumps(entry) + "\n")
                log.flush()
                done[name] = entry
            entry = done[name]
            out.append(
                {
                    **row,
                    "label": entry["label"],
                    "source": source,
                    "statistics_label": row["label"],
                    "detection": entry["detection"],
                    "statistics_detection": entry["statistics_detection"],
                }
            )
            if on_row is not None:
                on_row()
    return out


def write_labels(
    run_dir: Path,
    top: int | None = None,
    label_with: Callable[[Mapping[str, Any], list[dict[str, Any]], Path], list[dict[str, Any]]]
    | None = None,
) -> list[dict[str, Any]]:
    """Label the run's harvest (`spdkit label`), written to harvest/labels.parquet atomically;
    `label_with(harvested, statistics rows, journal path)` replaces the token-statistics rows
    by an endpoint's (`endpoint_label_rows`). ValueError in one line when the run has no
    harvest."""
    harvested = read_harvest(run_dir)
    if not harvested:
        raise ValueError(f"no harvest in {run_dir}: run `spdkit harvest {run_dir}` first")
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = label_rows(harvested, top)
    if label_with is not None:
        rows = label_with(harvested, rows, Path(run_dir) / HARVEST_DIR / REQUESTS_FILE)
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    files.atomic_write_bytes(
        Path(run_dir) / HARVEST_DIR / LABELS_FILE, buffer.getvalue().to_pybytes()
    )
    return rows
