"""Validated run configuration (pydantic v2, loaded from YAML): the schema by concern
(`schema.py` and its sections), YAML and `--set` (`io.py`), the old flat layout (`legacy.py`).
"""

from __future__ import annotations

from spdkit.config.base import StrictModel
from spdkit.config.ci import (
    CI_BY_KIND,
    CI_CONFIGS,
    CIFnConfig,
    GlobalMLPCIConfig,
    GlobalTransformerCIConfig,
    MLPCIConfig,
    VectorMLPCIConfig,
)
from spdkit.config.io import (
    BUNDLED_CONFIG_PACKAGE,
    bundled_config_names,
    dump_config,
    format_validation_error,
    load_config,
    parse_config,
    parse_override_value,
)
from spdkit.config.objective import (
    APDConfig,
    ImportanceConfig,
    LossConfig,
    PAnnealConfig,
    PGDConfig,
    SubsetRoutingConfig,
)
from spdkit.config.schema import SPDConfig
from spdkit.config.sections import (
    ComponentsConfig,
    EngineConfig,
    EvalConfig,
    IdentitySpec,
    ModuleSpec,
)
from spdkit.config.targets import (
    TARGET_BY_KIND,
    TARGET_CONFIGS,
    CorpusConfig,
    HFTargetConfig,
    InductionTargetConfig,
    PlantedLMTargetConfig,
    PythonTargetConfig,
    ResidMLPTargetConfig,
    TargetConfig,
    TinyLMTargetConfig,
    TMSTargetConfig,
)
from spdkit.config.training import (
    FaithfulnessWarmupConfig,
    GradClipConfig,
    OptimizerConfig,
    TrainingConfig,
)
from spdkit.errors import ConfigError

__all__ = [
    "APDConfig",
    "BUNDLED_CONFIG_PACKAGE",
    "CI_BY_KIND",
    "CI_CONFIGS",
    "CIFnConfig",
    "ComponentsConfig",
    "ConfigError",
    "CorpusConfig",
    "EngineConfig",
    "EvalConfig",
    "FaithfulnessWarmupConfig",
    "GlobalMLPCIConfig",
    "GlobalTransformerCIConfig",
    "GradClipConfig",
    "HFTargetConfig",
    "IdentitySpec",
    "ImportanceConfig",
    "InductionTargetConfig",
    "LossConfig",
    "MLPCIConfig",
    "ModuleSpec",
    "OptimizerConfig",
    "PAnnealConfig",
    "PGDConfig",
    "PlantedLMTargetConfig",
    "PythonTargetConfig",
    "ResidMLPTargetConfig",
    "SPDConfig",
    "StrictModel",
    "SubsetRoutingConfig",
    "TARGET_BY_KIND",
    "TARGET_CONFIGS",
    "TargetConfig",
    "TinyLMTargetConfig",
    "TMSTargetConfig",
    "TrainingConfig",
    "VectorMLPCIConfig",
    "bundled_config_names",
    "dump_config",
    "format_validation_error",
    "load_config",
    "parse_config",
    "parse_override_value",
]
