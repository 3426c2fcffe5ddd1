"""Every error a user can cause, in one place: the command line prints each as one line and
exits with status 2 (a non-finite loss: status 3). Anything else is an internal error and
keeps its traceback (`--debug`).

The types sit at the bottom of the package (they import nothing of spdkit), so every layer
can raise them and the command line can catch them without importing the layers."""

from __future__ import annotations

from pathlib import Path


class ConfigError(ValueError):
    """A config that cannot be used; the message has one line per problem."""


class RunDirError(ValueError):
    """A run directory (or target file) that is missing, corrupt or inconsistent."""


class RunWriteError(OSError):
    """A run file could not be written (disk full, no permission, ...).

    An OSError (with the original errno), so callers that handle OS errors still do; its
    message is one line naming the file and the OS's reason, which the bare OSError of a failed
    write does not (`[Errno 28] No space left on device`, no file).
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno

    @classmethod
    def of(cls, path: Path, err: OSError) -> RunWriteError:
        return cls(f"cannot write {path}: {(err.strerror or str(err)).lower()}", err.errno)


class CheckpointError(ValueError):
    """A checkpoint that cannot restore this trainer (missing or mis-shaped state)."""


class NonFiniteError(RuntimeError):
    """A loss term or gradient became NaN or infinite."""


class PeerLostError(RuntimeError):
    """A collective failed: another rank died or stopped answering."""


class JobsFailed(RuntimeError):
    """One or more runs exited with an error (their log.txt says why)."""
