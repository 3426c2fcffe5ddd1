"""Labels in words for harvested subcomponents and clusters (issue 30): the token-statistics
label, built from `spdkit harvest`'s token tables alone. It is the baseline a language model's
label has to beat (the endpoint labels and their detection scores are not built yet), and it
stands alone when no endpoint is given.

A token t describes a subcomponent's firing well when both P(t | fires) (precision: how much
of the firing it covers) and P(fires | t) (recall: how reliably it fires on t) are high; the
label names the input tokens, then the next tokens, with the best F1 = 2PR / (P + R):

    in "the" (P 0.62, R 0.91), " a" (P 0.20, R 0.85); next "cat" (P 0.40, R 0.30)

`RUN_DIR/harvest/labels.parquet` (a public contract, with the harvest): one row per labelled
name: `name`, `label`, `source` ("token statistics"), `f1` (of the best token, 0 when none
passed `min_f1`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from spdkit.analysis.harvest import HARVEST_DIR, read_harvest
from spdkit.store import atomic

LABELS_FILE = "labels.parquet"
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


def write_labels(run_dir: Path, top: int | None = None) -> list[dict[str, Any]]:
    """Label the run's harvest (`spdkit label`), written to harvest/labels.parquet atomically;
    ValueError in one line when the run has no harvest."""
    harvested = read_harvest(run_dir)
    if not harvested:
        raise ValueError(f"no harvest in {run_dir}: run `spdkit harvest {run_dir}` first")
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = label_rows(harvested, top)
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    atomic.atomic_write_bytes(
        Path(run_dir) / HARVEST_DIR / LABELS_FILE, buffer.getvalue().to_pybytes()
    )
    return rows
