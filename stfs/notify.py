"""sd_notify: tell systemd (``Type=notify``) about readiness, status and stopping.

The protocol is one datagram of newline-separated ``KEY=VALUE`` lines sent to
the AF_UNIX socket named by ``NOTIFY_SOCKET``: a file system path, or an
abstract socket name written with a leading ``@``. Without ``NOTIFY_SOCKET``
(not run by systemd) every call is a no-op. Failures are logged at debug level
and never raised: a service manager that went away must not stop the mount.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("stfs")

ENV = "NOTIFY_SOCKET"


def _address(name: str) -> str | bytes | None:
    if not name:
        return None
    if name.startswith("@"):
        return b"\0" + os.fsencode(name[1:])  # abstract namespace
    if name.startswith("/"):
        return name
    return None  # vsock and other forms are not used for services on this host


def notify(*fields: str, pid: int | None = None) -> bool:
    """Send *fields* (``"READY=1"``, ``"STATUS=..."``) to the service manager.

    Returns whether a datagram was sent. ``MAINPID`` is added when *pid* is given.
    """
    address = _address(os.environ.get(ENV, ""))
    if address is None:
        return False
    lines = [field.replace("\n", " ") for field in fields]
    if pid is not None:
        lines.append(f"MAINPID={pid}")
    message = ("\n".join(lines) + "\n").encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.debug("sd_notify to %s failed: %s", os.environ.get(ENV), exc)
        return False
    return True


def ready(status: str = "") -> bool:
    """``READY=1`` with this process as the main PID."""
    fields = ["READY=1"] + ([f"STATUS={status}"] if status else [])
    return notify(*fields, pid=os.getpid())


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def stopping(status: str = "") -> bool:
    fields = ["STOPPING=1"] + ([f"STATUS={status}"] if status else [])
    return notify(*fields)


def enabled() -> bool:
    return _address(os.environ.get(ENV, "")) is not None
