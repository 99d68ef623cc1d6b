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

Aligned buffers, for a SOURCE that is not a local block device, are
anonymous memory maps from ``ALIGNED_FROM`` bytes, so they start on a page
boundary. The kernel builds a FUSE ``direct_io`` read (network and cloud
stores are often FUSE mounts that use it) from whole pages of the reader's
buffer, at most ``max_pages`` of them: a 1 MiB buffer that does not start
on a page spans 257 pages and costs two requests, the second of a few bytes
that takes a whole round trip. On a local disk alignment buys nothing, and
there heap buffers stay: freed heap memory is reused as it is, while a map
goes back to the system when dropped and a new one is charged afresh (in a
memory cgroup full of page cache, each charge is a reclaim).
"""

from __future__ import annotations

import collections
import mmap
import sys
from collections.abc import Callable

Buffer = bytearray | mmap.mmap
"""A chunk buffer: written by one read, then only read."""

ALIGNED_FROM = 64 * 1024
"""Aligned buffers at least this big are memory maps (see above)."""

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
        self._free: dict[tuple[int, bool], list[Buffer]] = {}
        """Idle buffers by (size, whether a map), oldest first."""
        self._order: collections.deque[tuple[int, bool]] = collections.deque()
        """The kind of each idle buffer, in the order they were given."""
        self._on_drop = on_drop
        self.reused = 0
        self.allocated = 0

    def take(self, size: int, aligned: bool = False) -> Buffer:
        """A buffer of exactly *size* bytes (contents undefined); *aligned*:
        starting on a page from ``ALIGNED_FROM`` bytes (see above)."""
        free = self._free.get((size, aligned and size >= ALIGNED_FROM))
        if free:
            self.free_bytes -= size
            self.reused += 1
            self._order.remove((size, aligned and size >= ALIGNED_FROM))
            return free.pop()
        self.allocated += 1
        return allocate(size, aligned)

    def give(self, buf: object) -> None:
        """Offer a buffer no longer cached; kept only if it is safe and fits.

        To fit, idle buffers of other sizes go, oldest first: the sizes chunks
        come in change with the store (a pool full of 512 KiB buffers was
        measured refusing every 1 MiB one of a whole pass, each then a new map)."""
        if not isinstance(buf, bytearray | mmap.mmap):
            return
        size = len(buf)
        kind = (size, isinstance(buf, mmap.mmap))
        if (size & (size - 1) or size > self.max_free_bytes
                or sys.getrefcount(buf) > _SOLE_OWNER_REFS
                or (kind[1] and size < ALIGNED_FROM)):  # never taken
            self._dropped(buf)
            return
        for other in [k for k in self._order if k != kind]:
            if self.free_bytes + size <= self.max_free_bytes:
                break
            self._order.remove(other)
            self._dropped(self._free[other].pop(0))
            self.free_bytes -= other[0]
        if self.free_bytes + size > self.max_free_bytes:
            self._dropped(buf)
            return
        self._free.setdefault(kind, []).append(buf)
        self._order.append(kind)
        self.free_bytes += size

    def _dropped(self, buf: Buffer) -> None:
        if isinstance(buf, bytearray):
            self._on_drop(len(buf))  # back to the heap (a map goes back to the system)

    def set_max_free_bytes(self, max_free_bytes: int) -> None:
        """A new bound (the memory budget changed); idle buffers beyond it go."""
        self.max_free_bytes = max_free_bytes
        for key in sorted(self._free, reverse=True):
            size, free = key[0], self._free[key]
            while free and self.free_bytes > max_free_bytes:
                free.pop()
                self._order.remove(key)
                self.free_bytes -= size

    def clear(self) -> None:
        self._free.clear()
        self._order.clear()
        self.free_bytes = 0


def allocate(size: int, aligned: bool = False) -> Buffer:
    """A new buffer of *size* bytes; *aligned*: a map from ``ALIGNED_FROM``."""
    if aligned and size >= ALIGNED_FROM:
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
