"""Compare finished language-model runs (induction, tiny_lm, hf): one table, one figure.

    python benchmarks/compare_lm_runs.py RUN_DIR [RUN_DIR ...] [--png FIG] > TABLE.md

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

from spdkit.config import load_config

MASKS = ("ci", "stochastic", "rounded")


def read_run(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    config = load_config(run_dir / "config.yaml")  # any layout a run directory was written in
    if "lm" not in summary:
        raise SystemExit(f"{run_dir}: not a language-model run (no `lm` in summary.json)")
    modules = summary["modules"]
    return {
        "run": run_dir.name,
        "target": config.target.kind,
        "objective": "VPD" if config.loss.adversarial_recon_coeff > 0 else "SPD",
        "beta3": config.loss.importance_minimality_coeff,
        "ci_fn": config.ci_fn.kind,
        "steps": config.training.steps,
        "lm": summary["lm"],
        "l0": summary["mean_ci_l0"],
        "alive": {n: (m.get("n_alive"), m["C"]) for n, m in modules.items()},
    }


def table(rows: list[dict]) -> str:
    head = (
        "| run | target | objective (β3) | ci_fn | steps | CE target | "
        + " | ".join(f"CE / KL {m}" for m in MASKS)
        + " | KL fresh PGD (20 / 40 / 80 steps) | L0 per token (Σ modules; per module)"
        + " | alive / C per module |"
    )
    lines = [head, "|" + "---|" * (9 + len(MASKS))]
    for r in rows:
        lm = r["lm"]
        masks = " | ".join(f"{lm[m]['ce']:.3f} / {lm[m]['kl']:.3f}" for m in MASKS)
        l0 = " ".join(f"{r['l0'][n]:.1f}" for n in sorted(r["l0"]))  # by module name
        alive = " ".join("{}/{}".format(*r["alive"][n]) for n in sorted(r["alive"]))
        pgd = " / ".join(f"{lm[k]['kl']:.3f}" for k in lm if k.startswith("pgd_")) or "–"
        lines.append(
            f"| {r['run']} | {r['target']} | {r['objective']} ({r['beta3']:g}) | {r['ci_fn']} "
            f"| {r['steps']} | "
            f"{lm['target']['ce']:.3f} | {masks} | {pgd} | {sum(r['l0'].values()):.1f}; {l0} "
            f"| {alive} |"
        )
    return "\n".join(lines)


def figure(rows: list[dict], path: Path) -> None:
    """Per target, L0 against the KL under stochastic masks (o) and under the strongest fresh
    PGD attack (^), one colour per objective, each point labelled with its β3: the better
    decomposition at the same L0 is the lower one, and a PGD KL far above the stochastic one
    means the CI lets through ablations that break the model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted({r["target"] for r in rows})
    fig, axes = plt.subplots(1, len(targets), figsize=(5.5 * len(targets), 4.2), squeeze=False)
    colours = {"SPD": "C0", "VPD": "C3"}
    for ax, target in zip(axes[0], targets, strict=True):
        for r in (r for r in rows if r["target"] == target):
            l0 = sum(r["l0"].values())
            pgd = [k for k in r["lm"] if k.startswith("pgd_")]
            strongest = max(pgd, key=lambda k: int(k.split("_")[1])) if pgd else None
            c = colours[r["objective"]]
            ax.scatter(l0, r["lm"]["stochastic"]["kl"], color=c, marker="o", s=45)
            if strongest:
                ax.scatter(l0, r["lm"][strongest]["kl"], color=c, marker="^", s=55)
            top = r["lm"][strongest]["kl"] if strongest else r["lm"]["stochastic"]["kl"]
            ax.annotate(f"{r['objective']} β3={r['beta3']:g}", (l0, top), fontsize=7)
        for name, c in colours.items():
            ax.scatter([], [], color=c, marker="s", label=name)
        ax.scatter([], [], color="k", marker="o", label="KL, stochastic masks")
        ax.scatter([], [], color="k", marker="^", label="KL, fresh PGD (most steps)")
        ax.set(xlabel="CI-L0 per token, summed over modules", ylabel="KL(target ‖ masked)")
        ax.set_yscale("log")
        ax.set_title(target, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
