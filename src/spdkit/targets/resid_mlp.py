"""Residual MLP toy targets (paper: compressed computation; cross-layer distributed representations).

    r⁰ = W_E x                               W_E [n_features, d_resid] fixed, unit-norm rows
    rˡ = rˡ⁻¹ + W_outˡ ReLU(W_inˡ rˡ⁻¹)      `layers.{l}.mlp_in` [d_mlp, d_resid], `mlp_out` [d_resid, d_mlp]
    ŷ  = W_U r^L,  W_U = W_Eᵀ

trained on y_i = x_i + ReLU(x_i) with x sparse (each feature active with probability p, value
U[-1, 1]). The residual stream carries the x_i term; the MLPs must compute more ReLUs than they
have neurons, which they do in superposition.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spdkit.config import ResidMLPTargetConfig
from spdkit.targets.data import (
    SparseFeatureData,
    sample_sparse_features,
    seeded_build,
    training_steps,
)

log = logging.getLogger(__name__)


class ResidBlock(nn.Module):
    def __init__(self, d_resid: int, d_mlp: int) -> None:
        super().__init__()
        self.mlp_in = nn.Linear(d_resid, d_mlp, bias=False)
        self.mlp_out = nn.Linear(d_mlp, d_resid, bias=False)

    def forward(self, resid: Tensor) -> Tensor:
        return resid + self.mlp_out(F.relu(self.mlp_in(resid)))


class SparseEmbedding(nn.Module):
    """r⁰ = x W_E. A module of its own (holding nothing: W_E stays the target's buffer) so that
    an SPD step's masked passes replay its output from the step's record instead of redoing
    the product (`spdkit.engine.record`)."""

    def forward(self, x: Tensor, W_E: Tensor) -> Tensor:
        """The inputs are ~1% non-zero, so a sparse product does a fraction of the work of the
        dense one (same sums: only the zero terms are skipped)."""
        if x.dim() == 2 and x.device.type == "cpu" and not (x.requires_grad or W_E.requires_grad):
            return torch.sparse.mm(x.to_sparse(), W_E)
        return x @ W_E


class ResidMLP(nn.Module):
    def __init__(self, n_features: int, d_resid: int, n_layers: int, d_mlp: int) -> None:
        super().__init__()
        # a buffer, so it is saved with the target and never trained or decomposed
        self.register_buffer("W_E", torch.empty(n_features, d_resid))
        self.embedding = SparseEmbedding()
        self.layers = nn.ModuleList(ResidBlock(d_resid, d_mlp) for _ in range(n_layers))
        nn.init.normal_(self.W_E)
        self.W_E /= self.W_E.norm(dim=1, keepdim=True)

    def embed(self, x: Tensor) -> Tensor:
        """x @ W_E [batch, d_resid]."""
        return self.embedding(x, self.W_E)

    def forward(self, x: Tensor) -> Tensor:
        resid = self.embed(x)  # [batch, d_resid]
        for layer in self.layers:
            resid = layer(resid)
        return resid @ self.W_E.T  # [batch, n_features]


def labels(x: Tensor) -> Tensor:
    """y_i = x_i + ReLU(x_i)."""
    return x + F.relu(x)


def data_source(config: ResidMLPTargetConfig) -> SparseFeatureData:
    return SparseFeatureData(config.n_features, config.feature_probability, low=-1.0, high=1.0)


def build_resid_mlp(config: ResidMLPTargetConfig) -> ResidMLP:
    return ResidMLP(config.n_features, config.d_resid, config.n_layers, config.d_mlp)


def cosine_lr(step: int, steps: int, max_lr: float) -> float:
    """lr(t) = max_lr · (1 + cos(π t / T)) / 2: the paper's target schedule, max_lr at t = 0
    and 0 at t = T."""
    return 0.5 * max_lr * (1 + math.cos(math.pi * step / steps))


@torch.no_grad()
def evaluate_loss(
    model: ResidMLP, config: ResidMLPTargetConfig, seed: int, n: int = 20_000
) -> dict[str, float]:
    """MSE of the target, and of two baselines: the MLPs switched off (identity only) and the
    best the residual stream alone could do. The gap shows how much the MLPs compute."""
    device = model.W_E.device
    gen = torch.Generator(device=device).manual_seed(seed + 1000)
    x = sample_sparse_features(n, config.n_features, config.feature_probability, gen, -1.0, 1.0)
    y = labels(x)
    no_mlp = (x @ model.W_E) @ model.W_E.T
    return {
        "mse": F.mse_loss(model(x), y).item(),
        "mse_without_mlps": F.mse_loss(no_mlp, y).item(),
    }


def train_resid_mlp(
    config: ResidMLPTargetConfig, seed: int, device: str = "cpu", progress: bool = False
) -> tuple[ResidMLP, dict]:
    """Paper appendix: AdamW (wd 0.01), lr 3e-3 with cosine decay, batch 2048, MSE on y."""
    model = seeded_build(lambda: build_resid_mlp(config), seed).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.train_lr, weight_decay=config.train_weight_decay)
    for step in training_steps(config.train_steps, progress, "resid_mlp"):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, config.train_steps, config.train_lr)
        x = sample_sparse_features(
            config.train_batch_size,
            config.n_features,
            config.feature_probability,
            gen,
            -1.0,
            1.0,
        )
        loss = F.mse_loss(model(x), labels(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    info = {"trained_seed": seed, **evaluate_loss(model, config, seed)}
    log.info("resid_mlp target: %s", info)
    return model, info
