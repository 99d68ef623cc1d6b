"""Byte-bounded, scan-resistant chunk cache keyed by file identity and chunk.

Keys are ``(identity, start)``: the file's identity (device, inode, size,
mtime_ns, ctime_ns) and the chunk's first byte; chunks vary in length, and a
lookup finds the chunk holding a given byte (bisect over the file's chunk
starts). A file that changes gets a new identity, so entries of an old
version can never be served; they simply age out.

Replacement is 2Q (Johnson & Shasha): new chunks enter the FIFO ``A1in``;
chunks pushed out of it leave a key in the ghost list ``A1out``; a chunk
fetched again while its ghost is remembered, or hit by a different open
handle than the one that fetched it, goes to the LRU ``Am``. When full, stfs
evicts from ``A1in`` as long as it holds more than its quarter. Why 2Q and
not plain LRU or S3-FIFO: one stream touches a chunk with several
consecutive kernel requests; counting those as repeated use (LRU recency,
S3-FIFO's frequency bit) would let one ``cat`` of a big file flush the hot
working set. 2Q treats them as one correlated reference, so a scan only ever
cycles through ``A1in``.

Every cached byte is held in the ``MemoryBudget``: ``insert`` takes over the
reservation the fetch made, eviction releases it. A chunk being copied to the
disk cache is pinned: evicted meanwhile, it leaves the cache at once but its
bytes stay held until ``unpin``.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
from collections.abc import Callable, Iterator

from stfs.backing import ChunkData, FileIdentity
from stfs.budget import MemoryBudget
from stfs.buffers import BufferPool

ChunkKey = tuple[FileIdentity, int]
A1IN_SHARE = 0.25


class _Entry:
    __slots__ = ("data", "owner")

    def __init__(self, data: ChunkData, owner: int) -> None:
        self.data = data
        self.owner = owner


class ChunkCache:
    """Chunks of file data under a byte capacity, accounted in a MemoryBudget."""

    def __init__(self, capacity_bytes: int, budget: MemoryBudget,
                 pool: BufferPool | None = None) -> None:
        self.capacity_bytes = capacity_bytes
        self.floor_bytes = 0
        self._budget = budget
        self._pool = pool
        self._a1in: collections.OrderedDict[ChunkKey, _Entry] = collections.OrderedDict()
        self._am: collections.OrderedDict[ChunkKey, _Entry] = collections.OrderedDict()
        self._a1out: collections.OrderedDict[ChunkKey, None] = collections.OrderedDict()
        self._ghost_limit = max(64, capacity_bytes // (32 * 1024))
        self._starts: dict[FileIdentity, list[int]] = {}
        """Sorted chunk starts per identity, for containment lookups."""
        self.on_evict: Callable[[ChunkKey, ChunkData], bool] | None = None
        """Offered every evicted chunk; True: it took the chunk and its reservation."""
        self._pins: dict[ChunkKey, int] = {}
        self._deferred: dict[ChunkKey, int] = {}
        """Bytes of pinned chunks evicted, released when unpinned."""
        self.a1in_bytes = 0
        self.am_bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def cached_bytes(self) -> int:
        return self.a1in_bytes + self.am_bytes

    def __len__(self) -> int:
        return len(self._a1in) + len(self._am)

    def __contains__(self, key: ChunkKey) -> bool:
        return key in self._a1in or key in self._am

    def keys(self) -> Iterator[ChunkKey]:
        yield from self._a1in
        yield from self._am

    def spans(self) -> Iterator[tuple[FileIdentity, int, int]]:
        """(identity, start, length) of every cached chunk."""
        for entries in (self._a1in, self._am):
            for (identity, start), entry in entries.items():
                yield identity, start, len(entry.data)

    # -- lookup ------------------------------------------------------------

    def lookup(self, identity: FileIdentity, offset: int,
               owner: int) -> tuple[int, ChunkData] | None:
        """The cached chunk of *identity* holding byte *offset*: (start, data)."""
        starts = self._starts.get(identity)
        if starts:
            i = bisect.bisect_right(starts, offset) - 1
            if i >= 0:
                start = starts[i]
                data = self._get((identity, start), owner)
                if data is not None and offset < start + len(data):
                    self.hits += 1
                    return start, data
        self.misses += 1
        return None

    def _get(self, key: ChunkKey, owner: int) -> ChunkData | None:
        entry = self._am.get(key)
        if entry is not None:
            self._am.move_to_end(key)
            return entry.data
        entry = self._a1in.get(key)
        if entry is None:
            return None
        if entry.owner != owner:  # used by a second open: real reuse, not one stream's requests
            del self._a1in[key]
            self.a1in_bytes -= len(entry.data)
            self._am[key] = entry
            self.am_bytes += len(entry.data)
        return entry.data

    def pin(self, key: ChunkKey) -> ChunkData | None:
        """The data of the chunk at *key*, kept held in the budget until ``unpin``
        even if evicted meanwhile (not a use: its place in the queues stays)."""
        entry = self._am.get(key) or self._a1in.get(key)
        if entry is None:
            return None
        self._pins[key] = self._pins.get(key, 0) + 1
        return entry.data

    def unpin(self, key: ChunkKey) -> int:
        """Undo one ``pin``; the budget bytes that freed (those of a chunk evicted
        while pinned, once its last pin goes)."""
        left = self._pins[key] - 1
        if left:
            self._pins[key] = left
            return 0
        del self._pins[key]
        deferred = self._deferred.pop(key, None)
        if deferred is None:
            return 0
        self._budget.release(deferred)
        return deferred

    # -- insertion and eviction ---------------------------------------------

    def insert(self, key: ChunkKey, data: ChunkData, reserved: int, owner: int) -> bool:
        """Cache *data*, taking over the *reserved* budget bytes its fetch held;
        False if it was not cached (a chunk as long starts there already, or it is
        too big). A shorter chunk at the same start is replaced."""
        if len(data) > self.capacity_bytes:
            self._budget.release(reserved)
            return False
        held = self._am.get(key) or self._a1in.get(key)
        if held is not None:
            if len(held.data) >= len(data):
                self._budget.release(reserved)
                return False
            self._drop(key)  # a longer chunk from the same byte holds all the old one did
        self._budget.release(reserved - len(data))
        entry = _Entry(data, owner)
        if key in self._a1out:
            del self._a1out[key]
            self._am[key] = entry
            self.am_bytes += len(data)
        else:
            self._a1in[key] = entry
            self.a1in_bytes += len(data)
        bisect.insort(self._starts.setdefault(key[0], []), key[1])
        self.shrink_to(self.capacity_bytes)
        return True

    def _drop(self, key: ChunkKey) -> None:
        """Remove the chunk at *key* (being replaced by a longer one) and free it."""
        entry = self._a1in.pop(key, None)
        if entry is not None:
            self.a1in_bytes -= len(entry.data)
        else:
            entry = self._am.pop(key)
            self.am_bytes -= len(entry.data)
        starts = self._starts[key[0]]
        starts.pop(bisect.bisect_left(starts, key[1]))
        if not starts:
            del self._starts[key[0]]
        data, entry.data = entry.data, b""
        if key in self._pins:
            self._deferred[key] = self._deferred.get(key, 0) + len(data)
            return
        self._budget.release(len(data))
        if self._pool is not None:
            self._pool.give(data)

    def _victim(self) -> ChunkKey | None:
        """The chunk ``_evict_one`` would evict next."""
        if self._a1in and (self.a1in_bytes > self.capacity_bytes * A1IN_SHARE or not self._am):
            return next(iter(self._a1in))
        return next(iter(self._am)) if self._am else None

    def _evict_one(self) -> int | None:
        """Evict one chunk; its size (0 for an empty chunk), or None if none is left."""
        if self._a1in and (self.a1in_bytes > self.capacity_bytes * A1IN_SHARE or not self._am):
            key, entry = self._a1in.popitem(last=False)
            self.a1in_bytes -= len(entry.data)
            self._a1out[key] = None
            if len(self._a1out) > self._ghost_limit:
                self._a1out.popitem(last=False)
        elif self._am:
            key, entry = self._am.popitem(last=False)
            self.am_bytes -= len(entry.data)
        else:
            return None
        starts = self._starts[key[0]]
        starts.pop(bisect.bisect_left(starts, key[1]))
        if not starts:
            del self._starts[key[0]]
        self.evictions += 1
        data, entry.data = entry.data, b""
        del entry
        size = len(data)
        if self.on_evict is not None and self.on_evict(key, data):
            return 0  # kept (and its reservation) for the disk cache's write, pinned or not
        if key in self._pins:  # its bytes are still being read: released at unpin
            self._deferred[key] = self._deferred.get(key, 0) + size
            return 0
        self._budget.release(size)
        if self._pool is not None:
            self._pool.give(data)  # reused only if nothing else still refers to it
        return size

    def shrink_to(self, target_bytes: int) -> int:
        """Evict until at most *target_bytes* are cached; returns bytes freed."""
        freed = 0
        while self.cached_bytes > target_bytes:
            n = self._evict_one()
            if n is None:
                break
            freed += n
        return freed

    def reclaim(self, n_bytes: int) -> int:
        """Free at least *n_bytes* if possible, never below the floor (budget reclaimer)."""
        return self.shrink_to(max(self.floor_bytes, self.cached_bytes - max(n_bytes, 0)))

    def reclaim_if(self, n_bytes: int, may_evict: Callable[[ChunkKey, int], bool]) -> int:
        """Free up to *n_bytes* while the next chunk to go may go (read-ahead's
        reclaimer with a disk cache: only chunks it holds, or can keep)."""
        target = max(self.floor_bytes, self.cached_bytes - max(n_bytes, 0))
        freed = 0
        while self.cached_bytes > target:
            key = self._victim()
            if key is None:
                break
            entry = self._a1in.get(key) or self._am.get(key)
            if entry is None or not may_evict(key, len(entry.data)):
                break
            freed += self._evict_one() or 0
        return freed

    def clear(self) -> int:
        return self.shrink_to(0)

    def statistics(self) -> CacheStatistics:
        return CacheStatistics(self.cached_bytes, self.capacity_bytes, len(self), self.evictions)


@dataclasses.dataclass(frozen=True)
class CacheStatistics:
    cached_bytes: int
    capacity_bytes: int
    """Capacity now (shed under pressure)."""
    entries: int
    evictions: int
