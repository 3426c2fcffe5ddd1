"""`spdkit ablate`, `edit`, `attribute`: what subcomponents of a language model do, measured by
removing them, removed for good, and traced through the model (docs/mechanisms_lm.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from spdkit import files
from spdkit.cli.common import USER_ERRORS, _fail, app


@app.command()
def ablate(
    run_dir: Path = typer.Argument(..., help="a finished run directory (a language model)"),
    clusters: str = typer.Option("", help="cluster ids of clusters.json to remove: 3,7"),
    subcomponents: str = typer.Option("", help="subcomponents to remove: blocks.0.attn.q:3,..."),
    score: bool = typer.Option(
        False, "--score", help="the mechanism score of clusters.json per position group"
    ),
    n: int = typer.Option(256, min=1, help="held-out sequences (per task for planted_lm)"),
    frac: float = typer.Option(0.8, min=0, max=1, help="--score: damage share a set must reach"),
    max_clusters: int = typer.Option(8, min=1, help="--score: most clusters per set"),
    masks: str = typer.Option(
        "ci", help="CI-gated baseline: ci (m = g) or rounded (m = 1[g > eval.ci_threshold])"
    ),
    removal: str = typer.Option(
        "gated", help="--score: remove clusters CI-gated (gated) or from the weights (static)"
    ),
    specific: bool = typer.Option(
        False, "--specific", help="per group, the pieces that fire mostly on it, removed"
    ),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    quiet: bool = typer.Option(False, help="no progress bars"),
) -> None:
    """What removing subcomponents costs: next-token CE per position group (planted_lm: per
    task) under the CI-gated ablation and the static weight edit, side by side; with
    --score, the fewest clusters that carry each group and their selectivity (--masks
    rounded: every removal starts from the rounded CI masks, not from m = g); with
    --specific, each group's specific set (the pieces firing mostly on it; `spdkit edit
    --off specific:<group>` removes it). Writes RUN_DIR/ablation.json (and
    mechanism_score.json, specific.json, figures/mechanism_score.png, specific_sets.png)."""
    import json

    from spdkit.analysis.mechanism_score import plot_mechanism_score
    from spdkit.api import load
    from spdkit.pipeline.run import resolve_device

    items = [f"cluster:{c.strip()}" for c in clusters.split(",") if c.strip()]
    items += [s.strip() for s in subcomponents.split(",") if s.strip()]
    try:
        if not items and not score and not specific:
            raise ValueError(
                "name what to remove (--clusters, --subcomponents) or ask for --score / --specific"
            )
        decomp = load(run_dir, resolve_device(device))
        if items:
            result = decomp.ablate(items, n, masks=masks)
            files.atomic_write_text(run_dir / "ablation.json", json.dumps(result, indent=1) + "\n")
            _print_ablation(result)
        if score:
            table = decomp.mechanism_score(
                frac, max_clusters, n, progress=not quiet, masks=masks, removal=removal
            )
            files.atomic_write_text(
                run_dir / "mechanism_score.json", json.dumps(table, indent=1) + "\n"
            )
            plot_mechanism_score(table, run_dir / "figures" / "mechanism_score.png")
            _print_score(table, frac)
        if specific:
            from spdkit.analysis.specific import plot_specific_sets

            sets = decomp.specific_sets(n, progress=not quiet)
            files.atomic_write_text(run_dir / "specific.json", json.dumps(sets, indent=1) + "\n")
            plot_specific_sets(sets, run_dir / "figures" / "specific_sets.png")
            _print_specific(sets)
    except USER_ERRORS as err:
        _fail(err)


def _print_ablation(result: dict) -> None:
    from spdkit.analysis.ablation import gate_label

    n_off = sum(len(v) for v in result["off"].values())
    typer.echo(
        f"removed {n_off} subcomponents; CE of the scored positions (nats); CI-gated from "
        f"{gate_label(result['masks'])}:"
    )
    typer.echo(
        f"{'group':<12} {'CI-gated: base → ablated (frac)':<36} static edit: target → edited (frac)"
    )
    for group, row in result["groups"].items():
        cells = [
            f"{row[k]['baseline']:.4f} → {row[k]['ablated']:.4f} ({row[k]['fraction']:.2f})"
            for k in ("gated", "static")
        ]
        typer.echo(f"{group:<12} {cells[0]:<36} {cells[1]}")
    for group, row in result["groups"].items():
        for moved in row.get("most_moved", [])[:3]:
            typer.echo(f"  {group}: +{moved['ce_rise']:.3f}  {moved['context']}")


def _print_score(table: dict, frac: float) -> None:
    from spdkit.analysis.ablation import gate_label

    first = next(iter(table.values()))
    how = (
        "removed from the weights"
        if first.get("removal") == "static"
        else f"CI-gated from {gate_label(first['gate'])}"
    )
    typer.echo(f"mechanism score (a set must cost ≥ {frac:.0%} of ablating everything; {how}):")
    for group, row in table.items():
        _verdict_line(
            group,
            row["found"],
            f"clusters {row['clusters']} ({row['n_subcomponents']} subcomponents): "
            f"{row['fraction']:.2f} of its damage, selectivity {row['selectivity']:.3f}; "
            f"static edit {row['static_fraction']:.2f}",
        )
    selective = {g: row["selective"] for g, row in table.items() if "selective" in row}
    if selective:
        typer.echo(
            "selective sets (each other group loses ≤ 10 %; fractions of the way to "
            "min(everything ablated, chance)):"
        )
    for group, sel in selective.items():
        _verdict_line(
            group,
            sel["found"],
            f"{len(sel['clusters'])} clusters ({sel['n_subcomponents']} subcomponents, of "
            f"{sel['n_candidates']} candidates): {sel['fraction']:.2f} of the way, "
            f"selectivity {sel['selectivity']:.3f}",
        )


def _print_specific(sets: dict) -> None:
    typer.echo(
        "specific sets (pieces firing mostly on the group; fractions of the way to "
        "min(everything removed, chance), on fresh sequences):"
    )
    for group, row in sets["groups"].items():
        st, ga = row["static"], row["gated"]
        _verdict_line(
            group,
            row["found"],
            f"θ {row['theta']}, {row['n_subcomponents']} subcomponents: static edit "
            f"{st['fraction']:.2f}, selectivity {st['selectivity']:.3f}; CI-gated "
            f"{ga['fraction']:.2f}, selectivity {ga['selectivity']:.3f}",
        )


def _verdict_line(group: str, found: bool, rest: str) -> None:
    typer.echo(f"{group:<12} {'found' if found else 'NOT found':<9} {rest}")


@app.command()
def edit(
    run_dir: Path = typer.Argument(..., help="a finished run directory"),
    off: list[str] = typer.Option(
        ...,
        "--off",
        help="what to remove: cluster:<id>, specific:<group> or <module>:<index>; repeat it",
    ),
    out: Path = typer.Option(..., help="a new folder for the edited target"),
    n: int = typer.Option(256, min=1, help="held-out sequences the effect is measured on"),
    seed: int | None = typer.Option(
        None,
        min=0,
        help="which draw of held-out sequences (default: 1 where a specific set is removed, "
        "the draw it was not chosen on; else 0)",
    ),
    device: str = typer.Option("cpu", help="cpu or cuda"),
) -> None:
    """The target with those subcomponents subtracted from its weights, written in its own
    format (bundled: target.safetensors + target.json, for --target; Hugging Face: a
    save_pretrained folder), reloaded and measured into OUT/edit.json."""
    from spdkit.api import load
    from spdkit.pipeline.edit import edit_target
    from spdkit.pipeline.run import resolve_device

    try:
        result = edit_target(load(run_dir, resolve_device(device)), off, out, n, seed)
    except USER_ERRORS as err:
        _fail(err)
    n_off = sum(len(v) for v in result["off"].values())
    typer.echo(f"wrote {out} ({result['format']}): {n_off} subcomponents removed")
    rows = result["groups"]
    chance = all("fraction_to_reference" in row for row in rows.values())
    head = f"{'group':<12} {'target':>8} {'edited':>8} {'all removed':>12} {'fraction':>9}"
    typer.echo(head + (f" {'to chance':>10}" if chance else ""))
    for group, row in rows.items():
        line = (
            f"{group:<12} {row['target']:>8.4f} {row['edited']:>8.4f} {row['everything']:>12.4f}"
            f" {row['fraction']:>9.2f}"
        )
        typer.echo(line + (f" {row['fraction_to_reference']:>10.2f}" if chance else ""))
    if chance:
        typer.echo(
            "fraction: of the way to everything removed; to chance: of the way to "
            "min(everything removed, chance CE)"
        )


@app.command()
def attribute(
    run_dir: Path = typer.Argument(..., help="a finished run directory (a language model)"),
    prompt: str = typer.Option(None, help="the graph of this prompt (the target's own text)"),
    tokens: int = typer.Option(None, min=1, help="edges averaged over this many held-out tokens"),
    ci_threshold: float = typer.Option(None, min=0, max=1, help="alive: CI > this (eval's)"),
    per_target: int = typer.Option(8, min=1, help="incoming edges kept per target node"),
    max_edges: int = typer.Option(1000, min=1, help="edges kept in all (prompt graph)"),
    batch_nodes: int = typer.Option(64, min=1, help="target nodes per backward pass"),
    nodes: list[str] = typer.Option(
        [],
        "--nodes",
        help="only these modules' subcomponents are nodes (fnmatch; repeat); the other "
        "decomposed modules are transparent: edges run through them",
    ),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    quiet: bool = typer.Option(False, help="no progress bars"),
) -> None:
    """Attribution graphs: which subcomponents drive which (gradient × activation, one hop
    between node modules, through the CI-masked model). --prompt: one prompt's graph, into
    RUN_DIR/attributions/prompt_<hash>.json and .png; --tokens: over held-out data, into
    RUN_DIR/attributions/dataset.json."""
    import hashlib
    import json

    from spdkit.analysis.attribution import AttributionParams
    from spdkit.analysis.plots import plot_prompt_graph
    from spdkit.api import load
    from spdkit.pipeline.run import resolve_device

    try:
        if prompt is None and tokens is None:
            raise ValueError("give --prompt TEXT (one graph) or --tokens N (over a dataset)")
        decomp = load(run_dir, resolve_device(device))
        params = AttributionParams(
            decomp.config.eval.ci_threshold if ci_threshold is None else ci_threshold,
            per_target,
            max_edges,
            batch_nodes,
            tuple(nodes),
        )
        out_dir = run_dir / "attributions"
        if prompt is not None:
            graph = decomp.attribute(prompt, params, progress=not quiet)
            digest = hashlib.sha1(json.dumps(graph["ids"]).encode()).hexdigest()[:10]
            path = out_dir / f"prompt_{digest}.json"
            out_dir.mkdir(parents=True, exist_ok=True)
            files.atomic_write_text(path, json.dumps(graph) + "\n")
            plot_prompt_graph(graph, path.with_suffix(".png"))
            _print_edges(graph, path)
        if tokens is not None:
            table = decomp.dataset_attributions(tokens, params, progress=not quiet)
            path = out_dir / "dataset.json"
            out_dir.mkdir(parents=True, exist_ok=True)
            files.atomic_write_text(path, json.dumps(table) + "\n")
            _print_edges(table, path)
    except USER_ERRORS as err:
        _fail(err)


def _print_edges(graph: dict, path: Path, n: int = 15) -> None:
    edges = sorted(graph["edges"], key=lambda e: -abs(e["value"]))
    if graph["kind"] == "prompt":
        mass = graph["edge_mass"]
        typer.echo(
            f"{len(graph['nodes'])} live nodes, {len(graph['edges'])} edges kept "
            f"({mass['kept'] / max(mass['total'], 1e-30):.0%} of the edge mass); strongest:"
        )
    else:
        typer.echo(
            f"{len(edges)} edges over {graph['n_tokens']} tokens (mean per token); strongest:"
        )
    for e in edges[:n]:
        typer.echo(f"  {e['value']:+.4f}  {e['source']} → {e['target']}")
    typer.echo(f"wrote {path}")
