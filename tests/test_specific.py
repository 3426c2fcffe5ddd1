"""Specific sets (`spdkit.analysis.specific`): firing rates per group counted by hand, the
specificity ranking, and the choice of θ. The end-to-end check on a planted run (CLI,
specific.json, `edit --off specific:<group>`) is in test_planted.py."""

from __future__ import annotations

import pytest
import torch

from spdkit.analysis import ablation, specific


class OneHotCI:
    """A stand-in model whose CI of piece c at a position is 1 where the token there is c (C 4,
    one module "m"): firing rates are then token frequencies, countable by hand."""

    def record(self, ids):
        return None

    def importances(self, ids, record):
        g = torch.nn.functional.one_hot(ids, 4).float()  # [b, T, 4]
        return {"m": g}, {"m": g}


def test_firing_rates_count_every_position_after_the_first_in_chunks():
    # position 0 (the task token) is never counted; group a: tokens 1 1 2 | 1 3 3
    a = torch.tensor([[0, 1, 1, 2], [0, 1, 3, 3]])
    b = torch.tensor([[0, 2, 2, 2], [0, 2, 2, 3]])
    groups = {"a": (a, torch.ones_like(a, dtype=torch.bool)), "b": (b, torch.ones_like(b).bool())}
    rates = specific.firing_rates(OneHotCI(), groups, threshold=0.5, chunk=1)
    torch.testing.assert_close(rates["a"]["m"], torch.tensor([0, 3, 1, 2]) / 6)
    torch.testing.assert_close(rates["b"]["m"], torch.tensor([0, 0, 5, 1]) / 6)
    share = specific.specificity(rates)
    torch.testing.assert_close(share["a"]["m"], torch.tensor([0.0, 1.0, 1 / 6, 2 / 3]))
    # piece 0 never fires: dead, never ranked; the rest most specific first
    ranked = specific.ranked_pieces(rates, "a", min_rate=0.01)
    assert [(m, i) for _, m, i in ranked] == [("m", 1), ("m", 3), ("m", 2)]
    assert specific.as_off(ranked[:2]) == {"m": [1, 3]}


def test_the_chosen_theta_reaches_furthest_within_the_selectivity_bound():
    sweep = [
        {"theta": 0.99, "fraction": 0.2, "selectivity": 0.0},
        {"theta": 0.9, "fraction": 0.7, "selectivity": 0.05},
        {"theta": 0.8, "fraction": 0.95, "selectivity": 0.3},
    ]
    assert specific.choose_theta(sweep, 0.1) == 1
    # nothing within the bound: the least unselective
    assert specific.choose_theta(sweep, 0.01) == 0
    assert specific.choose_theta([{**e, "selectivity": 0.5} for e in sweep], 0.1) == 0


def test_one_group_is_refused_in_one_line():
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="only one .*all.*planted_lm"):
        specific.specific_sets(OneHotCI(), {"all": (ids, ids.bool())}, {}, {}, 0.5)


def test_grow_keeps_a_piece_only_if_it_helps_within_the_bound_and_stops_at_frac():
    """Pieces 'a'..'e' with known effects: b raises the other group past the bound, c adds
    nothing, d helps, e would help but the set already reached frac after d."""
    effect = {"a": (0.3, 0.0), "b": (0.3, 0.5), "c": (0.0, 0.0), "d": (0.6, 0.05), "e": (0.1, 0.0)}

    def measure(pieces):
        names = [m for _, m, _ in pieces]
        return {
            "fraction": sum(effect[n][0] for n in names),
            "selectivity": sum(effect[n][1] for n in names),
        }

    start = [(0.9, "a", 0)]
    below = [(0.8, n, 0) for n in "bcde"]
    params = specific.SpecificParams(frac=0.8, max_selectivity=0.1)
    chosen, score, trials = specific.grow(start, below, measure(start), measure, params)
    assert [m for _, m, _ in chosen] == ["a", "d"]
    assert score == {"fraction": pytest.approx(0.9), "selectivity": pytest.approx(0.05)}
    assert trials == 3  # b, c, d tried; e never: frac was reached
    few = specific.SpecificParams(frac=0.8, max_selectivity=0.1, max_trials=2)
    chosen, _, trials = specific.grow(start, below, measure(start), measure, few)
    assert [m for _, m, _ in chosen] == ["a"] and trials == 2


def test_params_refuse_thetas_out_of_order_or_empty():
    for bad in ((), (0.5, 0.9), (1.5,)):
        with pytest.raises(ValueError, match="thetas"):
            specific.SpecificParams(thetas=bad)


def test_a_specific_set_is_measured_on_the_draw_it_was_not_chosen_on():
    assert ablation.measured_draw(["specific:sum"], None) == 1
    assert ablation.measured_draw(["cluster:0", "mlp:3"], None) == 0
    assert ablation.measured_draw(["specific:sum"], 0) == 0  # asked for: in-sample


def test_a_group_with_nothing_to_lose_does_not_decide_selectivity():
    nan = float("nan")
    assert ablation.worst_other([nan, 0.05, 0.02]) == 0.05
    assert ablation.worst_other([0.02, nan]) == 0.02  # the same, whatever the order
    assert ablation.worst_other([]) == 0.0
