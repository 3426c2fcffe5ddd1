"""The SPD training loss written plainly, as the paper's pseudocode reads: the yardstick.

`spd_losses` (step.py) computes the same loss with every shortcut spdkit has: fused C++
kernels for the CI MLPs and the masks, the first masked module's inner activations reused,
prefix replay of recorded outputs (the residual MLPs' embedding included), per-pass backward.
This module has none of them: every masked pass runs the whole target from its input through
`ComponentModel.masked_forward` with `NO_SHORTCUTS`, the CI MLPs materialise their
[..., C, d_gate] hidden layer, subset routes are drawn plainly, and every loss is its formula
in one autograd graph. Each forward gets its own copy of the batch, so a target that memoises
work on its input would recompute it.

It exists for two jobs: tests/test_reference.py checks that `spd_losses` gives the same loss
terms and gradients (same batch, same random numbers), and `benchmarks/bench_step.py
--reference` times it as the plain eager step the fast one is measured against.
"""

from __future__ import annotations

import fnmatch
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from spdkit.config import SPDConfig
from spdkit.engine.random_stream import MaskStream, uniform
from spdkit.method.apd import outputs_of
from spdkit.method.forwards import split_delta_slot
from spdkit.method.model import NO_SHORTCUTS, ComponentModel


def _draw(stream: MaskStream, n: int, device: torch.device) -> Tensor:
    r = uniform(n, stream.key, stream.offset, device)
    stream.offset += n
    return r


def _divergence(kind: str, y_masked: Tensor, y_target: Tensor) -> Tensor:
    if kind == "mse":
        return ((y_masked - y_target) ** 2).mean()
    p_target = F.softmax(y_target, dim=-1)
    kl = p_target * (F.log_softmax(y_target, dim=-1) - F.log_softmax(y_masked, dim=-1))
    return kl.sum(-1).mean()


def reference_spd_losses(
    model: ComponentModel, x: Tensor, config: SPDConfig, mask_stream: MaskStream, step: int = 0
) -> dict[str, Tensor]:
    """Every SPD loss term and "total" for batch x at training step `step`, drawing r from
    `mask_stream` in the order `spd_losses` does (per mask sample, one draw per module in
    `model.module_names` order)."""
    names = model.module_names
    record = model.record(x.clone())
    y_target, inputs = record.output, record.inputs
    terms: dict[str, Tensor] = {}

    def masked(masks: dict[str, Tensor], routes: dict[str, Tensor] | None = None) -> Tensor:
        # with the Δ-component, each mask's last slot is Δ's
        masks, delta = split_delta_slot(masks) if config.components.delta else (masks, None)
        return model.masked_forward(
            x.clone(), masks, routes=routes, shortcuts=NO_SHORTCUTS, delta=delta
        )

    # 1. faithfulness: (1/N) Σ_l ‖W^l − U^l V^l‖²
    sq = sum(((model.target_weight(n) - model.components(n).weight()) ** 2).sum() for n in names)
    terms["faithfulness"] = sq / sum(model.target_weight(n).numel() for n in names)

    # 2. causal importances, raw → σ_H,lower (masks) and σ_H,upper (penalty). The paper's
    #    kind: γ_c(h_c) = w_out_c · GELU(w_in_c h_c + b_in_c) + b_out_c; the other kinds
    #    are plain PyTorch already (no kernels, no shortcuts): their own `raw`.
    h = {n: model.components(n).inner(inputs[n]) for n in names}  # [..., C]
    if config.ci_fn.kind == "mlp":
        raw = {}
        for n in names:
            ci = model.ci.of(n)  # type: ignore[attr-defined]
            hidden = F.gelu(h[n].unsqueeze(-1) * ci.w_in + ci.b_in)  # [..., C, d_gate]
            raw[n] = (hidden * ci.w_out).sum(-1) + ci.b_out
    else:
        raw = model.ci.raw(inputs, h)
    g_lower, g_upper = {}, {}
    for n in names:
        if config.ci_fn.lower_sigmoid == "leaky":
            g_lower[n] = torch.where(raw[n] <= 0, 0.01 * raw[n], torch.clamp(raw[n], max=1.0))
        else:  # VPD: clamp forward; below 0 only negative gradients pass, times 0.01
            g_lower[n] = _ClampLeakNegativeGrads.apply(raw[n])
        g_upper[n] = torch.where(raw[n] >= 1, 1 + 0.01 * (raw[n] - 1), torch.clamp(raw[n], min=0.0))

    # 3. importance minimality: Σ_l Σ_c φ(g⁺), averaged over the batch; φ = (g⁺)^p with p
    #    linear from pnorm to p_end between two fractions of training, or 1 − exp(−g⁺/σ)
    p = config.importance.pnorm
    if config.importance.pnorm_anneal is not None:
        a = config.importance.pnorm_anneal
        t = (step / config.training.steps - a.start_frac) / (a.end_frac - a.start_frac)
        p = config.importance.pnorm + (a.p_end - config.importance.pnorm) * min(max(t, 0.0), 1.0)
    if config.importance.penalty == "lp":
        phi = {n: (g + 1e-12) ** p for n, g in g_upper.items()}
    else:
        phi = {n: 1 - torch.exp(-g / config.importance.smooth_l0_scale) for n, g in g_upper.items()}
    terms["importance_minimality"] = sum(v.sum(-1).mean() for v in phi.values())
    # frequency minimality: Σ_l Σ_c s_c log2(1 + s_c) / (number of positions), s_c = Σ φ
    if config.loss.frequency_minimality_coeff > 0:
        freq = 0.0
        ref = config.loss.frequency_reference_count
        for v in phi.values():
            s_c = v.reshape(-1, v.shape[-1]).sum(0)
            n_pos = v.numel() / v.shape[-1]
            inside = s_c if ref is None else s_c * ref / n_pos  # the count at the reference size
            freq = freq + (s_c * torch.log2(1 + inside)).sum() / n_pos
        terms["frequency_minimality"] = freq

    # 4. S stochastic masks m = g + (1 − g) r: all modules masked, each one alone, a subset
    full, layerwise, subset = [], [], []
    for _ in range(config.loss.n_mask_samples):
        masks = {}
        for n in names:
            g = g_lower[n]
            if config.components.delta:  # one more slot, CI ≡ 0: its mask is r alone
                g = torch.cat([g, torch.zeros_like(g[..., :1])], dim=-1)
            masks[n] = g + (1 - g) * _draw(mask_stream, g.numel(), g.device).view(g.shape)
        if config.loss.stochastic_recon_coeff > 0:
            full.append(masked(masks))
        if config.loss.stochastic_recon_layerwise_coeff > 0:
            layerwise += [masked({n: masks[n]}) for n in names]
        if config.loss.stochastic_recon_subset_coeff > 0:
            subset.append(_subset_pass(masks, config, mask_stream, masked, y_target))

    # 5. adversarial: sources s ascend D by n projected sign / Adam steps with g fixed, then
    #    D at m = g + (1 − g) s with s fixed (fresh sources each step)
    div = config.loss.output_loss
    if config.loss.adversarial_recon_coeff > 0:
        g_full = {}
        for n in names:
            g = g_lower[n]
            if config.components.delta:
                g = torch.cat([g, torch.zeros_like(g[..., :1])], dim=-1)
            g_full[n] = g
        terms["adversarial_recon"] = _adversarial(g_full, config, mask_stream, masked, y_target)

    if full:
        terms["stochastic_recon"] = sum(_divergence(div, y, y_target) for y in full) / len(full)
    if layerwise:
        terms["stochastic_recon_layerwise"] = sum(
            _divergence(div, y, y_target) for y in layerwise
        ) / len(layerwise)
    if subset:
        terms["stochastic_recon_subset"] = sum(_divergence(div, y, y_target) for y in subset) / len(
            subset
        )
    coeffs = {
        "faithfulness": config.loss.faithfulness_coeff,
        "stochastic_recon": config.loss.stochastic_recon_coeff,
        "stochastic_recon_layerwise": config.loss.stochastic_recon_layerwise_coeff,
        "stochastic_recon_subset": config.loss.stochastic_recon_subset_coeff,
        "adversarial_recon": config.loss.adversarial_recon_coeff,
        "importance_minimality": config.loss.importance_minimality_coeff,
        "frequency_minimality": config.loss.frequency_minimality_coeff,
    }
    # the minimality coefficients ramp from 0 over warmup_frac of training
    if config.importance.warmup_frac > 0:
        ramp = min(1.0, step / (config.importance.warmup_frac * config.training.steps))
        coeffs["importance_minimality"] *= ramp
        coeffs["frequency_minimality"] *= ramp
    terms["total"] = sum(coeffs[k] * v for k, v in terms.items())  # type: ignore[assignment]
    return terms


def _adversarial(g_full, config: SPDConfig, stream: MaskStream, masked, y_target: Tensor):
    pgd, names = config.adversary, list(g_full)
    if pgd.routing == "all":
        problems = [(names, None, 1.0)]
    elif pgd.routing == "layerwise":
        problems = [([n], None, 1.0 / len(names)) for n in names]
    else:
        routes = _routes(g_full, config, stream)
        if routes is None:
            return y_target.new_zeros(())
        if isinstance(routes, list):  # scope batch: the routed modules, all positions
            problems = [(routes, None, 1.0)]
        else:  # per position: the modules routed somewhere
            somewhere = {n: r for n, r in routes.items() if r.any()}
            problems = [(list(somewhere), somewhere, 1.0)]
    total = 0.0
    for group, routes, weight in problems:
        sources = {}
        for n in group:
            shape = g_full[n].shape if pgd.scope == "position" else g_full[n].shape[-1:]
            if pgd.init == "random":
                sources[n] = _draw(stream, math.prod(shape), g_full[n].device).view(shape)
            else:
                sources[n] = torch.full(shape, 1.0 if pgd.init == "ones" else 0.0)
        m1 = {n: torch.zeros_like(s) for n, s in sources.items()}
        m2 = {n: torch.zeros_like(s) for n, s in sources.items()}
        for t in range(1, pgd.n_steps + 1):
            live = {n: s.clone().requires_grad_(True) for n, s in sources.items()}
            masks = {n: g_full[n].detach() + (1 - g_full[n].detach()) * live[n] for n in group}
            d = _divergence(config.loss.output_loss, masked(masks, routes), y_target)
            grads = torch.autograd.grad(d, [live[n] for n in group])
            for n, grad in zip(group, grads, strict=True):
                if pgd.optimizer == "sign":
                    step = torch.sign(grad)
                else:
                    b1, b2 = pgd.adam_betas
                    m1[n] = b1 * m1[n] + (1 - b1) * grad
                    m2[n] = b2 * m2[n] + (1 - b2) * grad**2
                    step = (m1[n] / (1 - b1**t)) / (torch.sqrt(m2[n] / (1 - b2**t)) + 1e-8)
                sources[n] = torch.clamp(sources[n] + pgd.step_size * step, 0, 1)
        masks = {n: g_full[n] + (1 - g_full[n]) * sources[n] for n in group}
        total = total + weight * _divergence(
            config.loss.output_loss, masked(masks, routes), y_target
        )
    return total


def _routes(g_full, config: SPDConfig, stream: MaskStream):
    """Subset routes drawn plainly: per position {name: bool [...]}, per batch the routed
    names (None if no module is routed anywhere)."""
    names, routing = list(g_full), config.loss.subset_routing
    positions = tuple(g_full[names[0]].shape[:-1]) if routing.scope == "position" else ()
    routed = _route_draws(routing, positions, len(names), stream, g_full[names[0]].device)
    if routing.scope == "batch":
        chosen = [n for i, n in enumerate(names) if routed[i]]
        return chosen or None
    return {n: routed[..., i] for i, n in enumerate(names)} if routed.any() else None


def _route_draws(routing, positions: tuple[int, ...], L: int, stream: MaskStream, device):
    """bool [*positions, L]: which modules each position routes."""
    P = math.prod(positions)
    if routing.kind == "uniform_k":
        k = torch.clamp(torch.floor(_draw(stream, P, device) * L).long(), max=L - 1) + 1  # [P]
        u = _draw(stream, P * L, device).view(P, L)
        ranks = torch.empty(P, L, dtype=torch.long, device=device)
        for i in range(P):  # rank of each module in a random permutation
            ranks[i, torch.argsort(u[i])] = torch.arange(L, device=device)
        routed = ranks < k[:, None]
    else:
        routed = _draw(stream, P * L, device).view(P, L) < routing.p
    return routed.view(*positions, L)


class _ClampLeakNegativeGrads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, raw: Tensor) -> Tensor:
        ctx.save_for_backward(raw)
        return torch.clamp(raw, 0.0, 1.0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (raw,) = ctx.saved_tensors
        out = grad.clone()
        out[raw > 1] = 0.0
        below = raw <= 0
        out[below] = torch.where(grad[below] < 0, 0.01 * grad[below], 0.0)
        return out


def _subset_pass(masks, config: SPDConfig, stream: MaskStream, masked, y_target: Tensor) -> Tensor:
    """One subset-routed output: routes drawn plainly (per position or per batch), modules
    routed nowhere run their original weights like every unrouted position."""
    names, routing = list(masks), config.loss.subset_routing
    positions = tuple(masks[names[0]].shape[:-1]) if routing.scope == "position" else ()
    routed = _route_draws(routing, positions, len(names), stream, masks[names[0]].device)
    if routing.scope == "batch":
        chosen = {n: masks[n] for i, n in enumerate(names) if routed[i]}
        return masked(chosen) if chosen else y_target
    routes = {n: routed[..., i] for i, n in enumerate(names)}
    return masked(masks, routes)


def reference_apd_losses(model: ComponentModel, x: Tensor, config: SPDConfig) -> dict[str, Tensor]:
    """Every APD loss term and "total" for batch x [B, d_in], written as the APD paper's
    appendix reads, for targets whose decomposed modules are nn.Linear: the attributions from
    the per-parameter Jacobian ∂f_o/∂θ_{l,ij} (torch.func.jacrev, per input) contracted with
    each P_{c,l,ij}; the sparse pass runs the target with per-input parameters κ(x) =
    Σ_c s_c(x) P_c (torch.func.functional_call); the Schatten norm is summed component by
    component. `spdkit.method.apd_step.apd_losses` must agree (tests/test_apd.py)."""
    apd = config.apd
    assert apd is not None
    names = model.module_names
    params = {k: v.detach() for k, v in model.target.named_parameters()}
    P = {}  # [C, d_out, d_in] per module, with graph
    for n in names:
        comps, r = model.components(n), model.apd_ranks[n]
        C = comps.C // r
        P[n] = torch.stack(
            [comps.U[:, c * r : (c + 1) * r] @ comps.V[c * r : (c + 1) * r] for c in range(C)]
        )

    hidden_names = [
        n for n in names if any(fnmatch.fnmatchcase(n, p) for p in apd.hidden_recon_modules)
    ]

    def run(weights: dict[str, Tensor], xb: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """f(x | weights) for one input [d_in], and the outputs of the hidden-term modules."""
        full = {**params, **{f"{n}.weight": w for n, w in weights.items()}}
        with outputs_of({n: model.target.get_submodule(n) for n in hidden_names}) as seen:
            y = torch.func.functional_call(model.target, full, (xb[None],))[0]
        return y, {n: v[0] for n, v in seen.items()}

    def per_input(weights: list[dict[str, Tensor]]) -> tuple[Tensor, dict[str, Tensor]]:
        """run() input by input (a plain loop: no vmap, which sparse embeddings lack)."""
        outs = [run(w, xb) for w, xb in zip(weights, x, strict=True)]
        hidden = {n: torch.stack([o[1][n] for o in outs]) for n in hidden_names}
        return torch.stack([o[0] for o in outs]), hidden

    terms: dict[str, Tensor] = {}
    sq = sum(((model.target_weight(n) - P[n].sum(0)) ** 2).sum() for n in names)
    n_params = sum(model.target_weight(n).numel() for n in names)
    terms["faithfulness"] = sq / n_params

    at = {n: model.target_weight(n).detach() for n in names}
    if apd.attributions_from == "components":
        at = {n: P[n].sum(0).detach() for n in names}
    per_output = []  # [d_L, C] per input: Σ_l Σ_ij ∂f_o/∂θ_l,ij P_c,l,ij
    for xb in x:
        jac = torch.autograd.functional.jacobian(
            lambda *ws, xb=xb: run(dict(zip(names, ws, strict=True)), xb)[0],
            tuple(at[n] for n in names),
        )  # per module [d_L, o, i]
        per_output.append(
            sum(
                torch.einsum("loi,coi->lc", j, P[n].detach())
                for n, j in zip(names, jac, strict=True)
            )
        )
    per_output = torch.stack(per_output)  # [B, d_L, C]
    A = per_output.pow(2).mean(1).sqrt()  # [B, C]
    B, C = A.shape
    if apd.batch_top_k:
        keep = A.flatten().argsort(descending=True)[: int(apd.top_k * B)]
        s = torch.zeros(B * C).index_fill(0, keep, 1.0).reshape(B, C)
    else:
        keep = A.argsort(dim=-1, descending=True)[:, : int(apd.top_k)]
        s = torch.zeros(B, C).scatter(1, keep, 1.0)

    # per-input parameters κ(x_b) = Σ_c s_bc P_c
    kappa = [{n: torch.einsum("c,coi->oi", s[b], P[n]) for n in names} for b in range(B)]
    y, hidden = per_input(kappa)
    y_target, hidden_target = per_input([{n: model.target_weight(n) for n in names}] * B)
    terms["apd_minimality"] = _divergence(config.loss.output_loss, y, y_target)
    if hidden_names:
        sq = sum(
            ((F.relu(hidden[n]) - F.relu(hidden_target[n])) ** 2).sum(-1) for n in hidden_names
        )
        terms["apd_hidden"] = sq.mean() / sum(hidden_target[n].shape[-1] for n in hidden_names)

    schatten = x.new_zeros(())
    for n in names:
        comps, r = model.components(n), model.apd_ranks[n]
        for c in range(C):
            for m in range(c * r, (c + 1) * r):
                lam_sq = comps.U[:, m].pow(2).sum() * comps.V[m].pow(2).sum()
                schatten = schatten + s[:, c].sum() * (lam_sq + 1e-16) ** (apd.schatten_p / 2)
    terms["apd_simplicity"] = schatten / (n_params * B)
    terms["total"] = (
        config.loss.faithfulness_coeff * terms["faithfulness"]
        + apd.minimality_coeff * terms["apd_minimality"]
        + apd.simplicity_coeff * terms["apd_simplicity"]
        + apd.hidden_recon_coeff * terms.get("apd_hidden", x.new_zeros(()))
    )
    return terms
