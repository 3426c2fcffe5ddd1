"""Progress display for everything that takes more than a few seconds.

In a terminal: a tqdm bar updated in place. Elsewhere (CI, `nohup`, a scheduler's log file) a
bar redrawn with carriage returns fills the log (a TMS run wrote 1 MB of them), so the same bar
writes one plain line at most every `LOG_INTERVAL_S` seconds instead.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0


class _Lines:
    """A file for tqdm that turns each redraw ("\\r" + bar) into one line of its own."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = stream if stream is not None else sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def in_notebook() -> bool:
    """Running in a Jupyter kernel (tqdm.auto then draws a widget, which renders in place)."""
    shell = sys.modules.get("IPython")
    get = getattr(shell, "get_ipython", None)
    return get is not None and type(get()).__name__ == "ZMQInteractiveShell"


def progress_bar(total: int | None = None, desc: str = "", enabled: bool = True, **kw: Any) -> tqdm:
    """A tqdm bar: in place in a terminal or a notebook (a widget), else a line on stderr
    every LOG_INTERVAL_S s."""
    if enabled and not is_terminal() and not in_notebook():
        kw = {"file": _Lines(sys.stderr), "mininterval": LOG_INTERVAL_S, "ascii": True, **kw}
        kw.setdefault("ncols", 120)
    else:
        kw.setdefault("dynamic_ncols", True)
    return tqdm(total=total, desc=desc, disable=not enabled, **kw)
