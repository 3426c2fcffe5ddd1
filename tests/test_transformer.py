"""Transformer targets (induction, tiny char LM), their data, and the language-model summary."""

from __future__ import annotations

import torch
import yaml

from spdkit.config import load_config
from spdkit.pipeline.run import run_experiment
from spdkit.targets.transformer import CharCorpus, RepeatedTokens, Transformer


def test_transformer_is_causal_and_names_its_matrices():
    model = Transformer(vocab_size=20, seq_len=10, d_model=8, n_layers=2, n_heads=2, d_mlp=16)
    ids = torch.randint(0, 20, (3, 10))
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 20
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert a.shape == (3, 10, 20)
    assert torch.equal(a[:, :7], b[:, :7]) and not torch.equal(a[:, 7:], b[:, 7:])
    names = {n for n, _ in model.named_modules()}
    assert {"embed", "blocks.1.attn.q", "blocks.0.attn.o", "blocks.1.mlp.fc_in", "unembed"} <= names


def test_repeated_tokens_and_char_corpus():
    seq = RepeatedTokens(vocab_size=50, seq_len=9).sample(4, torch.Generator().manual_seed(0))
    assert seq.shape == (4, 9) and torch.equal(seq[:, :4], seq[:, 4:8])
    ids, scored = RepeatedTokens(50, 9).scored_batch(4, torch.Generator().manual_seed(0))
    assert torch.equal(ids, seq) and scored[:, 5:8].all() and scored.sum() == 4 * 3
    corpus = CharCorpus(seq_len=16)
    batch = corpus.sample(5, torch.Generator().manual_seed(0))
    assert batch.shape == (5, 16) and batch.min() >= 0 and batch.max() < len(CharCorpus.VOCAB)
    text = "".join(CharCorpus.VOCAB[i] for i in batch[0].tolist())
    assert text.replace("\n", "").isprintable()


def test_a_random_repeat_varies_its_offset_and_scores_only_what_induction_decides():
    data = RepeatedTokens(vocab_size=50, seq_len=32, repeat="random")
    ids, scored = data.scored_batch(64, torch.Generator().manual_seed(0))
    offsets = set()
    for b in range(64):
        cols = scored[b].nonzero().flatten()
        m = int(cols[0]) - 1  # the repeat starts at m; its 2nd token (m + 1) is the first scored
        offsets.add(m)
        assert 8 <= m <= 16 and int(cols[-1]) == 2 * m - 1 and len(cols) == m - 1
        assert torch.equal(ids[b, m : 2 * m], ids[b, :m])
    assert len(offsets) > 1  # no positional head solves it


SMALL_INDUCTION = {
    "target.train_steps": 30,
    "target.d_model": 16,
    "target.vocab_size": 32,
    "target.seq_len": 16,
    "batch_size": 8,
    "modules": [{"pattern": "blocks.*.attn.*", "C": 8}],
}


def test_short_induction_run_reports_lm_metrics_and_alive_counts(tmp_path):
    config = load_config(
        "induction",
        {
            **SMALL_INDUCTION,
            "steps": 20,
            "log_every": 10,
            "eval.n_eval_samples": 16,
            "eval.pgd_steps": [2, 4],
        },
    )
    summary = run_experiment(config, tmp_path / "run", progress=False)
    lm = summary["lm"]
    rounded = {"rounded", "rounded>0", "rounded>0.1", "rounded>0.5"}
    expected = {"target", "ci", "stochastic", "ones", "zero", "top_contexts", "pgd_2", "pgd_4"}
    assert set(lm) == expected | rounded
    assert lm["zero"]["ce_gap_recovered"] == 0.0
    assert lm["rounded"] == lm["rounded>0.1"]  # eval.ci_threshold is 0.1
    mod = summary["modules"]["blocks.0.attn.q"]
    assert mod["n_alive"] + mod["n_dead"] == 8 and len(mod["firing_frequency_sorted"]) == 8
    assert "ci_one_hot" not in summary
    info = (tmp_path / "run" / "target.json").read_text()
    assert "ce_second_half" in info
    figures = {p.name for p in (tmp_path / "run" / "figures").iterdir()}
    assert {"l0.png", "ci_histograms.png", "top_contexts.png", "losses.png"} <= figures
    for rows in lm["top_contexts"].values():
        for row in rows:
            assert row["frequency"] > 0 and row["top"][0][0].endswith("]")


def test_top_contexts_picks_the_most_used_subcomponent_and_its_best_positions():
    from spdkit.analysis.lm import most_used_contexts

    ci = torch.zeros(2, 5, 3)
    ci[0, 3, 1] = 0.9  # subcomponent 1 fires twice, 2 once, 0 never
    ci[1, 1, 1] = 0.5
    ci[1, 4, 2] = 1.0
    ids = torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    rows = most_used_contexts(ci, ids, lambda t: "".join(map(str, t)), 0.1, n_contexts=2, width=2)
    assert [r["subcomponent"] for r in rows] == [1, 2]
    assert rows[0]["top"] == [("12[3]", 0.9), ("5[6]", 0.5)]


def test_a_language_model_sweep_draws_its_pareto_front(tmp_path):
    """LM runs have no one-hot CI picture; the sweep reports their KL columns (PGD included)
    and draws L0 against KL instead."""
    import json

    from spdkit.pipeline.sweep import run_sweep

    overrides = {**SMALL_INDUCTION, "steps": 10, "eval.n_eval_samples": 8, "eval.pgd_steps": [3]}
    data = load_config("induction", overrides).model_dump(mode="json")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    out = tmp_path / "sweep"
    grid = {"importance_minimality_coeff": [1e-3, 1e-1]}
    rows = run_sweep(str(tmp_path / "c.yaml"), grid, [0], out, progress=False)
    assert {"kl_ci", "kl_stochastic", "kl_pgd_3", "kl_rounded>0.5"} <= set(rows[0])
    assert (out / "sweep_pareto.png").stat().st_size > 0
    assert not (out / "sweep.png").exists()
    assert json.loads((out / "sweep.json").read_text())[1]["kl_pgd_3"] == rows[1]["kl_pgd_3"]
