"""Per-handle read state: one ``Stream`` for each open file handle that reads.

A stream holds what the read path learns about one handle: its access pattern
and chunk size (``StreamState``), the performance of its backing reads, the
verifier that hashes what it served, the read-ahead tasks working for it and
a few flags. Components of the read path take a ``Stream`` (which knows its
handle) instead of passing ``(handle, state)`` around.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Iterator

import trio

from stfs.backing import FileIdentity
from stfs.chunking import ChunkPerformanceTracker, StreamState
from stfs.handles import OpenFile
from stfs.recovery import StreamVerifier

RATE_SAMPLES = 16
"""Replies a stream's consumption rate is measured over."""


@dataclasses.dataclass(eq=False)
class Stream:
    """The read path's state for one open handle."""

    handle: OpenFile
    state: StreamState
    verifier: StreamVerifier
    tracker: ChunkPerformanceTracker = dataclasses.field(
        default_factory=ChunkPerformanceTracker)
    readahead_scopes: set[trio.CancelScope] = dataclasses.field(default_factory=set)
    readahead_bytes: int = 0
    """Bytes of read-ahead scheduled for this stream and not yet landed."""
    readahead_chunks: dict[int, int] = dataclasses.field(default_factory=dict)
    """Chunks (start: size) read ahead, or being read, that no reply has used yet."""
    readahead_slot: trio.Event | None = None
    """Set once the latest read-ahead scheduled holds its read slot (or ended):
    the next one waits for it, so a stream's read-ahead reads in file order."""
    chunk_seen: tuple[int, int] = (0, 0)
    """The chunk the last request was served from: requests inside it skip the
    identity check made before serving a new chunk."""
    change_lock: trio.Lock = dataclasses.field(default_factory=trio.Lock)
    sequential: bool = False
    """Whether the latest request continued a sequential run."""
    next_offset: int = 0
    """Where the latest reply ended: a request elsewhere is a seek."""
    confirmed_at: float = -math.inf
    """When (monotonic) a fstat or a backing read of this stream last found the
    file still the handle's version."""
    noted: FileIdentity | None = None
    """The version this stream last reported as served through the mount."""
    source_cached: bool = False
    """Whether this stream's latest demand read found SOURCE's page cache holding
    the bytes: read-ahead then only adds work (the kernel's own requests already
    come in parallel), so it waits until a read has to wait for the device."""
    served: collections.deque[tuple[float, int]] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=RATE_SAMPLES))
    """(monotonic time, bytes) of the latest replies: the rate the reader consumes."""
    interrupted: bool = False
    """A backing read of this stream met a transient error (and was retried)."""
    failed: bool = False
    """An interrupted stream that got an error anyway."""

    def cancel_readahead(self) -> None:
        for scope in self.readahead_scopes:
            scope.cancel()

    def consumption_bps(self) -> float | None:
        """Bytes per second the reader took over its latest replies (None: too few)."""
        if len(self.served) < RATE_SAMPLES // 2:
            return None
        span = self.served[-1][0] - self.served[0][0]
        if span <= 0:
            return None
        return sum(n for _, n in list(self.served)[1:]) / span


class StreamTable:
    """Streams by file handle number: made at a handle's first read, dropped at release."""

    def __init__(self, make: Callable[[OpenFile], Stream],
                 on_count: Callable[[int], None] = lambda _n: None) -> None:
        """*on_count(n)*: there are *n* streams now (after each one made or dropped)."""
        self._make = make
        self._on_count = on_count
        self._streams: dict[int, Stream] = {}

    def __len__(self) -> int:
        return len(self._streams)

    def __iter__(self) -> Iterator[Stream]:
        return iter(list(self._streams.values()))

    def fhs(self) -> list[int]:
        return list(self._streams)

    def get(self, fh: int) -> Stream | None:
        return self._streams.get(fh)

    def of(self, handle: OpenFile) -> tuple[Stream, bool]:
        """*handle*'s stream, and whether it was made just now."""
        stream = self._streams.get(handle.fh)
        if stream is not None:
            return stream, False
        stream = self._streams[handle.fh] = self._make(handle)
        self._on_count(len(self._streams))
        return stream, True

    def drop(self, fh: int) -> bool:
        """Forget *fh*'s stream: cancel its read-ahead, give back its verifier's memory."""
        stream = self._streams.pop(fh, None)
        if stream is None:
            return False
        stream.cancel_readahead()
        stream.verifier.reset()  # gives back what its reorder buffer reserved
        self._on_count(len(self._streams))
        return True

    def cancel_readahead(self) -> None:
        for stream in self._streams.values():
            stream.cancel_readahead()
