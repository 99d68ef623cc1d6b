"""How much a random read fetches: the request, or a wider chunk when it is free.

A random reader's request is read as the smallest aligned chunk that holds it
(``RequestPlanner.random_chunk``): on a local disk a 128K read per 4K request
would read 32 times what is asked. A network or cloud store is different: a
request costs its round trip, and 128K take hardly longer than 4K. There a
wider chunk costs nothing, and the cache then answers later requests that fall
inside it, without a round trip.

``WideChunks`` decides from what the store shows, per read size (powers of
two), over the latest ``SAMPLES`` worker-thread reads of each size:

* the median time of a read of the wide size (the stream's base chunk) and of
  the request's size. The wide chunk is used while
  ``wide x (1 - hit rate) <= narrow x (1 + TOLERANCE)``: what a random read
  then costs on average is no more than reading just the request;
* the hit rate: the share of the latest ``HITS_KEPT`` random requests answered
  without a backing read, or that fell in a wide chunk a recent random request
  also fell in (counted from ``HITS_MIN`` on, 0 before). The second part is
  what reading wide would have earned while reading narrow: as many recent
  wide chunks as the chunk cache holds are remembered, so a request inside
  one would likely have found it cached. Counting only real hits, a policy
  that once chose narrow would never see a reason to widen again.

Until both sizes have been timed, random reads fetch the wide chunk (a
stream's first seek reads its base chunk anyway), then the request's size:
a few reads each. Local block devices never widen (the engine asks only for
other stores): there reading 32 times the request costs 32 times the bytes.

Pure: no I/O, no clock; fed by the engine.
"""

from __future__ import annotations

import collections
import statistics
from collections.abc import Callable, Hashable

from stfs.congestion import size_class

SAMPLES = 16
"""Reads of each size whose median is its cost."""
MIN_SAMPLES = 3
TOLERANCE = 0.02
"""How much slower than reading the request alone a random read may be on
average, for noise in the medians (a 5 ms faultfs read 128K 2-5 % slower than
4K, medians of 30 reads: there the hit rate decides)."""
HITS_KEPT = 128
HITS_MIN = 32


class WideChunks:
    """The chunk a random read fetches (see the module docstring)."""

    def __init__(self, cache_capacity: Callable[[], int] = lambda: 0) -> None:
        """*cache_capacity()*: the chunk cache's capacity now, in bytes."""
        self._times: dict[int, collections.deque[float]] = {}
        self._hits: collections.deque[bool] = collections.deque(maxlen=HITS_KEPT)
        self._cache_capacity = cache_capacity
        self._wide = 0
        """The wide size last asked about: the regions' size."""
        self._regions: collections.OrderedDict[tuple[Hashable, int, int], None] = \
            collections.OrderedDict()
        """(file, wide size, index) of the wide chunks random requests fell in lately."""
        self.widened = 0
        """Random requests planned with a wide chunk."""

    def record_read(self, size: int, seconds: float) -> None:
        """A backing read of *size* bytes took *seconds* in a worker thread."""
        times = self._times.get(size_class(size))
        if times is None:
            times = self._times[size_class(size)] = collections.deque(maxlen=SAMPLES)
        times.append(seconds)

    def record_random(self, hit: bool, file: Hashable = None, offset: int = 0) -> None:
        """A random request at *offset* of *file* was answered from the cache
        (*hit*) or read."""
        if self._wide and file is not None:
            region = (file, self._wide, offset // self._wide)
            seen = region in self._regions
            self._regions[region] = None
            self._regions.move_to_end(region)
            keep = max(1, self._cache_capacity() // self._wide)
            while len(self._regions) > keep:
                self._regions.popitem(last=False)
            hit = hit or seen
        self._hits.append(hit)

    def cost_s(self, size: int) -> float | None:
        """The median time of the latest reads of *size* (None: too few)."""
        times = self._times.get(size_class(size))
        if times is None or len(times) < MIN_SAMPLES:
            return None
        return statistics.median(times)

    def hit_rate(self) -> float:
        if len(self._hits) < HITS_MIN:
            return 0.0
        return sum(self._hits) / len(self._hits)

    def chunk(self, narrow: int, wide: int) -> int:
        """*wide* when a read of it costs no more, on average, than one of
        *narrow* (the request's chunk), else *narrow*."""
        if wide <= narrow:
            return narrow
        self._wide = wide
        narrow_s, wide_s = self.cost_s(narrow), self.cost_s(wide)
        if narrow_s is not None and (
                wide_s is not None
                and wide_s * (1.0 - self.hit_rate()) > narrow_s * (1.0 + TOLERANCE)):
            return narrow
        if wide_s is not None and narrow_s is None:
            return narrow  # time the request's size
        self.widened += 1  # cheaper on average, or not timed yet
        return wide
