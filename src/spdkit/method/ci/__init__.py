"""Causal-importance functions, one module per kind, behind one interface (`CIFunction`):

mlp                 the paper's scalar MLP per subcomponent (fused CPU kernel)
vector_mlp          per module, an MLP from its input vector to its C CIs
global_mlp          one MLP from every module's input to every module's CIs
global_transformer  a transformer over positions reading every module's input (VPD)
"""

from __future__ import annotations

from spdkit.config import CIFnConfig
from spdkit.method.ci.base import CIFunction, ModuleSlot
from spdkit.method.ci.global_mlp import GlobalMLPCI
from spdkit.method.ci.global_transformer import GlobalTransformerCI
from spdkit.method.ci.mlp import MLPCI
from spdkit.method.ci.vector_mlp import VectorMLPCI


def build_ci_function(config: CIFnConfig, slots: list[ModuleSlot]) -> CIFunction:
    """The CI function of `config.kind` over the decomposed modules, with the lower sigmoid
    its masks' g go through (`config.lower_sigmoid`). The global kinds take the modules sorted
    by name, so their input and output layout does not depend on the patterns' order; `mlp`
    keeps `module_names` order (as it always has: the run directory names its tensors)."""
    ordered = sorted(slots, key=lambda s: s.name)
    lower = config.lower_sigmoid
    if config.kind == "mlp":
        return MLPCI(slots, config.hidden_dim, lower, config.backend)
    if config.kind == "vector_mlp":
        return VectorMLPCI(slots, config.hidden_dims, config.input_norm, lower)
    if config.kind == "global_mlp":
        return GlobalMLPCI(ordered, config.hidden_dims, config.input_norm, lower)
    return GlobalTransformerCI(
        ordered,
        config.d_model,
        config.n_layers,
        config.n_heads,
        config.d_ff,
        config.causal,
        config.input_norm,
        lower,
    )


__all__ = ["CIFunction", "ModuleSlot", "build_ci_function"]
