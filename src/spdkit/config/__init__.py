"""Validated run configuration (pydantic v2, loaded from YAML).

Every model forbids unknown keys, so a misspelt field is an error that names it instead of a
setting silently dropped. Field names follow the paper's words; the paper's symbol is in each
field's description.
"""

from __future__ import annotations

import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

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
from spdkit.config.objective import (
    FaithfulnessWarmupConfig,
    GradClipConfig,
    PAnnealConfig,
    PGDConfig,
)
from spdkit.config.sections import (
    EvalConfig,
    IdentitySpec,
    ModuleSpec,
    OptimizerConfig,
    SubsetRoutingConfig,
)
from spdkit.config.targets import (
    TARGET_BY_KIND,
    TARGET_CONFIGS,
    CorpusConfig,
    HFTargetConfig,
    InductionTargetConfig,
    PythonTargetConfig,
    ResidMLPTargetConfig,
    TargetConfig,
    TinyLMTargetConfig,
    TMSTargetConfig,
)
from spdkit.errors import ConfigError

__all__ = [
    "CIFnConfig",
    "ConfigError",
    "GlobalMLPCIConfig",
    "GlobalTransformerCIConfig",
    "MLPCIConfig",
    "VectorMLPCIConfig",
    "EvalConfig",
    "FaithfulnessWarmupConfig",
    "GradClipConfig",
    "PAnnealConfig",
    "PGDConfig",
    "CorpusConfig",
    "HFTargetConfig",
    "IdentitySpec",
    "InductionTargetConfig",
    "ModuleSpec",
    "OptimizerConfig",
    "PythonTargetConfig",
    "ResidMLPTargetConfig",
    "SPDConfig",
    "StrictModel",
    "SubsetRoutingConfig",
    "TargetConfig",
    "TinyLMTargetConfig",
    "TMSTargetConfig",
    "bundled_config_names",
    "dump_config",
    "load_config",
    "parse_config",
]

BUNDLED_CONFIG_PACKAGE = "spdkit.configs"


class SPDConfig(StrictModel):
    """One decomposition run: target, what to decompose, the SPD losses, optimisation."""

    seed: int = Field(default=0, ge=0, description="fixes target training, init, data and masks")
    target: TargetConfig | None = Field(
        default=None, description="bundled toy target to train or load (None for your own model)"
    )
    modules: list[ModuleSpec] = Field(min_length=1, description="modules to decompose")
    insert_identity: list[IdentitySpec] = Field(
        default_factory=list,
        description="identities inserted before matched modules and decomposed too (a check)",
    )
    ci_hidden_dim: int = Field(
        default=16,
        ge=1,
        description="ci_fn kind mlp: hidden GELU width of each subcomponent's MLP (d_gate)",
    )
    ci_fn: CIFnConfig = Field(
        default_factory=lambda: MLPCIConfig(),
        description="the causal-importance function: mlp (the paper's), vector_mlp, "
        "global_mlp, global_transformer",
    )
    component_init: Literal["target_projection", "normal"] = Field(
        default="target_projection",
        description="U, V init: random rank-one terms scaled by their overlap with W, or "
        "V ~ N(0, 1/d_in), U ~ N(0, 1/C)",
    )
    faithfulness_coeff: float = Field(default=1.0, ge=0, description="weight of L_faithfulness")
    stochastic_recon_coeff: float = Field(
        default=1.0, ge=0, description="weight of L_stochastic-recon (β1)"
    )
    stochastic_recon_layerwise_coeff: float = Field(
        default=1.0, ge=0, description="weight of L_stochastic-recon-layerwise (β2)"
    )
    importance_minimality_coeff: float = Field(
        ge=0, description="weight of L_importance-minimality (β3)"
    )
    pnorm: float = Field(gt=0, description="p of the importance-minimality loss")
    n_mask_samples: int = Field(default=1, ge=1, description="mask samples per step (S)")
    output_loss: Literal["mse", "kl"] = Field(
        default="mse", description="divergence D between masked and target outputs"
    )
    steps: int = Field(ge=1, description="training steps")
    batch_size: int = Field(ge=1, description="training batch size")
    optimizer: OptimizerConfig
    log_every: int = Field(default=100, ge=1, description="steps between metric records")
    checkpoint_every: int = Field(default=2000, ge=1, description="steps between checkpoints")
    ci_backend: Literal["auto", "eager", "compiled", "fused"] = Field(
        default="auto",
        description="how the CI MLPs run: fused C++ kernel (CPU), torch.compile, or eager; "
        "auto = fused on CPU when it builds, else eager",
    )
    stochastic_recon_subset_coeff: float = Field(
        default=0.0,
        ge=0,
        description="weight of L_stochastic-recon-subset: masks a random subset of modules per "
        "position, the others run their original weights (VPD notes §2.2)",
    )
    subset_routing: SubsetRoutingConfig = Field(
        default_factory=lambda: SubsetRoutingConfig(),
        description="how the subset term picks the masked modules",
    )
    masked_pass_dtype: Literal["float32", "bfloat16"] = Field(
        default="float32",
        description="bfloat16: masked passes under torch.autocast (for GPUs; on CPU it was "
        "measured to move gradients by ~10%); the CI function and losses stay float32",
    )
    prefix_replay: bool = Field(
        default=True,
        description="a masked pass returns the recorded output of every module call before "
        "its first masked module (exact for modules whose only effect is their output); off "
        "for targets whose modules leave state for later ones",
    )
    per_pass_backward: bool = Field(
        default=True,
        description="differentiate each masked pass as soon as its loss is known (memory of one "
        "pass plus the CI graph); false keeps every pass in one graph (same gradients)",
    )
    pnorm_anneal: PAnnealConfig | None = Field(
        default=None, description="anneal p of the importance penalty (None: p fixed)"
    )
    importance_penalty: Literal["lp", "smooth_l0"] = Field(
        default="lp",
        description="per-CI penalty: lp = |g⁺|^p (the paper's); smooth_l0 = 1 − exp(−g⁺/σ), "
        "a saturating L0 stand-in with a finite gradient at 0 (spdkit.method.losses)",
    )
    smooth_l0_scale: float = Field(
        default=0.1, gt=0, description="σ of the smooth_l0 penalty (CI ≫ σ costs about 1)"
    )
    frequency_minimality_coeff: float = Field(
        default=0.0,
        ge=0,
        description="weight of L_frequency: (1/BT) Σ_c s_c log2(1 + s_c), s_c = Σ_bt of the "
        "penalty (VPD notes §2.5)",
    )
    lower_sigmoid: Literal["leaky", "straight_through"] = Field(
        default="leaky",
        description="σ_H,lower for the masks: leaky (the paper's, 0.01·x below 0) or "
        "straight_through (VPD's: clamp, leak only in the backward of negative gradients)",
    )
    adversarial_recon_coeff: float = Field(
        default=0.0,
        ge=0,
        description="weight of L_adversarial: D under masks whose sources were chosen by "
        "gradient ascent to maximise it (VPD notes §2.3; settings in `pgd`)",
    )
    pgd: PGDConfig = Field(default_factory=lambda: PGDConfig())
    delta_component: bool = Field(
        default=False,
        description="Δ = W − U V as one more component per module with its own stochastic "
        "mask (CI ≡ 0), so the masked model is the target at m = 1 (VPD notes §2)",
    )
    grad_clip: GradClipConfig = Field(default_factory=lambda: GradClipConfig())
    faithfulness_warmup: FaithfulnessWarmupConfig = Field(
        default_factory=lambda: FaithfulnessWarmupConfig()
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        default="stop",
        description="a NaN/inf loss or gradient: stop (keeping the last checkpoint) or skip the step",
    )
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="before")
    @classmethod
    def _removed_fields(cls, data: Any) -> Any:
        """`batch_layerwise_passes` (spdkit ≤ 0.1): layerwise passes now run one at a time
        with prefix replay and per-pass backward; old run directories still load."""
        if isinstance(data, dict) and "batch_layerwise_passes" in data:
            data = dict(data)
            if data.pop("batch_layerwise_passes"):
                warnings.warn(
                    "batch_layerwise_passes was removed: layerwise passes run one at a time "
                    "with prefix replay (same losses); the setting is ignored",
                    stacklevel=2,
                )
        return data

    @model_validator(mode="after")
    def _output_loss_fits_output(self) -> SPDConfig:
        output = getattr(self.target, "output", None)
        if output not in (None, "logits") and self.output_loss == "kl":
            raise ValueError(
                f"output_loss kl compares logits, but target.output is {output!r}: "
                "use output_loss: mse"
            )
        return self

    @model_validator(mode="after")
    def _unique_patterns(self) -> SPDConfig:
        patterns = [m.pattern for m in self.modules]
        dupes = sorted({p for p in patterns if patterns.count(p) > 1})
        if dupes:
            raise ValueError(f"modules: pattern(s) listed twice: {dupes}")
        return self


def format_validation_error(err: ValidationError, model: type[BaseModel] = SPDConfig) -> str:
    """One line per problem, naming the field (dotted path) and what would be valid."""
    lines = []
    for e in err.errors():
        loc = _strip_union_tags(e["loc"])
        where = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_fields(model, e["loc"][:-1])
            hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
            lines.append(f"{where}: unknown field{hint}")
        elif e["type"] == "missing":
            lines.append(f"{where}: required field is missing")
        elif e["type"] == "bool_number":
            lines.append(f"{'.'.join(str(p) for p in (*loc, e['ctx']['field']))}: {e['msg']}")
        elif e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            configs = CI_CONFIGS if loc[:1] == ("ci_fn",) else TARGET_CONFIGS
            kinds = ", ".join(c.model_fields["kind"].default for c in configs)
            got = e.get("input", {}).get("kind") if isinstance(e.get("input"), dict) else None
            what = "missing" if got is None else f"unknown ({got!r})"
            lines.append(f"{where}.kind: {what} (allowed: {kinds})")
        else:
            lines.append(f"{where}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _strip_union_tags(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """`target.tms.n_features` → `target.n_features`: pydantic puts the union tag in the path."""
    if len(loc) > 1 and loc[0] == "target" and loc[1] in TARGET_BY_KIND:
        return (loc[0], *loc[2:])
    if len(loc) > 1 and loc[0] == "ci_fn" and loc[1] in CI_BY_KIND:
        return (loc[0], *loc[2:])
    return loc


def _allowed_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the sub-model at `loc`, to list them next to an unknown key."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if part in TARGET_BY_KIND and current is not model:
            current = TARGET_BY_KIND[part]
            continue
        if part in CI_BY_KIND and current == "ci-union":
            current = CI_BY_KIND[part]
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        args = _flatten_args(annotation)
        current = next((a for a in (annotation, *args) if hasattr(a, "model_fields")), None)
        if current is None and part == "target":
            current = "target-union"  # resolved by the tag that follows
        elif part == "ci_fn":
            current = "ci-union"  # resolved by the tag that follows
        elif current is None:
            return []
    return sorted(getattr(current, "model_fields", {}))


def _flatten_args(annotation: Any) -> tuple[Any, ...]:
    out: list[Any] = []
    for a in getattr(annotation, "__args__", ()):
        out.extend([a, *_flatten_args(a)])
    return tuple(out)


def bundled_config_names() -> list[str]:
    files = resources.files(BUNDLED_CONFIG_PACKAGE).iterdir()
    return sorted(f.name[: -len(".yaml")] for f in files if f.name.endswith(".yaml"))


def parse_config(data: dict[str, Any]) -> SPDConfig:
    """Validate a dict; raise ConfigError with one line per problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping of fields, got {type(data).__name__}")
    try:
        return SPDConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def load_config(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> SPDConfig:
    """Load a bundled config by name (`tms_5-2`) or a YAML file, apply dotted-key overrides."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text()
    else:
        names = bundled_config_names()
        if str(name_or_path) not in names:
            raise ConfigError(
                f"unknown config {str(name_or_path)!r}: not a file and not a bundled config "
                f"(bundled: {', '.join(names)})"
            )
        text = resources.files(BUNDLED_CONFIG_PACKAGE).joinpath(f"{name_or_path}.yaml").read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{name_or_path}: not valid YAML: {err}") from None
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    return parse_config(data)


def parse_override_value(text: str) -> Any:
    """A `--set` value as the user meant it: YAML (`2e-3`, `[1, 2]`, `{kind: mlp}`, `true`),
    but text YAML cannot read (`*.mlp.*` starts a YAML alias) is that text, and a string that
    reads as a number (YAML takes `1e-5`, with no dot, for text) is the number."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """data[a][b]... = value for key "a.b...", where a part that is an integer indexes a list
    (`modules.0.C`) and a string on the path (a named choice such as `data: pydoc`) is
    replaced by a section; a path through another value is a ConfigError naming the key."""
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                where = ".".join(parts[:depth]) or "<root>"
                raise ConfigError(
                    f"--set {key}: {where} is a list of {len(node)}; use an index 0-{len(node) - 1}"
                )
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if isinstance(node.get(part), str):  # a named choice (`data: pydoc`) becomes
                    node[part] = {}  # the section the key sets (`data.path=...`)
                node = node.setdefault(part, {})
        else:
            where = ".".join(parts[:depth])
            raise ConfigError(f"--set {key}: {where} is a value, not a section")


def dump_config(config: SPDConfig) -> str:
    """Fully resolved YAML (defaults included) for the run directory."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
