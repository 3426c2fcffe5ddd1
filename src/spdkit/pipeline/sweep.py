"""A grid of runs over config values and seeds, compared in one table and one figure.

    spdkit sweep resid_mlp1 --set importance_minimality_coeff=1e-6,1e-5,1e-4 --seeds 0,1,2

Each grid point is an ordinary run directory under the sweep directory, so a killed sweep picks
up where it stopped: finished runs are reused, interrupted ones resumed.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spdkit.analysis import plots
from spdkit.config import ConfigError, SPDConfig, load_config
from spdkit.store import runs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GridPoint:
    values: dict[str, Any]  # dotted key → value
    seed: int

    @property
    def name(self) -> str:
        parts = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in self.values.items()]
        return ",".join([*parts, f"seed{self.seed}"])

    @property
    def label(self) -> str:
        parts = [
            f"{_short(k)}={v:g}" if isinstance(v, float) else f"{_short(k)}={v}"
            for k, v in self.values.items()
        ]
        return " ".join([*parts, f"s{self.seed}"])


def _short(key: str) -> str:
    """Paper symbols for the keys people sweep most, else the last part of the key."""
    last = key.rsplit(".", 1)[-1]  # `loss.importance_minimality_coeff` or the flat name
    return {"importance_minimality_coeff": "β3", "pnorm": "p"}.get(last, last)


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """["a.b=1,2", "c=x"] → {"a.b": [1, 2], "c": ["x"]}; values read as `--set` reads them."""
    from spdkit.config import parse_override_value

    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"--set expects key=v1,v2,..., got {item!r}")
        if key in grid:
            raise ConfigError(f"--set {key} given twice")
        grid[key] = [parse_override_value(v) for v in values.split(",")]
    return grid


def grid_points(grid: dict[str, list[Any]], seeds: list[int]) -> list[GridPoint]:
    keys = list(grid)
    combos = itertools.product(*(grid[k] for k in keys)) if keys else [()]
    return [GridPoint(dict(zip(keys, c, strict=True)), s) for c in combos for s in seeds]


def point_config(base: str, point: GridPoint, overrides: dict[str, Any]) -> SPDConfig:
    return load_config(base, {**overrides, **point.values, "seed": point.seed})


def run_sweep(
    base: str,
    grid: dict[str, list[Any]],
    seeds: list[int],
    out: Path,
    overrides: dict[str, Any] | None = None,
    device: str = "cpu",
    progress: bool = True,
    target_path: Path | None = None,
    jobs: int = 1,
) -> list[dict[str, Any]]:
    """Run (or reuse, or resume) every grid point, then write sweep.json, sweep.md, sweep.png.
    Points with the same target config and seed share one trained target (or `target_path`).
    With `jobs` > 1, that many runs at a time in child processes (`spdkit.pipeline.jobs`)."""
    from spdkit.pipeline.run import resume_run, run_experiment

    points = grid_points(grid, seeds)
    configs = [point_config(base, p, overrides or {}) for p in points]  # validate all first
    out.mkdir(parents=True, exist_ok=True)
    if jobs > 1:
        _run_points_in_parallel(points, configs, out, jobs, device, progress, target_path)
    rows = []
    targets: dict[str, Path] = {}  # one trained target per (target config, seed), shared
    for i, (point, config) in enumerate(zip(points, configs, strict=True)):
        run_dir = out / point.name
        target_key = _target_key(config)
        log.info("sweep %d/%d: %s", i + 1, len(points), point.name)
        if (run_dir / "summary.json").exists():
            summary = json.loads((run_dir / "summary.json").read_text())
        elif (run_dir / "config.yaml").exists():
            summary = resume_run(run_dir, device, progress)
        else:
            reuse = target_path or targets.get(target_key)
            summary = run_experiment(config, run_dir, device, reuse, progress)
        targets.setdefault(target_key, run_dir)
        rows.append(sweep_row(point, summary, run_dir))
    write_sweep_report(rows, out, configs[0].eval.ci_threshold)
    return rows


def _target_key(config: SPDConfig) -> str:
    return json.dumps([config.target.model_dump(mode="json"), config.seed])


def _run_points_in_parallel(
    points: list[GridPoint],
    configs: list[SPDConfig],
    out: Path,
    jobs: int,
    device: str,
    progress: bool,
    target_path: Path | None,
) -> None:
    """Every unfinished point run to its end, `jobs` at a time: first the points that have a
    target or train one (one per target config and seed), then those that reuse one."""
    from spdkit.pipeline.jobs import run_jobs
    from spdkit.pipeline.run import copy_target, create_run_dir

    owners: dict[str, Path] = {}  # target key -> the run that trains (or holds) that target
    now: list[Path] = []
    later: list[tuple[Path, Path, SPDConfig]] = []  # (run, the run whose target it reuses)
    for point, config in zip(points, configs, strict=True):
        run_dir = out / point.name
        owner = owners.setdefault(_target_key(config), run_dir)
        if (run_dir / "summary.json").exists():
            continue
        if not (run_dir / "config.yaml").exists():
            create_run_dir(config, run_dir, target_path)
        if runs.has_target(run_dir) or owner == run_dir:
            now.append(run_dir)
        else:
            later.append((run_dir, owner, config))
    if now:
        run_jobs(now, min(jobs, len(now)), device, progress)
    for run_dir, owner, config in later:
        copy_target(owner, run_dir, config)
    if later:
        run_jobs([r for r, _, _ in later], min(jobs, len(later)), device, progress)


def sweep_row(point: GridPoint, summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The numbers that tell runs apart: losses, L0, and the target's ground-truth check."""
    row: dict[str, Any] = {
        "run": point.name,
        "label": point.label,
        "run_dir": str(run_dir),
        **point.values,
        "seed": point.seed,
        "stochastic_recon": summary["final_losses"].get("stochastic_recon"),
        "stochastic_recon_layerwise": summary["final_losses"].get("stochastic_recon_layerwise"),
        "ci_masked_mse": summary["output_losses"]["ci_masked"],
        "mean_ci_l0": sum(summary["mean_ci_l0"].values()),
    }
    if "feature_match" in summary:
        row["mmcs"] = summary["feature_match"]["mmcs"]
        row["ml2r"] = summary["feature_match"]["ml2r"]
        if "ground_truth" in summary["feature_match"]:
            row["ground_truth"] = summary["feature_match"]["ground_truth"]
    if "lm" in summary:  # KL to the target under each mask kind (incl. the PGD ladder)
        for kind, m in summary["lm"].items():
            if isinstance(m, dict) and "kl" in m and kind not in ("ones", "zero"):
                row[f"kl_{kind}"] = m["kl"]
    if "resid_mlp" in summary:
        v = summary["resid_mlp"]["verdict"]
        row["w_in_monosemantic"] = sum(m["features_monosemantic"] for m in v["w_in"].values())
        if all("features_faint_leak" in m for m in v["w_in"].values()):  # since 2026-12-07
            row["w_in_faint_leak"] = sum(m["features_faint_leak"] for m in v["w_in"].values())
        row["w_in_other"] = sum(m["subcomponents_other"] for m in v["w_in"].values())
        row["w_out_dense"] = v["w_out"]["dense"]
        row["w_out_other"] = v["w_out"]["other"]
        row["ground_truth"] = v["ground_truth"]
        nc = summary["resid_mlp"].get("neuron_contributions")
        if nc:
            row["neuron_contribution_r"] = nc["pearson_r"]
    return row


MEASURES = (  # the columns of a sweep row that are results, not settings
    "stochastic_recon",
    "stochastic_recon_layerwise",
    "ci_masked_mse",
    "mean_ci_l0",
    "mmcs",
    "ml2r",
    "w_in_monosemantic",
    "w_in_faint_leak",
    "w_in_other",
    "w_out_dense",
    "w_out_other",
    "neuron_contribution_r",
)


def across_seeds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per grid value: how many seeds reach the ground truth, and the mean [min, max]
    of every result over the seeds. This is the sensitivity picture: a setting that works
    for one seed in three is not the same finding as one that always works."""
    measures = [*MEASURES, *(k for k in rows[0] if k.startswith("kl_"))] if rows else []
    not_settings = {"run", "label", "run_dir", "seed", "ground_truth", *measures}
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        settings = {k: v for k, v in row.items() if k not in not_settings}
        groups.setdefault(json.dumps(settings, sort_keys=True), []).append(row)
    out = []
    for key, group in groups.items():
        summary: dict[str, Any] = {**json.loads(key), "seeds": len(group)}
        if any("ground_truth" in r for r in group):
            reached = sum(bool(r.get("ground_truth")) for r in group)
            summary["ground_truth"] = f"{reached}/{len(group)}"
        for k in measures:
            vals = [r[k] for r in group if isinstance(r.get(k), int | float)]
            if vals:
                mean, lo, hi = sum(vals) / len(vals), min(vals), max(vals)
                summary[k] = f"{_fmt(mean)} [{_fmt(lo)}, {_fmt(hi)}]"
        out.append(summary)
    return out


def write_sweep_report(rows: list[dict[str, Any]], out: Path, threshold: float) -> None:
    runs.atomic_write_text(out / "sweep.json", json.dumps(rows, indent=2))
    table = markdown_table(rows)
    if len({r["seed"] for r in rows}) > 1:
        table += "\nAcross seeds (mean [min, max]):\n\n" + markdown_table(across_seeds(rows))
    runs.atomic_write_text(out / "sweep.md", table)
    cis = {}
    for row in rows:
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        one_hot = summary.get("ci_one_hot")  # toy targets with input features
        if one_hot is not None:
            cis[row["label"]] = {n: torch.tensor(v) for n, v in one_hot["ci"].items()}
    if cis:
        plots.plot_ci_grid(cis, out / "sweep.png", threshold, "CI on one-hot inputs")
    kls = [k for k in rows[0] if k.startswith("kl_stochastic") or k.startswith("kl_pgd_")]
    if kls:  # language models: the Pareto front of sparsity against faithfulness
        points = [{"label": r["label"], "l0": r["mean_ci_l0"], **r} for r in rows]
        plots.plot_pareto(points, out / "sweep_pareto.png", kls, "sweep: L0 against KL")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    skip = {"run_dir", "label"}
    keys = [k for k in rows[0] if k not in skip] if rows else []
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(k)) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
