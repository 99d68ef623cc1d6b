"""The read path: every FUSE read of file data enters here.

``ReadEngine.read`` is the single entry point between the FUSE layer and the
backing store. For now it serves each request with one positioned backing read
in a worker thread, behind a bounded ``trio.CapacityLimiter``; the chunk
engine (cache, budget, read-ahead) replaces what sits behind this entry point
without touching ``fs_ops``.

It never blocks the event loop on disk I/O.
"""

from __future__ import annotations

import trio

from stfs.backing import pread_full
from stfs.handles import OpenFile
from stfs.metrics import Counters


class ReadEngine:
    """Serves file data for open handles."""

    def __init__(self, counters: Counters, max_streams: int) -> None:
        self._counters = counters
        self._limiter = trio.CapacityLimiter(max_streams)

    async def read(self, handle: OpenFile, offset: int, size: int) -> bytes:
        """Up to *size* bytes of *handle* at *offset*; fewer only at end of file."""
        counters = self._counters
        counters.active_reads += 1
        counters.in_flight_bytes += size
        counters.peak_held_bytes = max(counters.peak_held_bytes, counters.in_flight_bytes)
        try:
            data = await trio.to_thread.run_sync(
                pread_full, handle.fd, size, offset, limiter=self._limiter
            )
        finally:
            counters.active_reads -= 1
            counters.in_flight_bytes -= size
        counters.reads += 1
        counters.bytes_served += len(data)
        handle.bytes_read += len(data)
        return data

    async def release(self, handle: OpenFile) -> None:
        """Drop whatever the engine keeps for *handle* (nothing yet)."""
