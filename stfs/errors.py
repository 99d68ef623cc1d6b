"""The one exception type that reaches the user, and exit codes.

``StfsError`` carries a one-line message and an exit status; the command line
prints it as ``stfs: MESSAGE`` without a traceback. Anything else escaping a
command is a bug and is reported with a traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class StfsError(Exception):
    """An expected failure: a one-line message for the user and an exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class UsageError(StfsError):
    """A malformed command line (exit status 2)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_USAGE)


def path_error(path: str, exc: OSError) -> StfsError:
    """Turn an OSError about *path* into a one-line StfsError naming the cause."""
    import os

    cause = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    return StfsError(f"{path}: {cause}")
