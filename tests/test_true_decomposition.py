"""The toy targets' true decompositions (`KnownMechanisms.true_components`), the start of
training at them, and the TMS verdict that asks for them."""

import pytest
import torch

from spdkit.analysis.mechanisms.ground_truth import start_at_truth
from spdkit.method.measures import subcomponents
from spdkit.targets.tms_analysis import TMSVerdictRules, tms_verdict, true_components
from tests.helpers import tiny_resid_dict, tiny_tms_dict, trainer_for


@pytest.mark.parametrize("hidden_layers", [0, 1])
def test_tms_truth_sums_to_w_one_feature_per_term(hidden_layers):
    target = {**tiny_tms_dict()["target"], "n_hidden_layers": hidden_layers}
    modules = [{"pattern": "linear1", "C": 8}, {"pattern": "linear2", "C": 8}]
    if hidden_layers:
        modules.append({"pattern": "hidden_layers.*", "C": 4})
    model = trainer_for(tiny_tms_dict(target=target, modules=modules)).model
    truth = true_components(model)
    for name, (U, V) in truth.items():
        torch.testing.assert_close(U @ V, model.target_weight(name).detach())
    U1, V1 = truth["linear1"]
    assert torch.equal(V1, torch.eye(5))  # term f reads feature f alone
    U2, _ = truth["linear2"]
    assert torch.equal(U2, torch.eye(5))  # term f writes feature f alone
    if hidden_layers:
        assert truth["hidden_layers.0"][0].shape == (2, 2)


def test_start_at_truth_sets_the_terms_and_shrinks_the_spares():
    trainer = trainer_for(tiny_tms_dict())
    model, config = trainer.model, trainer.config
    start_at_truth(model, config, spare_scale=1e-4)
    for name in model.module_names:
        U, V = subcomponents(model, name)
        torch.testing.assert_close(U @ V, model.target_weight(name).detach(), atol=1e-3, rtol=0)
        spare = (U[:, 5:].norm(dim=0) * V[5:].norm(dim=1)).max()
        assert 0 < spare < 1e-3  # alive, but with no effect on the output
    verdict = tms_verdict(model, config, mmcs=1.0)
    assert verdict["ground_truth"], verdict
    assert verdict["non_negligible"] == {"linear1": 5, "linear2": 5}


def test_tms_verdict_needs_mmcs_and_one_term_per_feature():
    trainer = trainer_for(tiny_tms_dict())
    model, config = trainer.model, trainer.config
    start_at_truth(model, config)
    assert not tms_verdict(model, config, mmcs=TMSVerdictRules().mmcs_min - 1e-3)["ground_truth"]
    with torch.no_grad():  # feature 4's column carried by a sixth live term as well
        comps = model.components("linear1")
        comps.U[:, 5] = comps.U[:, 4]
        comps.V[5] = comps.V[4] * 0.5
        comps.V[4] *= 0.5
    verdict = tms_verdict(model, config, mmcs=1.0)
    assert verdict["non_negligible"]["linear1"] == 6 and not verdict["ground_truth"]


def test_resid_mlp_truth_is_exact_on_the_embedded_inputs():
    trainer = trainer_for(tiny_resid_dict())
    model = trainer.model
    start_at_truth(model, trainer.config)
    W_E = model.target.W_E
    x = torch.rand(7, W_E.shape[0])
    resid = x @ W_E
    comps = model.components("layers.0.mlp_in")
    torch.testing.assert_close(
        comps.inner(resid)[:, : W_E.shape[0]], x, atol=1e-4, rtol=0
    )  # term f reads x_f
    W_in = model.target_weight("layers.0.mlp_in")
    torch.testing.assert_close(resid @ (comps.U @ comps.V).T, resid @ W_in.T, atol=1e-3, rtol=1e-3)


def test_start_at_truth_needs_enough_terms():
    config = tiny_tms_dict(modules=[{"pattern": "linear1", "C": 3}])
    trainer = trainer_for(config)
    with pytest.raises(ValueError, match="C = 3 < 5"):
        start_at_truth(trainer.model, trainer.config)
