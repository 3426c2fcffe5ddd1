"""The end-of-run evaluation's loss terms: chunked, with one mask stream for the batch."""

import torch

from spdkit.analysis.evaluation import evaluation_losses
from spdkit.config import SPDConfig
from spdkit.targets import data_source, target_kind
from spdkit.training.loop import build_trainer


def test_each_evaluation_chunk_draws_its_own_masks(tiny_config: SPDConfig) -> None:
    """The same 64 inputs twice, in two chunks of 64: with one mask stream the second chunk
    gets other random masks, so the mean is not the first chunk's value (a stream made afresh
    for every chunk gave both chunks the same numbers, and `final_losses` then depended on
    `eval.batch_size`)."""
    cfg = tiny_config.model_copy(
        update={"eval": tiny_config.eval.model_copy(update={"batch_size": 64})}
    )
    target = target_kind(cfg.target).build(cfg.target)
    model = build_trainer(target, data_source(cfg), cfg, "cpu").model
    x = data_source(cfg).sample(64, torch.Generator().manual_seed(0))
    once = evaluation_losses(model, x, cfg, cfg.training.steps)
    twice = evaluation_losses(model, torch.cat([x, x]), cfg, cfg.training.steps)
    assert once["faithfulness"] == twice["faithfulness"]  # deterministic terms agree
    assert once["stochastic_recon"] != twice["stochastic_recon"]


def test_evaluation_losses_are_reproducible(tiny_config: SPDConfig) -> None:
    target = target_kind(tiny_config.target).build(tiny_config.target)
    model = build_trainer(target, data_source(tiny_config), tiny_config, "cpu").model
    x = data_source(tiny_config).sample(128, torch.Generator().manual_seed(0))
    first = evaluation_losses(model, x, tiny_config, 0)
    assert first == evaluation_losses(model, x, tiny_config, 0)
