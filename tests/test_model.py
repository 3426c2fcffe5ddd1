"""ComponentModel: exact reconstruction, which modules are replaced, pattern errors."""

import pytest
import torch
from torch import nn

from spdkit.config import ModuleSpec
from spdkit.model import ComponentModel


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"mlp_in": nn.Linear(6, 5), "mlp_out": nn.Linear(5, 6)}) for _ in range(2)
        )
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer["mlp_out"](torch.relu(layer["mlp_in"](x)))
        return self.head(x)


def exact_components(model: ComponentModel) -> None:
    """Set U V = W exactly, via the SVD padded with zero subcomponents."""
    with torch.no_grad():
        for name in model.module_names:
            comps = model.components(name)
            W = model.target_weight(name)
            Uf, S, Vh = torch.linalg.svd(W, full_matrices=False)
            k = S.numel()
            comps.U.zero_()
            comps.V.zero_()
            comps.U[:, :k] = Uf * S
            comps.V[:k] = Vh


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


def test_only_matched_modules_are_replaced_and_target_is_frozen():
    net = Net()
    model = ComponentModel(net, [ModuleSpec(pattern="layers.0.mlp_in", C=4)], ci_hidden_dim=2)
    assert model.module_names == ["layers.0.mlp_in"]
    assert type(net.layers[0]["mlp_in"]).__name__ == "DecomposedModule"
    assert isinstance(net.layers[1]["mlp_in"], nn.Linear)
    assert isinstance(net.head, nn.Linear)
    assert not any(
        p.requires_grad
        for p in model.target.parameters()
        if p not in set(model.trainable_parameters())
    )
    # zero masks change only the output path through layers.0.mlp_in
    x = torch.randn(3, 6)
    zero = {"layers.0.mlp_in": torch.zeros(4)}
    bias = net.layers[0]["mlp_in"].original.bias
    h0 = torch.relu(bias.expand(3, 5))  # masked module outputs only its bias
    x1 = x + net.layers[0]["mlp_out"](h0)
    expected = net.head(x1 + net.layers[1]["mlp_out"](torch.relu(net.layers[1]["mlp_in"](x1))))
    torch.testing.assert_close(model(x, zero), expected)


def test_masked_forward_does_not_run_the_original_module():
    net = Net()
    model = ComponentModel(net, [ModuleSpec(pattern="head", C=3)], ci_hidden_dim=2)
    calls = []
    model.decomposed["head"].original.register_forward_hook(lambda *a: calls.append(1))
    model(torch.randn(2, 6), model.ones_masks())
    assert calls == []
    model(torch.randn(2, 6))
    assert calls == [1]


def test_target_forward_records_each_module_input():
    net = Net()
    model = ComponentModel(
        net, [ModuleSpec(pattern="head", C=3), ModuleSpec(pattern="layers.0.mlp_in", C=2)], 2
    )
    x = torch.randn(4, 6)
    y, inputs = model.target_forward_with_inputs(x)
    torch.testing.assert_close(inputs["layers.0.mlp_in"], x)
    assert inputs["head"].shape == (4, 6)
    assert not y.requires_grad


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


def test_execution_order_is_the_order_the_target_runs_its_modules():
    net = Net()
    # registered in the opposite order of execution: layers.1 before layers.0
    specs = [ModuleSpec(pattern="layers.1.*", C=3), ModuleSpec(pattern="layers.0.*", C=3)]
    model = ComponentModel(net, specs, ci_hidden_dim=4)
    model.target_forward_with_inputs(torch.randn(2, 6))
    assert model.execution_order == [
        "layers.0.mlp_in",
        "layers.0.mlp_out",
        "layers.1.mlp_in",
        "layers.1.mlp_out",
    ]
    assert model.first_module == "layers.0.mlp_in"


def test_reusing_the_first_modules_inner_acts_is_exact():
    """The full masked pass reuses the first module's x @ Vᵀ from the CI step (train.py):
    outputs and gradients must be identical to recomputing it."""
    torch.manual_seed(0)
    specs = [ModuleSpec(pattern="layers.*.mlp_*", C=4)]
    x = torch.randn(16, 6)

    def masked_pass(reuse: bool):
        torch.manual_seed(1)
        model = ComponentModel(Net(), specs, ci_hidden_dim=4)
        _, inputs = model.target_forward_with_inputs(x)
        inner = model.inner_acts(inputs)
        masks = {n: torch.rand(16, 4, generator=torch.Generator().manual_seed(2)) for n in inner}
        first = model.first_module
        out = model(x, masks, inner={first: inner[first]} if reuse else None)
        out.square().sum().backward()
        return out, [p.grad.clone() for p in model.trainable_parameters() if p.grad is not None]

    out_a, grads_a = masked_pass(reuse=False)
    out_b, grads_b = masked_pass(reuse=True)
    assert torch.equal(out_a, out_b)
    assert len(grads_a) == len(grads_b) > 0
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _layerwise_passes(net_cls, use_known: bool):
    """Every layerwise pass's output and the gradients of their summed squares."""
    torch.manual_seed(1)
    model = ComponentModel(net_cls(), [ModuleSpec(pattern="layers.*.mlp_*", C=4)], ci_hidden_dim=4)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(3))
    _, inputs, outputs = model.target_forward_record(x)
    inner = model.inner_acts(inputs)
    masks = {n: torch.rand(16, 4, generator=torch.Generator().manual_seed(2)) for n in inner}
    outs = [
        model(x, {n: masks[n]}, inner={n: inner[n]}, target_outputs=outputs if use_known else None)
        for n in model.module_names
    ]
    sum(o.square().sum() for o in outs).backward()
    return outs, [p.grad.clone() for p in model.trainable_parameters() if p.grad is not None]


def test_layerwise_passes_reusing_upstream_target_outputs_are_exact():
    """Modules before the masked one return their recorded target output (train.py): outputs
    and gradients are identical to recomputing them."""
    outs_a, grads_a = _layerwise_passes(Net, use_known=False)
    outs_b, grads_b = _layerwise_passes(Net, use_known=True)
    for a, b in zip(outs_a, outs_b, strict=True):
        assert torch.equal(a, b)
    assert len(grads_a) == len(grads_b) > 0
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.equal(a, b)


def test_upstream_reuse_covers_exactly_the_modules_run_before_the_masked_one():
    model = ComponentModel(Net(), [ModuleSpec(pattern="layers.*.mlp_*", C=4)], ci_hidden_dim=4)
    _, _, outputs = model.target_forward_record(torch.randn(4, 6))
    masked = ["layers.1.mlp_in"]
    assert list(model.upstream_of(masked, outputs)) == ["layers.0.mlp_in", "layers.0.mlp_out"]
    assert model.upstream_of(["layers.0.mlp_in", "layers.1.mlp_out"], outputs) == {}


def test_an_output_edited_in_place_is_recomputed_not_reused():
    """A target that edits a module's output in place (here ReLU(inplace=True)) must not have
    the edited tensor handed back as that module's output."""

    class InPlace(Net):
        def forward(self, x):
            for layer in self.layers:
                x = x + layer["mlp_out"](torch.relu_(layer["mlp_in"](x)))
            return self.head(x)

    model = ComponentModel(InPlace(), [ModuleSpec(pattern="layers.*.mlp_*", C=4)], ci_hidden_dim=4)
    _, _, outputs = model.target_forward_record(torch.randn(4, 6))
    assert "layers.0.mlp_in" not in outputs
    assert "layers.0.mlp_out" in outputs
    outs_a, _ = _layerwise_passes(InPlace, use_known=False)
    outs_b, _ = _layerwise_passes(InPlace, use_known=True)
    for a, b in zip(outs_a, outs_b, strict=True):
        assert torch.equal(a, b)


def test_weightless_matches_are_skipped_and_weighted_ones_are_errors():
    class WithNorm(Net):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(6)
            self.act = nn.ReLU()

    model = ComponentModel(WithNorm(), [ModuleSpec(pattern="layers.0.*", C=2)], 2)
    assert model.module_names == ["layers.0.mlp_in", "layers.0.mlp_out"]
    with pytest.raises(ValueError, match="'norm', a LayerNorm that cannot be decomposed"):
        ComponentModel(WithNorm(), [ModuleSpec(pattern="*", C=2)], 2)
