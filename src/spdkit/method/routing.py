"""Stochastic subset routing (VPD, `reference/vpd_method_notes.md` §2.2): which decomposed
modules a reconstruction pass masks.

For each position (every leading index of the CI, [B] or [B, T]; scope "position", VPD's
default) or once per pass (scope "batch"), a subset R of the L decomposed modules is drawn:

    uniform_k:  k ~ Uniform{1, …, L}, then R a uniformly random k-subset
                (rank of each module in a random permutation < k);
    bernoulli:  l ∈ R independently with probability p (R may be empty).

Module l ∈ R runs from its masked components at that position; every other module runs its
original weights (the target module's own output). "All modules masked" (k = L) and "one
module" (k = 1) are special cases. The draws are uniforms from the step's counter-based
stream, so routing is a pure function of the seed and the step, on any device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor

from spdkit.config import SubsetRoutingConfig
from spdkit.engine.random_stream import MaskStream


def uniform_k_subsets(u_k: Tensor, u_rank: Tensor) -> Tensor:
    """Routes [P, L] (bool) from uniforms u_k [P] and u_rank [P, L] in [0, 1):
    k = ⌊u_k L⌋ + 1, and module l is routed iff its rank among u_rank[p] is below k."""
    L = u_rank.shape[-1]
    k = (u_k * L).floor().long().clamp(max=L - 1) + 1  # [P], in 1..L
    rank = u_rank.argsort(dim=-1).argsort(dim=-1)  # [P, L], a random permutation's ranks
    return rank < k.unsqueeze(-1)


def bernoulli_subsets(u: Tensor, p: float) -> Tensor:
    """Routes [P, L] (bool): module l routed at position i iff u[i, l] < p."""
    return u < p


def draw_routes(
    kind: str,
    p: float,
    positions: tuple[int, ...],
    n_modules: int,
    uniforms: Callable[[int], Tensor],
) -> Tensor:
    """Routes [*positions, L] (bool) for one pass; `uniforms(n)` returns n fresh uniforms
    [n] from the step's stream (uniform_k takes P first, then P·L)."""
    P = 1
    for size in positions:
        P *= size
    if kind == "uniform_k":
        u_k = uniforms(P)
        u_rank = uniforms(P * n_modules).view(P, n_modules)
        routes = uniform_k_subsets(u_k, u_rank)
    elif kind == "bernoulli":
        routes = bernoulli_subsets(uniforms(P * n_modules).view(P, n_modules), p)
    else:  # the config validates it
        raise AssertionError(f"unknown routing kind {kind!r}")
    return routes.view(*positions, n_modules)


def routes_by_module(routes: Tensor, names: list[str]) -> dict[str, Tensor]:
    """{module: bool [*positions]} for the modules routed at one position or more."""
    return {n: routes[..., i] for i, n in enumerate(names) if bool(routes[..., i].any())}


def subset_masks(
    masks: Mapping[str, Tensor], routing: SubsetRoutingConfig, stream: MaskStream
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """The masks of the routed modules and, for per-position routing, each one's route
    (bool [...]), by `draw_routes` above with the stream's numbers. Modules routed nowhere
    are left out."""
    names = list(masks)
    first = masks[names[0]]
    positions = tuple(first.shape[:-1]) if routing.scope == "position" else ()
    mismatched = [
        n for n in names if routing.scope == "position" and masks[n].shape[:-1] != positions
    ]
    if mismatched:
        raise ValueError(
            f"subset_routing.scope=position needs every decomposed module to see the same "
            f"positions; {mismatched[0]} has {list(masks[mismatched[0]].shape[:-1])}, "
            f"{names[0]} {list(positions)} (use subset_routing.scope=batch)"
        )
    routes = draw_routes(
        routing.kind,
        routing.p,
        positions,
        len(names),
        lambda n: stream.uniforms(n, first.device, per_sample=bool(positions)),
    )
    if routing.scope == "batch":
        routed = [n for i, n in enumerate(names) if bool(routes[i])]
        return {n: masks[n] for n in routed}, None
    by_module = routes_by_module(routes, names)
    return {n: masks[n] for n in by_module}, by_module
