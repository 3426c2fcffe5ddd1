"""Hugging Face `transformers` models as targets, and token data sources for language models.

Nothing here reaches the network: models load from a local directory or, for a Hub id, from
the local Hugging Face cache only (`local_files_only=True`), and `transformers` is imported only when a model is loaded
(install it with `pip install -c constraints.txt -e '.[hf]'`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from spdkit.config import CorpusConfig, HFTargetConfig
from spdkit.targets import corpus
from spdkit.targets.text import TokenWindows, corpus_text

CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def model_class(hf_config: dict[str, Any]) -> type:
    """The transformers class config.json's `architectures` names (what save_pretrained
    wrote: GPT2LMHeadModel, BertModel, BertForMaskedLM, ...), else AutoModelForCausalLM."""
    tf = _transformers()
    for name in hf_config.get("architectures") or []:
        cls = getattr(tf, name, None)
        if cls is not None:
            return cls
    return tf.AutoModelForCausalLM


def is_causal_lm(hf_config: dict[str, Any]) -> bool:
    """Next-token logits (the CE / KL report applies), by the class name's convention."""
    return model_class(hf_config).__name__.endswith(CAUSAL_LM_SUFFIXES) or (
        model_class(hf_config).__name__ == "AutoModelForCausalLM"
    )


def load_hf_model(path: str | Path) -> nn.Module:
    """The model of a local `transformers` directory (config.json + weights), as the class
    its config names."""
    cls = model_class(read_hf_config(path))
    model = cls.from_pretrained(str(model_dir(path)), local_files_only=True)
    return _without_cache(model).eval()


def _without_cache(model: nn.Module) -> nn.Module:
    """SPD never generates: a key-value cache would only hold every layer's keys and values
    for nothing in each pass."""
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError(
            "a Hugging Face target needs transformers: pip install -c constraints.txt -e '.[hf]'"
        ) from None
    return transformers


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(@[\w./-]+)?$")  # org/name[@revision]


@cache
def model_dir(path: str | Path) -> Path:
    """The local directory of a model: `path` itself, or for a Hub id `org/name[@revision]`
    its snapshot in the local Hugging Face cache (`HF_HOME` / `HF_HUB_CACHE`), as
    `huggingface_hub` lays it out; nothing is downloaded (offline mode works). A missing id
    is one line saying how to fetch it."""
    local = Path(path)
    if local.is_dir() or not HUB_ID.match(str(path)):
        return local
    repo_id, _, revision = str(path).partition("@")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision or None, local_files_only=True))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{path} is neither a local directory nor in the Hugging Face cache; spdkit never "
            f"downloads: fetch it once with `hf download {repo_id}"
            + (f" --revision {revision}`" if revision else "`")
            + " (or point HF_HOME at a cache that has it)"
        ) from None


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def weights_hash(path: str | Path) -> str:
    """sha256 over the model directory's weight files (names and contents, sorted by name):
    what a run that references the weights checks before trusting them. Reads every byte
    once (a second or two per GB)."""
    folder = model_dir(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{path}: no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(folder)).encode())
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The model directory's config.json as a dict (what `HFTargetConfig.hf_config` records)."""
    file = model_dir(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"{path} is not a local transformers model directory (no config.json); spdkit never "
            "downloads models: save one with `model.save_pretrained(DIR)` first"
        )
    try:
        data = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ValueError(f"{file}: no `model_type`; not a transformers config")
    return data


def build_hf(config: HFTargetConfig) -> nn.Module:
    """The architecture of `config.hf_config` with fresh weights (the run's target.safetensors
    then fills them): a run directory rebuilds its model without the original directory."""
    data = dict(config.hf_config or read_hf_config(config.path))
    cls = model_class(data)
    hf_cfg = _transformers().AutoConfig.for_model(data.pop("model_type"), **data)
    model = cls.from_config(hf_cfg) if cls.__name__.startswith("Auto") else cls(hf_cfg)
    return _without_cache(model).eval()


def train_hf(
    config: HFTargetConfig, seed: int, device: str, progress: bool = False
) -> tuple[nn.Module, dict]:
    """Nothing to train: load the weights from the local directory."""
    model = load_hf_model(config.path).to(device)
    info = {"loaded_from": str(config.path), "model_type": model.config.model_type}
    if model_dir(config.path) != Path(config.path):  # a Hub id: the snapshot's commit
        info["revision"] = model_dir(config.path).name
    return model, info


def hf_data(config: HFTargetConfig) -> RandomTokens | TokenWindows:
    """Windows of the configured corpus (a held-out part for evaluation), the pydoc text, or
    random tokens."""
    vocab = int((config.hf_config or read_hf_config(config.path))["vocab_size"])
    if config.data == "random_tokens":
        return RandomTokens(vocab, config.seq_len)
    if isinstance(config.data, CorpusConfig):
        tokens = _corpus_tokens(config, config.data, vocab)
        train, held = corpus.split(tokens, config.data.heldout_frac, config.seq_len)
        return TokenWindows(train, config.seq_len, heldout=TokenWindows(held, config.seq_len))
    return TokenWindows(_pydoc_tokens(config.path), config.seq_len)


def prepare_hf_data(config: HFTargetConfig, progress: bool) -> None:
    """Tokenise the configured text corpus now (once: it is cached on disk), with a bar when
    `progress`: a run asks for its data here, before `hf_data`, so that `--quiet` holds."""
    if isinstance(config.data, CorpusConfig):
        vocab = int((config.hf_config or read_hf_config(config.path))["vocab_size"])
        _corpus_tokens(config, config.data, vocab, progress)


def _corpus_tokens(
    config: HFTargetConfig, data: CorpusConfig, vocab: int, progress: bool = False
) -> np.ndarray:
    return corpus.corpus_tokens(
        data, model_dir(config.path), vocab, lambda: tokenizer(config.path), progress
    )


@cache
def tokenizer(path: str):  # noqa: ANN201 (a transformers tokenizer)
    """The tokenizer saved in a local model directory (or Hub snapshot); one line if none."""
    try:
        return _transformers().AutoTokenizer.from_pretrained(
            str(model_dir(path)), local_files_only=True
        )
    except (OSError, ValueError) as err:
        raise ValueError(
            f"target.data is text but {path} has no usable tokenizer ({err}); save one there "
            "with `tokenizer.save_pretrained(DIR)`, or use pre-tokenised data (.npy / .bin)"
        ) from None


@cache
def _pydoc_tokens(path: str) -> Tensor:
    text = corpus_text()
    ids = tokenizer(path)(text, return_attention_mask=False)["input_ids"]
    if len(ids) < len(text) // 20:
        raise ValueError(
            f"the tokenizer in {path} turned {len(text)} characters of pydoc text into "
            f"{len(ids)} tokens: not a usable tokenizer (use target.data=random_tokens)"
        )
    return torch.tensor(ids, dtype=torch.long)


def hf_decoder(config: HFTargetConfig) -> Callable[[list[int]], str] | None:
    """Token ids to text with the directory's tokenizer; None (no context tables) without one."""
    if config.data == "random_tokens":
        return None
    try:
        tok = tokenizer(config.path)
    except ValueError:  # token files need no tokenizer, but tables need one
        return None
    return lambda ids: tok.decode(ids).replace("\n", "⏎")


def hf_encoder(config: HFTargetConfig) -> Callable[[str], list[int]] | None:
    """Text to token ids with the directory's tokenizer; None without one."""
    try:
        tok = tokenizer(config.path)
    except ValueError:
        return None
    return lambda text: tok(text, return_attention_mask=False)["input_ids"]


@dataclass(frozen=True)
class RandomTokens:
    """Uniformly random token ids [batch, seq_len]: enough to exercise a model's parameters
    (tests, smoke runs); use `TokenWindows` on real text for real decompositions."""

    vocab_size: int
    seq_len: int

    def sample(self, batch_size: int, generator: torch.Generator) -> Tensor:
        return torch.randint(
            0,
            self.vocab_size,
            (batch_size, self.seq_len),
            generator=generator,
            device=generator.device,
        )
