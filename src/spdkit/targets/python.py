"""Targets given as Python factories (`target.kind: python`): any nn.Module and data source the
user's own code builds, named as `module.path:function`."""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from spdkit.config import PythonTargetConfig


def resolve(dotted: str) -> Any:
    """The object `module.path:attr` names; a clear ValueError if it cannot be imported."""
    module_name, _, attr = dotted.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import {module_name!r} (from {dotted!r}): {err}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{dotted!r}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{dotted!r} is not callable")
    return obj


def build_python(config: PythonTargetConfig) -> nn.Module:
    model = resolve(config.factory)(**config.factory_kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{config.factory} returned a {type(model).__name__}, not an nn.Module")
    return model.eval()


def train_python(
    config: PythonTargetConfig, seed: int, device: str, progress: bool = False
) -> tuple[nn.Module, dict]:
    """Nothing to train: the factory returns the model as it is."""
    return build_python(config).to(device), {"factory": config.factory}


def python_data(config: PythonTargetConfig) -> Any:
    data = resolve(config.data_factory)()
    if not callable(getattr(data, "sample", None)):
        raise ValueError(
            f"{config.data_factory} returned a {type(data).__name__} without "
            "sample(batch_size, generator)"
        )
    return data
