"""Control socket: how ``stfs stats`` reaches a running daemon.

One Unix stream socket per mount under the runtime directory, named by a hash
of the mount point, owner-only (directory 0700, socket 0600). The protocol is
one request line (``stats`` or ``history``) answered by one JSON line. Stats never come from a
file inside the mounted view.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from stfs.config import runtime_dir
from stfs.errors import StfsError

log = logging.getLogger(__name__)

REQUEST_LIMIT = 4096


def socket_path(mountpoint: str) -> Path:
    """Control socket of the mount at *mountpoint* (an absolute, resolved path)."""
    digest = hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:20]
    return runtime_dir() / f"{digest}.sock"


async def serve(
    path: Path,
    handlers: dict[str, Callable[[], dict[str, Any]]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer stats requests on *path* until cancelled; removes the socket after."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    try:
        path.unlink()  # left by a daemon that was killed
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        await sock.bind(os.fspath(path))
    finally:
        os.umask(old_umask)
    sock.listen(16)
    listener = trio.SocketListener(sock)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            request = b""
            with trio.move_on_after(5):
                while b"\n" not in request and len(request) < REQUEST_LIMIT:
                    chunk = await stream.receive_some(REQUEST_LIMIT)
                    if not chunk:
                        break
                    request += chunk
            command = request.strip().decode("ascii", "replace")
            handler = handlers.get(command)
            if handler is not None:
                reply: dict[str, Any] = handler()
            else:
                reply = {"error": f"unknown request {command!r}"}
            try:
                await stream.send_all(json.dumps(reply).encode() + b"\n")
            except trio.BrokenResourceError:
                pass

    try:
        task_status.started()
        await trio.serve_listeners(handle, [listener])
    finally:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def request_stats(mountpoint: str, timeout: float = 5.0, command: str = "stats") -> dict[str, Any]:
    """Ask the daemon serving *mountpoint* for its stats, or another *command*'s
    reply (``history``: the pressure controller's samples); blocking client."""
    path = socket_path(mountpoint)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(os.fspath(path))
            sock.sendall(command.encode("ascii") + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except FileNotFoundError:
        raise StfsError(f"{mountpoint}: no stfs daemon is serving this mount") from None
    except (TimeoutError, ConnectionRefusedError) as exc:
        raise StfsError(f"{mountpoint}: the stfs daemon does not answer ({exc})") from None
    except PermissionError:
        raise StfsError(f"{mountpoint}: permission denied "
                        "(stats are for the mount's owner)") from None
    except OSError as exc:
        reason = os.strerror(exc.errno or errno.EIO)
        raise StfsError(f"{mountpoint}: cannot reach the stfs daemon: {reason}") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise StfsError(f"{mountpoint}: the stfs daemon sent an unreadable reply") from None
    if not isinstance(reply, dict):
        raise StfsError(f"{mountpoint}: the stfs daemon sent an unreadable reply")
    return reply


def wait_gone(mountpoint: str, timeout: float) -> None:
    """Wait until no daemon answers on *mountpoint*'s socket (a socket file left
    by a killed daemon refuses connections and counts as gone)."""
    path = socket_path(mountpoint)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.5)
                sock.connect(os.fspath(path))
        except OSError:
            return
        time.sleep(0.05)
