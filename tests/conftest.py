"""Shared fixtures: tiny configs that train in seconds on 2 CPU cores."""

from __future__ import annotations

import pytest
import torch

from spdkit.config import SPDConfig, parse_config
from tests.helpers import tiny_tms_dict


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
    from spdkit.pipeline.run import run_experiment

    out = tmp_path_factory.mktemp("tiny_tms") / "run"
    run_experiment(parse_config(tiny_tms_dict(steps=200)), out, progress=False)
    return out
