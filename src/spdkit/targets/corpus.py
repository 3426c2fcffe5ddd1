"""Corpora on disk for language-model targets (`target.data: {path, format, field, ...}`).

Text (`.txt` files, a JSON-lines field, a Parquet column, a column of a folder written by
`datasets`' `save_to_disk`) is tokenised once by the model's tokenizer, document by document,
into a uint32 token file in the cache, and read back through a memmap. `.npy` and raw `.bin`
token files are read in place. Either way a run reads only the windows it samples, so a corpus
larger than memory works. The last `heldout_frac` of the token stream is the evaluation split.

The cache is keyed by the tokenizer's files and the corpus files' paths, sizes and
modification times: a changed file or tokenizer is a new entry, and runs of a sweep share one.
It lives in $SPDKIT_TOKEN_CACHE, else $XDG_CACHE_HOME/spdkit/tokens (~/.cache by default).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from spdkit.config import CorpusConfig
from spdkit.progress import progress_bar

SUFFIX_FORMATS = {
    ".txt": "text",
    ".jsonl": "jsonl",
    ".parquet": "parquet",
    ".npy": "npy",
    ".bin": "bin",
}
TOKEN_FORMATS = ("npy", "bin")
log = logging.getLogger(__name__)
TOKENIZE_BATCH = 256  # documents per tokenizer call


def cache_root() -> Path:
    """$SPDKIT_TOKEN_CACHE, else $XDG_CACHE_HOME/spdkit/tokens (~/.cache by default)."""
    if os.environ.get("SPDKIT_TOKEN_CACHE"):
        return Path(os.environ["SPDKIT_TOKEN_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "spdkit" / "tokens"


HUB_PREFIX = "hf:"


def hub_dataset(path: str) -> tuple[Path, str | None, str]:
    """`hf:org/name[@revision][:config][:split]` → (its snapshot folder in the local Hugging
    Face cache, config, split (default train)), as huggingface_hub lays the cache out; nothing
    is downloaded. A missing id is one line saying how to fetch it."""
    spec = path.removeprefix(HUB_PREFIX)
    repo, _, rest = spec.partition(":")
    config, _, split = rest.partition(":")
    repo_id, _, revision = repo.partition("@")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise ImportError(
            "a Hub dataset id needs huggingface_hub: pip install -c constraints.txt -e '.[hf]'"
        ) from None
    try:
        folder = snapshot_download(
            repo_id, repo_type="dataset", revision=revision or None, local_files_only=True
        )
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"target.data.path {path}: not in the Hugging Face cache; spdkit never downloads: "
            f"fetch it once with `hf download {repo_id} --repo-type dataset`"
        ) from None
    return Path(folder), config or None, split or "train"


def corpus_format(config: CorpusConfig) -> str:
    """The configured format, or the one the path's suffix (a folder: its files') names."""
    if config.format != "auto":
        return config.format
    if config.path.startswith(HUB_PREFIX):
        return "hf_hub"
    path = Path(config.path)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            return "hf_dataset"
        found = {SUFFIX_FORMATS[p.suffix] for p in path.rglob("*") if p.suffix in SUFFIX_FORMATS}
        if len(found) != 1:
            what = "no corpus files" if not found else f"files of several formats {sorted(found)}"
            raise ValueError(
                f"target.data.path {path} holds {what}; set target.data.format "
                f"(one of {', '.join(sorted(set(SUFFIX_FORMATS.values())))} or hf_dataset)"
            )
        return found.pop()
    if not path.exists():
        raise FileNotFoundError(f"target.data.path {path} does not exist")
    if path.suffix not in SUFFIX_FORMATS:
        raise ValueError(
            f"target.data.path {path}: cannot tell the format from {path.suffix!r}; set "
            f"target.data.format (suffixes read: {', '.join(SUFFIX_FORMATS)})"
        )
    return SUFFIX_FORMATS[path.suffix]


def corpus_files(config: CorpusConfig, fmt: str) -> list[Path]:
    """The files of the corpus in a fixed (sorted) order; a folder is searched recursively."""
    if fmt == "hf_hub":
        return [hub_dataset(config.path)[0]]
    path = Path(config.path)
    if not path.exists():
        raise FileNotFoundError(f"target.data.path {path} does not exist")
    if fmt == "hf_dataset" or path.is_file():
        return [path]
    suffixes = [s for s, f in SUFFIX_FORMATS.items() if f == fmt]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
    if not files:
        raise ValueError(f"target.data.path {path} has no {'/'.join(suffixes)} files")
    return files


# --- documents --------------------------------------------------------------------------------
def documents(config: CorpusConfig, fmt: str, files: list[Path]) -> Iterator[str]:
    """The corpus's text documents, streamed (never the whole corpus in memory)."""
    readers = {"text": _text_docs, "jsonl": _jsonl_docs, "parquet": _parquet_docs}
    if fmt == "hf_dataset":
        yield from _dataset_docs(files[0], config.field)
        return
    if fmt == "hf_hub":
        _, name, split = hub_dataset(config.path)
        yield from _hub_docs(files[0], name, split, config.field)
        return
    for file in files:
        yield from readers[fmt](file, config.field)


def _text_docs(file: Path, field: str) -> Iterator[str]:  # noqa: ARG001
    with file.open(encoding="utf-8", errors="replace") as f:
        yield f.read()


def _jsonl_docs(file: Path, field: str) -> Iterator[str]:
    with file.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{file}:{n}: not a JSON line ({err})") from None
            if not isinstance(record, dict) or field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(
                    f"{file}:{n}: no field {field!r} (has {keys}); set target.data.field"
                )
            yield str(record[field])


def _parquet_docs(file: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(file)
    if field not in table.schema_arrow.names:
        raise ValueError(
            f"{file}: no column {field!r} (has {table.schema_arrow.names}); set target.data.field"
        )
    for batch in table.iter_batches(columns=[field], batch_size=1024):
        yield from (str(v) for v in batch.column(0).to_pylist() if v is not None)


def _dataset_docs(folder: Path, field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "a datasets folder needs `datasets`: pip install -c constraints.txt -e '.[hf]'"
        ) from None
    ds = datasets.load_from_disk(str(folder))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{folder}: a DatasetDict without a 'train' split ({list(ds)})")
        ds = ds["train"]
    if field not in ds.column_names:
        raise ValueError(f"{folder}: no column {field!r} (has {ds.column_names})")
    for batch in ds.iter(batch_size=1024):
        yield from (str(v) for v in batch[field] if v is not None)


def _hub_docs(folder: Path, name: str | None, split: str, field: str) -> Iterator[str]:
    """A Hub dataset's snapshot read by `datasets` as a local folder (offline: its files are
    all there), the given config and split."""
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "a Hub dataset id needs `datasets`: pip install -c constraints.txt -e '.[hf]'"
        ) from None
    try:
        ds = datasets.load_dataset(str(folder), name=name, split=split)
    except ValueError as err:  # an unknown split or config
        raise ValueError(f"{folder}: {str(err).splitlines()[0]}") from None
    if field not in ds.column_names:
        raise ValueError(f"{folder}: no column {field!r} (has {ds.column_names})")
    for batch in ds.iter(batch_size=1024):
        yield from (str(v) for v in batch[field] if v is not None)


# --- tokens -----------------------------------------------------------------------------------
def cache_key(config: CorpusConfig, fmt: str, files: list[Path], tokenizer_dir: Path) -> str:
    """Hash of what the token file depends on: the tokenizer's files (contents), the corpus
    files (paths, sizes, mtimes; a dataset folder: its files) and the reading options."""
    digest = hashlib.sha256()
    for file in sorted(tokenizer_dir.glob("*token*")) + sorted(tokenizer_dir.glob("*.model")):
        if file.is_file():
            digest.update(file.name.encode() + file.read_bytes())
    for file in files:
        parts = sorted(file.rglob("*")) if file.is_dir() else [file]
        for part in (p for p in parts if p.is_file()):
            st = part.stat()
            digest.update(f"{part.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    digest.update(f"{fmt}|{config.field}|{config.append_eos}|{config.path}".encode())
    return digest.hexdigest()[:16]


def tokenize_corpus(
    config: CorpusConfig, tokenizer: Any, tokenizer_dir: Path, progress: bool = False
) -> np.ndarray:
    """The corpus's token stream (uint32, memmapped), tokenised on first use and cached (a bar
    while it tokenises when `progress`)."""
    fmt = corpus_format(config)
    files = corpus_files(config, fmt)
    out = cache_root() / f"{cache_key(config, fmt, files, tokenizer_dir)}.u32"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        eos = [tokenizer.eos_token_id] if config.append_eos and tokenizer.eos_token_id else []
        n = 0
        size = sum(p.stat().st_size for p in files if p.is_file())
        log.info(
            "tokenising %s (%d file(s), %.1f MB) once; cached in %s",
            config.path,
            len(files),
            size / 1e6,
            out.parent,
        )
        with (
            tmp.open("wb") as f,
            # characters, not documents: a text file is one document, so a count of documents
            # would sit at 0 until the end
            progress_bar(
                None, "tokenising", progress, unit=" chars", unit_scale=True, leave=False
            ) as bar,
        ):
            for batch in _batched(documents(config, fmt, files), TOKENIZE_BATCH):
                # verbose=False: a document longer than the model's context is expected here (the
                # stream is cut into windows later), so transformers' warning about it is noise
                ids = tokenizer(batch, return_attention_mask=False, verbose=False)["input_ids"]
                for doc in ids:
                    arr = np.asarray(doc + eos, dtype=np.uint32)
                    f.write(arr.tobytes())
                    n += arr.size
                bar.update(sum(len(d) for d in batch))
        if n == 0:
            tmp.unlink()
            raise ValueError(f"target.data.path {config.path}: the corpus has no text")
        os.replace(tmp, out)  # atomic: a killed tokenisation leaves no half file behind
    return np.memmap(out, dtype=np.uint32, mode="r")


def _batched(items: Iterator[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def token_file(config: CorpusConfig, fmt: str) -> np.ndarray:
    """A pre-tokenised corpus read in place: `.npy` (1-D integer array) or raw `.bin`."""
    files = corpus_files(config, fmt)
    if len(files) != 1:
        raise ValueError(
            f"target.data.path {config.path}: one token file expected, found {len(files)}"
        )
    if fmt == "npy":
        tokens = np.load(files[0], mmap_mode="r")
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(
                f"{files[0]}: a 1-D integer token array expected, got {tokens.dtype} "
                f"{list(tokens.shape)}"
            )
        return tokens
    if files[0].stat().st_size == 0:
        raise ValueError(f"{files[0]}: empty token file")
    return np.memmap(files[0], dtype=np.dtype(config.token_dtype), mode="r")


def check_vocab(tokens: np.ndarray, vocab_size: int, where: str) -> None:
    """Every id must be a row of the model's embedding: a larger one means another tokenizer."""
    chunk = 1 << 24
    top = max(int(tokens[i : i + chunk].max()) for i in range(0, tokens.size, chunk))
    if top >= vocab_size:
        raise ValueError(
            f"{where}: token id {top} >= the model's vocab_size {vocab_size}: tokenised with "
            "another tokenizer?"
        )


def corpus_tokens(
    config: CorpusConfig,
    model_dir: Path,
    vocab_size: int,
    tokenizer: Callable[[], Any],
    progress: bool = False,
) -> np.ndarray:
    """The corpus as one 1-D token stream (memmapped), checked against the model's vocab.
    `tokenizer()` gives the model's tokenizer (asked for only when there is text to tokenise);
    `progress`: a bar while a text corpus is tokenised (its first use only)."""
    fmt = corpus_format(config)
    if fmt in TOKEN_FORMATS:
        tokens = token_file(config, fmt)
    else:
        tokenizer = tokenizer()
        if len(tokenizer) > vocab_size:
            raise ValueError(
                f"the tokenizer in {model_dir} has {len(tokenizer)} tokens, the model's "
                f"vocab_size is {vocab_size}: they do not belong together"
            )
        tokens = tokenize_corpus(config, tokenizer, model_dir, progress)
    check_vocab(tokens, vocab_size, config.path)
    return tokens


def split(tokens: np.ndarray, heldout_frac: float, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out): the last max(seq_len + 1, heldout_frac · n) tokens are held out;
    each part must hold at least one window of seq_len + 1 tokens."""
    n_held = max(seq_len + 1, int(heldout_frac * tokens.size))
    if tokens.size - n_held <= seq_len:
        raise ValueError(
            f"the corpus has {tokens.size} tokens: too few for windows of {seq_len} in both the "
            f"training part and the held-out {heldout_frac:.0%}"
        )
    return tokens[: tokens.size - n_held], tokens[tokens.size - n_held :]
