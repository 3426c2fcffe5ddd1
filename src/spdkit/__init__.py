"""spdkit: Stochastic Parameter Decomposition (Bushnaq, Braun, Sharkey et al. 2025) for PyTorch.

import spdkit
config = spdkit.load_config("tms_5-2")
decomp = spdkit.decompose(model, data, config, run_dir="runs/mine")
decomp.causal_importance(x)      # {module: [..., C]}
U, V = decomp.subcomponents("linear1")
decomp = spdkit.load("runs/mine")

Importing spdkit changes nothing outside it (no environment variable, no matplotlib backend,
no allocator setting); the names below load their modules on first use, so `import
spdkit.cli` can still set OpenMP's spin count before torch loads (`spdkit.engine.threads`).
The layers are described in docs/architecture.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spdkit.api import Decomposition, decompose, load
    from spdkit.config import ModuleSpec, SPDConfig, load_config
    from spdkit.errors import ConfigError
    from spdkit.method.model import ComponentModel

_HOME = {
    "ComponentModel": "spdkit.method.model",
    "ConfigError": "spdkit.errors",
    "Decomposition": "spdkit.api",
    "ModuleSpec": "spdkit.config",
    "SPDConfig": "spdkit.config",
    "decompose": "spdkit.api",
    "load": "spdkit.api",
    "load_config": "spdkit.config",
}
__all__ = [
    "ComponentModel",
    "ConfigError",
    "Decomposition",
    "ModuleSpec",
    "SPDConfig",
    "decompose",
    "load",
    "load_config",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'spdkit' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
