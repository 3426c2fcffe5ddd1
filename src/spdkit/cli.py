"""`spdkit` command line: parses, calls the API, prints. Errors a user can cause print one line
per problem and exit with status 2, never a traceback."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import typer

from spdkit.config import ConfigError, bundled_config_names, load_config
from spdkit.distributed import PeerLostError
from spdkit.jobs import JobsFailed
from spdkit.runs import RunDirError
from spdkit.train import NonFiniteError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Stochastic Parameter Decomposition"
)

USER_ERRORS = (
    ConfigError,
    RunDirError,
    NonFiniteError,
    ValueError,
    FileExistsError,
    FileNotFoundError,
    OSError,
    PeerLostError,
    JobsFailed,
)


def _fail(err: Exception) -> None:
    rank = os.environ.get("RANK", "0")  # data-parallel ranks other than 0 say who they are
    typer.echo(f"error: {err}" if rank == "0" else f"error (rank {rank}): {err}", err=True)
    raise typer.Exit(3 if isinstance(err, NonFiniteError) else 2)


def _interrupted(run_dir: Path | None) -> None:
    """Ctrl-C or SIGTERM: exit 130 with how to continue (if the run directory exists yet);
    data-parallel ranks other than 0 exit without repeating it."""
    if os.environ.get("RANK", "0") != "0":
        raise typer.Exit(130)
    if run_dir is not None and (run_dir / "config.yaml").exists():
        typer.echo(
            f"interrupted: continue from the last checkpoint with `spdkit resume {run_dir}`",
            err=True,
        )
    else:
        typer.echo("interrupted before the run directory was written", err=True)
    raise typer.Exit(130)


def _terminate_as_interrupt(signum: int, frame: Any) -> None:  # noqa: ARG001
    """SIGTERM (`kill`, a batch scheduler's stop) unwinds like Ctrl-C: the same message and
    exit status wherever it lands, not only inside the training loop (which checkpoints)."""
    raise KeyboardInterrupt(f"signal {signum}")


NPROC_HELP = (
    "data-parallel processes on this machine: relaunches itself under `torchrun --standalone "
    "--nproc_per_node N` (cores / N threads each)"
)


def _launch_torchrun(nproc: int) -> None:
    """Replace this process by `torchrun --standalone --nproc_per_node N -m spdkit <args>`
    (the same arguments without --nproc), with cores / N threads per rank."""
    from spdkit.cores import threads_per_process

    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_process(nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={nproc}", "-m", "spdkit", *args]
    typer.echo("launching: " + " ".join(cmd[1:]), err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)


def _join_ranks(device: str, nproc: int) -> tuple[Any, str]:
    """(Parallel, device): this rank's place under torchrun; alone, (SINGLE, device). With
    --nproc N > 1 outside torchrun, this process becomes the torchrun launcher instead."""
    from spdkit.distributed import init_from_env, launched_by_torchrun

    if nproc > 1 and not launched_by_torchrun():
        _launch_torchrun(nproc)
    parallel, device = init_from_env(device)
    if not parallel.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 tells the story
    return parallel, device


def _print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    """The headline numbers of a run, then where everything else is."""
    if not summary:  # a data-parallel rank other than 0, done: rank 0 evaluates and prints
        from spdkit.distributed import leave

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
        typer.echo(f"feature match on {fm['module']}: MMCS {fm['mmcs']:.4f}  ML2R {fm['ml2r']:.4f}")
    if "resid_mlp" in summary:
        v, nc = summary["resid_mlp"]["verdict"], summary["resid_mlp"]["neuron_contributions"]
        mono = ", ".join(f"{name} {m['features_monosemantic']}" for name, m in v["w_in"].items())
        out = v["w_out"]
        typer.echo(
            f"verdict: monosemantic features per W_in: {mono}; W_out dense {out['dense']} "
            f"(expected {out['expected_dense']}), dead {out['dead']}, other {out['other']}; "
            f"ground truth: {v['ground_truth']}"
        )
        typer.echo(f"neuron contributions: r {nc['pearson_r']:.4f}, slope {nc['slope']:.4f}")
    if "lm" in summary:
        lm = summary["lm"]
        typer.echo(
            f"next-token CE: target {lm['target']['ce']:.4f}; "
            + ", ".join(
                f"{k} {lm[k]['ce']:.4f} (KL {lm[k]['kl']:.4f})"
                for k in ("ci", "rounded", "stochastic", "ones", "zero")
                if k in lm
            )
        )
        more = [k for k in lm if k.startswith(("rounded>", "pgd_"))]
        if more:
            typer.echo("  KL: " + ", ".join(f"{k} {lm[k]['kl']:.4f}" for k in more))
    for name, m in summary["modules"].items():
        l0 = summary["mean_ci_l0"].get(name, float("nan"))
        extra = ""
        if "n_active_on_one_hot" in m:
            extra += f"active on one-hot {m['n_active_on_one_hot']:<4} "
        if "n_alive" in m:
            extra += f"alive {m['n_alive']:<4} "
        typer.echo(
            f"  {name:<20} C={m['C']:<4} non-negligible {m['n_non_negligible']:<4} "
            f"{extra}mean CI-L0 {l0:.3f}"
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


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    from spdkit.config import parse_override_value

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key] = parse_override_value(value)
    return out


def hf_target_override(path: Path, config: str) -> dict[str, Any]:
    """`--target-hf DIR`: the config's target becomes DIR's model, keeping the config's
    `data` and `seq_len` if it already names an hf target."""
    from spdkit.targets.hf import read_hf_config

    base = load_config(config).target
    keep = {}
    if base is not None and base.kind == "hf":
        keep = base.model_dump(mode="json", include={"data", "seq_len", "output"})
    return {"kind": "hf", "path": str(path), **keep, "hf_config": read_hf_config(path)}


def _identity_spec(item: str) -> dict[str, Any]:
    pattern, sep, c = item.rpartition(":")
    if not sep or not c.isdigit():
        return {"pattern": item}
    return {"pattern": pattern, "C": int(c)}


@app.command()
def run(
    config: str = typer.Argument(..., help="bundled config name (see `spdkit list`) or YAML path"),
    seed: int | None = typer.Option(None, min=0, help="overrides config.seed"),  # noqa: UP007
    steps: int | None = typer.Option(None, min=1, help="overrides config.steps"),  # noqa: UP007
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
        help="decompose a local transformers causal-LM directory (config.json + weights; "
        "never downloaded) instead of the config's target",
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
    nproc: int = typer.Option(1, min=1, help=NPROC_HELP),
) -> None:
    """Train (or load) the target and decompose it."""
    from spdkit.experiment import run_experiment

    run_dir = None
    try:
        parallel, device = _join_ranks(device, nproc)
        overrides = _parse_overrides(set_)
        if seed is not None:
            overrides["seed"] = seed
        if steps is not None:
            overrides["steps"] = steps
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
    from spdkit.experiment import resume_run

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
    steps: int | None = typer.Option(None, min=1, help="overrides config.steps for every run"),  # noqa: UP007
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
    from spdkit.sweep import parse_grid, run_sweep

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


@app.command(name="eval")
def eval_(
    run_dir: Path = typer.Argument(..., help="a finished run directory"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    checkpoint: bool = typer.Option(
        False,
        "--checkpoint",
        help="evaluate an unfinished run at its last checkpoint, into RUN_DIR/partial/step_N/",
    ),
) -> None:
    """Recompute a run's metrics (summary.json) and figures."""
    from spdkit.experiment import evaluate_checkpoint, evaluate_run_dir

    try:
        if checkpoint:
            summary, out_dir = evaluate_checkpoint(run_dir, device)
        else:
            summary, out_dir = evaluate_run_dir(run_dir, device), run_dir
    except USER_ERRORS as err:
        _fail(err)
    if checkpoint:
        typer.echo(f"step {summary['partial']['step']} of {summary['partial']['steps']}")
    _print_summary(summary, out_dir)


@app.command()
def cluster(
    run_dir: Path = typer.Argument(..., help="a finished run directory"),
    samples: int = typer.Option(20000, min=1, help="CI rows: toy inputs or LM token positions"),
    threshold: float = typer.Option(0.1, min=0, max=1, help="τ: a subcomponent fires if CI > τ"),
    alpha: float = typer.Option(10.0, min=0, help="bits per rank-one piece of a firing group"),
    min_count: int = typer.Option(1, min=1, help="fewer firings than this: dead"),
    seed: int = typer.Option(0, min=0, help="seed of the data drawn"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    checkpoint: bool = typer.Option(
        False, "--checkpoint", help="an unfinished run at its last checkpoint (into partial/)"
    ),
    quiet: bool = typer.Option(False, help="no progress bars"),
) -> None:
    """Group subcomponents into mechanisms (minimum description length over co-activations);
    write RUN_DIR/clusters.json and figures/clusters.png."""
    from spdkit.clusters import ClusterParams, write_clusters
    from spdkit.clusters import cluster as find_clusters
    from spdkit.decomposition import load
    from spdkit.experiment import PARTIAL_DIR, load_checkpoint, resolve_device

    try:
        if checkpoint:
            decomp, step = load_checkpoint(run_dir, device)
            out_dir = run_dir / PARTIAL_DIR / f"step_{step}"
        else:
            decomp, out_dir = load(run_dir, resolve_device(device)), run_dir
        params = ClusterParams(samples, threshold, alpha, min_count, seed)
        found = find_clusters(decomp, params, out_dir / "figures", progress=not quiet)
        path = write_clusters(out_dir, found)
    except USER_ERRORS as err:
        _fail(err)
    info = found.info
    typer.echo(
        f"{len(found.clusters)} clusters of {info['n_live']} live subcomponents "
        f"({len(found.dead)} dead) from {info['n_samples']} samples"
    )
    for c in found.clusters[:40]:
        typer.echo(c.summary_line())
    if len(found.clusters) > 40:
        typer.echo(f"... {len(found.clusters) - 40} more in {path}")
    if "ground_truth" in info:
        gt = info["ground_truth"]
        typer.echo(
            f"ground truth: ARI {gt['ari']:.4f}, mechanisms found {gt['n_mechanisms_found']}"
            f" (expected {gt['n_mechanisms_expected']})"
        )
    cost = info["cost"]
    typer.echo(
        f"{cost['gather_seconds']:.1f} s gathering, {cost['merge_seconds']:.1f} s merging,"
        f" peak memory {cost['peak_rss_bytes'] / 2**20:.0f} MiB; wrote {path}"
    )


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="a finished run directory"),
    rows: int = typer.Option(None, min=1, help="data rows for the CI statistics"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    quiet: bool = typer.Option(False, help="no progress bars"),
) -> None:
    """Write RUN_DIR/report/index.html: one page to open in a browser (no server needed)."""
    from spdkit.decomposition import load
    from spdkit.experiment import resolve_device
    from spdkit.report.content import gather
    from spdkit.report.render import write_report

    try:
        decomp = load(run_dir, resolve_device(device))
        index = write_report(gather(decomp, run_dir, rows), run_dir, progress=not quiet)
    except USER_ERRORS as err:
        _fail(err)
    typer.echo(f"wrote {index}")


@app.command()
def serve(
    run_dir: Path = typer.Argument(..., help="a finished run directory"),
    port: int = typer.Option(8765, min=1, max=65535, help="port on 127.0.0.1"),
    rows: int = typer.Option(None, min=1, help="data rows for the CI statistics"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
) -> None:
    """Serve the report on 127.0.0.1 with live tools: CI of a typed input, mechanisms off."""
    from spdkit.decomposition import load
    from spdkit.experiment import resolve_device
    from spdkit.report.content import gather
    from spdkit.report.serve import create_app
    from spdkit.report.serve import serve as run_server

    try:
        decomp = load(run_dir, resolve_device(device))
        app_ = create_app(decomp, gather(decomp, run_dir, rows), run_dir)
    except USER_ERRORS as err:
        _fail(err)
    typer.echo(f"serving {run_dir} on http://127.0.0.1:{port}/ (live tools: /live); Ctrl-C stops")
    run_server(app_, port)


@app.command(name="list")
def list_() -> None:
    """The bundled configs."""
    for name in bundled_config_names():
        cfg = load_config(name)
        t = cfg.target
        mods = ", ".join(f"{m.pattern}(C={m.C})" for m in cfg.modules)
        typer.echo(f"{name:<14} {t.describe():<40} steps {cfg.steps:<7} {mods}")


@app.command()
def check(
    config: str = typer.Argument(..., help="bundled config name or YAML path"),
    set_: list[str] = typer.Option([], "--set", help="override any field, as for `run`"),
) -> None:
    """Validate a config (with any --set overrides) without running it."""
    try:
        cfg = load_config(config, _parse_overrides(set_))
    except ConfigError as err:
        _fail(err)
    typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))


@app.command()
def plan(
    config: str = typer.Argument(..., help="bundled config name or YAML path"),
    target_hf: Path | None = typer.Option(  # noqa: UP007
        None, "--target-hf", help="its target is this local transformers model directory"
    ),
    set_: list[str] = typer.Option([], "--set", help="override any field, as for `run`"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
) -> None:
    """Peak memory and FLOPs of a run's training step and evaluation, before it runs (two
    small probe steps on the untrained target, extrapolated to the batch)."""
    from spdkit.experiment import plan_config
    from spdkit.plan import format_plan

    try:
        overrides = _parse_overrides(set_)
        if target_hf is not None:
            overrides = {"target": hf_target_override(target_hf, config), **overrides}
        result = plan_config(load_config(config, overrides), device)
    except USER_ERRORS as err:
        _fail(err)
    typer.echo(format_plan(result))
    if result.fits is False:
        typer.echo("this run will not fit: `spdkit run` would refuse it", err=True)


@app.command()
def modules(
    source: str = typer.Argument(
        ..., help="a local transformers model directory, or a config (bundled name or YAML)"
    ),
    pattern: list[str] = typer.Option(
        [], "--pattern", help="also show what this pattern matches: PATTERN or PATTERN:C"
    ),
    target_hf: Path | None = typer.Option(  # noqa: UP007
        None, "--target-hf", help="with a config: its target is this model directory"
    ),
) -> None:
    """Every decomposable module of a model (name, kind, shape, parameters), what the config's
    patterns pick and a suggested C; built on the meta device, so nothing is loaded."""
    from spdkit.config import HFTargetConfig, ModuleSpec
    from spdkit.inventory import format_rows, module_rows, on_meta_device
    from spdkit.targets import target_kind
    from spdkit.targets.hf import build_hf, read_hf_config

    patterns = [(p["pattern"], p.get("C")) for p in map(_identity_spec, pattern)]
    specs: list[ModuleSpec] = []
    try:
        if (Path(source) / "config.json").is_file():
            target = HFTargetConfig(path=source, hf_config=read_hf_config(source))
            model = on_meta_device(lambda: build_hf(target))
        else:
            overrides = {"target": hf_target_override(target_hf, source)} if target_hf else {}
            cfg = load_config(source, overrides)
            if cfg.target is None:
                raise ConfigError(f"{source} names no target to build")
            specs = cfg.modules
            model = on_meta_device(lambda: target_kind(cfg.target).build(cfg.target))
    except USER_ERRORS as err:
        _fail(err)
    patterns = [(spec.pattern, spec.C) for spec in specs] + patterns
    typer.echo(format_rows(module_rows(model, specs), patterns))


@app.command()
def schema() -> None:
    """The config's JSON schema (for editors and validators)."""
    from spdkit.config import SPDConfig

    typer.echo(json.dumps(SPDConfig.model_json_schema(), indent=2))


def main() -> None:  # pragma: no cover
    from spdkit.allocator import keep_freed_memory

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    keep_freed_memory()  # a training step then reuses its memory instead of faulting it in
    app()
