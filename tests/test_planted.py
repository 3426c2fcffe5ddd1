"""planted_lm: each task's sequences follow its rule and score the positions the rule fixes;
ablations (CI-gated and static edit) measure what subcomponents do."""

from __future__ import annotations

import math

import pytest
import torch

from spdkit.analysis import ablation, mechanism_score
from spdkit.analysis.mechanisms.clusters import Cluster
from spdkit.config import PlantedLMTargetConfig, load_config
from spdkit.method.model import ComponentModel
from spdkit.targets import planted
from tests.helpers import exact_components

SMALL = PlantedLMTargetConfig(
    n_tokens=16, seq_len=17, d_model=16, d_mlp=32, train_steps=1, copy_offset=3, sum_modulus=5
)


def test_every_task_follows_its_rule_on_the_scored_positions():
    data = planted.PlantedTasks(SMALL)
    gen = torch.Generator().manual_seed(0)
    for task in SMALL.tasks:
        ids, scored = data.task_batch(task, 64, gen)
        assert ids.shape == scored.shape == (64, 17)
        assert (ids[:, 0] == data.task_token(task)).all() and (ids[:, 1:] < 16).all()
        rows, cols = scored.nonzero(as_tuple=True)
        assert rows.numel() > 0 and (cols >= 2).all()
        if task == "induction":  # 16 content tokens: 8, then the same 8
            assert torch.equal(ids[:, 1:9], ids[:, 9:17]) and set(cols.tolist()) == set(
                range(10, 17)
            )
        elif task == "lookup":
            assert torch.equal(ids[rows, cols], data.table[ids[rows, cols - 1]])
        elif task == "copy":
            assert torch.equal(ids[rows, cols], ids[rows, cols - 3]) and (cols % 2 == 0).all()
        elif task == "sum":
            a, b = ids[rows, cols - 2], ids[rows, cols - 1]
            assert (a < 5).all() and torch.equal(ids[rows, cols], (a + b) % 5)
    mixed = data.sample(256, gen)
    assert set(mixed[:, 0].tolist()) == {16, 17, 18, 19}


def test_the_lookup_table_is_fixed_by_the_config_not_the_run_seed():
    other = SMALL.model_copy(update={"table_seed": 1})
    assert torch.equal(planted.lookup_table(SMALL), planted.lookup_table(SMALL))
    assert not torch.equal(planted.lookup_table(SMALL), planted.lookup_table(other))


def test_bad_planted_settings_are_refused_in_one_line():
    with pytest.raises(ValueError, match="copy_offset must be odd"):
        PlantedLMTargetConfig(train_steps=1, copy_offset=2)
    with pytest.raises(ValueError, match="sum_modulus 60 exceeds n_tokens 48"):
        PlantedLMTargetConfig(train_steps=1, sum_modulus=60)


def test_text_round_trips_through_the_task_tokens():
    ids = planted.encode(SMALL, "<copy> 3 4 5")
    assert ids == [18, 3, 4, 5] and planted.decode(SMALL, ids) == "<copy> 3 4 5"
    with pytest.raises(ValueError, match="unknown task token <add>"):
        planted.encode(SMALL, "<add> 1")


def _model(exact: bool = True) -> tuple[ComponentModel, ablation.Groups]:
    torch.manual_seed(0)
    target = planted.build_planted_lm(SMALL).eval()
    specs = load_config(
        "tiny_lm",
        {"modules": [{"pattern": "blocks.*.*.*", "C": 24}, {"pattern": "embed", "C": 24}]},
    ).modules
    model = ComponentModel(target, specs)
    if exact:
        exact_components(model)
    return model, planted.eval_task_batches(SMALL, 8, seed=0)


def test_static_edit_equals_the_masked_model_with_those_masks_off_when_u_v_is_w():
    """With U V = W exactly, W − Σ_S U_c V_c is the sum of the other pieces: the edited target
    and the all-ones masked model with S switched off compute the same function."""
    model, groups = _model()
    off = {"blocks.0.attn.v": [0, 3], "blocks.1.mlp.fc_in": [1], "embed": [2, 5]}
    ids = groups["induction"][0]
    masks = ablation.gated_masks(model.ones_masks(), off)
    with torch.no_grad():
        edited = ablation.edited_forward(model, off)(ids)
        masked = model(ids, masks)
        plain = model.target(ids)
    torch.testing.assert_close(edited, masked, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(edited, plain, atol=1e-3)
    # the target itself is untouched by an edit
    torch.testing.assert_close(model.target(ids), plain)


def test_measure_reports_both_removals_and_everything_ablated_is_fraction_one():
    model, groups = _model()
    every = ablation.everything(model)
    out = ablation.measure(
        model, groups, every, decode=lambda ids: " ".join(map(str, ids)), chunk=3
    )
    for task in SMALL.tasks:
        for kind in ("gated", "static"):
            assert out[task][kind]["fraction"] == pytest.approx(1.0)
        assert len(out[task]["most_moved"]) == 10 and out[task]["most_moved"][0][
            "context"
        ].endswith("]")
    none = ablation.measure(model, groups, {})
    assert all(none[t]["static"]["ablated"] == none[t]["static"]["baseline"] for t in SMALL.tasks)


def test_the_rounded_gate_starts_every_removal_from_the_rounded_ci_masks():
    """Gate('rounded', τ): baseline and ablations are the masked model with m = 1[g > τ]
    (recomputed here from the model's own CI), not with m = g."""
    model, groups = _model()
    gate = ablation.Gate("rounded", 0.1)
    off = {"blocks.0.attn.v": [0, 3], "blocks.1.mlp.fc_in": [1]}
    base, ablated = ablation.scored_ces(model, groups, [("gated", {}), ("gated", off)], gate=gate)
    plain = ablation.scored_ces(model, groups, [("gated", {})])[0]
    for task, (ids, scored) in groups.items():
        with torch.no_grad():
            record = model.record(ids)
            g, _ = model.importances(ids, record)
            rounded = {n: (v > 0.1).float() for n, v in g.items()}
            for want, masks in ((base, rounded), (ablated, ablation.gated_masks(rounded, off))):
                ce = planted_ce(model(ids, masks), ids, scored)
                assert want[task] == pytest.approx(ce, rel=1e-5)
    assert base != plain  # the two gates are different baselines on this model
    one = [Cluster(0, ["blocks.0.attn.v:0"], 0.1)]
    params = mechanism_score.ScoreParams(max_clusters=1)
    score = mechanism_score.mechanism_score(model, groups, one, params, gate=gate, progress=False)
    assert all(row["gate"] == {"kind": "rounded", "threshold": 0.1} for row in score.values())
    assert score["copy"]["baseline_ce"] == pytest.approx(base["copy"], rel=1e-6)


def planted_ce(logits: torch.Tensor, ids: torch.Tensor, scored: torch.Tensor) -> float:
    """Mean next-token CE over the scored positions."""
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none"
    )
    return ce[scored[:, 1:].flatten()].mean().item()


def test_parse_items_names_clusters_and_subcomponents_and_refuses_others():
    sizes = {"blocks.0.attn.q": 4, "embed": 4}
    clusters = [Cluster(0, ["embed:1", "blocks.0.attn.q:3"], 0.1)]
    off = ablation.parse_items(["cluster:0", "embed:2", "embed:1"], clusters, sizes)
    assert off == {"embed": [1, 2], "blocks.0.attn.q": [3]}
    for bad, match in (
        ("cluster:7", "no such cluster"),
        ("embed:9", "is not a subcomponent"),
        ("nothing", "is not a subcomponent"),
    ):
        with pytest.raises(ValueError, match=match):
            ablation.parse_items([bad], clusters, sizes)
    with pytest.raises(ValueError, match="has no clusters.json"):
        ablation.parse_items(["cluster:0"], [], sizes)


@pytest.mark.parametrize("removal", ["gated", "static"])
def test_mechanism_score_takes_clusters_by_damage_until_the_share_is_reached(removal):
    """The score's set is the clusters in order of their single-removal damage to the group,
    cut where the union reaches the share; its fraction and selectivity are what removing
    that union measures (recomputed here independently), CI-gated or from the weights."""
    model, groups = _model()
    clusters = [
        Cluster(i, [f"{n}:{c}" for c in range(24)], 0.5) for i, n in enumerate(model.module_names)
    ]
    params = mechanism_score.ScoreParams(frac=0.8, max_clusters=4)
    score = mechanism_score.mechanism_score(
        model, groups, clusters, params, progress=False, removal=removal
    )
    every = ablation.everything(model)
    nothing = {} if removal == "gated" else None
    base, full = ablation.scored_ces(model, groups, [(removal, nothing), (removal, every)])
    singles = ablation.scored_ces(model, groups, [(removal, c.indices()) for c in clusters])
    by_id = {c.id: c for c in clusters}
    for task in SMALL.tasks:
        row = score[task]
        damage = {c.id: ce[task] - base[task] for c, ce in zip(clusters, singles, strict=True)}
        order = sorted(damage, key=lambda k: -damage[k])
        assert row["clusters"] == order[: len(row["clusters"])]
        (ce,) = ablation.scored_ces(
            model, groups, [(removal, mechanism_score.union(by_id, row["clusters"]))]
        )
        fractions = {g: ablation.fraction(ce[g], base[g], full[g]) for g in groups}
        assert row["fraction"] == pytest.approx(fractions[task], rel=1e-5)
        assert row["removal"] == removal
        assert row["found"] == (row["fraction"] >= 0.8)
        if not row["found"]:
            assert len(row["clusters"]) == 4  # it stopped at the cap, short of the share
        others = [fractions[g] for g in groups if g != task]
        assert row["selectivity"] == pytest.approx(max(others), rel=1e-5)


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """A tiny planted_lm run (20 target steps, 20 decomposition steps) with clusters.json."""
    from typer.testing import CliRunner

    from spdkit.cli import app
    from spdkit.pipeline.run import run_experiment

    config = load_config(
        "planted_lm",
        {
            "target.n_tokens": 16,
            "target.seq_len": 17,
            "target.d_model": 16,
            "target.d_mlp": 32,
            "target.train_steps": 20,
            "modules": [
                {"pattern": "blocks.*.attn.*", "C": 6},
                {"pattern": "blocks.*.mlp.*", "C": 8},
            ],
            "steps": 20,
            "batch_size": 8,
            "eval.n_eval_samples": 16,
        },
    )
    run = tmp_path_factory.mktemp("planted") / "run"
    summary = run_experiment(config, run, progress=False)
    out = CliRunner().invoke(app, ["cluster", str(run), "--samples", "200", "--quiet"])
    assert out.exit_code == 0, out.output
    return run, summary


def test_a_planted_run_reports_each_task_under_every_mask_kind(planted_run):
    run, summary = planted_run
    tasks = summary["planted_tasks"]
    assert set(tasks) == {"induction", "lookup", "copy", "sum"}
    assert set(tasks["sum"]) == {"target", "ci", "rounded", "ones", "zero", "chance"}
    assert (run / "figures" / "planted_tasks.png").exists() and "lm" in summary


def test_the_selective_set_keeps_other_groups_within_the_bound_and_is_measured_to_chance():
    """Each group's selective set: every member had positive selective damage alone, the
    set's damage to every other group stays ≤ max_selectivity, and its fractions are what
    removing the union measures against min(everything ablated, chance)."""
    model, groups = _model()
    # one cluster per (module, quarter of its subcomponents): several candidates per group
    clusters = [
        Cluster(4 * i + q, [f"{n}:{c}" for c in range(6 * q, 6 * q + 6)], 0.5)
        for i, n in enumerate(model.module_names)
        for q in range(4)
    ]
    chance = {g: planted.chance_ce(SMALL, g) for g in groups}
    params = mechanism_score.ScoreParams(max_clusters=2, max_selectivity=0.3)
    score = mechanism_score.mechanism_score(
        model, groups, clusters, params, chance=chance, progress=False
    )
    every = ablation.everything(model)
    base, full = ablation.scored_ces(model, groups, [("gated", {}), ("gated", every)])
    reference = {g: min(full[g], chance[g]) if chance[g] > base[g] else full[g] for g in groups}
    by_id = {c.id: c for c in clusters}
    singles = ablation.scored_ces(model, groups, [("gated", c.indices()) for c in clusters])
    alone = {
        c.id: {g: ablation.fraction(ce[g], base[g], reference[g]) for g in groups}
        for c, ce in zip(clusters, singles, strict=True)
    }
    for task in groups:
        sel = score[task]["selective"]
        assert score[task]["chance_ce"] == chance[task]
        assert len(sel["clusters"]) <= sel["n_candidates"]
        if not sel["clusters"]:
            continue
        (ce,) = ablation.scored_ces(
            model, groups, [("gated", mechanism_score.union(by_id, sel["clusters"]))]
        )
        fractions = {g: ablation.fraction(ce[g], base[g], reference[g]) for g in groups}
        assert sel["fraction"] == pytest.approx(fractions[task], rel=1e-5, abs=1e-7)
        others = [fractions[g] for g in groups if g != task]
        assert sel["selectivity"] == pytest.approx(max(others), rel=1e-5, abs=1e-7)
        assert sel["selectivity"] <= 0.3
        assert sel["found"] == (sel["fraction"] >= 0.8)
        for k in sel["clusters"]:  # each member alone hurt its task more than any other
            assert alone[k][task] > max(alone[k][g] for g in groups if g != task)


def test_ablate_measures_items_and_scores_the_clusters(planted_run):
    import json

    from typer.testing import CliRunner

    from spdkit.cli import app

    run, summary = planted_run
    runner = CliRunner()
    n_clusters = len(json.loads((run / "clusters.json").read_text())["clusters"])
    args = ["ablate", str(run), "--clusters", "0", "--subcomponents", "blocks.0.mlp.fc_in:1"]
    out = runner.invoke(app, [*args, "--n", "8"])
    assert out.exit_code == 0, out.output
    saved = json.loads((run / "ablation.json").read_text())
    assert set(saved["groups"]) == set(summary["planted_tasks"])
    assert "blocks.0.mlp.fc_in" in saved["off"]
    assert "CI-gated" in out.output and "static edit" in out.output
    args = ["ablate", str(run), "--score", "--n", "8", "--quiet", "--max-clusters", "3"]
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    score = json.loads((run / "mechanism_score.json").read_text())
    assert all(1 <= len(row["clusters"]) <= min(3, n_clusters) for row in score.values())
    assert all("selective" in row and "chance_ce" in row for row in score.values())
    assert "selective sets" in out.output
    assert (run / "figures" / "mechanism_score.png").exists()


def test_sequence_clusters_scored_by_static_removal(planted_run, tmp_path):
    """`cluster --unit sequence` records its unit; `ablate --score --removal static` scores
    those clusters as weight edits and says so (in a copy: the fixture's clusters stay)."""
    import json
    import shutil

    from typer.testing import CliRunner

    from spdkit.cli import app

    run = tmp_path / "run"
    shutil.copytree(planted_run[0], run)
    runner = CliRunner()
    out = runner.invoke(app, ["cluster", str(run), "--unit", "sequence", "--samples", "16"])
    assert out.exit_code == 0, out.output
    assert json.loads((run / "clusters.json").read_text())["params"]["unit"] == "sequence"
    args = ["ablate", str(run), "--score", "--removal", "static", "--n", "8", "--quiet"]
    out = runner.invoke(app, [*args, "--max-clusters", "2"])
    assert out.exit_code == 0, out.output
    assert "removed from the weights" in out.output
    score = json.loads((run / "mechanism_score.json").read_text())
    assert all(row["removal"] == "static" for row in score.values())
    out = runner.invoke(app, ["ablate", str(run), "--score", "--removal", "both", "--quiet"])
    assert out.exit_code == 2 and "'gated' or 'static'" in out.output
    out = runner.invoke(app, ["ablate", str(run), "--subcomponents", "blocks.9.mlp.fc_in:1"])
    assert out.exit_code == 2 and "is not a subcomponent" in out.output
    out = runner.invoke(app, ["ablate", str(run)])
    assert out.exit_code == 2 and "--score" in out.output


def test_edit_writes_a_target_that_reloads_and_decomposes_again(planted_run, tmp_path):
    """`spdkit edit` writes target.safetensors + target.json with W − U_c V_c in the edited
    module only; the file round trip changes nothing; --target DIR runs on it."""
    import json

    from typer.testing import CliRunner

    from spdkit import load
    from spdkit.cli import app
    from spdkit.store import runs

    run, _ = planted_run
    edited = tmp_path / "edited"
    args = ["edit", str(run), "--off", "blocks.1.mlp.fc_out:2", "--off", "cluster:0"]
    out = CliRunner().invoke(app, [*args, "--out", str(edited), "--n", "8"])
    assert out.exit_code == 0, out.output
    # written beside and renamed when complete: no partial folder left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited"]
    result = json.loads((edited / "edit.json").read_text())
    assert all(row["reload_max_abs_diff"] < 1e-5 for row in result["groups"].values())
    for task, row in result["groups"].items():  # of the way to min(everything, chance)
        reference = min(row["everything"], row["chance_ce"])
        if row["chance_ce"] <= row["target"]:
            reference = row["everything"]
        want = (row["edited"] - row["target"]) / (reference - row["target"])
        assert row["fraction_to_reference"] == pytest.approx(want), task
    assert "to chance" in out.output
    decomp = load(run)
    original, _ = runs.load_target(run, decomp.config.target)
    changed, _ = runs.load_target(edited, decomp.config.target)
    U, V = decomp.subcomponents("blocks.1.mlp.fc_out")
    off = result["off"]["blocks.1.mlp.fc_out"]
    want = original.blocks[1].mlp.fc_out.weight - U[:, off] @ V[off]
    torch.testing.assert_close(changed.blocks[1].mlp.fc_out.weight, want)
    untouched = [m for m in decomp.module_names if m not in result["off"]]
    for m in untouched:
        w = changed.get_submodule(m).weight
        assert torch.equal(w, original.get_submodule(m).weight)
    out = CliRunner().invoke(app, [*args, "--out", str(edited)])
    assert out.exit_code == 2 and "not empty" in out.output
    rerun = tmp_path / "rerun"
    cfg = ["run", "planted_lm", "--target", str(edited), "--out", str(rerun), "--steps", "2"]
    sets = ["target.n_tokens=16", "target.seq_len=17", "target.d_model=16", "target.d_mlp=32"]
    sets += ["eval.n_eval_samples=8", "modules.0.C=4", "modules.1.C=4"]
    out = CliRunner().invoke(app, [*cfg, "--quiet", *[a for s in sets for a in ("--set", s)]])
    assert out.exit_code == 0, out.output
    reused = runs.load_target(rerun, decomp.config.target)[0]
    assert torch.equal(reused.blocks[1].mlp.fc_out.weight, changed.blocks[1].mlp.fc_out.weight)


def test_scored_ces_do_not_depend_on_the_chunk_size():
    model, groups = _model(exact=False)
    removals = [("gated", {}), ("gated", {"blocks.0.attn.q": [1, 2]}), ("static", None)]
    whole = ablation.scored_ces(model, groups, removals, chunk=8)
    pieces = ablation.scored_ces(model, groups, removals, chunk=3)
    for a, b in zip(whole, pieces, strict=True):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5) for k in a)


def test_attribute_writes_a_prompt_graph_and_dataset_edges(planted_run):
    import json

    from typer.testing import CliRunner

    from spdkit.cli import app

    run, _ = planted_run
    runner = CliRunner()
    prompt = "<induction> 1 2 3 4 5 6 7 8 1 2 3"
    out = runner.invoke(app, ["attribute", str(run), "--prompt", prompt, "--quiet"])
    assert out.exit_code == 0, out.output
    (path,) = (run / "attributions").glob("prompt_*.json")
    graph = json.loads(path.read_text())
    assert graph["kind"] == "prompt" and graph["tokens"][0] == "<induction>"
    assert path.with_suffix(".png").exists() and "strongest" in out.output
    out = runner.invoke(app, ["attribute", str(run), "--tokens", "200", "--quiet"])
    assert out.exit_code == 0, out.output
    table = json.loads((run / "attributions" / "dataset.json").read_text())
    assert table["kind"] == "dataset" and table["n_tokens"] >= 200
    out = runner.invoke(app, ["attribute", str(run), "--prompt", "<nope> 1"])
    assert out.exit_code == 2 and "unknown task token" in out.output
    out = runner.invoke(app, ["attribute", str(run)])
    assert out.exit_code == 2 and "--prompt" in out.output
    args = ["attribute", str(run), "--tokens", "100", "--nodes", "blocks.*.attn.*", "--quiet"]
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    table = json.loads((run / "attributions" / "dataset.json").read_text())
    assert table["params"]["nodes"] == ["blocks.*.attn.*"]
    assert all(".attn." in e["source"] for e in table["edges"] + table["into_next_token_logit"])
    out = runner.invoke(app, ["attribute", str(run), "--tokens", "10", "--nodes", "nope.*"])
    assert out.exit_code == 2 and "matches no decomposed module" in out.output


def test_the_vpd_config_decomposes_the_same_planted_target():
    paper, vpd = load_config("planted_lm"), load_config("planted_lm_vpd")
    assert paper.target == vpd.target and paper.seed == vpd.seed and paper.modules == vpd.modules
    assert vpd.ci_fn.kind == "global_transformer" and vpd.components.delta


def test_harvest_keeps_bounded_statistics_that_match_a_direct_count(planted_run):
    """On the tiny planted run: firing counts and mean CI equal a direct count over the same
    tokens; top contexts are the highest-CI firings and end at the firing token; the Parquet
    files read back; the kept state does not grow with the tokens read."""
    import json

    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from spdkit import load
    from spdkit.analysis import harvest
    from spdkit.cli import app
    from spdkit.method.measures import causal_importance

    run, _ = planted_run
    decomp = load(run)
    data = planted.PlantedTasks(decomp.config.target)
    gen = torch.Generator().manual_seed(3)
    batches = [data.sample(8, gen) for _ in range(3)]
    params = harvest.HarvestParams(tokens=3 * 8 * 17, threshold=0.1, top_k=3, random_k=2, window=5)
    result = harvest.harvest(decomp.model, iter(batches), 20, params, progress=False)
    ids = torch.cat(batches)
    ci = causal_importance(decomp.model, ids)
    flat = torch.cat([ci[m] for m in decomp.model.module_names], -1).flatten(0, 1)
    fires = flat > 0.1
    assert torch.equal(result.fire, fires.sum(0)) and result.n_tokens == ids.numel()
    torch.testing.assert_close(result.ci_sum.float(), torch.where(fires, flat, 0.0).sum(0))
    c = int(result.fire.argmax())
    best = torch.where(fires[:, c], flat[:, c], -1.0).topk(3).values
    torch.testing.assert_close(result.top.ci[c], best)
    pos = int(torch.where(fires[:, c], flat[:, c], -1.0).argmax())
    assert result.top.windows[c, 0, -1] == ids.flatten()[pos]  # the window ends at the firing
    assert result.top.windows.shape == (len(result.names), 3, 5)
    # every subcomponent's kept CIs are its highest (rows skipped in a batch stay exact)
    expected = torch.where(fires, flat, -1.0).T.topk(3, dim=1).values
    kept = torch.where(result.top.key > -math.inf, result.top.ci, -1.0)
    torch.testing.assert_close(kept, expected)
    assert torch.equal(result.cofire, fires.T.long() @ fires.long())
    out = CliRunner().invoke(
        app, ["harvest", str(run), "--tokens", "600", "--top-k", "3", "--random-k", "2", "--quiet"]
    )
    assert out.exit_code == 0, out.output
    subs = pq.read_table(run / "harvest" / "subcomponents.parquet").to_pylist()
    ctx = pq.read_table(run / "harvest" / "contexts.parquet").to_pylist()
    meta = json.loads((run / "harvest" / "meta.json").read_text())
    assert meta["n_tokens"] >= 600 and len(subs) == meta["n_fired"] > 0
    clusters = json.loads((run / "clusters.json").read_text())["clusters"]
    as_rows = {r["name"]: r for r in subs if r["module"] == "cluster"}
    assert as_rows and set(as_rows) <= {f"cluster:{c['id']}" for c in clusters}
    first = clusters[0]  # a cluster fires at least as often as any of its members
    member_fires = [r["n_fire"] for r in subs if r["name"] in first["members"]]
    if f"cluster:{first['id']}" in as_rows and member_fires:
        assert as_rows[f"cluster:{first['id']}"]["n_fire"] >= max(member_fires)
    row = max(subs, key=lambda r: r["n_fire"])
    assert 0 < row["density"] <= 1 and row["mean_ci"] > 0.1 and row["input_tokens"]
    assert {"token", "count", "precision", "recall", "pmi", "text"} <= set(row["input_tokens"][0])
    mine = [r for r in ctx if r["name"] == row["name"]]
    assert {r["kind"] for r in mine} == {"top", "random"} and all("[" in r["text"] for r in mine)

    # `spdkit label`: a token-statistics label per harvested name, read back with the harvest
    out = CliRunner().invoke(app, ["label", str(run), "--top", "5"])
    assert out.exit_code == 0, out.output
    labels = pq.read_table(run / "harvest" / "labels.parquet").to_pylist()
    assert len(labels) == 5 and labels[0]["name"] == row["name"]
    assert all(r["source"] == "token statistics" and r["label"] for r in labels)
    from spdkit.analysis.harvest import read_harvest

    assert read_harvest(run)[row["name"]]["label"]["text"] == labels[0]["label"]


@pytest.mark.parametrize("density", [0.01, 0.5])
def test_cofiring_counts_are_exact_sparse_or_dense(density):
    """add_cofiring's sparse path (few firings) and dense path (many) both add fᵀ f."""
    from spdkit.analysis.harvest_state import add_cofiring

    fires = torch.rand(300, 40, generator=torch.Generator().manual_seed(0)) < density
    cofire = torch.ones(40, 40, dtype=torch.long)
    add_cofiring(cofire, fires)
    assert torch.equal(cofire, 1 + fires.T.long() @ fires.long())


def test_label_with_a_local_openai_compatible_server(planted_run):
    """`spdkit label --endpoint`: over HTTP to a real local chat server (tests/chat_server.py,
    a small local model that answers nonsense): labels from the endpoint, the token-statistics
    label kept beside them, both scored by detection on held-out contexts (balanced accuracy
    in [0, 1]), a 503 retried, answers journaled so a rerun sends nothing again; an endpoint
    that is not there is a one-line error."""
    import json

    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from spdkit.analysis.chat import ChatEndpoint, EndpointError
    from spdkit.cli import app
    from tests.chat_server import serve_chat

    run, _ = planted_run
    runner = CliRunner()
    if not (run / "harvest" / "subcomponents.parquet").is_file():
        out = runner.invoke(app, ["harvest", str(run), "--tokens", "600", "--quiet"])
        assert out.exit_code == 0, out.output
    args = ["label", str(run), "--top", "3", "--detect", "3", "--quiet", "--model", "tiny-gpt2"]
    with serve_chat(fail_first=1) as (url, log):
        out = runner.invoke(app, [*args, "--endpoint", url])
        assert out.exit_code == 0, out.output
        sent = len(log)
        assert log[0]["model"] == "tiny-gpt2" and log[0]["messages"][0]["role"] == "user"
        rows = pq.read_table(run / "harvest" / "labels.parquet").to_pylist()
        assert len(rows) == 3 and all(r["source"] == "tiny-gpt2" for r in rows)
        assert all(r["statistics_label"] and r["label"] for r in rows)
        scored = [r for r in rows if r["detection"] is not None]  # (one firing everywhere: not)
        # the 503, then per name a label and, where both kinds of context exist, two tests
        assert sent == 1 + len(rows) + 2 * len(scored)
        assert scored and all(0 <= r["detection"] <= 1 for r in scored)
        assert all(0 <= r["statistics_detection"] <= 1 for r in scored)
        journal = (run / "harvest" / "label_requests.jsonl").read_text().splitlines()
        assert [json.loads(x)["name"] for x in journal] == [r["name"] for r in rows]
        out = runner.invoke(app, [*args, "--endpoint", url])  # resumed: nothing sent again
        assert out.exit_code == 0 and len(log) == sent
    with pytest.raises(EndpointError, match="no answer after 2 tries"):
        ChatEndpoint(url, "tiny-gpt2", retries=1, backoff=0.01).complete("hi")
    out = runner.invoke(app, ["label", str(run), "--top", "3", "--model", "m", "--endpoint",
                              "http://127.0.0.1:9/v1", "--quiet"])  # fmt: skip
    assert out.exit_code == 2
    assert len(out.output.strip().splitlines()) == 1 and "127.0.0.1:9" in out.output


def test_harvested_contexts_carry_the_ci_of_every_token():
    from spdkit.analysis import harvest

    model, groups = _model(exact=False)
    ids = groups["copy"][0]
    params = harvest.HarvestParams(tokens=ids.numel(), threshold=0.0, top_k=2, random_k=0, window=4)
    result = harvest.harvest(model, iter([ids]), 20, params, progress=False)
    from spdkit.method.measures import causal_importance

    ci = causal_importance(model, ids)
    flat = torch.cat([ci[m] for m in model.module_names], -1)  # [B, T, C]
    c = 5
    for rank in range(2):
        window = result.top.windows[c, rank]
        got = result.top.ci_windows[c, rank][window >= 0]
        # the event: a position with the kept CI whose window holds these tokens and these CIs
        matches = []
        for b, t in ((flat[..., c] - result.top.ci[c, rank]).abs() < 1e-7).nonzero().tolist():
            lo = max(0, t - 3)
            if ids[b, lo : t + 1].tolist() == window[window >= 0].tolist():
                matches.append(torch.allclose(flat[b, lo : t + 1, c], got))
        assert matches and any(matches)


def test_a_random_induction_repeat_varies_its_offset_and_follows_the_rule():
    config = SMALL.model_copy(update={"induction_repeat": "random"})
    ids, scored = planted.PlantedTasks(config).task_batch(
        "induction", 64, torch.Generator().manual_seed(0)
    )
    offsets = set()
    for b in range(64):
        cols = scored[b].nonzero().flatten()
        m = int(cols[0]) - 2  # the repeat's 2nd token sits at ids position m + 2
        offsets.add(m)
        assert torch.equal(ids[b, cols], ids[b, cols - m]) and int(cols[-1]) == 2 * m
    assert len(offsets) > 1  # a fixed-offset (positional) head cannot solve it


def test_statistics_label_names_the_tokens_with_the_best_f1():
    from spdkit.analysis.labels import statistics_label

    row = {
        "density": 0.02,
        "input_tokens": [  # PMI order; F1 ranks "b" (P .5, R .9) above "a" (P .9, R .1)
            {"text": "a", "precision": 0.9, "recall": 0.1},
            {"text": "b", "precision": 0.5, "recall": 0.9},
            {"text": "c", "precision": 0.01, "recall": 0.02},  # F1 < 0.1: left out
        ],
        "next_tokens": [{"text": "z", "precision": 0.4, "recall": 0.3}],
    }
    label = statistics_label(row)
    assert label == "in 'b' (P 0.50, R 0.90), 'a' (P 0.90, R 0.10); next 'z' (P 0.40, R 0.30)"
    empty = statistics_label({"density": 0.02, "input_tokens": [], "next_tokens": []})
    assert empty == "no token describes it (fires on 2 % of tokens)"


def test_label_without_a_harvest_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from spdkit.cli import app

    out = CliRunner().invoke(app, ["label", str(tmp_path)])
    assert out.exit_code == 2 and len(out.output.strip().splitlines()) == 1, out.output


@pytest.mark.parametrize("repeat", ["random", "fixed"])
def test_induction_keys_point_at_the_token_after_the_earlier_occurrence(repeat):
    from spdkit.targets.planted_heads import induction_keys

    config = SMALL.model_copy(update={"induction_repeat": repeat})
    ids, scored = planted.PlantedTasks(config).task_batch("induction", 64, torch.Generator())
    rows, s, keys = induction_keys(scored)
    assert (keys >= 1).all() and (keys < s - 1).all()
    assert torch.equal(ids[rows, keys], ids[rows, s])  # what the induction head copies
    assert torch.equal(ids[rows, keys - 1], ids[rows, s - 1])  # what its key matches


def test_head_knockout_and_attention_scores_on_a_model_with_known_attention():
    from spdkit.targets.planted_heads import attention_scores, head_knockout, head_off

    config = SMALL.model_copy(update={"n_layers": 2, "n_heads": 2})
    torch.manual_seed(0)
    model = planted.build_planted_lm(config).eval()
    batches = planted.eval_task_batches(config, 16, seed=0)
    ids = batches["copy"][0]
    attn = model.blocks[1].attn
    with torch.no_grad():
        plain = model(ids)
        with head_off(attn, 0), head_off(attn, 1):  # every head off = no attention output
            both_off = model(ids)
        w = attn.o.weight.clone()
        attn.o.weight.zero_()
        no_attn = model(ids)
        attn.o.weight.copy_(w)
    torch.testing.assert_close(both_off, no_attn)
    assert not torch.allclose(plain, both_off)
    table = head_knockout(model, batches)
    assert set(table) == set(config.tasks) and set(table["copy"]) == {
        "none",
        "0.0",
        "0.1",
        "1.0",
        "1.1",
    }
    # q = 0: uniform causal attention, so the query at t puts 1 / (t + 1) on every key
    for block in model.blocks:
        block.attn.q.weight.data.zero_()
    scores = attention_scores(model, batches, config.copy_offset)
    s = batches["copy"][1].nonzero(as_tuple=True)[1]
    expected = (1.0 / s.float()).mean().item()  # query s − 1
    assert all(abs(v - expected) < 1e-5 for v in scores["copy"].values())
    assert set(scores) == {"previous_token", "induction", "copy"}


def test_specific_sets_are_measured_on_a_fresh_draw_and_edit_removes_them(planted_run, tmp_path):
    """`ablate --specific` writes specific.json: each group's items, chosen on draw 0, with the
    static edit's and CI-gated ablation's CE on draw 1 as a direct measurement gives them; the
    verdict follows its rule; `edit --off specific:<group>` removes exactly those items."""
    import json

    from typer.testing import CliRunner

    from spdkit import load
    from spdkit.analysis.specific import SpecificParams
    from spdkit.cli import app

    run, _ = planted_run
    runner = CliRunner()
    out = runner.invoke(app, ["ablate", str(run), "--specific", "--n", "8", "--quiet"])
    assert out.exit_code == 0, out.output
    assert "specific sets" in out.output and (run / "figures" / "specific_sets.png").exists()
    assert json.loads((run / "specific.json").read_text())["params"]["report_seed"] == 1
    decomp = load(run)
    # a 20-step run's CI fires on every task alike: θ 0 takes every alive piece, so that the
    # sets checked and edited below are not empty
    params = SpecificParams(thetas=(0.0,))
    sets = decomp.specific_sets(8, params=params, progress=False)
    assert sets["params"] | {"n": 8, "select_seed": 0, "report_seed": 1} == sets["params"]
    fresh = ablation.position_groups(decomp, 8, 1)
    sizes = {m: decomp.model.components(m).C for m in decomp.module_names}
    assert any(row["items"] for row in sets["groups"].values())
    for group, row in sets["groups"].items():
        assert len(row["items"]) == row["n_subcomponents"] == len(set(row["items"]))
        off = ablation.parse_items(row["items"], [], sizes)
        for kind in ("static", "gated"):
            (ce,) = ablation.scored_ces(decomp.model, fresh, [(kind, off)], 64)
            for g in fresh:
                assert row[kind]["ce"][g] == pytest.approx(ce[g], rel=1e-5), (group, kind, g)
        static = row["static"]
        for g in fresh:  # fractions of the way to min(everything removed, chance)
            want = (static["ce"][g] - static["baseline_ce"][g]) / (
                static["reference_ce"][g] - static["baseline_ce"][g]
            )
            got = static["fraction"] if g == group else static["other_fractions"][g]
            assert got == pytest.approx(want), (group, g)
        assert row["found"] == (
            bool(row["items"])
            and static["fraction"] >= params.frac
            and static["selectivity"] <= params.max_selectivity
        )
    (run / "specific.json").write_text(json.dumps(sets))
    group = next(g for g, row in sets["groups"].items() if row["items"])
    edited = tmp_path / "edited"
    args = ["edit", str(run), "--off", f"specific:{group}", "--out", str(edited), "--n", "8"]
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    result = json.loads((edited / "edit.json").read_text())
    assert result["off"] == ablation.parse_items(sets["groups"][group]["items"], [], sizes)
    # measured on draw 1 by default, as specific.json's static CE of the same set
    assert result["seed"] == 1
    for g, row in result["groups"].items():
        assert row["edited"] == pytest.approx(sets["groups"][group]["static"]["ce"][g], rel=1e-4)
    empty = {group: []}
    with pytest.raises(ValueError, match="specific set is empty"):
        ablation.parse_items([f"specific:{group}"], [], sizes, empty)
    with pytest.raises(ValueError, match="no such group"):
        ablation.parse_items(["specific:nope"], [], sizes, decomp.saved_specific())
    # a broken specific.json stands in the way of specific sets only
    (run / "specific.json").write_text('{"groups": ["not", "a", "mapping"]}')
    assert decomp.saved_specific(["cluster:0", f"{decomp.module_names[0]}:1"]) is None
    with pytest.raises(ValueError, match="is not a specific.json"):
        decomp.saved_specific([f"specific:{group}"])
    (run / "specific.json").unlink()  # the run is shared with other tests
    with pytest.raises(ValueError, match="no specific.json"):
        ablation.parse_items(["specific:sum"], [], sizes, None)
