"""Per-seed table of finished TMS runs (issue 28's acceptance tables): the verdict and the
numbers that explain a miss, read from each run's `summary.json`.

    python benchmarks/tms_seed_table.py RUN_DIR [RUN_DIR ...] [--module M] [--json OUT.json]
        [--note TEXT]

A row per run: MMCS and ML2R of the first module, non-negligible subcomponents per module, the
final total loss, each start's total at the selection step where the run had several
(`training.candidates`), and for one module (`--module`, default the last) how many features have 1, 2, ... subcomponents on
(CI > 0.5 at the one-hot input) and the most features one subcomponent is on for. The last two
show the `tms_40-10` failure (a few dense subcomponents that each fire for many features), which
MMCS alone hides. Prints a markdown table; `--json` writes the rows too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ON = 0.5  # a subcomponent is "on" for a feature when its CI at that one-hot input is above this


def seed_row(run: Path, module: str | None = None) -> dict[str, Any]:
    """One run's row; `summary.json` must exist (the run finished or was evaluated). The
    per-feature counts are of `module` (default: the last decomposed module)."""
    summary = json.loads((run / "summary.json").read_text())
    config_seed = _seed(run)
    match = summary["feature_match"]
    last = module or list(summary["ci_one_hot"]["ci"])[-1]
    on = np.asarray(summary["ci_one_hot"]["ci"][last]) > ON  # [features, C]
    per_feature = on.sum(axis=1)
    return {
        "run": str(run),
        "seed": config_seed,
        "mmcs": round(float(match["mmcs"]), 5),
        "ml2r": round(float(match["ml2r"]), 4),
        "non_negligible": match["non_negligible"],
        "ground_truth": bool(match["ground_truth"]),
        "total": summary["final_losses"]["total"],
        f"{last}_features_by_active_subcomponents": np.bincount(per_feature).tolist(),
        f"{last}_most_features_on_one_subcomponent": int(on.sum(axis=0).max()),
        "ms_per_step": summary["timing"]["ms_per_step"],
        **_candidates(run),
    }


def _candidates(run: Path) -> dict[str, Any]:
    """With `training.candidates`: each start's total at the selection step and the choice."""
    path = run / "candidates.json"
    if not path.is_file():
        return {}
    record = json.loads(path.read_text())
    return {
        "candidate_totals": [c["total"] for c in record["candidates"]],
        "chosen": record["chosen"],
    }


def _seed(run: Path) -> int | None:
    return yaml.safe_load((run / "config.yaml").read_text()).get("seed")


def markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no finished runs)"
    last = next(k for k in rows[0] if k.endswith("_features_by_active_subcomponents"))
    module = last.removesuffix("_features_by_active_subcomponents")
    lines = [
        f"| run | seed | MMCS | ML2R | non-negligible | total | `{module}`: features with 0 / 1 / 2 "
        f"/ … subcomponents on | most features on one | starts at selection (chosen) | "
        "ground truth |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        counts = " / ".join(str(n) for n in r[last])
        nn = " / ".join(str(v) for v in r["non_negligible"].values())
        lines.append(
            f"| {r['run']} | {r['seed']} | {r['mmcs']:.5f} | {r['ml2r']:.4f} | {nn} | "
            f"{r['total']:.6f} | {counts} | {r[f'{module}_most_features_on_one_subcomponent']} | "
            f"{_starts(r)} | {'**yes**' if r['ground_truth'] else 'no'} |"
        )
    return "\n".join(lines)


def _starts(row: dict[str, Any]) -> str:
    if "chosen" not in row:
        return "one start"
    totals = [f"{t:.6f}" for t in row["candidate_totals"]]
    totals[row["chosen"]] = f"**{totals[row['chosen']]}**"
    return " / ".join(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--module", help="count features per subcomponent here (default: last)")
    parser.add_argument("--note", default="", help="a line stored with the rows")
    args = parser.parse_args()
    missing = [str(r) for r in args.runs if not (r / "summary.json").is_file()]
    if missing:
        parser.error(f"no summary.json (not finished or not evaluated): {', '.join(missing)}")
    rows = [seed_row(r, args.module) for r in args.runs]
    print(markdown(rows))
    if args.json:
        payload = {"note": args.note, "rows": rows}
        args.json.write_text(json.dumps(payload, separators=(",", ":")) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
