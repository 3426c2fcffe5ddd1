"""Identity insertion (paper appendix check): names, exactness, and the report."""

import pytest
import torch

from spdkit.analysis.metrics import identity_check
from spdkit.config import IdentitySpec, ModuleSpec
from spdkit.method.model import ComponentModel
from tests.helpers import Net, exact_components


def test_inserted_identity_is_decomposed_and_changes_nothing_when_exact():
    net = Net()
    x = torch.randn(8, 6)
    y = net(x)
    model = ComponentModel(
        net,
        [ModuleSpec(pattern="layers.*.mlp_in", C=7)],
        ci_hidden_dim=2,
        identity_specs=[IdentitySpec(pattern="layers.1.mlp_in")],
    )
    # the user's names are untouched; the identity is a sibling with its own components
    assert model.module_names == ["layers.0.mlp_in", "layers.1.mlp_in", "layers.1.mlp_in_identity"]
    assert model.identity_modules == {"layers.1.mlp_in_identity": 6}
    assert model.components("layers.1.mlp_in_identity").C == 12  # default 2d
    torch.testing.assert_close(model.target_weight("layers.1.mlp_in_identity"), torch.eye(6))
    torch.testing.assert_close(model.target(x), y)  # identity in front: same function

    exact_components(model)
    y_ones = model(x, model.ones_masks())
    torch.testing.assert_close(y_ones, y, rtol=1e-5, atol=1e-5)
    # masking the identity to zero cuts the input of layers.1.mlp_in: the output changes
    zero_id = {"layers.1.mlp_in_identity": torch.zeros(12)}
    assert not torch.allclose(model(x, zero_id), y)
    # the identity's recorded input is the residual stream entering layer 1
    inputs = model.record(x).inputs
    torch.testing.assert_close(inputs["layers.1.mlp_in_identity"], inputs["layers.1.mlp_in"])
    # the identity went into the component model's copy: the caller's model has no new
    # module and no hook
    assert not hasattr(net.layers[1], "mlp_in_identity")
    assert not net.layers[1].mlp_in._forward_pre_hooks


def test_identity_before_an_undecomposed_module_and_a_given_C():
    net = Net()
    model = ComponentModel(
        net,
        [ModuleSpec(pattern="head", C=3)],
        ci_hidden_dim=2,
        identity_specs=[IdentitySpec(pattern="layers.0.mlp_out", C=9)],
    )
    assert model.identity_modules == {"layers.0.mlp_out_identity": 5}
    assert model.components("layers.0.mlp_out_identity").C == 9


def test_identity_pattern_must_match_a_linear():
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        ComponentModel(
            Net(), [ModuleSpec(pattern="head", C=2)], 2, identity_specs=[IdentitySpec(pattern="x*")]
        )


def test_identity_check_counts():
    d, C = 4, 8
    ci = torch.zeros(100, C)
    ci[:, :d] = 0.9  # d subcomponents always on
    ci[:3, 5] = 0.9  # one rarely on
    norms = torch.tensor([1.0] * d + [0.0] * (C - d))
    report = identity_check(ci, norms, d, ci_threshold=0.1, norm_threshold=0.1)
    assert report == {
        "d": 4,
        "C": 8,
        "n_non_negligible": 4,
        "n_dense": 4,
        "n_ever_active": 5,
        "one_dense_group_of_rank_d": True,
    }
    ci[:, 0] = 0.0  # only d - 1 dense: fails
    assert not identity_check(ci, norms, d, 0.1, 0.1)["one_dense_group_of_rank_d"]
