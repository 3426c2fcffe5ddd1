"""Hugging Face models (random init from a config, nothing downloaded): GPT-2 (Conv1D) and
Llama (Linear) decomposed by module pattern through the public API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spdkit import decompose, load
from spdkit.config import parse_config
from spdkit.targets.hf import RandomTokens, TokenWindows, load_hf_model
from tests.helpers import exact_components

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 40, 12


def gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_embd=16,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def llama():
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def lm_config(patterns: list[str], C: int, steps: int = 200):
    return parse_config(
        {
            "modules": [{"pattern": p, "C": C} for p in patterns],
            "importance_minimality_coeff": 1e-4,
            "pnorm": 2,
            "output_loss": "kl",
            "steps": steps,
            "batch_size": 8,
            "optimizer": {"lr": 1e-3},
            "log_every": 50,
            "checkpoint_every": 100,
            "eval": {"n_eval_samples": 64},
        }
    )


@pytest.mark.parametrize(
    ("build", "patterns", "expected"),
    [
        (gpt2, ["*.c_fc"], ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]),
        (
            llama,
            ["*.mlp.*"],
            [
                f"model.layers.{i}.mlp.{p}"
                for i in (0, 1)
                for p in ("gate_proj", "up_proj", "down_proj")
            ],
        ),
    ],
)
def test_decompose_hf_models_by_pattern(tmp_path, build, patterns, expected):
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = lm_config(patterns, C=24)
    decomp = decompose(model, RandomTokens(VOCAB, SEQ), config, tmp_path / "run", progress=False)
    cm = decomp.model
    assert sorted(cm.module_names) == sorted(expected)
    for name in expected:
        U, V = decomp.subcomponents(name)
        d_out, d_in = cm.target_weight(name).shape
        assert U.shape == (d_out, 24) and V.shape == (24, d_in)
    # the target is untouched: every original weight is bit-identical after training
    after = {
        k.replace(".original.", "."): v
        for k, v in cm.target.state_dict().items()
        if ".components." not in k
    }
    assert all(torch.equal(after[k], v) for k, v in before.items())
    # CI per token position
    ids = RandomTokens(VOCAB, SEQ).sample(3, torch.Generator().manual_seed(1))
    ci = decomp.causal_importance(ids)
    assert all(g.shape == (3, SEQ, 24) for g in ci.values())
    # round trip through the run directory
    again = load(tmp_path / "run", target=build())
    for name in expected:
        assert torch.equal(again.subcomponents(name)[0], decomp.subcomponents(name)[0])


@pytest.mark.parametrize(("build", "pattern"), [(gpt2, "*.mlp.c_*"), (llama, "*.mlp.*")])
def test_masks_of_ones_with_exact_components_reproduce_the_logits(build, pattern):
    from spdkit.method.model import ComponentModel

    model = build()
    ids = RandomTokens(VOCAB, SEQ).sample(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    cm = ComponentModel(model, lm_config([pattern], C=64).modules, ci_hidden_dim=4)
    exact_components(cm)
    with torch.no_grad():
        got = cm(ids, cm.ones_masks())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_loading_a_saved_model_works_offline_and_a_missing_one_is_clear(tmp_path):
    model = gpt2()
    model.save_pretrained(tmp_path / "gpt2")
    loaded = load_hf_model(tmp_path / "gpt2")
    ids = RandomTokens(VOCAB, SEQ).sample(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_hf_model(tmp_path / "nope")


def test_token_windows_sample_contiguous_windows():
    tokens = torch.arange(100)
    batch = TokenWindows(tokens, seq_len=5).sample(4, torch.Generator().manual_seed(0))
    assert batch.shape == (4, 5)
    assert torch.equal(batch[:, 1:] - batch[:, :-1], torch.ones(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="longer than seq_len"):
        TokenWindows(torch.arange(3), seq_len=5)


def _no_network(monkeypatch):
    """Any attempt to open a connection fails the test: spdkit must never reach a hub."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("spdkit tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _hf_run_args(model: Path, run_dir: Path, steps: int) -> list[str]:
    """`spdkit run hf_lm` on a saved tiny model: random tokens, C 8, a few steps."""
    args = ["run", "hf_lm", "--target-hf", str(model), "--out", str(run_dir), "--quiet"]
    args += ["--steps", str(steps), "--set", "target.data=random_tokens"]
    return args + [
        "--set",
        f"target.seq_len={SEQ}",
        "--set",
        "batch_size=4",
        "--set",
        "modules.0.C=8",
    ]


@pytest.mark.parametrize("build, copy", [(gpt2, False), (llama, True)])
def test_cli_target_hf_run_directory_refers_to_or_copies_the_weights(
    tmp_path, monkeypatch, build, copy
):
    """By default a Hugging Face target's weights are referenced (target.json: path and
    content hash, no target.safetensors): eval works while the model is there and says in
    one line when it moved or changed. With copy_weights the run directory alone rebuilds
    the model."""
    from typer.testing import CliRunner

    from spdkit.cli import app

    _no_network(monkeypatch)
    build().save_pretrained(tmp_path / "model")
    run_dir = tmp_path / "run"
    args = _hf_run_args(tmp_path / "model", run_dir, steps=20)
    args += ["--set", f"target.copy_weights={str(copy).lower()}"]
    args += ["--set", "eval.n_eval_samples=8", "--insert-identity", "*.layers.0.mlp.down_proj:20"]
    if build is gpt2:
        args[-1] = "*.h.0.mlp.c_proj:20"
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"target", "ci", "rounded", "stochastic", "ones", "zero"} <= set(summary["lm"])
    # hf_lm's Δ-component: all-ones masks (Δ included) are the target exactly, though C 8 is
    # below the matrices' rank; U V alone is not (the tiny random model's logits hardly depend
    # on its MLPs, so the KL in summary.json could not tell)
    decomp = load(run_dir)
    model = decomp.model
    assert model.delta
    ids = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        y_target = model.target(ids).logits
        ones = model.ones_masks()
        y_ones = model(ids, ones, delta={n: torch.ones(1) for n in ones})
        y_uv = model(ids, ones)
    torch.testing.assert_close(y_ones, y_target, atol=1e-4, rtol=1e-4)
    assert (y_uv - y_target).abs().max() > 1e-3
    (identity,) = summary["identity_check"].values()
    assert identity["C"] == 20 and identity["d"] in (32, 64)  # llama d_mlp 32, gpt2 4 × 16
    meta = json.loads((run_dir / "target.json").read_text())
    assert (run_dir / "target.safetensors").exists() == copy
    assert (meta.get("weights") == "referenced") != copy and (
        len(meta.get("content_hash", "")) == 64
    ) != copy
    if not copy:
        result = CliRunner().invoke(app, ["eval", str(run_dir)])
        assert result.exit_code == 0, result.output
        with torch.no_grad():  # another model where the run's was: a changed weight file
            other = build()
            next(other.parameters()).add_(1.0)
            other.save_pretrained(tmp_path / "model")
        result = CliRunner().invoke(app, ["eval", str(run_dir)])
        assert result.exit_code == 2 and "changed since the run" in result.output
    (tmp_path / "model").rename(tmp_path / "moved")
    result = CliRunner().invoke(app, ["eval", str(run_dir)])
    if not copy:  # moved: one line saying what to do
        assert result.exit_code == 2 and "copy_weights" in result.output
        assert len(result.output.strip().splitlines()) == 1
        return
    # the run directory alone rebuilds the model: eval works with the model directory gone
    assert result.exit_code == 0, result.output
    again = json.loads((run_dir / "summary.json").read_text())
    assert again["lm"]["ci"] == summary["lm"]["ci"]


def test_cli_target_hf_missing_directory_is_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from spdkit.cli import app

    _no_network(monkeypatch)
    result = CliRunner().invoke(
        app, ["run", "hf_lm", "--target-hf", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: ") and "never downloads" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_modules_lists_a_saved_model_without_loading_it(tmp_path):
    from typer.testing import CliRunner

    from spdkit.cli import app

    gpt2().save_pretrained(tmp_path / "gpt2")
    result = CliRunner().invoke(app, ["modules", str(tmp_path / "gpt2"), "--pattern", "*.c_fc"])
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines()]
    fc = [r for r in rows if r[0].endswith(".mlp.c_fc")]
    assert fc and all(r[1] == "Conv1D" for r in fc)
    n_params = sum(int(r[5].replace(",", "")) for r in fc)
    assert f"pattern '*.c_fc': {len(fc)} modules, {n_params:,} parameters" in result.output
    # the LM head shares the token embedding's matrix: listed as tied, counted once
    head = next(r for r in rows if r and r[0] == "lm_head")
    assert head[-3:] == ["tied", "to", "transformer.wte"]
    listed = [r for r in rows if len(r) > 5 and r[3] == "x" and r[0] != "module"]
    total = sum(int(r[5].replace(",", "")) for r in listed if "tied" not in r)
    assert f"{len(listed)} decomposable modules, {total:,} parameters" in result.output


def _populate_hub_cache(cache: Path, repo_id: str, model) -> str:
    """`repo_id`'s snapshot in a Hugging Face cache laid out as huggingface_hub lays it out
    (models--org--name/{snapshots/<commit>/, refs/main}), without any network."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    model.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return commit


def test_hub_ids_resolve_from_the_local_cache_offline(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from spdkit.cli import app
    from spdkit.targets.hf import model_dir

    cache = tmp_path / "hub"
    commit = _populate_hub_cache(cache, "someorg/tiny-gpt2", gpt2())
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    model_dir.cache_clear()
    try:
        assert (
            model_dir("someorg/tiny-gpt2")
            == cache / "models--someorg--tiny-gpt2" / "snapshots" / commit
        )
        assert model_dir(f"someorg/tiny-gpt2@{commit}").name == commit
        result = CliRunner().invoke(app, ["modules", "someorg/tiny-gpt2", "--pattern", "*.c_fc"])
        assert result.exit_code == 0, result.output
        assert "pattern '*.c_fc': 2 modules" in result.output
        out = tmp_path / "run"
        result = CliRunner().invoke(
            app,
            [
                "run",
                "hf_lm",
                "--target-hf",
                "someorg/tiny-gpt2",
                "--steps",
                "2",
                "--quiet",
                "--out",
                str(out),
                "--set",
                "modules=[{pattern: '*.c_fc', C: 8}]",
                "--set",
                "target.data=random_tokens",
                "--set",
                "eval.n_eval_samples=4",
                "--set",
                "eval.pgd_steps=[]",
                "--set",
                "training.batch_size=2",
                "--set",
                f"target.seq_len={SEQ}",
            ],
        )
        assert result.exit_code == 0, result.output
        info = json.loads((out / "target.json").read_text())
        assert info["info"]["revision"] == commit
        missing = CliRunner().invoke(app, ["modules", "someorg/absent-model"])
        assert missing.exit_code == 2
        line = missing.output.strip()
        assert len(line.splitlines()) == 1
        assert "neither a local directory nor in the Hugging Face cache" in line
        assert "hf download someorg/absent-model" in line
    finally:
        model_dir.cache_clear()


@pytest.mark.parametrize("build", [gpt2, llama])
def test_edit_writes_a_folder_plain_transformers_loads_and_generates_with(
    tmp_path, monkeypatch, build
):
    """`spdkit edit` on a Hugging Face run: a save_pretrained folder whose edited matrix is
    W − U_c V_c in the module's own layout (GPT-2's Conv1D stores Wᵀ), loaded by plain
    transformers, generating, and measured the same after the round trip."""
    from typer.testing import CliRunner

    from spdkit.cli import app

    _no_network(monkeypatch)
    build().save_pretrained(tmp_path / "model")
    run_dir = tmp_path / "run"
    args = _hf_run_args(tmp_path / "model", run_dir, steps=5)
    args += ["--set", "eval.n_eval_samples=8"]
    assert CliRunner().invoke(app, args).exit_code == 0
    decomp = load(run_dir)
    module = decomp.module_names[0]
    edited = tmp_path / "edited"
    result = CliRunner().invoke(
        app, ["edit", str(run_dir), "--off", f"{module}:3", "--out", str(edited), "--n", "4"]
    )
    assert result.exit_code == 0, result.output
    model = transformers.AutoModelForCausalLM.from_pretrained(edited).eval()
    original = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    U, V = decomp.subcomponents(module)
    new, old = model.get_submodule(module).weight, original.get_submodule(module).weight
    delta = U[:, 3:4] @ V[3:4]
    torch.testing.assert_close(old - new, delta if old.shape == delta.shape else delta.T)
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
    saved = json.loads((edited / "edit.json").read_text())
    assert saved["format"] == "save_pretrained"
    assert all(row["reload_max_abs_diff"] < 1e-5 for row in saved["groups"].values())
