"""spdkit: Stochastic Parameter Decomposition (Bushnaq, Braun, Sharkey et al. 2025) for PyTorch.

import spdkit
config = spdkit.load_config("tms_5-2")
decomp = spdkit.decompose(model, data, config, run_dir="runs/mine")
decomp.causal_importance(x)      # {module: [..., C]}
U, V = decomp.subcomponents("linear1")
decomp = spdkit.load("runs/mine")
"""

from spdkit.config import ConfigError, ModuleSpec, SPDConfig, load_config
from spdkit.decomposition import Decomposition, decompose, load
from spdkit.model import ComponentModel

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
