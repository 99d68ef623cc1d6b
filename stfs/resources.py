"""Resource registry (the seeds' ResourceCleanupManager).

Every resource an open handle holds - its backing descriptor, its stream
state, its read-ahead tasks and what they reserved - is registered here under
the handle's number with a priority and a way to free it. Release frees a
handle's resources in priority order (speculative work first, the descriptor
last), whatever error path got there; a periodic sweep frees orphans (owners
no longer open) and read-ahead idle too long; under critical pressure an
emergency cleanup frees everything speculative at once; unmount frees all.

A resource's ``free`` may be a plain function or a coroutine function; a
failure to free one resource is logged and never stops the others.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import inspect
import itertools
import logging
import time
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 30.0
"""The seeds' cleanup interval."""


class Priority(enum.IntEnum):
    """Order of freeing: lowest first. Emergency cleanup frees up to SPECULATIVE."""

    SPECULATIVE = 0
    """Read-ahead and the reservations it holds: only ever an optimisation."""
    STREAM = 1
    """Per-handle engine state: access pattern, checkpoints, reorder buffer."""
    DESCRIPTOR = 2
    """The backing descriptor: freed last, once nothing can read through it."""


@dataclasses.dataclass(eq=False)
class Resource:
    """One registered resource."""

    id: int
    owner: int
    kind: str
    priority: Priority
    free: Callable[[], object]
    size: int
    created: float


class ResourceRegistry:
    """What each owner (open handle) holds, and the one place that frees it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._ids = itertools.count(1)
        self._by_owner: dict[int, dict[int, Resource]] = {}
        self._last_used: dict[int, float] = {}
        self.freed: collections.Counter[str] = collections.Counter()
        self.swept = 0
        self.sweeps = 0
        self.emergency_cleanups = 0
        self.free_errors = 0

    # -- registration -----------------------------------------------------

    def register(self, owner: int, kind: str, priority: Priority, free: Callable[[], object],
                 size: int = 0) -> Resource:
        now = self._clock()
        resource = Resource(next(self._ids), owner, kind, priority, free, size, now)
        self._by_owner.setdefault(owner, {})[resource.id] = resource
        self._last_used.setdefault(owner, now)
        return resource

    def forget(self, resource: Resource) -> None:
        """The resource was freed by its own code path (normal completion)."""
        held = self._by_owner.get(resource.owner)
        if held is not None and held.pop(resource.id, None) is not None and not held:
            del self._by_owner[resource.owner]
            self._last_used.pop(resource.owner, None)

    def touch(self, owner: int) -> None:
        """The owner was used now (it is not idle)."""
        if owner in self._by_owner:
            self._last_used[owner] = self._clock()

    def idle_s(self, owner: int) -> float:
        return self._clock() - self._last_used.get(owner, self._clock())

    # -- freeing ----------------------------------------------------------

    async def _free(self, resources: Iterable[Resource]) -> int:
        n = 0
        for resource in sorted(resources, key=lambda r: r.priority):
            self.forget(resource)
            try:
                result = resource.free()
                if inspect.isawaitable(result):
                    await result
            except Exception:  # freeing must go on whatever one resource does
                self.free_errors += 1
                log.exception("could not free %s of handle %d", resource.kind, resource.owner)
            self.freed[resource.kind] += 1
            n += 1
        return n

    async def free_owner(self, owner: int) -> int:
        """Free everything *owner* holds (release); returns how many resources."""
        return await self._free(list(self._by_owner.get(owner, {}).values()))

    async def free_all(self) -> int:
        """Unmount: free every resource of every owner."""
        return await self._free([r for held in self._by_owner.values() for r in held.values()])

    async def emergency(self) -> int:
        """Critical pressure: free every speculative resource now."""
        self.emergency_cleanups += 1
        return await self._free([r for held in self._by_owner.values() for r in held.values()
                                 if r.priority <= Priority.SPECULATIVE])

    async def sweep(self, live_owners: set[int], idle_s: float) -> int:
        """Free orphans (owners no longer open) and speculative resources of
        owners idle for *idle_s* seconds; returns how many were freed."""
        self.sweeps += 1
        now = self._clock()
        doomed: list[Resource] = []
        for owner, held in self._by_owner.items():
            orphan = owner not in live_owners
            idle = now - self._last_used.get(owner, now) >= idle_s
            doomed.extend(r for r in held.values()
                          if orphan or (idle and r.priority <= Priority.SPECULATIVE))
        for resource in doomed:
            if resource.owner not in live_owners:
                log.warning("sweep: freeing orphaned %s of handle %d", resource.kind,
                            resource.owner)
        freed = await self._free(doomed)
        self.swept += freed
        return freed

    # -- figures ----------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Resources tracked now, by kind."""
        kinds: collections.Counter[str] = collections.Counter()
        for held in self._by_owner.values():
            kinds.update(r.kind for r in held.values())
        return dict(sorted(kinds.items()))

    def total(self) -> int:
        return sum(len(held) for held in self._by_owner.values())

    def owners(self) -> int:
        return len(self._by_owner)

    def statistics(self) -> ResourceStatistics:
        return ResourceStatistics(self.counts(), self.total(), dict(sorted(self.freed.items())),
                                  self.sweeps, self.swept, self.emergency_cleanups,
                                  self.free_errors)


@dataclasses.dataclass(frozen=True)
class ResourceStatistics:
    tracked: dict[str, int]
    """Resources tracked now, by kind."""
    tracked_total: int
    freed: dict[str, int]
    """Resources freed so far, by kind."""
    sweeps: int
    swept: int
    """Resources the periodic sweep freed."""
    emergency_cleanups: int
    free_errors: int

