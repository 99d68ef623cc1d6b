"""Memory monitor, backpressure score and adaptive concurrency.

The seeds' MemoryMonitor, AdaptiveMemoryManager, BackpressureController and
AdaptiveRateLimiter in file-system form:

* ``MemoryMonitor`` takes a snapshot a second (configurable, and at once on
  the group's kernel notifications, see ``memory``): the process RSS and
  system available memory (psutil), the memory control group's working set
  and binding limit (``cgroup``), and the engine's own held bytes. It keeps
  the last 60 and reports growth rate and trend.
  Memory use is the worst of: the engine's unevictable data (in flight,
  read-ahead, replies; cached chunks are dropped on demand) against
  ``--memory-limit``, RSS growth past idle RSS (less cached chunks) against
  the RSS target's room (limit + 16 MiB), the cgroup's working set (less
  cached chunks) against its limit, and the system's used share.
* ``score`` is the seeds' 100 points: memory 0-40, concurrency 0-30 (active
  backing reads against the concurrency granted now: the congestion
  controller's target; counted only while the store is degraded),
  latency/throughput 0-30
  measured as degradation against the store's own baseline (a steady slow
  store scores 0 there); levels none <20, light <40, moderate <60, heavy
  <80, critical >=80.
* Light and moderate cap concurrent backing reads at 6 and 3 tenths of the
  granted concurrency, heavy and critical at 1 (scaled to ``--max-streams``);
  at the default ``--max-streams 10`` and no learning yet these are the
  seeds' 10/6/3/1/1. Read-ahead is off from heavy up; the cache is shed to a
  share of its capacity (critical: a floor). Reads are never failed for
  being busy: they wait.
* ``congestion.CongestionController`` sets the granted concurrency: it learns
  the store's baseline latency and backs off only when latency rises above it
  at flat throughput (queueing) or on errors, never for steady latency.

Everything here except ``MemoryMonitor.sample`` is pure and takes its inputs
as arguments, so it is tested with plain numbers.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import logging
import os
import time
from typing import Literal, Protocol

import psutil

from stfs import cgroup
from stfs.congestion import CongestionController

MIB = 1024 * 1024
log = logging.getLogger(__name__)


class Level(enum.IntEnum):
    NONE = 0
    LIGHT = 1
    MODERATE = 2
    HEAVY = 3
    CRITICAL = 4

    @property
    def label(self) -> str:
        return self.name.lower()


LEVEL_CAPS = {Level.NONE: 10, Level.LIGHT: 6, Level.MODERATE: 3, Level.HEAVY: 1,
              Level.CRITICAL: 1}
"""The seeds' concurrent-stream caps, for ``--max-streams 10``."""

CACHE_SHARE = {Level.NONE: 1.0, Level.LIGHT: 1.0, Level.MODERATE: 0.5, Level.HEAVY: 0.25,
               Level.CRITICAL: 0.0}
"""Share of the cache capacity kept at each level (critical: down to the floor)."""

MEMORY_FLOORS = ((85.0, Level.HEAVY), (75.0, Level.MODERATE), (60.0, Level.LIGHT))
"""The seeds' AdaptiveMemoryManager thresholds (warning 60, critical 75, emergency
85 %): memory use alone holds the level at least this high, whatever the score."""

RSS_SLACK_BYTES = 16 * MIB
"""The "small constant" of the RSS target: idle + limit + this."""


def memory_floor(memory_use_pct: float) -> Level:
    for threshold, level in MEMORY_FLOORS:
        if memory_use_pct >= threshold:
            return level
    return Level.NONE


def level_for(score: float) -> Level:
    if score >= 80:
        return Level.CRITICAL
    if score >= 60:
        return Level.HEAVY
    if score >= 40:
        return Level.MODERATE
    if score >= 20:
        return Level.LIGHT
    return Level.NONE


def cap_for(level: Level, max_streams: int) -> int:
    """The level's concurrency cap scaled to ``--max-streams`` (at least 1)."""
    return max(1, round(max_streams * LEVEL_CAPS[level] / 10))


def level_cap(level: Level, granted: int, max_streams: int) -> int:
    """The level's cap on top of the *granted* concurrency: light and moderate keep
    their share of it, heavy and critical the seeds' one read (per 10 streams)."""
    if level >= Level.HEAVY:
        return cap_for(level, max_streams)
    return cap_for(level, granted)


def memory_points(memory_use_pct: float) -> int:
    """The seeds' memory factor, 0-40."""
    if memory_use_pct > 80:
        return 40
    if memory_use_pct > 70:
        return 30
    if memory_use_pct > 60:
        return 20
    if memory_use_pct > 50:
        return 10
    return 0


def concurrency_points(active_reads: int, granted: int) -> int:
    """The seeds' concurrency factor (>3, >5, >8 of 10 streams), 0-30, scaled to the
    concurrency *granted* now."""
    share = active_reads / max(1, granted)
    if share > 0.8:
        return 30
    if share > 0.5:
        return 20
    if share > 0.3:
        return 10
    return 0


DEGRADED_EXCESS_S = 0.01
"""Reads less than this slower than their baseline are not degraded, whatever the
ratio (a local disk's 0.1 -> 0.5 ms is not a symptom)."""


def latency_points(latency_ratio: float | None, excess_s: float | None) -> int:
    """Degradation of the store against its own baseline, 0-30.

    *latency_ratio* is the congestion controller's: recent reads' median
    latency over the store's baseline (windowed minimum) for their size, the
    inverse of their throughput against the best the store gave reads of that
    size; *excess_s* is the median read's latency above its baseline. A store
    with a steady 100 ms latency has a ratio of 1 and scores 0.
    """
    if latency_ratio is None or excess_s is None or excess_s < DEGRADED_EXCESS_S:
        return 0
    if latency_ratio > 3:
        return 30
    if latency_ratio > 2:
        return 20
    if latency_ratio > 1.5:
        return 10
    return 0


@dataclasses.dataclass(frozen=True)
class Score:
    memory: int
    concurrency: int
    latency: int

    @property
    def total(self) -> int:
        return self.memory + self.concurrency + self.latency

    @property
    def level(self) -> Level:
        return level_for(self.total)


def score(memory_use_pct: float, active_reads: int, granted: int,
          latency_ratio: float | None, excess_s: float | None) -> Score:
    """The seeds' three factors. Reads in flight count only while the store shows
    degradation: a busy store whose reads take their usual time is doing what it
    should, and capping it for being busy would only make readers wait."""
    latency = latency_points(latency_ratio, excess_s)
    concurrency = concurrency_points(active_reads, granted) if latency else 0
    return Score(memory_points(memory_use_pct), concurrency, latency)


# -- the monitor ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MemorySnapshot:
    at: float
    rss_bytes: int
    available_bytes: int
    total_bytes: int
    cgroup_usage_bytes: int | None
    cgroup_limit_bytes: int | None
    held_bytes: int
    unevictable_bytes: int


def memory_use_pct(snap: MemorySnapshot, memory_limit: int, idle_rss: int) -> float:
    """The worst of the engine, RSS, cgroup and system views, in percent."""
    cached = max(0, snap.held_bytes - snap.unevictable_bytes)
    views = [
        100.0 * snap.unevictable_bytes / memory_limit,
        # RSS growth past idle, less the (evictable) cached chunks it holds, against
        # the room the RSS target leaves: limit + the small constant
        100.0 * max(0, snap.rss_bytes - idle_rss - cached) / (memory_limit + RSS_SLACK_BYTES),
        100.0 * (1 - snap.available_bytes / snap.total_bytes) if snap.total_bytes else 0.0,
    ]
    if snap.cgroup_usage_bytes is not None and snap.cgroup_limit_bytes:
        views.append(100.0 * snap.cgroup_usage_bytes / snap.cgroup_limit_bytes)
    return max(views)


class MemoryMonitor:
    """Periodic memory snapshots (the last ``history`` kept).

    The memory control group comes from ``cgroup.find_memory_group`` (or is
    given); each sample reads its binding limit and working set anew, so a
    limit set or changed at run time is seen at the next sample (``reading``).
    The snapshot's group usage leaves out the engine's cached chunks, which it
    drops on demand, as the RSS view does.
    """

    def __init__(self, history: int = 60,
                 group: cgroup.MemoryGroup | None | Literal["find"] = "find") -> None:
        self._process = psutil.Process(os.getpid())
        self.snapshots: collections.deque[MemorySnapshot] = collections.deque(maxlen=history)
        self.group = cgroup.find_memory_group() if group == "find" else group
        self.reading: cgroup.GroupReading | None = None

    def read_group(self) -> cgroup.GroupReading | None:
        """The group's limit and usage now (None outside a memory cgroup)."""
        if self.group is not None:
            self.reading = self.group.read()
        return self.reading

    def sample(self, held_bytes: int, unevictable_bytes: int) -> MemorySnapshot:
        vm = psutil.virtual_memory()
        usage = limit = None
        reading = self.read_group()
        if reading is not None and reading.usage is not None and reading.limit is not None:
            limit = reading.limit.bytes
            usage = max(0, reading.usage.working_set - (held_bytes - unevictable_bytes))
        snap = MemorySnapshot(time.monotonic(), int(self._process.memory_info().rss),
                              int(vm.available), int(vm.total), usage, limit, held_bytes,
                              unevictable_bytes)
        self.snapshots.append(snap)
        return snap

    def growth_bytes_per_s(self, window: int = 5) -> float:
        """RSS growth over the last *window* snapshots."""
        recent = list(self.snapshots)[-window:]
        if len(recent) < 2 or recent[-1].at <= recent[0].at:
            return 0.0
        return (recent[-1].rss_bytes - recent[0].rss_bytes) / (recent[-1].at - recent[0].at)

    def trend(self) -> str:
        rate = self.growth_bytes_per_s()
        if rate > 1 * MIB:
            return "rising"
        if rate < -1 * MIB:
            return "falling"
        return "steady"


# -- the controller --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PressureSample:
    """One controller tick, kept for stats and plots."""

    at: float
    level: Level
    score: int
    memory_use_pct: float
    cap: int
    rss_bytes: int


class PressureTarget(Protocol):
    """What the controller steers (the read engine implements it).

    Optional, looked up by name: ``congestion``, a ``CongestionController``
    the engine feeds with every backing read and error itself (else the tick
    feeds its own from ``recent_reads``), and ``backing_reads_waiting()``,
    the reads waiting for the cap now.
    """

    @property
    def max_streams(self) -> int: ...

    @property
    def memory_limit(self) -> int: ...

    def backing_reads_in_flight(self) -> int: ...

    def unevictable_bytes(self) -> int: ...

    def held_bytes(self) -> int: ...

    def recent_reads(self, since: float) -> list[tuple[int, float]]: ...

    def apply_pressure(self, level: Level, cap: int,
                       memory_use_pct: float) -> None: ...


class PressureController:
    """Samples memory, scores pressure, and applies level, cap and shedding."""

    def __init__(self, target: PressureTarget, monitor: MemoryMonitor, idle_rss: int,
                 name: str = "", now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.target = target
        self.monitor = monitor
        self.idle_rss = idle_rss
        # An engine that owns a controller feeds it every backing read and error
        # itself; otherwise the tick feeds one from recent_reads.
        owned = getattr(target, "congestion", None)
        self._feeds_congestion = not isinstance(owned, CongestionController)
        self.congestion: CongestionController = (
            owned if isinstance(owned, CongestionController)
            else CongestionController(target.max_streams, name=name, now=now))
        self.level = Level.NONE
        self.cap = target.max_streams
        self.level_changes = 0
        self.history: collections.deque[PressureSample] = collections.deque(maxlen=600)
        self.last_score = Score(0, 0, 0)
        self._since = now

    def tick(self, now: float | None = None) -> Level:
        """One interval: sample, score, decide, apply. Returns the level."""
        now = time.monotonic() if now is None else now
        target = self.target
        snap = self.monitor.sample(target.held_bytes(), target.unevictable_bytes())
        use_pct = memory_use_pct(snap, target.memory_limit, self.idle_rss)
        congestion = self.congestion
        in_flight = target.backing_reads_in_flight()
        if self._feeds_congestion:
            for size, seconds in target.recent_reads(self._since):
                congestion.record(now, size, seconds)
            congestion.observe_in_flight(in_flight)
        self._since = now
        waiting = getattr(target, "backing_reads_waiting", None)
        granted = congestion.update(now, waiting() if callable(waiting) else 0)
        result = score(use_pct, in_flight, granted, *congestion.degradation())
        level = max(result.level, memory_floor(use_pct))
        self.cap = congestion.limit(level_cap(level, granted, target.max_streams), level.label)
        if level != self.level:
            self.level_changes += 1
            log.info(
                "pressure %s -> %s (score %d: memory %d, concurrency %d, latency %d; "
                "memory use %.0f%%); backing reads capped at %d",
                self.level.label, level.label, result.total, result.memory,
                result.concurrency, result.latency, use_pct, self.cap)
            self.level = level
        self.last_score = result
        target.apply_pressure(level, self.cap, use_pct)
        self.history.append(PressureSample(now, level, result.total, use_pct, self.cap,
                                           snap.rss_bytes))
        return level
