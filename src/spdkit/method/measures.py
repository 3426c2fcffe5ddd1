"""Quantities read off a component model: each subcomponent's norm, the non-negligible rule,
causal importance on inputs (in chunks), one-hot feature inputs. Plain functions that every
analysis and every target's own report builds on."""

from __future__ import annotations

import torch
from torch import Tensor

from spdkit.method.apd import component_matrices
from spdkit.method.model import ComponentModel


def subcomponent_norms(U: Tensor, V: Tensor) -> Tensor:
    """‖U_c V_cᵀ‖_F = ‖U[:, c]‖ ‖V[c, :]‖ for each c → [C]."""
    return U.norm(dim=0) * V.norm(dim=1)


def non_negligible(norms: Tensor, rel_threshold: float) -> Tensor:
    """bool [C]: norm ≥ rel_threshold × the largest norm in the module (and > 0).

    Relative to the module's largest subcomponent so the rule is scale-free; near-zero
    subcomponents are what SPD leaves unused, and must not count as matches or mechanisms.
    """
    return (norms >= rel_threshold * norms.max()) & (norms > 0)


@torch.no_grad()
def chunks(x: Tensor, size: int | None) -> list[tuple[float, Tensor]]:
    """x split along its first dim into pieces of `size` (None: x whole), each with its share
    of the rows: a mean over x is the share-weighted sum of the pieces' means."""
    pieces = [x] if size is None else list(x.split(size))
    return [(len(p) / len(x), p) for p in pieces]


def weighted_sum(parts: list[tuple[float, dict[str, float]]]) -> dict[str, float]:
    """Σ_i w_i d_i key by key (the chunked mean of per-chunk means)."""
    keys = parts[0][1].keys()
    return {k: sum(w * d[k] for w, d in parts) for k in keys}


def causal_importance(
    model: ComponentModel, x: Tensor, upper: bool = True, chunk: int | None = None
) -> dict[str, Tensor]:
    """CI per module [..., C] on inputs x: σ_H,upper (the penalised, plotted value) by default,
    σ_H,lower (the masks' g) otherwise; computed `chunk` rows at a time."""
    parts = []
    for _, piece in chunks(x, chunk):
        record = model.record(piece)
        g_lower, g_upper = model.importances(piece, record)
        parts.append(g_upper if upper else g_lower)
    return {n: torch.cat([p[n] for p in parts]) for n in parts[0]}


def one_hot_inputs(n_features: int, value: float, device: str | torch.device = "cpu") -> Tensor:
    """[n_features, n_features]: feature i alone active at `value`."""
    return value * torch.eye(n_features, device=device)


def subcomponents(model: ComponentModel, module: str) -> tuple[Tensor, Tensor]:
    """(U [d_out, C], V [C, d_in]) of one decomposed module, detached."""
    comps = model.components(module)
    return comps.U.detach(), comps.V.detach()


def pieces(model: ComponentModel, module: str) -> Tensor:
    """What a decomposition is measured by, [K, d_out, d_in]: its rank-one subcomponents
    U_c V_cᵀ (SPD), or its parameter components P_c (APD)."""
    comps = model.components(module)
    if model.apd is not None:
        return component_matrices(comps, model.apd_ranks[module]).detach()
    U, V = subcomponents(model, module)
    return U.T[:, :, None] * V[:, None, :]


def piece_norms(model: ComponentModel, module: str) -> Tensor:
    """‖piece‖_F [K]: of the subcomponents (SPD) or of the components (APD)."""
    if model.apd is None:
        return subcomponent_norms(*subcomponents(model, module))
    return pieces(model, module).flatten(1).norm(dim=1)


def live_columns(model: ComponentModel, module: str, rel_threshold: float) -> Tensor:
    """bool [C·r]: per column of the module's CI (one per rank-one subcomponent), whether its
    piece is non-negligible; an APD component's flag is repeated over its r columns, as its
    mask is (`apd.repeat_per_rank`)."""
    live = non_negligible(piece_norms(model, module), rel_threshold)
    return live if model.apd is None else live.repeat_interleave(model.apd_ranks[module])
