"""spdkit: Stochastic Parameter Decomposition (Bushnaq, Braun, Sharkey et al. 2025) for PyTorch.

import spdkit
config = spdkit.load_config("tms_5-2")
decomp = spdkit.decompose(model, data, config, run_dir="runs/mine")
decomp.causal_importance(x)      # {module: [..., C]}
U, V = decomp.subcomponents("linear1")
decomp = spdkit.load("runs/mine")
"""

from spdkit.cores import set_short_spin

set_short_spin()  # before torch loads libgomp: OpenMP threads that yield (spdkit/cores.py)

from spdkit.config import ConfigError, ModuleSpec, SPDConfig, load_config  # noqa: E402
from spdkit.decomposition import Decomposition, decompose, load  # noqa: E402
from spdkit.model import ComponentModel  # noqa: E402

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
