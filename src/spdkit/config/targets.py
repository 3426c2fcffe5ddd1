"""Target sections of a config (`target.kind` picks one): which model to train or load."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from spdkit.config.base import StrictModel


class TMSTargetConfig(StrictModel):
    """Toy Model of Superposition x̂ = ReLU(Wᵀ [I] W x + b), trained in-process (paper appendix)."""

    kind: Literal["tms"] = "tms"
    n_features: int = Field(ge=1, description="number of input features (m2)")
    n_hidden: int = Field(ge=1, description="width of the bottleneck (m1)")
    n_hidden_layers: int = Field(
        default=0,
        ge=0,
        description="fixed identity matrices between W and Wᵀ (0 or 1 in the paper)",
    )
    feature_probability: float = Field(
        default=0.05, gt=0, le=1, description="probability that a feature is active"
    )
    train_steps: int = Field(default=10_000, ge=1, description="target training steps")
    train_batch_size: int = Field(default=1024, ge=1, description="target training batch size")
    train_lr: float = Field(default=5e-3, gt=0, description="target AdamW learning rate")
    train_weight_decay: float = Field(default=0.01, ge=0, description="target AdamW weight decay")
    max_train_attempts: int = Field(
        default=5, ge=1, description="seeds tried until every feature is represented"
    )

    def describe(self) -> str:
        ident = "+ID" * self.n_hidden_layers
        return f"tms {self.n_features}-{self.n_hidden}{ident}"


class ResidMLPTargetConfig(StrictModel):
    """Residual MLP computing y_i = x_i + ReLU(x_i) in superposition (paper: compressed computation
    and cross-layer distributed representations): r = W_E x, r += W_out ReLU(W_in r) per layer,
    output W_Eᵀ r, with a fixed random embedding of unit-norm rows."""

    kind: Literal["resid_mlp"] = "resid_mlp"
    n_features: int = Field(ge=1, description="number of input features")
    d_resid: int = Field(default=1000, ge=1, description="residual stream width (d_resid)")
    n_layers: int = Field(ge=1, description="number of residual MLP blocks")
    d_mlp: int = Field(ge=1, description="ReLU neurons per block (d_mlp / n_layers in the paper)")
    feature_probability: float = Field(
        default=0.01, gt=0, le=1, description="probability that a feature is active"
    )
    train_steps: int = Field(default=10_000, ge=1, description="target training steps")
    train_batch_size: int = Field(default=2048, ge=1, description="target training batch size")
    train_lr: float = Field(
        default=3e-3, gt=0, description="target AdamW max learning rate (cosine decay)"
    )
    train_weight_decay: float = Field(default=0.01, ge=0, description="target AdamW weight decay")

    def describe(self) -> str:
        return f"resid_mlp {self.n_features} features, {self.n_layers}x{self.d_mlp} neurons"


class _TransformerTraining(StrictModel):
    train_steps: int = Field(ge=1, description="target training steps")
    train_batch_size: int = Field(default=64, ge=1, description="target training batch size")
    train_lr: float = Field(
        default=3e-3, gt=0, description="target AdamW max lr (5% warm-up, cosine decay)"
    )
    train_weight_decay: float = Field(default=0.01, ge=0, description="target AdamW weight decay")


class InductionTargetConfig(_TransformerTraining):
    """Attention-only transformer trained on sequences that repeat their first part (the second
    half, or a random-length first occurrence: `repeat`), until it predicts the repeat
    (in-context loss on it near 0)."""

    kind: Literal["induction"] = "induction"
    vocab_size: int = Field(default=128, ge=2, description="token vocabulary")
    seq_len: int = Field(default=64, ge=4, description="sequence length")
    d_model: int = Field(default=32, ge=1, description="residual width")
    n_layers: int = Field(default=2, ge=1, description="attention layers")
    n_heads: int = Field(default=1, ge=1, description="heads per layer")
    repeat: Literal["fixed", "random"] = Field(
        default="fixed",
        description="the repeat starts halfway (fixed: one layer-1 head attending half a "
        "sequence back solves it by position, measured: docs/mechanisms_lm.md) or after a "
        "random-length first occurrence (random: only induction solves it)",
    )

    def describe(self) -> str:
        return f"induction {self.n_layers}L attn-only d{self.d_model} vocab {self.vocab_size}"


class TinyLMTargetConfig(_TransformerTraining):
    """Char-level GPT-style LM (LayerNorm, GELU MLPs) trained on the pydoc topic text that
    ships with Python (no download)."""

    kind: Literal["tiny_lm"] = "tiny_lm"
    seq_len: int = Field(default=64, ge=4, description="context length in characters")
    d_model: int = Field(default=64, ge=1, le=128, description="residual width")
    n_layers: int = Field(default=2, ge=1, le=2, description="transformer blocks")
    n_heads: int = Field(default=4, ge=1, description="heads per layer")
    d_mlp: int = Field(default=256, ge=1, description="MLP hidden width")

    def describe(self) -> str:
        return f"tiny_lm {self.n_layers}L d{self.d_model} char-level"


PLANTED_TASKS = ("induction", "lookup", "copy", "sum")


class PlantedLMTargetConfig(_TransformerTraining):
    """A small transformer (LayerNorm, GELU MLPs) trained on a mixture of synthetic tasks whose
    mechanisms are known (`spdkit.targets.planted`): a task token starts each sequence, and each
    task scores its own positions. Built to check that a decomposition finds mechanisms."""

    kind: Literal["planted_lm"] = "planted_lm"
    n_tokens: int = Field(default=48, ge=8, description="content tokens (task tokens come after)")
    seq_len: int = Field(default=33, ge=8, description="tokens per sequence, task token included")
    d_model: int = Field(default=64, ge=1, description="residual width")
    n_layers: int = Field(default=2, ge=2, description="transformer blocks (induction needs 2)")
    n_heads: int = Field(default=4, ge=1, description="heads per layer")
    d_mlp: int = Field(default=256, ge=1, description="MLP hidden width")
    tasks: list[Literal["induction", "lookup", "copy", "sum"]] = Field(
        default_factory=lambda: list(PLANTED_TASKS),
        min_length=1,
        description="the tasks mixed in training, in task-token order: induction, lookup, "
        "copy, sum",
    )
    induction_repeat: Literal["fixed", "random"] = Field(
        default="fixed",
        description="induction task: the repeat starts halfway (fixed: a positional head that "
        "looks half a sequence back also solves it) or after a random-length first occurrence "
        "(random: only induction solves it)",
    )
    copy_offset: int = Field(
        default=3, ge=1, description="copy task: a token repeats the one this many back (odd)"
    )
    sum_modulus: int = Field(
        default=7, ge=2, description="sum task: s = (a + b) mod this, a and b below it"
    )
    table_seed: int = Field(
        default=0, description="seed of the lookup task's fixed random map (not the run seed)"
    )

    @model_validator(mode="after")
    def _check(self) -> PlantedLMTargetConfig:
        if self.copy_offset % 2 == 0:
            raise ValueError(f"copy_offset must be odd (got {self.copy_offset})")
        if self.sum_modulus > self.n_tokens:
            raise ValueError(f"sum_modulus {self.sum_modulus} exceeds n_tokens {self.n_tokens}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks repeat a name: {self.tasks}")
        return self

    def describe(self) -> str:
        return f"planted_lm {self.n_layers}L d{self.d_model} tasks {'+'.join(self.tasks)}"


class CorpusConfig(StrictModel):
    """A corpus on disk for a language-model target (`target.data`), read in the format its
    files name (or `format`): text is tokenised once by the model's tokenizer and cached;
    token files are read in place through a memmap, so a corpus larger than memory works.
    The last `heldout_frac` of the token stream is held out for the evaluation."""

    path: str = Field(
        min_length=1,
        description="a file, a folder of files of one format, or a Hub dataset id "
        "hf:org/name[:config][:split] from the local Hugging Face cache",
    )
    format: Literal["auto", "text", "jsonl", "parquet", "hf_dataset", "hf_hub", "npy", "bin"] = (
        Field(
            default="auto",
            description="auto: from the suffix (.txt, .jsonl, .parquet, .npy, .bin), for a "
            "folder its files, hf: ids the Hub; hf_dataset: a folder written by datasets' "
            "save_to_disk; hf_hub: a Hub dataset id",
        )
    )
    field: str = Field(
        default="text", min_length=1, description="JSON-lines field / Parquet or dataset column"
    )
    token_dtype: Literal["uint16", "uint32"] = Field(
        default="uint16", description="element type of a raw .bin token file"
    )
    heldout_frac: float = Field(
        default=0.05, gt=0, lt=0.5, description="fraction of tokens (the last) held out for eval"
    )
    append_eos: bool = Field(
        default=True, description="end each text document with the tokenizer's EOS token"
    )


class HFTargetConfig(StrictModel):
    """A local Hugging Face `transformers` model (`spdkit run CONFIG --target-hf DIR`): the
    class its config.json names (a causal LM, a masked LM, an encoder, ...).

    Nothing is trained or downloaded. The model's config.json is copied into `hf_config` when
    the run starts. Its weights are referenced, not copied: target.json records the path (or
    Hub id and revision) and a content hash of the weight files, checked whenever the run
    directory loads the model; `copy_weights: true` copies them into target.safetensors
    instead, so the run directory rebuilds the model without DIR (the model's size on disk).
    """

    kind: Literal["hf"] = "hf"
    path: str = Field(min_length=1, description="local transformers model directory")
    data: Literal["pydoc", "random_tokens"] | CorpusConfig = Field(
        default="pydoc",
        description="pydoc: the pydoc topic text shipped with Python, tokenised by DIR's "
        "tokenizer; random_tokens: uniform token ids (smoke tests); or a corpus section "
        "({path, format, field, ...})",
    )
    seq_len: int = Field(default=64, ge=2, description="tokens per sequence")
    copy_weights: bool = Field(
        default=False,
        description="copy the model's weights into the run directory (self-contained; the "
        "model's size on disk) instead of referring to them by path and content hash",
    )
    output: str | None = Field(
        default=None,
        min_length=1,
        description="the output field D compares, e.g. last_hidden_state for an encoder "
        "(use output_loss: mse); default: logits",
    )
    hf_config: dict[str, Any] | None = Field(
        default=None, description="the model's config.json (filled in when the run starts)"
    )

    def describe(self) -> str:
        arch = (self.hf_config or {}).get("model_type", "?")
        return f"hf {arch} from {self.path}"


_DOTTED = r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$"


class PythonTargetConfig(StrictModel):
    """Your own model from Python factories (`spdkit run CONFIG --target-factory pkg.mod:fn`).

    `factory(**factory_kwargs)` returns the trained nn.Module (its weights are copied into
    target.safetensors; later loads call the factory for the architecture, then load them);
    `data_factory()` returns the data source: an object with `sample(batch_size, generator)`.
    Both are imported by name, so the package must be importable wherever the run is resumed.
    """

    kind: Literal["python"] = "python"
    factory: str = Field(pattern=_DOTTED, description="module.path:function returning the model")
    data_factory: str = Field(
        pattern=_DOTTED, description="module.path:function returning the data source"
    )
    factory_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of `factory`"
    )
    lm: bool = Field(
        default=False, description="the model maps token ids to logits (adds the CE / KL report)"
    )

    def describe(self) -> str:
        return f"python {self.factory}"


TargetConfig = Annotated[
    TMSTargetConfig
    | ResidMLPTargetConfig
    | InductionTargetConfig
    | TinyLMTargetConfig
    | PlantedLMTargetConfig
    | HFTargetConfig
    | PythonTargetConfig,
    Field(discriminator="kind"),
]
TARGET_CONFIGS: tuple[type[StrictModel], ...] = (
    TMSTargetConfig,
    ResidMLPTargetConfig,
    InductionTargetConfig,
    TinyLMTargetConfig,
    PlantedLMTargetConfig,
    HFTargetConfig,
    PythonTargetConfig,
)
TARGET_BY_KIND = {c.model_fields["kind"].default: c for c in TARGET_CONFIGS}
