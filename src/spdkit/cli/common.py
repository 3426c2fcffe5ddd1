"""Shared parts of the `spdkit` command line: the Typer app, one-line user errors, interrupts,
torchrun relaunching, `--set` parsing."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import typer

from spdkit.config import load_config
from spdkit.errors import ConfigError, JobsFailed, NonFiniteError, PeerLostError, RunDirError

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
    from spdkit.store import runs
    from spdkit.store.runs import CHECKPOINT

    if os.environ.get("RANK", "0") != "0":
        raise typer.Exit(130)
    if run_dir is not None and (run_dir / CHECKPOINT).exists():
        typer.echo(
            f"interrupted: continue from the last checkpoint with `spdkit resume {run_dir}`",
            err=True,
        )
    elif run_dir is not None and (run_dir / "config.yaml").exists():
        saved = "its saved target" if runs.has_target(run_dir) else "the target"
        typer.echo(
            f"interrupted before the first checkpoint: `spdkit resume {run_dir}` starts the run "
            f"again from its first step (with {saved})",
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
    from spdkit.engine.threads import threads_per_process

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
    from spdkit.engine.distributed import init_from_env, launched_by_torchrun

    if nproc > 1 and not launched_by_torchrun():
        _launch_torchrun(nproc)
    parallel, device = init_from_env(device)
    if not parallel.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 tells the story
    return parallel, device


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
