"""The one error type a user sees: a clear line naming the file and line, never a traceback."""

from __future__ import annotations

import os


class MltagError(Exception):
    """A user-facing error: printed as one clear line, never a traceback."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.message = message  # without its place
        self.path = None if path is None else str(path)
        self.line = line


class TransientError(MltagError):
    """A failure that a later try may not meet (memory, disk space): never remembered as a lasting one."""


class Terminated(BaseException):
    """SIGTERM (Kubernetes stopping a pod, ``kill``): unwinds like Ctrl-C, so runs end as KILLED and nothing
    half-written is left; the CLI exits 143."""
