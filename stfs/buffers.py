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
"""

from __future__ import annotations

import sys
from collections.abc import Callable

# References to a buffer inside ``give``: the caller's variable, the parameter
# and getrefcount's own argument. Anything above that is a holder elsewhere.
_SOLE_OWNER_REFS = 3


class BufferPool:
    """Free lists of bytearrays by size."""

    def __init__(self, max_free_bytes: int,
                 on_drop: Callable[[int], None] = lambda _n: None) -> None:
        """*on_drop(size)*: a buffer offered back was not kept (freed to the heap)."""
        self.max_free_bytes = max_free_bytes
        self.free_bytes = 0
        self._free: dict[int, list[bytearray]] = {}
        self._on_drop = on_drop
        self.reused = 0
        self.allocated = 0

    def take(self, size: int) -> bytearray:
        """A buffer of exactly *size* bytes (contents undefined)."""
        free = self._free.get(size)
        if free:
            self.free_bytes -= size
            self.reused += 1
            return free.pop()
        self.allocated += 1
        return bytearray(size)

    def give(self, buf: object) -> None:
        """Offer a buffer no longer cached; kept only if it is safe and fits."""
        if not isinstance(buf, bytearray):
            return
        size = len(buf)
        if (size & (size - 1) or self.free_bytes + size > self.max_free_bytes
                or sys.getrefcount(buf) > _SOLE_OWNER_REFS):
            self._on_drop(size)
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
