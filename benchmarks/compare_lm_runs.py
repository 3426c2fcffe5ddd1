"""Compare finished language-model runs (induction, tiny_lm, hf): one table, one figure.

    python benchmarks/compare_lm_runs.py RUN_DIR [RUN_DIR ...] [--png FIG] [--md TABLE]

Reads each run's summary.json and config.yaml. Prints a markdown table (CE and KL to the
target under CI, stochastic and rounded-CI masks; CI-L0 per token per module; alive
subcomponents per module) and draws L0 (summed over modules, per token) against the KL
under CI masks, one point per run, labelled by its target and CI-function kind: the
trade-off a CI function is meant to improve (fewer active subcomponents at the same KL).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

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
        + " | L0 per token (Σ modules; per module) | alive / C per module |"
    )
    lines = [head, "|" + "---|" * (7 + len(MASKS))]
    for r in rows:
        lm = r["lm"]
        masks = " | ".join(f"{lm[m]['ce']:.3f} / {lm[m]['kl']:.3f}" for m in MASKS)
        l0 = " ".join(f"{v:.1f}" for v in r["l0"].values())
        alive = " ".join(f"{a}/{c}" for a, c in r["alive"].values())
        lines.append(
            f"| {r['run']} | {r['target']} | {r['ci_fn']} | {r['steps']} | "
            f"{lm['target']['ce']:.3f} | {masks} | {sum(r['l0'].values()):.1f}; {l0} | {alive} |"
        )
    return "\n".join(lines)


def figure(rows: list[dict], path: Path) -> None:
    targets = sorted({r["target"] for r in rows})
    kinds = sorted({r["ci_fn"] for r in rows})
    fig, axes = plt.subplots(1, len(targets), figsize=(4.5 * len(targets), 4), squeeze=False)
    colours = {k: f"C{i}" for i, k in enumerate(kinds)}
    for ax, target in zip(axes[0], targets, strict=True):
        mine = [r for r in rows if r["target"] == target]
        for r in mine:
            l0 = sum(r["l0"].values())
            for mask, marker in (("ci", "o"), ("rounded", "s")):
                ax.scatter(
                    l0,
                    r["lm"][mask]["kl"],
                    color=colours[r["ci_fn"]],
                    marker=marker,
                    facecolors="none" if mask == "rounded" else colours[r["ci_fn"]],
                    label=f"{r['ci_fn']}, {mask} masks",
                    s=60,
                )
        steps = "/".join(str(s) for s in sorted({r["steps"] for r in mine}))
        ax.set_title(f"{target} ({steps} steps)")
        ax.set_xlabel("CI-L0 per token, summed over modules")
        ax.set_ylabel("KL(target ‖ masked) [nats]")
        ax.set_ylim(bottom=0)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


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
