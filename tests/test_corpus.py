"""Corpora on disk for language-model targets: every format gives the same tokens, the cache,
the held-out split, memmapped windows, and one-line errors."""

import json

import numpy as np
import pytest
import torch

from spdkit.config import CorpusConfig
from spdkit.targets import corpus
from spdkit.targets.text import TokenWindows
from tests.hf_models import SENTENCES, VOCAB, char_tokenizer

pytest.importorskip("transformers")

DOCS = SENTENCES * 3  # 12 documents


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPDKIT_TOKEN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    char_tokenizer().save_pretrained(path)
    return path


def write_corpus(root, fmt: str, docs=DOCS):
    """The same documents in each text format; returns the path to configure."""
    root.mkdir(parents=True, exist_ok=True)
    if fmt == "text":
        for i, doc in enumerate(docs):
            (root / f"doc{i:02d}.txt").write_text(doc)
        return root
    if fmt == "jsonl":
        path = root / "c.jsonl"
        path.write_text(
            "".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs))
        )
        return path
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = root / "c.parquet"
        pq.write_table(pa.table({"text": docs}), path, row_group_size=5)
        return path
    if fmt == "hf_dataset":
        import datasets

        datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(root / "ds"))
        return root / "ds"
    raise AssertionError(fmt)


def tokens_of(path, tokenizer_dir, **kw):
    from transformers import AutoTokenizer

    config = CorpusConfig(path=str(path), **kw)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return corpus.corpus_tokens(config, tokenizer_dir, VOCAB, lambda: tok)


def test_every_text_format_gives_the_same_token_stream(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    expected = np.concatenate([tok(d)["input_ids"] + [tok.eos_token_id] for d in DOCS])
    for fmt in ("text", "jsonl", "parquet", "hf_dataset"):
        path = write_corpus(tmp_path / fmt, fmt)
        assert corpus.corpus_format(CorpusConfig(path=str(path))) == fmt
        got = tokens_of(path, tokenizer_dir)
        assert got.dtype == np.uint32 and isinstance(got, np.memmap)
        np.testing.assert_array_equal(got, expected, err_msg=fmt)


def test_tokens_are_cached_and_a_changed_file_is_retokenised(tmp_path, tokenizer_dir, token_cache):
    path = write_corpus(tmp_path / "j", "jsonl")
    first = tokens_of(path, tokenizer_dir)
    assert len(list(token_cache.glob("*.u32"))) == 1
    again = tokens_of(path, tokenizer_dir)
    assert again.filename == first.filename  # read from the cache, not tokenised again
    write_corpus(tmp_path / "j", "jsonl", DOCS[:5])
    changed = tokens_of(path, tokenizer_dir)
    assert changed.filename != first.filename and changed.size < first.size


def test_token_files_are_read_in_place(tmp_path, tokenizer_dir):
    ids = np.arange(500) % VOCAB
    np.save(tmp_path / "t.npy", ids.astype(np.int32))
    ids.astype(np.uint16).tofile(tmp_path / "t16.bin")
    ids.astype(np.uint32).tofile(tmp_path / "t32.bin")
    np.testing.assert_array_equal(tokens_of(tmp_path / "t.npy", tokenizer_dir), ids)
    np.testing.assert_array_equal(tokens_of(tmp_path / "t16.bin", tokenizer_dir), ids)
    got = tokens_of(tmp_path / "t32.bin", tokenizer_dir, token_dtype="uint32")
    np.testing.assert_array_equal(got, ids)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: (p / "e.jsonl").write_text(""), "has no text"),
        (lambda p: (p / "e.jsonl").write_text('{"body": "x"}\n'), "no field 'text'"),
        (lambda p: (p / "e.jsonl").write_text("not json\n"), "not a JSON line"),
        (lambda p: np.save(p / "e.npy", np.array([1, VOCAB + 3])), f"token id {VOCAB + 3}"),
        (lambda p: (p / "e.bin").write_bytes(b""), "empty token file"),
        (lambda p: (p / "e.csv").write_text("a"), "cannot tell the format"),
    ],
)
def test_bad_corpora_are_one_line_errors(tmp_path, tokenizer_dir, setup, message):
    setup(tmp_path)
    (path,) = [p for p in tmp_path.iterdir() if p.name.startswith("e.")]
    with pytest.raises(ValueError, match=message) as err:
        tokens_of(path, tokenizer_dir)
    assert "\n" not in str(err.value)


def test_a_missing_parquet_column_names_the_columns(tmp_path, tokenizer_dir):
    path = write_corpus(tmp_path, "parquet")
    with pytest.raises(ValueError, match=r"no column 'body' \(has \['text'\]\)"):
        tokens_of(path, tokenizer_dir, field="body")


def test_a_folder_of_mixed_formats_asks_for_the_format(tmp_path, tokenizer_dir):
    write_corpus(tmp_path / "mix", "text")
    write_corpus(tmp_path / "mix", "jsonl")
    with pytest.raises(ValueError, match="several formats"):
        tokens_of(tmp_path / "mix", tokenizer_dir)
    assert tokens_of(tmp_path / "mix", tokenizer_dir, format="jsonl").size > 0


def test_heldout_split_is_the_tail_and_windows_stay_inside():
    tokens = np.arange(1000, dtype=np.uint32)
    train, held = corpus.split(tokens, 0.1, seq_len=8)
    assert train.size == 900 and held[0] == 900
    windows = TokenWindows(held, 8).sample(64, torch.Generator().manual_seed(0))
    assert windows.dtype == torch.int64 and int(windows.min()) >= 900
    with pytest.raises(ValueError, match="too few"):
        corpus.split(np.arange(15), 0.1, seq_len=8)


def test_memmapped_windows_equal_tensor_windows():
    """A corpus on disk samples exactly the windows the same stream in memory would (so a
    run's batches do not depend on where its tokens live)."""
    tokens = np.random.default_rng(0).integers(0, VOCAB, 5000).astype(np.uint32)
    from_numpy = TokenWindows(tokens, 16).sample(32, torch.Generator().manual_seed(3))
    from_tensor = TokenWindows(torch.from_numpy(tokens.astype(np.int64)), 16).sample(
        32, torch.Generator().manual_seed(3)
    )
    assert torch.equal(from_numpy, from_tensor)


@pytest.mark.parametrize(
    "model, fmt, extra",
    [
        ("llama", "text", []),
        ("gpt2", "jsonl", []),
        ("bert", "parquet", ["target.output=last_hidden_state", "output_loss=mse"]),
    ],
)
def test_cli_decomposes_a_saved_model_on_a_corpus(tmp_path, model, fmt, extra):
    """`spdkit run hf_lm --target-hf DIR` on a corpus folder / file: a run directory with
    summary and figures; causal LMs get the CE / KL report, the encoder its hidden states."""
    from typer.testing import CliRunner

    from spdkit.cli import app
    from tests import hf_models

    build = {
        "llama": hf_models.tiny_llama,
        "gpt2": hf_models.tiny_gpt2,
        "bert": hf_models.tiny_bert,
    }
    model_dir = tmp_path / "model"
    build[model](n_layers=2).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    data = write_corpus(tmp_path / "corpus", fmt, DOCS * 4)
    pattern = {"llama": "*.mlp.down_proj", "gpt2": "*.mlp.c_fc", "bert": "*.intermediate.dense"}
    run_dir = tmp_path / "run"
    sets = [f"target.data.path={data}", "target.seq_len=8", "batch_size=4", "modules.0.C=8"]
    sets += [f"modules.0.pattern={pattern[model]}", "eval.n_eval_samples=4", *extra]
    args = ["run", "hf_lm", "--target-hf", str(model_dir), "--out", str(run_dir), "--quiet"]
    args += ["--steps", "6", *[a for s in sets for a in ("--set", s)]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "tokenising" not in result.output  # --quiet reaches the corpus reader
    summary = json.loads((run_dir / "summary.json").read_text())
    assert ("lm" in summary) == (model != "bert")
    assert len(summary["modules"]) == 2 and any((run_dir / "figures").glob("*.png"))


def test_an_unknown_output_field_names_the_available_ones(tmp_path):
    from typer.testing import CliRunner

    from spdkit.cli import app
    from tests import hf_models

    hf_models.tiny_bert().save_pretrained(tmp_path / "bert")
    args = ["run", "hf_lm", "--target-hf", str(tmp_path / "bert")]
    args += [
        "--set",
        "target.data=random_tokens",
        "--set",
        "modules.0.pattern=*.intermediate.dense",
    ]
    args += ["--steps", "2", "--quiet", "--set", "output_loss=mse"]
    result = CliRunner().invoke(
        app, [*args, "--out", str(tmp_path / "r1"), "--set", "target.output=hidden"]
    )
    assert result.exit_code == 2 and "has: last_hidden_state, pooler_output" in result.output
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "r2")])  # no logits
    assert result.exit_code == 2 and "without logits" in result.output, result.output
    args = [*args[:-2], "--set", "target.output=last_hidden_state", "--out", str(tmp_path / "r3")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "use output_loss: mse" in result.output, result.output


def test_a_hub_dataset_id_reads_from_the_local_cache_offline(tmp_path, tokenizer_dir, monkeypatch):
    """hf:org/name[:config][:split] resolves to its snapshot in a Hugging Face cache laid out as
    huggingface_hub lays it out (datasets--org--name/{snapshots/<commit>/, refs/main}),
    offline; the same tokens as the files themselves; a missing id is one line."""
    import huggingface_hub

    from tests.test_hf import _no_network

    _no_network(monkeypatch)
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "datasets--someorg--tiny-text"
    data = repo / "snapshots" / commit / "data"
    data.mkdir(parents=True)
    for split, docs in (("train", DOCS), ("test", DOCS[:3])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert corpus.corpus_format(CorpusConfig(path="hf:someorg/tiny-text")) == "hf_hub"
    from_hub = tokens_of("hf:someorg/tiny-text", tokenizer_dir)
    from_files = tokens_of(data / "train.jsonl", tokenizer_dir)
    np.testing.assert_array_equal(from_hub, from_files)
    test_split = tokens_of("hf:someorg/tiny-text::test", tokenizer_dir)
    assert 0 < test_split.size < from_hub.size
    with pytest.raises(FileNotFoundError, match="hf download someorg/other --repo-type dataset"):
        tokens_of("hf:someorg/other", tokenizer_dir)


@pytest.mark.parametrize("progress", [False, True])
def test_the_tokenising_bar_shows_only_when_asked(tmp_path, tokenizer_dir, capfd, progress):
    # `spdkit run --quiet` passes progress=False down to the corpus reader
    from transformers import AutoTokenizer

    path = write_corpus(tmp_path / "j", "jsonl")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    corpus.corpus_tokens(CorpusConfig(path=str(path)), tokenizer_dir, VOCAB, lambda: tok, progress)
    assert ("tokenising" in capfd.readouterr().err) == progress
