"""ComponentModel: exact reconstruction, the record, what a masked pass changes, pattern errors."""

import pytest
import torch
from torch import nn

from spdkit.config import ModuleSpec
from spdkit.method import inventory
from spdkit.method.model import ComponentModel
from tests.helpers import Net, exact_components


def test_masks_of_ones_with_exact_components_reproduce_the_target():
    net = Net()
    x = torch.randn(7, 6)
    y_ref = net(x).detach()
    model = ComponentModel(net, [ModuleSpec(pattern="layers.*.mlp_*", C=9)], ci_hidden_dim=4)
    exact_components(model)
    torch.testing.assert_close(model(x), y_ref)  # no masks: the original modules
    torch.testing.assert_close(model(x, model.ones_masks()), y_ref, rtol=1e-5, atol=1e-5)
    for name in model.module_names:  # each layer alone
        torch.testing.assert_close(
            model(x, {name: model.ones_masks()[name]}), y_ref, rtol=1e-5, atol=1e-5
        )


def test_only_matched_modules_are_decomposed_and_the_target_is_untouched():
    net = Net()
    keys = list(net.state_dict())
    model = ComponentModel(net, [ModuleSpec(pattern="layers.0.mlp_in", C=4)], ci_hidden_dim=2)
    assert model.module_names == ["layers.0.mlp_in"]
    assert list(net.state_dict()) == keys  # nothing wrapped or renamed
    assert not any(
        p.requires_grad
        for p in model.target.parameters()
        if p not in set(model.trainable_parameters())
    )
    # zero masks change only the output path through layers.0.mlp_in
    x = torch.randn(3, 6)
    zero = {"layers.0.mlp_in": torch.zeros(4)}
    bias = net.layers[0]["mlp_in"].bias
    h0 = torch.relu(bias.expand(3, 5))  # masked module outputs only its bias
    x1 = x + net.layers[0]["mlp_out"](h0)
    expected = net.head(x1 + net.layers[1]["mlp_out"](torch.relu(net.layers[1]["mlp_in"](x1))))
    torch.testing.assert_close(model(x, zero), expected)


def test_a_masked_pass_leaves_nothing_behind_even_when_it_fails():
    net = Net()
    x = torch.randn(3, 6)
    y = net(x)
    model = ComponentModel(net, [ModuleSpec(pattern="layers.*.mlp_*", C=4)], ci_hidden_dim=2)
    record = model.record(x)
    masks = {n: torch.zeros(4) for n in model.module_names}
    for subset in (masks, {"layers.1.mlp_out": masks["layers.1.mlp_out"]}):
        model.masked_forward(x, subset, record)
        torch.testing.assert_close(net(x), y)  # the target runs its original weights again
    with pytest.raises(ValueError, match="C = 4 entries"):  # fails inside the pass
        model.masked_forward(x, {"layers.1.mlp_in": torch.zeros(7)}, record)
    torch.testing.assert_close(net(x), y)
    assert model.record(x).order == record.order  # the record did not change either


def test_masked_forward_does_not_run_the_original_module():
    net = Net()
    model = ComponentModel(net, [ModuleSpec(pattern="head", C=3)], ci_hidden_dim=2)
    calls = []
    net.head.register_forward_hook(lambda *a: calls.append(1))
    model(torch.randn(2, 6), model.ones_masks())
    assert calls == [1]  # the module's hooks run; its weights do not (next test)
    with torch.no_grad():
        net.head.weight.fill_(float("nan"))
    assert torch.isfinite(model(torch.randn(2, 6), model.ones_masks())).all()


def test_record_holds_each_module_input_in_execution_order():
    net = Net()
    # listed in the opposite order of execution
    specs = [ModuleSpec(pattern="head", C=3), ModuleSpec(pattern="layers.0.mlp_in", C=2)]
    model = ComponentModel(net, specs, 2)
    x = torch.randn(4, 6)
    record = model.record(x)
    torch.testing.assert_close(record.inputs["layers.0.mlp_in"], x)
    torch.testing.assert_close(record.output, net(x))
    assert record.inputs["head"].shape == (4, 6)
    assert not record.output.requires_grad
    assert record.order == ("layers.0.mlp_in", "head")
    assert record.first(["head", "layers.0.mlp_in"]) == "layers.0.mlp_in"


def test_pattern_matching_nothing_lists_decomposable_modules():
    with pytest.raises(ValueError, match=r"matches nothing.*layers\.0\.mlp_in"):
        ComponentModel(Net(), [ModuleSpec(pattern="mlp_in", C=2)], 2)


def test_pattern_matching_an_undecomposable_module():
    with pytest.raises(ValueError, match=r"cannot be decomposed: layers \(ModuleList\)"):
        ComponentModel(Net(), [ModuleSpec(pattern="layers", C=2)], 2)


def test_module_matched_twice_is_an_error():
    specs = [ModuleSpec(pattern="head", C=2), ModuleSpec(pattern="h*", C=3)]
    with pytest.raises(ValueError, match="more than one pattern"):
        ComponentModel(Net(), specs, 2)


def test_weightless_and_elementwise_matches_are_skipped_and_other_weights_are_errors(monkeypatch):
    class WithNorm(Net):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(6)
            self.act = nn.ReLU()
            self.conv = nn.Conv2d(1, 2, 3)

    model = ComponentModel(WithNorm(), [ModuleSpec(pattern="layers.0.*", C=2)], 2)
    assert model.module_names == ["layers.0.mlp_in", "layers.0.mlp_out"]
    said = []  # what the module logs, whatever another test did to logging's configuration
    monkeypatch.setattr(inventory.log, "info", lambda msg, *args: said.append(msg % args))
    model = ComponentModel(WithNorm(), [ModuleSpec(pattern="[hn]*", C=2)], 2)
    assert model.module_names == ["head"]  # a LayerNorm holds no matrix: skipped, with a line
    assert any("skipping norm (LayerNorm): elementwise weights only" in m for m in said)
    with pytest.raises(ValueError, match="'conv', a Conv2d that cannot be decomposed"):
        ComponentModel(WithNorm(), [ModuleSpec(pattern="*", C=2)], 2)


def test_a_long_module_listing_is_cut_with_a_pointer():
    many = nn.Sequential(*[nn.Linear(2, 2) for _ in range(40)])
    with pytest.raises(ValueError) as err:
        ComponentModel(many, [ModuleSpec(pattern="nothing", C=2)], 2)
    message = str(err.value)
    assert "0, 1, 2" in message and ", 39" not in message
    assert "and 28 more; `spdkit modules` lists them all" in message
    assert len(message) < 200


def test_delta_component_by_hand():
    """A Δ mask beside the C masks: W'_b = Σ_c m_bc U_c V_c + m_bΔ (W − U V), per sample,
    with gradients reaching U and V through Δ too."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3))
    model = ComponentModel(net, [ModuleSpec(pattern="0", C=2)], ci_hidden_dim=2, delta=True)
    comps, W, b = model.components("0"), net[0].weight, net[0].bias
    x = torch.randn(5, 4)
    mask, m_delta = torch.rand(5, 2), torch.rand(5, 1)  # [batch, C], [batch, 1]
    y = model.forward(x, {"0": mask}, delta={"0": m_delta})
    delta = W - comps.U @ comps.V
    for i in range(5):
        W_i = comps.U @ torch.diag(mask[i]) @ comps.V + m_delta[i, 0] * delta
        torch.testing.assert_close(y[i], W_i @ x[i] + b)
    # all ones including Δ: the target, whatever U V is; without a Δ mask: U V alone
    ones = {"0": torch.ones(2)}
    torch.testing.assert_close(model.forward(x, ones, delta={"0": torch.ones(1)}), net(x))
    torch.testing.assert_close(model.forward(x, ones), x @ (comps.U @ comps.V).T + b)
    # Δ alone: W − U V; and Δ is not detached: U, V get gradients through it
    zeros = {"0": torch.zeros(2)}
    torch.testing.assert_close(model.forward(x, zeros, delta={"0": torch.ones(1)}), x @ delta.T + b)
    model.forward(
        x, {"0": torch.tensor([1.0, 0.0])}, delta={"0": torch.tensor([0.5])}
    ).sum().backward()
    assert comps.U.grad[:, 1].abs().sum() > 0  # subcomponent 1 enters only through Δ
    with pytest.raises(ValueError, match="C = 2 entries"):
        model.forward(x, {"0": torch.ones(3)})
    plain = ComponentModel(nn.Sequential(nn.Linear(4, 3)), [ModuleSpec(pattern="0", C=2)], 2)
    with pytest.raises(ValueError, match="has no Δ-component"):
        plain.forward(x, ones, delta={"0": torch.ones(1)})
