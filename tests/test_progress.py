"""Progress display: in a log file (not a terminal) plain lines, never carriage returns."""

import io

from spdkit import progress


def bar_output(monkeypatch, n: int, interval: float = 0.0, **kw) -> str:
    """What a bar of n updates writes to a stderr that is not a TTY (a `nohup` log, CI)."""
    err = io.StringIO()
    monkeypatch.setattr(progress.sys, "stderr", err)
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", interval)
    bar = progress.progress_bar(n, "spd", **kw)
    for _ in range(n):
        bar.update(1)
    bar.close()
    return err.getvalue()


def test_outside_a_terminal_each_refresh_is_one_plain_line(monkeypatch):
    text = bar_output(monkeypatch, 50)
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) >= 2 and all(line.startswith("spd:") for line in lines)
    assert "50/50" in lines[-1]


def test_the_interval_bounds_the_number_of_lines(monkeypatch):
    text = bar_output(monkeypatch, 10_000, interval=3600.0)
    assert len(text.splitlines()) <= 2  # the first line and the final one


def test_disabled_writes_nothing(monkeypatch):
    assert bar_output(monkeypatch, 5, enabled=False) == ""
