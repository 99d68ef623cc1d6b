"""The read path: every FUSE read of file data enters through ``ReadEngine.read``.

A request is served from the chunk cache when it can be; otherwise from one
backing read of a whole chunk, run in a worker thread behind a bounded
``trio.CapacityLimiter`` (the event loop never waits on disk). Concurrent
readers of the same missing chunk share one backing read (single flight).
Chunk sizes come from ``chunking`` (file size class, memory use, measured
throughput, growing while a stream stays sequential); files under 1 MiB are
read whole in one backing read. Sequential streams prefetch the next chunks
(read-ahead) inside the memory budget; a seek, a release or a short budget
stops it.

Memory: every byte of file data is reserved in the ``MemoryBudget`` before it
is read - chunks in flight, cached chunks, read-ahead and the reply buffer
of a request that spans chunks. A request inside one cached chunk is answered
with a memoryview of it, without a copy.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import trio

from stfs import lru
from stfs.backing import (
    ChunkData,
    FileIdentity,
    is_local_block_device_id,
    pread_digest,
    pread_identified,
    pread_if_cached,
)
from stfs.budget import MemoryBudget
from stfs.buffers import BufferPool
from stfs.cache import ChunkCache
from stfs.checksums import ChecksumStore
from stfs.chunking import (
    PAGE,
    STREAMING_TRIGGER,
    AdaptiveChunkSizer,
    ChunkPerformanceTracker,
    StreamState,
    power_of_two_ceil,
)
from stfs.descriptors import DEFAULT_LIMIT, DescriptorTable, FileReplacedError, Opener
from stfs.handles import OpenFile
from stfs.metrics import Counters, Histogram
from stfs.pressure import CACHE_SHARE, Level
from stfs.readaround import WINDOW_BYTES, KernelInvalidate, KernelStore, ReadAround
from stfs.recovery import Piece, StreamVerifier
from stfs.resources import Priority, ResourceRegistry
from stfs.retry import DEFAULT_SETTINGS, REOPEN_ERRNOS, RetrySettings, sheds_memory

log = logging.getLogger(__name__)

T = TypeVar("T")
LATENCY_SAMPLES = 2048
RECENT_CHECKSUMS = 4096
SERVED_IDENTITIES = 4096
IDENTITY_RETRIES = 4
POOL_MAX_BYTES = 2 * 1024 * 1024
"""Idle chunk buffers kept for reuse, outside the budget (and so inside the RSS
target's 16 MiB of slack): two of the largest chunks. 4 MiB read no faster, and
200 handles' first reads at a 32M limit peaked 6 MiB higher with it and the
8 MiB heap-trim slack (``buffers.HEAP_TRIM_SLACK_BYTES``) of before."""


class _IdentityChanged(Exception):
    """A check found the file changed since the handle last looked."""

    def __init__(self, identity: FileIdentity) -> None:
        super().__init__(identity)
        self.identity = identity


MAX_READAHEAD_BYTES = 16 * 1024 * 1024


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


@dataclasses.dataclass
class _Stream:
    """The engine's state for one open handle."""

    state: StreamState
    tracker: ChunkPerformanceTracker
    verifier: StreamVerifier
    readahead_scopes: set[trio.CancelScope] = dataclasses.field(default_factory=set)
    readahead_bytes: int = 0
    chunk_seen: tuple[int, int] = (0, 0)
    """The chunk the last request was served from: requests inside it skip the
    identity check made before serving a new chunk."""
    change_lock: trio.Lock = dataclasses.field(default_factory=trio.Lock)
    sequential: bool = False
    """Whether the latest request continued a sequential run."""
    next_offset: int = 0
    """Where the latest reply ended: a request elsewhere is a seek."""
    noted: FileIdentity | None = None
    """The version this stream last reported as served through the mount."""
    source_cached: bool = False
    """Whether this stream's latest backing read found SOURCE's page cache holding
    the bytes: read-ahead then only adds work (the kernel's own requests already
    come in parallel), so it waits until a read has to wait for the device."""
    interrupted: bool = False
    failed: bool = False

    def cancel_readahead(self) -> None:
        for scope in self.readahead_scopes:
            scope.cancel()


class _Flight:
    """One backing read in progress; readers of bytes inside it wait for it."""

    __slots__ = ("data", "done", "error", "size", "start")

    def __init__(self, start: int, size: int) -> None:
        self.start = start
        self.size = size
        self.done = trio.Event()
        self.data: ChunkData | None = None
        self.error: BaseException | None = None


class ReadEngine:
    """Serves file data for open handles through cache, budget and read-ahead."""

    def __init__(self, config: EngineConfig, counters: Counters, *,
                 opener: Opener | None = None, checksums: ChecksumStore | None = None,
                 kernel_store: KernelStore | None = None,
                 kernel_invalidate: KernelInvalidate | None = None) -> None:
        self.config = config
        self.counters = counters
        self.resources = ResourceRegistry()
        self.descriptors = DescriptorTable(config.descriptor_limit, opener)
        self.checksums = checksums
        self.recent_checksums: collections.OrderedDict[FileIdentity, str] = (
            collections.OrderedDict())
        self._served_identities: collections.OrderedDict[FileIdentity, None] = (
            collections.OrderedDict())
        """Versions recently served through the mount: the kernel's page cache may
        hold their pages, and serve them to any handle without asking stfs."""
        self.budget = MemoryBudget(config.memory_limit)
        self.pool = BufferPool(min(POOL_MAX_BYTES, config.memory_limit // 4))
        self.cache = ChunkCache(config.cache_limit, self.budget, self.pool)
        self.budget.set_reclaimer(self._reclaim)
        self.sizer = AdaptiveChunkSizer(config.min_chunk, config.max_chunk)
        self.global_tracker = ChunkPerformanceTracker()
        self._limiter = trio.CapacityLimiter(config.max_streams)
        self._readahead_limiter = trio.CapacityLimiter(max(1, config.max_streams // 2))
        self._flights: dict[FileIdentity, list[_Flight]] = {}
        self._assembly_lock = trio.Lock()
        self._streams: dict[int, _Stream] = {}
        self.handles_of: Callable[[int], Iterable[OpenFile]] = lambda _nodeid: ()
        """The open handles of a node id, which share its kernel page cache (the
        view's handle table sets this)."""
        self._nursery: trio.Nursery | None = None
        self.readahead_enabled = True
        self.level = Level.NONE
        self.concurrency_cap = config.max_streams
        self.max_streams = config.max_streams
        self.memory_limit = config.memory_limit
        self.cache_capacity_bytes = config.cache_limit
        self.monitor_memory_pct = 0.0
        self.recent: collections.deque[tuple[float, int, float]] = collections.deque(maxlen=4096)
        self.latencies_s: collections.deque[float] = collections.deque(maxlen=LATENCY_SAMPLES)
        self.request_sizes: collections.Counter[int] = collections.Counter()
        self.backing_reads = 0
        self.read_latency = Histogram()
        """Time to answer each FUSE read (cache hit or backing read)."""
        self.inline_reads = 0
        self.backing_read_sizes: collections.Counter[int] = collections.Counter()
        self.readahead_chunks = 0
        self.readahead_hits = 0
        self.read_around = ReadAround(
            kernel_store if config.read_around_bytes > 0 else None, kernel_invalidate,
            self.budget, max(PAGE, min(config.read_around_bytes,
                                       1 << ((config.memory_limit // 16).bit_length() - 1))))

    # -- lifecycle ---------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host read-ahead tasks and the read-around worker until cancelled
        (started by the daemon's nursery)."""
        self.read_around.start()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.read_around.stop)

    # -- pressure (steered by pressure.PressureController) ----------------------

    def backing_reads_in_flight(self) -> int:
        return int(self._limiter.borrowed_tokens)

    def unevictable_bytes(self) -> int:
        return self.budget.held_bytes - self.cache.cached_bytes

    def held_bytes(self) -> int:
        return self.budget.held_bytes

    def recent_reads(self, since: float) -> list[tuple[int, float]]:
        return [(size, seconds) for at, size, seconds in self.recent if at >= since]

    def apply_pressure(self, level: Level, cap: int, memory_use_pct: float) -> None:
        """Cap concurrent backing reads, switch read-ahead, shed cache.

        Reads are never failed for pressure: a lower cap only makes them wait.
        """
        if level >= Level.CRITICAL > self.level:
            self.emergency_cleanup()
        self.level = level
        self.monitor_memory_pct = memory_use_pct
        if cap != self.concurrency_cap:
            self.concurrency_cap = cap
            self._limiter.total_tokens = cap
            self._readahead_limiter.total_tokens = max(1, cap // 2)
        self.readahead_enabled = level < Level.HEAVY
        self.read_around.pause(not self.readahead_enabled)
        if not self.readahead_enabled:
            for stream in self._streams.values():
                stream.cancel_readahead()
        floor = min(self.cache_capacity_bytes, 2 * self.config.max_chunk)
        self.cache.floor_bytes = floor if level >= Level.CRITICAL else 0
        capacity = max(floor, int(self.cache_capacity_bytes * CACHE_SHARE[level]))
        if capacity != self.cache.capacity_bytes:
            self.cache.capacity_bytes = capacity
            self.cache.shrink_to(capacity)

    def _reclaim(self, n_bytes: int) -> int:
        """Room for a reader: evict cache, then drop bytes waiting to be hashed."""
        freed = self.cache.reclaim(n_bytes)
        for stream in self._streams.values():
            if freed >= n_bytes:
                break
            freed += stream.verifier.free_buffers()
        return freed

    def _release_speculative(self, n_bytes: int) -> None:
        self.budget.speculative_done(n_bytes)
        self.budget.release(n_bytes)

    def emergency_cleanup(self) -> None:
        """Critical pressure: free every speculative resource and buffer now."""
        freed = sum(stream.verifier.free_buffers() for stream in self._streams.values())
        if self._nursery is not None:
            self._nursery.start_soon(self.resources.emergency)
        log.warning("critical memory pressure: emergency cleanup (read-ahead cancelled, "
                    "%d reorder bytes dropped, cache shrunk)", freed)

    async def sweep(self, live_fhs: set[int], idle_s: float) -> int:
        """Periodic cleanup: orphaned and idle resources, descriptors over the limit."""
        freed = await self.resources.sweep(live_fhs, idle_s)
        for fh in [fh for fh in self._streams if fh not in live_fhs]:
            log.warning("sweep: dropping the stream state of closed handle %d", fh)
            self._drop_stream(fh)
            freed += 1
        await self.descriptors.trim()
        return freed

    def memory_use_pct(self) -> float:
        """Share of the memory limit held by data that cannot be dropped at once
        (in flight, read-ahead, replies); cached chunks are evictable on demand, so
        a full cache is not pressure. The pressure monitor refines this."""
        own = 100.0 * self.unevictable_bytes() / self.config.memory_limit
        return max(own, self.monitor_memory_pct)

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
                    data = await self._read(handle, stream, offset, size)
                    break
                except _IdentityChanged as changed:
                    await self._on_changed(handle, stream, offset, changed.identity)
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
        if stream.noted is not handle.identity:
            self._note_served(handle.identity)
            stream.noted = handle.identity
        if (offset != stream.next_offset and self.read_around.enabled and not handle.direct_io
                and self.readahead_enabled and is_local_block_device_id(handle.identity.dev)):
            self._schedule_read_around(handle, stream, offset)
        stream.next_offset = offset + len(data)
        # Small files are planned as one chunk, never "sequential", but their
        # replies can still complete out of order.
        digest = stream.verifier.served(offset, data, stream.state.chunk_size,
                                        stream.sequential or self._is_small(handle.identity))
        if digest is not None:
            self._checksum_done(handle, stream.verifier.identity, digest)
        self.read_latency.observe(time.monotonic() - began)
        counters.reads += 1
        counters.bytes_served += len(data)
        handle.bytes_read += len(data)
        return data

    # -- files that change under a reader --------------------------------------

    async def _check_identity(self, handle: OpenFile) -> None:
        """fstat the open descriptor before serving a new chunk: a file changed
        since the handle last looked raises ``_IdentityChanged``."""
        seen = handle.seen_identity
        if seen is not None and seen != handle.identity:
            raise _IdentityChanged(seen)
        fd = self.descriptors.fd_now(handle)
        if fd < 0:
            return  # closed for now; the reopen before the backing read checks
        try:
            if is_local_block_device_id(handle.identity.dev):
                st = os.fstat(fd)  # inode attributes are in memory: no disk wait
            else:
                fd = await self.descriptors.pin(handle)
                try:
                    st = await trio.to_thread.run_sync(os.fstat, fd, limiter=self._limiter)
                finally:
                    self.descriptors.unpin(handle)
        except OSError:
            return  # the backing read meets the same error and deals with it
        now = FileIdentity.of(st)
        if now != handle.identity:
            raise _IdentityChanged(now)

    async def _on_changed(self, handle: OpenFile, stream: _Stream, offset: int,
                          identity: FileIdentity) -> None:
        """The file now has *identity*. A handle that was served bytes gets EIO
        unless re-reading what it answers for (its pass's last checkpointed chunk
        and everything since, and its last reads elsewhere) shows those bytes are
        still there (a touch, an append, a change elsewhere). A handle that has
        read nothing, or a read at offset 0 (a new pass), gets the new version."""
        async with stream.change_lock:
            handle.seen_identity = identity
            if handle.identity == identity:
                return  # another request of this handle dealt with it
            verifier = stream.verifier
            unseen = self._may_have_read_unseen(handle, stream, offset)
            if verifier.must_verify(offset) or unseen:
                if verifier.broken != identity:
                    problem = await self._verify_pass(handle, stream, identity, unseen)
                    if problem is not None:
                        verifier.broken = identity
                        self.counters.changed_files += 1
                        log.warning("%s changed while being read (%s): this handle's reads "
                                    "fail with EIO rather than mix two versions, until it "
                                    "reads from offset 0 again", os.fsdecode(handle.path),
                                    problem)
                if verifier.broken == identity:
                    raise OSError(errno.EIO, "file changed while being read")
                verifier.retarget(identity)
                log.info("%s changed while being read (%s -> %s), but the bytes read so far "
                         "are unchanged: going on", os.fsdecode(handle.path), handle.identity,
                         identity)
            else:
                if not handle.direct_io and self._older_readers(handle, identity):
                    # Its replies would put the new version into the page cache
                    # that the other handles of the file read from.
                    if verifier.broken != identity:
                        verifier.broken = identity
                        self.counters.changed_files += 1
                        log.warning("%s changed while open, and other handles still read its "
                                    "old version: this handle's reads fail with EIO until they "
                                    "close (a new open reads the new version)",
                                    os.fsdecode(handle.path))
                    raise OSError(errno.EIO, "file changed while being read")
                verifier.reset(identity)
                log.info("%s changed while open: serving its new version",
                         os.fsdecode(handle.path))
            handle.identity = identity
            stream.chunk_seen = (0, 0)

    def _older_readers(self, handle: OpenFile, identity: FileIdentity) -> bool:
        """Whether other handles of *handle*'s file, reading through the kernel's
        page cache, are still on a version older than *identity*."""
        return any(other is not handle and other.identity != identity and not other.released
                   and not other.direct_io
                   for other in self.handles_of(handle.nodeid))

    def _note_served(self, identity: FileIdentity) -> None:
        """Bytes of *identity* went to the kernel (its page cache may keep them)."""
        lru.remember(self._served_identities, identity, None, SERVED_IDENTITIES)

    def _may_have_read_unseen(self, handle: OpenFile, stream: _Stream, offset: int) -> bool:
        """Whether a request at *offset* may follow bytes of the old version that
        the kernel served this handle from its page cache, never asking stfs.

        So it is when the old version was read through the mount (its pages may
        be cached) and the request is neither a new pass (offset 0) nor wholly
        past the old end (reading what an append added)."""
        return (0 < offset < handle.identity.size and not stream.verifier.served_anything()
                and handle.identity in self._served_identities)

    async def _verify_pass(self, handle: OpenFile, stream: _Stream,
                           identity: FileIdentity, unseen: bool = False) -> str | None:
        """Whether the bytes this stream was served are still the file's, under
        *identity*: None if so, else what differs. *unseen*: the handle may have
        been served bytes stfs never saw (the kernel's page cache)."""
        verifier = stream.verifier
        if identity.size < verifier.position:
            return f"now {identity.size} bytes, {verifier.position} were already read"
        pieces = verifier.pieces_to_verify() + list(verifier.earlier)
        if not pieces:
            if unseen:
                return ("the kernel may have served it cached bytes of the old version, "
                        "which cannot be checked")
            return None
        scratch_size = min(max(p.end - p.start for p in pieces), self.config.max_chunk)
        await self.budget.reserve(scratch_size)
        scratch = self.pool.take(scratch_size)
        try:
            for piece in pieces:
                problem = await self._verify_piece(handle, stream, piece, scratch, identity)
                if problem is not None:
                    return problem
            return None
        finally:
            self.budget.release(scratch_size)
            self.pool.give(scratch)

    async def _verify_piece(self, handle: OpenFile, stream: _Stream, piece: Piece,
                            scratch: bytearray, identity: FileIdentity) -> str | None:
        """Re-read one served chunk (with retries) and compare its digest."""
        digest, got, read_under = await self._retrying(
            handle, stream, None,
            lambda fd: pread_digest(fd, scratch, piece.start, piece.end, piece.hasher()))
        if read_under != identity:
            handle.seen_identity = read_under
            return "it changed again while being checked"
        if got != piece.end - piece.start or digest != piece.digest:
            return f"bytes {piece.start}-{piece.end} differ from what was served"
        return None

    def _checksum_done(self, handle: OpenFile, identity: FileIdentity, digest: str) -> None:
        """A pass read the whole file: keep its xxh3-128 and compare with the last."""
        self.counters.checksums_computed += 1
        self._remember_checksum(identity, digest)
        if self.checksums is not None and self._nursery is not None:
            self._nursery.start_soon(self._record_checksum, handle.path, identity, digest)

    def _remember_checksum(self, identity: FileIdentity, digest: str) -> None:
        lru.remember(self.recent_checksums, identity, digest, RECENT_CHECKSUMS)

    async def _record_checksum(self, path: bytes, identity: FileIdentity, digest: str) -> None:
        assert self.checksums is not None
        try:
            previous = await trio.to_thread.run_sync(self.checksums.record, identity, digest,
                                                     path)
        except Exception:  # a background task: never take the mount down
            log.exception("could not record the checksum of %s", os.fsdecode(path))
            return
        if previous is not None:
            self._remember_checksum(identity, previous)  # the recorded one stands
            self.counters.corruptions_detected += 1
            log.error("SOURCE CORRUPTION: %s read as xxh3-128 %s, but %s when last read with "
                      "the same size, mtime and ctime: its bytes changed without its metadata",
                      os.fsdecode(path), digest, previous)

    async def checksum_of(self, identity: FileIdentity) -> str | None:
        """The known whole-file checksum of *identity* (this session or the state dir)."""
        known = self.recent_checksums.get(identity)
        if known is None and self.checksums is not None:
            known = await trio.to_thread.run_sync(self.checksums.get, identity)
        return known

    async def _read(self, handle: OpenFile, stream: _Stream, offset: int,
                    size: int) -> bytes | memoryview:
        self.request_sizes[size] += 1
        seen_start, seen_end = stream.chunk_seen
        if not seen_start <= offset < seen_end or (
                handle.seen_identity is not None and handle.seen_identity != handle.identity):
            await self._check_identity(handle)
        if offset >= handle.identity.size:
            return b""  # the kernel asks past the end only when it knows a new size
        chunk_size, sequential = self._plan(handle, stream, offset, size)
        stream.sequential = sequential
        end = offset + size
        start, data = await self._chunk_at(handle, offset, chunk_size, sequential, end)
        chunk_end = start + len(data)
        stream.chunk_seen = (start, chunk_end)
        reply: bytes | memoryview | bytearray
        if end <= chunk_end or chunk_end >= handle.identity.size:
            # Inside one chunk (or the chunk ends the file): no copy.
            reply = memoryview(data)[offset - start:min(end, chunk_end) - start]
            served_end = min(end, chunk_end)
            last_chunk_end = chunk_end
        else:
            del data
            reply, last_chunk_end = await self._assemble(handle, offset, size, chunk_size)
            served_end = offset + len(reply)
        if sequential and served_end < handle.identity.size:
            self._schedule_readahead(handle, stream, last_chunk_end, chunk_size)
        return reply  # type: ignore[return-value]

    async def _assemble(self, handle: OpenFile, offset: int, size: int,
                        chunk_size: int) -> tuple[bytearray, int]:
        """A request spanning chunks: copy the pieces into one reserved reply buffer.

        Returns the reply and the end of the last chunk used. The reservation is
        released just before returning: pyfuse3 writes the reply synchronously
        after the read handler returns, before any other reservation can be
        granted on the event loop.
        """
        identity = handle.identity  # one reply, one version
        # One assembly at a time: its reply reservation is the only one that waits
        # for chunk reservations while held, so serializing assemblies keeps every
        # other reservation either in flight (finishing) or evictable cache.
        async with self._assembly_lock:
            await self.budget.reserve(size)
            try:
                return await self._assemble_reserved(handle, identity, offset, size, chunk_size)
            finally:
                self.budget.release(size)

    async def _assemble_reserved(self, handle: OpenFile, identity: FileIdentity, offset: int,
                                 size: int, chunk_size: int) -> tuple[bytearray, int]:
        reply = bytearray(size)
        n = 0
        chunk_end = offset
        while n < size:
            start, data = await self._chunk_at(handle, offset + n, chunk_size, False,
                                               offset + size)
            if handle.identity != identity:
                raise _IdentityChanged(handle.identity)  # two versions must never meet
            chunk_end = start + len(data)
            piece = memoryview(data)[offset + n - start:min(offset + size, chunk_end) - start]
            taken = len(piece)
            reply[n:n + taken] = piece
            piece.release()
            n += taken
            if not taken or chunk_end >= identity.size:
                break
        del reply[n:]
        return reply, chunk_end

    def _stream(self, handle: OpenFile) -> _Stream:
        stream = self._streams.get(handle.fh)
        if stream is None:
            base = self._base_chunk(handle.identity)
            verifier = StreamVerifier(handle.identity, self.budget.try_reserve_speculative,
                                      self._release_speculative)
            stream = _Stream(StreamState(chunk_size=base), ChunkPerformanceTracker(), verifier)
            self._streams[handle.fh] = stream
            self.resources.register(handle.fh, "stream", Priority.STREAM,
                                    functools.partial(self._drop_stream, handle.fh))
        return stream

    def _drop_stream(self, fh: int) -> None:
        stream = self._streams.pop(fh, None)
        if stream is not None:
            stream.cancel_readahead()
            stream.verifier.reset()  # gives back what its reorder buffer reserved

    def _is_small(self, identity: FileIdentity) -> bool:
        return identity.size < STREAMING_TRIGGER and identity.size <= self.config.max_chunk

    def _base_chunk(self, identity: FileIdentity) -> int:
        if self._is_small(identity):
            return self.whole_file_chunk(identity.size)
        size = self.sizer.base_size(identity.size, self.memory_use_pct(),
                                    self.global_tracker.throughputs())
        return self.sizer.aligned(size)

    def whole_file_chunk(self, file_size: int) -> int:
        """Small files are one chunk: the next power of two that holds them."""
        return max(PAGE, power_of_two_ceil(file_size))

    def _plan(self, handle: OpenFile, stream: _Stream, offset: int, size: int) -> tuple[int, bool]:
        """Chunk size for this request and whether the stream is sequential."""
        identity = handle.identity
        if self._is_small(identity):
            return self.whole_file_chunk(identity.size), False
        memory_pct = self.memory_use_pct()
        cap = self.sizer.cap(memory_pct)
        window = self._max_window_chunks(stream.state.chunk_size)
        base = random_chunk = 0  # only a seek needs them; skip the arithmetic otherwise
        if not stream.state.is_sequential(offset, size):
            base = self.sizer.aligned(self.sizer.base_size(identity.size, memory_pct,
                                                           stream.tracker.throughputs()))
            random_chunk = self._random_chunk(offset, size)
        sequential = stream.state.observe(offset, size, base, cap, window, random_chunk)
        if not sequential:
            stream.cancel_readahead()
        return stream.state.chunk_size, sequential

    def _random_chunk(self, offset: int, size: int) -> int:
        """The smallest aligned chunk holding the whole request at *offset*."""
        chunk = self.sizer.aligned(power_of_two_ceil(size))
        while offset % chunk + size > chunk and chunk < self.sizer.max_chunk:
            chunk *= 2
        return self.sizer.aligned(chunk)

    def _max_window_chunks(self, chunk_size: int) -> int:
        """Read-ahead window bound: a share of the cache per active stream."""
        streams = max(1, len(self._streams))
        per_stream = min(MAX_READAHEAD_BYTES, self.config.cache_limit // (2 * streams))
        return max(0, per_stream // max(chunk_size, 1))

    async def _chunk_at(self, handle: OpenFile, offset: int, chunk_size: int,
                        sequential: bool, want_end: int) -> tuple[int, ChunkData]:
        """The chunk holding *offset* as (start, data): from the cache, a read in
        flight, or a new backing read.

        A new chunk starts at *offset* itself for a sequential stream (so chunks
        follow the kernel's requests and later requests fall inside one chunk),
        at the chunk-size boundary otherwise (so random readers share chunks). A
        sequential request only partly covered by a cached chunk is re-read from
        its own offset rather than assembled from two chunks.
        """
        identity = handle.identity
        while True:
            found = self.cache.lookup(identity, offset, handle.fh)
            if found is not None:
                start, data = found
                # Covered as far as a new chunk of this size from here could reach?
                covered = start + len(data) >= min(want_end, identity.size, offset + chunk_size)
                if covered or not sequential:
                    self.counters.cache_hits += 1
                    return found
                del found, data
            flight = self._flight_at(identity, offset)
            if flight is None:
                break
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            # Landed in the cache (or was cancelled): look again.
            landed: ChunkData | None = flight.data
            if landed is not None and flight.start <= offset < flight.start + len(landed):
                reach = min(want_end, identity.size, offset + chunk_size)
                if flight.start + len(landed) >= reach or not sequential:
                    self.counters.cache_hits += 1
                    return flight.start, landed
                break
        self.counters.cache_misses += 1
        start = offset if sequential else offset - offset % chunk_size
        fetched = await self._fetch(handle, self._stream(handle), start, chunk_size,
                                    speculative=False)
        assert fetched is not None
        return start, fetched

    def _flight_at(self, identity: FileIdentity, offset: int) -> _Flight | None:
        for flight in self._flights.get(identity, ()):
            if flight.start <= offset < flight.start + flight.size:
                return flight
        return None

    async def _fetch(self, handle: OpenFile, stream: _Stream, start: int, chunk_size: int,
                     speculative: bool) -> ChunkData | None:
        """Read one chunk from SOURCE into the cache (single flight per chunk)."""
        identity = handle.identity
        if speculative:
            if self._covered_to(identity, start, chunk_size) is not None:
                return None
            if not self.budget.try_reserve_speculative(chunk_size):
                return None
        else:
            await self.budget.reserve(chunk_size)
        flight = _Flight(start, chunk_size)
        flights = self._flights.setdefault(identity, [])
        flights.append(flight)
        cached = False
        try:
            limiter = self._readahead_limiter if speculative else None
            data, identity_now = await self._backing_read(handle, stream, start, chunk_size,
                                                          limiter)
            if identity_now != identity:
                handle.seen_identity = identity_now
                raise _IdentityChanged(identity_now)
            flight.data = data
            self.cache.insert((identity, start), data, chunk_size, handle.fh)
            cached = True
            return data
        except (OSError, _IdentityChanged) as exc:
            flight.error = exc  # never a Cancelled: that belongs to this task alone
            raise
        finally:
            if speculative:
                self.budget.speculative_done(chunk_size)
            if not cached:
                self.budget.release(chunk_size)
            flights.remove(flight)
            if not flights:
                del self._flights[identity]
            flight.done.set()

    async def _backing_read(self, handle: OpenFile, stream: _Stream, start: int, size: int,
                            extra_limiter: trio.CapacityLimiter | None
                            ) -> tuple[ChunkData, FileIdentity]:
        buf = self.pool.take(size)
        cached: tuple[ChunkData, FileIdentity] | None = None
        began = time.monotonic()
        fd = self.descriptors.fd_now(handle)
        if (fd >= 0 and self.config.inline_cached_reads
                and is_local_block_device_id(handle.identity.dev)):
            # Bytes already in the kernel's page cache: a memory copy that cannot
            # wait on the disk (RWF_NOWAIT), cheaper here than a thread round trip.
            cached = pread_if_cached(fd, buf, start)
        if cached is not None:
            data, identity = cached
            seconds = time.monotonic() - began
            await trio.lowlevel.checkpoint()
        else:
            data, identity, seconds = await self._thread_read(handle, stream, buf, start,
                                                              extra_limiter)
        del buf
        if extra_limiter is None:  # a demand read: what the reader meets now
            stream.source_cached = cached is not None
        self.backing_reads += 1
        self.inline_reads += cached is not None
        self.backing_read_sizes[size] += 1
        self.latencies_s.append(seconds)
        self.recent.append((time.monotonic(), size, seconds))
        stream.tracker.record(size, seconds)
        self.global_tracker.record(size, seconds)
        return data, identity

    async def _thread_read(self, handle: OpenFile, stream: _Stream, buf: bytearray, start: int,
                           extra_limiter: trio.CapacityLimiter | None
                           ) -> tuple[ChunkData, FileIdentity, float]:
        """A backing read in a worker thread, retried by its error's policy.

        Read-ahead (with *extra_limiter*) is not retried: a failure just ends it,
        and the reader's own demand read retries. A demand read resuming after an
        error first proves the file unchanged: it re-reads the stream's last
        checkpointed chunk and compares its digest.
        """
        async def resume() -> None:
            pieces = stream.verifier.pieces_to_verify()
            if not pieces:
                return
            problem = await self._verify_piece(handle, stream, pieces[0], buf, handle.identity)
            if problem is not None:
                seen = handle.seen_identity
                stream.verifier.broken = seen if seen is not None else handle.identity
                self.counters.changed_files += 1
                log.warning("%s changed while its read was being retried (%s): the read fails "
                            "with EIO rather than mix two versions", os.fsdecode(handle.path),
                            problem)
                raise OSError(errno.EIO, "file changed while being read")

        return await self._retrying(handle, stream, extra_limiter,
                                    lambda fd: _timed_pread(fd, buf, start),
                                    resume=None if extra_limiter is not None else resume)

    async def _retrying(self, handle: OpenFile, stream: _Stream,
                        extra_limiter: trio.CapacityLimiter | None,
                        op: Callable[[int], T],
                        resume: Callable[[], Awaitable[None]] | None = None) -> T:
        """Run blocking *op(fd)* in a worker thread, retrying by the error's policy.

        Speculative work (*extra_limiter* given) is never retried. Permission and
        missing-file errors fail at once; ENOMEM sheds cache and read-ahead before
        retrying; ESTALE and EBADF reopen the file (same device and inode, or
        EIO) before retrying. *resume* runs before each retry.
        """
        settings = self.config.retry
        speculative = extra_limiter is not None
        deadline = trio.current_time() + settings.deadline_s
        attempt = 0
        while True:
            try:
                fd = await self.descriptors.pin(handle)
                try:
                    async with _maybe(extra_limiter):
                        result = await trio.to_thread.run_sync(op, fd, limiter=self._limiter)
                finally:
                    self.descriptors.unpin(handle)
                if attempt:
                    self.counters.recoveries += 1
                    log.info("%s: read recovered after %d retries", os.fsdecode(handle.path),
                             attempt)
                return result
            except FileReplacedError:
                raise
            except OSError as exc:
                attempt += 1
                policy = settings.policy_for(exc.errno)
                if speculative or attempt >= policy.attempts:
                    raise
                delay = settings.delay_s(policy, attempt)
                if trio.current_time() + delay > deadline:
                    raise
                if not stream.interrupted:
                    stream.interrupted = True
                    self.counters.interrupted_streams += 1
                if sheds_memory(exc.errno):
                    self.cache.shrink_to(self.cache.floor_bytes)
                    for other in self._streams.values():
                        other.cancel_readahead()
                self.counters.retries += 1
                log.info("%s: %s; retry %d of %d (%s policy) in %.2f s",
                         os.fsdecode(handle.path), os.strerror(exc.errno or 0),
                         attempt, policy.attempts - 1, policy.name, delay)
                await trio.sleep(delay)
                if exc.errno in REOPEN_ERRNOS:
                    await self.descriptors.reopen(handle)
                if resume is not None:
                    await resume()

    # -- read-ahead ----------------------------------------------------------

    def _schedule_readahead(self, handle: OpenFile, stream: _Stream, next_start: int,
                            chunk_size: int) -> None:
        """Prefetch up to the stream's window of chunks, chained from *next_start*."""
        window = stream.state.readahead_chunks
        if (not self.readahead_enabled or window <= 0 or self._nursery is None
                or stream.source_cached):
            return
        identity = handle.identity
        limit_bytes = window * chunk_size
        chunk_start = next_start
        for _ in range(window):
            if chunk_start >= identity.size or stream.readahead_bytes + chunk_size > limit_bytes:
                break
            covered_to = self._covered_to(identity, chunk_start, chunk_size)
            if covered_to is not None:
                chunk_start = covered_to
                continue
            stream.readahead_bytes += chunk_size
            self._nursery.start_soon(self._readahead, handle, stream, chunk_start, chunk_size)
            chunk_start += chunk_size

    def _covered_to(self, identity: FileIdentity, start: int, size: int) -> int | None:
        """End of a cached or in-flight chunk covering all of [start, start + size)
        (or to end of file), else None. A chunk covering only part does not count:
        read-ahead must follow the kernel's request boundaries, and a misaligned
        chain would leave every request straddling two chunks."""
        want_end = min(start + size, identity.size)
        found = self.cache.lookup(identity, start, -1)
        if found is not None and found[0] + len(found[1]) >= want_end:
            return found[0] + len(found[1])
        flight = self._flight_at(identity, start)
        if flight is not None and flight.start + flight.size >= want_end:
            return flight.start + flight.size
        return None

    async def _readahead(self, handle: OpenFile, stream: _Stream, start: int,
                         chunk_size: int) -> None:
        if self._streams.get(handle.fh) is not stream:  # released before this task ran
            stream.readahead_bytes -= chunk_size
            return
        scope = trio.CancelScope()
        stream.readahead_scopes.add(scope)
        tracked = self.resources.register(handle.fh, "readahead", Priority.SPECULATIVE,
                                          scope.cancel, chunk_size)
        try:
            with scope:
                if await self._fetch(handle, stream, start, chunk_size, speculative=True):
                    self.readahead_chunks += 1
        except (OSError, _IdentityChanged) as exc:
            log.debug("read-ahead of %r at %d stopped: %r", handle.path, start, exc)
        except Exception:  # a background task: never take the mount down
            log.exception("read-ahead of %s at %d failed", os.fsdecode(handle.path), start)
        finally:
            self.resources.forget(tracked)
            stream.readahead_scopes.discard(scope)
            stream.readahead_bytes -= chunk_size

    def _schedule_read_around(self, handle: OpenFile, stream: _Stream, offset: int) -> None:
        """A seek: offer the window around it to the kernel page cache (once)."""
        identity = handle.identity
        fd = self.descriptors.fd_now(handle)
        if fd < 0:
            return
        whole = self.whole_file_chunk(identity.size) if self._is_small(identity) else 0
        self.read_around.offer(fd, handle.nodeid, identity,
                               self.read_around.window(offset, identity, whole))

    # -- handles -------------------------------------------------------------

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
        await self.resources.free_owner(handle.fh)
        self._drop_stream(handle.fh)

    async def close(self) -> None:
        """Unmount: free every handle's resources, then any descriptor left."""
        await self.resources.free_all()
        for fh in list(self._streams):
            self._drop_stream(fh)
        self.descriptors.close_all()

    def stream_info(self, fh: int) -> dict[str, Any]:
        stream = self._streams.get(fh)
        if stream is None:
            return {}
        return {"chunk_size": stream.state.chunk_size,
                "readahead_chunks": stream.state.readahead_chunks,
                "sequential_reads": stream.state.sequential_reads}

    def latency_percentiles_ms(self) -> dict[str, float]:
        samples = sorted(self.latencies_s)
        if not samples:
            return {"p50": 0.0, "p95": 0.0, "p99": 0.0}

        def pct(q: float) -> float:
            return 1000 * samples[min(len(samples) - 1, int(q * len(samples)))]

        return {"p50": pct(0.50), "p95": pct(0.95), "p99": pct(0.99)}

    def typical_request_bytes(self) -> int:
        """The request size the kernel sends most often (0 before any read)."""
        if not self.request_sizes:
            return 0
        return max(self.request_sizes.items(), key=lambda kv: (kv[1], kv[0]))[0]

    def set_memory_limit(self, limit: int, cache_limit: int) -> None:
        """Run on a new memory budget (the daemon's memory cgroup changed): the
        budget's limit, the cache capacity (at the current level's share), the
        buffer pool and the read-around window follow. Cached chunks above a
        lower limit are evicted at once; bytes in flight drain as reads finish,
        and new reservations wait meanwhile."""
        self.config = dataclasses.replace(self.config, memory_limit=limit,
                                          cache_limit=cache_limit)
        self.memory_limit = limit
        self.cache_capacity_bytes = cache_limit
        self.pool.set_max_free_bytes(min(POOL_MAX_BYTES, limit // 4))
        window = max(PAGE, min(self.config.read_around_bytes,
                               1 << ((limit // 16).bit_length() - 1)))
        self.read_around.window_bytes = min(self.read_around.window_bytes, window)
        self.budget.set_limit(limit)
        self.apply_pressure(self.level, self.concurrency_cap, self.monitor_memory_pct)


def _timed_pread(fd: int, buf: bytearray, offset: int) -> tuple[bytearray, FileIdentity, float]:
    """The backing read as the device served it, without time queued for a thread."""
    began = time.monotonic()
    data, identity = pread_identified(fd, buf, offset)
    return data, identity, time.monotonic() - began


class _maybe:
    """``async with`` a limiter, or nothing."""

    def __init__(self, limiter: trio.CapacityLimiter | None) -> None:
        self._limiter = limiter

    async def __aenter__(self) -> None:
        if self._limiter is not None:
            await self._limiter.acquire()

    async def __aexit__(self, *exc: object) -> None:
        if self._limiter is not None:
            self._limiter.release()
