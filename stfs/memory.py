"""The daemon's memory policy, decided here and nowhere else.

* **Allocator.** glibc gets ``MALLOC_ARENAS`` (2) malloc arenas instead of one
  per thread: chunk buffers are allocated on the event loop, and every extra
  arena would keep what its thread freed resident. Set once, by
  ``configure_allocator`` at the start of ``stfs mount``, before any thread.
* **Heap.** Freed chunk buffers stay in the heap, resident, for reuse without
  page faults. After each pressure tick, when RSS exceeds idle RSS + held
  data by more than ``HEAP_TRIM_SLACK_BYTES``, ``malloc_trim`` gives the free
  pages back (in a worker thread; held data counted after the tick, so what
  a higher level sheds goes back at once); near the group's limit it always does.
* **Budget.** Inside a memory control group the budget in use is the
  smaller of ``--memory-limit`` and what the group leaves (``fit_budget``)::

      budget = limit - others - idle - OUT_OF_BUDGET_BYTES - IN_FLIGHT_CACHE_BYTES - margin

  ``limit`` is the group's binding limit (``cgroup.GroupReading``); ``others``
  is the group's working set (what the kernel cannot reclaim) less the
  daemon's own anonymous memory: other processes, their mapped pages, kernel
  memory; ``idle`` is the daemon's anonymous memory when idle, measured (at
  start: now plus what mounting adds). It is anonymous memory, not RSS, that
  the group counts: RSS also holds library pages charged to whoever read them
  first, and the page cache of SOURCE and of the mount, which the group is
  charged but reclaims. ``OUT_OF_BUDGET_BYTES`` is the RSS target's 16 MiB
  (buffer pool, heap slack up to the trim threshold, bookkeeping; measured
  6.5 to 10.5 MiB over idle + held data while 16 readers stream).
  ``IN_FLIGHT_CACHE_BYTES`` is page cache the group is charged and cannot
  reclaim while requests are in flight: readers' pages of the mount, locked
  until the daemon answers (``kernel_requests`` keeps them within it), and
  SOURCE pages locked under the daemon's reads. Without it a full budget left
  those pages only the margin, and the group OOM-killed the daemon (measured
  at the kill: anonymous memory 68 MiB of an 82 MiB group, 6.5 MiB of the
  mount's pages locked, 24 requests waiting). The margin covers the kernel's
  per-CPU charge batches and request memory. The cache
  keeps its share of the limit. Fitted at start, again once the mount is live
  (idle measured) and whenever the limit changes; a group that leaves less than
  ``min_budget`` fails the mount.
* **Near the limit** (the group's working set at ``NEAR_LIMIT_PCT`` of its
  limit, or a kernel notice that it is about to fail): read-around stops pushing,
  SOURCE pages the chunk cache already holds are dropped
  (``posix_fadvise(DONTNEED)``) and the heap is trimmed.
* **Reaction.** ``MemoryKeeper`` ticks the pressure controller every
  ``--monitor-interval``, and at once (within ``MIN_GAP_S``) on any of the
  group's kernel notifications (``cgroup.MemoryNotifier``), then every
  ``FAST_INTERVAL_S`` for ``FAST_FOR_S``.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

import trio

from stfs import cgroup, lru, metrics
from stfs.backing import FileIdentity, drop_cached
from stfs.pressure import RSS_SLACK_BYTES, PressureController

log = logging.getLogger(__name__)

MIB = 1024 * 1024
MALLOC_ARENAS = 2
TRIM_AFTER_DROPPED_BYTES = 8 * MIB
"""Chunk buffers freed to the heap (the buffer pool full) after which the
heap is trimmed at once, if RSS is over idle + held data by more than
``HEAP_TRIM_SLACK_BYTES``, rather than at the keeper's next tick: a fast
reader frees that much in tens of milliseconds, and freed buffers stay
resident until trimmed. Measured, 8 readers of a 5 ms store at
--memory-limit 16M: RSS peaked at 62-66 MiB without, 58-60 with, at the
same speed. Trimming whatever the RSS cost 16 local readers 15 %: the
pages given back fault in again."""
HEAP_TRIM_SLACK_BYTES = 4 * MIB
"""Free heap beyond this (RSS over idle + held data) is given back to the OS."""
OUT_OF_BUDGET_BYTES = RSS_SLACK_BYTES
"""What the daemon may use beyond idle and its budget (the RSS target's constant)."""
STARTUP_BYTES = 1 * MIB
"""Anonymous memory that mounting may add after the budget is first fitted
(measured: under 0.2 MiB); replaced by a measurement once the mount is live."""
BASE_MARGIN_BYTES = 4 * MIB
CHARGE_BATCH_PAGES = 64
"""Pages a CPU may charge to a group before the group's counter sees them."""
MIN_BUDGET_BYTES = 4 * MIB
KERNEL_IN_FLIGHT_BYTES = 8 * MIB
IN_FLIGHT_CACHE_BYTES = KERNEL_IN_FLIGHT_BYTES
"""Room kept in a group for page cache locked by requests in flight (the fit)."""
NEAR_LIMIT_PCT = 85.0
SHRINK_STEP_BYTES = 2 * MIB
GROW_STEP_BYTES = 4 * MIB
MIN_GAP_S = 0.02
FAST_INTERVAL_S = 0.1
FAST_FOR_S = 2.0
URGENT_NOTICES = frozenset({"oom"})
"""Notices that mean the group is failing: v1 OOM; v2 ``memory.events`` when
its ``oom`` or ``oom_kill`` counter moved. The others (v1 usage thresholds and
``memory.pressure_level``, v2 PSI, ``high`` and ``max`` events) come with
ordinary reclaim of page cache too (measured: v1 critical pressure fired 100
to 300 times while 16 readers streamed 1 GiB through a full group): they ask
for a sample, which decides."""
DROPPED_SPANS = 4096

_M_ARENA_MAX = -8
_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(None)
    _libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    _libc.malloc_trim.argtypes = (ctypes.c_size_t,)
except (OSError, AttributeError):  # not glibc
    _libc = None


# -- allocator and heap ------------------------------------------------------------


def configure_allocator() -> bool:
    """Limit glibc to ``MALLOC_ARENAS`` arenas (call before any thread starts).
    False when the C library is not glibc."""
    return _libc is not None and bool(_libc.mallopt(_M_ARENA_MAX, MALLOC_ARENAS))


def trim_heap() -> bool:
    """Give free heap pages back to the OS (blocking: a worker thread). Returns
    whether anything was released."""
    return _libc is not None and bool(_libc.malloc_trim(0))


class HeapTrimmer:
    """Trims the heap in a worker thread once ``TRIM_AFTER_DROPPED_BYTES`` of
    chunk buffers were freed to it and ``needed()`` says RSS is over (one trim
    at a time; never before ``needed`` is set: the keeper sets it)."""

    def __init__(self, after_bytes: int = TRIM_AFTER_DROPPED_BYTES) -> None:
        self.after_bytes = after_bytes
        self.dropped = 0
        self.trims = 0
        self.needed: Callable[[], bool] = lambda: False
        self._running = False
        self._nursery: trio.Nursery | None = None

    def attach(self, nursery: trio.Nursery | None) -> None:
        """Where trims run (None: nowhere, nothing is trimmed)."""
        self._nursery = nursery

    def dropped_buffer(self, size: int) -> None:
        """A buffer of *size* bytes went back to the heap."""
        self.dropped += size
        if self.dropped >= self.after_bytes and not self._running and self._nursery:
            self.dropped = 0
            if self.needed():
                self._running = True
                self._nursery.start_soon(self._trim)

    async def _trim(self) -> None:
        try:
            if await trio.to_thread.run_sync(trim_heap):
                self.trims += 1
        finally:
            self._running = False


def should_trim(rss: int, idle_rss: int, held: int) -> bool:
    return rss - idle_rss - held > HEAP_TRIM_SLACK_BYTES


def own_anon_bytes(status: str = "/proc/self/status") -> int:
    """This process's resident anonymous memory (``RssAnon``), what its group counts."""
    try:
        with open(status) as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


# -- the budget ---------------------------------------------------------------------


def margin_bytes(cpus: int | None = None) -> int:
    return BASE_MARGIN_BYTES + CHARGE_BATCH_PAGES * os.sysconf("SC_PAGE_SIZE") * (
        cpus or os.cpu_count() or 1)


def kernel_requests(fit: BudgetFit, read_ahead_kb: int, max_background: int
                    ) -> tuple[int, int]:
    """The kernel's read-ahead window (KiB) and background requests for *fit*.

    A reader's pages wait locked in its page cache, charged to its group and
    not reclaimable, until the daemon answers their request; the kernel keeps
    up to ``max_background`` read-ahead requests of ``read_ahead_kb`` in
    flight (32 MiB by default). With readers inside the daemon's group that
    must fit beside a fitted budget: in flight stays within
    ``KERNEL_IN_FLIGHT_BYTES`` (the room the fit keeps, ``IN_FLIGHT_CACHE_BYTES``)
    plus whatever room the group leaves beyond the budget. The window shrinks
    first (to 128 KiB, the kernel's default), since fewer background requests
    than readers stall them all: 16 readers at a fitted budget of 15 MiB read
    170-240 MB/s with 128-256 KiB x 32 requests, 110-120 with 512-1024 KiB x
    8-16, and 1 MiB x 32 got the daemon killed.
    """
    if fit.fits is None:
        return read_ahead_kb, max_background
    allowed_kb = (KERNEL_IN_FLIGHT_BYTES + max(0, fit.fits - fit.limit)) // 1024
    if read_ahead_kb * max_background <= allowed_kb:
        return read_ahead_kb, max_background
    while read_ahead_kb > 128 and read_ahead_kb * max_background > allowed_kb:
        read_ahead_kb //= 2
    return read_ahead_kb, max(4, min(max_background, allowed_kb // read_ahead_kb))


def min_budget(max_chunk: int, max_request: int = MIB) -> int:
    """The least budget that serves: a chunk in flight plus a reply, two chunks."""
    return max(MIN_BUDGET_BYTES, 2 * max_chunk, max_chunk + max_request)


@dataclasses.dataclass(frozen=True)
class BudgetFit:
    """The budget in use and why."""

    requested: int
    requested_cache: int
    limit: int
    """The budget in use (never below ``floor`` unless it is the request)."""
    cache_limit: int
    floor: int
    source: str
    """"option", or the group's binding limit (``cgroup v1 /sys/.../memory.limit_in_bytes``)."""
    fits: int | None = None
    """What the group leaves for the budget (None without a group limit)."""
    group_limit: int | None = None
    others: int = 0
    idle: int = 0
    margin: int = 0

    @property
    def lowered(self) -> bool:
        return self.limit < self.requested

    @property
    def too_small(self) -> bool:
        return self.fits is not None and self.fits < min(self.floor, self.requested)

    def why(self) -> str:
        """What the group's limit leaves: one line of figures."""
        return (f"the limit of {_mib(self.group_limit or 0)} ({self.source}) leaves "
                f"{_mib(max(0, self.fits or 0))} after {_mib(self.idle)} idle, "
                f"{_mib(self.others)} used by others in the group, "
                f"{_mib(OUT_OF_BUDGET_BYTES)} outside the budget, {_mib(IN_FLIGHT_CACHE_BYTES)} "
                f"for page cache in flight and a {_mib(self.margin)} margin")


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


def fit_budget(requested: int, requested_cache: int, floor: int,
               reading: cgroup.GroupReading | None, own_anon: int, idle_anon: int,
               margin: int | None = None) -> BudgetFit:
    """The budget in use: ``--memory-limit`` (*requested*) or, when smaller, what
    the group's binding limit leaves (the module's formula). The cache keeps its
    share of the request. The budget is never set below *floor* (check
    ``too_small``), unless the request itself is smaller."""
    if reading is None or reading.limit is None or reading.usage is None:
        return BudgetFit(requested, requested_cache, requested, requested_cache, floor, "option")
    margin = margin_bytes() if margin is None else margin
    others = max(0, reading.usage.working_set - own_anon)
    fits = (reading.limit.bytes - others - idle_anon - OUT_OF_BUDGET_BYTES
            - IN_FLIGHT_CACHE_BYTES - margin)
    limit = min(requested, max(fits, floor))
    return BudgetFit(
        requested, requested_cache, limit, requested_cache * limit // requested, floor,
        reading.limit.describe() if limit < requested else "option",
        fits, reading.limit.bytes, others, idle_anon, margin)


# -- near the limit -----------------------------------------------------------------


class Engine(Protocol):
    """What the keeper steers (``engine.ReadEngine``)."""

    def set_memory_limit(self, limit: int, cache_limit: int) -> None: ...

    def held_bytes(self) -> int: ...


SourceSpans = Callable[[], Iterable[tuple[FileIdentity, int, int, int]]]
"""(identity, start, length, a descriptor of the file) of the SOURCE bytes the
chunk cache holds; descriptors are valid until the next await."""


def _drop_all(spans: list[tuple[int, int, int]]) -> int:
    """Blocking: drop SOURCE's cached pages of (descriptor, start, length) spans,
    closing the descriptors (duplicates). Returns bytes asked to drop."""
    dropped = 0
    for fd, start, length in spans:
        try:
            drop_cached(fd, start, length)
            dropped += length
        except OSError:
            pass
        finally:
            os.close(fd)
    return dropped


class MemoryKeeper:
    """Runs the pressure controller and keeps the daemon inside its group."""

    def __init__(self, engine: Engine, controller: PressureController,
                 group: cgroup.MemoryGroup | None, fit: BudgetFit, idle_anon: int,
                 interval: float, source_spans: SourceSpans,
                 pause_read_around: Callable[[], None],
                 retune: Callable[[BudgetFit], Awaitable[None]] | None = None) -> None:
        self.engine = engine
        self.idle_anon = idle_anon
        self.controller = controller
        self.group = group
        self.fit = fit
        self.interval = interval
        self._source_spans = source_spans
        self._pause_read_around = pause_read_around
        self._retune = retune
        self.own_anon: Callable[[], int] = own_anon_bytes
        self._wake = trio.Event()
        self._fast_until = 0.0
        self._urgent_until = 0.0
        self._oom_events = 0
        self._last_tick = 0.0
        self._dropped: collections.OrderedDict[tuple[FileIdentity, int], None] = (
            collections.OrderedDict())
        self.notifier: cgroup.MemoryNotifier | None = None
        self.notices: collections.Counter[str] = collections.Counter()
        self.near_limit = False
        self.source_dropped_bytes = 0
        self.trims = 0
        self.refits = 0
        self._limit_seen = fit.group_limit

    def heap_over_slack(self) -> bool:
        """Whether RSS is over idle + held data by more than the heap's slack
        (``HeapTrimmer.needed``)."""
        return should_trim(metrics.rss_bytes(), self.controller.idle_rss,
                           self.engine.held_bytes())

    # -- the loop -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Tick until cancelled; listen to the group's notifications meanwhile."""
        try:
            async with trio.open_nursery() as nursery:
                if self.group is not None:
                    self._arm(self.controller.monitor.read_group())
                    nursery.start_soon(self._listen)
                task_status.started()
                while True:
                    with trio.move_on_after(self._next_interval()):
                        await self._wake.wait()
                    self._wake = trio.Event()
                    await trio.sleep(max(0.0, self._last_tick + MIN_GAP_S - time.monotonic()))
                    await self.step()
        finally:
            if self.notifier is not None:
                self.notifier.close()

    def _next_interval(self) -> float:
        if time.monotonic() < self._fast_until:
            return min(self.interval, FAST_INTERVAL_S)
        return self.interval

    async def _listen(self) -> None:
        while True:
            notifier = self.notifier
            assert notifier is not None
            try:
                await trio.lowlevel.wait_readable(notifier.fileno())
            except trio.ClosedResourceError:
                continue  # re-armed for a new limit
            names = notifier.take()
            if not names:
                continue
            self.notices.update(names)
            now = time.monotonic()
            self._fast_until = now + FAST_FOR_S
            if URGENT_NOTICES.intersection(names) or ("events" in names
                                                       and self._oom_events_moved()):
                self._urgent_until = now + FAST_FOR_S
            self._wake.set()

    def _oom_events_moved(self) -> bool:
        assert self.group is not None
        events = self.group.events()
        seen, self._oom_events = self._oom_events, events["oom"] + events["oom_kill"]
        return self._oom_events > seen

    def _arm(self, reading: cgroup.GroupReading | None) -> None:
        assert self.group is not None
        old = self.notifier
        if reading is None:
            return
        events = self.group.events()
        self._oom_events = events["oom"] + events["oom_kill"]
        self.notifier = cgroup.MemoryNotifier.arm(self.group, reading)
        self.notifier.start()
        if old is not None:
            trio.lowlevel.notify_closing(old.fileno())
            old.close()
        log.debug("%s: listening to %s", self.group.label, ", ".join(self.notifier.kinds)
                  or "nothing (sampling only)")

    # -- one step -------------------------------------------------------------------

    async def step(self) -> None:
        """Tick the controller, refit the budget, relieve the group near its limit."""
        self._last_tick = time.monotonic()
        self.controller.tick()
        reading = self.controller.monitor.reading
        if reading is not None:
            await self.refit(reading, self.own_anon())
        snap = self.controller.monitor.snapshots[-1]
        room = reading.room_bytes if reading is not None else None
        near = time.monotonic() < self._urgent_until or (
            room is not None and reading is not None and reading.limit_bytes is not None
            and 100 * (reading.limit_bytes - room) >= NEAR_LIMIT_PCT * reading.limit_bytes)
        if near != self.near_limit:
            self.near_limit = near
            log.info("memory cgroup %s its limit: %s", "near" if near else "no longer near",
                     "read-around paused, SOURCE pages already cached dropped, heap trimmed"
                     if near else "read-around resumes")
        if near:
            self._pause_read_around()
            await self._drop_source_pages()
        # Held data now, after the tick: chunks a higher level just shed are free
        # heap, resident until trimmed (measured: 28 MiB over idle + held after a shed).
        held = min(snap.held_bytes, self.engine.held_bytes())
        trim = near or should_trim(snap.rss_bytes, self.controller.idle_rss, held)
        if trim and await trio.to_thread.run_sync(trim_heap):
            self.trims += 1

    async def refit(self, reading: cgroup.GroupReading | None, own_anon: int,
                    initial: bool = False) -> None:
        """Fit the budget to the group as it is now: when the mount goes live
        (*initial*: idle measured), when the limit changes, and when what the
        rest of the group uses moves the fit by ``SHRINK_STEP_BYTES`` down or
        ``GROW_STEP_BYTES`` up (a hog arrives or leaves)."""
        old = self.fit
        fit = fit_budget(old.requested, old.requested_cache, old.floor, reading, own_anon,
                         self.idle_anon)
        limit = reading.limit_bytes if reading is not None else None
        limit_changed = limit != self._limit_seen
        moved = (fit.limit <= old.limit - SHRINK_STEP_BYTES
                 or fit.limit >= old.limit + GROW_STEP_BYTES)
        if not (initial or limit_changed or moved):
            return
        self._limit_seen = limit
        if limit_changed and self.group is not None:
            self._arm(reading)
        if fit.too_small and not old.too_small:
            log.warning("memory cgroup: %s, less than the %s stfs needs to serve: keeping "
                        "that", fit.why(), _mib(fit.floor))
        self.fit = fit
        if fit.limit == old.limit:
            return
        self.engine.set_memory_limit(fit.limit, fit.cache_limit)
        self.refits += 1
        log.log(logging.WARNING if limit_changed and not initial else logging.INFO,
                "memory budget now %s (was %s, --memory-limit %s)%s", _mib(fit.limit),
                _mib(old.limit), _mib(fit.requested),
                f": {fit.why()}" if fit.fits is not None else "")
        if self._retune is not None:
            await self._retune(fit)

    async def _drop_source_pages(self) -> None:
        """Drop SOURCE's page-cache copies of bytes the chunk cache holds (once each)."""
        spans = []
        for identity, start, length, fd in self._source_spans():
            if (identity, start) in self._dropped:
                continue
            try:
                spans.append((os.dup(fd), start, length))
            except OSError:
                continue
            lru.remember(self._dropped, (identity, start), None, DROPPED_SPANS)
        if spans:
            self.source_dropped_bytes += await trio.to_thread.run_sync(_drop_all, spans)

    def statistics(self) -> dict[str, object]:
        """What the stats document shows of the keeper."""
        reading = self.controller.monitor.reading
        return {
            "memory_limit_requested_bytes": self.fit.requested,
            "memory_limit_source": self.fit.source,
            "cgroup": self.group.label if self.group is not None else None,
            "cgroup_memory_usage_bytes": (reading.usage.total if reading and reading.usage
                                          else None),
            "cgroup_memory_working_set_bytes": (reading.usage.working_set
                                                if reading and reading.usage else None),
            "cgroup_memory_events": self.group.events() if self.group is not None else {},
            "cgroup_notifications": dict(self.notices),
            "cgroup_near_limit": self.near_limit,
            "source_pages_dropped_bytes": self.source_dropped_bytes,
            "heap_trims": self.trims,
            "budget_refits": self.refits,
        }
