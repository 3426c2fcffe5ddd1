"""Attribution-based Parameter Decomposition (APD; `apd_paper.md` §2 and appendix "Practical
loss: Top-k formulation"), SPD's predecessor, kept as the baseline SPD is compared with.

APD decomposes the parameters θ* into C parameter components P_c ∈ ℝᴺ, each spanning every
decomposed module, P_{c,l} = Σ_m U_{c,l,m} V_{c,l,m}ᵀ of rank r (full rank in the paper):

    A_c(x)  = sqrt( (1/d_L) Σ_o ( Σ_l ∂f_o/∂y_l · P_{c,l} a_l )² )   gradient attribution
    s(x)    = top-k over c of A_c(x)  (batch top-k: over the batch's (x, c) pairs)
    κ(x)    = Σ_c s_c(x) P_c                                       the sparse parameters
    L_faithfulness = (1/N) Σ_l ‖W_l − Σ_c P_{c,l}‖²
    L_minimality   = D(f(x | κ(x)), f(x | θ*))
    L_simplicity   = (1/(N B)) Σ_b Σ_c s_c(x_b) Σ_l Σ_m (‖U_{c,l,m}‖² ‖V_{c,l,m}‖²)^{p/2}
    L_hidden       = mean_b Σ_l ‖ReLU(y_l(x | κ)) − ReLU(y_l(x | θ*))‖² / Σ_l d_l   (optional)
    total = L_faithfulness + β L_minimality + α L_simplicity + γ L_hidden

L_hidden is the paper's "reconstructing hidden activations" (appendix, used for its residual
MLPs with γ = 1): the sparse pass must also compute the target's hidden activations, not
only its output.

(Σ_{ij} ∂f_o/∂θ_{l,ij} P_{c,l,ij} = ∂f_o/∂y_l · P_{c,l} a_l for y_l = W_l a_l: the paper's
attribution computed from the module's output gradient and input, without a per-parameter
gradient.) The simplicity term is the factorised Schatten-p norm of the paper's appendix: it
equals Σ_m σ_m^p when U's columns and V's rows of a component are orthogonal, and pushes them
there. The 1/N and 1/B scaling is that of the APD paper's code, so its coefficients carry over.

spdkit stores a component as r rank-one subcomponents: module l's U [d_out, C·r] and
V [C·r, d_in] hold component c in columns / rows c·r … c·r + r − 1. The engine's masked pass
then runs κ(x) unchanged, with s_c(x) repeated r times as the mask.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from spdkit.method.ci.base import CIFunction
from spdkit.method.components import Components

SCHATTEN_EPS = 1e-16  # inside (·)^{p/2}: a finite gradient at 0 for p < 1
ATTRIBUTION_CHUNK_ELEMENTS = 1 << 25  # output gradients held at once: [outputs, B, d_out]


class APDSelection(CIFunction):
    """APD has no learnt causal-importance function: its "importances" are the top-k mask of
    gradient attributions, which need the input itself and a backward pass through the network
    (`ComponentModel.importances`), not the (inputs, inner) a CI function reads. No parameters."""

    def raw(self, inputs: Mapping[str, Tensor], inner: Mapping[str, Tensor]) -> dict[str, Tensor]:
        raise RuntimeError(
            "APD selects components by gradient attribution: use ComponentModel.importances(x, "
            "record)"
        )


def full_rank(components: Components) -> int:
    """min(d_in, d_out): the rank of a full-rank component matrix (the paper's default)."""
    return min(components.d_in, components.d_out)


def repeat_per_rank(s: Tensor, rank: int) -> Tensor:
    """s [..., C] → the masks [..., C·r] of the rank-one subcomponents (component c's r columns
    each get s_c)."""
    return s.repeat_interleave(rank, dim=-1)


def component_matrices(components: Components, rank: int) -> Tensor:
    """P_{c,l} [C, d_out, d_in] = U[:, c-block] V[c-block, :] of one module."""
    C = components.C // rank
    U = components.U.reshape(components.d_out, C, rank).permute(1, 0, 2)  # [C, d_out, r]
    V = components.V.reshape(C, rank, components.d_in)  # [C, r, d_in]
    return U @ V


def component_outputs(components: Components, rank: int, a: Tensor) -> Tensor:
    """P_{c,l} a [B, C, d_out]: each component's part of the module's output on inputs a [B, d_in]
    (bias excluded: APD leaves biases undecomposed, always on)."""
    C = components.C // rank
    h = components.inner(a).reshape(*a.shape[:-1], C, rank)  # [B, C, r]
    U = components.U.reshape(components.d_out, C, rank)  # [d_out, C, r]
    return torch.einsum("bcr,ocr->bco", h, U)


def batch_top_k(attributions: Tensor, k: float, batch: bool = True) -> Tensor:
    """s (bool [B, C]): the ⌊k·B⌋ largest attributions of the batch (batch top-k, Bussmann et
    al. 2024: inputs that need more components get more), or each input's ⌊k⌋ largest."""
    B, C = attributions.shape
    if not batch:
        idx = attributions.topk(min(int(k), C), dim=-1).indices
        return torch.zeros_like(attributions, dtype=torch.bool).scatter_(-1, idx, True)
    n = min(int(k * B), B * C)
    flat = torch.zeros(B * C, dtype=torch.bool, device=attributions.device)
    flat[attributions.flatten().topk(n).indices] = True
    return flat.reshape(B, C)


def schatten_penalty(
    modules: Mapping[str, tuple[Components, int]], s: Tensor, p: float, n_params: int
) -> Tensor:
    """L_simplicity = (1/(N B)) Σ_b Σ_c s_bc Σ_l Σ_m (‖U_{l,:,cm}‖² ‖V_{l,cm,:}‖²)^{p/2}, with
    s [B, C] the selection and N the number of decomposed weights."""
    B = s.shape[0]
    per_component = 0.0
    for components, rank in modules.values():
        lam_sq = components.U.pow(2).sum(0) * components.V.pow(2).sum(1)  # [C·r]
        per_component = per_component + (lam_sq + SCHATTEN_EPS).pow(p / 2).reshape(-1, rank).sum(
            -1
        )  # [C]
    return (s.to(components.U.dtype) @ per_component).sum() / (n_params * B)  # type: ignore[operator]


def gradient_attributions(
    run: Callable[[], Tensor],
    modules: Mapping[str, nn.Module],
    components: Mapping[str, tuple[Components, int]],
) -> Tensor:
    """A [B, C]: A_c(x) = sqrt((1/d_L) Σ_o (Σ_l ∂f_o/∂y_l · P_{c,l} a_l)²), with the gradients
    and inputs a_l of the forward `run` (the target's, or the summed components'): each module's
    output gets a zero "probe" added, whose gradient is ∂f_o/∂y_l, for every output o at once
    (batched over o, in chunks that bound memory). Not differentiated (APD's top-k has no
    gradient). The output must be [B, d_L]: APD's attribution is one vector per input."""
    probes: dict[str, Tensor] = {}
    acts: dict[str, Tensor] = {}

    def probe(name: str) -> Callable[..., Tensor]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
            acts[name] = args[0].detach()
            probes[name] = torch.zeros_like(out, requires_grad=True)
            return out + probes[name]

        return hook

    handles = [m.register_forward_hook(probe(n)) for n, m in modules.items()]
    try:
        with torch.enable_grad():
            y = run()
    finally:
        for h in handles:
            h.remove()
    if y.dim() != 2:
        raise ValueError(
            f"APD's attributions need an output [batch, d_out] per input; this target's is "
            f"{list(y.shape)} (APD is a baseline for the toy models)"
        )
    names = list(modules)
    B, d_L = y.shape
    widest = max(probes[n].shape[-1] for n in names)
    chunk = max(1, ATTRIBUTION_CHUNK_ELEMENTS // (B * widest))
    with torch.no_grad():
        # each component's share of each module's output, P_{c,l} a_l [B, C, d_out]: cheaper
        # to contract with the gradients than U's rank-one columns when d_out < d_L · r
        shares = {n: component_outputs(components[n][0], components[n][1], acts[n]) for n in names}
    squares = y.new_zeros(B, shares[names[0]].shape[1])
    eye = torch.eye(d_L, dtype=y.dtype, device=y.device)
    for start in range(0, d_L, chunk):
        outs = eye[start : start + chunk]  # [k, d_L]
        cotangents = outs[:, None, :].expand(-1, B, -1)  # [k, B, d_L]
        grads = torch.autograd.grad(
            y, [probes[n] for n in names], cotangents, retain_graph=True, is_grads_batched=True
        )
        with torch.no_grad():
            per_output = sum(
                torch.einsum("kbo,bco->kbc", g, shares[n])  # ∂f_o/∂y_l · P_{c,l} a_l
                for n, g in zip(names, grads, strict=True)
            )
            squares += per_output.pow(2).sum(0)  # type: ignore[union-attr]
    return (squares / d_L).sqrt()


@contextlib.contextmanager
def outputs_of(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, Tensor]]:
    """While open, every call of the named modules stores its output in the yielded dict
    (hooks removed on exit)."""
    seen: dict[str, Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            seen[name] = out

        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in modules.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def hidden_recon_loss(sparse: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> Tensor:
    """L_hidden = mean_b Σ_l ‖ReLU(y_l^sparse) − ReLU(y_l^target)‖² / Σ_l d_l over the named
    modules' outputs [B, d_l] (the APD paper's code normalises by the total width)."""
    names = list(target)
    sq = sum((torch.relu(sparse[n]) - torch.relu(target[n])).pow(2).sum(-1) for n in names)  # [B]
    return sq.mean() / sum(target[n].shape[-1] for n in names)  # type: ignore[union-attr]
