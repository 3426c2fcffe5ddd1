"""Clustering subcomponents into mechanisms: the firing record, the MDL merge, the ground
truth of the toy targets, `spdkit cluster` and clusters.json, mechanism masks."""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from typer.testing import CliRunner

import spdkit
from spdkit.analysis.mechanisms.clusters import ClusterParams, cluster, gather, read_clusters
from spdkit.analysis.mechanisms.firings import Firings, gather_firings
from spdkit.analysis.mechanisms.ground_truth import score, true_mechanisms
from spdkit.analysis.mechanisms.merge import description_length, merge_greedy
from spdkit.analysis.mechanisms.merge_reference import merge_costs, merge_greedy_dense
from spdkit.cli import app
from spdkit.config import load_config, parse_config
from spdkit.errors import RunDirError
from spdkit.method.measures import causal_importance
from spdkit.method.model import ComponentModel
from spdkit.targets import TARGET_KINDS, data_source, eval_data_source, target_kind
from tests.helpers import tiny_tms_dict

runner = CliRunner()


def firings_of(g: np.ndarray) -> Firings:
    """The record of a dense bool matrix g [samples, n] (tests only: spdkit never builds one)."""
    rows, cols = np.nonzero(g)
    ptr = np.concatenate([[0], np.cumsum(g.sum(1))]).astype(np.int64)
    return Firings([f"m:{i}" for i in range(g.shape[1])], ptr, cols.astype(np.int32))


def planted(
    n_samples: int, sizes: tuple[int, ...] = (1, 2, 3, 2, 1, 3, 2, 2), seed: int = 0
) -> tuple[np.ndarray, list[int]]:
    """Firings with known mechanisms: sparse groups of `sizes` members (each group active on 5 %
    of samples, each member firing on 95 % of its group's samples, plus 0.2 % noise), one dense
    group of 6 (active on 60 %), and 2 never-firing columns. Returns (g, true group per column)."""
    rng = np.random.default_rng(seed)
    n = len(sizes)
    truth = [k for k, s in enumerate(sizes) for _ in range(s)] + [n] * 6 + [n + 1, n + 2]
    g = np.zeros((n_samples, len(truth)), dtype=bool)
    col = 0
    for k, size in enumerate([*sizes, 6]):
        on = rng.random(n_samples) < (0.6 if k == n else 0.05)
        for _ in range(size):
            g[:, col] = (on & (rng.random(n_samples) < 0.95)) | (rng.random(n_samples) < 0.002)
            col += 1
    return g, truth


def test_firing_record_matches_the_dense_matrix():
    rng = np.random.default_rng(1)
    g = rng.random((300, 12)) < 0.2
    g[:, 5] = False
    f = firings_of(g)
    assert f.n_samples == 300 and (f.counts() == g.sum(0)).all()
    S = f.pair_counts(chunk=64).numpy()
    assert ((g.T.astype(np.int64) @ g.astype(np.int64)) == S).all()
    bits = np.unpackbits(f.row_bits(), axis=1)[:, :300].astype(bool)  # [n, samples]
    assert (bits == g.T).all()
    keep = np.array([0, 3, 7, 11])
    sub = f.restricted(keep)
    assert sub.names == ["m:0", "m:3", "m:7", "m:11"]
    assert (sub.pair_counts().numpy() == S[np.ix_(keep, keep)]).all()


def test_merge_costs_are_the_change_in_description_length():
    """ΔL of every pair = L after merging it − L before, with the merged group's s the OR count."""
    rng = np.random.default_rng(2)
    g = rng.random((500, 6)) < np.array([0.05, 0.3, 0.3, 0.1, 0.6, 0.02])
    groups = [[0], [1, 2], [3], [4], [5]]  # a state with one merge done: ranks 1, 2, 1, 1, 1
    G = np.stack([g[:, m].any(1) for m in groups], 1).astype(np.float64)
    S = torch.from_numpy(G.T @ G)
    r = torch.tensor([len(m) for m in groups], dtype=torch.float64)
    alpha = 3.0
    costs = merge_costs(S, r, alpha)
    before = description_length(S.diagonal(), r, alpha)
    for i, j in itertools.combinations(range(len(groups)), 2):
        rest = [k for k in range(len(groups)) if k not in (i, j)]
        s_after = torch.tensor([G[:, k].sum() for k in rest] + [np.maximum(G[:, i], G[:, j]).sum()])
        r_after = torch.cat([r[rest], (r[i] + r[j]).view(1)])
        after = description_length(s_after.double(), r_after, alpha)
        assert costs[i, j].item() == pytest.approx(after - before, rel=1e-9, abs=1e-9)
    assert torch.isinf(costs[torch.ones(5, 5, dtype=torch.bool).tril()]).all()
    assert torch.isinf(merge_costs(S[:1, :1], r[:1], alpha)).all()  # one group: nothing to merge


@pytest.mark.parametrize("sizes", [(1, 2, 3, 2, 1, 3, 2, 2), (1, 2, 3) * 15])
def test_greedy_merge_recovers_planted_mechanisms_and_stops_at_a_local_minimum(sizes):
    """(The second case has 96 live columns: the merge compacts its slots on the way.)"""
    g, truth = planted(20000, sizes)
    live = np.flatnonzero(g.sum(0) > 0)
    assert list(live) == list(range(len(truth) - 2))  # the two never-firing columns are dead
    f = firings_of(g).restricted(live)
    merges = merge_greedy(f, alpha=3.0)
    labels = {f"m:{i}": str(truth[i]) for i in live}
    found = [[f.names[i] for i in grp] for grp in merges.groups]
    assert score(labels, found, len(sizes) + 1)["ari"] == 1.0
    assert merges.cost_final == pytest.approx(merges.cost_singletons + sum(merges.deltas))
    # no further merge shortens the description: recompute every ΔL from the raw firings
    G = np.stack([g[:, grp].any(1) for grp in merges.groups], 1).astype(np.float64)
    r = torch.tensor([len(grp) for grp in merges.groups], dtype=torch.float64)
    assert merges.fired == [int(v) for v in G.sum(0)]
    assert merge_costs(torch.from_numpy(G.T @ G), r, 3.0).min() >= 0


def assert_same_merges(f: Firings, alpha: float) -> None:
    fast, dense = merge_greedy(f, alpha), merge_greedy_dense(f, alpha)
    assert fast.groups == dense.groups  # same groups, members in the same merge order
    assert fast.deltas == dense.deltas  # same merges in the same order, bit for bit
    assert fast.fired == dense.fired
    assert fast.cost_singletons == dense.cost_singletons and fast.cost_final == dense.cost_final


@pytest.mark.parametrize("alpha", [0.5, 3.0, 30.0])
@pytest.mark.parametrize(
    "case", ["planted", "planted-many", "random", "ties", "tied-pairs", "undercut", "sparse"]
)
def test_scalable_merge_makes_the_reference_merges(case, alpha, monkeypatch):
    """merge.py (certificates, floors, recounts in blocks) against the dense reference: the same
    merges, ties included (duplicated columns tie exactly), with blocks and recount batches
    small enough that every path of merge.py runs."""
    import spdkit.analysis.mechanisms.merge as merge_module

    monkeypatch.setattr(merge_module, "_ROW_BLOCK_ELEMENTS", 200)
    monkeypatch.setattr(merge_module, "_RECOUNT_BATCH", 3)
    rng = np.random.default_rng(7)
    if case == "planted":
        g, _ = planted(3000)
    elif case == "planted-many":
        g, _ = planted(3000, (1, 2, 3) * 8, seed=1)
    elif case == "random":
        g = rng.random((1500, 40)) < rng.uniform(0.01, 0.4, 40)
    elif case == "ties":
        base = rng.random((800, 10)) < 0.1
        g = np.concatenate([base, base, base[:, :4]], 1)
    elif case == "tied-pairs":  # three equal disjoint pairs: a new pair's line ties an older one
        g = np.zeros((300, 6), dtype=bool)
        for i in range(3):
            g[100 * i : 100 * (i + 1), 2 * i : 2 * i + 2] = True
    elif case == "undercut":  # 1 and 2 merge first; 0's line to the union undercuts its floor
        g = np.zeros((220, 9), dtype=bool)
        g[0:20, [0, 1]] = True  # U1
        g[20:50, [0, 2]] = True  # U2: 0's best partner is 2 (b)
        g[50:150, [1, 2]] = True  # W
        for j in range(6):  # unrelated columns keep k, and so λ, up
            g[150 + 10 * j : 155 + 10 * j, 3 + j] = True
    else:
        g = rng.random((400, 50)) < 0.01
    f = firings_of(g).restricted(np.flatnonzero(g.sum(0) > 0))
    assert_same_merges(f, alpha)


@st.composite
def records(draw) -> np.ndarray:
    """Small firing matrices [samples, n] built from a few base columns, each column one base
    OR'd with sparse extras: duplicated and nested columns make exact ties and merges whose new
    lines undercut old ones, the cases the certificates and floors must get right."""
    samples = draw(st.integers(4, 40))
    bases = draw(arrays(np.bool_, st.tuples(st.just(samples), st.integers(1, 4))))
    picks = draw(st.lists(st.integers(0, bases.shape[1] - 1), min_size=2, max_size=14))
    extras = draw(arrays(np.bool_, (samples, len(picks)), elements=st.booleans()))
    sparse = draw(arrays(np.bool_, (samples, len(picks)), elements=st.booleans()))
    return bases[:, picks] | (extras & sparse & draw(st.booleans()))


@settings(max_examples=300, deadline=None)
@given(g=records(), alpha=st.sampled_from([0.25, 0.5, 1.0, 3.0, 10.0]))
def test_scalable_merge_matches_the_reference_on_any_record(g, alpha):
    live = np.flatnonzero(g.sum(0) > 0)
    if len(live) >= 1:
        assert_same_merges(firings_of(g).restricted(live), alpha)


def test_alpha_trades_rank_against_co_firing():
    """Two always-together columns merge at any α; two independent ones merge only when a
    rank-one piece is cheap (α small), as the formula says."""
    rng = np.random.default_rng(3)
    on = rng.random(4000) < 0.1
    g = np.stack([on, on, rng.random(4000) < 0.1, rng.random(4000) < 0.1], 1)
    f = firings_of(g)
    for alpha in (0.5, 3.0, 30.0):
        groups = merge_greedy(f, alpha).groups
        assert any({0, 1} <= set(group) for group in groups)
    assert len(merge_greedy(f, 3.0).groups) == 3
    assert len(merge_greedy(f, 0.5).groups) == 1


def exact_tms_decomposition(n_hidden_layers: int = 0) -> spdkit.Decomposition:
    """A TMS 5-2 whose components are set to the ground truth: linear1 subcomponent f is
    W[:, f] e_fᵀ (at column 2f), linear2's is e_f W[:, f]ᵀ (at column 2f + 1); the rest zero."""
    data = tiny_tms_dict(eval={"n_eval_samples": 64, "one_hot_value": 1.0})
    data["target"]["n_hidden_layers"] = n_hidden_layers
    data["modules"] = [{"pattern": "linear1", "C": 10}, {"pattern": "linear2", "C": 10}]
    if n_hidden_layers:
        data["modules"].append({"pattern": "hidden_layers.*", "C": 4})
    config = parse_config(data)
    target = target_kind(config.target).build(config.target)
    model = ComponentModel.from_config(target, config)
    W = target.linear1.weight.detach()  # [2, 5]
    with torch.no_grad():
        for name in ("linear1", "linear2"):
            comps = model.components(name)
            comps.U.zero_()
            comps.V.zero_()
        for f in range(5):
            model.components("linear1").U[:, 2 * f] = W[:, f]
            model.components("linear1").V[2 * f, f] = 1.0
            model.components("linear2").U[f, 2 * f + 1] = 1.0
            model.components("linear2").V[2 * f + 1] = W[:, f]
    return spdkit.Decomposition(model, config)


def test_tms_ground_truth_pairs_each_features_two_subcomponents():
    decomp = exact_tms_decomposition()
    live = [f"linear1:{2 * f}" for f in range(5)] + [f"linear2:{2 * f + 1}" for f in range(5)]
    labels, expected = true_mechanisms(decomp, live)
    assert expected == 5
    assert labels == {
        **{f"linear1:{2 * f}": f"feature {f}" for f in range(5)},
        **{f"linear2:{2 * f + 1}": f"feature {f}" for f in range(5)},
    }
    right = [[f"linear1:{2 * f}", f"linear2:{2 * f + 1}"] for f in range(5)]
    wrong = [[f"linear1:{2 * f}", f"linear2:{(2 * f + 3) % 10}"] for f in range(5)]
    assert score(labels, right, expected)["ari"] == 1.0
    assert score(labels, wrong, expected)["ari"] < 0.1


def test_identity_layers_form_one_more_mechanism():
    decomp = exact_tms_decomposition(n_hidden_layers=1)
    labels, expected = true_mechanisms(decomp, ["hidden_layers.0:0", "hidden_layers.0:3"])
    assert expected == 6 and set(labels.values()) == {"identity"}


def test_targets_without_ground_truth_get_none():
    decomp = exact_tms_decomposition()
    decomp.config = decomp.config.model_copy(update={"target": None})
    assert true_mechanisms(decomp, []) is None


@pytest.fixture
def tiny_run(tiny_tms_run):
    return tiny_tms_run


def dense_record(model: ComponentModel, xs: list[torch.Tensor], rows: int, tau: float) -> Firings:
    """The plain record: every batch's CI of all modules as one dense bool block, first `rows`
    rows (what gather_firings must equal without ever building it)."""
    blocks = []
    for x in xs:
        ci = causal_importance(model, x)
        blocks.append(
            torch.cat([ci[m].reshape(-1, ci[m].shape[-1]) for m in model.module_names], -1)
        )
    return firings_of((torch.cat(blocks)[:rows] > tau).numpy())


def tiny_lm_model() -> tuple[ComponentModel, object]:
    """An untrained tiny_lm with its MLPs and attention decomposed, and its data (CI functions
    at initialisation fire on a mix of positions: enough to check the bookkeeping)."""
    modules = [{"pattern": "blocks.0.mlp.*", "C": 6}, {"pattern": "blocks.1.attn.*", "C": 5}]
    small = {"target.d_model": 16, "target.d_mlp": 32, "target.seq_len": 16}
    config = load_config("tiny_lm", {**small, "modules": modules})
    target = target_kind(config.target).build(config.target)
    return ComponentModel.from_config(target, config), data_source(config)


@pytest.mark.parametrize("kind", ["tms", "lm"])
def test_gather_firings_equals_the_dense_record(kind, tiny_run):
    """Every row, including a last batch cut short (toys: fewer inputs drawn; LM: fewer
    sequences drawn and the last one's positions cut), in row-major order."""
    if kind == "tms":
        decomp = spdkit.load(tiny_run)
        model, data, per_batch, n = decomp.model, eval_data_source(decomp.config), 256, 700
        batches = [256, 256, 188]
    else:
        (model, data), per_batch, n = tiny_lm_model(), 4, 150  # 16 positions per sequence
        batches = [4, 4, 2]  # 64 + 64 + 22 of 32 positions
    firings = gather_firings(
        model, data, n, 0.1, per_batch, torch.Generator().manual_seed(5), False
    )
    gen = torch.Generator().manual_seed(5)
    expected = dense_record(model, [data.sample(b, gen) for b in batches], n, 0.1)
    assert firings.n_samples == n and len(firings.fired) > 0
    assert firings.names == [
        f"{m}:{i}" for m in model.module_names for i in range(model.components(m).C)
    ]
    assert (firings.sample_ptr == expected.sample_ptr).all()
    assert (firings.fired == expected.fired).all()


def test_dead_subcomponents_fire_on_fewer_than_min_count_samples(tiny_run):
    decomp = spdkit.load(tiny_run)
    params = ClusterParams(samples=1000, min_count=40)
    firings = gather(decomp, params, progress=False)
    found = cluster(decomp, params, progress=False)
    counts = dict(zip(firings.names, firings.counts(), strict=True))
    assert found.dead == [n for n, c in counts.items() if c < 40]
    assert all(counts[m] >= 40 for c in found.clusters for m in c.members)
    with pytest.raises(ValueError, match="all 16 subcomponents fire on fewer than 1001"):
        cluster(decomp, replace(params, min_count=1001), progress=False)


def test_resid_mlp_labels_follow_one_hot_responses(monkeypatch):
    """W_in: one feature → that feature's mechanism; W_out responding to ≥ 25 % → the dense one;
    W_in that broad, or either to a few features (here 2 of 10), → alone."""
    data = tiny_tms_dict()
    data["target"] = {
        "kind": "resid_mlp",
        "n_features": 10,
        "d_resid": 8,
        "n_layers": 1,
        "d_mlp": 2,
    }
    data["modules"] = [
        {"pattern": "layers.*.mlp_in", "C": 4},
        {"pattern": "layers.*.mlp_out", "C": 3},
    ]
    config = parse_config(data)
    model = ComponentModel.from_config(target_kind(config.target).build(config.target), config)
    responses = {
        "layers.0.mlp_in": [[2], list(range(10)), [0, 1], []],
        "layers.0.mlp_out": [[0, 1, 2, 3], [3], [1, 2]],
    }
    kind = TARGET_KINDS["resid_mlp"]
    known = dataclasses.replace(kind.mechanisms, feature_owners=lambda model, cfg: responses)
    monkeypatch.setitem(TARGET_KINDS, "resid_mlp", dataclasses.replace(kind, mechanisms=known))
    live = [f"layers.0.mlp_in:{i}" for i in range(3)] + [f"layers.0.mlp_out:{i}" for i in range(3)]
    labels, expected = true_mechanisms(spdkit.Decomposition(model, config), live)
    assert expected == 11  # 10 features + the dense W_out mechanism
    assert labels == {
        "layers.0.mlp_in:0": "feature 2",
        "layers.0.mlp_in:1": "alone layers.0.mlp_in:1",
        "layers.0.mlp_in:2": "alone layers.0.mlp_in:2",
        "layers.0.mlp_out:0": "dense",
        "layers.0.mlp_out:1": "feature 3",
        "layers.0.mlp_out:2": "alone layers.0.mlp_out:2",
    }


def test_cluster_command_writes_the_contract(tiny_run):
    result = runner.invoke(app, ["cluster", str(tiny_run), "--samples", "3000", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "ground truth: ARI" in result.output and "alive subcomponents" in result.output
    data = json.loads((tiny_run / "clusters.json").read_text())
    assert data["method"] == "mdl-greedy"
    assert data["params"]["samples"] == 3000 and data["params"]["alpha"] == ClusterParams().alpha
    members = [m for c in data["clusters"] for m in c["members"]]
    every = [f"{m}:{i}" for m in ("linear1", "linear2") for i in range(8)]
    assert sorted(members + data["dead"]) == sorted(every)  # a partition of all subcomponents
    assert len(set(members)) == len(members)
    assert [c["id"] for c in data["clusters"]] == list(range(len(data["clusters"])))
    assert -1 <= data["ground_truth"]["ari"] <= 1
    assert data["ground_truth"]["n_mechanisms_expected"] == 5
    assert (tiny_run / "figures" / "clusters.png").stat().st_size > 0
    assert data["cost"]["firings"] > 0 and data["n_samples"] == 3000


def test_mechanism_masks_ablate_a_cluster(tiny_run):
    decomp = spdkit.load(tiny_run)
    decomp.cluster(ClusterParams(samples=2000), progress=False)
    clusters = decomp.clusters()
    x = torch.eye(5)
    full = decomp.model(x, decomp.model.ones_masks())
    k = 0
    masks = decomp.mechanism_masks(off=[k])
    for module, indices in clusters[k].indices().items():
        assert (masks[module][indices] == 0).all()
        assert masks[module].sum() == masks[module].numel() - len(indices)
    ablated = decomp.model(x, masks)
    assert not torch.allclose(ablated, full)  # its members carry weight: the output changes
    only = decomp.mechanism_masks(only=[k])
    assert sum(int(m.sum()) for m in only.values()) == len(clusters[k].members)
    with pytest.raises(KeyError, match="no cluster with id 999"):
        decomp.mechanism_masks(off=[999])
    with pytest.raises(ValueError, match="either `off`"):
        decomp.mechanism_masks(off=[0], only=[1])


def test_cluster_errors_are_one_line(tmp_path):
    result = runner.invoke(app, ["cluster", str(tmp_path / "missing")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    decomp = exact_tms_decomposition()
    with pytest.raises(ValueError, match="no run directory"):
        decomp.clusters()
    result = runner.invoke(app, ["cluster", str(tmp_path), "--threshold", "1"])
    assert result.exit_code == 2 and "threshold = 1.0: must be in [0, 1)" in result.output
    (tmp_path / "clusters.json").write_text('{"clusters": 3}')
    with pytest.raises(RunDirError, match="not a clusters.json"):
        read_clusters(tmp_path)


@pytest.mark.slow
def test_tms_5_2_clusters_match_ground_truth(tmp_path):
    """The real thing: a full tms_5-2 decomposition, clustered, scores ARI ≥ 0.95."""
    out = tmp_path / "tms"
    assert runner.invoke(app, ["run", "tms_5-2", "--out", str(out), "--quiet"]).exit_code == 0
    result = runner.invoke(app, ["cluster", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    gt = json.loads((out / "clusters.json").read_text())["ground_truth"]
    assert gt["ari"] >= 0.95 and gt["n_mechanisms_found"] == 5, gt


def test_cluster_an_unfinished_run_at_its_checkpoint(tiny_run):
    result = runner.invoke(
        app, ["cluster", str(tiny_run), "--checkpoint", "--samples", "500", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    written = list((tiny_run / "partial").glob("step_*/clusters.json"))
    assert len(written) == 1 and (written[0].parent / "figures" / "clusters.png").exists()


def test_switching_a_mechanism_off_removes_exactly_its_feature():
    """On the exact TMS decomposition, mechanism f = {linear1:2f, linear2:2f+1}: without it the
    model cannot reconstruct feature f, and features it does not touch come out unchanged."""
    from spdkit.analysis.mechanisms.clusters import Cluster, mechanism_masks

    decomp = exact_tms_decomposition()
    clusters = [Cluster(f, [f"linear1:{2 * f}", f"linear2:{2 * f + 1}"], 0.05) for f in range(5)]
    x = torch.eye(5)
    with torch.no_grad():
        full = decomp.model(x, decomp.model.ones_masks())
        assert torch.allclose(full, decomp.model.target(x), atol=1e-6)  # the sum of components is W
        for f in range(5):
            out = decomp.model(x, mechanism_masks(decomp, clusters, off=[f]))
            assert out[f, f] == 0 and full[f, f] > 0  # feature f alone: its output is gone
            only = decomp.model(x, mechanism_masks(decomp, clusters, only=[f]))
            assert torch.isclose(only[f, f], full[f, f], atol=1e-6)  # its output needs only it


def test_a_sequence_fires_a_piece_if_any_of_its_positions_does():
    """`unit: sequence` clusters over sequences: a piece fires on one if it fires on at least
    `sequence_rate` of its positions (any, at 0); toy CI has no positions and is refused in one
    line; the unit is checked by name."""
    from spdkit.analysis.mechanisms.firings import per_sequence_ci

    # two sequences of four positions, two pieces; τ 0.1
    ci = {
        "m": torch.tensor(
            [
                [[0.0, 0.2], [0.9, 0.0], [0.5, 0.0], [0.0, 0.0]],  # piece 0 at 2 positions, 1 at 1
                [[0.05, 0.0], [0.0, 0.3], [0.0, 0.3], [0.0, 0.3]],  # piece 1 at 3
            ]
        )
    }
    anywhere = per_sequence_ci(ci, 0.1)["m"]
    torch.testing.assert_close(anywhere, torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
    half = per_sequence_ci(ci, 0.1, min_rate=0.5)["m"]  # at least 2 of 4 positions
    torch.testing.assert_close(half, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="no positions"):
        per_sequence_ci({"m": torch.zeros(4, 2)}, 0.1)
    with pytest.raises(ValueError, match="unit = token: must be position or sequence"):
        ClusterParams(unit="token")  # type: ignore[arg-type]
