"""Toy target models: how to build, train and sample data for each `target.kind`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from spdkit.config import SPDConfig, TargetConfig
from spdkit.targets import hf, python, resid_mlp, tms, transformer


class DataSource(Protocol):
    """Batches drawn from an explicit generator, so a run's data is fixed by its seed and a
    resumed run draws exactly the batches the uninterrupted one would."""

    def sample(self, batch_size: int, generator: torch.Generator) -> Tensor: ...


@dataclass(frozen=True)
class TargetKind:
    build: Callable[[Any], nn.Module]
    train: Callable[..., tuple[nn.Module, dict]]  # (config, seed, device, progress=False)
    data: Callable[[Any], DataSource]
    # module whose weight columns are the ground-truth feature directions (MMCS / ML2R)
    feature_module: str | None
    # config fields that fix the architecture: a saved target must agree on all of them
    architecture: tuple[str, ...]
    # config -> (token ids -> readable text), for language-model targets (top contexts)
    decoder: Callable[[Any], Callable[[list[int]], str] | None] | None = None
    # config -> (text -> token ids), for typing a prompt (`spdkit serve`)
    encoder: Callable[[Any], Callable[[str], list[int]] | None] | None = None


TARGET_KINDS: dict[str, TargetKind] = {
    "tms": TargetKind(
        build=tms.build_tms,
        train=tms.train_tms,
        data=lambda c: tms.SparseFeatureData(c.n_features, c.feature_probability),
        feature_module="linear1",
        architecture=("n_features", "n_hidden", "n_hidden_layers"),
    ),
    "resid_mlp": TargetKind(
        build=resid_mlp.build_resid_mlp,
        train=resid_mlp.train_resid_mlp,
        data=resid_mlp.data_source,
        feature_module=None,
        architecture=("n_features", "d_resid", "n_layers", "d_mlp"),
    ),
    "induction": TargetKind(
        build=transformer.build_induction,
        train=transformer.train_induction,
        data=lambda c: transformer.RepeatedTokens(c.vocab_size, c.seq_len),
        feature_module=None,
        architecture=("vocab_size", "seq_len", "d_model", "n_layers", "n_heads"),
        decoder=lambda c: lambda ids: " ".join(str(i) for i in ids),
        encoder=lambda c: lambda text: transformer.parse_token_ids(text, c.vocab_size),
    ),
    "tiny_lm": TargetKind(
        build=transformer.build_tiny_lm,
        train=transformer.train_tiny_lm,
        data=lambda c: transformer.CharCorpus(c.seq_len),
        feature_module=None,
        architecture=("seq_len", "d_model", "n_layers", "n_heads", "d_mlp"),
        decoder=lambda c: transformer.CharCorpus.decode,
        encoder=lambda c: transformer.CharCorpus.encode,
    ),
    "hf": TargetKind(
        build=hf.build_hf,
        train=hf.train_hf,
        data=hf.hf_data,
        feature_module=None,
        architecture=("hf_config",),
        decoder=hf.hf_decoder,
        encoder=hf.hf_encoder,
    ),
    "python": TargetKind(
        build=python.build_python,
        train=python.train_python,
        data=python.python_data,
        feature_module=None,
        architecture=("factory", "factory_kwargs"),
    ),
}


def target_kind(config: TargetConfig) -> TargetKind:
    return TARGET_KINDS[config.kind]


def reports_lm(config: TargetConfig | None) -> bool:
    """Does the target map token ids to next-token logits (the CE / KL report applies)?"""
    if config is None:
        return False
    if config.kind in ("induction", "tiny_lm"):
        return True
    if config.kind == "python":
        return config.lm
    if config.kind == "hf":
        return config.output in (None, "logits") and hf.is_causal_lm(
            config.hf_config or hf.read_hf_config(config.path)
        )
    return False


def data_source(config: SPDConfig) -> DataSource:
    return target_kind(config.target).data(config.target)


def eval_data_source(config: SPDConfig, data: DataSource | None = None) -> DataSource:
    """What the evaluation draws from (`data`, else the config target's): the corpus's
    held-out part where it has one."""
    source = data if data is not None else data_source(config)
    return getattr(source, "heldout", None) or source
