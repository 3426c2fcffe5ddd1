"""`spdkit list`, `check`, `plan`, `modules`, `schema`: configs and models, before a run."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from spdkit.cli.common import (
    USER_ERRORS,
    _fail,
    _identity_spec,
    _parse_overrides,
    app,
    hf_target_override,
)
from spdkit.config import ConfigError, bundled_config_names, load_config


@app.command(name="list")
def list_() -> None:
    """The bundled configs."""
    for name in bundled_config_names():
        cfg = load_config(name)
        t = cfg.target
        mods = ", ".join(f"{m.pattern}(C={m.C})" for m in cfg.modules)
        typer.echo(f"{name:<14} {t.describe():<40} steps {cfg.training.steps:<7} {mods}")


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
    from spdkit.pipeline.plan import format_plan
    from spdkit.pipeline.run import plan_config

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
        ...,
        help="a transformers model directory or Hub id org/name[@revision] (from the local "
        "cache), or a config (bundled name or YAML)",
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
    from spdkit.config.io import bundled_config_names
    from spdkit.method.inventory import format_rows, module_rows, on_meta_device
    from spdkit.targets import target_kind
    from spdkit.targets.hf import build_hf, read_hf_config

    patterns = [(p["pattern"], p.get("C")) for p in map(_identity_spec, pattern)]
    specs: list[ModuleSpec] = []
    is_config = source in bundled_config_names() or source.endswith((".yaml", ".yml"))
    try:
        if not is_config and (Path(source).is_dir() or "/" in source):  # a model dir or Hub id
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
    rows = module_rows(model, specs, patterns)  # --pattern rows marked as the config's are
    typer.echo(format_rows(rows, [(spec.pattern, spec.C) for spec in specs] + patterns))


@app.command()
def schema() -> None:
    """The config's JSON schema (for editors and validators)."""
    from spdkit.config import SPDConfig

    typer.echo(json.dumps(SPDConfig.model_json_schema(), indent=2))
