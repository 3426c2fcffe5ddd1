"""Compare finished language-model runs (induction, tiny_lm, hf): one table, one figure.

    python benchmarks/compare_lm_runs.py RUN_DIR [RUN_DIR ...] [--png FIG] [--md TABLE]

Reads each run's summary.json and config.yaml. Prints a markdown table (CE and KL to the
target under CI, stochastic and rounded-CI masks; KL under the fresh-PGD ladder; CI-L0 per
token per module; alive subcomponents per module) and draws L0 (summed over modules, per token) against the KL
under CI masks, one point per run, labelled by its target and CI-function kind: the
trade-off a CI function is meant to improve (fewer active subcomponents at the same KL).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from spdkit import plots

MASKS = ("ci", "stochastic", "rounded")


def read_run(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    if "lm" not in summary:
        raise SystemExit(f"{run_dir}: not a language-model run (no `lm` in summary.json)")
    kind = (config.get("ci_fn") or {}).get("kind", "mlp")
    modules = summary["modules"]
    return {
        "run": run_dir.name,
        "target": config["target"]["kind"],
        "ci_fn": kind,
        "steps": config["steps"],
        "lm": summary["lm"],
        "l0": summary["mean_ci_l0"],
        "alive": {n: (m.get("n_alive"), m["C"]) for n, m in modules.items()},
    }


def table(rows: list[dict]) -> str:
    head = (
        "| run | target | ci_fn | steps | CE target | "
        + " | ".join(f"CE / KL {m}" for m in MASKS)
        + " | KL fresh PGD (20 / 40 / 80 steps) | L0 per token (Σ modules; per module)"
        + " | alive / C per module |"
    )
    lines = [head, "|" + "---|" * (8 + len(MASKS))]
    for r in rows:
        lm = r["lm"]
        masks = " | ".join(f"{lm[m]['ce']:.3f} / {lm[m]['kl']:.3f}" for m in MASKS)
        l0 = " ".join(f"{r['l0'][n]:.1f}" for n in sorted(r["l0"]))  # by module name
        alive = " ".join("{}/{}".format(*r["alive"][n]) for n in sorted(r["alive"]))
        pgd = " / ".join(f"{lm[k]['kl']:.3f}" for k in lm if k.startswith("pgd_")) or "–"
        lines.append(
            f"| {r['run']} | {r['target']} | {r['ci_fn']} | {r['steps']} | "
            f"{lm['target']['ce']:.3f} | {masks} | {pgd} | {sum(r['l0'].values()):.1f}; {l0} "
            f"| {alive} |"
        )
    return "\n".join(lines)


def figure(rows: list[dict], path: Path) -> None:
    """L0 against the KL under CI masks and rounded CI masks, one colour per run."""
    points = [
        {
            "label": f"{r['target']} {r['ci_fn']} ({r['steps']} steps)",
            "l0": sum(r["l0"].values()),
            "KL, CI masks": r["lm"]["ci"]["kl"],
            "KL, rounded CI": r["lm"]["rounded"]["kl"],
        }
        for r in rows
    ]
    plots.plot_pareto(points, path, ["KL, CI masks", "KL, rounded CI"], "L0 against KL per run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--png", type=Path, help="write the L0-vs-KL figure here")
    args = parser.parse_args()
    rows = [read_run(p) for p in args.runs]
    print(table(rows))
    if args.png:
        figure(rows, args.png)
        print(f"figure: {args.png}")


if __name__ == "__main__":
    main()
