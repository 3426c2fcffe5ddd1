"""Does the objective keep the true decomposition? The diagnosis of a run that missed it.

For a finished run of a target with a known answer (TMS, the residual MLPs), four models, each
scored on the run's own evaluation (same samples, same masks, same coefficients):

    found     the run's components and CI function: the minimum it reached
    found+ci  the same components, the CI function trained on for --ci-steps with U, V frozen
    truth     U, V set to the true decomposition (`start_at_truth`), a fresh CI function
              trained for --ci-steps with U, V frozen
    free      from `truth`, everything trained for --free-steps with the run's recipe (its
              lr schedule compressed to that length)

If `truth` has a lower total loss than `found+ci` and `free` stays at the truth, the objective
prefers the right answer and the recipe's optimisation misses it; if `truth` costs more, or
`free` walks away, the objective itself prefers what the run found, and the loss terms say
which term pays for it. Each model's summary.json and figures go to OUT/<name>/; the table to
OUT/ground_truth_start.json and stdout.

    python benchmarks/ground_truth_start.py RUN_DIR --out OUT [--ci-steps 4000] [--free-steps N]
        [--set KEY=VALUE ...] [--truth-only]

`--set` changes the objective for every phase and every score (e.g. the end of a p-anneal
held fixed: `--set importance.pnorm_anneal=null --set importance.pnorm=0.4`): does the truth
survive the objective a schedule ends with? `--truth-only` skips the run's own minimum (a run
stopped early, read from its checkpoint, serves as the target and config).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import torch

from spdkit.analysis.mechanisms.ground_truth import start_at_truth
from spdkit.api import Decomposition
from spdkit.config import SPDConfig, load_config, parse_override_value
from spdkit.method.model import ComponentModel
from spdkit.store import runs
from spdkit.store.restore import restore
from spdkit.targets import data_source
from spdkit.training.loop import build_trainer
from spdkit.training.trainer import Trainer


def with_training(config: SPDConfig, steps: int, constant_lr: bool) -> SPDConfig:
    """The run's config with `steps` training steps (its schedule compressed to them), no
    faithfulness warm-up, optionally a constant learning rate."""
    training = config.training.model_copy(deep=True)
    training.steps = steps
    training.faithfulness_warmup.steps = 0
    if constant_lr:
        training.optimizer.lr_schedule = "constant"
        training.optimizer.warmup_frac = 0.0
    return config.model_copy(update={"training": training})


def train(model: ComponentModel, config: SPDConfig, freeze_components: bool) -> None:
    """Train `model` in place under `config`; with `freeze_components` only the CI function."""
    for p in model.component_parameters():
        p.requires_grad_(not freeze_components)
    target_data = data_source(config)
    trainer = Trainer(model, target_data, config, "cpu")
    trainer.run(progress=True)
    for p in model.component_parameters():
        p.requires_grad_(True)


def score(model: ComponentModel, config: SPDConfig, out: Path) -> dict[str, Any]:
    """The run's evaluation of `model` into out/ (summary.json, figures/): loss terms,
    CI-L0, and the target's verdict."""
    out.mkdir(parents=True, exist_ok=True)
    summary = Decomposition(model, config).evaluate(out, progress=False)
    row: dict[str, Any] = dict(summary["final_losses"])
    row["ci_l0"] = sum(summary["mean_ci_l0"].values())
    row["non_negligible"] = {n: m["n_non_negligible"] for n, m in summary["modules"].items()}
    if "feature_match" in summary:
        fm = summary["feature_match"]
        row.update(mmcs=fm["mmcs"], ml2r=fm["ml2r"], ground_truth=fm.get("ground_truth"))
    if "resid_mlp" in summary:
        verdict = summary["resid_mlp"]["verdict"]
        row["ground_truth"] = verdict["ground_truth"]
        row["w_out"] = verdict["w_out"]  # dense / dead / other: how W_out's pieces fire
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ci-steps", type=int, default=4000)
    parser.add_argument("--free-steps", type=int, default=None, help="default: the run's steps")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--truth-only", action="store_true", help="skip found and found+ci")
    args = parser.parse_args()

    overrides = {k: parse_override_value(v) for k, _, v in (s.partition("=") for s in args.sets)}
    config = load_config(args.run_dir / "config.yaml", overrides)
    ci_config = with_training(config, args.ci_steps, constant_lr=True)
    rows = {}
    if not args.truth_only:
        found, _, _ = restore(args.run_dir)
        rows["found"] = score(found, config, args.out / "found")
        found_ci = copy.deepcopy(found)
        train(found_ci, ci_config, freeze_components=True)
        rows["found+ci"] = score(found_ci, config, args.out / "found+ci")

    target, _ = runs.load_target(args.run_dir, config.target)
    truth = build_trainer(target, data_source(config), config, "cpu").model  # fresh CI function
    start_at_truth(truth, config)
    train(truth, ci_config, freeze_components=True)
    rows["truth"] = score(truth, config, args.out / "truth")

    free = copy.deepcopy(truth)
    train(free, with_training(config, args.free_steps or config.training.steps, False), False)
    rows["free"] = score(free, config, args.out / "free")

    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "run_dir": str(args.run_dir),
        "ci_steps": args.ci_steps,
        "free_steps": args.free_steps or config.training.steps,
        "overrides": overrides,
        "rows": rows,
    }
    (args.out / "ground_truth_start.json").write_text(json.dumps(record, indent=1))
    first = next(iter(rows.values()))
    terms = [k for k in first if isinstance(first[k], float)]
    print(f"{'':10}" + "".join(f"{k[:14]:>15}" for k in terms) + "  non-negligible / ground truth")
    for name, row in rows.items():
        vals = "".join(f"{row[k]:15.5g}" for k in terms)
        print(f"{name:10}{vals}  {row['non_negligible']} {row.get('ground_truth')}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
