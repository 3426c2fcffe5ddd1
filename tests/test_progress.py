"""Progress display: in a log file (not a terminal) plain lines, never carriage returns."""

import io

from spdkit import progress


def test_outside_a_terminal_each_refresh_is_one_plain_line(monkeypatch):
    err = io.StringIO()  # not a TTY, like a `nohup` log or CI
    monkeypatch.setattr(progress.sys, "stderr", err)
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    bar = progress.progress_bar(50, "spd")
    for _ in range(50):
        bar.update(1)
    bar.close()
    text = err.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) >= 2 and all(line.startswith("spd:") for line in lines)
    assert "50/50" in lines[-1]


def test_the_interval_bounds_the_number_of_lines(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(progress.sys, "stderr", err)
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 3600.0)
    bar = progress.progress_bar(10_000, "spd")
    for _ in range(10_000):
        bar.update(1)
    bar.close()
    assert len(err.getvalue().splitlines()) <= 2  # the first line and the final one


def test_disabled_writes_nothing(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(progress.sys, "stderr", err)
    bar = progress.progress_bar(5, "spd", enabled=False)
    bar.update(5)
    bar.close()
    assert err.getvalue() == ""
