"""MMCS / ML2R, norms and the non-negligible rule on hand-built decompositions."""

import pytest
import torch

from spdkit.method.measures import non_negligible, subcomponent_norms
from spdkit.targets.tms_analysis import mmcs_ml2r


def columnwise(W: torch.Tensor, scale: float = 1.0):
    """The ground-truth decomposition: subcomponent j = column j of W (U = W, V = I)."""
    n = W.shape[1]
    return W.clone(), scale * torch.eye(n)


def test_perfect_decomposition_scores_one():
    W = torch.randn(2, 5)
    U, V = columnwise(W)
    m = mmcs_ml2r(W, U, V, torch.ones(5, dtype=torch.bool))
    assert m.mmcs == pytest.approx(1.0, abs=1e-6)
    assert m.ml2r == pytest.approx(1.0, abs=1e-6)
    assert m.match == [0, 1, 2, 3, 4]


def test_shrinkage_shows_in_ml2r_not_mmcs():
    W = torch.randn(3, 4)
    U, V = columnwise(W, scale=0.9)
    m = mmcs_ml2r(W, U, V, torch.ones(4, dtype=torch.bool))
    assert m.mmcs == pytest.approx(1.0, abs=1e-6)
    assert m.ml2r == pytest.approx(0.9, abs=1e-6)


def test_sign_of_v_counts():
    """A subcomponent pointing the opposite way has cosine −1, not +1."""
    W = torch.tensor([[1.0], [0.0]])
    m = mmcs_ml2r(
        W, torch.tensor([[1.0], [0.0]]), torch.tensor([[-1.0]]), torch.ones(1, dtype=torch.bool)
    )
    assert m.mmcs == pytest.approx(-1.0)


def test_negligible_subcomponents_cannot_win_the_match():
    """A tiny subcomponent aligned by accident must not be matched (it would wreck ML2R)."""
    W = torch.eye(2)
    U = torch.tensor(
        [[0.9, 1e-4, 0.0], [0.3, 0.0, 1.0]]
    )  # comp 0 slightly off, comp 1 tiny but exact
    V = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    norms = subcomponent_norms(U, V)
    live = non_negligible(norms, 0.1)
    assert live.tolist() == [True, False, True]
    fair = mmcs_ml2r(W, U, V, live)
    assert fair.match == [0, 2]
    assert fair.ml2r == pytest.approx((0.9**2 + 0.3**2) ** 0.5 / 2 + 0.5, abs=1e-6)
    naive = mmcs_ml2r(W, U, V, torch.ones(3, dtype=torch.bool))
    assert naive.match[0] == 1 and naive.ml2r < 0.6


def test_norms_are_frobenius_norms_of_rank_one_matrices():
    U, V = torch.randn(4, 3), torch.randn(3, 6)
    expected = torch.stack([torch.outer(U[:, c], V[c]).norm() for c in range(3)])
    torch.testing.assert_close(subcomponent_norms(U, V), expected)


def test_no_candidates_is_a_clear_error():
    with pytest.raises(ValueError, match="no candidate"):
        mmcs_ml2r(torch.eye(2), torch.eye(2), torch.eye(2), torch.zeros(2, dtype=torch.bool))


def test_lm_evaluation_in_chunks_equals_the_whole_batch():
    """eval.batch_size bounds memory, not the numbers: CE / KL of every mask kind, and the
    PGD ladder with one source vector for the whole batch (gradients summed over chunks)."""
    from spdkit.analysis.lm import lm_mask_evaluation
    from spdkit.config import EvalConfig, ModuleSpec
    from spdkit.method.model import ComponentModel
    from spdkit.targets.transformer import Transformer

    torch.manual_seed(0)
    lm = Transformer(vocab_size=13, seq_len=6, d_model=8, n_layers=2, n_heads=2, d_mlp=16)
    model = ComponentModel(lm, [ModuleSpec(pattern="blocks.*.mlp.*", C=5)], ci_hidden_dim=4)
    ids = torch.randint(0, 13, (8, 6), generator=torch.Generator().manual_seed(1))
    results = {}
    for size in (None, 3):
        ev = EvalConfig(n_eval_samples=len(ids), pgd_steps=[2, 5], batch_size=size)
        gen = torch.Generator().manual_seed(0)
        results[size] = lm_mask_evaluation(model, ids, ev, gen)
    whole, chunked = results[None], results[3]
    assert whole.keys() == chunked.keys() and {"pgd_2", "pgd_5", "ci"} <= whole.keys()
    for kind in whole:
        if kind == "stochastic":  # its random draws come per chunk: another sample
            continue
        for key in ("ce", "kl")[: len(whole[kind])]:  # ce_gap_recovered: a ratio of these
            assert chunked[kind][key] == pytest.approx(whole[kind][key], rel=1e-4, abs=1e-6), (
                kind,
                key,
            )
    # keeping every chunk's record for the ladder, or recomputing it per ascent step: the same
    ev = EvalConfig(n_eval_samples=len(ids), pgd_steps=[2, 5], batch_size=3)
    kept, recomputed = (
        lm_mask_evaluation(model, ids, ev, torch.Generator().manual_seed(0), keep_records=keep)
        for keep in (True, False)
    )
    assert kept == recomputed


def test_pgd_records_are_kept_when_they_fit():
    from spdkit.analysis.lm import keep_every_record

    assert keep_every_record(10, 1, None)  # one chunk: its record serves the ladder anyway
    assert not keep_every_record(10, 4, None)  # memory unknown: recompute
    assert keep_every_record(10, 4, 80) and not keep_every_record(10, 4, 79)
