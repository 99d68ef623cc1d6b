"""Chunk sizing decisions: pure code, no I/O, no clock of its own.

The seeds' AdaptiveChunkSizer and ChunkPerformanceTracker, in file-system
form:

* ``AdaptiveChunkSizer.base_size`` is the seeds' formula: a base size by file
  size class (<1 MiB 32K, <10 MiB 64K, <100 MiB 128K, larger 256K), times 0.5
  above 80 % memory use, 0.75 above 60 %, 1.25 below 40 %, times 1.2 when the
  recent average throughput is under 5 MB/s, clamped to the configured bounds.
* ``AdaptiveChunkSizer.aligned`` turns a size into the chunk size the engine
  uses: the largest power of two not above it (at least the 4 KiB page), so
  chunks line up with the kernel's page-aligned requests and one request
  usually falls inside one chunk (served without a copy).
* ``StreamState`` is the per-handle part: the chunk size grows (doubles) while
  access stays sequential and falls back to the base size on a seek, as
  rclone and mountpoint-s3 do; the read-ahead window does the same.
* ``ChunkPerformanceTracker`` keeps the last 10 chunk reads (size and time),
  whose throughput drives the sizer's low-throughput factor.
* ``RequestPlanner`` applies all of it to one request.
"""

from __future__ import annotations

import collections
import dataclasses
import statistics
from collections.abc import Callable, Iterable

KIB = 1024
MIB = 1024 * KIB
PAGE = 4 * KIB

STREAMING_TRIGGER = 1 * MIB
"""Files smaller than this are read whole in one backing read and cached whole."""

SLOW_READ_S = 0.01
"""A stream whose chunk reads take this long (a network store) grows its
read-ahead window four times per request instead of two."""

EAGER_REQUEST = 256 * KIB
"""A stream whose first request starts the file and is at least this big (the
kernel's first read-ahead for a reader asking 128 KiB or more) is sequential
from that request on: waiting for a second one would cost a slow store a
round trip with nothing read ahead."""
EAGER_WINDOW = 4
"""The read-ahead window such a first request opens, in chunks (within the
window bound): the reads that fill a slow store's pipeline start together
instead of doubling one round trip at a time."""

LOW_THROUGHPUT_BPS = 5 * MIB
"""Below this average throughput the seeds try larger chunks (x1.2)."""

HISTORY_SIZE = 10


def file_class_size(file_size: int) -> int:
    """The seeds' base chunk size for a file of *file_size* bytes."""
    if file_size < 1 * MIB:
        return 32 * KIB
    if file_size < 10 * MIB:
        return 64 * KIB
    if file_size < 100 * MIB:
        return 128 * KIB
    return 256 * KIB


def memory_factor(memory_use_pct: float) -> float:
    """The seeds' scaling for memory use (percent of the limit)."""
    if memory_use_pct > 80:
        return 0.5
    if memory_use_pct > 60:
        return 0.75
    if memory_use_pct < 40:
        return 1.25
    return 1.0


def throughput_factor(throughputs_bps: Iterable[float]) -> float:
    """x1.2 when the last (up to 5) chunks averaged under 5 MB/s; needs 3 samples."""
    recent = list(throughputs_bps)[-5:]
    if len(recent) < 3:
        return 1.0
    return 1.2 if sum(recent) / len(recent) < LOW_THROUGHPUT_BPS else 1.0


def power_of_two_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def power_of_two_ceil(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class ChunkSample:
    """One backing read: how big, how long."""

    size: int
    seconds: float

    @property
    def throughput_bps(self) -> float:
        return self.size / self.seconds if self.seconds > 0 else float("inf")


class ChunkPerformanceTracker:
    """The last ``HISTORY_SIZE`` chunk reads (the sizer's throughput factor)."""

    def __init__(self, history: int = HISTORY_SIZE) -> None:
        self._samples: collections.deque[ChunkSample] = collections.deque(maxlen=history)

    def record(self, size: int, seconds: float) -> None:
        self._samples.append(ChunkSample(size, seconds))

    def seed(self, throughputs_bps: list[float]) -> None:
        """Start from throughputs learned in an earlier mount (one second each)."""
        for bps in throughputs_bps:
            self._samples.append(ChunkSample(int(bps), 1.0))

    def throughputs(self) -> list[float]:
        return [s.throughput_bps for s in self._samples]

    def latency_s(self) -> float | None:
        """The median time of the recent reads (None before any)."""
        if not self._samples:
            return None
        return statistics.median(s.seconds for s in self._samples)


class AdaptiveChunkSizer:
    """Chunk size decisions within ``min_chunk``..``max_chunk``."""

    def __init__(self, min_chunk: int, max_chunk: int) -> None:
        self.min_chunk = min_chunk
        self.max_chunk = max_chunk

    def clamp(self, size: float) -> int:
        return int(min(max(round(size), self.min_chunk), self.max_chunk))

    def base_size(self, file_size: int, memory_use_pct: float,
                  throughputs_bps: Iterable[float] = ()) -> int:
        """The seeds' formula, before alignment."""
        size = file_class_size(file_size) * memory_factor(memory_use_pct)
        size *= throughput_factor(throughputs_bps)
        return self.clamp(size)

    def aligned(self, size: int) -> int:
        """The engine's chunk size for *size*: a power of two within the bounds."""
        aligned = power_of_two_floor(self.clamp(size))
        if aligned < self.min_chunk:  # an odd min_chunk: the next power of two up
            aligned = min(power_of_two_ceil(self.min_chunk), power_of_two_floor(self.max_chunk))
        return max(aligned, PAGE) if self.max_chunk >= PAGE else aligned

    def cap(self, memory_use_pct: float) -> int:
        """Largest chunk a stream may grow to at this memory use."""
        return self.aligned(int(self.max_chunk * min(1.0, memory_factor(memory_use_pct))))


@dataclasses.dataclass
class StreamState:
    """Per-handle access pattern: sequential detection, chunk size and read-ahead window."""

    chunk_size: int
    next_offset: int = 0
    sequential_reads: int = 0
    readahead_chunks: int = 0
    """Read-ahead window in chunks; 0 until the stream proves sequential."""
    seeks: int = 0
    """Consecutive non-sequential requests."""

    def is_sequential(self, offset: int, size: int) -> bool:
        """Whether a request at *offset* continues the stream (within the slack)."""
        return abs(offset - self.next_offset) <= 2 * max(self.chunk_size, size)

    def observe(self, offset: int, size: int, base_chunk: int, cap_chunk: int,
                max_window_chunks: int | Callable[[], int],
                random_chunk: int | None = None, window_growth: int = 2,
                eager: bool = True) -> bool:
        """Account one request; returns whether it continues a sequential stream.

        Requests of one stream can arrive slightly out of order (the kernel keeps
        several reads in flight), so "sequential" tolerates a small window around
        the expected offset. A first seek falls back to the base size; a stream
        that keeps seeking (random access) uses *random_chunk* (its request size),
        since a 256K chunk per 4K read would read 64 times what is asked.
        *eager*: a big first request at offset 0 may open the window at once
        (``EAGER_REQUEST``).
        """
        sequential = self.is_sequential(offset, size)
        if sequential and offset + size > self.next_offset:
            self.sequential_reads += 1
            eager = (eager and self.sequential_reads == 1 and offset == 0
                     and size >= EAGER_REQUEST)
            if self.sequential_reads >= 2 or eager:
                # Grow, and never stay below the kernel's request size: a request
                # inside one chunk is answered without assembling pieces.
                grown = max(self.chunk_size * 2, power_of_two_ceil(size))
                self.chunk_size = min(grown, cap_chunk)
                bound = (max_window_chunks if isinstance(max_window_chunks, int)
                         else max_window_chunks())  # worked out only when it is needed
                opened = EAGER_WINDOW if eager else 1
                self.readahead_chunks = min(
                    max(opened, self.readahead_chunks * window_growth), bound)
        elif not sequential:
            self.sequential_reads = 0
            self.seeks += 1
            fallback = base_chunk
            if random_chunk is not None and self.seeks >= 2:
                fallback = random_chunk
            self.chunk_size = min(fallback, cap_chunk)
            self.readahead_chunks = 0
        if sequential:
            self.seeks = 0
        self.next_offset = max(self.next_offset, offset + size) if sequential else offset + size
        return sequential


class RequestPlanner:
    """Per-request chunk decisions: pure arithmetic over the sizer and stream state.

    * Files under ``STREAMING_TRIGGER`` that fit one chunk are one chunk (the
      next power of two that holds them), read whole in one backing read.
    * A stream's base chunk is the sizer's formula for the file's size class.
    * A request that continues a stream lets its chunk size grow; a seek falls
      back to the base size, and a stream that keeps seeking reads the smallest
      aligned chunk that holds each request (``random_chunk``).
    """

    def __init__(self, sizer: AdaptiveChunkSizer) -> None:
        self.sizer = sizer

    def is_small(self, file_size: int) -> bool:
        """Whether a file of *file_size* bytes is read whole, as one chunk."""
        return file_size < STREAMING_TRIGGER and file_size <= self.sizer.max_chunk

    @staticmethod
    def whole_file_chunk(file_size: int) -> int:
        """A small file's one chunk: the next power of two that holds it."""
        return max(PAGE, power_of_two_ceil(file_size))

    def base_chunk(self, file_size: int, memory_use_pct: float,
                   throughputs_bps: Iterable[float] = ()) -> int:
        """The chunk size a new stream of the file starts with."""
        if self.is_small(file_size):
            return self.whole_file_chunk(file_size)
        return self.sizer.aligned(self.sizer.base_size(file_size, memory_use_pct,
                                                       throughputs_bps))

    def random_chunk(self, offset: int, size: int) -> int:
        """The smallest aligned chunk holding the whole request at *offset*."""
        chunk = self.sizer.aligned(power_of_two_ceil(size))
        while offset % chunk + size > chunk and chunk < self.sizer.max_chunk:
            chunk *= 2
        return self.sizer.aligned(chunk)

    def plan(self, state: StreamState, file_size: int, offset: int, size: int,
             memory_use_pct: float, tracker: ChunkPerformanceTracker,
             max_window_chunks: int | Callable[[], int], *,
             eager: bool = True,
             widen: Callable[[int, int], int] | None = None) -> tuple[int, bool]:
        """Account a request in *state*: (chunk size to read it with, whether it
        continues a sequential stream). *tracker*: the stream's recent reads;
        *eager*: see ``StreamState.observe``; *widen(narrow, base)*: the chunk a
        random read fetches (``random_reads.WideChunks.chunk``), else narrow."""
        if self.is_small(file_size):
            return self.whole_file_chunk(file_size), False
        base = random_chunk = 0  # only a seek needs them; skip the arithmetic otherwise
        if not state.is_sequential(offset, size):
            base = self.base_chunk(file_size, memory_use_pct, tracker.throughputs())
            random_chunk = self.random_chunk(offset, size)
            if widen is not None:
                random_chunk = widen(random_chunk, base)
        cap = self.sizer.cap(memory_use_pct)
        latency_s = tracker.latency_s()
        # Each step of a slow store's window costs a round trip: grow it faster.
        growth = 4 if latency_s is not None and latency_s >= SLOW_READ_S else 2
        sequential = state.observe(offset, size, base, cap, max_window_chunks, random_chunk,
                                   growth, eager)
        if sequential:
            # Never split a request over smaller chunks (a stream's first requests):
            # the pieces would be read one after another, a round trip each.
            return max(state.chunk_size, min(power_of_two_ceil(size), cap)), True
        return state.chunk_size, False
