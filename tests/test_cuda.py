"""Every path on a CUDA device: training steps, resume, the LM evaluation, the masks' torch
fallback, token sampling with a CUDA generator, bf16 masked passes. Skipped without CUDA."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from spdkit.analysis.lm import lm_mask_evaluation
from spdkit.engine.random_stream import MaskStream
from spdkit.targets.text import TokenWindows
from tests import hf_models
from tests.helpers import tiny_tms_dict, trainer_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

LLAMA = {
    "target": hf_models.LLAMA_TARGET,
    "modules": [{"pattern": "model.layers.*.mlp.*", "C": 6}],
    "output_loss": "kl",
    "batch_size": 4,
    "stochastic_recon_subset_coeff": 1.0,
}


@dataclass(frozen=True)
class Fixed:
    """The same batch every step, on the device."""

    x: torch.Tensor

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return self.x


def _trainer(data: dict, device: str):
    torch.manual_seed(0)  # the same (untrained) target each time
    return trainer_for(data, device)


CASES = {
    "tms": lambda: tiny_tms_dict(steps=5),
    "llama": lambda: tiny_tms_dict(**LLAMA, steps=5),
    "tms, vector_mlp": lambda: tiny_tms_dict(steps=5, ci_fn={"kind": "vector_mlp"}),
    "llama, global_mlp": lambda: tiny_tms_dict(**LLAMA, steps=5, ci_fn={"kind": "global_mlp"}),
    "llama, global_transformer": lambda: tiny_tms_dict(
        **LLAMA, steps=5, ci_fn={"kind": "global_transformer", "d_model": 16, "n_heads": 2}
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_training_steps_on_cuda_match_the_cpu(case):
    data = CASES[case]()
    data["ci_backend"] = "eager"  # the fused CI kernel is CPU-only; compare like with like
    losses = {}
    for device in ("cpu", "cuda"):
        trainer = _trainer(data, device)
        x = trainer.data.sample(
            trainer.config.training.batch_size, torch.Generator().manual_seed(0)
        )
        trainer.data = Fixed(x.to(device))
        for _ in range(3):
            terms, _ = trainer.train_step()
        losses[device] = {k: float(v) for k, v in terms.items()}
    for k, v in losses["cpu"].items():
        assert losses["cuda"][k] == pytest.approx(v, rel=1e-3, abs=1e-6), k


def test_resume_on_cuda_is_bit_exact():
    data = tiny_tms_dict(steps=8)
    full = _trainer(data, "cuda")
    for _ in range(8):
        full.train_step()
    part = _trainer(data, "cuda")
    for _ in range(4):
        part.train_step()
    tensors, meta = part.state_tensors()
    resumed = _trainer(data, "cuda")
    resumed.load_state({k: v.cpu() for k, v in tensors.items()}, meta)
    for _ in range(4):
        resumed.train_step()
    for a, b in zip(
        full.model.trainable_parameters(), resumed.model.trainable_parameters(), strict=True
    ):
        assert torch.equal(a, b)


def test_lm_evaluation_on_cuda_with_a_cuda_generator():
    trainer = _trainer(tiny_tms_dict(**LLAMA, steps=2), "cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = trainer.data.sample(4, gen)
    out = lm_mask_evaluation(trainer.model, ids.cuda(), trainer.config.eval, gen)
    assert set(out) == {"target", "ci", "stochastic", "ones", "rounded", "zero"}
    assert all(math.isfinite(v["ce"]) for v in out.values())


def test_mask_fallback_on_cuda_draws_the_cpu_kernels_numbers():
    g = torch.rand(64, 9)
    cpu = MaskStream(3).masks(g)
    cuda = MaskStream(3).masks(g.cuda())
    assert torch.equal(cpu, cuda.cpu())


def test_token_windows_sample_with_a_cuda_generator():
    windows = TokenWindows(torch.arange(1000), seq_len=16)
    batch = windows.sample(8, torch.Generator(device="cuda").manual_seed(0))
    assert batch.device.type == "cuda" and batch.shape == (8, 16)
    assert torch.equal(
        batch[:, 1:] - batch[:, :-1], torch.ones(8, 15, dtype=batch.dtype, device="cuda")
    )


def test_bf16_masked_passes_on_cuda_are_close_to_float32():
    terms = {}
    for dtype in ("float32", "bfloat16"):
        trainer = _trainer(tiny_tms_dict(**LLAMA, steps=2, masked_pass_dtype=dtype), "cuda")
        x = hf_models.tokens().sample(4, torch.Generator().manual_seed(0)).cuda()
        trainer.data = Fixed(x)
        terms[dtype], _ = trainer.train_step()
    assert float(terms["bfloat16"]["stochastic_recon_subset"]) == pytest.approx(
        float(terms["float32"]["stochastic_recon_subset"]), rel=0.1
    )
