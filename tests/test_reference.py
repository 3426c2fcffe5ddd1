"""The fast training step (`spd_losses`: fused kernels, reused inner activations, prefix
replay, per-pass backward, memoised embeddings) against the plain one (`spdkit.method.reference`):
same batch, same random numbers, same loss terms and gradients, for every routing.

Tolerance: the fused CI kernel's erf/exp approximations and the matmul orders differ from
eager PyTorch by float rounding, so terms must agree to 1e-5 relative (a KL term: or 5e-8
absolute, its float32 floor) and each parameter's gradient to 1e-4 relative (of its norm).
"""

from __future__ import annotations

import pytest
import torch

from spdkit.config import load_config, parse_config
from spdkit.engine.random_stream import MaskStream
from spdkit.method.reference import reference_spd_losses
from spdkit.targets import data_source, target_kind
from spdkit.training.loop import build_trainer
from spdkit.training.trainer import spd_losses
from tests import hf_models
from tests.helpers import tiny_resid_dict, tiny_tms_dict


def _induction(**overrides) -> dict:
    small = {"target.d_model": 16, "target.vocab_size": 32, "target.seq_len": 16}
    modules = [{"pattern": "blocks.*.attn.*", "C": 8}]
    config = load_config("induction", {**small, "batch_size": 6, "modules": modules, **overrides})
    return config.model_dump(mode="json")


# VPD's recipe: the subset term replaces the other two reconstruction terms
SUBSET = {
    "stochastic_recon_coeff": 0.0,
    "stochastic_recon_layerwise_coeff": 0.0,
    "stochastic_recon_subset_coeff": 1.0,
}


def _minimality_warmup() -> dict:
    """tiny TMS, 60 steps: after the test's 3 steps the ramp over 30 steps is at 0.1."""
    data = tiny_tms_dict(frequency_minimality_coeff=1e-3)
    data.pop("pnorm")
    data["importance"] = {"pnorm": 1.0, "warmup_frac": 0.5}
    return data


def _frequency_reference() -> dict:
    data = tiny_tms_dict()
    data.pop("importance_minimality_coeff")
    data["loss"] = {
        "importance_minimality_coeff": 3e-3,
        "frequency_minimality_coeff": 0.5,
        "frequency_reference_count": 7,
    }
    return data


CASES = {
    "tms 5-2 + identity": tiny_tms_dict(
        target={"kind": "tms", "n_features": 5, "n_hidden": 2, "n_hidden_layers": 1},
        modules=[
            {"pattern": "linear1", "C": 8},
            {"pattern": "linear2", "C": 8},
            {"pattern": "hidden_layers.*", "C": 4},
        ],
    ),
    "tms, p=2, two mask samples": tiny_tms_dict(pnorm=2.0, n_mask_samples=2),
    "tms, one graph (no per-pass backward)": tiny_tms_dict(per_pass_backward=False),
    "tms + identity, subset uniform_k per position": tiny_tms_dict(
        insert_identity=[{"pattern": "linear2"}], **SUBSET
    ),
    "tms, subset bernoulli per batch, 3 samples": tiny_tms_dict(
        n_mask_samples=3,
        **{**SUBSET, "subset_routing": {"kind": "bernoulli", "p": 0.4, "scope": "batch"}},
    ),
    "resid mlp, 2 layers": tiny_resid_dict(),
    "induction transformer (KL)": _induction(),
    "resid mlp, subset only (VPD), uniform_k per batch": tiny_resid_dict(
        **{**SUBSET, "subset_routing": {"scope": "batch"}}
    ),
    "induction, subset uniform_k per position": _induction(**SUBSET),
    "tms, ci_fn vector_mlp": tiny_tms_dict(ci_fn={"kind": "vector_mlp", "hidden_dims": [8, 4]}),
    "resid mlp, ci_fn global_mlp, subset": tiny_resid_dict(
        ci_fn={"kind": "global_mlp", "hidden_dims": [16]}, stochastic_recon_subset_coeff=1.0
    ),
    "tms + identity, ci_fn global_transformer (position-wise)": tiny_tms_dict(
        insert_identity=[{"pattern": "linear2"}],
        ci_fn={"kind": "global_transformer", "d_model": 16, "n_heads": 2, "d_ff": 32},
    ),
    "induction, ci_fn global_transformer (causal)": _induction(
        ci_fn={"kind": "global_transformer", "d_model": 16, "n_heads": 2, "causal": True}
    ),
    "llama (KL): all + layerwise + subset": tiny_tms_dict(
        target=hf_models.LLAMA_TARGET,
        modules=[{"pattern": "model.layers.*.mlp.*", "C": 6}, {"pattern": "*.o_proj", "C": 4}],
        output_loss="kl",
        batch_size=4,
        stochastic_recon_subset_coeff=1.0,
    ),
    "llama with an embedding, ci_fn global_transformer": tiny_tms_dict(
        target=hf_models.LLAMA_TARGET,
        modules=[{"pattern": "model.embed_tokens", "C": 8}, {"pattern": "*.down_proj", "C": 6}],
        ci_fn={"kind": "global_transformer", "d_model": 16, "n_heads": 2, "d_ff": 32},
        output_loss="kl",
        batch_size=4,
    ),
    # VPD's minimality and sigmoid (evaluated at step 3 of 10: p = 2 → 0.4 between 0 and 0.5)
    "tms, p annealed, frequency minimality, straight-through sigmoid": tiny_tms_dict(
        pnorm=2.0,
        pnorm_anneal={"p_end": 0.4, "end_frac": 0.5},
        frequency_minimality_coeff=0.5,
        lower_sigmoid="straight_through",
        steps=10,
    ),
    "resid mlp, smooth L0 + frequency, straight-through, global_mlp": tiny_resid_dict(
        importance_penalty="smooth_l0",
        smooth_l0_scale=0.05,
        frequency_minimality_coeff=1e-3,
        lower_sigmoid="straight_through",
        ci_fn={"kind": "global_mlp", "hidden_dims": [16]},
    ),
    "induction (KL), frequency over batch and positions, straight-through, subset": _induction(
        frequency_minimality_coeff=1e-3, lower_sigmoid="straight_through", **SUBSET
    ),
    "tms, frequency at a reference count": _frequency_reference(),
    "tms, minimality warm-up (at 1/10 of its ramp), frequency": _minimality_warmup(),
    "resid mlp, Δ-component, all + layerwise": tiny_resid_dict(delta_component=True),
    "tms + identity, Δ-component, subset per position": tiny_tms_dict(
        insert_identity=[{"pattern": "linear2"}], delta_component=True, **SUBSET
    ),
    "induction (KL), Δ-component": _induction(delta_component=True),
    # VPD's adversary (fresh sources): every routing, both ascents, both scopes
    "tms, adversarial sign-PGD, 3 steps, all modules, per position": tiny_tms_dict(
        adversarial_recon_coeff=1.0, pgd={"n_steps": 3, "step_size": 0.2}
    ),
    "resid mlp, adversarial Adam, batch scope, layerwise, Δ-component": tiny_resid_dict(
        adversarial_recon_coeff=0.5,
        delta_component=True,
        pgd={"n_steps": 2, "optimizer": "adam", "scope": "batch", "routing": "layerwise"},
    ),
    "induction (KL), adversarial subset per position, ones init, + stochastic subset": _induction(
        adversarial_recon_coeff=0.5,
        pgd={"n_steps": 2, "init": "ones", "routing": "subset"},
        **SUBSET,
    ),
    "tms, adversarial subset per batch, one graph": tiny_tms_dict(
        adversarial_recon_coeff=1.0,
        per_pass_backward=False,
        subset_routing={"scope": "batch"},
        pgd={"n_steps": 2, "routing": "subset", "scope": "batch"},
    ),
}


def _fast(trainer, x, stream):
    """spd_losses accumulates its gradients into .grad (per pass, by default)."""
    params = trainer.model.trainable_parameters()
    for p in params:
        p.grad = None
    terms = spd_losses(trainer.model, x, trainer.config, stream, trainer.step).terms
    return terms, [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]


def _reference(trainer, x, stream):
    terms = reference_spd_losses(trainer.model, x, trainer.config, stream, trainer.step)
    params = trainer.model.trainable_parameters()
    return terms, torch.autograd.grad(
        terms["total"], params, allow_unused=True, materialize_grads=True
    )


def _loss_and_grads(fn, trainer, x, stream_state):
    stream = MaskStream(0)
    stream.set_state(stream_state)
    terms, grads = fn(trainer, x, stream)
    return {k: float(v.detach()) for k, v in terms.items()}, grads, stream.offset


@pytest.mark.parametrize("case", list(CASES))
def test_spd_losses_equal_the_plain_reference(case):
    config = parse_config(CASES[case])
    target = target_kind(config.target).build(config.target)
    trainer = build_trainer(target, data_source(config), config, "cpu")
    for _ in range(3):  # move away from the init, where some terms are still exactly zero
        trainer.train_step()
    x = trainer.data.sample(config.training.batch_size, trainer.data_generator)
    state = trainer.mask_stream.state()

    fast, fast_grads, fast_offset = _loss_and_grads(_fast, trainer, x, state)
    ref, ref_grads, ref_offset = _loss_and_grads(_reference, trainer, x, state)

    assert fast_offset == ref_offset  # the same random numbers were drawn
    assert fast.keys() == ref.keys()
    # a KL near 0 is a difference of float32 log-probabilities (each rounded to ~6e-8): its
    # absolute rounding floor is ~1e-8 whatever its size, so a small KL gets an absolute
    # tolerance above that floor (transformers 5.24's Llama: 1.0e-8 on a KL of 8.3e-4)
    floor = 5e-8 if config.loss.output_loss == "kl" else 1e-9
    for key, value in fast.items():
        assert value == pytest.approx(ref[key], rel=1e-5, abs=floor), key
    for p, a, b in zip(trainer.model.trainable_parameters(), fast_grads, ref_grads, strict=True):
        assert a.shape == p.shape
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-9
