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
sizes are kept, since chunks come in those.
"""

from __future__ import annotations

import ctypes
import sys

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
"""glibc's mallopt parameter numbers (malloc.h)."""
MALLOC_ARENAS = 2
MMAP_THRESHOLD_BYTES = 64 * 1024
"""Allocations from this size up get their own mapping (chunk buffers do)."""


def return_freed_buffers_to_the_os(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Make glibc give every allocation of *threshold* bytes or more its own
    mapping, so a freed chunk buffer leaves the RSS at once.

    glibc raises its mmap threshold each time a mapped block is freed, so after
    the first evictions, 1 MiB chunk buffers come from the brk heap, where a
    freed chunk stays resident behind any live object above it: the RSS then
    grows well past the memory budget. Setting the threshold fixes it. Returns
    False when the C library has no ``mallopt`` (not glibc).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # Worker threads (backing reads, the checksum store) would each get a malloc
    # arena of their own, whose freed memory stays resident: two arenas do.
    mallopt(_M_ARENA_MAX, MALLOC_ARENAS)
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))


# References to a buffer inside ``give``: the caller's variable, the parameter
# and getrefcount's own argument. Anything above that is a holder elsewhere.
_SOLE_OWNER_REFS = 3


class BufferPool:
    """Free lists of bytearrays by size."""

    def __init__(self, max_free_bytes: int) -> None:
        self.max_free_bytes = max_free_bytes
        self.free_bytes = 0
        self._free: dict[int, list[bytearray]] = {}
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
            return
        self._free.setdefault(size, []).append(buf)
        self.free_bytes += size

    def clear(self) -> None:
        self._free.clear()
        self.free_bytes = 0
