"""APD, the baseline (`spdkit.method.apd`): each term by hand, the fast step against the plain
one (`spdkit.method.reference.reference_apd_losses`), the config rules, and a run end to end."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from spdkit.api import load
from spdkit.config import parse_config
from spdkit.errors import ConfigError
from spdkit.method.apd import (
    batch_top_k,
    component_matrices,
    gradient_attributions,
    repeat_per_rank,
    schatten_penalty,
)
from spdkit.method.apd_step import apd_losses
from spdkit.method.components import LinearComponents
from spdkit.method.model import ComponentModel
from spdkit.method.reference import reference_apd_losses
from spdkit.pipeline.run import run_experiment
from spdkit.targets import data_source, target_kind
from spdkit.training.loop import build_trainer
from tests.helpers import tiny_resid_dict


def apd_dict(**apd) -> dict:
    """TMS 5-2 with APD: 5 full-rank components over linear1 and linear2."""
    return {
        "seed": 0,
        "target": {"kind": "tms", "n_features": 5, "n_hidden": 2, "train_steps": 500},
        "modules": [{"pattern": "linear1", "C": 5}, {"pattern": "linear2", "C": 5}],
        "components": {"init": "normal"},
        "apd": {"top_k": 0.5, "simplicity_coeff": 0.7, "schatten_p": 0.9, **apd},
        "loss": {"output_loss": "mse"},
        "training": {"steps": 30, "batch_size": 64, "optimizer": {"lr": 0.01}},
        "eval": {"n_eval_samples": 128, "one_hot_value": 1.0},
    }


def test_batch_top_k_by_hand() -> None:
    A = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]])
    # batch top-k, k = 1.5 per input: the 3 largest of the batch's 6
    assert batch_top_k(A, 1.5).tolist() == [[True, False, True], [False, True, False]]
    # per input, k = 1
    assert batch_top_k(A, 1, batch=False).tolist() == [[True, False, False], [False, True, False]]


def test_schatten_penalty_by_hand() -> None:
    comps = LinearComponents(3, 2, 4, None)  # 2 components of rank 2
    with torch.no_grad():
        comps.U.copy_(torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 3.0, 0.0, 0.0]]))
        comps.V.copy_(torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]]))
    # λ = ‖U_m‖ ‖V_m‖: component 0 → 1·1, 3·2; component 1 → 2·1, 0·√2
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    p = 0.5
    lam = {0: [1.0, 6.0], 1: [2.0, 0.0]}
    # (λ² + 1e-16)^{p/2}: the ε keeps p < 1 differentiable at 0 (and costs 1e-4 there)
    per = {c: sum((v**2 + 1e-16) ** (p / 2) for v in lam[c]) for c in lam}
    expected = (2 * per[0] + 1 * per[1]) / (6 * 2)  # N = 6 weights, B = 2
    got = schatten_penalty({"m": (comps, 2)}, s, p, n_params=6)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_component_matrices_and_masks() -> None:
    comps = LinearComponents(3, 2, 4, None)
    P = component_matrices(comps, 2)
    assert P.shape == (2, 2, 3)
    torch.testing.assert_close(P.sum(0), comps.weight())
    torch.testing.assert_close(P[1], comps.U[:, 2:] @ comps.V[2:])
    assert repeat_per_rank(torch.tensor([[1.0, 0.0]]), 2).tolist() == [[1.0, 1.0, 0.0, 0.0]]


def test_gradient_attributions_against_per_parameter_jacobian() -> None:
    """A_c = sqrt(mean_o (Σ_l Σ_ij ∂f_o/∂W_l,ij P_c,l,ij)²), from the full Jacobian."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    net.requires_grad_(False)
    x = torch.randn(5, 4)
    comps = {"0": (LinearComponents(4, 3, 6, None), 2), "2": (LinearComponents(3, 2, 6, None), 2)}
    modules = {"0": net[0], "2": net[2]}
    got = gradient_attributions(lambda: net(x), modules, comps)

    params = {k: v for k, v in net.named_parameters()}

    def f(w0, w2, xb):
        full = {**params, "0.weight": w0, "2.weight": w2}
        return torch.func.functional_call(net, full, (xb[None],))[0]

    J0, J2 = torch.func.vmap(torch.func.jacrev(f, argnums=(0, 1)), in_dims=(None, None, 0))(
        net[0].weight, net[2].weight, x
    )  # [B, d_L, o, i]
    P0 = component_matrices(comps["0"][0], 2).detach()
    P2 = component_matrices(comps["2"][0], 2).detach()
    per_output = torch.einsum("bloi,coi->blc", J0, P0) + torch.einsum("bloi,coi->blc", J2, P2)
    expected = per_output.pow(2).mean(1).sqrt()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def resid_apd_dict() -> dict:
    """A 2-layer residual MLP with APD and the hidden-activation term on both mlp_in."""
    data = apd_dict(top_k=2.0, hidden_recon_coeff=1.0, hidden_recon_modules=["layers.*.mlp_in"])
    resid = tiny_resid_dict()
    data["target"] = resid["target"]
    data["modules"] = [{"pattern": m["pattern"], "C": 6} for m in resid["modules"]]
    data["eval"] = resid["eval"]
    return data


@pytest.mark.parametrize(
    "data",
    [
        apd_dict(),
        apd_dict(attributions_from="components"),
        apd_dict(batch_top_k=False, top_k=2, rank=1),
        resid_apd_dict(),
    ],
    ids=[
        "target attributions",
        "component attributions",
        "per-input top-k, rank 1",
        "resid mlp, hidden term",
    ],
)
def test_apd_losses_match_the_plain_implementation(data) -> None:
    config = parse_config(data)
    target = target_kind(config.target).build(config.target)  # untrained: any weights do
    trainer = build_trainer(target, data_source(config), config, "cpu")
    model = trainer.model
    for _ in range(3):  # move off the initialisation
        trainer.train_step()
    # dense inputs: no two attributions tie (an all-zero TMS input ties every component at 0,
    # and top-k may break a tie either way)
    d_in = config.target.n_features
    x = torch.rand(32, d_in, generator=torch.Generator().manual_seed(5))

    params = model.trainable_parameters()
    for p in params:
        p.grad = None
    fast = apd_losses(model, x, config).terms
    fast_grads = [p.grad.clone() if p.grad is not None else None for p in params]
    for p in params:
        p.grad = None
    plain = reference_apd_losses(model, x, config)
    plain["total"].backward()
    if config.apd.hidden_recon_coeff > 0:
        assert fast["apd_hidden"] > 0
    for k in plain:
        torch.testing.assert_close(fast[k], plain[k].detach(), rtol=1e-5, atol=1e-9)
    for p, g in zip(params, fast_grads, strict=True):
        if g is None:
            assert p.grad is None or float(p.grad.abs().max()) == 0
        else:
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-7 * float(g.norm()) + 1e-12)


def test_apd_config_rules() -> None:
    with pytest.raises(ConfigError, match="SPD loss terms must be 0"):
        parse_config({**apd_dict(), "loss": {"stochastic_recon_coeff": 1.0}})
    bad = apd_dict()
    bad["modules"][1]["C"] = 4
    with pytest.raises(ConfigError, match="same C"):
        parse_config(bad)
    with pytest.raises(ConfigError, match="top_k must be an integer"):
        parse_config(apd_dict(batch_top_k=False, top_k=1.5))


def test_apd_attributions_need_one_vector_per_input() -> None:
    net = nn.Sequential(nn.Linear(4, 4))
    net.requires_grad_(False)
    comps = {"0": (LinearComponents(4, 4, 4, None), 1)}
    with pytest.raises(ValueError, match=r"output \[batch, d_out\]"):
        gradient_attributions(lambda: net(torch.randn(2, 3, 4)), {"0": net[0]}, comps)


def test_apd_run_end_to_end(tmp_path) -> None:
    """`spdkit run` on an APD config: the run directory, the APD terms in metrics.jsonl, the
    feature match measured on the components, and the importances a 0/1 selection."""
    config = parse_config(apd_dict())
    out = tmp_path / "run"
    run_experiment(config, out, progress=False)
    summary = json.loads((out / "summary.json").read_text())
    fm = summary["feature_match"]
    assert fm["counted"] == "components" and fm["paper"]["table"] == "APD paper §3.1"
    assert set(fm["non_negligible"]) == {"linear1", "linear2"}
    assert all(0 <= v <= 5 for v in fm["non_negligible"].values())
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert {"faithfulness", "apd_minimality", "apd_simplicity"} <= set(last)
    assert (out / "components.safetensors").exists()
    # the components reload into an APD model whose importances are APD's selection
    decomp = load(out)
    model: ComponentModel = decomp.model
    assert model.apd is not None and model.apd_ranks == {"linear1": 2, "linear2": 2}
    x = torch.rand(16, 5)
    g, g_upper = model.importances(x, model.record(x))
    assert g["linear1"].shape == (16, 10)
    assert set(g["linear1"].unique().tolist()) <= {0.0, 1.0}
    assert g["linear1"].sum().item() == pytest.approx(2 * int(0.5 * 16))


def test_resid_report_of_an_apd_model_reads_one_flag_per_component(tmp_path) -> None:
    """The residual-MLP verdict counts negligible pieces as dead: for APD a component's
    norm flag covers its r CI columns (an untrained model: any weights do)."""
    from spdkit.method.measures import causal_importance, live_columns, one_hot_inputs
    from spdkit.targets.resid_mlp_analysis import report

    config = parse_config(resid_apd_dict())
    target = target_kind(config.target).build(config.target)
    model = ComponentModel.from_config(target, config)
    name = model.module_names[0]
    with torch.no_grad():
        ci = causal_importance(model, one_hot_inputs(config.target.n_features, 0.75))
    assert live_columns(model, name, 0.1).shape == (ci[name].shape[1],)
    out = report(model, config, ci, tmp_path)
    assert out["resid_mlp"]["verdict"]["rules"]["negligible_weight_is_dead"]


def test_tms_feature_owners_of_an_apd_run_are_its_components() -> None:
    """Every rank-one piece of an APD component gets the component's feature (its matrix P_c),
    so a clustering of an APD run is scored against the toy ground truth like SPD's."""
    from spdkit.targets.tms_analysis import feature_owners

    config = parse_config(apd_dict())
    target = target_kind(config.target).build(config.target)
    model = ComponentModel.from_config(target, config)
    comps = model.components("linear1")  # 5 components of rank 2: U [2, 10], V [10, 5]
    with torch.no_grad():
        comps.V.zero_()
        comps.U.fill_(1.0)
        for c in range(5):
            comps.V[2 * c, (c + 3) % 5] = 1.0  # component c reads feature c + 3
            comps.V[2 * c + 1, (c + 3) % 5] = 0.5  # its second piece: the same feature
    owners = feature_owners(model, config)["linear1"]
    assert owners == [[(c + 3) % 5] for c in range(5) for _ in range(2)]
