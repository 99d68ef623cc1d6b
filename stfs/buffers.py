"""Reusable chunk buffers.

A fresh 1 MiB ``bytearray`` costs a zero-fill and, above glibc's mmap
threshold, a page fault per 4 KiB on first touch: on the hot read path that
was as much CPU as the copy from the page cache itself. Chunks evicted from
the cache therefore come back here and are read into again.

Safety rule: a buffer is only reused when nothing else refers to it (CPython
reference count), so a reply still being written, a ``memoryview`` of it or a
reader that got it from a finished flight can never see it overwritten. The
pool keeps at most ``max_free_bytes`` of idle buffers (outside the memory
budget, within the "small constant" of the RSS target); only power-of-two
sizes are kept, since chunks come in those. When and how freed heap memory
goes back to the system is ``memory``'s policy.

Buffers of ``ALIGNED_FROM`` bytes and more are anonymous memory maps, so they
start on a page boundary. The kernel builds a FUSE read from whole pages of
the reader's buffer, at most ``max_pages`` of them: a 1 MiB buffer that does
not start on a page spans 257 pages, and a SOURCE that is itself a FUSE
``direct_io`` mount (network and cloud stores often are) then gets two
requests for it, the second of a few bytes that costs a whole round trip.
Maps are also populated when made (one call instead of a fault per page) and
go back to the system as soon as they are dropped.
"""

from __future__ import annotations

import mmap
import sys
from collections.abc import Callable

Buffer = bytearray | mmap.mmap
"""A chunk buffer: written by one read, then only read."""

ALIGNED_FROM = 64 * 1024
"""Buffers at least this big are page-aligned memory maps (see above)."""

_MAP_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)

# References to a buffer inside ``give``: the caller's variable, the parameter
# and getrefcount's own argument. Anything above that is a holder elsewhere.
_SOLE_OWNER_REFS = 3


class BufferPool:
    """Free lists of buffers by size."""

    def __init__(self, max_free_bytes: int,
                 on_drop: Callable[[int], None] = lambda _n: None) -> None:
        """*on_drop(size)*: a buffer offered back was not kept (freed to the heap)."""
        self.max_free_bytes = max_free_bytes
        self.free_bytes = 0
        self._free: dict[int, list[Buffer]] = {}
        self._on_drop = on_drop
        self.reused = 0
        self.allocated = 0

    def take(self, size: int) -> Buffer:
        """A buffer of exactly *size* bytes (contents undefined), page-aligned
        from ``ALIGNED_FROM`` bytes."""
        free = self._free.get(size)
        if free:
            self.free_bytes -= size
            self.reused += 1
            return free.pop()
        self.allocated += 1
        return allocate(size)

    def give(self, buf: object) -> None:
        """Offer a buffer no longer cached; kept only if it is safe and fits."""
        if not isinstance(buf, bytearray | mmap.mmap):
            return
        size = len(buf)
        if (size & (size - 1) or self.free_bytes + size > self.max_free_bytes
                or sys.getrefcount(buf) > _SOLE_OWNER_REFS
                or isinstance(buf, mmap.mmap) != (size >= ALIGNED_FROM)):
            if isinstance(buf, bytearray):
                self._on_drop(size)  # back to the heap (a map goes back to the system)
            return
        self._free.setdefault(size, []).append(buf)
        self.free_bytes += size

    def set_max_free_bytes(self, max_free_bytes: int) -> None:
        """A new bound (the memory budget changed); idle buffers beyond it go."""
        self.max_free_bytes = max_free_bytes
        for size in sorted(self._free, reverse=True):
            free = self._free[size]
            while free and self.free_bytes > max_free_bytes:
                free.pop()
                self.free_bytes -= size

    def clear(self) -> None:
        self._free.clear()
        self.free_bytes = 0


def allocate(size: int) -> Buffer:
    """A new buffer of *size* bytes: a page-aligned map from ``ALIGNED_FROM``."""
    if size >= ALIGNED_FROM:
        return mmap.mmap(-1, size, flags=_MAP_FLAGS)
    return bytearray(size)


def shorten(buf: Buffer, n: int) -> Buffer:
    """*buf* cut to its first *n* bytes (a short read at the end of a file)."""
    if n >= len(buf):
        return buf
    if isinstance(buf, bytearray):
        del buf[n:]
        return buf
    if n == 0:
        return bytearray()  # a map cannot be empty
    buf.resize(n)
    return buf
