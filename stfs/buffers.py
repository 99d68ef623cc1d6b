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

_M_ARENA_MAX = -8
"""glibc's mallopt parameter number (malloc.h)."""
MALLOC_ARENAS = 2
HEAP_TRIM_SLACK_BYTES = 4 * 1024 * 1024
"""Free heap beyond this (RSS over idle + held data) is given back to the OS."""

_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(None)
    _libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    _libc.malloc_trim.argtypes = (ctypes.c_size_t,)
except (OSError, AttributeError):  # not glibc
    _libc = None


def limit_malloc_arenas() -> bool:
    """Two malloc arenas instead of one per worker thread (backing reads, the
    checksum store): each arena keeps its freed memory resident. False when the
    C library is not glibc."""
    return _libc is not None and bool(_libc.mallopt(_M_ARENA_MAX, MALLOC_ARENAS))


def trim_heap() -> bool:
    """Give free heap memory back to the OS (``malloc_trim``: whole free pages
    anywhere in the heap). Freed chunk buffers stay in the heap, resident, for
    reuse without page faults; the memory monitor calls this (from a worker
    thread) when they add up to more than ``HEAP_TRIM_SLACK_BYTES``. Returns
    whether anything was released."""
    return _libc is not None and bool(_libc.malloc_trim(0))


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
