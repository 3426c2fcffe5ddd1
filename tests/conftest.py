"""Shared fixtures: tiny configs that train in seconds on 2 CPU cores."""

from __future__ import annotations

import pytest
import torch

from spdkit.config import SPDConfig, parse_config


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


@pytest.fixture
def tiny_config() -> SPDConfig:
    return parse_config(tiny_tms_dict())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_tms_run(tmp_path_factory):
    """A finished tiny TMS run directory (200 steps), shared by the clustering and report
    tests; they may add clusters.json and report/ to it."""
    from spdkit.experiment import run_experiment

    out = tmp_path_factory.mktemp("tiny_tms") / "run"
    run_experiment(parse_config(tiny_tms_dict(steps=200)), out, progress=False)
    return out
