"""`spdkit export`: a self-describing folder (model card, config, components, target) that
spdkit.load reads back with identical CI, also by Hub id from a local cache."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from typer.testing import CliRunner

import spdkit
from spdkit.cli import app

runner = CliRunner()


def _front_matter(path) -> dict:
    return yaml.safe_load(path.read_text().split("---", 2)[1])


def test_export_of_a_bundled_run_loads_back_with_identical_ci(tiny_tms_run, tmp_path):
    out = tmp_path / "export"
    result = runner.invoke(app, ["export", str(tiny_tms_run), str(out)])
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert {"README.md", "config.yaml", "components.safetensors", "target.json"} <= names
    assert "target.safetensors" in names and "checkpoint" not in names
    meta = _front_matter(out / "README.md")
    assert meta["library_name"] == "spdkit" and "interpretability" in meta["tags"]
    assert "| `linear1` | 8 |" in (out / "README.md").read_text()
    x = torch.rand(16, 5)
    a, b = spdkit.load(tiny_tms_run), spdkit.load(out)
    for name, ci in a.causal_importance(x).items():
        assert torch.equal(ci, b.causal_importance(x)[name])
    again = runner.invoke(app, ["export", str(tiny_tms_run), str(out)])
    assert again.exit_code == 2 and "not empty" in again.output


def test_export_of_an_unfinished_run_is_one_line(tmp_path, tiny_tms_run):
    half = tmp_path / "half"
    shutil.copytree(tiny_tms_run, half)
    (half / "components.safetensors").unlink()
    result = runner.invoke(app, ["export", str(half), str(tmp_path / "out")])
    assert result.exit_code == 2 and "not finished" in result.output


def test_export_of_a_hub_model_references_its_weights_and_loads_by_hub_id(tmp_path, monkeypatch):
    """A run of a Hub id (from a locally populated cache, offline) exported without the
    target's weights; the export, placed in the cache as a Hub repo, loads by its own id."""
    pytest.importorskip("transformers")
    from spdkit.targets.hf import model_dir
    from tests.test_hf import _no_network, _populate_hub_cache, gpt2

    _no_network(monkeypatch)
    cache = tmp_path / "hub"
    _populate_hub_cache(cache, "someorg/tiny-gpt2", gpt2())
    card = cache / "models--someorg--tiny-gpt2" / "snapshots"
    (next(card.iterdir()) / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    model_dir.cache_clear()
    try:
        run = tmp_path / "run"
        args = ["run", "hf_lm", "--target-hf", "someorg/tiny-gpt2", "--steps", "2", "--quiet"]
        args += ["--out", str(run), "--set", "modules=[{pattern: '*.c_fc', C: 8}]"]
        args += ["--set", "target.data=random_tokens", "--set", "eval.n_eval_samples=4"]
        args += ["--set", "eval.pgd_steps=[]", "--set", "target.seq_len=8"]
        assert runner.invoke(app, args).exit_code == 0
        out = tmp_path / "export"
        result = runner.invoke(app, ["export", str(run), str(out)])
        assert result.exit_code == 0, result.output
        assert not (out / "target.safetensors").exists()
        meta = _front_matter(out / "README.md")
        assert meta["base_model"] == "someorg/tiny-gpt2" and meta["license"] == "apache-2.0"
        ids = torch.randint(0, 40, (2, 8))
        want = spdkit.load(run).causal_importance(ids)
        got = spdkit.load(out).causal_importance(ids)
        assert all(torch.equal(want[n], got[n]) for n in want)
        # the export pushed to the Hub: a repo in the cache, loaded by its id
        commit = "fedcba9876543210fedcba9876543210fedcba98"
        repo = cache / "models--me--tiny-gpt2-spd"
        shutil.copytree(out, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        by_id = spdkit.load("me/tiny-gpt2-spd").causal_importance(ids)
        assert all(torch.equal(want[n], by_id[n]) for n in want)
        with pytest.raises(FileNotFoundError, match="no such run directory"):
            spdkit.load("me/missing")
    finally:
        model_dir.cache_clear()


def test_a_decomposition_describes_itself_in_a_notebook_cell(tiny_tms_run):
    decomp = spdkit.load(tiny_tms_run)
    text = repr(decomp)
    assert text.startswith("Decomposition of tms 5-2") and "linear1 (C 8)" in text
    assert "MMCS" in text and str(tiny_tms_run) in text
    html = decomp._repr_html_()
    assert html.startswith("<b>Decomposition of tms 5-2</b><table>") and "<td>modules</td>" in html


def test_figure_functions_return_a_figure_and_save_only_when_asked(tmp_path):
    from matplotlib.figure import Figure

    from spdkit.analysis import plots

    ci = {"linear1": torch.rand(50, 8), "linear2": torch.rand(50, 8)}
    fig = plots.plot_ci_histograms(ci, None)
    assert isinstance(fig, Figure) and not list(tmp_path.iterdir())
    again = plots.plot_ci_histograms(ci, tmp_path / "h.png")
    assert isinstance(again, Figure) and (tmp_path / "h.png").is_file()
