"""Builders the tests share: tiny configs, a small net, exact components, a tiny trainer."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from torch import nn

from spdkit.config import SPDConfig, parse_config
from spdkit.method.model import ComponentModel
from spdkit.targets import data_source, target_kind
from spdkit.training.loop import build_trainer
from spdkit.training.trainer import Trainer


def tiny_tms_dict(**overrides) -> dict:
    """A TMS 5-2 config small enough to train (target and SPD) in a few seconds."""
    data = {
        "seed": 0,
        "target": {
            "kind": "tms",
            "n_features": 5,
            "n_hidden": 2,
            "train_steps": 2000,
            "train_batch_size": 1024,
        },
        "modules": [{"pattern": "linear1", "C": 8}, {"pattern": "linear2", "C": 8}],
        "ci_hidden_dim": 8,
        "importance_minimality_coeff": 3e-3,
        "pnorm": 1.0,
        "steps": 60,
        "batch_size": 256,
        "optimizer": {"lr": 1e-3, "lr_schedule": "cosine"},
        "log_every": 10,
        "checkpoint_every": 20,
        "eval": {"n_eval_samples": 512},
    }
    for key, value in overrides.items():
        data[key] = value
    return data


def tiny_resid_dict(**overrides) -> dict:
    """A 2-layer residual MLP config (12 features) that trains in seconds."""
    data = {
        "seed": 0,
        "target": {
            "kind": "resid_mlp",
            "n_features": 12,
            "d_resid": 64,
            "n_layers": 2,
            "d_mlp": 4,
            "feature_probability": 0.05,
            "train_steps": 200,
            "train_batch_size": 256,
        },
        "modules": [
            {"pattern": "layers.*.mlp_in", "C": 16},
            {"pattern": "layers.*.mlp_out", "C": 16},
        ],
        "importance_minimality_coeff": 1e-4,
        "pnorm": 2,
        "steps": 40,
        "batch_size": 128,
        "optimizer": {"lr": 2e-3},
        "log_every": 10,
        "eval": {"one_hot_value": 0.75, "n_eval_samples": 256},
    }
    data.update(overrides)
    return data


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


def trainer_for(config: SPDConfig | dict, device: str = "cpu") -> Trainer:
    """A trainer of the config (or config dict) on its untrained target, built from the
    current torch seed."""
    config = config if isinstance(config, SPDConfig) else parse_config(config)
    target = target_kind(config.target).build(config.target)
    return build_trainer(target, data_source(config), config, device)


def tiny_trainer(**overrides) -> Trainer:
    """A trainer of the tiny TMS config (10 steps) on its untrained target."""
    return trainer_for(tiny_tms_dict(**{"steps": 10, **overrides}))


def tiny_config_file(path: Path, target_train_steps: int, **overrides) -> Path:
    """The tiny TMS config with `overrides`, its target trained for `target_train_steps`,
    written as YAML to `path` (for the command line)."""
    data = tiny_tms_dict(**overrides)
    data["target"]["train_steps"] = target_train_steps
    path.write_text(yaml.safe_dump(data))
    return path
