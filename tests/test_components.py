"""Component kinds: nn.Linear, nn.Embedding (row lookup of V), HF-style Conv1D (transposed
weight); sequence inputs with CI and masks per position."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spdkit.config import parse_config
from spdkit.engine.random_stream import MaskStream
from spdkit.method.components import (
    Conv1DComponents,
    EmbeddingComponents,
    LinearComponents,
    is_decomposable,
    make_components,
)
from spdkit.method.model import ComponentModel
from spdkit.training.trainer import spd_losses
from tests.helpers import exact_components


class Conv1D(nn.Module):
    """The layout of transformers.pytorch_utils.Conv1D: weight [nx, nf], y = x W + b."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 11, d: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.c_fc = Conv1D(8, d)
        self.proj = nn.Linear(8, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.proj(torch.relu(self.c_fc(h)))
        return self.head(h)


def test_each_module_kind_gets_its_components_class():
    assert isinstance(make_components(nn.Linear(3, 4), 2), LinearComponents)
    assert isinstance(make_components(nn.Embedding(10, 4), 2), EmbeddingComponents)
    assert isinstance(make_components(Conv1D(4, 3), 2), Conv1DComponents)
    assert not is_decomposable(nn.ReLU())
    with pytest.raises(ValueError, match="cannot decompose a ReLU .*Linear, Embedding"):
        make_components(nn.ReLU(), 2)
    with pytest.raises(ValueError, match="max_norm"):
        make_components(nn.Embedding(10, 4, max_norm=1.0), 2)


@pytest.mark.parametrize(
    ("module", "x"),
    [
        (nn.Linear(5, 4), torch.randn(3, 7, 5)),
        (nn.Embedding(9, 4), torch.randint(0, 9, (3, 7))),
        (Conv1D(4, 5), torch.randn(3, 7, 5)),
    ],
)
def test_components_equal_to_the_weight_reproduce_the_module(module, x):
    comps = make_components(module, C=6)
    W = comps.target_weight(module)  # [d_out, d_in]
    assert W.shape == (comps.d_out, comps.d_in) == comps.weight().shape
    with torch.no_grad():
        Uf, S, Vh = torch.linalg.svd(W, full_matrices=False)
        comps.U.zero_()
        comps.V.zero_()
        comps.U[:, : S.numel()] = Uf * S
        comps.V[: S.numel()] = Vh
    torch.testing.assert_close(comps.weight(), W.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(comps(x, torch.ones(6)), module(x), rtol=1e-5, atol=1e-5)


def test_embedding_inner_is_a_row_lookup():
    comps = make_components(nn.Embedding(9, 4), C=5)
    ids = torch.tensor([[0, 3, 8]])
    one_hot = torch.nn.functional.one_hot(ids, 9).float()
    torch.testing.assert_close(comps.inner(ids), one_hot @ comps.V.T)
    with pytest.raises(ValueError, match="token ids"):
        comps.inner(one_hot)


def test_sequence_model_masks_and_ci_are_per_position():
    lm = TinyLM()
    patterns = [{"pattern": p, "C": 6} for p in ("embed", "c_fc", "proj")]
    config = parse_config(
        {
            "modules": patterns,
            "importance_minimality_coeff": 1e-3,
            "pnorm": 2,
            "output_loss": "kl",
            "steps": 1,
            "batch_size": 4,
            "optimizer": {"lr": 1e-3},
        }
    )
    model = ComponentModel(lm, config.modules, ci_hidden_dim=4)
    exact_components(model)
    ids = torch.randint(0, 11, (4, 7))
    ones = {n: torch.ones(4, 7, 6) for n in model.module_names}
    torch.testing.assert_close(model(ids, ones), model.target(ids), rtol=1e-4, atol=1e-4)
    terms, ci, _ = spd_losses(model, ids, config, MaskStream(0))
    assert {n: tuple(g.shape) for n, g in ci.items()} == {n: (4, 7, 6) for n in ci}
    assert all(torch.isfinite(v) for v in terms.values())
    assert terms["faithfulness"] < 1e-10  # exact components
    assert model.components("embed").V.grad.shape == (6, 11)  # spd_losses ran the backward


def test_target_projection_scales_each_term_by_its_overlap_with_w():
    """init_from_target: unit u_c, v_c, and U_c V_cᵀ = ⟨u_c v_cᵀ, W⟩_F u_c v_cᵀ, checked
    term by term against the Frobenius product written out."""
    torch.manual_seed(0)
    layer = nn.Linear(7, 5)
    comps = make_components(layer, 6)
    W = comps.target_weight(layer)
    with torch.no_grad():
        comps.init_from_target(W)
    v = comps.V.detach()
    assert torch.allclose(v.norm(dim=1), torch.ones(6))
    for c in range(6):
        u = comps.U[:, c].detach()
        unit = u / u.norm()
        overlap = (torch.outer(unit, v[c]) * W).sum()
        assert torch.allclose(torch.outer(u, v[c]), overlap * torch.outer(unit, v[c]), atol=1e-6)
