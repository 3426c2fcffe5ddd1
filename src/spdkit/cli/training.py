"""`spdkit run`, `resume`, `sweep`: training runs, and the summary they print."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from spdkit.cli.common import (
    NPROC_HELP,
    USER_ERRORS,
    _fail,
    _identity_spec,
    _interrupted,
    _join_ranks,
    _parse_overrides,
    app,
    hf_target_override,
)
from spdkit.config import ConfigError, load_config


def _w_in_line(m: dict) -> str:
    """'73 (faint leak 20, shared owner 7)': monosemantic features and why the rest fail
    (summaries written before 2026-12-07 have only the first count)."""
    why = [
        f"{label} {m[key]}"
        for key, label in (
            ("features_faint_leak", "faint leak"),
            ("features_shared_owner", "shared owner"),
        )
        if m.get(key)
    ]
    return f"{m['features_monosemantic']}" + (f" ({', '.join(why)})" if why else "")


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _recovered(masked: dict[str, float]) -> str:
    gap = masked.get("ce_gap_recovered")
    return "" if gap is None else f", gap recovered {gap:.0%}"


def _print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    """The headline numbers of a run, then where everything else is."""
    if not summary:  # a data-parallel rank other than 0, done: rank 0 evaluates and prints
        from spdkit.engine.distributed import leave

        leave()
    fl = summary["final_losses"]
    typer.echo("\n== spdkit summary ==")
    typer.echo("final losses: " + ", ".join(f"{k} {v:.4g}" for k, v in fl.items()))
    typer.echo(
        "output divergence vs target: "
        + ", ".join(f"{k} {v:.3g}" for k, v in summary["output_losses"].items())
    )
    if "feature_match" in summary:
        fm = summary["feature_match"]
        paper = fm.get("paper")
        table = paper.get("table", "paper Table 1") if paper else ""
        ref = f"  ({table}: {paper['mmcs']:.3f}, {paper['ml2r']:.3f})" if paper else ""
        typer.echo(
            f"feature match on {fm['module']}: MMCS {fm['mmcs']:.4f}  ML2R {fm['ml2r']:.4f}{ref}"
        )
        if "ground_truth" in fm:
            live = ", ".join(
                f"{n} {k}/{fm['expected'][n]}" for n, k in fm["non_negligible"].items()
            )
            counted = fm.get("counted", "subcomponents")
            typer.echo(
                f"non-negligible {counted} (found/expected): {live}; ground truth: "
                f"{_yes_no(fm['ground_truth'])} (MMCS ≥ 0.999 and found = expected everywhere)"
            )
    if "apd" in summary:
        a = summary["apd"]
        live = ", ".join(f"{n} {k}" for n, k in a["n_non_negligible"].items())
        typer.echo(
            f"APD: {a['C']} components (ranks {a['ranks']}), non-negligible {live}; "
            f"{a['mean_selected']} selected per input (lines below count rank-one pieces)"
        )
    if "resid_mlp" in summary:
        v, nc = summary["resid_mlp"]["verdict"], summary["resid_mlp"]["neuron_contributions"]
        mono = ", ".join(f"{name} {_w_in_line(m)}" for name, m in v["w_in"].items())
        out = v["w_out"]
        typer.echo(
            f"verdict: monosemantic features per W_in: {mono}; W_out dense {out['dense']} "
            f"(expected {out['expected_dense']}), dead {out['dead']}, other {out['other']}; "
            f"ground truth: {_yes_no(v['ground_truth'])}"
        )
        typer.echo(
            f"neuron contributions: r {nc['pearson_r']:.4f}, slope {nc['slope']:.4f} "
            "(1 and 1: each feature's W_in subcomponent drives the neurons its feature does)"
        )
    if "lm" in summary:
        lm = summary["lm"]
        typer.echo(
            f"next-token CE: target {lm['target']['ce']:.4f}; "
            + ", ".join(
                f"{k} {lm[k]['ce']:.4f} (KL {lm[k]['kl']:.4f}{_recovered(lm[k])})"
                for k in ("ci", "rounded", "stochastic", "ones", "zero")
                if k in lm
            )
        )
        typer.echo(
            "  (masks: ci = the CI g, rounded = g > τ, stochastic = g + (1 − g)·U(0,1), ones = "
            "all on, zero = all off; gap recovered = (CE_zero − CE)/(CE_zero − CE_target), "
            "1 = the target's CE)"
        )
        more = [k for k in lm if k.startswith(("rounded>", "pgd_"))]
        if more:
            typer.echo("  KL: " + ", ".join(f"{k} {lm[k]['kl']:.4f}" for k in more))
    width = max((len(n) for n in summary["modules"]), default=0)
    for name, m in summary["modules"].items():
        l0 = summary["mean_ci_l0"].get(name, float("nan"))
        extra = ""
        if "n_active_on_one_hot" in m:
            extra += f"active on one-hot {m['n_active_on_one_hot']:<4} "
        if "n_alive" in m:
            extra += f"alive {m['n_alive']:<4} "
        typer.echo(
            f"  {name:<{width}} C={m['C']:<4} non-negligible {m['n_non_negligible']:<4} "
            f"{extra}mean CI-L0 {l0:.3f}"
        )
    alive = next((m for m in summary["modules"].values() if "n_alive" in m), None)
    typer.echo(
        "  (non-negligible: ‖U_c‖·‖V_c‖ ≥ eval.norm_threshold × the module's largest"
        + (
            "; alive: CI > τ (eval.ci_threshold) at least once in the last 10 % of training"
            if alive
            else ""
        )
        + "; CI-L0: how many have CI > τ per input. CI is σ_H,upper: 0-1, leaking 0.01 per "
        "unit above 1, so values just over 1 are normal)"
    )
    far = {
        n: m["weight_error"]
        for n, m in summary["modules"].items()
        if m.get("weight_error", 0) > 0.1
    }
    if far:
        worst = max(far, key=far.get)
        where = f"in {len(far)} module(s) (‖W − UV‖/‖W‖ {far[worst]:.2f} in {worst})"
        if summary.get("delta"):
            typer.echo(
                f"warning: the subcomponents do not sum to W yet {where}: the Δ-component "
                "W − UV carries the rest, so the model is the target at m = 1 with Δ on, but "
                "the masks the evaluation reports (ci, rounded, ones: Δ excluded, as VPD's) act "
                "on a model that is not; train longer"
            )
        else:
            typer.echo(
                f"warning: the components do not sum to W yet {where}: masks act on a model "
                "that is not the target; train longer, or set components.delta"
            )
    for name, check in summary.get("identity_check", {}).items():
        typer.echo(
            f"identity {name}: d={check['d']}, {check['n_dense']} dense subcomponents, "
            f"{check['n_non_negligible']} non-negligible of C={check['C']} "
            f"(one dense group of rank d: {check['one_dense_group_of_rank_d']})"
        )
    if "timing" in summary:
        t = summary["timing"]
        typer.echo(
            f"training: {t['train_seconds']:.1f} s, {t['ms_per_step']:.2f} ms/step on {t['device']}"
        )
    typer.echo(f"run directory: {run_dir}  (summary.json, figures/)")


@app.command()
def run(
    config: str = typer.Argument(..., help="bundled config name (see `spdkit list`) or YAML path"),
    seed: int | None = typer.Option(None, min=0, help="overrides config.seed"),  # noqa: UP007
    steps: int | None = typer.Option(None, min=1, help="overrides config.training.steps"),  # noqa: UP007
    out: Path | None = typer.Option(None, help="run directory (default runs/<config>-seed<N>)"),  # noqa: UP007
    device: str = typer.Option("cpu", help="cpu or cuda"),
    target: Path | None = typer.Option(
        None, help="reuse a trained target (run dir or .safetensors)"
    ),  # noqa: UP007
    set_: list[str] = typer.Option([], "--set", help="override any field: --set optimizer.lr=2e-3"),
    quiet: bool = typer.Option(False, help="no progress bar"),
    profile: bool = typer.Option(
        False, help="profile steps 6-15 (torch.profiler) into RUN_DIR/profile.txt"
    ),
    target_hf: Path | None = typer.Option(  # noqa: UP007
        None,
        help="decompose a transformers model instead of the config's target: a directory "
        "(config.json + weights) or a Hub id org/name[@revision] from the local cache "
        "(never downloaded)",
    ),
    target_factory: str | None = typer.Option(  # noqa: UP007
        None,
        help="MODULE:FN returning your trained nn.Module (with --data-factory MODULE:FN "
        "returning an object with sample(batch_size, generator))",
    ),
    data_factory: str | None = typer.Option(None, help="see --target-factory"),  # noqa: UP007
    insert_identity: list[str] = typer.Option(
        [],
        help="PATTERN[:C]: insert a d×d identity before matched nn.Linear/Conv1D modules and "
        "decompose it too (default C = 2d); the summary says how many subcomponents it used",
    ),
    log: str | None = typer.Option(  # noqa: UP007
        None, "--log", help="also track the run in wandb or tensorboard (training.track)"
    ),
    nproc: int = typer.Option(1, min=1, help=NPROC_HELP),
) -> None:
    """Train (or load) the target and decompose it."""
    from spdkit.pipeline.run import run_experiment

    run_dir = None
    try:
        parallel, device = _join_ranks(device, nproc)
        overrides = _parse_overrides(set_)
        if seed is not None:
            overrides["seed"] = seed
        if steps is not None:
            overrides["steps"] = steps
        if log is not None:
            overrides["training.track"] = log
        if target_hf is not None:  # first, so that --set target.* applies on top of it
            overrides = {"target": hf_target_override(target_hf, config), **overrides}
        if target_factory is not None or data_factory is not None:
            if target_factory is None or data_factory is None:
                raise ConfigError("--target-factory and --data-factory go together")
            factories = {"factory": target_factory, "data_factory": data_factory}
            overrides = {"target": {"kind": "python", **factories}, **overrides}
        if insert_identity:
            overrides["insert_identity"] = [_identity_spec(item) for item in insert_identity]
        cfg = load_config(config, overrides)
        name = Path(config).stem if config.endswith((".yaml", ".yml")) else config
        run_dir = out or Path("runs") / f"{name}-seed{cfg.seed}"
        summary = run_experiment(cfg, run_dir, device, target, not quiet, profile, parallel)
    except USER_ERRORS as err:
        _fail(err)
    except KeyboardInterrupt:
        _interrupted(run_dir)
    _print_summary(summary, run_dir)


@app.command()
def resume(
    run_dir: Path = typer.Argument(..., help="a run directory with a checkpoint"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    quiet: bool = typer.Option(False, help="no progress bar"),
    nproc: int = typer.Option(1, min=1, help=NPROC_HELP),
) -> None:
    """Continue an interrupted run from its last checkpoint (at any number of processes)."""
    from spdkit.pipeline.run import resume_run

    try:
        parallel, device = _join_ranks(device, nproc)
        summary = resume_run(run_dir, device, progress=not quiet, parallel=parallel)
    except USER_ERRORS as err:
        _fail(err)
    except KeyboardInterrupt:
        _interrupted(run_dir)
    _print_summary(summary, run_dir)


@app.command()
def sweep(
    config: str = typer.Argument(..., help="bundled config name or YAML path"),
    set_: list[str] = typer.Option(
        [], "--set", help="grid axis: --set importance_minimality_coeff=1e-6,1e-5,1e-4"
    ),
    seeds: str = typer.Option("0", help="comma-separated seeds, e.g. 0,1,2"),
    steps: int | None = typer.Option(
        None, min=1, help="overrides config.training.steps for every run"
    ),  # noqa: UP007
    out: Path | None = typer.Option(None, help="sweep directory (default runs/sweep-<config>)"),  # noqa: UP007
    device: str = typer.Option("cpu", help="cpu or cuda"),
    target: Path | None = typer.Option(
        None, help="reuse a trained target for every run (run dir or .safetensors)"
    ),  # noqa: UP007
    quiet: bool = typer.Option(False, help="no progress bars"),
    jobs: int = typer.Option(
        1, min=1, help="runs at a time, in child processes with cores / jobs threads each"
    ),
) -> None:
    """Run a grid of configs x seeds; write sweep.md, sweep.json and sweep.png comparing them.
    Re-running the same command reuses finished runs and resumes interrupted ones."""
    from spdkit.pipeline.sweep import parse_grid, run_sweep

    name = Path(config).stem if config.endswith((".yaml", ".yml")) else config
    sweep_dir = out or Path("runs") / f"sweep-{name}"
    try:
        grid = parse_grid(set_)
        seed_list = [int(s) for s in seeds.split(",")]
        overrides = {"steps": steps} if steps is not None else {}
        run_sweep(config, grid, seed_list, sweep_dir, overrides, device, not quiet, target, jobs)
    except USER_ERRORS as err:
        _fail(err)
    except KeyboardInterrupt:
        typer.echo(f"interrupted: re-run the same command to continue {sweep_dir}", err=True)
        raise typer.Exit(130) from None
    typer.echo((sweep_dir / "sweep.md").read_text())  # per run, and per value across seeds
    typer.echo(f"sweep directory: {sweep_dir}  (sweep.md, sweep.json, sweep.png)")
