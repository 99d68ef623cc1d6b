"""The one memory budget: every byte of file data the daemon holds is reserved here.

Cache entries, in-flight backing reads, read-ahead and reply buffers all
reserve from one budget of ``--memory-limit`` bytes, so ``held_bytes`` can
never exceed the limit, whatever the concurrency. All accounting happens on
the trio thread (worker threads only fill buffers that were reserved before
they started), so no lock is needed.

* Demand reservations (a reader is waiting) always make progress: they first
  ask the reclaimer (the cache) to free room, then wait for releases.
  Progress is guaranteed because every reservation is either in flight
  (it finishes and becomes evictable cache) or evictable cache already.
* Speculative reservations (read-ahead) never wait: they are refused when
  they would eat into the share kept free for demand reads or when a demand
  read is already waiting.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import trio

Reclaimer = Callable[[int], int]
"""Called with a byte count to free; returns how many bytes it released."""


class MemoryBudget:
    """Byte reservations against a hard limit."""

    def __init__(self, limit_bytes: int, speculative_share: float = 0.5) -> None:
        self.limit_bytes = limit_bytes
        self._speculative_share = speculative_share
        self.speculative_limit_bytes = int(limit_bytes * speculative_share)
        self.held_bytes = 0
        self.peak_held_bytes = 0
        self.speculative_bytes = 0
        self.waiting = 0
        self.refused_speculative = 0
        self._lot = trio.lowlevel.ParkingLot()
        self._reclaimer: Reclaimer = lambda _n: 0
        self.speculative_reclaimer: Reclaimer = lambda _n: 0
        """Who frees room for read-ahead that may evict (``try_reserve_speculative``)."""

    def set_reclaimer(self, reclaimer: Reclaimer) -> None:
        """Who to ask for room when a demand reservation does not fit (the cache)."""
        self._reclaimer = reclaimer

    @property
    def free_bytes(self) -> int:
        return self.limit_bytes - self.held_bytes

    def set_limit(self, limit_bytes: int) -> None:
        """A new limit (the daemon's memory cgroup changed). Below what is held,
        the reclaimer frees cache at once; bytes still in flight above it drain
        as they are released, and until then every reservation waits. A higher
        limit wakes the readers waiting for room."""
        self.limit_bytes = limit_bytes
        self.speculative_limit_bytes = int(limit_bytes * self._speculative_share)
        if self.held_bytes > limit_bytes:
            self._reclaimer(self.held_bytes - limit_bytes)
        if self.waiting:
            self._lot.unpark_all()

    def _take(self, n: int) -> None:
        self.held_bytes += n
        self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)

    def try_reserve(self, n: int) -> bool:
        """Reserve *n* bytes now if they fit (no reclaiming, no waiting)."""
        if self.held_bytes + n > self.limit_bytes:
            return False
        self._take(n)
        return True

    def try_reserve_speculative(self, n: int, evict: bool = False) -> bool:
        """Read-ahead: granted only within its share, only from free room (it never
        evicts, unless *evict*: then ``speculative_reclaimer`` may free room, as a
        disk cache makes cached chunks cheap to get back), and never ahead of a
        waiting reader."""
        if self.waiting or self.speculative_bytes + n > self.speculative_limit_bytes:
            self.refused_speculative += 1
            return False
        if not self.try_reserve(n):
            if evict:
                self.speculative_reclaimer(self.held_bytes + n - self.limit_bytes)
            if not evict or not self.try_reserve(n):
                self.refused_speculative += 1
                return False
        self.speculative_bytes += n
        return True

    def speculative_done(self, n: int) -> None:
        """A speculative reservation became ordinary held data (or was released)."""
        self.speculative_bytes -= n

    async def reserve(self, n: int) -> None:
        """Reserve *n* bytes for a reader, freeing cache or waiting as needed."""
        if n > self.limit_bytes:
            raise ValueError(f"reservation of {n} bytes exceeds the limit of {self.limit_bytes}")
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self.try_reserve(n):
            self._reclaimer(self.held_bytes + n - self.limit_bytes)
            if self.try_reserve(n):
                break
            self.waiting += 1
            try:
                await self._lot.park()
            finally:
                self.waiting -= 1

    def release(self, n: int) -> None:
        """Give back *n* bytes and wake the readers waiting for room."""
        self.held_bytes -= n
        assert self.held_bytes >= 0, "released more than was reserved"
        if self.waiting:
            self._lot.unpark_all()

    def statistics(self) -> BudgetStatistics:
        return BudgetStatistics(self.limit_bytes, self.held_bytes, self.peak_held_bytes,
                                self.refused_speculative)


@dataclasses.dataclass(frozen=True)
class BudgetStatistics:
    limit_bytes: int
    held_bytes: int
    """File data held now: cache, in flight, read-ahead, replies."""
    peak_held_bytes: int
    refused_speculative: int
    """Read-ahead reservations refused for lack of room."""
