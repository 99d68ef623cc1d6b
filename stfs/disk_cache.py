"""The persistent chunk cache on local disk (``--cache-dir``, ``--cache-size``).

A tier below the memory cache: a read that misses memory looks here before
SOURCE (``Fetcher``), and every chunk read from SOURCE, read-ahead's too, is
written here behind the reply. A remount, a restart or a working set larger
than ``--memory-limit`` then reads a slow store once.

* **Never stale.** Entries are keyed by the file's identity (device, inode,
  size, mtime_ns, ctime_ns) and the chunk, exactly as the memory cache is: a
  file that changes gets a new identity, and its old entries are never
  looked up again (they age out). A chunk served from here is checked
  against the file like a memory hit (``VersionGuard``).
* **Never torn.** Each entry carries the xxh3-64 of its bytes, checked on
  every read; a bad entry is dropped and counted, and the read goes to
  SOURCE. Entries are written whole, then renamed (``stfs.disk_store``).
* **Bounded.** On disk by ``--cache-size``: room is made (entries unlinked)
  before a new entry is written. In memory by ``--memory-limit``: the index
  is reserved in the budget (``INDEX_SHARE`` of the limit, so at most
  ``index_bytes // ENTRY_BYTES`` entries), reads land in budgeted chunk
  buffers, and a chunk being written is pinned in the memory cache (its
  bytes stay held until written), never copied. A chunk the memory cache
  evicts before its write comes up stays held for it, within ``KEEP_SHARE``
  of the limit; past that it is not written (``writes_missed``): readers
  never wait for the disk. A missed chunk is remembered (within
  ``MISSED_SHARE`` of the index's memory) and, once the writer has nothing
  else to do (at the latest while the mount closes), read from SOURCE again
  and written (``refills``): a pass that outran the disk still leaves the
  whole file on it, so the next pass reads none of it from SOURCE.
* **Scan-resistant.** 2Q like the memory cache: new entries enter ``A1in``;
  an entry read back (a real reuse) or written again while its ghost is
  remembered moves to the LRU ``Am``; ``A1in`` gives up its own first while it
  holds more than its quarter. After a restart every entry starts in ``Am``
  in the order of its file's mtime (set when written or last read).
* **Off the loop.** Reads, writes and unlinks run in worker threads (the
  start's scan before the loop runs): reads at most ``READERS`` at once;
  writes in FIFO order by ``run``'s writer task, up to ``WRITE_BATCH`` a
  step in ``WRITE_LANES`` threads, the files of evicted entries unlinked
  before the step's first write.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import errno
import logging
import math
import mmap
import os
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from stfs.backing import ChunkData, FileIdentity
from stfs.budget import MemoryBudget
from stfs.buffers import Buffer
from stfs.cache import ChunkCache, ChunkKey
from stfs.disk_store import FIXED_BYTES, DiskStore, EntryKey, StoredEntry, disk_bytes, entry_name

log = logging.getLogger(__name__)

ENTRY_BYTES = 320
"""Index memory per entry, its share of the ghost list included, counted against
the budget (``tests/engine/test_disk_cache.py`` measures it and holds it to this)."""
INDEX_SHARE = 16
"""The index may hold 1/INDEX_SHARE of the memory limit."""
READERS = 4
"""Entries read from disk at once."""
WRITE_BATCH = 8
"""Queued chunks written in one step of the writer."""
WRITE_LANES = 2
"""Worker threads a batch's entries are written in, side by side: one direct
write at a time leaves the device idle between requests (this disk read 1 MiB
direct at 0.7-0.8 GB/s from one thread, 1.2 GB/s from two). Alone it did not
stop missed writes at 5 ms; ``lagging`` does."""
PENDING_WRITES = 1024
"""Chunks waiting to be written; beyond it, new ones are not (``writes_missed``)."""
A1IN_SHARE = 0.25
GHOST_SHARE = 8
"""The ghost list remembers evicted keys up to 1/GHOST_SHARE of the entry bound."""
OVERLAPS = 8
"""Entries a lookup looks back over for one that holds the byte."""
KEEP_SHARE = 4
"""Evicted chunks waiting to be written may hold 1/KEEP_SHARE of the memory limit."""
MISSED_SHARE = 16
"""Missed writes remembered for a refill may take 1/MISSED_SHARE of the index's
memory (``ENTRY_BYTES`` and the path each); beyond, the oldest are forgotten."""

REFILL_RECHECK_S = 1.0
"""How often the writer, with only refills left, looks whether SOURCE is quiet."""

Refill = Callable[[EntryKey, bytes, mmap.mmap], Awaitable[bool]]
"""Reads the chunk *key* of the SOURCE file at path into the buffer: whether it
is all there and of the key's identity (``ReadEngine._refill``)."""


def _missed_cost(path: bytes) -> int:
    """What remembering one missed chunk of the file at *path* counts against its share."""
    return ENTRY_BYTES + len(path)


class _WriteJob:
    __slots__ = ("data", "evicted", "key", "size")

    def __init__(self, key: EntryKey, data: ChunkData, size: int,
                 evicted: list[EntryKey]) -> None:
        self.key = key
        self.data = data
        self.size = size
        self.evicted = evicted


class DiskIndex:
    """Which entries are on disk, in 2Q order, within a byte and an entry bound.

    Pure bookkeeping on the trio thread: ``add``, ``reserve`` and ``shrink_to``
    return the entries evicted, for the caller to unlink. Kept lean (``ENTRY_BYTES``): an
    entry is its key, once in a queue and once in its file's sorted list."""

    def __init__(self, capacity_bytes: int, max_entries: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.max_entries = max_entries
        self._a1in: collections.OrderedDict[EntryKey, None] = collections.OrderedDict()
        self._am: collections.OrderedDict[EntryKey, None] = collections.OrderedDict()
        self._a1out: collections.OrderedDict[EntryKey, None] = collections.OrderedDict()
        self._spans: dict[FileIdentity, list[EntryKey]] = {}
        """Each identity's entries sorted by start, for containment lookups."""
        self.a1in_bytes = 0
        self.used_bytes = 0
        """Entries' bytes plus room made for writes in progress."""
        self.reserved_bytes = 0
        """Of which room made for writes in progress."""
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._a1in) + len(self._am)

    def __contains__(self, key: EntryKey) -> bool:
        return key in self._am or key in self._a1in

    def find(self, identity: FileIdentity, offset: int) -> EntryKey | None:
        """The entry of *identity* holding byte *offset* (of those that do, the one
        starting last). Entries may overlap (chunk boundaries differ between
        passes), so a few before the last start at or below *offset* are looked at."""
        spans = self._spans.get(identity)
        if spans:
            i = bisect.bisect_right(spans, EntryKey(identity, offset, 1 << 62)) - 1
            for j in range(i, max(-1, i - OVERLAPS), -1):
                if offset < spans[j].start + spans[j].length:
                    return spans[j]
        return None

    def covers(self, key: EntryKey) -> bool:
        """An entry holds all of *key*'s bytes already."""
        found = self.find(key.identity, key.start)
        return found is not None and found.start + found.length >= key.start + key.length

    def used(self, key: EntryKey) -> None:
        """An entry was read back: real reuse, to the LRU."""
        if key in self._a1in:
            del self._a1in[key]
            self.a1in_bytes -= disk_bytes(key.length)
            self._am[key] = None
        elif key in self._am:
            self._am.move_to_end(key)

    def reserve(self, n_bytes: int) -> list[EntryKey]:
        """Make room for a write of *n_bytes* and count them used; the evicted."""
        evicted = self._evict_for(n_bytes, 1)
        self.used_bytes += n_bytes
        self.reserved_bytes += n_bytes
        return evicted

    def unreserve(self, n_bytes: int) -> None:
        self.used_bytes -= n_bytes
        self.reserved_bytes -= n_bytes

    def add(self, key: EntryKey, reserved: int, old: bool = False) -> list[EntryKey]:
        """Index an entry written with *reserved* bytes (from ``reserve``; 0: count
        them now). *old*: found at start, into ``Am``. Returns the evicted."""
        size = disk_bytes(key.length)
        evicted = [] if reserved else self._evict_for(size, 1)
        self.used_bytes += size - reserved
        self.reserved_bytes -= reserved
        ghost = key in self._a1out
        if ghost:
            del self._a1out[key]
        if old or ghost:
            self._am[key] = None
        else:
            self._a1in[key] = None
            self.a1in_bytes += size
        bisect.insort(self._spans.setdefault(key.identity, []), key)
        return evicted + self._evict_for(0, 0)

    def shrink_to(self, capacity_bytes: int) -> list[EntryKey]:
        """A lower bound (the file system filled up): the evicted."""
        self.capacity_bytes = capacity_bytes
        return self._evict_for(0, 0)

    def remove(self, key: EntryKey) -> bool:
        if key in self._a1in:
            del self._a1in[key]
            self.a1in_bytes -= disk_bytes(key.length)
        elif key in self._am:
            del self._am[key]
        else:
            return False
        self.used_bytes -= disk_bytes(key.length)
        spans = self._spans[key.identity]
        del spans[bisect.bisect_left(spans, key)]
        if not spans:
            del self._spans[key.identity]
        return True

    def _evict_for(self, n_bytes: int, n_entries: int) -> list[EntryKey]:
        evicted = []
        while len(self) and (self.used_bytes + n_bytes > self.capacity_bytes
                             or len(self) + n_entries > self.max_entries):
            if self._a1in and (self.a1in_bytes > self.capacity_bytes * A1IN_SHARE
                               or not self._am):
                key = next(iter(self._a1in))
                self._a1out[key] = None
                if len(self._a1out) > self.max_entries // GHOST_SHARE:
                    self._a1out.popitem(last=False)
            else:
                key = next(iter(self._am))
            self.remove(key)
            self.evictions += 1
            evicted.append(key)
        return evicted


@dataclasses.dataclass(frozen=True)
class DiskCacheStatistics:
    directory: str
    bytes: int
    limit_bytes: int
    entries: int
    entry_limit: int
    index_bytes: int
    hits: int
    misses: int
    hit_bytes: int
    writes: int
    written_bytes: int
    writes_missed: int
    refills: int
    write_errors: int
    evictions: int
    verify_failures: int

    def as_stats(self) -> dict[str, Any]:
        """The ``disk_cache_*`` keys of the stats document."""
        return {f"disk_cache_{k}" if k != "directory" else "disk_cache_dir": v
                for k, v in dataclasses.asdict(self).items()}


NO_DISK_CACHE = {f"disk_cache_{f.name}" if f.name != "directory" else "disk_cache_dir": None
                 for f in dataclasses.fields(DiskCacheStatistics)}
"""The stats keys of a mount without a disk cache (null: Prometheus leaves them out)."""


class DiskCache:
    """The disk tier: lookups, verified reads, write-behind, eviction."""

    def __init__(self, store: DiskStore, capacity_bytes: int, index_bytes: int,
                 cache: ChunkCache, budget: MemoryBudget, keep_bytes: int,
                 refill: Refill | None = None,
                 quiet: Callable[[], bool] = lambda: True) -> None:
        """*keep_bytes*: how much of the budget chunks evicted from memory before
        they were written may hold while they wait for the writer. *refill*: how
        missed chunks are read again (None: they are not), only while *quiet()*
        (no read of the mount in progress: a refill never competes with a pass)."""
        self.store = store
        self.cache = cache
        self.budget = budget
        self.keep_bytes = keep_bytes
        self._queued: collections.Counter[ChunkKey] = collections.Counter()
        """Chunks with a write queued (the memory cache's keys)."""
        self._kept: dict[ChunkKey, ChunkData] = {}
        """Chunks evicted from memory with a write queued, held in the budget."""
        self.kept_bytes = 0
        cache.on_evict = self._keep_evicted
        budget.speculative_reclaimer = lambda n: cache.reclaim_if(n, self.may_evict)
        self.index_bytes = index_bytes
        self._missed_limit = index_bytes // MISSED_SHARE
        self.index = DiskIndex(capacity_bytes - FIXED_BYTES,
                               max(1, (index_bytes - self._missed_limit) // ENTRY_BYTES))
        self.capacity_bytes = capacity_bytes
        self._readers = trio.CapacityLimiter(READERS)
        self._pending: collections.deque[tuple[EntryKey, bytes]] = collections.deque()
        """Chunks to write (with their file's path), in the order they landed."""
        self._refill = refill
        self._quiet = quiet
        self._missed: collections.OrderedDict[EntryKey, bytes] = collections.OrderedDict()
        """Chunks not written, with their file's path: read again when the writer is idle."""
        self._missed_bytes = 0
        self._pending_writes = 0
        self.unwritten_bytes = 0
        """Of the chunks queued or being written."""
        self._to_unlink: list[str] = []
        """Files of entries evicted or dropped, unlinked before the next write."""
        self._to_touch: list[str] = []
        """Entries read back, whose mtime is set when no write waits."""
        self._wake = trio.Event()
        self._busy = 0
        """Writers in a step now."""
        self._idle = trio.Event()
        self._idle.set()
        self._nursery: trio.Nursery | None = None
        self.hits = self.misses = self.hit_bytes = 0
        self.writes = self.written_bytes = self.writes_missed = self.write_errors = 0
        self.refills = 0
        self.verify_failures = 0

    def load(self, entries: list[StoredEntry]) -> list[EntryKey]:
        """Index what the start's scan found (oldest first); returns what did not
        fit (the bound is lower than last time), to remove."""
        dropped: list[EntryKey] = []
        for stored in entries:
            dropped += self.index.add(stored.key, 0, old=True)
        return dropped

    # -- lookups and reads (trio thread) --------------------------------------

    def find(self, identity: FileIdentity, offset: int) -> EntryKey | None:
        return self.index.find(identity, offset)

    async def read(self, key: EntryKey, buf: Buffer) -> bool:
        """Fill *buf* from the entry *key*: True when its bytes are whole and
        right. A damaged entry is dropped and counted; a vanished one (evicted
        meanwhile) is a miss."""
        if key not in self.index:  # evicted since it was found
            self.misses += 1
            return False
        try:
            ok = await trio.to_thread.run_sync(self.store.read, key, buf, limiter=self._readers)
        except OSError as exc:
            log.warning("disk cache: reading %s failed: %s", entry_name(key), exc)
            ok = False
        if ok:
            self.hits += 1
            self.hit_bytes += key.length
            self.index.used(key)
            self._touch(entry_name(key))
            return True
        if ok is None:  # evicted and unlinked while we looked
            self.misses += 1
            return False
        self.verify_failures += 1
        log.warning("disk cache: entry %s failed its check; dropped, reading SOURCE",
                    entry_name(key))
        if self.index.remove(key):
            self._unlink([key])
        return False

    def miss(self) -> None:
        self.misses += 1

    # -- write-behind ------------------------------------------------------------

    def offer(self, identity: FileIdentity, start: int, length: int, path: bytes = b"") -> None:
        """A chunk of the SOURCE file at *path* landed in the memory cache: write it
        here later."""
        key = EntryKey(identity, start, length)
        if length <= 0 or self.index.covers(key):
            return
        if disk_bytes(length) > self.index.capacity_bytes:  # lowered by a full disk
            self.writes_missed += 1
            return
        if self._pending_writes >= PENDING_WRITES:
            self._missed_write(key, path)
            return
        self._pending_writes += 1
        self.unwritten_bytes += length
        self._queued[(identity, start)] += 1
        self._queue(key, path)

    def _missed_write(self, key: EntryKey, path: bytes) -> None:
        """*key* is not written now: counted, and remembered for a refill."""
        self.writes_missed += 1
        if self._refill is None or not path or key in self._missed:
            return
        cost = _missed_cost(path)
        if cost > self._missed_limit:
            return
        self._missed[key] = path
        self._missed_bytes += cost
        while self._missed_bytes > self._missed_limit:
            _, oldest = self._missed.popitem(last=False)
            self._missed_bytes -= _missed_cost(oldest)
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._wake.set()

    def lagging(self) -> bool:
        """More than the keep share waits to be written: read-ahead from SOURCE
        pauses (``Fetcher.fetch``) until the writer catches up. Past that share
        memory would have to drop chunks before they are written, and a pass of
        a slow store would not be all on disk (measured: a few chunks a pass at
        5 ms when the disk stalled)."""
        return self.unwritten_bytes > self.keep_bytes

    def _keep_evicted(self, key: ChunkKey, data: ChunkData) -> bool:
        """The memory cache evicts *key*: keep its bytes (and their reservation)
        for the write queued, within ``keep_bytes``. Readers never wait for
        this: past the share, an evicted chunk is simply not written."""
        if key not in self._queued or key in self._kept or (
                self.kept_bytes + len(data) > self.keep_bytes):
            return False
        self._kept[key] = data
        self.kept_bytes += len(data)
        return True

    def may_evict(self, key: ChunkKey, size: int) -> bool:
        """Read-ahead may evict this chunk from memory to make room: it is on disk
        (or never will be), or it can be kept for its queued write."""
        return key not in self._queued or (
            key not in self._kept and self.kept_bytes + size <= self.keep_bytes)

    def shed(self) -> int:
        """Critical memory pressure: give back what waits to be written; the bytes."""
        freed = self.kept_bytes
        self._kept.clear()
        self.kept_bytes = 0
        self.budget.release(freed)
        return freed

    def _touch(self, name: str) -> None:
        """An entry was read: its mtime is set (in a batch, when the writer is free)."""
        if self._nursery is not None:
            self._to_touch.append(name)
            self._idle = trio.Event() if self._idle.is_set() else self._idle
            self._wake.set()

    def _unlink(self, keys: list[EntryKey]) -> None:
        """Entries out of the index: their files go before the next write."""
        if keys and self._nursery is not None:
            self._to_unlink += [entry_name(k) for k in keys]
            self._idle = trio.Event() if self._idle.is_set() else self._idle
            self._wake.set()

    def _queue(self, key: EntryKey, path: bytes) -> None:
        if self._nursery is None:
            self._pending_writes -= 1
            self.unwritten_bytes -= key.length
            self._unqueue((key.identity, key.start))
            return
        self._pending.append((key, path))
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._wake.set()

    async def drained(self) -> None:
        """Wait until every queued write, unlink, touch and refill is done (tests,
        unmount)."""
        self._wake.set()  # refills need not wait for the writer's next look
        await self._idle.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """The writer until cancelled, one step at a time. One: its unlinks always
        come before its writes, so a full file system is seen as full only when
        it is (two writers made room for each other's writes out of order, saw
        ENOSPC and shrank the cache to nothing)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                nursery.start_soon(self._writer)
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None
                self._pending.clear()
                self._missed.clear()
                self._missed_bytes = 0
                self._pending_writes = 0
                self.unwritten_bytes = 0
                self._queued.clear()
                self.shed()
                self._idle.set()

    async def _writer(self) -> None:
        while True:
            if not (self._pending or self._to_unlink or self._to_touch
                    or (self._missed and self._quiet())):
                if not self._busy and not self._missed:
                    self._idle.set()
                if self._wake.is_set():
                    self._wake = trio.Event()
                # Refills wait for a moment when no read is in progress.
                with trio.move_on_after(REFILL_RECHECK_S if self._missed else math.inf):
                    await self._wake.wait()
                continue
            self._busy += 1
            try:
                await self._step()
            except Exception:  # a background task: never the mount's end
                log.exception("disk cache: writing to %s failed", self.store.path)
            finally:
                self._busy -= 1

    async def _step(self) -> None:
        """Unlinks first (room is made before any write), then writes, then touches
        (only when no write waits), then refills (only when nothing else does)."""
        if self._to_unlink:
            names, self._to_unlink = self._to_unlink, []
            await trio.to_thread.run_sync(self.store.remove, names)
        elif self._pending:
            await self._write_next()
        elif self._to_touch:
            names, self._to_touch = self._to_touch, []
            await trio.to_thread.run_sync(self.store.touch, names)
        else:
            await self._refill_next()

    async def _refill_next(self) -> None:
        """Write the oldest missed chunk: from memory if it is back there, else read
        from SOURCE again (within the read-ahead share of the budget; with no room
        now it is forgotten, as a later pass offers it again)."""
        key, path = self._missed.popitem(last=False)
        self._missed_bytes -= _missed_cost(path)
        if self.index.covers(key) or self._refill is None:
            return
        chunk_key = (key.identity, key.start)
        held = self.cache.pin(chunk_key)
        if held is not None:
            try:
                if len(held) == key.length:
                    await self._write_one(key, held)
                    return
            finally:
                del held
                self.cache.unpin(chunk_key)
        if not self.budget.try_reserve_speculative(key.length):
            return
        try:
            buf = mmap.mmap(-1, key.length)  # page-aligned: written with O_DIRECT
            try:
                if await self._refill(key, path, buf):
                    self.refills += 1
                    await self._write_one(key, buf)
            finally:
                with contextlib.suppress(BufferError):  # else it goes with its last view
                    buf.close()
        finally:
            self.budget.speculative_done(key.length)
            self.budget.release(key.length)

    async def _write_one(self, key: EntryKey, data: ChunkData) -> None:
        size = disk_bytes(key.length)
        jobs = [_WriteJob(key, data, size, self.index.reserve(size))]
        try:
            errors, free = await self._write_jobs(jobs)
        finally:
            jobs[0].data = b""
        self._commit(jobs, errors, free)

    async def _write_next(self) -> None:
        """The next chunks in the queue, up to ``WRITE_BATCH``. A batch's chunks are
        pinned while written: within the keep share, so what memory evicts
        meanwhile never holds more than that."""
        batch = [self._pending.popleft()]
        n_bytes = batch[0][0].length
        while (self._pending and len(batch) < WRITE_BATCH
               and n_bytes + self._pending[0][0].length <= self.keep_bytes):
            batch.append(self._pending.popleft())
            n_bytes += batch[-1][0].length
        self._pending_writes -= len(batch)
        try:
            await self._write(batch)
        finally:
            for key, _ in batch:
                self.unwritten_bytes -= key.length
                self._unqueue((key.identity, key.start))

    def _unqueue(self, chunk_key: ChunkKey) -> None:
        self._queued[chunk_key] -= 1
        if self._queued[chunk_key] <= 0:
            del self._queued[chunk_key]
            data = self._kept.pop(chunk_key, None)
            if data is not None:  # written (or not) now: its bytes go back
                self.kept_bytes -= len(data)
                self.budget.release(len(data))

    async def _write(self, batch: list[tuple[EntryKey, bytes]]) -> None:
        """Write queued chunks still in memory (or kept), in one worker thread call."""
        jobs: list[_WriteJob] = []
        pinned: list[ChunkKey] = []
        data: ChunkData | None = None
        try:
            for key, path in batch:
                chunk_key = (key.identity, key.start)
                if self.index.covers(key):
                    continue
                data = self._kept.get(chunk_key)
                if data is None:
                    data = self.cache.pin(chunk_key)
                    if data is not None:
                        pinned.append(chunk_key)
                if data is not None and len(data) != key.length:
                    continue  # replaced by a longer chunk from the same byte: its own write
                if data is None:
                    log.debug("disk cache: %s left memory before it was written",
                              entry_name(key))
                    self._missed_write(key, path)
                    continue
                size = disk_bytes(key.length)
                # Room first (unlinked before this write): never over the size.
                jobs.append(_WriteJob(key, data, size, self.index.reserve(size)))
            data = None  # the jobs hold what is written
            errors, free = await self._write_jobs(jobs)
        finally:
            for job in jobs:
                job.data = b""
            for chunk_key in pinned:
                self.cache.unpin(chunk_key)
        self._commit(jobs, errors, free)

    def _commit(self, jobs: list[_WriteJob], errors: list[OSError | None], free: int) -> None:
        """Index what was written; count what failed; shrink to a full file system."""
        full = False
        for job, error in zip(jobs, errors):
            if error is not None:
                self.index.unreserve(job.size)
                self.write_errors += 1
                full = full or error.errno == errno.ENOSPC
                if error.errno != errno.ENOSPC:
                    log.warning("disk cache: writing %s failed: %s", entry_name(job.key), error)
        for job, error in zip(jobs, errors):
            if error is None:
                self.writes += 1
                self.written_bytes += job.key.length
                more = self.index.add(job.key, job.size)
                if more:
                    self._unlink(more)
        # What the file system holds: the entries on disk and its free space.
        fits = self.index.used_bytes - self.index.reserved_bytes + free - FIXED_BYTES
        if full and fits < self.index.capacity_bytes:
            # The file system filled up (others use it too): keep what fits now.
            log.warning("disk cache: %s is full; the cache is lowered to %d bytes",
                        self.store.path, max(0, fits))
            self._unlink(self.index.shrink_to(max(0, fits)))

    async def _write_jobs(self, jobs: list[_WriteJob]) -> tuple[list[OSError | None], int]:
        """Each job's error (None: written), and the file system's free bytes
        after. Every job's room is unlinked first, then the entries are written
        in ``WRITE_LANES`` threads."""
        evicted = [entry_name(k) for job in jobs for k in job.evicted]
        if evicted:
            await trio.to_thread.run_sync(self.store.remove, evicted)
        errors: list[OSError | None] = [None] * len(jobs)

        def write_lane(lane: int) -> None:
            for i in range(lane, len(jobs), WRITE_LANES):
                try:
                    self.store.write(jobs[i].key, jobs[i].data)
                except OSError as exc:
                    errors[i] = exc

        async with trio.open_nursery() as nursery:
            for lane in range(min(WRITE_LANES, len(jobs))):
                nursery.start_soon(trio.to_thread.run_sync, write_lane, lane)
        free = (await trio.to_thread.run_sync(self.store.free_bytes) if any(errors)
                else 1 << 62)
        return errors, free

    def statistics(self) -> DiskCacheStatistics:
        return DiskCacheStatistics(
            os.fspath(self.store.path), self.index.used_bytes + FIXED_BYTES,
            self.capacity_bytes, len(self.index), self.index.max_entries, self.index_bytes,
            self.hits, self.misses, self.hit_bytes, self.writes, self.written_bytes,
            self.writes_missed, self.refills, self.write_errors, self.index.evictions,
            self.verify_failures)
