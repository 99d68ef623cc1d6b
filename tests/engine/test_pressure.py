"""Pressure scoring, levels and caps: pure functions with the seeds' numbers; the
controller with a fake engine and fake clock."""

from __future__ import annotations

import pytest

from stfs import pressure
from stfs.congestion import CongestionController
from stfs.pressure import Level, MemorySnapshot

MIB = 1024 * 1024
CHUNK = 256 * 1024


@pytest.mark.parametrize(("score", "level"), [
    (0, Level.NONE), (19, Level.NONE), (20, Level.LIGHT), (39, Level.LIGHT),
    (40, Level.MODERATE), (59, Level.MODERATE), (60, Level.HEAVY), (79, Level.HEAVY),
    (80, Level.CRITICAL), (100, Level.CRITICAL),
])
def test_score_thresholds_give_the_seeds_levels(score: int, level: Level) -> None:
    assert pressure.level_for(score) is level


@pytest.mark.parametrize(("max_streams", "caps"), [
    (10, [10, 6, 3, 1, 1]),
    (20, [20, 12, 6, 2, 2]),
    (1, [1, 1, 1, 1, 1]),
    (4, [4, 2, 1, 1, 1]),
])
def test_level_caps_scale_with_max_streams(max_streams: int, caps: list[int]) -> None:
    assert [pressure.cap_for(level, max_streams) for level in Level] == caps


@pytest.mark.parametrize(("granted", "caps"), [
    (10, [10, 6, 3, 1, 1]),                 # the seeds' caps before anything is learned
    (40, [40, 24, 12, 1, 1]),               # light and moderate: shares of what is granted
    (2, [2, 1, 1, 1, 1]),
])
def test_level_caps_on_top_of_the_granted_concurrency(granted: int, caps: list[int]) -> None:
    assert [pressure.level_cap(level, granted, 10) for level in Level] == caps


@pytest.mark.parametrize(("pct", "points"), [
    (0, 0), (50, 0), (51, 10), (61, 20), (71, 30), (81, 40), (100, 40),
])
def test_memory_points_follow_the_seeds_steps(pct: float, points: int) -> None:
    assert pressure.memory_points(pct) == points


@pytest.mark.parametrize(("active", "points"), [(0, 0), (3, 0), (4, 10), (6, 20), (9, 30)])
def test_concurrency_points_follow_the_seeds_steps(active: int, points: int) -> None:
    assert pressure.concurrency_points(active, 10) == points


def test_concurrency_points_count_against_what_is_granted() -> None:
    assert pressure.concurrency_points(9, 40) == 0
    assert pressure.concurrency_points(33, 40) == 30


@pytest.mark.parametrize(("ratio", "excess", "points"), [
    (None, None, 0),
    (1.0, 0.0, 0),          # a steady store, however slow: no points
    (1.4, 0.04, 0),
    (1.6, 0.06, 10), (2.5, 0.15, 20), (3.5, 0.25, 30),
    (10.0, 0.005, 0),       # 10x a 0.5 ms baseline is still not 10 ms lost per read
])
def test_latency_points_measure_degradation_against_the_baseline(
        ratio: float | None, excess: float | None, points: int) -> None:
    assert pressure.latency_points(ratio, excess) == points


@pytest.mark.parametrize(("pct", "level"), [(59, Level.NONE), (60, Level.LIGHT),
                                           (75, Level.MODERATE), (85, Level.HEAVY)])
def test_memory_use_alone_sets_a_floor_level(pct: float, level: Level) -> None:
    assert pressure.memory_floor(pct) is level


def test_score_adds_the_three_factors() -> None:
    s = pressure.score(85, 9, 10, 3.5, 0.25)
    assert (s.memory, s.concurrency, s.latency, s.total, s.level) == (40, 30, 30, 100,
                                                                       Level.CRITICAL)
    assert pressure.score(10, 0, 10, None, None).level is Level.NONE


def test_reads_in_flight_count_only_while_the_store_is_degraded() -> None:
    assert pressure.score(0, 9, 10, 1.0, 0.0).concurrency == 0          # busy at baseline
    assert pressure.score(0, 9, 10, None, None).concurrency == 0
    busy_and_slow = pressure.score(0, 9, 10, 2.5, 0.15)
    assert (busy_and_slow.concurrency, busy_and_slow.latency) == (30, 20)
    assert busy_and_slow.level is Level.MODERATE


def snapshot(**kw: int | None) -> MemorySnapshot:
    values: dict[str, int | None] = dict(rss_bytes=40 * MIB, available_bytes=20_000 * MIB,  # noqa: C408
                                         total_bytes=24_000 * MIB, cgroup_usage_bytes=None,
                                         cgroup_limit_bytes=None, held_bytes=0,
                                         unevictable_bytes=0)
    values.update(kw)
    return MemorySnapshot(at=0.0, **values)  # type: ignore[arg-type]


def test_memory_use_is_the_worst_view() -> None:
    limit, idle = 50 * MIB, 30 * MIB
    assert pressure.memory_use_pct(snapshot(), limit, idle) == pytest.approx(
        max(100 * 10 / 66, 100 * (1 - 20_000 / 24_000)))           # (40-30)/(50+16), system
    assert pressure.memory_use_pct(snapshot(rss_bytes=90 * MIB), limit, idle) == \
        pytest.approx(100 * 60 / 66)
    assert pressure.memory_use_pct(snapshot(held_bytes=45 * MIB, unevictable_bytes=45 * MIB),
                                   limit, idle) == \
        pytest.approx(90.0)
    assert pressure.memory_use_pct(
        snapshot(cgroup_usage_bytes=95 * MIB, cgroup_limit_bytes=100 * MIB), limit, idle) == \
        pytest.approx(95.0)
    assert pressure.memory_use_pct(snapshot(available_bytes=1_200 * MIB), limit, idle) == \
        pytest.approx(95.0)


def test_cached_chunks_are_not_pressure() -> None:
    # A full cache is held but evictable: only the unevictable share counts.
    pct = pressure.memory_use_pct(snapshot(held_bytes=48 * MIB, unevictable_bytes=2 * MIB,
                                           rss_bytes=80 * MIB), 50 * MIB, 30 * MIB)
    assert pct < 50




class FakeMonitor(pressure.MemoryMonitor):
    """Snapshots from numbers the test sets."""

    def __init__(self) -> None:
        super().__init__(group=None)
        self.rss = 30 * MIB
        self.available = 20_000 * MIB

    def sample(self, held_bytes: int, unevictable_bytes: int) -> MemorySnapshot:
        snap = MemorySnapshot(0.0, self.rss, self.available, 24_000 * MIB, None, None,
                              held_bytes, unevictable_bytes)
        self.snapshots.append(snap)
        return snap


class FakeTarget:
    max_streams = 10
    memory_limit = 50 * MIB

    def __init__(self) -> None:
        self.in_flight = 0
        self.unevictable = 0
        self.reads: list[tuple[int, float]] = []
        self.applied: list[tuple[Level, int]] = []

    def backing_reads_in_flight(self) -> int:
        return self.in_flight

    def unevictable_bytes(self) -> int:
        return self.unevictable

    def held_bytes(self) -> int:
        return self.unevictable

    def recent_reads(self, since: float) -> list[tuple[int, float]]:
        reads, self.reads = self.reads, []
        return reads

    def apply_pressure(self, level: Level, cap: int, memory_use_pct: float) -> None:
        self.applied.append((level, cap))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def tick(self, controller: pressure.PressureController) -> Level:
        self.now += 1.0
        return controller.tick(self.now)


def test_controller_rises_through_levels_and_falls_back() -> None:
    target, monitor, clock = FakeTarget(), FakeMonitor(), Clock()
    controller = pressure.PressureController(target, monitor, idle_rss=30 * MIB, now=0.0)
    assert clock.tick(controller) is Level.NONE
    assert target.applied[-1] == (Level.NONE, 10)
    target.in_flight = 9                                  # busy, but no read queues
    assert clock.tick(controller) is Level.NONE
    assert target.applied[-1] == (Level.NONE, 10)
    target.unevictable = 45 * MIB                         # 90 % of the limit: 40 points
    assert clock.tick(controller) is Level.HEAVY
    assert target.applied[-1] == (Level.HEAVY, 1)
    target.reads = [(CHUNK, 0.1)] * 5                     # the store's baseline: no points
    assert clock.tick(controller) is Level.HEAVY
    target.reads = [(CHUNK, 0.35)] * 5                    # 3.5x its baseline: 30 points
    assert clock.tick(controller) is Level.CRITICAL
    assert controller.last_score.latency == 30
    assert target.applied[-1][1] == 1
    target.in_flight, target.unevictable = 0, 0
    levels = [clock.tick(controller) for _ in range(10)]
    assert levels[-1] is Level.NONE
    assert target.applied[-1] == (Level.NONE, 10)
    assert controller.level_changes >= 3


def test_a_steady_slow_store_kept_busy_is_never_capped() -> None:
    target, monitor, clock = FakeTarget(), FakeMonitor(), Clock()
    controller = pressure.PressureController(target, monitor, idle_rss=30 * MIB, now=0.0)
    caps = []
    for _ in range(20):
        # Readers keep the cap busy: every slot in flight for the whole second,
        # each read 100 ms.
        cap = controller.cap
        target.reads = [(CHUNK, 0.1)] * (10 * cap)
        target.in_flight = cap
        clock.tick(controller)
        caps.append(controller.cap)
        assert controller.last_score.latency == 0
        assert controller.last_score.concurrency == 0       # busy, not queueing
        assert controller.level is Level.NONE
    assert caps == [10] * 20 and controller.congestion.ceiling == 10
    stats = controller.congestion.statistics()
    assert stats.baseline_latency_s == pytest.approx(0.1)
    assert stats.reason == "holding: at the ceiling (10)"


def test_controller_lowers_the_cap_when_latency_climbs_at_flat_throughput() -> None:
    target, monitor, clock = FakeTarget(), FakeMonitor(), Clock()
    controller = pressure.PressureController(target, monitor, idle_rss=30 * MIB, now=0.0)
    target.reads = [(CHUNK, 0.1)] * 80                    # 8 in flight: under the cap
    clock.tick(controller)
    assert controller.cap == 10
    target.reads = [(CHUNK, 0.25)] * 32                   # 8 in flight, each 2.5x slower
    clock.tick(controller)
    stats = controller.congestion.statistics()
    assert stats.target == 6                              # 10 x max(0.5, 1.5 / 2.5)
    assert controller.last_score.latency == 20            # degraded: 2.5x the baseline
    assert controller.level is Level.LIGHT                # 20 points alone
    assert controller.cap == stats.cap == 4               # 6 tenths of 6
    assert stats.reason == "capped by pressure level light"


def test_an_engine_that_owns_a_controller_feeds_it() -> None:
    target, monitor = FakeTarget(), FakeMonitor()
    owned = CongestionController(10, name="engine's")
    target.congestion = owned  # type: ignore[attr-defined]
    target.reads = [(CHUNK, 5.0)] * 50                    # not read by the tick
    controller = pressure.PressureController(target, monitor, idle_rss=30 * MIB, now=0.0)
    assert controller.congestion is owned
    controller.tick(1.0)
    assert owned.reason == "idle"
    assert target.reads                                   # untouched


def test_system_memory_shortage_raises_the_level() -> None:
    target, monitor = FakeTarget(), FakeMonitor()
    controller = pressure.PressureController(target, monitor, idle_rss=30 * MIB)
    monitor.available = 1_000 * MIB                       # 96 % of the host in use
    target.in_flight = 9
    assert controller.tick() is Level.HEAVY               # memory 40, at least heavy
    monitor.available = 20_000 * MIB
    assert controller.tick() is Level.NONE                # busy alone is no pressure
