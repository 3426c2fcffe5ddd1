"""`spdkit` command line: parses, calls the API, prints. Errors a user can cause print one line
per problem and exit with status 2, never a traceback.

common.py holds the app and what every command shares; training.py, analysis.py and
configs.py register the commands."""

from __future__ import annotations

import logging
import signal
import sys

from spdkit.engine.threads import set_short_spin

# The command line is an application: before torch loads libgomp, OpenMP threads that yield
# their core soon (`spdkit.engine.threads`); a library import of spdkit leaves this alone.
set_short_spin()

from spdkit.cli import analysis, configs, mechanisms, training  # noqa: E402, F401 (register)
from spdkit.cli.common import _terminate_as_interrupt, app, hf_target_override  # noqa: E402

__all__ = ["app", "hf_target_override", "main"]


def main() -> None:  # pragma: no cover
    from spdkit.engine.malloc import keep_freed_memory

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    keep_freed_memory()  # a training step then reuses its memory instead of faulting it in
    app()
