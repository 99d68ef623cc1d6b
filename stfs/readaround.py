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
is pushed on kernels before 6.5). The event loop only queues a window (with
its own duplicate of the descriptor, so closing the handle cannot hand the
number to another file); one worker thread does the copy and the store (the
store waits for page locks that a pending read of the same pages holds until
the event loop answers it), into one buffer reserved from the memory budget
for good. When the queue is full the window is skipped, not remembered: a
later read there offers it again. The bytes are checked to be of the
handle's version before and after the store; if the file changed meanwhile,
the inode's cached pages are dropped again.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
from collections.abc import Callable

from stfs import lru
from stfs.backing import RWF_NOWAIT, FileIdentity, cached_pages
from stfs.budget import MemoryBudget

log = logging.getLogger(__name__)

KernelStore = Callable[[int, int, memoryview], None]
"""Blocking: put bytes into the kernel's page cache of (node id, offset)."""
KernelInvalidate = Callable[[int], None]
"""Blocking: drop the kernel's cached pages of a node id."""

WINDOW_BYTES = 1024 * 1024
"""Bytes pushed around a random read of a large file (aligned)."""
PUSHED_WINDOWS = 4096
"""Windows remembered as pushed (per file version), so each is pushed once."""
MAX_QUEUED = 4
"""Windows waiting for the worker; beyond, offers are skipped."""
_PAGE = os.sysconf("SC_PAGE_SIZE")

_Item = tuple[int, int, FileIdentity, int, int]
"""(descriptor, node id, identity, start, size)"""


class ReadAround:
    """Pushes windows around random reads into the kernel page cache."""

    def __init__(self, store: KernelStore | None, invalidate: KernelInvalidate | None,
                 budget: MemoryBudget, window_bytes: int = WINDOW_BYTES) -> None:
        self._store = store
        self._invalidate = invalidate
        self._budget = budget
        self.window_bytes = window_bytes
        self._pushed: collections.OrderedDict[tuple[FileIdentity, int], None] = (
            collections.OrderedDict())
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._started = False
        self._reserved = 0
        self.pushes = 0
        self.pushed_bytes = 0
        self.skipped = 0
        """Windows SOURCE did not have cached, or that changed meanwhile."""
        self.dropped = 0
        """Windows not offered because the queue was full."""

    @property
    def enabled(self) -> bool:
        return self._store is not None

    # -- lifecycle (the engine's run) ------------------------------------------

    def start(self) -> None:
        """Allow pushes. The worker thread, and its buffer reserved from the memory
        budget, start with the first offer: an idle mount pays nothing for them."""
        self._started = self._store is not None

    def _start_worker(self) -> bool:
        if not self._budget.try_reserve(self.window_bytes):
            return False  # no room now; a later offer tries again
        self._reserved = self.window_bytes
        self._thread = threading.Thread(target=self._work, name="stfs-read-around", daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        """Blocking: let the worker finish its queue and end; give back the buffer.
        Called from a worker thread of trio's, before the FUSE session closes."""
        self._started = False
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()
        if self._reserved:
            self._budget.release(self._reserved)
            self._reserved = 0

    def wait_idle(self) -> None:
        """Blocking: until every queued window is done (tests)."""
        self._queue.join()

    # -- the event loop's side ---------------------------------------------------

    def window(self, offset: int, whole_file_bytes: int) -> tuple[int, int]:
        """The window (start, size) to push around a read at *offset*: the whole
        file when it is read as one chunk (*whole_file_bytes*, else 0)."""
        if whole_file_bytes:
            return 0, min(whole_file_bytes, self.window_bytes)
        return offset - offset % self.window_bytes, self.window_bytes

    def offer(self, fd: int, nodeid: int, identity: FileIdentity, start: int, size: int) -> bool:
        """Queue the window at *start* of *identity* (read through *fd*, which is
        duplicated) unless it was pushed already or the queue is full."""
        if not self._started or start >= identity.size:
            return False
        key = (identity, start)
        if key in self._pushed:
            self._pushed.move_to_end(key)
            return False
        if self._queue.qsize() >= MAX_QUEUED:
            self.dropped += 1
            return False
        if self._thread is None and not self._start_worker():
            return False
        try:
            own_fd = os.dup(fd)
        except OSError:
            return False
        lru.remember(self._pushed, key, None, PUSHED_WINDOWS)
        self._queue.put((own_fd, nodeid, identity, start, size))
        return True

    # -- the worker ----------------------------------------------------------------

    def _work(self) -> None:
        buf = bytearray(self.window_bytes)
        while (item := self._queue.get()) is not None:
            fd, nodeid, identity, start, size = item
            try:
                pushed = self._push(fd, buf, nodeid, identity, start, size)
            except OSError as exc:  # ENOENT: the kernel forgot the node; anything else
                log.debug("read-around of node %d at %d stopped: %r", nodeid, start, exc)
                pushed = 0
            except Exception:  # a worker thread: never take the mount down
                log.exception("read-around of node %d at %d failed", nodeid, start)
                pushed = 0
            finally:
                os.close(fd)
                self._queue.task_done()
            if pushed:
                self.pushes += 1
                self.pushed_bytes += pushed
            else:
                self.skipped += 1
        self._queue.task_done()

    def _push(self, fd: int, buf: bytearray, nodeid: int, identity: FileIdentity,
              start: int, size: int) -> int:
        """Copy the window if SOURCE has it cached, store it in the kernel's page
        cache, and undo that if the file changed meanwhile. Returns bytes pushed."""
        assert self._store is not None
        wanted = min(size, identity.size - start)
        # Ask first: a RWF_NOWAIT read that misses starts read-ahead of the window
        # from the device, which is exactly the I/O read-around must never cause.
        pages = cached_pages(fd, start, wanted)
        if pages is None or pages * _PAGE < wanted - (_PAGE - 1) or not RWF_NOWAIT:
            return 0
        if FileIdentity.of(os.fstat(fd)) != identity:
            return 0
        with memoryview(buf) as view, view[:wanted] as window:
            try:
                got = os.preadv(fd, [window], start, RWF_NOWAIT)
            except BlockingIOError:
                return 0
            if got != wanted or FileIdentity.of(os.fstat(fd)) != identity:
                return 0
            self._store(nodeid, start, window)
        if FileIdentity.of(os.fstat(fd)) != identity:
            if self._invalidate is not None:
                self._invalidate(nodeid)
            return 0
        return wanted
