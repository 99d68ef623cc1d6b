"""The memory policy: the budget fitted to a group, kernel requests, heap
controls, and the keeper's reaction (fake group readings, no FUSE)."""

from __future__ import annotations

import ctypes.util
import dataclasses
import os
import select
from collections.abc import Iterable
from pathlib import Path

import pytest
import trio

from stfs import cgroup, memory
from stfs.backing import FileIdentity
from stfs.cgroup import GroupReading, Limit, MemoryGroup, Usage
from stfs.engine import EngineConfig, ReadEngine
from stfs.handles import OpenFile
from stfs.memory import (
    IN_FLIGHT_CACHE_BYTES,
    OUT_OF_BUDGET_BYTES,
    BudgetFit,
    MemoryKeeper,
    fit_budget,
)
from stfs.metrics import Counters
from stfs.pressure import Level, MemoryMonitor, MemorySnapshot, PressureController
from tests.engine.helpers import wait_until
from tests.engine.test_engine import Source, read_all, run

MIB = 1024 * 1024
MARGIN = 5 * MIB


def reading(limit: int, total: int, file: int = 0, mapped: int = 0) -> GroupReading:
    return GroupReading(Limit(limit, Path("/g/memory.limit_in_bytes"), 1),
                        Usage(total, file, mapped), Path("/g"))


# -- the fit --------------------------------------------------------------------------


def test_without_a_group_limit_the_option_is_the_budget() -> None:
    fit = fit_budget(50 * MIB, 37 * MIB, 4 * MIB, None, 20 * MIB, 20 * MIB)
    assert (fit.limit, fit.cache_limit, fit.source, fit.lowered) == (50 * MIB, 37 * MIB,
                                                                      "option", False)
    no_limit = GroupReading(None, Usage(30 * MIB, 0, 0), None)
    assert fit_budget(50 * MIB, 37 * MIB, 4 * MIB, no_limit, 1, 1).source == "option"


def test_the_budget_is_what_the_group_leaves_after_idle_others_slack_in_flight_and_margin(
        ) -> None:
    # 80 MiB group; its working set is the daemon's 21 MiB of anonymous memory,
    # 3 MiB of others (another process, kernel memory) and 2 MiB of mapped pages;
    # 30 MiB of clean page cache do not count.
    group = reading(80 * MIB, total=56 * MIB, file=32 * MIB, mapped=2 * MIB)
    fit = fit_budget(50 * MIB, 36 * MIB, 4 * MIB, group, own_anon=21 * MIB,
                     idle_anon=21 * MIB, margin=MARGIN)
    others = 56 * MIB - 30 * MIB - 21 * MIB
    assert fit.others == others
    assert fit.limit == (80 * MIB - others - 21 * MIB - OUT_OF_BUDGET_BYTES
                         - IN_FLIGHT_CACHE_BYTES - MARGIN)
    assert fit.limit == 25 * MIB
    assert fit.lowered and fit.source == "cgroup v1 /g/memory.limit_in_bytes"
    assert fit.cache_limit == 36 * MIB * fit.limit // (50 * MIB)   # the cache keeps its share
    assert ("leaves 25.0 MiB after 21.0 MiB idle, 5.0 MiB used by others in the group, "
            "16.0 MiB outside the budget, 8.0 MiB for page cache in flight and a 5.0 MiB "
            "margin") in fit.why()
    # At the full budget the daemon's anonymous memory (idle + budget + 16 MiB)
    # leaves the group room for the page cache that requests in flight lock,
    # which the kernel cannot reclaim: readers' pages of the mount waiting for
    # their replies (at most KERNEL_IN_FLIGHT_BYTES) and SOURCE pages under read.
    full = 21 * MIB + fit.limit + OUT_OF_BUDGET_BYTES
    assert 80 * MIB - others - full - MARGIN == IN_FLIGHT_CACHE_BYTES
    assert IN_FLIGHT_CACHE_BYTES >= memory.KERNEL_IN_FLIGHT_BYTES
    # The daemon holding data now (own anonymous memory above idle) changes nothing.
    busy = reading(80 * MIB, total=56 * MIB + 10 * MIB, file=32 * MIB, mapped=2 * MIB)
    assert fit_budget(50 * MIB, 36 * MIB, 4 * MIB, busy, own_anon=31 * MIB,
                      idle_anon=21 * MIB, margin=MARGIN).limit == fit.limit
    # A roomy group leaves the option alone.
    big = fit_budget(50 * MIB, 36 * MIB, 4 * MIB, reading(1024 * MIB, 30 * MIB), 21 * MIB,
                     21 * MIB, margin=MARGIN)
    assert (big.limit, big.source, big.lowered) == (50 * MIB, "option", False)


def test_a_group_too_small_to_serve_is_flagged_and_the_floor_kept() -> None:
    fit = fit_budget(50 * MIB, 36 * MIB, 4 * MIB, reading(52 * MIB, 21 * MIB), 21 * MIB,
                     21 * MIB, margin=MARGIN)
    assert fit.fits == (52 * MIB - 21 * MIB - OUT_OF_BUDGET_BYTES - IN_FLIGHT_CACHE_BYTES
                        - MARGIN) == 2 * MIB
    assert fit.too_small and fit.limit == 4 * MIB
    # A request below the floor is the user's choice: it only has to fit.
    own = fit_budget(2 * MIB, MIB, 4 * MIB, reading(52 * MIB, 21 * MIB), 21 * MIB, 21 * MIB,
                     margin=MARGIN)
    assert not own.too_small and own.limit == 2 * MIB


def test_min_budget_and_margin() -> None:
    assert memory.min_budget(1 * MIB) == 4 * MIB
    assert memory.min_budget(4 * MIB) == 8 * MIB
    assert memory.min_budget(64 * 1024) == 4 * MIB
    assert memory.margin_bytes(2) == 4 * MIB + 2 * 64 * os.sysconf("SC_PAGE_SIZE")


def test_kernel_requests_in_flight_fit_beside_a_fitted_budget() -> None:
    def fit(limit: int, fits: int | None) -> BudgetFit:
        return BudgetFit(50 * MIB, 37 * MIB, limit, limit, 4 * MIB, "x", fits)

    assert memory.kernel_requests(fit(50 * MIB, None), 1024, 32) == (1024, 32)   # no group
    assert memory.kernel_requests(fit(50 * MIB, 200 * MIB), 1024, 32) == (1024, 32)
    # Fitted: 8 MiB in flight, in smaller requests first.
    assert memory.kernel_requests(fit(15 * MIB, 15 * MIB), 1024, 32) == (256, 32)
    assert memory.kernel_requests(fit(38 * MIB, 38 * MIB), 1024, 32) == (256, 32)
    assert memory.kernel_requests(fit(38 * MIB, 46 * MIB), 1024, 32) == (512, 32)
    assert memory.kernel_requests(fit(4 * MIB, 4 * MIB), 1024, 64) == (128, 64)
    assert memory.kernel_requests(fit(4 * MIB, 4 * MIB), 128, 128) == (128, 64)


# -- allocator and heap ------------------------------------------------------------------


@pytest.mark.skipif(ctypes.util.find_library("c") is None or memory._libc is None,
                    reason="glibc only")
def test_heap_controls_work_on_glibc() -> None:
    assert memory.configure_allocator()
    memory.trim_heap()
    blobs = [bytearray(100_000) for _ in range(300)]   # under the mmap threshold: heap
    del blobs
    assert memory.trim_heap()                         # 30 MB of free heap went back


def test_trim_policy_and_own_anonymous_memory(tmp_path: Path) -> None:
    assert not memory.should_trim(rss=40 * MIB, idle_rss=30 * MIB, held=8 * MIB)
    assert memory.should_trim(rss=45 * MIB, idle_rss=30 * MIB, held=8 * MIB)
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmRSS:\t  33432 kB\nRssAnon:\t   19996 kB\n")
    assert memory.own_anon_bytes(str(status)) == 19996 * 1024
    assert memory.own_anon_bytes(str(tmp_path / "none")) == 0
    assert memory.own_anon_bytes() > 0


# -- the keeper -------------------------------------------------------------------------


class FakeEngine:
    max_streams = 10

    def __init__(self, limit: int) -> None:
        self.memory_limit = limit
        self.limits: list[tuple[int, int]] = []
        self.applied: list[Level] = []
        self.paused = 0

    def set_memory_limit(self, limit: int, cache_limit: int) -> None:
        self.memory_limit = limit
        self.limits.append((limit, cache_limit))

    def held_bytes(self) -> int:
        return 0

    def unevictable_bytes(self) -> int:
        return 0

    def backing_reads_in_flight(self) -> int:
        return 0

    def recent_reads(self, since: float) -> list[tuple[int, float]]:
        return []

    def apply_pressure(self, level: Level, cap: int, memory_use_pct: float) -> None:
        self.applied.append(level)


class FakeMonitor(MemoryMonitor):
    """Group readings the test sets."""

    def __init__(self, group_reading: GroupReading) -> None:
        super().__init__(group=None)
        self.next = group_reading
        self.samples = 0

    def read_group(self) -> GroupReading | None:
        self.reading = self.next
        return self.reading

    def sample(self, held_bytes: int, unevictable_bytes: int) -> MemorySnapshot:
        self.samples += 1
        self.read_group()
        snap = MemorySnapshot(0.0, 30 * MIB, 20_000 * MIB, 24_000 * MIB, None, None,
                              held_bytes, unevictable_bytes)
        self.snapshots.append(snap)
        return snap


def make_keeper(group_reading: GroupReading, spans: Iterable[tuple[FileIdentity, int, int, int]]
                = ()) -> tuple[MemoryKeeper, FakeEngine, FakeMonitor]:
    start = fit_budget(50 * MIB, 36 * MIB, 4 * MIB, group_reading, 21 * MIB, 21 * MIB)
    engine = FakeEngine(start.limit)
    monitor = FakeMonitor(group_reading)
    controller = PressureController(engine, monitor, idle_rss=30 * MIB)
    keeper = MemoryKeeper(engine, controller, None, start, 21 * MIB, 1.0,
                          lambda: list(spans), lambda: setattr(engine, "paused",
                                                               engine.paused + 1))
    keeper.own_anon = lambda: 21 * MIB
    return keeper, engine, monitor


def test_the_keeper_refits_when_the_limit_changes_and_when_others_grow() -> None:
    keeper, engine, monitor = make_keeper(reading(90 * MIB, 25 * MIB))
    first = keeper.fit.limit

    async def body() -> None:
        await keeper.step()
        assert engine.limits == []                        # nothing moved
        monitor.next = reading(90 * MIB, 25 * MIB + MIB)  # others +1 MiB: under the step
        await keeper.step()
        assert engine.limits == []
        monitor.next = reading(90 * MIB, 25 * MIB + 12 * MIB)  # a hog of 12 MiB
        await keeper.step()
        assert engine.limits[-1][0] == first - 12 * MIB
        monitor.next = reading(90 * MIB, 25 * MIB)        # it left
        await keeper.step()
        assert engine.limits[-1][0] == first
        monitor.next = reading(70 * MIB, 25 * MIB)        # the limit lowered by 20 MiB
        await keeper.step()
        assert engine.limits[-1][0] == first - 20 * MIB
        monitor.next = reading(40 * MIB, 25 * MIB)        # too small: the floor stays
        await keeper.step()
        assert engine.limits[-1][0] == 4 * MIB and keeper.fit.too_small

    trio.run(body)
    assert keeper.refits == 4
    assert keeper.statistics()["memory_limit_source"] == "cgroup v1 /g/memory.limit_in_bytes"


def test_near_the_limit_the_keeper_pauses_read_around_and_drops_source_pages(
        tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(2 * MIB))
    fd = os.open(path, os.O_RDONLY)
    identity = FileIdentity.of(os.fstat(fd))
    spans = [(identity, 0, MIB, fd), (identity, MIB, MIB, fd)]
    # The group's working set at 90 % of its limit.
    keeper, engine, _ = make_keeper(reading(100 * MIB, 90 * MIB), spans)
    try:
        trio.run(keeper.step)
        assert keeper.near_limit and engine.paused == 1
        assert keeper.source_dropped_bytes == 2 * MIB
        trio.run(keeper.step)                              # each span is dropped once
        assert keeper.source_dropped_bytes == 2 * MIB and engine.paused == 2
    finally:
        os.close(fd)
    calm, engine, _ = make_keeper(reading(100 * MIB, 50 * MIB), spans)
    trio.run(calm.step)
    assert not calm.near_limit and engine.paused == 0 and calm.source_dropped_bytes == 0


def test_chunks_shed_in_a_tick_are_trimmed_from_the_heap_in_the_same_step(
        monkeypatch: pytest.MonkeyPatch) -> None:
    trims: list[int] = []
    monkeypatch.setattr(memory, "trim_heap", lambda: trims.append(1) or True)

    class Shedding(FakeEngine):
        held = 26 * MIB

        def held_bytes(self) -> int:
            return self.held

        def apply_pressure(self, level: Level, cap: int, memory_use_pct: float) -> None:
            self.held = 6 * MIB                       # the level shed 20 MiB of cache

    class Resident(FakeMonitor):
        def sample(self, held_bytes: int, unevictable_bytes: int) -> MemorySnapshot:
            snap = super().sample(held_bytes, unevictable_bytes)
            self.snapshots[-1] = snap = dataclasses.replace(snap, rss_bytes=60 * MIB)
            return snap

    group = reading(200 * MIB, 60 * MIB)
    start = fit_budget(50 * MIB, 36 * MIB, 4 * MIB, group, 21 * MIB, 21 * MIB)
    engine, monitor = Shedding(start.limit), Resident(group)
    keeper = MemoryKeeper(engine, PressureController(engine, monitor, idle_rss=30 * MIB), None,
                          start, 21 * MIB, 1.0, lambda: [], lambda: None)
    keeper.own_anon = lambda: 21 * MIB
    # Sampled before the shed: RSS 60 = idle 30 + held 26 + 4 MiB of heap slack,
    # within the trim threshold; after it the 20 MiB shed are free heap.
    assert not memory.should_trim(60 * MIB, 30 * MIB, 26 * MIB)
    trio.run(keeper.step)
    assert trims == [1] and keeper.trims == 1


@pytest.mark.parametrize(("kind", "urgent"), [("oom", True), ("pressure", False),
                                              ("threshold", False)])
def test_a_kernel_notice_ticks_at_once_and_oom_marks_the_group_near(kind: str,
                                                                    urgent: bool) -> None:
    keeper, engine, monitor = make_keeper(reading(100 * MIB, 30 * MIB))
    keeper.interval = 60.0                                  # the sampler alone would wait
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    notifier = cgroup.MemoryNotifier([cgroup._Source(efd, kind, select.POLLIN, "eventfd")])
    keeper.group = MemoryGroup(1, Path("/nonexistent"), Path("/"))
    keeper._arm = lambda reading: None                      # type: ignore[method-assign]
    keeper.notifier = notifier
    notifier.start()

    async def body() -> float:
        async with trio.open_nursery() as nursery:
            await nursery.start(keeper.run)
            await trio.sleep(0.05)
            before = monitor.samples
            began = trio.current_time()
            os.eventfd_write(efd, 1)
            while monitor.samples == before:
                await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
            return trio.current_time() - began

    took = trio.run(body)
    assert took < 30                                       # not the 60 s sampler
    assert keeper.near_limit is urgent and (engine.paused >= 1) is urgent
    assert keeper.notices == {kind: 1}


# -- the engine on a new budget -----------------------------------------------------------


def test_the_engine_shrinks_to_a_new_budget_and_reads_go_on(src: Source) -> None:
    names = [f"f{i}" for i in range(6)]
    for name in names:
        src.write(name, 3 * MIB)
    engine = ReadEngine(EngineConfig(memory_limit=32 * MIB, cache_limit=24 * MIB, max_streams=4,
                                     min_chunk=4096, max_chunk=256 * 1024,
                                     inline_cached_reads=False), Counters())

    async def body() -> None:
        handles = [src.open(name) for name in names]
        for handle, name in zip(handles, names, strict=True):
            assert await read_all(engine, handle, 128 * 1024) == src.data[name]
        assert engine.cache.cached_bytes > 8 * MIB
        engine.set_memory_limit(8 * MIB, 6 * MIB)
        assert engine.budget.limit_bytes == 8 * MIB and engine.memory_limit == 8 * MIB
        assert engine.cache.capacity_bytes == 6 * MIB
        assert engine.cache.cached_bytes <= 6 * MIB and engine.budget.held_bytes <= 8 * MIB
        assert engine.pool.max_free_bytes == 2 * MIB and engine.pool.free_bytes <= 2 * MIB
        assert engine.read_around.window_bytes == 512 * 1024     # a sixteenth of 8 MiB
        engine.budget.peak_held_bytes = 0

        async def again(handle: OpenFile, name: str) -> None:
            assert await read_all(engine, handle, 128 * 1024) == src.data[name]

        async with trio.open_nursery() as nursery:
            for handle, name in zip(handles, names, strict=True):
                nursery.start_soon(again, handle, name)
        assert engine.budget.peak_held_bytes <= 8 * MIB
        engine.set_memory_limit(16 * MIB, 12 * MIB)              # and back up
        assert engine.cache.capacity_bytes == 12 * MIB
        assert engine.read_around.window_bytes == 512 * 1024     # never grows past its reservation
        for handle in handles:
            await engine.release(handle)

    run(engine, body, timeout=60)


def test_the_heap_is_trimmed_once_enough_buffers_were_dropped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(memory, "trim_heap", lambda: calls.append(1) or True)
    trimmer = memory.HeapTrimmer(after_bytes=4 * MIB)
    over = [False]
    trimmer.needed = lambda: over[0]

    async def main() -> None:
        trimmer.dropped_buffer(8 * MIB)                     # not attached: nothing runs
        async with trio.open_nursery() as nursery:
            trimmer.attach(nursery)
            trimmer.dropped = 0
            for _ in range(3):
                trimmer.dropped_buffer(MIB)
            await trio.sleep(0.05)
            assert calls == []                              # 3 MiB: not yet
            trimmer.dropped_buffer(MIB)
            await trio.sleep(0.05)
            assert calls == []                              # 4 MiB, but RSS is not over
            over[0] = True
            for _ in range(4):
                trimmer.dropped_buffer(MIB)
            await wait_until(lambda: trimmer.trims == 1)    # in a worker thread
            assert calls == [1] and trimmer.trims == 1 and trimmer.dropped == 0
            trimmer.attach(None)

    trio.run(main)
