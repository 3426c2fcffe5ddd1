"""The known mechanisms of the toy targets, and how well a clustering recovers them. Each
target kind declares its own (`TargetKind.mechanisms`: `spdkit.targets.tms_analysis`,
`spdkit.targets.resid_mlp_analysis`); the labelling rule and the score are here.

Each live subcomponent gets the label of the mechanism it belongs to: for TMS from its
weights (the feature coordinate it reads or writes), for the residual MLPs from its CI on
one-hot inputs (feature f alone at the config's `eval.one_hot_value`; it *responds* to f when
its CI exceeds the verdict's 0.1, `ResidVerdictRules.dense_ci`, whatever τ the clustering uses,
so that scores at different τ compare against the same labels).

- TMS (`tms_*`): one mechanism per feature, made of its subcomponent in `linear1` and its
  subcomponent in `linear2`; with +ID, the live subcomponents of the identity layers
  (`hidden_layers.*`, or identities inserted with --insert-identity) form one more.
- Residual MLPs (`resid_mlp1/2/3`): one mechanism per feature, made of its W_in (`mlp_in`)
  subcomponent in every layer; all dense W_out (`mlp_out`) subcomponents of all layers form one
  more (the rank-(layers × d_mlp) computation every feature goes through).

Rule per live subcomponent (identity layers aside): touches / responds to exactly one feature f →
"feature f"; a W_out (`mlp_out`) subcomponent responding to at least `dense_fraction` of the
features → "dense" (resid_mlp; elsewhere such a subcomponent has no true mechanism and stays alone); to none or a few → a label of its own
(it belongs to no known mechanism, so a clustering can only be right to leave it alone).
Score: the adjusted Rand index between these labels and the clusters, over live subcomponents.
"""

from __future__ import annotations

from typing import Any

import torch

from spdkit.analysis.decomposed import Decomposed
from spdkit.config import SPDConfig
from spdkit.method.model import ComponentModel
from spdkit.targets import target_kind


def true_mechanisms(decomp: Decomposed, live: list[str]) -> tuple[dict[str, str], int] | None:
    """({"<module>:<index>": mechanism label} for every live subcomponent, the number of
    mechanisms the target has), or None for a target without known ground truth (its
    `TargetKind.mechanisms`)."""
    target = decomp.config.target
    known = target_kind(target).mechanisms if target is not None else None
    if known is None:
        return None
    model = decomp.model
    features = known.feature_owners(model, decomp.config)
    identities = set(model.identity_modules)
    if known.identity_prefix is not None:
        identities |= {m for m in model.module_names if m.startswith(known.identity_prefix)}
    dense_module = known.dense_module
    labels = {}
    for name in live:
        module, index = name.rsplit(":", 1)
        hit = features[module][int(index)] if module in features else []
        if module in identities:
            labels[name] = "identity"
        elif len(hit) == 1:
            labels[name] = f"feature {hit[0]}"
        elif (
            dense_module is not None
            and module.endswith(dense_module)
            and len(hit) >= known.dense_fraction * target.n_features
        ):
            labels[name] = "dense"
        else:
            labels[name] = f"alone {name}"
    expected = target.n_features + (dense_module is not None) + bool(identities)
    return labels, expected


def score(labels: dict[str, str], clusters: list[list[str]], expected: int) -> dict[str, Any]:
    """Adjusted Rand index of the clusters against the true labels (over live subcomponents),
    and the count of mechanisms found vs expected."""
    from sklearn.metrics import adjusted_rand_score

    found = {name: i for i, members in enumerate(clusters) for name in members}
    names = sorted(labels)
    true_ids = [labels[n] for n in names]
    return {
        "ari": float(adjusted_rand_score(true_ids, [found[n] for n in names])),
        "n_mechanisms_found": len(clusters),
        "n_mechanisms_expected": expected,
        "n_mechanisms_in_decomposition": len(set(true_ids)),
    }


@torch.no_grad()
def start_at_truth(model: ComponentModel, config: SPDConfig, spare_scale: float = 1e-3) -> None:
    """Set every decomposed module's first k subcomponents to the target's true decomposition
    (`KnownMechanisms.true_components`, k terms per module) and scale the spare C − k down to
    `spare_scale` of their norm ‖U_c V_cᵀ‖ (alive, so training may still use them, but with no effect on
    the output). Training from here tells apart the two ways a recipe can miss the known
    answer: the objective prefers another decomposition (it walks away from this start), or
    the optimiser does not reach this one from its random start (it stays)."""
    known = target_kind(config.target).mechanisms if config.target is not None else None
    if known is None or known.true_components is None:
        raise ValueError("this target has no known true decomposition")
    for name, (U_true, V_true) in known.true_components(model).items():
        comps = model.components(name)
        k = U_true.shape[1]
        if k > comps.C:
            raise ValueError(
                f"{name}: C = {comps.C} < {k}, the true decomposition's rank-one terms"
            )
        comps.U.mul_(spare_scale**0.5)  # the rank-one term U_c V_cᵀ scaled by spare_scale
        comps.V.mul_(spare_scale**0.5)
        comps.U[:, :k] = U_true.to(comps.U)
        comps.V[:k] = V_true.to(comps.V)
