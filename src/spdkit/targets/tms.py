"""Toy Model of Superposition, x̂ = ReLU(Wᵀ [I] W x + b), its data and its training.

W [n_hidden, n_features] is `linear1.weight`; `linear2.weight` holds Wᵀ (tied while training,
then two separate frozen matrices, each decomposed on its own as in the paper); `hidden_layers`
are fixed identity matrices for the TMS+ID variants.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spdkit.config import TMSTargetConfig
from spdkit.targets.data import (
    SparseFeatureData,
    sample_sparse_features,
    seeded_build,
    training_steps,
)

__all__ = ["SparseFeatureData", "TMSModel", "sample_sparse_features", "train_tms"]

log = logging.getLogger(__name__)


class TMSModel(nn.Module):
    def __init__(self, n_features: int, n_hidden: int, n_hidden_layers: int = 0) -> None:
        super().__init__()
        self.linear1 = nn.Linear(n_features, n_hidden, bias=False)
        self.hidden_layers = nn.ModuleList(
            nn.Linear(n_hidden, n_hidden, bias=False) for _ in range(n_hidden_layers)
        )
        self.linear2 = nn.Linear(n_hidden, n_features, bias=True)
        nn.init.xavier_normal_(self.linear1.weight)
        nn.init.zeros_(self.linear2.bias)
        for layer in self.hidden_layers:
            nn.init.eye_(layer.weight)
            layer.weight.requires_grad_(False)
        self.tie_weights()

    @torch.no_grad()
    def tie_weights(self) -> None:
        """Copy Wᵀ into linear2 (training updates only linear1.weight)."""
        self.linear2.weight.copy_(self.linear1.weight.T)

    def forward(self, x: Tensor) -> Tensor:
        h = self.linear1(x)
        for layer in self.hidden_layers:
            h = layer(h)
        return F.relu(self.linear2(h))

    def tied_forward(self, x: Tensor) -> Tensor:
        """The training forward: linear2 uses linear1.weight.T so W gets both gradients."""
        h = F.linear(x, self.linear1.weight)
        for layer in self.hidden_layers:
            h = layer(h)
        return F.relu(F.linear(h, self.linear1.weight.T, self.linear2.bias))


def build_tms(config: TMSTargetConfig) -> TMSModel:
    return TMSModel(config.n_features, config.n_hidden, config.n_hidden_layers)


@dataclass(frozen=True)
class FeatureCheck:
    ok: bool
    column_norms: list[float]
    message: str


def check_features(model: TMSModel, min_ratio: float = 0.5) -> FeatureCheck:
    """Is every feature represented? Each column of W must have a norm ≥ min_ratio × the median.

    SPD can only recover what the target computes; an unlearned feature (a near-zero column)
    would make Table 1's per-feature metrics meaningless.
    """
    norms = model.linear1.weight.detach().norm(dim=0).cpu()
    median = norms.median().item()
    weak = [i for i, n in enumerate(norms.tolist()) if n < min_ratio * median]
    msg = (
        "all features represented"
        if not weak
        else f"features {weak} unlearned (column norms {[round(norms[i].item(), 4) for i in weak]}"
        f" vs median {median:.3f})"
    )
    return FeatureCheck(not weak, [round(n, 4) for n in norms.tolist()], msg)


def train_tms_once(
    config: TMSTargetConfig, seed: int, device: str = "cpu", progress: bool = False
) -> TMSModel:
    """Paper appendix: AdamW (wd 0.01), constant lr 5e-3, 10k steps, MSE on the input."""
    model = seeded_build(lambda: build_tms(config), seed).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    opt = torch.optim.AdamW(
        [model.linear1.weight, model.linear2.bias],
        lr=config.train_lr,
        weight_decay=config.train_weight_decay,
    )
    for _ in training_steps(config.train_steps, progress, "tms"):
        x = sample_sparse_features(
            config.train_batch_size, config.n_features, config.feature_probability, gen
        )
        loss = F.mse_loss(model.tied_forward(x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.tie_weights()
    return model.eval()


def train_tms(
    config: TMSTargetConfig, seed: int, device: str = "cpu", progress: bool = False
) -> tuple[TMSModel, dict]:
    """Train, and retry with the next seed (saying so) while some feature is unlearned."""
    attempts = []
    for attempt in range(config.max_train_attempts):
        s = seed + attempt
        model = train_tms_once(config, s, device, progress)
        check = check_features(model)
        attempts.append({"seed": s, "ok": check.ok, "column_norms": check.column_norms})
        if check.ok:
            break
        log.warning("TMS target seed %d: %s; retrying with seed %d", s, check.message, s + 1)
    else:
        raise RuntimeError(
            f"TMS target: no seed in {seed}..{seed + config.max_train_attempts - 1} represents "
            f"every feature ({check.message})"
        )
    info = {"trained_seed": s, "attempts": attempts, "pairwise_angles_deg": _angles(model)}
    return model, info


def _angles(model: TMSModel) -> list[float] | None:
    """Angles between the 2-D feature directions, sorted (a pentagon gives five 72° gaps)."""
    W = model.linear1.weight.detach().cpu()
    if W.shape[0] != 2:
        return None
    theta = sorted(math.degrees(math.atan2(y, x)) % 360 for x, y in W.T.tolist())
    gaps = [(theta[(i + 1) % len(theta)] - theta[i]) % 360 for i in range(len(theta))]
    return [round(g, 2) for g in gaps]
