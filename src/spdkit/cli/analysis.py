"""`spdkit eval`, `cluster`, `report`, `serve`, `export`, `harvest`, `label`: looking at a
finished run."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from spdkit.cli.common import USER_ERRORS, _fail, _parse_overrides, app
from spdkit.cli.training import _print_summary


@app.command(name="eval")
def eval_(
    run_dir: Path = typer.Argument(..., help="a finished run directory"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    checkpoint: bool = typer.Option(
        False,
        "--checkpoint",
        help="evaluate an unfinished run at its last checkpoint, into RUN_DIR/partial/step_N/",
    ),
    set_: list[str] = typer.Option(
        [], "--set", help="override an eval.* field for this evaluation: --set eval.pgd_steps=[20]"
    ),
) -> None:
    """Recompute a run's metrics (summary.json) and figures."""
    from spdkit.pipeline.run import evaluate_checkpoint, evaluate_run_dir

    try:
        overrides = _parse_overrides(set_)
        if checkpoint:
            summary, out_dir = evaluate_checkpoint(run_dir, device, overrides)
        else:
            summary, out_dir = evaluate_run_dir(run_dir, device, overrides), run_dir
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
    alpha: float = typer.Option(2.0, min=0, help="bits per rank-one piece of a firing group"),
    min_count: int = typer.Option(1, min=1, help="fewer firings than this: dead"),
    seed: int = typer.Option(0, min=0, help="seed of the data drawn"),
    unit: str = typer.Option(
        "position", help="LMs: a sample is a token position or a whole sequence"
    ),
    sequence_rate: float = typer.Option(
        0.0, min=0, max=1, help="unit sequence: fires on it if on ≥ this share of positions"
    ),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    checkpoint: bool = typer.Option(
        False, "--checkpoint", help="an unfinished run at its last checkpoint (into partial/)"
    ),
    quiet: bool = typer.Option(False, help="no progress bars"),
) -> None:
    """Group subcomponents into mechanisms (minimum description length over co-activations);
    write RUN_DIR/clusters.json and figures/clusters.png."""
    from spdkit.analysis.mechanisms.clusters import ClusterParams, write_clusters
    from spdkit.analysis.mechanisms.clusters import cluster as find_clusters
    from spdkit.api import load
    from spdkit.pipeline.run import PARTIAL_DIR, load_checkpoint, resolve_device

    try:
        params = ClusterParams(
            samples,
            threshold,
            alpha,
            min_count,
            seed,
            unit,
            sequence_rate,  # type: ignore[arg-type]
        )
        if checkpoint:
            decomp, step = load_checkpoint(run_dir, device)
            out_dir = run_dir / PARTIAL_DIR / f"step_{step}"
        else:
            decomp, out_dir = load(run_dir, resolve_device(device)), run_dir
        found = find_clusters(decomp, params, out_dir / "figures", progress=not quiet)
        path = write_clusters(out_dir, found)
    except USER_ERRORS as err:
        _fail(err)
    info = found.info
    typer.echo(
        f"{len(found.clusters)} clusters of {info['n_live']} alive subcomponents "
        f"(CI > τ on at least one of {info['n_samples']} samples; {len(found.dead)} never)"
    )
    for c in found.clusters[:40]:
        typer.echo(c.summary_line())
    if len(found.clusters) > 40:
        typer.echo(f"... {len(found.clusters) - 40} more in {path}")
    if "ground_truth" in info:
        gt = info["ground_truth"]
        typer.echo(
            f"ground truth: ARI {gt['ari']:.4f}, mechanisms found {gt['n_mechanisms_found']}"
            f" (expected {gt['n_mechanisms_expected']}); ARI 1 = the true grouping, 0 = chance"
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
    from spdkit.analysis.report.content import gather
    from spdkit.analysis.report.render import write_report
    from spdkit.api import load
    from spdkit.pipeline.run import resolve_device

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
    from spdkit.analysis.report.content import gather
    from spdkit.analysis.report.serve import create_app
    from spdkit.analysis.report.serve import serve as run_server
    from spdkit.api import load
    from spdkit.pipeline.run import resolve_device

    try:
        decomp = load(run_dir, resolve_device(device))
        app_ = create_app(decomp, gather(decomp, run_dir, rows), run_dir)
    except USER_ERRORS as err:
        _fail(err)
    typer.echo(f"serving {run_dir} on http://127.0.0.1:{port}/ (live tools: /live); Ctrl-C stops")
    run_server(app_, port)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="a finished run directory"),
    out: Path = typer.Argument(..., help="a new folder"),
    with_target: bool = typer.Option(
        False, "--with-target", help="Hugging Face targets: copy the weights too (else referenced)"
    ),
) -> None:
    """A self-describing folder to publish (model card README.md, config, components, target),
    which spdkit.load() reads back; push it with the Hub's own client (`hf upload`)."""
    from spdkit.pipeline.export import export_run

    try:
        path = export_run(run_dir, out, with_target)
    except USER_ERRORS as err:
        _fail(err)
    files = sorted(p.name for p in path.iterdir())
    typer.echo(f"wrote {path}: {', '.join(files)}")
    typer.echo(f"publish: hf upload ORG/NAME {path} .   (load: spdkit.load('{path}'))")


@app.command()
def harvest(
    run_dir: Path = typer.Argument(..., help="a finished run directory (a language model)"),
    tokens: int = typer.Option(100_000, min=1, help="held-out tokens to read"),
    top_k: int = typer.Option(10, min=0, help="highest-CI contexts kept per subcomponent"),
    random_k: int = typer.Option(10, min=0, help="random firing contexts kept per subcomponent"),
    window: int = typer.Option(16, min=1, help="tokens per context, ending at the firing one"),
    batch_size: int = typer.Option(None, min=1, help="sequences per batch (eval.batch_size)"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    quiet: bool = typer.Option(False, help="no progress bar"),
) -> None:
    """Read held-out text once and keep, per subcomponent that fires: density, mean CI,
    top and random contexts, the input / next tokens most associated with it, and its
    co-firing neighbours; into RUN_DIR/harvest/ (Parquet: subcomponents, contexts)."""
    from spdkit.analysis.harvest import HarvestParams
    from spdkit.api import load
    from spdkit.pipeline.run import resolve_device

    try:
        decomp = load(run_dir, resolve_device(device))
        params = HarvestParams(tokens, decomp.config.eval.ci_threshold, top_k, random_k, window)
        meta = decomp.harvest(params, batch_size, progress=not quiet)
    except USER_ERRORS as err:
        _fail(err)
    typer.echo(
        f"{meta['n_fired']} of {meta['n_subcomponents']} subcomponents fired on "
        f"{meta['n_tokens']} tokens; wrote {run_dir / 'harvest'}"
    )


@app.command()
def label(
    run_dir: Path = typer.Argument(..., help="a run with a harvest (`spdkit harvest`)"),
    top: int = typer.Option(None, min=1, help="label the N most-firing names only"),
    endpoint: str = typer.Option(
        None, help="an OpenAI-compatible API base URL (…/v1): label with its model too"
    ),
    model: str = typer.Option(None, help="the endpoint's model name"),
    api_key_env: str = typer.Option(
        "OPENAI_API_KEY", help="environment variable holding the endpoint's key (if any)"
    ),
    detect: int = typer.Option(
        10, min=0, help="held-out firing / non-firing contexts each for the detection score"
    ),
    rate: float = typer.Option(
        0.0, min=0, help="at most this many requests per second (0: no limit)"
    ),
    device: str = typer.Option("cpu", help="cpu or cuda (the detection contexts' CI)"),
    quiet: bool = typer.Option(False, help="no progress bar"),
) -> None:
    """A label in words for every harvested subcomponent and cluster, from its token
    statistics (the input / next tokens with the best precision-recall F1), and with
    --endpoint/--model from a language model, each label scored by detection on held-out
    contexts; into RUN_DIR/harvest/labels.parquet; the report and `spdkit serve` show it."""
    from spdkit.analysis.chat import ChatEndpoint, EndpointError
    from spdkit.analysis.labels import write_labels
    from spdkit.api import load
    from spdkit.pipeline.run import resolve_device

    if (endpoint is None) != (model is None):
        _fail(ValueError("--endpoint and --model go together"))
    try:
        if endpoint is None:
            rows = write_labels(run_dir, top)
        else:
            chat = ChatEndpoint(
                endpoint, model, os.environ.get(api_key_env), min_interval=1 / rate if rate else 0
            )
            decomp = load(run_dir, resolve_device(device))
            rows = decomp.label(top, chat, detect, progress=not quiet)
    except (*USER_ERRORS, EndpointError) as err:
        _fail(err)
    for row in rows[:5]:
        typer.echo(f"{row['name']}: {row['label']}")
    scored = [r for r in rows if r.get("detection") is not None]
    if scored:
        mean = sum(r["detection"] for r in scored) / len(scored)
        base = sum(r["statistics_detection"] for r in scored) / len(scored)
        typer.echo(
            f"detection balanced accuracy (0.5 is chance) over {len(scored)}: {model}'s labels "
            f"{mean:.3f}, token-statistics labels {base:.3f}"
        )
    typer.echo(f"labelled {len(rows)}; wrote {run_dir / 'harvest' / 'labels.parquet'}")
