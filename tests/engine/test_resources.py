"""Resource tracking: the registry on its own (fake clock), then the engine's
handles end to end - what open/read/release register and free, orphan sweeps,
emergency cleanup under critical pressure, and no leak after many cycles."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from stfs.engine import ReadEngine
from stfs.pressure import Level
from stfs.resources import Priority, ResourceRegistry
from tests.engine.fakes import FakeBacking
from tests.engine.helpers import (
    KIB,
    MIB,
    Source,
    fd_count,
    make_engine,
    read_to_size,
    run,
    settle,
    wait_until,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def go(fn: Any, *args: Any) -> Any:
    return trio.run(fn, *args)


# -- the registry -------------------------------------------------------------------

def test_free_owner_frees_speculative_then_stream_then_descriptor() -> None:
    reg = ResourceRegistry(FakeClock())
    order: list[str] = []
    reg.register(7, "descriptor", Priority.DESCRIPTOR, lambda: order.append("descriptor"))
    reg.register(7, "stream", Priority.STREAM, lambda: order.append("stream"))
    reg.register(7, "readahead", Priority.SPECULATIVE, lambda: order.append("readahead-1"))
    reg.register(8, "descriptor", Priority.DESCRIPTOR, lambda: order.append("other"))
    reg.register(7, "readahead", Priority.SPECULATIVE, lambda: order.append("readahead-2"))
    assert go(reg.free_owner, 7) == 5 - 1
    assert order[:2] == ["readahead-1", "readahead-2"]
    assert order[2:] == ["stream", "descriptor"]
    assert reg.counts() == {"descriptor": 1}                 # owner 8 untouched
    assert reg.owners() == 1
    assert dict(reg.freed) == {"readahead": 2, "stream": 1, "descriptor": 1}
    assert go(reg.free_owner, 7) == 0                        # nothing left: no double free
    assert order.count("descriptor") == 1


def test_async_and_sync_free_callables_both_run() -> None:
    reg = ResourceRegistry(FakeClock())
    done: list[str] = []

    async def async_free() -> None:
        await trio.lowlevel.checkpoint()
        done.append("async")

    reg.register(1, "descriptor", Priority.DESCRIPTOR, async_free)
    reg.register(1, "stream", Priority.STREAM, lambda: done.append("sync"))
    assert go(reg.free_owner, 1) == 2
    assert done == ["sync", "async"]
    assert reg.total() == 0 and reg.free_errors == 0


def test_a_free_that_raises_is_logged_and_the_others_are_still_freed(
        caplog: pytest.LogCaptureFixture) -> None:
    reg = ResourceRegistry(FakeClock())
    done: list[str] = []

    def broken() -> None:
        raise RuntimeError("boom")

    async def broken_async() -> None:
        raise OSError(9, "bad descriptor")

    reg.register(3, "readahead", Priority.SPECULATIVE, broken)
    reg.register(3, "stream", Priority.STREAM, lambda: done.append("stream"))
    reg.register(3, "buffer", Priority.STREAM, broken_async)
    reg.register(3, "descriptor", Priority.DESCRIPTOR, lambda: done.append("descriptor"))
    with caplog.at_level(logging.ERROR, logger="stfs.resources"):
        assert go(reg.free_owner, 3) == 4
    assert done == ["stream", "descriptor"]
    assert reg.free_errors == 2
    assert reg.total() == 0 and reg.owners() == 0
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("readahead" in m and "3" in m for m in messages), messages
    assert any("buffer" in m for m in messages), messages
    assert reg.statistics().free_errors == 2


def test_forget_removes_without_freeing_and_drops_empty_owners() -> None:
    reg = ResourceRegistry(FakeClock())
    freed: list[int] = []
    a = reg.register(1, "readahead", Priority.SPECULATIVE, lambda: freed.append(1))
    b = reg.register(1, "readahead", Priority.SPECULATIVE, lambda: freed.append(2))
    reg.forget(a)
    reg.forget(a)                                            # twice is harmless
    assert reg.counts() == {"readahead": 1} and reg.owners() == 1
    reg.forget(b)
    assert reg.total() == 0 and reg.owners() == 0
    assert freed == [] and sum(reg.freed.values()) == 0


def test_counts_total_and_statistics() -> None:
    reg = ResourceRegistry(FakeClock())
    for owner in (1, 2, 3):
        reg.register(owner, "descriptor", Priority.DESCRIPTOR, lambda: None)
        reg.register(owner, "stream", Priority.STREAM, lambda: None)
    reg.register(2, "readahead", Priority.SPECULATIVE, lambda: None, size=65536)
    assert reg.counts() == {"descriptor": 3, "readahead": 1, "stream": 3}
    assert list(reg.counts()) == ["descriptor", "readahead", "stream"]   # sorted
    assert reg.total() == 7 and reg.owners() == 3
    go(reg.free_owner, 2)
    assert dataclasses.asdict(reg.statistics()) == {
        "tracked": {"descriptor": 2, "stream": 2}, "tracked_total": 4,
        "freed": {"descriptor": 1, "readahead": 1, "stream": 1}, "sweeps": 0, "swept": 0,
        "emergency_cleanups": 0, "free_errors": 0}


def test_free_all_frees_every_owner_in_priority_order() -> None:
    reg = ResourceRegistry(FakeClock())
    order: list[tuple[int, str]] = []
    for owner in (1, 2):
        for kind, prio in [("descriptor", Priority.DESCRIPTOR), ("stream", Priority.STREAM),
                           ("readahead", Priority.SPECULATIVE)]:
            reg.register(owner, kind, prio,
                         lambda o=owner, k=kind: order.append((o, k)))  # type: ignore[misc]
    assert go(reg.free_all) == 6
    kinds = [k for _, k in order]
    assert kinds == ["readahead"] * 2 + ["stream"] * 2 + ["descriptor"] * 2
    assert reg.total() == 0


def test_sweep_frees_orphans_whole_and_only_speculative_work_of_idle_owners(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    reg = ResourceRegistry(clock)
    freed: list[tuple[int, str]] = []

    def add(owner: int, kind: str, prio: Priority) -> None:
        reg.register(owner, kind, prio, lambda: freed.append((owner, kind)))

    for owner in (1, 2, 3):          # 1 busy, 2 idle, 3 orphan (no longer open)
        add(owner, "descriptor", Priority.DESCRIPTOR)
        add(owner, "stream", Priority.STREAM)
        add(owner, "readahead", Priority.SPECULATIVE)
    clock.now += 100
    reg.touch(1)
    clock.now += 20
    assert reg.idle_s(1) == 20 and reg.idle_s(2) == 120
    with caplog.at_level(logging.WARNING, logger="stfs.resources"):
        n = go(reg.sweep, {1, 2}, 60.0)
    assert n == 4
    assert sorted(freed) == [(2, "readahead"), (3, "descriptor"), (3, "readahead"),
                             (3, "stream")]
    assert reg.counts() == {"descriptor": 2, "readahead": 1, "stream": 2}
    assert (reg.sweeps, reg.swept) == (1, 4)
    orphan_logs = [r.getMessage() for r in caplog.records if "orphan" in r.getMessage()]
    assert len(orphan_logs) == 3 and all("handle 3" in m for m in orphan_logs)
    # a later sweep with owner 1 idle too: only its read-ahead goes
    clock.now += 1000
    assert go(reg.sweep, {1, 2}, 60.0) == 1
    assert reg.counts() == {"descriptor": 2, "stream": 2}
    assert (reg.sweeps, reg.swept) == (2, 5)


def test_touch_of_an_unknown_owner_is_ignored_and_idle_restarts_with_registration() -> None:
    clock = FakeClock()
    reg = ResourceRegistry(clock)
    reg.touch(5)
    assert reg.owners() == 0 and reg.idle_s(5) == 0
    reg.register(5, "readahead", Priority.SPECULATIVE, lambda: None)
    clock.now += 30
    assert reg.idle_s(5) == 30
    assert go(reg.sweep, {5}, 31.0) == 0                     # not idle long enough
    assert go(reg.sweep, {5}, 30.0) == 1


def test_emergency_frees_only_speculative_resources() -> None:
    reg = ResourceRegistry(FakeClock())
    freed: list[str] = []
    for owner in (1, 2):
        reg.register(owner, "descriptor", Priority.DESCRIPTOR, lambda: freed.append("d"))
        reg.register(owner, "stream", Priority.STREAM, lambda: freed.append("s"))
        reg.register(owner, "readahead", Priority.SPECULATIVE, lambda: freed.append("r"))
    assert go(reg.emergency) == 2
    assert freed == ["r", "r"]
    assert reg.counts() == {"descriptor": 2, "stream": 2}
    assert reg.emergency_cleanups == 1
    assert go(reg.emergency) == 0
    assert reg.emergency_cleanups == 2


# -- the engine's handles -------------------------------------------------------------

async def hold_read_ahead(engine: ReadEngine, handle: Any, data: bytes, gate: FakeBacking) -> int:
    """Read *handle* sequentially until read-ahead is under way, then hold every
    backing read started after a demand read returns (only read-ahead starts
    then) in its worker thread; returns the offset reached."""
    offset = 0
    while offset < 6 * MIB:
        got = await engine.read(handle, offset, 128 * KIB)
        gate.armed = True        # at once: read-ahead this read scheduled has not begun
        assert bytes(got) == data[offset:offset + len(got)]
        offset += len(got)
        for _ in range(20):
            await trio.sleep(0.001)
            if gate.held:
                await wait_until(
                    lambda: engine.resources.counts().get("readahead", 0) >= 1)
                return offset
        gate.armed = False
    raise AssertionError("read-ahead never started")


def test_open_read_and_release_register_and_free_each_kind(
        src: Source, monkeypatch: pytest.MonkeyPatch) -> None:
    data = src.write("big", 8 * MIB, seed=5)
    gate = FakeBacking()
    engine = make_engine(src, reader=gate, inline_cached_reads=False)

    async def body() -> None:
        fds_before = fd_count()
        handle = src.open("big")
        engine.open(handle)
        assert engine.resources.counts() == {"descriptor": 1}
        assert engine.descriptors.open_count == 1
        await hold_read_ahead(engine, handle, data, gate)
        counts = engine.resources.counts()
        assert counts["descriptor"] == 1 and counts["stream"] == 1
        await engine.release(handle)
        assert engine.resources.total() == 0
        assert engine.resources.freed["readahead"] >= 1
        assert engine.resources.freed["stream"] == 1
        assert engine.resources.freed["descriptor"] == 1
        assert engine.stream_info(handle.fh) == {}
        # a read-ahead still reads through the descriptor in its thread: it is
        # closed when that read lets go of it, not under it
        assert handle.fd >= 0 and engine.descriptors.open_count == 1
        gate.release()
        await wait_until(lambda: engine.budget.speculative_bytes == 0)
        await wait_until(lambda: engine.budget.held_bytes == engine.cache.cached_bytes)
        await wait_until(lambda: engine.descriptors.open_count == 0)
        assert handle.fd == -1
        assert fd_count() == fds_before
        assert engine.resources.total() == 0

    run(engine, body)


def test_two_hundred_open_read_release_cycles_leave_nothing_behind(
        src: Source) -> None:
    files = {f"f{i}": src.write(f"f{i}", size, seed=i)
             for i, size in enumerate([1000, 70 * KIB, 300 * KIB, 1 * MIB + 5, 2 * MIB])}
    engine = make_engine(src, memory_limit=24 * MIB, cache_limit=12 * MIB)

    async def body() -> None:
        fds_before = fd_count()
        handles = []
        for i in range(200):
            name = f"f{i % len(files)}"
            handle = src.open(name)
            engine.open(handle)
            handles.append((name, handle))
        assert engine.resources.counts() == {"descriptor": 200}
        assert fd_count() >= fds_before + 200
        for name, handle in handles:
            assert await read_to_size(engine, handle, 128 * KIB) == files[name]
        assert engine.resources.counts()["stream"] == 200
        for _, handle in handles:
            await engine.release(handle)
        assert engine.resources.total() == 0
        assert engine.resources.freed["descriptor"] == 200
        assert engine.resources.freed["stream"] == 200
        assert engine.descriptors.open_count == 0
        assert all(handle.fd == -1 for _, handle in handles)
        await wait_until(lambda: engine.budget.held_bytes == engine.cache.cached_bytes)
        assert engine.budget.speculative_bytes == 0
        assert abs(fd_count() - fds_before) <= 2

    run(engine, body, timeout=25)
    assert engine.counters.errors == 0


def test_release_after_a_failed_read_still_frees_everything(
        src: Source, monkeypatch: pytest.MonkeyPatch) -> None:
    src.write("f", 2 * MIB, seed=1)

    engine = make_engine(src, reader=FakeBacking(errnos=[13] * 10), inline_cached_reads=False)

    async def body() -> None:
        fds_before = fd_count()
        handle = src.open("f")
        engine.open(handle)
        with pytest.raises(PermissionError):
            await engine.read(handle, 0, 128 * KIB)
        assert engine.resources.counts() == {"descriptor": 1, "stream": 1}
        await engine.release(handle)
        assert engine.resources.total() == 0 and engine.descriptors.open_count == 0
        assert fd_count() == fds_before
        assert engine.budget.held_bytes == engine.cache.cached_bytes == 0

    run(engine, body)


def test_sweep_frees_the_resources_of_a_handle_never_released(
        src: Source, caplog: pytest.LogCaptureFixture) -> None:
    data = src.write("f", 3 * MIB, seed=2)
    engine = make_engine(src)

    async def body() -> None:
        fds_before = fd_count()
        kept, orphan = src.open("f"), src.open("f")
        for handle in (kept, orphan):
            engine.open(handle)
            assert bytes(await engine.read(handle, 0, 128 * KIB)) == data[:128 * KIB]
        await settle(engine)
        assert engine.resources.counts() == {"descriptor": 2, "stream": 2}
        with caplog.at_level(logging.WARNING):
            freed = await engine.sweep(live_fhs={kept.fh}, idle_s=3600)
        assert freed >= 2
        assert engine.resources.counts() == {"descriptor": 1, "stream": 1}
        assert orphan.fd == -1 and kept.fd >= 0
        assert engine.descriptors.open_count == 1
        assert engine.stream_info(orphan.fh) == {}
        assert engine.stream_info(kept.fh) != {}
        assert fd_count() == fds_before + 1
        assert any("orphan" in r.getMessage() and str(orphan.fh) in r.getMessage()
                   for r in caplog.records)
        # the live handle still reads, and an empty live set sweeps it too
        assert bytes(await engine.read(kept, 128 * KIB, 4096)) == data[128 * KIB:132 * KIB]
        await settle(engine)
        await engine.sweep(live_fhs=set(), idle_s=0)
        assert engine.resources.total() == 0 and engine.descriptors.open_count == 0
        assert fd_count() == fds_before
        await wait_until(lambda: engine.budget.held_bytes == engine.cache.cached_bytes)

    run(engine, body)
    assert engine.resources.sweeps == 2


def test_sweep_of_idle_live_handles_frees_only_their_read_ahead(
        src: Source, monkeypatch: pytest.MonkeyPatch) -> None:
    data = src.write("big", 8 * MIB, seed=6)
    gate = FakeBacking()
    engine = make_engine(src, reader=gate, inline_cached_reads=False)

    async def body() -> None:
        handle = src.open("big")
        engine.open(handle)
        await hold_read_ahead(engine, handle, data, gate)
        await engine.sweep(live_fhs={handle.fh}, idle_s=0)
        assert engine.resources.counts() == {"descriptor": 1, "stream": 1}
        assert engine.resources.freed["readahead"] >= 1
        assert handle.fd >= 0
        gate.release()
        await wait_until(lambda: engine.budget.speculative_bytes == 0)
        got = await read_to_size(engine, handle, 1 * MIB)
        assert got == data
        await engine.release(handle)
        await wait_until(lambda: engine.budget.held_bytes == engine.cache.cached_bytes)
        assert engine.resources.total() == 0

    run(engine, body)


def test_critical_pressure_runs_an_emergency_cleanup_of_read_ahead(
        src: Source, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    data = src.write("big", 8 * MIB, seed=7)
    gate = FakeBacking()
    engine = make_engine(src, reader=gate, inline_cached_reads=False)

    async def body() -> None:
        handle = src.open("big")
        engine.open(handle)
        offset = await hold_read_ahead(engine, handle, data, gate)
        with caplog.at_level(logging.WARNING, logger="stfs"):
            engine.apply_pressure(Level.CRITICAL, 1, 95.0)
        await wait_until(lambda: engine.resources.emergency_cleanups == 1)
        assert engine.resources.counts() == {"descriptor": 1, "stream": 1}
        assert engine.resources.freed["readahead"] >= 1
        assert any("emergency" in r.getMessage() for r in caplog.records)
        gate.release()
        await wait_until(lambda: engine.budget.speculative_bytes == 0)
        await trio.sleep(0.05)
        await trio.testing.wait_all_tasks_blocked()
        assert "readahead" not in engine.resources.counts()
        # still critical: reads go on, without read-ahead
        got = await engine.read(handle, offset, 128 * KIB)
        assert bytes(got) == data[offset:offset + 128 * KIB]
        await trio.testing.wait_all_tasks_blocked()
        assert "readahead" not in engine.resources.counts()
        assert engine.resources.emergency_cleanups == 1      # only on entering CRITICAL
        engine.apply_pressure(Level.CRITICAL, 1, 96.0)
        await trio.testing.wait_all_tasks_blocked()
        assert engine.resources.emergency_cleanups == 1
        await engine.release(handle)
        await wait_until(lambda: engine.budget.held_bytes == engine.cache.cached_bytes)

    run(engine, body)


def test_close_at_unmount_frees_every_handle(src: Source) -> None:
    data = src.write("f", 2 * MIB, seed=8)
    engine = make_engine(src)

    async def body() -> None:
        fds_before = fd_count()
        handles = [src.open("f") for _ in range(10)]
        for handle in handles:
            engine.open(handle)
        for handle in handles[:5]:
            assert bytes(await engine.read(handle, 0, 4096)) == data[:4096]
        await engine.close()
        assert engine.resources.total() == 0
        assert engine.descriptors.open_count == 0
        assert all(h.fd == -1 for h in handles)
        assert fd_count() == fds_before

    run(engine, body)


def test_release_right_after_a_read_leaves_no_descriptor_open(
        src: Source) -> None:
    data = src.write("big", 8 * MIB, seed=9)
    engine = make_engine(src, inline_cached_reads=False)  # read-ahead runs for waiting reads

    async def body() -> None:
        fds_before = fd_count()
        handle = src.open("big")
        engine.open(handle)
        offset = len(await engine.read(handle, 0, 128 * KIB))
        while True:
            scheduled = engine.streams.get(handle.fh).readahead_bytes
            got = await engine.read(handle, offset, 128 * KIB)
            assert bytes(got) == data[offset:offset + len(got)]
            offset += len(got)
            if engine.streams.get(handle.fh).readahead_bytes > scheduled:
                break             # this read scheduled read-ahead that has not begun
            assert offset < 6 * MIB, "read-ahead never scheduled"
            await trio.sleep(0.002)
        await engine.release(handle)      # the kernel's release, right after the reply
        await settle(engine)
        assert engine.resources.total() == 0
        assert engine.descriptors.reopens == 0
        assert engine.descriptors.open_count == 0 and handle.fd == -1
        assert fd_count() == fds_before

    run(engine, body)
