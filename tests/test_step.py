"""The step's new parts by hand: subset routing draws, a routed pass, and per-pass backward
(same gradients as one graph, and the graph memory does not grow with the passes)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spdkit.config import ImportanceConfig, LossConfig, ModuleSpec, parse_config
from spdkit.engine.random_stream import MaskStream
from spdkit.method.model import ComponentModel
from spdkit.method.routing import bernoulli_subsets, draw_routes, uniform_k_subsets
from spdkit.method.step import loss_coefficients, minimality_warmup, spd_losses
from tests.helpers import tiny_tms_dict


def test_uniform_k_subsets_by_hand():
    # L = 3. Position 0: u_k = 0.1 → k = 1; the lowest u_rank is module 2.
    # Position 1: u_k = 0.5 → k = 2; ranks of (0.9, 0.1, 0.5) are (2, 0, 1) → modules 1, 2.
    # Position 2: u_k = 0.99 → k = 3: all modules.
    u_k = torch.tensor([0.1, 0.5, 0.99])
    u_rank = torch.tensor([[0.7, 0.4, 0.2], [0.9, 0.1, 0.5], [0.3, 0.2, 0.1]])
    expected = torch.tensor([[False, False, True], [False, True, True], [True, True, True]])
    assert torch.equal(uniform_k_subsets(u_k, u_rank), expected)


def test_bernoulli_subsets_by_hand():
    u = torch.tensor([[0.1, 0.6], [0.39, 0.41]])
    assert torch.equal(bernoulli_subsets(u, 0.4), torch.tensor([[True, False], [True, False]]))


def test_uniform_k_draws_have_the_vpd_distribution():
    """k uniform on 1..L and then a uniform k-subset: each module is routed with probability
    Σ_k (1/L)(k/L) = (L + 1) / (2L), and the subset size is uniform."""
    stream, L, P = MaskStream(0), 4, 40_000
    routes = draw_routes("uniform_k", 0.5, (P,), L, lambda n: stream.uniforms(n, "cpu"))
    assert routes.shape == (P, L)
    freq = routes.float().mean(0)
    assert torch.allclose(freq, torch.full((L,), (L + 1) / (2 * L)), atol=0.01)
    sizes = torch.bincount(routes.sum(-1), minlength=L + 1).float() / P
    assert sizes[0] == 0
    assert torch.allclose(sizes[1:], torch.full((L,), 1 / L), atol=0.01)


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2, bias=False)
        self.b = nn.Linear(2, 2, bias=False)

    def forward(self, x):
        return self.b(self.a(x))


def test_a_routed_pass_by_hand():
    """Module a ablated (mask 0), b kept (mask 1), components exact (U V = W). Position 0
    routes {a}: b(0) = 0. Position 1 routes nothing: the target's output. Position 2 routes
    {a, b}: 0. So the output is [0, W_b W_a x_1, 0]."""
    net = Chain()
    model = ComponentModel(net, [ModuleSpec(pattern="*", C=2)], ci_hidden_dim=2)
    with torch.no_grad():
        for name in ("a", "b"):
            W = model.target_weight(name)
            model.components(name).U.copy_(W)
            model.components(name).V.copy_(torch.eye(2))
    x = torch.randn(3, 2)
    masks = {"a": torch.zeros(3, 2), "b": torch.ones(3, 2)}
    routes = {"a": torch.tensor([True, False, True]), "b": torch.tensor([False, False, True])}
    record = model.record(x)
    y = model.masked_forward(x, masks, record, routes=routes)
    expected = torch.stack([torch.zeros(2), net(x)[1], torch.zeros(2)])
    torch.testing.assert_close(y, expected)


class Deep(nn.Module):
    """L wide layers: the masked passes' activations dominate a step's graph memory."""

    def __init__(self, n_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(n_layers))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def _step(per_pass: bool, n_modules: int, peak: list[int], layerwise: float = 1.0):
    """One step (1 + L passes) with every layer of Deep(L) decomposed; returns the gradients
    and records the peak bytes held by autograd graphs (saved tensors alive at once)."""
    config = parse_config(
        tiny_tms_dict(
            target=None,
            modules=[{"pattern": "layers.*", "C": 2}],
            ci_hidden_dim=1,
            stochastic_recon_layerwise_coeff=layerwise,
        )
    )
    config = config.model_copy(
        update={"engine": config.engine.model_copy(update={"per_pass_backward": per_pass})}
    )
    torch.manual_seed(0)
    model = ComponentModel(Deep(n_modules), config.modules, config.ci_fn.hidden_dim)
    x = torch.randn(256, 64)
    live = [0]

    class Saved:
        def __init__(self, t: torch.Tensor) -> None:
            self.t = t
            self.nbytes = t.numel() * t.element_size()
            live[0] += self.nbytes
            peak[0] = max(peak[0], live[0])

        def __del__(self) -> None:
            live[0] -= self.nbytes

    with torch.autograd.graph.saved_tensors_hooks(Saved, lambda s: s.t):
        spd_losses(model, x, config, MaskStream(0))
    return [p.grad.clone() for p in model.trainable_parameters()]


def test_per_pass_backward_gives_the_one_graph_gradients():
    one = _step(per_pass=False, n_modules=3, peak=[0])
    per_pass = _step(per_pass=True, n_modules=3, peak=[0])
    for a, b in zip(per_pass, one, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_per_pass_backward_peak_is_one_pass_plus_the_ci_graph():
    """A step has 1 + L passes. Per pass, the graph memory peaks at what the single
    all-modules pass plus the CI graph hold (measured as a step without layerwise passes),
    whatever L; with one graph it is several times that."""
    for L in (2, 8):
        one_pass = [0]
        _step(per_pass=False, n_modules=L, peak=one_pass, layerwise=0.0)
        per_pass, one_graph = [0], [0]
        _step(per_pass=True, n_modules=L, peak=per_pass)
        _step(per_pass=False, n_modules=L, peak=one_graph)
        assert per_pass[0] <= 1.05 * one_pass[0], (L, per_pass, one_pass)
        assert one_graph[0] > 1.5 * one_pass[0], (L, one_graph, one_pass)


@pytest.mark.parametrize("scope", ["position", "batch"])
def test_subset_term_is_logged_and_draws_from_the_stream(scope):
    config = parse_config(
        tiny_tms_dict(
            stochastic_recon_coeff=0.0,
            stochastic_recon_layerwise_coeff=0.0,
            stochastic_recon_subset_coeff=1.0,
            subset_routing={"scope": scope},
        )
    )
    from spdkit.targets import target_kind

    target = target_kind(config.target).build(config.target)
    model = ComponentModel(target, config.modules, config.ci_fn.hidden_dim)
    stream = MaskStream(0)
    terms = spd_losses(model, torch.rand(16, 5), config, stream).terms
    assert set(terms) == {
        "faithfulness",
        "importance_minimality",
        "stochastic_recon_subset",
        "total",
    }
    assert terms["stochastic_recon_subset"] > 0
    masks_only = 16 * 8 * 2  # two modules' [16, 8] masks
    routing = 16 * (1 + 2) if scope == "position" else 1 + 2
    assert stream.offset == masks_only + routing


def test_minimality_warmup_ramps_both_minimality_coefficients():
    imp = ImportanceConfig(pnorm=1.0, warmup_frac=0.25)
    assert [minimality_warmup(imp, s, 100) for s in (0, 5, 25, 90)] == [0.0, 0.2, 1.0, 1.0]
    assert minimality_warmup(ImportanceConfig(pnorm=1.0), 0, 100) == 1.0  # the paper's: none
    loss = LossConfig(importance_minimality_coeff=3e-3, frequency_minimality_coeff=1e-3)
    coeffs = loss_coefficients(loss, 0.5)
    assert coeffs["importance_minimality"] == 1.5e-3 and coeffs["frequency_minimality"] == 5e-4
    assert coeffs["stochastic_recon"] == loss.stochastic_recon_coeff
