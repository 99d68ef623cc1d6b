"""Pressure scoring, levels, caps and AIMD: pure functions with the seeds' numbers."""

from __future__ import annotations

import pytest

from stfs import pressure
from stfs.pressure import AimdLimiter, Level, MemorySnapshot

MIB = 1024 * 1024


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


@pytest.mark.parametrize(("pct", "points"), [
    (0, 0), (50, 0), (51, 10), (61, 20), (71, 30), (81, 40), (100, 40),
])
def test_memory_points_follow_the_seeds_steps(pct: float, points: int) -> None:
    assert pressure.memory_points(pct) == points


@pytest.mark.parametrize(("active", "points"), [(0, 0), (3, 0), (4, 10), (6, 20), (9, 30)])
def test_concurrency_points_follow_the_seeds_steps(active: int, points: int) -> None:
    assert pressure.concurrency_points(active, 10) == points


@pytest.mark.parametrize(("throughput", "latency", "points"), [
    (None, None, 0), (100 * MIB, 0.001, 0), (9 * MIB, None, 10), (4 * MIB, None, 20),
    (1 * MIB, None, 30), (100 * MIB, 0.15, 10), (100 * MIB, 0.5, 20), (4 * MIB, 0.5, 30),
])
def test_latency_points_combine_throughput_and_slow_reads(
        throughput: float | None, latency: float | None, points: int) -> None:
    assert pressure.latency_points(throughput, latency) == points


@pytest.mark.parametrize(("pct", "level"), [(59, Level.NONE), (60, Level.LIGHT),
                                           (75, Level.MODERATE), (85, Level.HEAVY)])
def test_memory_use_alone_sets_a_floor_level(pct: float, level: Level) -> None:
    assert pressure.memory_floor(pct) is level


def test_score_adds_the_three_factors() -> None:
    s = pressure.score(85, 9, 10, 1 * MIB, 0.5)
    assert (s.memory, s.concurrency, s.latency, s.total, s.level) == (40, 30, 30, 100,
                                                                       Level.CRITICAL)
    assert pressure.score(10, 0, 10, None, None).level is Level.NONE


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


def test_aimd_halves_on_slow_reads_and_recovers_by_one() -> None:
    aimd = AimdLimiter(ceiling=10, target_latency_s=0.1)
    assert aimd.update(0.5, 10) == 5
    assert aimd.update(0.5, 10) == 2
    assert aimd.update(0.5, 10) == 1
    assert aimd.update(0.5, 10) == 1          # never below one
    assert [aimd.update(0.01, 10) for _ in range(4)] == [2, 3, 4, 5]
    assert aimd.update(None, 3) == 3          # idle counts as recovered; the level caps it
    for _ in range(20):
        aimd.update(0.01, 10)
    assert aimd.update(0.01, 10) == 10        # never above the ceiling


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


def test_controller_rises_through_levels_and_falls_back() -> None:
    target, monitor = FakeTarget(), FakeMonitor()
    controller = pressure.PressureController(target, monitor, idle_rss=30 * MIB)
    assert controller.tick() is Level.NONE
    assert target.applied[-1] == (Level.NONE, 10)
    target.in_flight = 9                                  # 30 points
    assert controller.tick() is Level.LIGHT
    assert target.applied[-1] == (Level.LIGHT, 6)
    target.unevictable = 45 * MIB                         # 90 % of the limit: 40 points
    assert controller.tick() is Level.HEAVY
    assert target.applied[-1] == (Level.HEAVY, 1)
    target.reads = [(1 * MIB, 2.0)] * 5                   # 0.5 MB/s, 2 s reads: 30 points
    assert controller.tick() is Level.CRITICAL
    assert target.applied[-1][1] == 1
    target.in_flight, target.unevictable = 0, 0
    levels = [controller.tick() for _ in range(10)]
    assert levels[-1] is Level.NONE
    assert target.applied[-1] == (Level.NONE, 10)         # AIMD climbed back to the ceiling
    assert controller.level_changes >= 4


def test_controller_lowers_the_cap_when_backing_latency_climbs() -> None:
    target, monitor = FakeTarget(), FakeMonitor()
    controller = pressure.PressureController(target, monitor, idle_rss=30 * MIB,
                                             target_latency_s=0.05)
    target.reads = [(1 * MIB, 0.08)] * 20                 # slow but under the score's steps
    controller.tick()
    assert controller.level is Level.NONE
    assert controller.cap == 5                            # halved by AIMD
    controller.tick()                                     # no reads: recovering
    assert controller.cap == 6


def test_system_memory_shortage_raises_the_level() -> None:
    target, monitor = FakeTarget(), FakeMonitor()
    controller = pressure.PressureController(target, monitor, idle_rss=30 * MIB)
    monitor.available = 1_000 * MIB                       # 96 % of the host in use
    target.in_flight = 9
    assert controller.tick() is Level.HEAVY               # memory 40 + concurrency 30
    monitor.available = 20_000 * MIB
    assert controller.tick() is Level.LIGHT
