"""Backing reads: every read of SOURCE's bytes for the read path.

A read runs in a worker thread under the concurrency cap (pressure and
congestion control set it; ``stfs.read_slots`` keeps the slots busy), so
the event loop never waits on a device; bytes SOURCE already has in its
page cache are copied on the event loop with ``RWF_NOWAIT``, which cannot
wait on a disk (local block devices only). Demand reads take a free slot
before read-ahead, and while other streams are open read-ahead leaves
``DEMAND_RESERVE`` slots of the cap to demand reads, so another stream's
reader (a random one too) finds room at once; a lone stream's own demand
reads are the chunks its read-ahead would read next, so it may use them all.

Errors are retried by class (``stfs.retry``): speculative reads never,
permission and missing-file errors never, ESTALE and EBADF after reopening
the descriptor, ENOMEM after shedding memory. Each read's device time (not
its wait for a thread) is recorded for the chunk sizer, the pressure score
and ``stfs stats``.

How bytes come out of SOURCE is a ``BackingReader``: ``SourceReader`` in the
daemon, fakes in tests.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import trio

from stfs import backing
from stfs.backing import ChunkData, FileIdentity, Hasher
from stfs.buffers import Buffer
from stfs.chunking import ChunkPerformanceTracker
from stfs.congestion import CongestionController
from stfs.descriptors import DescriptorTable, FileReplacedError
from stfs.handles import OpenFile
from stfs.metrics import Counters, percentiles
from stfs.random_reads import WideChunks
from stfs.read_slots import ReadSlots, Release
from stfs.retry import DEFAULT_SETTINGS, REOPEN_ERRNOS, RetrySettings, sheds_memory
from stfs.streams import Stream

log = logging.getLogger(__name__)

T = TypeVar("T")
DEMAND_RESERVE = 2
"""Reads of the cap that read-ahead leaves free for demand reads while other
streams are open. Not one per stream: read-ahead that keeps up with its
readers spares them demand reads, and 8 readers of a 100 ms store read 40
MB/s leaving one read each of 10, 45 leaving two in all."""
LATENCY_SAMPLES = 2048
RECENT_READS = 4096


def speculative_share(cap: int, streams: int | None = None) -> int:
    """Reads of *cap* that read-ahead may hold at once with *streams* open (None:
    as many as the reserve is for): all of them for a lone stream, whose own
    demand reads are the read-ahead it waits for (promoted ahead of the rest)."""
    reserve = DEMAND_RESERVE if streams is None else min(DEMAND_RESERVE, max(0, streams - 1))
    return max(1, cap - reserve)


class BackingReader(Protocol):
    """Blocking reads of an open SOURCE descriptor, each with the identity
    (fstat before and after) the bytes belong to."""

    def pread(self, fd: int, buf: Buffer, offset: int,
              expected: FileIdentity | None = None,
              read_done: Callable[[], None] | None = None) -> tuple[ChunkData, FileIdentity]:
        """Fill *buf* from *offset* (short only at end of file); *expected*: the
        identity the caller holds, which spares an fstat when it still holds;
        *read_done()*: called once the bytes are in, before the fstat after them."""

    def pread_if_cached(self, fd: int, buf: Buffer,
                        offset: int) -> tuple[ChunkData, FileIdentity] | None:
        """Like ``pread`` if the bytes are all in the page cache, else None at once."""

    def pread_digest(self, fd: int, scratch: Buffer, start: int, end: int,
                     hasher: Hasher) -> tuple[int, int, FileIdentity]:
        """Feed ``[start, end)`` into *hasher*: (digest, bytes read, identity)."""

    def is_local(self, dev: int) -> bool:
        """Whether *dev* is a local block device (page-cache reads cannot hang)."""


class SourceReader:
    """The daemon's ``BackingReader``: ``stfs.backing``'s reads."""

    def pread(self, fd: int, buf: Buffer, offset: int,
              expected: FileIdentity | None = None,
              read_done: Callable[[], None] | None = None) -> tuple[ChunkData, FileIdentity]:
        return backing.pread_identified(fd, buf, offset, expected, read_done)

    def pread_if_cached(self, fd: int, buf: Buffer,
                        offset: int) -> tuple[ChunkData, FileIdentity] | None:
        return backing.pread_if_cached(fd, buf, offset)

    def pread_digest(self, fd: int, scratch: Buffer, start: int, end: int,
                     hasher: Hasher) -> tuple[int, int, FileIdentity]:
        return backing.pread_digest(fd, scratch, start, end, hasher)

    def is_local(self, dev: int) -> bool:
        return backing.is_local_block_device_id(dev)


@dataclasses.dataclass(frozen=True)
class BackingReadStatistics:
    reads: int
    """Backing reads of chunks (demand and read-ahead)."""
    inline_reads: int
    """Of those, copied from SOURCE's page cache on the event loop."""
    in_flight: int
    """Reads holding a read slot now."""
    in_flight_bytes: int
    """Bytes of those reads."""
    read_seconds: float
    """Time spent in worker-thread reads, summed: its growth over a span divided
    by the span is the mean number of reads in flight at the store."""
    cap: int
    """Concurrent backing reads allowed now."""
    chunk_sizes: dict[int, int]
    """Reads by size."""
    latency_ms: dict[str, float]
    """p50/p95/p99 of recent reads' device time."""
    learned_throughput_bps: list[float]


class BackingReads:
    """Runs backing reads in worker threads under the concurrency cap, with retries."""

    def __init__(self, reader: BackingReader, descriptors: DescriptorTable, counters: Counters,
                 *, max_streams: int, retry: RetrySettings = DEFAULT_SETTINGS,
                 inline_cached_reads: bool = True,
                 shed_memory: Callable[[], None] = lambda: None,
                 congestion: CongestionController | None = None,
                 wide_chunks: WideChunks | None = None) -> None:
        """*congestion* hears every read done in a worker thread (with the reads
        in flight then) and every transient error, to tell a store's latency from
        its congestion."""
        self.reader = reader
        self.descriptors = descriptors
        self.counters = counters
        self.retry = retry
        self.inline_cached_reads = inline_cached_reads
        self._shed_memory = shed_memory
        self.congestion = congestion
        self.slots = ReadSlots(max_streams, speculative_share(max_streams))
        self.cap = max_streams
        self.open_streams: int | None = None
        """Streams open (read-ahead's share of the cap depends on it)."""
        self.reads = 0
        self.inline_reads = 0
        self.read_seconds = 0.0
        self.sizes: collections.Counter[int] = collections.Counter()
        self._latencies_s: collections.deque[float] = collections.deque(maxlen=LATENCY_SAMPLES)
        self._recent: collections.deque[tuple[float, int, float]] = collections.deque(
            maxlen=RECENT_READS)
        self.tracker = ChunkPerformanceTracker()
        """Recent chunk reads of every stream (the chunk sizer's global view)."""
        self.wide_chunks = wide_chunks or WideChunks()
        """What reads of each size cost in worker threads: how much a random read fetches."""

    def set_cap(self, cap: int) -> None:
        """Allow *cap* concurrent backing reads."""
        if cap != self.cap:
            self.cap = cap
            self.slots.set_cap(cap, speculative_share(cap, self.open_streams))

    def set_streams(self, streams: int) -> None:
        """*streams* are open now."""
        if streams != self.open_streams:
            self.open_streams = streams
            self.slots.set_cap(self.cap, speculative_share(self.cap, streams))

    def in_flight(self) -> int:
        return self.slots.running

    def in_flight_bytes(self) -> int:
        """Bytes of the reads holding a read slot now."""
        return self.slots.running_bytes

    def waiting(self) -> int:
        """Reads waiting for the cap now (read-ahead waits for its share of it)."""
        return self.slots.waiting()

    def recent(self, since: float) -> list[tuple[int, float]]:
        """(size, seconds) of the reads that ended at or after *since* (monotonic)."""
        return [(size, seconds) for at, size, seconds in self._recent if at >= since]

    def is_local(self, handle: OpenFile) -> bool:
        return self.reader.is_local(handle.identity.dev)

    # -- reads -------------------------------------------------------------------

    async def read_chunk(self, stream: Stream, buf: Buffer, start: int, *,
                         speculative: bool,
                         resume: Callable[[], Awaitable[None]] | None = None,
                         after: trio.Event | None = None,
                         on_queued: Callable[[Callable[[], None]], None] | None = None,
                         ) -> tuple[ChunkData, FileIdentity]:
        """Fill *buf* from *start* of *stream*'s file: (data, the identity it is of).

        *resume*, *after*, *on_queued*: see ``run`` (a copy from the page cache
        takes no read slot).
        """
        handle = stream.handle
        began = time.monotonic()
        fd = self.descriptors.fd_now(handle)
        cached = None
        if fd >= 0 and self.inline_cached_reads and self.is_local(handle):
            # Bytes already in the kernel's page cache: a memory copy that cannot
            # wait on the disk (RWF_NOWAIT), cheaper here than a thread round trip.
            cached = self.reader.pread_if_cached(fd, buf, start)
        if cached is not None:
            data, identity = cached
            seconds = time.monotonic() - began
            await trio.lowlevel.checkpoint()
        else:
            expected = handle.identity
            data, identity, seconds = await self.run(
                stream, lambda fd, release: self._timed_pread(fd, buf, start, expected, release),
                speculative=speculative, resume=resume, after=after, size=len(buf),
                on_queued=on_queued)
        if not speculative:  # what the reader meets now
            stream.source_cached = cached is not None
        size = len(buf)
        if cached is None:
            # Inline copies from the page cache say nothing about the store.
            self.wide_chunks.record_read(size, seconds)
            self.read_seconds += seconds
            if self.congestion is not None:
                self.congestion.record(time.monotonic(), size, seconds, self.in_flight() + 1)
        self.reads += 1
        self.inline_reads += cached is not None
        self.sizes[size] += 1
        self._latencies_s.append(seconds)
        self._recent.append((time.monotonic(), size, seconds))
        stream.tracker.record(size, seconds)
        self.tracker.record(size, seconds)
        return data, identity

    def _timed_pread(self, fd: int, buf: Buffer, offset: int, expected: FileIdentity,
                     release: Release) -> tuple[ChunkData, FileIdentity, float]:
        """The read as the device served it, without time queued for a thread or
        the fstat after it (which runs with the slot given back)."""
        began = time.monotonic()
        ended = 0.0

        def read_done() -> None:
            nonlocal ended
            ended = time.monotonic()
            release()

        data, identity = self.reader.pread(fd, buf, offset, expected, read_done)
        return data, identity, (ended or time.monotonic()) - began

    async def fstat(self, stream: Stream) -> os.stat_result:
        """fstat of *stream*'s descriptor in a worker thread (a network file
        system may take a round trip for it)."""
        handle = stream.handle
        fd = await self.descriptors.pin(handle)
        try:
            return await self.slots.run(lambda _release: os.fstat(fd))
        finally:
            self.descriptors.unpin(handle)

    async def run(self, stream: Stream, op: Callable[[int, Release], T], *,
                  speculative: bool = False,
                  resume: Callable[[], Awaitable[None]] | None = None,
                  after: trio.Event | None = None, size: int = 0,
                  on_queued: Callable[[Callable[[], None]], None] | None = None) -> T:
        """Run blocking *op(fd, release)* on *stream*'s descriptor in a read slot
        (``release()`` gives the slot back before *op* ends), retrying by the
        error's policy (*resume* runs before each retry). The read queues for
        its slot once *after* is set (read-ahead goes in file order), then calls
        *on_queued(promote)*; *size*: the bytes it reads (see ``ReadSlots.run``).

        Speculative work is never retried: a failure just ends it, and the
        reader's own demand read retries.
        """
        handle = stream.handle
        settings = self.retry
        deadline = trio.current_time() + settings.deadline_s
        attempt = 0
        if after is not None:
            await after.wait()
        while True:
            try:
                fd = await self.descriptors.pin(handle)
                try:
                    result = await self.slots.run(functools.partial(op, fd),
                                                  speculative=speculative, size=size,
                                                  on_queued=on_queued)
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
                if self.congestion is not None and policy.attempts > 1:
                    self.congestion.on_error(time.monotonic(),
                                             timeout=exc.errno == errno.ETIMEDOUT)
                if speculative or attempt >= policy.attempts:
                    raise
                delay = settings.delay_s(policy, attempt)
                if trio.current_time() + delay > deadline:
                    raise
                if not stream.interrupted:
                    stream.interrupted = True
                    self.counters.interrupted_streams += 1
                if sheds_memory(exc.errno):
                    self._shed_memory()
                self.counters.retries += 1
                log.info("%s: %s; retry %d of %d (%s policy) in %.2f s",
                         os.fsdecode(handle.path), os.strerror(exc.errno or 0),
                         attempt, policy.attempts - 1, policy.name, delay)
                await trio.sleep(delay)
                if exc.errno in REOPEN_ERRNOS:
                    await self.descriptors.reopen(handle)
                if resume is not None:
                    await resume()

    # -- figures -----------------------------------------------------------------

    def statistics(self) -> BackingReadStatistics:
        return BackingReadStatistics(
            reads=self.reads, inline_reads=self.inline_reads, in_flight=self.in_flight(),
            in_flight_bytes=self.in_flight_bytes(), read_seconds=self.read_seconds,
            cap=self.cap, chunk_sizes=dict(sorted(self.sizes.items())),
            latency_ms={k: 1000 * v for k, v in percentiles(self._latencies_s).items()},
            learned_throughput_bps=self.tracker.throughputs())

