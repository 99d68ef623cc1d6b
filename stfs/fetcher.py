"""Fetcher: the chunk holding an offset, from the chunk cache, a read in
flight, the disk cache (``--cache-dir``), or one new backing read into the
cache (and behind it, the disk cache).

A request spanning chunks is assembled into one reply buffer, reserved too.
Every chunk read is reserved in the ``MemoryBudget`` before it starts (a
demand read waits for room; read-ahead is refused instead) and is cached when
it lands. Concurrent readers of bytes inside a chunk being read wait for that
read instead of starting their own (single flight per chunk). A chunk that
lands under another identity than the handle's raises ``IdentityChanged``:
bytes of two versions never meet.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import NamedTuple

import trio

from stfs.backing import ChunkData, FileIdentity
from stfs.backing_reads import BackingReads
from stfs.budget import MemoryBudget
from stfs.buffers import BufferPool
from stfs.cache import ChunkCache
from stfs.disk_cache import DiskCache
from stfs.metrics import Counters
from stfs.streams import Stream
from stfs.versions import IdentityChanged, VersionGuard


class Chunk(NamedTuple):
    """A chunk found or read for a request."""

    start: int
    data: ChunkData
    fresh: bool
    """Read from SOURCE by this request: its identity was checked as it was read
    (fstat before and after), so serving it needs no other check."""


class Flight:
    """One backing read in progress; readers of bytes inside it wait for it."""

    __slots__ = ("data", "done", "error", "promote", "size", "speculative", "start")

    def __init__(self, start: int, size: int, speculative: bool) -> None:
        self.start = start
        self.size = size
        self.speculative = speculative
        """A read-ahead's read: tried once, so its error is not the reader's."""
        self.promote: Callable[[], None] | None = None
        """Makes a read-ahead still queued for a slot a demand read (a reader waits)."""
        self.done = trio.Event()
        self.data: ChunkData | None = None
        self.error: BaseException | None = None


class Fetcher:
    """Chunks by offset: cache, single flight, backing reads into the cache."""

    def __init__(self, reads: BackingReads, guard: VersionGuard, cache: ChunkCache,
                 budget: MemoryBudget, pool: BufferPool, counters: Counters,
                 disk: DiskCache | None = None) -> None:
        self.reads = reads
        self.guard = guard
        self.cache = cache
        self.budget = budget
        self.pool = pool
        self.counters = counters
        self.disk = disk
        """The persistent tier below the cache (``--cache-dir``), if any."""
        self._flights: dict[FileIdentity, list[Flight]] = {}
        self._assembly_lock = trio.Lock()

    async def chunk_at(self, stream: Stream, offset: int, chunk_size: int,
                       sequential: bool, want_end: int) -> Chunk:
        """The chunk holding *offset*.

        A new chunk starts at *offset* itself for a sequential stream (so chunks
        follow the kernel's requests and later requests fall inside one chunk),
        at the chunk-size boundary otherwise (so random readers share chunks). A
        sequential request only partly covered by a cached chunk is re-read from
        its own offset rather than assembled from two chunks, unless the disk
        cache holds the rest.
        """
        identity = stream.handle.identity
        held_to = offset  # the end of a chunk in memory that holds offset but too little
        while True:
            found = self.cache.lookup(identity, offset, stream.handle.fh)
            if found is not None:
                start, data = found
                # Covered as far as a new chunk of this size from here could reach?
                covered = start + len(data) >= min(want_end, identity.size, offset + chunk_size)
                if covered or not sequential or self._on_disk(identity, start + len(data)):
                    self.counters.cache_hits += 1
                    return Chunk(start, data, False)
                held_to = start + len(data)
                del found, data
            flight = self.flight_at(identity, offset)
            if flight is None:
                break
            if flight.promote is not None:
                flight.promote()
            await flight.done.wait()
            if flight.error is not None:
                if flight.speculative:
                    continue  # read-ahead is never retried: read it on demand, with retries
                raise flight.error
            # Landed in the cache (or was cancelled): look again.
            landed: ChunkData | None = flight.data
            if landed is not None and flight.start <= offset < flight.start + len(landed):
                reach = min(want_end, identity.size, offset + chunk_size)
                if (flight.start + len(landed) >= reach or not sequential
                        or self._on_disk(identity, flight.start + len(landed))):
                    self.counters.cache_hits += 1
                    return Chunk(flight.start, landed, False)
                held_to = flight.start + len(landed)
                break
        self.counters.cache_misses += 1
        if self.disk is not None:
            chunk = await self._from_disk(stream, offset, speculative=False, beyond=held_to)
            if chunk is not None:
                return chunk  # it may end before the request does: then assembled
        start = offset if sequential else offset - offset % chunk_size
        fetched = await self.fetch(stream, start, chunk_size, speculative=False)
        assert fetched is not None
        return Chunk(start, fetched, True)

    def _on_disk(self, identity: FileIdentity, offset: int) -> bool:
        """The disk cache holds byte *offset*: a sequential request that a chunk in
        memory covers only in part is assembled with the disk's bytes, not re-read."""
        return self.disk is not None and self.disk.find(identity, offset) is not None

    def flight_at(self, identity: FileIdentity, offset: int) -> Flight | None:
        for flight in self._flights.get(identity, ()):
            if flight.start <= offset < flight.start + flight.size:
                return flight
        return None

    def covered_to(self, identity: FileIdentity, start: int, size: int) -> int | None:
        """End of a cached or in-flight chunk covering all of [start, start + size)
        (or to end of file), else None. A chunk covering only part does not count:
        read-ahead must follow the kernel's request boundaries, and a misaligned
        chain would leave every request straddling two chunks."""
        want_end = min(start + size, identity.size)
        found = self.cache.lookup(identity, start, -1)
        if found is not None and found[0] + len(found[1]) >= want_end:
            return found[0] + len(found[1])
        flight = self.flight_at(identity, start)
        if flight is not None and flight.start + flight.size >= want_end:
            return flight.start + flight.size
        return None

    async def fetch(self, stream: Stream, start: int, chunk_size: int,
                    speculative: bool, after: trio.Event | None = None,
                    on_queued: Callable[[], None] | None = None) -> ChunkData | None:
        """Read one chunk from SOURCE into the cache (single flight per chunk).

        Speculative (read-ahead): None when the chunk is covered already, the
        budget has no room for it or the disk cache's writer lags behind.
        *after*, *on_queued*: see ``BackingReads.run``."""
        handle = stream.handle
        identity = handle.identity
        if speculative:
            if self.covered_to(identity, start, chunk_size) is not None:
                return None
            if self.disk is not None and self.disk.find(identity, start) is not None:
                if on_queued is not None:
                    on_queued()  # no read slot to queue for: the next prefetch may go
                chunk = await self._from_disk(stream, start, speculative=True)
                return None if chunk is None else chunk.data
            if self.disk is not None and self.disk.lagging():
                return None  # memory would drop chunks before the disk has them
            if not self.budget.try_reserve_speculative(chunk_size, evict=self.disk is not None):
                return None
        else:
            await self.budget.reserve(chunk_size)
        with self._flight(identity, start, chunk_size, speculative) as flight:
            buf = self.pool.take(chunk_size, aligned=not self.reads.is_local(handle))
            resume = (None if speculative
                      else functools.partial(self.guard.verify_resume, stream, buf))

            def queued(promote: Callable[[], None]) -> None:
                flight.promote = promote
                if on_queued is not None:
                    on_queued()

            data, identity_now = await self.reads.read_chunk(
                stream, buf, start, speculative=speculative, resume=resume, after=after,
                on_queued=queued)
            del buf, resume  # the pool reuses a buffer only when it is the sole owner
            if identity_now != identity:
                handle.seen_identity = identity_now
                raise IdentityChanged(identity_now)
            self.guard.confirmed(stream)
            flight.data = data
            if (self.cache.insert((identity, start), data, chunk_size, handle.fh)
                    and self.disk is not None):
                self.disk.offer(identity, start, len(data), handle.path)
            return data

    async def _from_disk(self, stream: Stream, offset: int, speculative: bool,
                         beyond: int = 0) -> Chunk | None:
        """The disk cache's entry holding *offset* (and reaching past *beyond*),
        read into the memory cache; None when it has none (or a damaged one, now
        dropped) or, for read-ahead, no room or the entry is being read already."""
        assert self.disk is not None
        handle = stream.handle
        identity = handle.identity
        key = self.disk.find(identity, offset)
        if key is None or key.start + key.length <= beyond:
            if not speculative:
                self.disk.miss()
            return None
        if speculative:
            if (self.flight_at(identity, key.start) is not None
                    or not self.budget.try_reserve_speculative(key.length, evict=True)):
                return None
        else:
            await self.budget.reserve(key.length)
        with self._flight(identity, key.start, key.length, speculative) as flight:
            buf = self.pool.take(key.length, aligned=not self.reads.is_local(handle))
            if not await self.disk.read(key, buf):
                return None
            flight.data = buf
            self.cache.insert((identity, key.start), buf, key.length, handle.fh)
            return Chunk(key.start, buf, False)

    @contextlib.contextmanager
    def _flight(self, identity: FileIdentity, start: int, size: int,
                speculative: bool) -> Iterator[Flight]:
        """One read of *size* reserved bytes in flight: readers of its bytes wait
        for it. Its reservation passes to the cache once ``data`` is set, else
        it is released."""
        flight = Flight(start, size, speculative)
        flights = self._flights.setdefault(identity, [])
        flights.append(flight)
        try:
            yield flight
        except (OSError, IdentityChanged) as exc:
            flight.error = exc  # never a Cancelled: that belongs to this task alone
            raise
        finally:
            if speculative:
                self.budget.speculative_done(size)
            if flight.data is None:
                self.budget.release(size)
            flight.promote = None  # it holds the read's job (and so its buffer)
            flights.remove(flight)
            if not flights:
                del self._flights[identity]
            flight.done.set()

    async def assemble(self, stream: Stream, offset: int, size: int,
                        chunk_size: int) -> tuple[bytearray, int]:
        """A request spanning chunks: copy the pieces into one reserved reply buffer.

        Returns the reply and the end of the last chunk used. The reservation is
        released just before returning: pyfuse3 writes the reply synchronously
        after the read handler returns, before any other reservation can be
        granted on the event loop.
        """
        # One assembly at a time: its reply reservation is the only one that waits
        # for chunk reservations while held, so serializing assemblies keeps every
        # other reservation either in flight (finishing) or evictable cache.
        async with self._assembly_lock:
            await self.budget.reserve(size)
            try:
                return await self._assemble_reserved(stream, offset, size, chunk_size)
            finally:
                self.budget.release(size)

    async def _assemble_reserved(self, stream: Stream, offset: int, size: int,
                                 chunk_size: int) -> tuple[bytearray, int]:
        handle = stream.handle
        identity = handle.identity  # one reply, one version
        reply = bytearray(size)
        n = 0
        chunk_end = offset
        while n < size:
            start, data, _ = await self.chunk_at(stream, offset + n, chunk_size,
                                                         False, offset + size)
            if handle.identity != identity:
                raise IdentityChanged(handle.identity)  # two versions must never meet
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
