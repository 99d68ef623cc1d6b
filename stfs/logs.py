"""Logging set-up: one line per event, to stderr, a log file, or the journal."""

from __future__ import annotations

import logging
import os
import sys

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM to the device:inode of the stream it connected."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class _QuietInterruptedReplies(logging.Filter):
    """pyfuse3 logs a reply to a request the kernel already dropped (an unmount
    racing a late RELEASE, an interrupted read) as an error; libfuse itself
    treats ENOENT from a reply as "request interrupted" and says nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "pyfuse3" and "No such file or directory" in record.getMessage():
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def setup(level: str, log_file: str | None) -> None:
    """Route the ``stfs`` loggers (and pyfuse3's) to one handler."""
    handler: logging.Handler
    if log_file:
        handler = logging.FileHandler(log_file)
        fmt = "%(asctime)s stfs[%(process)d] %(levelname)s %(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = ("%(levelname)s %(message)s" if stderr_is_journal()
               else "%(asctime)s stfs[%(process)d] %(levelname)s %(message)s")
    handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(_QuietInterruptedReplies())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS[level])
