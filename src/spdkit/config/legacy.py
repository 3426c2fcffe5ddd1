"""The flat config of spdkit ≤ 0.1 (37 top-level fields), read into today's sections.

Every old key is still accepted, in a YAML file, in a run directory's config.yaml, in a dict
given to `parse_config`, and as a `--set` key: `steps` means `training.steps`, `pgd.n_steps`
means `adversary.n_steps`. A key given both ways is an error naming both. `ci_hidden_dim`
and `ci_backend` only ever applied to the `mlp` CI kind; with another kind they are dropped,
as they were ignored.
"""

from __future__ import annotations

import warnings
from typing import Any

# old top-level key -> its path in the grouped config
FLAT_KEYS: dict[str, tuple[str, ...]] = {
    "component_init": ("components", "init"),
    "delta_component": ("components", "delta"),
    "ci_hidden_dim": ("ci_fn", "hidden_dim"),
    "ci_backend": ("ci_fn", "backend"),
    "lower_sigmoid": ("ci_fn", "lower_sigmoid"),
    "faithfulness_coeff": ("loss", "faithfulness_coeff"),
    "stochastic_recon_coeff": ("loss", "stochastic_recon_coeff"),
    "stochastic_recon_layerwise_coeff": ("loss", "stochastic_recon_layerwise_coeff"),
    "stochastic_recon_subset_coeff": ("loss", "stochastic_recon_subset_coeff"),
    "adversarial_recon_coeff": ("loss", "adversarial_recon_coeff"),
    "importance_minimality_coeff": ("loss", "importance_minimality_coeff"),
    "frequency_minimality_coeff": ("loss", "frequency_minimality_coeff"),
    "n_mask_samples": ("loss", "n_mask_samples"),
    "output_loss": ("loss", "output_loss"),
    "subset_routing": ("loss", "subset_routing"),
    "pnorm": ("importance", "pnorm"),
    "pnorm_anneal": ("importance", "pnorm_anneal"),
    "importance_penalty": ("importance", "penalty"),
    "smooth_l0_scale": ("importance", "smooth_l0_scale"),
    "pgd": ("adversary",),
    "prefix_replay": ("engine", "prefix_replay"),
    "per_pass_backward": ("engine", "per_pass_backward"),
    "masked_pass_dtype": ("engine", "masked_pass_dtype"),
    "steps": ("training", "steps"),
    "batch_size": ("training", "batch_size"),
    "optimizer": ("training", "optimizer"),
    "log_every": ("training", "log_every"),
    "checkpoint_every": ("training", "checkpoint_every"),
    "grad_clip": ("training", "grad_clip"),
    "faithfulness_warmup": ("training", "faithfulness_warmup"),
    "on_nonfinite": ("training", "on_nonfinite"),
}
MLP_ONLY = ("ci_hidden_dim", "ci_backend")


def grouped_key(key: str) -> str:
    """A dotted `--set` key in today's layout: `steps` → `training.steps`, `pgd.init` →
    `adversary.init`; a key that is not an old one is returned as it is."""
    head, _, rest = key.partition(".")
    if head not in FLAT_KEYS:
        return key
    return ".".join((*FLAT_KEYS[head], *([rest] if rest else [])))


def group_flat_keys(data: Any) -> Any:
    """A config mapping with every old top-level key moved to its section (a new dict; the
    input is not changed). Raises ValueError naming a key given both ways."""
    if not isinstance(data, dict) or not any(
        k in data for k in (*FLAT_KEYS, "batch_layerwise_passes")
    ):
        return data
    data = {k: _copy_section(v) for k, v in data.items()}
    if "batch_layerwise_passes" in data and data.pop("batch_layerwise_passes"):
        warnings.warn(
            "batch_layerwise_passes was removed: layerwise passes run one at a time "
            "with prefix replay (same losses); the setting is ignored",
            stacklevel=4,
        )
    ci_fn = data.get("ci_fn")
    kind = ci_fn.get("kind", "mlp") if isinstance(ci_fn, dict) else "mlp"
    for old, path in FLAT_KEYS.items():
        if old not in data:
            continue
        value = data.pop(old)
        if old in MLP_ONLY and kind != "mlp":
            continue  # it applied to the mlp kind only, and was ignored by every other
        if path[0] == "ci_fn" and "ci_fn" not in data:
            data["ci_fn"] = {"kind": "mlp"}
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{old}: cannot be placed in {'.'.join(path)} ({part} is a value)")
        if path[-1] in node:
            raise ValueError(f"{old} and {'.'.join(path)} both given: keep one ({'.'.join(path)})")
        node[path[-1]] = value
    return data


def _copy_section(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else value
