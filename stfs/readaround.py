"""Read-around: after a random read, put the window around it into the kernel's
page cache for the mount (``FUSE_NOTIFY_STORE``), so the reader's next reads
nearby are answered by the kernel without a round trip to the daemon.

A random reader gets no kernel read-ahead (that is what ``POSIX_FADV_RANDOM``
or a seek pattern means), so without this every 4 KiB read is a FUSE request,
about a hundred microseconds in Python. Local file systems read around a page
fault for the same reason (mmap's fault-around).

It only ever costs a memory copy: a window is pushed only when SOURCE already
has all of it in its own page cache (``cachestat(2)``, then a
``preadv2(RWF_NOWAIT)`` copy), never read from the device for it (so nothing
is pushed on kernels before 6.5); only while pressure allows read-ahead; one push at a time,
in a worker thread (the store waits for page locks that a pending read of the
same pages holds until the event loop answers it); with a speculative
reservation of the memory budget for the buffer. The window's bytes are
checked to be of the handle's version before and after the store; if the file
changed meanwhile, the inode's cached pages are dropped again.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Callable

import trio

from stfs.backing import FileIdentity, cached_pages, pread_if_cached
from stfs.budget import MemoryBudget
from stfs.buffers import BufferPool
from stfs.descriptors import DescriptorTable
from stfs.handles import OpenFile
from stfs.resources import Priority, ResourceRegistry

log = logging.getLogger(__name__)

KernelStore = Callable[[int, int, memoryview], None]
"""Blocking: put bytes into the kernel's page cache of (node id, offset)."""
KernelInvalidate = Callable[[int], None]
"""Blocking: drop the kernel's cached pages of a node id."""

WINDOW_BYTES = 256 * 1024
"""Bytes pushed around a random read of a large file (aligned)."""
_PAGE = os.sysconf("SC_PAGE_SIZE")
PUSHED_WINDOWS = 4096
"""Windows remembered as pushed (per file version), so each is pushed once."""


class ReadAround:
    """Pushes windows around random reads into the kernel page cache."""

    def __init__(self, store: KernelStore | None, invalidate: KernelInvalidate | None,
                 budget: MemoryBudget, pool: BufferPool, descriptors: DescriptorTable,
                 resources: ResourceRegistry, window_bytes: int = WINDOW_BYTES) -> None:
        self._store = store
        self._invalidate = invalidate
        self._budget = budget
        self._pool = pool
        self._descriptors = descriptors
        self._resources = resources
        self.window_bytes = window_bytes
        self._pushed: collections.OrderedDict[tuple[FileIdentity, int], None] = (
            collections.OrderedDict())
        self._limiter = trio.CapacityLimiter(1)
        self.pushes = 0
        self.pushed_bytes = 0
        self.skipped_uncached = 0

    @property
    def enabled(self) -> bool:
        return self._store is not None

    def window(self, identity: FileIdentity, offset: int, whole_file_bytes: int) -> tuple[int, int]:
        """The window (start, size) to push around a read at *offset*: the whole
        file when it is read as one chunk (*whole_file_bytes*, else 0)."""
        if whole_file_bytes:
            return 0, whole_file_bytes
        start = offset - offset % self.window_bytes
        return start, self.window_bytes

    def wanted(self, identity: FileIdentity, start: int) -> bool:
        """Whether the window at *start* of *identity* has not been pushed yet
        (marks it pushed: one attempt per window)."""
        key = (identity, start)
        if key in self._pushed:
            self._pushed.move_to_end(key)
            return False
        self._pushed[key] = None
        if len(self._pushed) > PUSHED_WINDOWS:
            self._pushed.popitem(last=False)
        return True

    async def push(self, handle: OpenFile, start: int, size: int) -> int:
        """Push ``[start, start + size)`` of *handle*'s file; returns the bytes
        pushed (0 when skipped). Errors end the push quietly: it is only a hint."""
        if self._store is None or not self._budget.try_reserve_speculative(size):
            return 0
        scope = trio.CancelScope()
        tracked = self._resources.register(handle.fh, "read-around", Priority.SPECULATIVE,
                                           scope.cancel, size)
        buf = self._pool.take(size)
        try:
            with scope:
                fd = await self._descriptors.pin(handle)
                try:
                    async with self._limiter:
                        pushed = await trio.to_thread.run_sync(
                            _push_cached, fd, buf, start, handle.nodeid, handle.identity,
                            self._store, self._invalidate)
                finally:
                    self._descriptors.unpin(handle)
                if pushed:
                    self.pushes += 1
                    self.pushed_bytes += pushed
                else:
                    self.skipped_uncached += 1
                return pushed
            return 0
        except OSError as exc:  # ENOENT: the kernel forgot the node; anything else
            log.debug("read-around of %r at %d stopped: %r", handle.path, start, exc)
            return 0
        finally:
            self._resources.forget(tracked)
            self._budget.speculative_done(size)
            self._budget.release(size)
            self._pool.give(buf)

    def as_dict(self) -> dict[str, int]:
        return {"pushes": self.pushes, "pushed_bytes": self.pushed_bytes,
                "skipped_uncached": self.skipped_uncached, "window_bytes": self.window_bytes}


def _push_cached(fd: int, buf: bytearray, start: int, nodeid: int, identity: FileIdentity,
                 store: KernelStore, invalidate: KernelInvalidate | None) -> int:
    """In a worker thread: copy the window if SOURCE has it cached, store it in
    the kernel's page cache, and undo that if the file changed meanwhile."""
    # Ask first: a RWF_NOWAIT read that misses starts read-ahead of the window
    # from the device, which is exactly the I/O read-around must never cause.
    wanted = min(len(buf), identity.size - start)
    pages = cached_pages(fd, start, wanted)
    if pages is None or pages * _PAGE < wanted - (_PAGE - 1):
        return 0
    got = pread_if_cached(fd, buf, start)
    if got is None:
        return 0
    data, read_under = got
    if read_under != identity or not data:
        return 0
    with memoryview(data) as view:
        store(nodeid, start, view)
    if FileIdentity.of(os.fstat(fd)) != identity:
        if invalidate is not None:
            invalidate(nodeid)
        return 0
    return len(data)
