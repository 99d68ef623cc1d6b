"""The read path: every FUSE read of file data enters through ``ReadEngine.read``.

::

    FUSE read(fh, offset, size)
      -> ReadEngine.read            counters, retry when the file changed, checksums
         -> VersionGuard.check      fstat before serving from a new chunk
         -> RequestPlanner.plan     chunk size; sequential or a seek
         -> Fetcher.chunk_at        chunk cache | a read in flight | disk cache | a new read
            -> BackingReads         worker thread under the concurrency cap, retries
               -> BackingReader     SOURCE (stfs.backing), or a test's fake
         -> Fetcher.assemble        a reply spanning chunks, in a reserved buffer
         -> ReadAhead               prefetch for sequential streams, read-around
                                    for random ones

A request inside one chunk is answered with a memoryview of it, without a
copy. Every byte of file data is reserved in the ``MemoryBudget`` before it
is read (chunks in flight, cached chunks, read-ahead, the reply buffer of a
request that spans chunks), so the data held never exceeds the limit.
Pressure (``stfs.pressure``) steers the engine through ``apply_pressure``.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import functools
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import trio

from stfs.backing import FileIdentity
from stfs.backing_reads import BackingReader, BackingReads, SourceReader
from stfs.budget import MemoryBudget
from stfs.buffers import Buffer, BufferPool
from stfs.cache import ChunkCache, ChunkKey
from stfs.checksums import ChecksumRegistry, ChecksumStore
from stfs.chunking import PAGE, AdaptiveChunkSizer, RequestPlanner, StreamState
from stfs.congestion import CongestionController
from stfs.descriptors import DEFAULT_LIMIT, DescriptorTable, Opener
from stfs.disk_cache import INDEX_SHARE, KEEP_SHARE, DiskCache
from stfs.disk_store import DiskStore, EntryKey, StoredEntry, entry_name
from stfs.fetcher import Fetcher
from stfs.handles import OpenFile
from stfs.memory import HeapTrimmer
from stfs.metrics import Counters, Histogram
from stfs.pressure import CACHE_SHARE, Level
from stfs.random_reads import WideChunks
from stfs.readahead import ReadAhead
from stfs.readaround import WINDOW_BYTES, KernelInvalidate, KernelStore, ReadAround
from stfs.recovery import StreamVerifier
from stfs.resources import Priority, ResourceRegistry
from stfs.retry import DEFAULT_SETTINGS, RetrySettings
from stfs.streams import Stream, StreamTable
from stfs.versions import IdentityChanged, VersionGuard

log = logging.getLogger(__name__)

IDENTITY_RETRIES = 4
"""Times one request starts over on a file that keeps changing, then EIO."""
POOL_MAX_BYTES = 2 * 1024 * 1024
"""Idle chunk buffers kept for reuse, outside the budget (and so inside the RSS
target's 16 MiB of slack): two of the largest chunks. 4 MiB read no faster, and
200 handles' first reads at a 32M limit peaked 6 MiB higher with it."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    memory_limit: int
    cache_limit: int
    max_streams: int
    min_chunk: int
    max_chunk: int
    inline_cached_reads: bool = True
    """Copy page-cache hits on the event loop (RWF_NOWAIT) instead of in a thread."""
    descriptor_limit: int = DEFAULT_LIMIT
    """Backing descriptors kept open at once (least recently used closed first)."""
    retry: RetrySettings = DEFAULT_SETTINGS
    read_around_bytes: int = WINDOW_BYTES
    """Window pushed into the kernel page cache around a random read (0: off)."""
    recheck_s: float = 0.0
    """A handle whose file's identity was confirmed this recently serves a new
    chunk without an fstat first (``VersionGuard.check_due``); the daemon uses
    ``RECHECK_S`` or the attribute timeout if shorter, 0 checks every chunk."""


@dataclasses.dataclass(frozen=True)
class EngineStatistics:
    pressure_level: Level
    concurrency_cap: int
    memory_use_pct: float
    request_sizes: dict[int, int]
    """FUSE read requests by size."""
    kernel_request_bytes: int
    """The request size the kernel sends most often (0 before any read)."""
    read_latency: Histogram
    """Time to answer each FUSE read (cache hit or backing read)."""


class ReadEngine:
    """Serves file data for open handles through cache, budget and read-ahead."""

    def __init__(self, config: EngineConfig, counters: Counters, *,
                 opener: Opener | None = None, reader: BackingReader | None = None,
                 checksums: ChecksumStore | None = None,
                 kernel_store: KernelStore | None = None,
                 kernel_invalidate: KernelInvalidate | None = None,
                 handles_of: Callable[[int], Iterable[OpenFile]] = lambda _nodeid: (),
                 store_name: str = "", disk_store: DiskStore | None = None,
                 disk_cache_bytes: int = 0,
                 disk_entries: Iterable[StoredEntry] = ()) -> None:
        """*disk_store*: the open ``--cache-dir`` (of *disk_cache_bytes*), with the
        entries its scan found (``DiskStore.scan``)."""
        self.index_bytes = config.memory_limit // INDEX_SHARE if disk_store is not None else 0
        """The disk cache's index, held in the budget out of the chunk cache's share
        (so read-ahead and reads in flight keep the room they have without one)."""
        config = dataclasses.replace(config,
                                     cache_limit=self._cache_share(config, config.cache_limit))
        self.config = config
        self.counters = counters
        self.resources = ResourceRegistry()
        self.descriptors = DescriptorTable(config.descriptor_limit, opener)
        self.budget = MemoryBudget(config.memory_limit)
        self.trimmer = HeapTrimmer()
        self.pool = BufferPool(min(POOL_MAX_BYTES, config.memory_limit // 4),
                               on_drop=self.trimmer.dropped_buffer)
        self.cache = ChunkCache(config.cache_limit, self.budget, self.pool)
        self.budget.set_reclaimer(self._reclaim)
        self.planner = RequestPlanner(AdaptiveChunkSizer(config.min_chunk, config.max_chunk))
        self.congestion = CongestionController(config.max_streams, name=store_name,
                                               now=time.monotonic())
        """The store's concurrency target; the pressure controller updates it."""
        self._opener = opener
        self.reads = BackingReads(reader or SourceReader(), self.descriptors, counters,
                                  max_streams=config.max_streams, retry=config.retry,
                                  inline_cached_reads=config.inline_cached_reads,
                                  shed_memory=self._shed_for_memory_error,
                                  congestion=self.congestion,
                                  wide_chunks=WideChunks(lambda: self.cache.capacity_bytes))
        self.guard = VersionGuard(self.reads, self.budget, self.pool, counters,
                                  max_chunk=config.max_chunk, handles_of=handles_of,
                                  recheck_s=config.recheck_s)
        self.disk: DiskCache | None = None
        if disk_store is not None:
            held = self.budget.try_reserve(self.index_bytes)  # for good: the index's memory
            assert held, "the budget is empty at start"
            self.disk = DiskCache(disk_store, disk_cache_bytes, self.index_bytes, self.cache,
                                  self.budget, keep_bytes(config),
                                  refill=None if opener is None else self._refill,
                                  quiet=self._quiet)
            dropped = self.disk.load(list(disk_entries))
            disk_store.remove([entry_name(key) for key in dropped])  # before the loop runs
        self.fetcher = Fetcher(self.reads, self.guard, self.cache, self.budget, self.pool,
                               counters, self.disk)
        self.streams = StreamTable(self._new_stream, on_count=self.reads.set_streams)
        self.read_around = ReadAround(
            kernel_store if config.read_around_bytes > 0 else None, kernel_invalidate,
            self.budget, read_around_window(config.read_around_bytes, config.memory_limit))
        self.readahead = ReadAhead(self.fetcher, self.streams, self.resources, self.read_around,
                                   cache_limit=config.cache_limit)
        self.checksums = ChecksumRegistry(checksums, counters)
        self.level = Level.NONE
        self.monitor_memory_pct = 0.0
        self.request_sizes: collections.Counter[int] = collections.Counter()
        self.read_latency = Histogram()
        self._nursery: trio.Nursery | None = None

    # -- lifecycle ---------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host read-ahead tasks, checksum records and the read-around worker until
        cancelled (started by the daemon's nursery)."""
        self.read_around.start()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.readahead.attach(nursery)
                self.trimmer.attach(nursery)
                self.checksums.attach(nursery)
                if self.disk is not None:
                    await nursery.start(self.disk.run)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self.readahead.attach(None)
            self.checksums.attach(None)
            self.trimmer.attach(None)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.read_around.stop)

    def open(self, handle: OpenFile) -> None:
        """Track a newly opened handle's descriptor (closed at release, or
        earlier when idle and over the descriptor limit, then reopened lazily)."""
        self.descriptors.track(handle)
        self.resources.register(handle.fh, "descriptor", Priority.DESCRIPTOR,
                                functools.partial(self.descriptors.close, handle))
        if self.descriptors.over_limit() and self._nursery is not None:
            self._nursery.start_soon(self.descriptors.trim)

    async def release(self, handle: OpenFile) -> None:
        """Free everything *handle* holds, speculative work first, descriptor last."""
        stream = self.streams.get(handle.fh)
        if stream is not None:
            self.readahead.abandon(stream)
        await self.resources.free_owner(handle.fh)
        self.streams.drop(handle.fh)

    async def flush(self, timeout_s: float) -> None:
        """Unmounted: let the disk cache write what is queued (within *timeout_s*)."""
        if self.disk is not None:
            self.disk.store.closing()
            with trio.move_on_after(timeout_s) as scope:
                await self.disk.drained()
            if scope.cancelled_caught:
                log.warning("disk cache: writes still queued after %.0f s were dropped",
                            timeout_s)

    async def close(self) -> None:
        """Unmount: free every handle's resources, then any descriptor left."""
        await self.resources.free_all()
        for fh in self.streams.fhs():
            self.streams.drop(fh)
        self.descriptors.close_all()

    async def sweep(self, live_fhs: set[int], idle_s: float) -> int:
        """Periodic cleanup: orphaned and idle resources, descriptors over the limit."""
        freed = await self.resources.sweep(live_fhs, idle_s)
        for fh in self.streams.fhs():
            if fh not in live_fhs:
                log.warning("sweep: dropping the stream state of closed handle %d", fh)
                self.streams.drop(fh)
                freed += 1
        await self.descriptors.trim()
        return freed

    async def checksum_of(self, identity: FileIdentity) -> str | None:
        """The known whole-file checksum of *identity* (this session or the state dir)."""
        return await self.checksums.lookup(identity)

    # -- pressure (steered by pressure.PressureController) ----------------------

    @property
    def max_streams(self) -> int:
        return self.config.max_streams

    @property
    def memory_limit(self) -> int:
        """The budget in use (``set_memory_limit`` fits it to a memory cgroup)."""
        return self.config.memory_limit

    def backing_reads_in_flight(self) -> int:
        return self.reads.in_flight()

    def backing_reads_waiting(self) -> int:
        return self.reads.waiting()

    def unevictable_bytes(self) -> int:
        return self.budget.held_bytes - self.cache.cached_bytes

    def held_bytes(self) -> int:
        return self.budget.held_bytes

    def recent_reads(self, since: float) -> list[tuple[int, float]]:
        return self.reads.recent(since)

    def memory_use_pct(self) -> float:
        """Share of the memory limit held by data that cannot be dropped at once
        (in flight, read-ahead, replies); cached chunks are evictable on demand, so
        a full cache is not pressure. The pressure monitor refines this."""
        own = 100.0 * self.unevictable_bytes() / self.config.memory_limit
        return max(own, self.monitor_memory_pct)

    def apply_pressure(self, level: Level, cap: int, memory_use_pct: float) -> None:
        """Cap concurrent backing reads, switch read-ahead, shed cache.

        Reads are never failed for pressure: a lower cap only makes them wait.
        """
        if level >= Level.CRITICAL > self.level:
            self.emergency_cleanup()
        self.level = level
        self.monitor_memory_pct = memory_use_pct
        self.reads.set_cap(cap)
        self.readahead.set_enabled(level < Level.HEAVY)
        floor = min(self.config.cache_limit, 2 * self.config.max_chunk)
        self.cache.floor_bytes = floor if level >= Level.CRITICAL else 0
        capacity = max(floor, int(self.config.cache_limit * CACHE_SHARE[level]))
        if capacity != self.cache.capacity_bytes:
            self.cache.capacity_bytes = capacity
            self.cache.shrink_to(capacity)

    def emergency_cleanup(self) -> None:
        """Critical pressure: free every speculative resource and buffer now."""
        freed = sum(stream.verifier.free_buffers() for stream in self.streams)
        if self.disk is not None:
            freed += self.disk.shed()
        if self._nursery is not None:
            self._nursery.start_soon(self.resources.emergency)
        log.warning("critical memory pressure: emergency cleanup (read-ahead cancelled, "
                    "%d reorder bytes dropped, cache shrunk)", freed)

    def _reclaim(self, n_bytes: int) -> int:
        """Room for a reader: evict cache, then drop bytes waiting to be hashed."""
        freed = self.cache.reclaim(n_bytes)
        for stream in self.streams:
            if freed >= n_bytes:
                break
            freed += stream.verifier.free_buffers()
        return freed

    def _shed_for_memory_error(self) -> None:
        """A backing read failed with ENOMEM: drop cache and read-ahead before retrying."""
        self.cache.shrink_to(self.cache.floor_bytes)
        self.streams.cancel_readahead()

    # -- the read path -------------------------------------------------------

    async def read(self, handle: OpenFile, offset: int, size: int) -> bytes | memoryview:
        """Up to *size* bytes of *handle* at *offset*; fewer only at end of file."""
        counters = self.counters
        counters.active_reads += 1
        began = time.monotonic()
        stream = self._stream(handle)
        self.resources.touch(handle.fh)
        try:
            for _attempt in range(IDENTITY_RETRIES):
                try:
                    data, chunk_key = await self._read(stream, offset, size)
                    break
                except IdentityChanged as changed:
                    await self.guard.on_changed(stream, offset, changed.identity)
            else:
                raise OSError(errno.EIO, "file keeps changing while being read")
        except OSError:  # a failed backing read; internal errors are counted by fs_ops
            counters.errors += 1
            if stream.interrupted and not stream.failed:
                stream.failed = True
                counters.failed_streams += 1
            raise
        finally:
            counters.active_reads -= 1
        self.guard.note_served(stream)
        self.readahead.note_served(stream, offset, offset + len(data))
        identity = handle.identity
        small = self.planner.is_small(identity.size)
        if offset != stream.next_offset:
            self.readahead.after_random_read(
                stream, offset, self.planner.whole_file_chunk(identity.size) if small else 0)
        stream.next_offset = offset + len(data)
        stream.served.append((began, len(data)))
        # Small files are planned as one chunk, never "sequential", but their
        # replies can still complete out of order.
        digest = stream.verifier.served(
            offset, data, stream.state.chunk_size, stream.sequential or small,
            None if chunk_key is None else functools.partial(self._pin_reply, chunk_key, data))
        if digest is not None:
            self.checksums.completed(handle.path, stream.verifier.identity, digest)
        self.read_latency.observe(time.monotonic() - began)
        counters.reads += 1
        counters.bytes_served += len(data)
        handle.bytes_read += len(data)
        return data

    def _quiet(self) -> bool:
        """No read of the mount is in progress (the disk cache refills then)."""
        return self.counters.active_reads == 0 and self.reads.in_flight() == 0

    async def _refill(self, key: EntryKey, path: bytes, buf: Buffer) -> bool:
        """Read chunk *key* of the SOURCE file at *path* into *buf* again, for the
        disk cache's writer (which missed it): whether all of it came, of the key's
        identity (the file is opened by path and checked before and after)."""
        opener, reader = self._opener, self.reads.reader
        assert opener is not None

        def read() -> bool:
            fd, st = opener(path)
            try:
                if FileIdentity.of(st) != key.identity:
                    return False  # changed since: its entries are never looked up
                data, identity = reader.pread(fd, buf, key.start, key.identity)
                return identity == key.identity and len(data) == key.length
            finally:
                os.close(fd)

        try:
            ok = await trio.to_thread.run_sync(read)
        except OSError as exc:
            log.debug("disk cache: reading %s again failed: %r", entry_name(key), exc)
            return False
        self.reads.reads += 1  # a backing read like any other
        return ok

    def _pin_reply(self, key: ChunkKey, reply: bytes | memoryview) -> Callable[[], int] | None:
        """Keep the cached chunk *reply* is a view of (see ``recovery.Keep``)."""
        held = self.cache.pin(key)
        if held is None:
            return None
        if not isinstance(reply, memoryview) or reply.obj is not held:
            self.cache.unpin(key)  # the chunk there now is another one
            return None
        return functools.partial(self.cache.unpin, key)

    async def _read(self, stream: Stream, offset: int, size: int
                    ) -> tuple[bytes | memoryview, ChunkKey | None]:
        """The reply, and the key of the cached chunk it is a view of (if one)."""
        handle = stream.handle
        self.request_sizes[size] += 1
        seen = handle.seen_identity
        if seen is not None and seen != handle.identity:
            raise IdentityChanged(seen)  # someone's getattr saw the file change
        seen_start, seen_end = stream.chunk_seen
        new_chunk = not seen_start <= offset < seen_end
        file_size = handle.identity.size
        if offset >= file_size:
            if new_chunk:
                await self.guard.check(stream)  # grown? then the read is retried
            return b"", None  # the kernel asks past the end only when it knows a new size
        chunk_size, sequential = self.planner.plan(
            stream.state, file_size, offset, size, self.memory_use_pct(), stream.tracker,
            functools.partial(self.readahead.max_window_chunks, stream, stream.state.chunk_size),
            eager=self.readahead.earns_in_full(),
            widen=None if self.reads.is_local(handle) else self.reads.wide_chunks.chunk)
        if not sequential:
            stream.cancel_readahead()
            self.readahead.abandon(stream)
        stream.sequential = sequential
        end = offset + size
        if sequential and end < file_size and not self.reads.is_local(handle):
            # Before this request's chunk arrives: on a network store the reads of
            # the chunks after it should overlap its read, not follow it. (A local
            # device answers soon, and its page cache may hold the chunk: then
            # read-ahead waits, see ``Stream.source_cached``.)
            covered_to = self.fetcher.covered_to(handle.identity, offset, chunk_size)
            self.readahead.schedule(
                stream, offset + chunk_size if covered_to is None else covered_to, chunk_size)
        start, data, fresh = await self.fetcher.chunk_at(stream, offset, chunk_size,
                                                         sequential, end)
        if not sequential:
            self.reads.wide_chunks.record_random(not fresh, handle.identity, offset)
        if new_chunk and not fresh and self.guard.check_due(stream):
            # Bytes from the cache (or another request's read): is the file still
            # that version? A chunk read just now was checked as it was read.
            await self.guard.check(stream)
        chunk_end = start + len(data)
        stream.chunk_seen = (start, chunk_end)
        reply: bytes | memoryview | bytearray
        key: ChunkKey | None = None
        if end <= chunk_end or chunk_end >= file_size:
            # Inside one chunk (or the chunk ends the file): no copy.
            reply = memoryview(data)[offset - start:min(end, chunk_end) - start]
            served_end = min(end, chunk_end)
            last_chunk_end = chunk_end
            key = (handle.identity, start)
        else:
            del data
            reply, last_chunk_end = await self.fetcher.assemble(stream, offset, size, chunk_size)
            served_end = offset + len(reply)
        if sequential and served_end < file_size:
            self.readahead.schedule(stream, last_chunk_end, chunk_size)
        return reply, key  # type: ignore[return-value]

    def _stream(self, handle: OpenFile) -> Stream:
        stream, new = self.streams.of(handle)
        if new:
            self.resources.register(handle.fh, "stream", Priority.STREAM,
                                    functools.partial(self.streams.drop, handle.fh))
        return stream

    def _new_stream(self, handle: OpenFile) -> Stream:
        base = self.planner.base_chunk(handle.identity.size, self.memory_use_pct(),
                                       self.reads.tracker.throughputs())
        verifier = StreamVerifier(handle.identity, self.budget.try_reserve_speculative,
                                  self._release_speculative)
        return Stream(handle, StreamState(chunk_size=base), verifier)

    def _release_speculative(self, n_bytes: int) -> None:
        self.budget.speculative_done(n_bytes)
        self.budget.release(n_bytes)

    # -- figures ---------------------------------------------------------------

    def statistics(self) -> EngineStatistics:
        typical = 0
        if self.request_sizes:
            typical = max(self.request_sizes.items(), key=lambda kv: (kv[1], kv[0]))[0]
        return EngineStatistics(self.level, self.reads.cap, self.memory_use_pct(),
                                dict(sorted(self.request_sizes.items())), typical,
                                self.read_latency)

    def stream_info(self, fh: int) -> dict[str, Any]:
        """A handle's stream figures for ``stfs stats`` (empty before its first read)."""
        stream = self.streams.get(fh)
        if stream is None:
            return {}
        return {"chunk_size": stream.state.chunk_size,
                "readahead_chunks": stream.state.readahead_chunks,
                "sequential_reads": stream.state.sequential_reads}

    def _cache_share(self, config: EngineConfig, cache_limit: int) -> int:
        """The chunk cache's capacity: its share less the disk cache's index, but
        never below two of the largest chunks."""
        return max(min(cache_limit, 2 * config.max_chunk), cache_limit - self.index_bytes)

    def set_memory_limit(self, limit: int, cache_limit: int) -> None:
        """Run on a new memory budget (the daemon's memory cgroup changed): the
        budget's limit, the cache capacity (at the current level's share), the
        read-ahead share, the buffer pool and the read-around window follow.
        Cached chunks above a lower limit are evicted at once; bytes in flight
        drain as reads finish, and new reservations wait meanwhile."""
        cache_limit = self._cache_share(self.config, cache_limit)
        self.config = dataclasses.replace(self.config, memory_limit=limit,
                                          cache_limit=cache_limit)
        self.readahead.cache_limit = cache_limit
        self.pool.set_max_free_bytes(min(POOL_MAX_BYTES, limit // 4))
        self.read_around.window_bytes = min(
            self.read_around.window_bytes,
            read_around_window(self.config.read_around_bytes, limit))
        self.budget.set_limit(limit)
        self.apply_pressure(self.level, self.reads.cap, self.monitor_memory_pct)


def keep_bytes(config: EngineConfig) -> int:
    """What chunks evicted before their disk write may hold: 1/KEEP_SHARE of the
    limit, at least two of the largest chunks, at most a third of the limit."""
    limit = config.memory_limit
    return min(limit // 3, max(limit // KEEP_SHARE, 2 * config.max_chunk))


def read_around_window(asked: int, memory_limit: int) -> int:
    """The read-around window: as asked, within a sixteenth of the memory limit
    (a power of two), at least a page."""
    return max(PAGE, min(asked, 1 << ((memory_limit // 16).bit_length() - 1)))
