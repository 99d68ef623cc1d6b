"""Optional ``/metrics`` endpoint for a Prometheus scraper (``--metrics-listen``).

A minimal HTTP/1.0 responder on trio: ``GET /metrics`` answers the same text
exposition as ``stfs stats --prometheus`` (body and content type from
``prometheus_client``); anything else is 404 or 405. It listens on loopback
unless an address is given. No request body, no keep-alive: one request per
connection, bounded in size and time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from stfs.errors import UsageError

log = logging.getLogger(__name__)

REQUEST_LIMIT = 8192


def parse_listen(text: str) -> tuple[str, int]:
    """``PORT``, ``ADDR:PORT`` or ``[IPV6]:PORT`` -> (host, port); loopback by default."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise UsageError(f"invalid --metrics-listen '{text}': expected [ADDR:]PORT") from None
    if not 0 <= port <= 65535:
        raise UsageError(f"invalid --metrics-listen '{text}': port out of range")
    return host, port


async def serve(host: str, port: int, stats: Callable[[], dict[str, Any]], *,
                task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve /metrics until cancelled; reports the bound port through task_status."""
    # Imported here: prometheus_client costs the daemon's idle RSS some 2 MiB,
    # which only a mount with --metrics-listen needs to pay.
    from prometheus_client.exposition import generate_latest

    from stfs import prometheus

    registry = prometheus.registry_for(stats)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            request = b""
            with trio.move_on_after(5):
                while b"\r\n\r\n" not in request and b"\n\n" not in request:
                    chunk = await stream.receive_some(REQUEST_LIMIT)
                    if not chunk or len(request) > REQUEST_LIMIT:
                        break
                    request += chunk
            method, _, rest = request.partition(b" ")
            path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
            content_type = "text/plain; charset=utf-8"
            if method != b"GET":
                status, payload = "405 Method Not Allowed", b"only GET\n"
            elif path != b"/metrics":
                status, payload = "404 Not Found", b"see /metrics\n"
            else:
                status, payload = "200 OK", generate_latest(registry)
                content_type = prometheus.CONTENT_TYPE
            head = (f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n")
            try:
                await stream.send_all(head.encode() + payload)
            except trio.BrokenResourceError:
                pass

    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    log.info("serving /metrics on %s:%d", host, bound)
    task_status.started(bound)
    await trio.serve_listeners(handle, listeners)
