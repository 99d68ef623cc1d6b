"""Read-around: after a random read, put the window around it into the kernel's
page cache for the mount (``FUSE_NOTIFY_STORE``), so the reader's next reads
nearby are answered by the kernel without a round trip to the daemon.

A random reader gets no kernel read-ahead (that is what ``POSIX_FADV_RANDOM``
or a seek pattern means), so without this every 4 KiB read is a FUSE request,
about a hundred microseconds in Python. Local file systems read around a page
fault for the same reason (mmap's fault-around).

It only ever costs a memory copy: a window is pushed only when SOURCE already
has all of it in its own page cache (``cachestat(2)``; so nothing is pushed on
kernels before 6.5), never read from the device for it. The store is written
straight from a read-only mapping of those pages, so the kernel copies from
SOURCE's page cache into the mount's once, with no copy through the daemon
(that halved the time to push a window). No Python code touches the mapping:
if the file shrinks meanwhile, the kernel's copy fails with EFAULT rather
than a signal, and the check after the store drops what got in. The event
loop only queues a window (with its own duplicate of the descriptor, so
closing the handle cannot hand the number to another file); one worker
thread maps and stores (the store waits for page locks that a pending read
of the same pages holds until the event loop answers it); the mapping's size
is reserved from the memory budget for good. When the queue is full the
window is skipped, not remembered: a later read there offers it again.

The window grows with the reader, as read-ahead does for a sequential one:
every second window offered for a file version doubles the next, up to
``MAX_GROWTH`` pieces of ``window_bytes`` (pushed one piece at a time, the
one read first). A reader that keeps landing on
pages not yet pushed is spread over the file, and each such landing is a
round trip; larger windows make those few. Only pieces SOURCE has cached are
ever pushed, so the kernel's copy never outgrows SOURCE's, and
``pause()`` (heavy memory pressure) stops a window between pieces. The bytes
are checked to be of the handle's version before and after the store; if the
file changed meanwhile, the inode's cached pages are dropped again.
"""

from __future__ import annotations

import collections
import logging
import mmap
import os
import queue
import threading
from collections.abc import Callable

from stfs import lru
from stfs.backing import FileIdentity, cached_pages
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
MAX_GROWTH = 64
"""A window grows to at most this many pieces of ``window_bytes``."""
GROWING_FILES = 256
"""File versions whose window growth is remembered."""
_PAGE = os.sysconf("SC_PAGE_SIZE")

_Item = tuple[int, int, FileIdentity, list[tuple[int, int]]]
"""(descriptor, node id, identity, pieces as (start, size), the one read first)"""


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
        self._offered: collections.OrderedDict[FileIdentity, int] = collections.OrderedDict()
        """Windows offered per file version (how far its window has grown)."""
        self._paused = False
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
        """Allow pushes. The worker thread, and its mapping's size reserved from
        the memory budget, start with the first offer: an idle mount pays nothing for them."""
        self._started = self._store is not None

    def _start_worker(self) -> bool:
        if not self._budget.try_reserve(self.window_bytes):
            return False  # no room now; a later offer tries again
        self._reserved = self.window_bytes
        self._thread = threading.Thread(target=self._work, name="stfs-read-around", daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        """Blocking: let the worker finish its queue and end; give back its reservation.
        Called from a worker thread of trio's, before the FUSE session closes."""
        self._started = False
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()
        if self._reserved:
            self._budget.release(self._reserved)
            self._reserved = 0

    def pause(self, paused: bool) -> None:
        """Stop pushing (from the next piece on) while *paused*; offers are refused."""
        self._paused = paused

    def wait_idle(self) -> None:
        """Blocking: until every queued window is done (tests)."""
        self._queue.join()

    # -- the event loop's side ---------------------------------------------------

    def window(self, offset: int, identity: FileIdentity,
               whole_file_bytes: int = 0) -> list[tuple[int, int]]:
        """The pieces (start, size) of the window to push around a read at
        *offset* of *identity*, the one holding *offset* first: the whole file
        when it is read as one chunk (*whole_file_bytes*, else 0)."""
        if whole_file_bytes:
            return [(0, min(whole_file_bytes, self.window_bytes))]
        piece = self.window_bytes
        growth = min(MAX_GROWTH, 1 << (self._offered.get(identity, 0) // 2))
        first = offset - offset % piece
        start = offset - offset % (piece * growth)
        end = min(start + piece * growth, identity.size)
        return [(first, piece)] + [(at, piece) for at in range(start, end, piece) if at != first]

    def offer(self, fd: int, nodeid: int, identity: FileIdentity,
              pieces: list[tuple[int, int]]) -> bool:
        """Queue the *pieces* of *identity* not pushed yet (read through *fd*,
        which is duplicated), unless none is left or the queue is full."""
        if not self._started or self._paused:
            return False
        fresh = []
        for start, size in pieces:
            if (identity, start) in self._pushed:
                self._pushed.move_to_end((identity, start))
            elif start < identity.size:
                fresh.append((start, size))
        if not fresh:
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
        for start, _ in fresh:
            lru.remember(self._pushed, (identity, start), None, PUSHED_WINDOWS)
        lru.remember(self._offered, identity, self._offered.get(identity, 0) + 1, GROWING_FILES)
        self._queue.put((own_fd, nodeid, identity, fresh))
        return True

    # -- the worker ----------------------------------------------------------------

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            fd, nodeid, identity, pieces = item
            try:
                for start, size in pieces:
                    if self._paused or not self._push_counted(fd, nodeid, identity, start,
                                                              size):
                        break
            finally:
                os.close(fd)
                self._queue.task_done()
        self._queue.task_done()

    def _push_counted(self, fd: int, nodeid: int, identity: FileIdentity, start: int,
                      size: int) -> bool:
        """One piece, counted; whether to go on with the window's next."""
        try:
            pushed = self._push(fd, nodeid, identity, start, size)
        except OSError as exc:  # ENOENT: the kernel forgot the node; anything else
            log.debug("read-around of node %d at %d stopped: %r", nodeid, start, exc)
            self.skipped += 1
            return False
        except Exception:  # a worker thread: never take the mount down
            log.exception("read-around of node %d at %d failed", nodeid, start)
            self.skipped += 1
            return False
        if pushed:
            self.pushes += 1
            self.pushed_bytes += pushed
        else:
            self.skipped += 1
        return True

    def _push(self, fd: int, nodeid: int, identity: FileIdentity, start: int, size: int) -> int:
        """Store the piece from SOURCE's page cache if it is all there, and undo
        that if the file changed meanwhile. Returns bytes pushed."""
        assert self._store is not None
        wanted = min(size, identity.size - start)
        # Ask first: touching pages SOURCE does not have would read them from the
        # device, which is exactly the I/O read-around must never cause.
        pages = cached_pages(fd, start, wanted)
        if pages is None or pages * _PAGE < wanted - (_PAGE - 1):
            return 0
        if FileIdentity.of(os.fstat(fd)) != identity:
            return 0
        try:
            with (mmap.mmap(fd, wanted, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                            prot=mmap.PROT_READ, offset=start) as mapped,
                  memoryview(mapped) as window):
                self._store(nodeid, start, window)
        finally:
            changed = FileIdentity.of(os.fstat(fd)) != identity
            if changed and self._invalidate is not None:
                self._invalidate(nodeid)
        return 0 if changed else wanted
