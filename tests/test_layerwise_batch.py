"""Batched layerwise passes (one forward over the batch repeated L times) against L separate
forwards: the same losses and gradients, from the same masks."""

import pytest
import torch

from spdkit.config import load_config, parse_config
from spdkit.decomposition import build_trainer, data_source
from spdkit.targets import target_kind
from spdkit.train import spd_losses
from tests.conftest import tiny_tms_dict

SMALL = {"steps": 5, "batch_size": 32}
CASES = {
    "tms": lambda: parse_config(tiny_tms_dict(**SMALL)),
    "resid_mlp": lambda: load_config(
        "resid_mlp2",
        {
            **SMALL,
            "target.d_resid": 40,
            "target.n_features": 10,
            "target.d_mlp": 6,
            "modules.0.C": 12,
            "modules.1.C": 12,
        },
    ),
    "induction": lambda: load_config(
        "induction",
        {
            **SMALL,
            "batch_size": 4,
            "target.seq_len": 8,
            "target.d_model": 8,
            "target.vocab_size": 16,
            "modules.0.C": 5,
        },
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_batched_layerwise_passes_equal_separate_ones(case):
    results = []
    for batched in (False, True):
        config = CASES[case]().model_copy(update={"batch_layerwise_passes": batched})
        torch.manual_seed(0)  # the (untrained) target's weights
        target = target_kind(config.target).build(config.target)
        trainer = build_trainer(target, data_source(config), config, "cpu")
        x = trainer.data.sample(config.batch_size, torch.Generator().manual_seed(0))
        terms, _ = spd_losses(trainer.model, x, config, trainer.mask_stream)
        terms["total"].backward()
        grads = [p.grad.clone() for p in trainer.model.trainable_parameters()]
        results.append((terms, grads, trainer.mask_stream.offset))
    (terms_a, grads_a, offset_a), (terms_b, grads_b, offset_b) = results
    assert offset_a == offset_b
    assert len(trainer.model.module_names) > 1  # there is something to batch
    for key in terms_a:
        torch.testing.assert_close(terms_b[key], terms_a[key], rtol=1e-5, atol=1e-7)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
