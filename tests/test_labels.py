"""The label helpers by hand: parsing answers, balanced accuracy, the detection test."""

from __future__ import annotations

import pytest

from spdkit.analysis.labels import (
    balanced_accuracy,
    context_text,
    detection,
    parse_detection,
    parse_label,
    read_journal,
)


def test_answers_are_parsed_leniently():
    assert parse_label('\n  Label: "plural nouns after the"\nmore') == "plural nouns after the"
    assert parse_label("") == "(no label)"
    assert parse_detection("2, 4 and 9 (maybe 0)", 5) == [False, True, False, True, False]
    assert context_text({"tokens": ["a", "b", "c"], "at": 1}) == "a[b]c"


def test_balanced_accuracy_weighs_both_kinds_equally():
    fired = [True, True, True, False]
    assert balanced_accuracy([True, True, True, True], fired) == 0.5  # says yes to everything
    assert balanced_accuracy([True, False, False, False], fired) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="firing and non-firing"):
        balanced_accuracy([True], [True])


def test_detection_scores_the_answer_against_the_shuffled_contexts():
    contexts = [(f"text {i}", i % 2 == 0) for i in range(6)]

    def oracle(prompt: str) -> str:  # picks exactly the firing texts, wherever they were put
        lines = [x for x in prompt.splitlines() if x[:1].isdigit()]
        return ",".join(x.split(".")[0] for x in lines if int(x.split()[-1]) % 2 == 0)

    assert detection(oracle, "even texts", contexts) == 1.0
    assert detection(lambda prompt: "0", "nothing", contexts) == 0.5


def test_a_journal_line_cut_off_by_a_kill_is_dropped_and_cut_from_the_file(tmp_path):
    """The labelling journal is appended line by line; a kill mid-line must not make the
    resume fail on that line, and the next append must start on a line of its own."""
    journal = tmp_path / "requests.jsonl"
    journal.write_text('{"name": "a", "source": "m"}\n{"name": "b", "sou')
    assert read_journal(journal) == [{"name": "a", "source": "m"}]
    assert journal.read_text() == '{"name": "a", "source": "m"}\n'
    assert read_journal(tmp_path / "none.jsonl") == []
