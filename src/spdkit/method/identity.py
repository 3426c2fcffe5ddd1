"""Inserting a frozen identity before a module, to decompose it too (paper appendix check:
SPD should find a rank-d identity as one dense group of subcomponents, not d "features")."""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from spdkit.config import IdentitySpec

IDENTITY_SUFFIX = "_identity"


def match_identity_sites(model: nn.Module, specs: list[IdentitySpec]) -> dict[str, tuple[int, int]]:
    """Module name → (d, C) for every module an identity is to be inserted before: d is its
    input width, C the identity's subcomponents (default 2d, room for the rank-d solution)."""
    modules = dict(model.named_modules())
    sites: dict[str, tuple[int, int]] = {}
    for spec in specs:
        names = [n for n in modules if n and fnmatch.fnmatchcase(n, spec.pattern)]
        names = [n for n in names if input_width(modules[n]) is not None]
        if not names:
            raise ValueError(
                f"insert_identity pattern {spec.pattern!r} matches no nn.Linear or Conv1D "
                "(an identity goes before a module that takes vectors)"
            )
        for name in names:
            d = input_width(modules[name])
            sites[name] = (d, spec.C or 2 * d)  # type: ignore[arg-type]
    return sites


def input_width(module: nn.Module) -> int | None:
    """d_in of an nn.Linear or HF Conv1D; None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.shape[0]
    return None


def insert_identity(model: nn.Module, name: str, d: int) -> str:
    """Put a frozen d×d identity nn.Linear in front of module `name`; returns its name.

    The identity is a sibling, `<name>_identity`, called by a forward pre-hook on the module,
    so the target's own module names (and the patterns that match them) do not change. The
    parent attribute is looked up at call time: once the identity is wrapped for decomposition,
    the hook calls the wrapper. Paper appendix: decomposing an inserted identity is a check
    that SPD finds a rank-d map as one dense group of subcomponents, not d "features".
    """
    module = model.get_submodule(name)
    weight = next(module.parameters())
    identity = nn.Linear(d, d, bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(d))
    identity.requires_grad_(False)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    attr = child + IDENTITY_SUFFIX
    if hasattr(parent, attr):
        raise ValueError(f"cannot insert an identity before {name!r}: {attr!r} already exists")
    parent.add_module(attr, identity)
    module.register_forward_pre_hook(lambda _mod, args: (getattr(parent, attr)(args[0]), *args[1:]))
    return f"{parent_name}.{attr}" if parent_name else attr
