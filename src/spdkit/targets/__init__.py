"""Target kinds (`target.kind`): how to build, train and sample each, and what each adds to a
decomposition's evaluation (`TargetKind`; the registry `TARGET_KINDS`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from spdkit.config import SPDConfig, TargetConfig
from spdkit.errors import ConfigError
from spdkit.method.model import ComponentModel
from spdkit.targets import (
    hf,
    planted,
    python,
    resid_mlp,
    resid_mlp_analysis,
    tms,
    tms_analysis,
    transformer,
)


class DataSource(Protocol):
    """Batches drawn from an explicit generator, so a run's data is fixed by its seed and a
    resumed run draws exactly the batches the uninterrupted one would."""

    def sample(self, batch_size: int, generator: torch.Generator) -> Tensor: ...


@dataclass(frozen=True)
class KnownMechanisms:
    """A target's ground-truth mechanisms, for scoring a clustering
    (`spdkit.analysis.mechanisms.ground_truth`): one per input feature, made of the
    subcomponents `feature_owners` gives that feature alone; with `dense_module`, one more made
    of the subcomponents of modules named `*<dense_module>` that respond to at least
    `dense_fraction` of the features (the residual MLPs' W_out)."""

    feature_owners: Callable[[ComponentModel, SPDConfig], dict[str, list[list[int]]]]
    dense_module: str | None = None
    dense_fraction: float = 0.25
    # modules of the target itself that are identities (TMS +ID's hidden layers): with the
    # identities inserted by `insert_identity`, their live subcomponents are one mechanism
    identity_prefix: str | None = None
    # the true decomposition, (U [d_out, k], V [k, d_in]) per module: where training can be
    # started to test whether the objective keeps it (`ground_truth.start_at_truth`)
    true_components: Callable[[ComponentModel], dict[str, tuple[Tensor, Tensor]]] | None = None


Report = Callable[[ComponentModel, SPDConfig, "dict[str, Tensor] | None", Path], dict[str, Any]]


@dataclass(frozen=True)
class TargetKind:
    """Everything spdkit knows of one `target.kind`, in one place: how to build, train and
    sample it, and what it adds to a decomposition's evaluation."""

    build: Callable[[Any], nn.Module]
    train: Callable[..., tuple[nn.Module, dict]]  # (config, seed, device, progress=False)
    data: Callable[[Any], DataSource]
    # config fields that fix the architecture: a saved target must agree on all of them
    architecture: tuple[str, ...]
    # config -> (token ids -> readable text), for language-model targets (top contexts)
    decoder: Callable[[Any], Callable[[list[int]], str] | None] | None = None
    # config -> (text -> token ids), for typing a prompt (`spdkit serve`)
    encoder: Callable[[Any], Callable[[str], list[int]] | None] | None = None
    # config -> does it map token ids to next-token logits (the LM report applies)?
    is_lm: Callable[[Any], bool] = lambda config: False
    # its own part of summary.json and figures/ (model, config, CI on one-hot inputs, fig dir)
    report: Report | None = None
    # its known mechanisms, for scoring clusters
    mechanisms: KnownMechanisms | None = None
    # CI-on-one-hot figure: every column, modules in pairs (W_in | W_out per layer)
    one_hot_all_columns: bool = False
    # a target loaded from disk or code (not trained here): `spdkit plan` may load it
    loaded: bool = False
    # LMs with planted mechanisms: (config, n, seed, device) -> {group: (ids [n, T], scored
    # [n, T] bool)}, the positions each mechanism decides (`spdkit ablate` scores per group)
    position_groups: Callable[..., dict[str, tuple[Tensor, Tensor]]] | None = None
    # (config, group) -> the group's CE for a model that does not know its rule (chance)
    chance_ce: Callable[[Any, str], float] | None = None
    # (config, progress) -> None: fill the data's disk caches (tokenise a corpus) with a bar,
    # before `data` is first called; called only when a run shows progress (so `--quiet` holds)
    prepare_data: Callable[[Any, bool], None] | None = None


TARGET_KINDS: dict[str, TargetKind] = {
    "tms": TargetKind(
        build=tms.build_tms,
        train=tms.train_tms,
        data=lambda c: tms.SparseFeatureData(c.n_features, c.feature_probability),
        architecture=("n_features", "n_hidden", "n_hidden_layers"),
        report=tms_analysis.report,
        mechanisms=KnownMechanisms(
            tms_analysis.feature_owners,
            identity_prefix="hidden_layers.",
            true_components=tms_analysis.true_components,
        ),
    ),
    "resid_mlp": TargetKind(
        build=resid_mlp.build_resid_mlp,
        train=resid_mlp.train_resid_mlp,
        data=resid_mlp.data_source,
        architecture=("n_features", "d_resid", "n_layers", "d_mlp"),
        report=resid_mlp_analysis.report,
        mechanisms=KnownMechanisms(
            resid_mlp_analysis.feature_owners,
            dense_module="mlp_out",
            dense_fraction=resid_mlp_analysis.ResidVerdictRules().dense_fraction,
            true_components=resid_mlp_analysis.true_components,
        ),
        one_hot_all_columns=True,
    ),
    "induction": TargetKind(
        build=transformer.build_induction,
        train=transformer.train_induction,
        data=lambda c: transformer.RepeatedTokens(c.vocab_size, c.seq_len, c.repeat),
        architecture=("vocab_size", "seq_len", "d_model", "n_layers", "n_heads"),
        decoder=lambda c: lambda ids: " ".join(str(i) for i in ids),
        encoder=lambda c: lambda text: transformer.parse_token_ids(text, c.vocab_size),
        is_lm=lambda c: True,
    ),
    "tiny_lm": TargetKind(
        build=transformer.build_tiny_lm,
        train=transformer.train_tiny_lm,
        data=lambda c: transformer.CharCorpus(c.seq_len),
        architecture=("seq_len", "d_model", "n_layers", "n_heads", "d_mlp"),
        decoder=lambda c: transformer.CharCorpus.decode,
        encoder=lambda c: transformer.CharCorpus.encode,
        is_lm=lambda c: True,
    ),
    "planted_lm": TargetKind(
        build=planted.build_planted_lm,
        train=planted.train_planted_lm,
        data=planted.PlantedTasks,
        # what the weights were trained on belongs here too: a target of other tasks is refused
        architecture=(
            "n_tokens",
            "seq_len",
            "d_model",
            "n_layers",
            "n_heads",
            "d_mlp",
            "tasks",
            "induction_repeat",
            "copy_offset",
            "sum_modulus",
            "table_seed",
        ),  # fmt: skip
        decoder=lambda c: lambda ids: planted.decode(c, ids),
        encoder=lambda c: lambda text: planted.encode(c, text),
        is_lm=lambda c: True,
        report=planted.report,
        position_groups=planted.eval_task_batches,
        chance_ce=planted.chance_ce,
    ),
    "hf": TargetKind(
        build=hf.build_hf,
        train=hf.train_hf,
        data=hf.hf_data,
        prepare_data=hf.prepare_hf_data,
        architecture=("hf_config",),
        decoder=hf.hf_decoder,
        encoder=hf.hf_encoder,
        is_lm=lambda c: (
            c.output in (None, "logits")
            and hf.is_causal_lm(c.hf_config or hf.read_hf_config(c.path))
        ),
        loaded=True,
    ),
    "python": TargetKind(
        build=python.build_python,
        train=python.train_python,
        data=python.python_data,
        architecture=("factory", "factory_kwargs"),
        is_lm=lambda c: c.lm,
        loaded=True,
    ),
}


def target_kind(config: TargetConfig) -> TargetKind:
    return TARGET_KINDS[config.kind]


def reports_lm(config: TargetConfig | None) -> bool:
    """Does the target map token ids to next-token logits (the CE / KL report applies)?"""
    return config is not None and target_kind(config).is_lm(config)


def data_source(config: SPDConfig, progress: bool = False) -> DataSource:
    """The data of the config's bundled target; a run of the user's own model keeps none.
    `progress`: a bar while its caches are first filled (a corpus tokenised)."""
    if config.target is None:
        raise ConfigError(
            "this decomposition is of your own model, whose data spdkit does not keep: pass it "
            "(spdkit.load(run_dir, target=model, data=data); the CLI: --data-factory)"
        )
    kind = target_kind(config.target)
    if progress and kind.prepare_data is not None:  # else `data` fills the caches silently
        kind.prepare_data(config.target, progress)
    return kind.data(config.target)


def eval_data_source(config: SPDConfig, data: DataSource | None = None) -> DataSource:
    """What the evaluation draws from (`data`, else the config target's): the corpus's
    held-out part where it has one."""
    source = data if data is not None else data_source(config)
    return getattr(source, "heldout", None) or source
