"""Attribution graphs: edges are gradient × activation, one hop, causal; cross-position edges
only run through attention; the batched backward equals one backward per target."""

from __future__ import annotations

import pytest
import torch

from spdkit.analysis import attribution
from spdkit.config import PlantedLMTargetConfig, load_config
from spdkit.method.model import ComponentModel
from spdkit.targets import planted
from tests.helpers import exact_components

SMALL = PlantedLMTargetConfig(n_tokens=16, seq_len=12, d_model=16, d_mlp=32, train_steps=1)
ALL = "blocks.*.*.*"  # q, k, v, o, fc_in, fc_out of both blocks


def _model(pattern: str = ALL) -> ComponentModel:
    torch.manual_seed(0)
    target = planted.build_planted_lm(SMALL).eval()
    specs = load_config("tiny_lm", {"modules": [{"pattern": pattern, "C": 16}]}).modules
    model = ComponentModel(target, specs)
    exact_components(model)
    return model


def _prompt() -> torch.Tensor:
    ids, _ = planted.PlantedTasks(SMALL).task_batch(
        "induction", 1, torch.Generator().manual_seed(1)
    )
    return ids


def test_the_leaf_pass_computes_the_masked_model():
    model = _model()
    ids = _prompt()
    g = attribution.ci_masks(model, ids)
    with attribution.leaf_pass(model, g) as store:
        logits = model.target(ids)
    assert set(store) == set(model.module_names)
    with torch.no_grad():
        torch.testing.assert_close(logits, model.masked_forward(ids, g))


def test_a_delta_component_is_a_constant_that_keeps_the_gradient_path():
    """With Δ-components (hf_lm's default) the leaf pass still computes the masked model (Δ
    unmasked) and its logits still reach the leaves: the edges are those of the same
    components without Δ (exact components: Δ is zero; a constant of the graph in any case)."""
    ids = _prompt()
    params = attribution.AttributionParams(ci_threshold=0.0, per_target=1000, max_edges=10**6)
    graphs = {}
    model = _model()
    for delta in (False, True):
        model.delta = delta  # the same components and CI function, with and without Δ
        g = attribution.ci_masks(model, ids)
        with attribution.leaf_pass(model, g) as store:
            logits = model.target(ids)
        assert logits.requires_grad and all(leaf.leaf.requires_grad for leaf in store.values())
        whole = {n: torch.ones(*v.shape[:-1], 1) for n, v in g.items()} if delta else None
        with torch.no_grad():  # the Δ-components always in: constants of the graph
            torch.testing.assert_close(logits, model.masked_forward(ids, g, delta=whole))
        graphs[delta] = attribution.prompt_graph(model, ids, params)
    plain = {(e["source"], e["target"]): e["value"] for e in graphs[False]["edges"]}
    with_delta = {(e["source"], e["target"]): e["value"] for e in graphs[True]["edges"]}
    assert plain
    for one, other in ((plain, with_delta), (with_delta, plain)):  # (q, k at position 0: ~0)
        for key, value in one.items():
            assert other.get(key, 0.0) == pytest.approx(value, rel=1e-4, abs=1e-5)


def test_edges_are_gradient_times_activation_one_hop_and_causal():
    model = _model()
    ids = _prompt()
    params = attribution.AttributionParams(ci_threshold=0.0, per_target=1000, max_edges=10**6)
    graph = attribution.prompt_graph(model, ids, params, decode=lambda t: " ".join(map(str, t)))
    assert graph["edges"] and graph["edge_mass"]["kept"] == pytest.approx(
        graph["edge_mass"]["total"], rel=1e-4
    )
    cross = 0
    for e in graph["edges"]:
        src_module, s, _ = e["source"].rsplit(":", 2)
        if e["target"].startswith("logit:"):
            t = int(e["target"].split(":")[1])
        else:
            tgt_module, t, _ = e["target"].rsplit(":", 2)
        assert int(s) <= int(t)  # causal
        if int(s) != int(t):  # across positions: only through the attention's mixing
            cross += 1
            block = src_module.rsplit(".", 1)[0]
            assert src_module.endswith((".k", ".v")) and tgt_module == f"{block}.o"
    assert cross > 0
    # one edge recomputed by hand, one backward for that one target
    edge = next(e for e in graph["edges"] if not e["target"].startswith("logit"))
    (src, s, c), (tgt, t, k) = (
        (m, int(a), int(b))
        for m, a, b in (x.rsplit(":", 2) for x in (edge["source"], edge["target"]))
    )
    g = attribution.ci_masks(model, ids)
    with attribution.leaf_pass(model, g) as store:
        model.target(ids)
    (grad,) = torch.autograd.grad(store[tgt].value[0, t, k], [store[src].leaf])
    assert edge["value"] == pytest.approx(
        (grad[0, s, c] * store[src].leaf[0, s, c]).item(), rel=1e-4
    )


def test_transparent_modules_pass_the_gradient_through_every_path():
    """With only layer-0 value pieces as nodes, everything else runs (masked) but transparent:
    an edge into a logit is the first-order effect of that node through every later module,
    checked by a finite difference of its mask (float64); with every module named, the graph
    is the default one."""
    model = _model().double()
    ids = _prompt()
    wide = {"ci_threshold": 0.0, "per_target": 1000, "max_edges": 10**6}
    default = attribution.prompt_graph(model, ids, attribution.AttributionParams(**wide))
    named = attribution.prompt_graph(
        model, ids, attribution.AttributionParams(**wide, nodes=(ALL,))
    )
    assert named["edges"] == default["edges"]
    params = attribution.AttributionParams(**wide, nodes=("blocks.0.attn.v",))
    graph = attribution.prompt_graph(model, ids, params)
    assert {n["module"] for n in graph["nodes"]} == {"blocks.0.attn.v"}
    into_logits = [e for e in graph["edges"] if e["target"].startswith("logit:")]
    assert into_logits and len(into_logits) == len(graph["edges"])  # no other targets
    g = attribution.ci_masks(model, ids)
    eps = 1e-6
    for edge in into_logits[:3]:
        _, s, c = edge["source"].rsplit(":", 2)
        _, t, k = edge["target"].split(":")
        bumped = {n: v.clone() for n, v in g.items()}
        bumped["blocks.0.attn.v"][0, int(s), int(c)] *= 1 + eps  # h̃ → (1 + ε) h̃
        with torch.no_grad():
            before = model.masked_forward(ids, g)[0, int(t), int(k)]
            after = model.masked_forward(ids, bumped)[0, int(t), int(k)]
        assert edge["value"] == pytest.approx(((after - before) / eps).item(), rel=1e-4, abs=1e-9)
    with pytest.raises(ValueError, match="matches no decomposed module"):
        attribution.prompt_graph(model, ids, attribution.AttributionParams(nodes=("nothing.*",)))


def test_only_the_strongest_edges_are_kept_and_dead_nodes_take_no_part():
    model = _model()
    ids = _prompt()
    params = attribution.AttributionParams(ci_threshold=0.5, per_target=2, max_edges=15)
    graph = attribution.prompt_graph(model, ids, params)
    assert len(graph["edges"]) <= 15
    alive = {n["id"] for n in graph["nodes"]}
    assert all(n["ci"] > 0.5 for n in graph["nodes"])
    assert all(e["source"] in alive for e in graph["edges"])
    by_target: dict[str, int] = {}
    for e in graph["edges"]:
        by_target[e["target"]] = by_target.get(e["target"], 0) + 1
    assert max(by_target.values()) <= 2
    values = [abs(e["value"]) for e in graph["edges"]]
    assert values == sorted(values, reverse=True)


def test_dataset_attributions_sum_the_prompt_edges_over_positions():
    """Over a dataset of one prompt, the edge between two subcomponents is the prompt graph's
    edges between them summed over positions, divided by the tokens."""
    model = _model()
    ids = _prompt()
    params = attribution.AttributionParams(ci_threshold=0.0, per_target=10**4, max_edges=10**6)
    graph = attribution.prompt_graph(model, ids, params)
    data = attribution.dataset_attributions(model, iter([ids]), ids.numel(), params)
    assert data["n_tokens"] == ids.numel() and data["into_next_token_logit"]
    summed: dict[tuple[str, str], float] = {}
    for e in graph["edges"]:
        if e["target"].startswith("logit"):
            continue
        key = tuple(
            x.rsplit(":", 2)[0] + ":" + x.rsplit(":", 1)[1] for x in (e["source"], e["target"])
        )
        summed[key] = summed.get(key, 0.0) + e["value"] / ids.numel()
    got = {(e["source"], e["target"]): e["value"] for e in data["edges"]}
    strongest = sorted(summed, key=lambda k: -abs(summed[k]))[:20]
    for key in strongest:
        assert got[key] == pytest.approx(summed[key], rel=1e-3, abs=1e-6)


def test_bad_parameters_and_inputs_are_refused():
    with pytest.raises(ValueError, match="per_target = 0"):
        attribution.AttributionParams(per_target=0)
    with pytest.raises(ValueError, match="one prompt at a time"):
        attribution.prompt_graph(
            _model(), torch.zeros(2, 5, dtype=torch.long), attribution.AttributionParams()
        )
