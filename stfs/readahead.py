"""Read-ahead and read-around scheduling: speculative work for streams.

* Read-ahead: a sequential stream prefetches up to its window of chunks
  (``StreamState.readahead_chunks``, which doubles with the stream), chained
  from where its last request's chunk ended and following the kernel's
  request boundaries. The window is bounded by the stream's bandwidth-delay
  product (its chunk reads' latency times the rate its reader consumes, with
  room to grow) and by a share of the chunk cache per stream: a slow store
  gets several chunk reads in flight for one reader, a slow reader no more
  than it uses. Each prefetch is a task in the engine's nursery, registered
  as a speculative resource of its handle; a seek, a release or heavy
  pressure cancels it. A stream's prefetches queue for read slots in file
  order (each once the one scheduled before it is queued; tasks started
  together run in any order): the chunk the reader needs next is never left
  waiting behind ones it needs later. A reader that comes to wait for a
  prefetch still queued makes it a demand read (``Flight.promote``).
  While a stream's demand reads find SOURCE's page cache holding the bytes,
  read-ahead waits: those copies are as quick as a cache hit.
* What read-ahead earns: each chunk scheduled is *used* when a reply
  includes its bytes, *wasted* when its stream seeks or is released first.
  Below ``EARNED_FULL`` of the latest ``EARNED_OUTCOMES`` used, windows shrink
  in proportion (never below one chunk, so the figure can recover) and a
  stream no longer starts read-ahead at its first request: programs that
  read a file's head and seek elsewhere stop paying a slow store for chunks
  they never read.
* Read-around: a random read of a file on a local block device offers the
  window around it to ``ReadAround``, which pushes it into the kernel's page
  cache for the mount when SOURCE has it cached.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os

import trio

from stfs.fetcher import Fetcher
from stfs.readaround import ReadAround
from stfs.resources import Priority, ResourceRegistry
from stfs.streams import Stream, StreamTable
from stfs.versions import IdentityChanged

log = logging.getLogger(__name__)

MAX_READAHEAD_BYTES = 16 * 1024 * 1024
"""A stream's read-ahead never exceeds this many bytes."""
BDP_HEADROOM = 2
"""A window may be this many times the bandwidth-delay product: when the window
itself limits the reader, its measured rate (and so the product) grows with it."""
MIN_WINDOW_CHUNKS = 4
"""The window never shrinks below this for the product's sake."""
EARNED_OUTCOMES = 64
"""Read-ahead chunks (used or wasted) the earned share is taken over."""
EARNED_MIN = 16
"""Outcomes needed before the share counts (until then read-ahead earns in full)."""
EARNED_FULL = 0.5
"""The share of chunks used at and above which windows are not cut."""


def bdp_chunks(stream: Stream, chunk_size: int) -> int | None:
    """Chunks in flight that cover *stream*'s chunk latency at the rate its reader
    consumes (Little's law), or None before there is enough to measure."""
    latency_s = stream.tracker.latency_s()
    rate = stream.consumption_bps()
    if latency_s is None or rate is None:
        return None
    return math.ceil(rate * latency_s / chunk_size)


@dataclasses.dataclass(frozen=True)
class ReadAheadStatistics:
    enabled: bool
    chunks: int
    """Chunks read ahead that landed in the cache."""
    used: int
    """Chunks read ahead whose bytes a reply then included."""
    wasted: int
    """Chunks read ahead (or being read) when their stream seeked or closed."""
    earned: float
    """The share of the latest outcomes that were used (1.0 before there are enough)."""
    read_around_pushes: int
    read_around_bytes: int


class ReadAhead:
    """Schedules read-ahead of sequential streams and read-around of random ones."""

    def __init__(self, fetcher: Fetcher, streams: StreamTable, resources: ResourceRegistry,
                 read_around: ReadAround, *, cache_limit: int) -> None:
        self.fetcher = fetcher
        self.streams = streams
        self.resources = resources
        self.read_around = read_around
        self.cache_limit = cache_limit
        self.enabled = True
        self.chunks = 0
        self.used = 0
        self.wasted = 0
        self._outcomes: collections.deque[bool] = collections.deque(maxlen=EARNED_OUTCOMES)
        self._outcomes_used = 0
        """How many of ``_outcomes`` are True (asked on every request)."""
        self._nursery: trio.Nursery | None = None

    def attach(self, nursery: trio.Nursery | None) -> None:
        """Where prefetch tasks run (None: nowhere, nothing is scheduled)."""
        self._nursery = nursery

    def set_enabled(self, enabled: bool) -> None:
        """Switch read-ahead and read-around (off under heavy pressure)."""
        self.enabled = enabled
        self.read_around.pause(not enabled)
        if not enabled:
            self.streams.cancel_readahead()

    def max_window_chunks(self, stream: Stream, chunk_size: int) -> int:
        """Read-ahead window bound, in chunks: what covers the bandwidth-delay
        product of *stream* (with room to grow), within its share of the cache."""
        chunk_size = max(chunk_size, 1)
        per_stream = min(MAX_READAHEAD_BYTES, self.cache_limit // (2 * max(1, len(self.streams))))
        window = per_stream // chunk_size
        bdp = bdp_chunks(stream, chunk_size)
        if bdp is not None:
            window = min(window, max(MIN_WINDOW_CHUNKS, BDP_HEADROOM * bdp))
        earned = self.earned()
        if earned < EARNED_FULL:
            window = min(window, max(1, int(window * earned / EARNED_FULL)))
        return max(0, window)

    # -- what read-ahead earns ----------------------------------------------------

    def earned(self) -> float:
        """The share of the latest read-ahead chunks that replies used."""
        if len(self._outcomes) < EARNED_MIN:
            return 1.0
        return self._outcomes_used / len(self._outcomes)

    def _outcome(self, used: bool) -> None:
        outcomes = self._outcomes
        if len(outcomes) == outcomes.maxlen:
            self._outcomes_used -= outcomes[0]
        outcomes.append(used)
        self._outcomes_used += used

    def earns_in_full(self) -> bool:
        """Whether read-ahead may start at a stream's first request."""
        return self.earned() >= EARNED_FULL

    def note_served(self, stream: Stream, offset: int, end: int) -> None:
        """A reply covered [offset, end) of *stream*: chunks read ahead there were used."""
        ahead = stream.readahead_chunks
        if not ahead:
            return
        for start, size in list(ahead.items()):
            if start < end and offset < start + size:
                del ahead[start]
                self.used += 1
                self._outcome(True)

    def abandon(self, stream: Stream) -> None:
        """*stream* seeked or closed: what it read ahead and did not use was wasted."""
        ahead = stream.readahead_chunks
        self.wasted += len(ahead)
        for _ in ahead:
            self._outcome(False)
        ahead.clear()

    # -- read-ahead -------------------------------------------------------------

    def schedule(self, stream: Stream, next_start: int, chunk_size: int) -> None:
        """Prefetch up to the stream's window of chunks, chained from *next_start*."""
        window = stream.state.readahead_chunks
        if not self.enabled or window <= 0 or self._nursery is None or stream.source_cached:
            return
        identity = stream.handle.identity
        limit_bytes = window * chunk_size
        chunk_start = next_start
        for _ in range(window):
            if chunk_start >= identity.size or stream.readahead_bytes + chunk_size > limit_bytes:
                break
            covered_to = self.fetcher.covered_to(identity, chunk_start, chunk_size)
            if covered_to is not None:
                chunk_start = covered_to
                continue
            stream.readahead_bytes += chunk_size
            stream.readahead_chunks[chunk_start] = chunk_size
            slot = trio.Event()
            self._nursery.start_soon(self._prefetch, stream, chunk_start, chunk_size,
                                     stream.readahead_slot, slot)
            stream.readahead_slot = slot
            chunk_start += chunk_size

    async def _prefetch(self, stream: Stream, start: int, chunk_size: int,
                        after: trio.Event | None, slot: trio.Event) -> None:
        """Read one chunk ahead: its read queues for a read slot once the
        prefetch scheduled before it (*after*) is queued, then sets *slot*."""
        handle = stream.handle
        try:
            if self.streams.get(handle.fh) is not stream:  # released before this task ran
                stream.readahead_bytes -= chunk_size
                return
            scope = trio.CancelScope()
            stream.readahead_scopes.add(scope)
            tracked = self.resources.register(handle.fh, "readahead", Priority.SPECULATIVE,
                                              scope.cancel, chunk_size)
            try:
                with scope:
                    if await self.fetcher.fetch(stream, start, chunk_size, speculative=True,
                                                after=after, on_queued=slot.set):
                        self.chunks += 1
                    else:  # covered already, or no room: nothing of it to judge
                        stream.readahead_chunks.pop(start, None)
            except (OSError, IdentityChanged) as exc:
                stream.readahead_chunks.pop(start, None)
                log.debug("read-ahead of %r at %d stopped: %r", handle.path, start, exc)
            except Exception:  # a background task: never take the mount down
                stream.readahead_chunks.pop(start, None)
                log.exception("read-ahead of %s at %d failed", os.fsdecode(handle.path), start)
            finally:
                self.resources.forget(tracked)
                stream.readahead_scopes.discard(scope)
                stream.readahead_bytes -= chunk_size
        finally:
            slot.set()

    # -- read-around ------------------------------------------------------------

    def after_random_read(self, stream: Stream, offset: int, whole_file_chunk: int) -> None:
        """A read at *offset* that did not continue the stream: offer the window
        around it to the kernel's page cache (once per window and version).
        *whole_file_chunk*: the file's one chunk when it is read whole, else 0."""
        handle = stream.handle
        if (not self.enabled or not self.read_around.enabled or handle.direct_io
                or not self.fetcher.reads.is_local(handle)):
            return
        fd = self.fetcher.reads.descriptors.fd_now(handle)
        if fd < 0:
            return
        identity = handle.identity
        self.read_around.offer(fd, handle.nodeid, identity,
                               self.read_around.window(offset, identity, whole_file_chunk))

    def statistics(self) -> ReadAheadStatistics:
        return ReadAheadStatistics(self.enabled, self.chunks, self.used, self.wasted,
                                   self.earned(), self.read_around.pushes,
                                   self.read_around.pushed_bytes)
