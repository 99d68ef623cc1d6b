"""Backing descriptors bounded by an LRU with lazy reopen: the table on its own,
then through the engine with many more open handles than the limit."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import resource
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from stfs import descriptors
from stfs.backing_reads import BackingReader
from stfs.descriptors import DescriptorTable, default_limit, raise_nofile_limit
from stfs.engine import ReadEngine
from stfs.handles import OpenFile
from tests.engine.fakes import FakeBacking
from tests.engine.helpers import (
    KIB,
    MIB,
    Source,
    fd_count,
    make_engine,
    read_to_size,
    run,
)


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


def replace_by_rename(source: Source, name: str, seed: int) -> bytes:
    """A new file (new inode) under the old name, the way editors save."""
    data = os.urandom(16) + bytes(seed % 256 for _ in range(len(source.data[name]) - 16))
    tmp = source.root / (name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, source.root / name)
    source.data[name] = data
    return data


def trio_run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return trio.run(fn)


# -- limits -------------------------------------------------------------------------

def test_raise_nofile_limit_returns_the_soft_limit_and_never_lowers_it() -> None:
    soft_before, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft = raise_nofile_limit()
    assert soft >= soft_before
    assert soft == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if hard != resource.RLIM_INFINITY:
        assert soft == hard
    assert raise_nofile_limit() == soft                      # idempotent


@pytest.mark.parametrize(("soft", "limit"), [
    (0, 16), (100, 16), (272, 16), (273, 17), (1024, 768), (4096, 3840),
    (8448, 8192), (1 << 20, 8192)])
def test_default_limit_keeps_room_for_everything_else(soft: int, limit: int) -> None:
    assert default_limit(soft) == limit
    assert descriptors.DEFAULT_LIMIT == 8192 and descriptors.RESERVED_FDS == 256


# -- the table on its own -------------------------------------------------------------

def test_close_of_a_pinned_descriptor_waits_for_the_unpin(src: Source) -> None:
    src.write("f", 4096)
    table = DescriptorTable(16, src.backing.open_file)
    handle = src.open("f")
    table.track(handle)
    fd = handle.fd

    async def main() -> None:
        assert await table.pin(handle) == fd
        assert await table.pin(handle) == fd                 # two reads at once
        await table.close(handle)                            # release during the reads
        assert fd_is_open(fd) and handle.fd == fd
        assert table.open_count == 1
        table.unpin(handle)
        assert fd_is_open(fd) and table.open_count == 1      # one read still uses it
        table.unpin(handle)
        assert handle.fd == -1 and table.open_count == 0

    trio_run(main)
    assert not fd_is_open(fd)


def test_close_of_an_unpinned_descriptor_is_at_once(src: Source) -> None:
    src.write("f", 4096)
    table = DescriptorTable(16, src.backing.open_file)
    handle = src.open("f")
    table.track(handle)
    fd = handle.fd

    async def main() -> None:
        await table.close(handle)
        await table.close(handle)                            # twice is harmless

    trio_run(main)
    assert handle.fd == -1 and table.open_count == 0 and not fd_is_open(fd)


def test_trim_closes_least_recently_used_idle_descriptors_and_pin_reopens(
        src: Source) -> None:
    for i in range(6):
        src.write(f"f{i}", 4096, seed=i)
    table = DescriptorTable(3, src.backing.open_file)
    handles = [src.open(f"f{i}") for i in range(6)]
    for handle in handles:
        table.track(handle)
    first_fds = [h.fd for h in handles]

    async def main() -> None:
        assert table.open_count == 6                         # tracking never closes
        assert table.fd_now(handles[0]) == first_fds[0]      # recently used now
        await table.pin(handles[1])                          # in use: trims the others
        assert table.open_count == 3
        assert [h.fd >= 0 for h in handles] == [True, True, False, False, False, True]
        assert table.closed_idle == 3
        assert not any(fd_is_open(fd) for fd in first_fds[2:5])
        assert table.fd_now(handles[2]) == -1
        fd = await table.pin(handles[3])                     # reopened lazily
        assert fd >= 0 and handles[3].fd == fd and table.reopens == 1
        assert os.pread(fd, 4096, 0) == src.data["f3"]
        assert table.open_count == 3                         # and another one closed:
        assert [h.fd >= 0 for h in handles] == [True, True, False, True, False, False]
        table.unpin(handles[3])
        await table.trim()                                   # pinned f1 stays open
        assert handles[1].fd >= 0
        table.unpin(handles[1])
        assert dataclasses.asdict(table.statistics()) == {"open": 3, "limit": 3, "reopens": 1,
                                                          "closed_idle": 4}
        table.close_all()
        assert table.open_count == 0 and all(h.fd == -1 for h in handles)

    trio_run(main)


def test_reopen_replaces_the_descriptor(src: Source) -> None:
    src.write("f", 8192)
    table = DescriptorTable(16, src.backing.open_file)
    handle = src.open("f")
    table.track(handle)
    old = handle.fd

    async def main() -> int:
        return await table.reopen(handle)

    new = trio_run(main)
    assert handle.fd == new and table.reopens == 1 and table.open_count == 1
    assert os.pread(new, 8192, 0) == src.data["f"]
    assert new == old or not fd_is_open(old) or os.fstat(old).st_ino == os.fstat(new).st_ino


def test_reopen_while_a_read_uses_the_descriptor_closes_the_old_one_at_unpin(
        src: Source) -> None:
    """A descriptor is never closed under a read in flight: its number could be
    given to another file before that read's pread."""
    src.write("f", 8192)
    table = DescriptorTable(16, src.backing.open_file)
    handle = src.open("f")
    table.track(handle)
    old = handle.fd

    async def main() -> None:
        assert await table.pin(handle) == old                # a read in flight
        new = await table.reopen(handle)
        assert new != old and handle.fd == new
        assert fd_is_open(old) and table.open_count == 2
        table.unpin(handle)
        assert not fd_is_open(old) and table.open_count == 1

    trio_run(main)
    table.close_all()


def test_reopen_of_a_replaced_file_keeps_the_old_descriptor(
        src: Source, caplog: pytest.LogCaptureFixture) -> None:
    """After ESTALE the name holds another file: the read fails with EIO, but the
    handle keeps its descriptor (it may still read its own file, as locally)."""
    old_bytes = src.write("f", 8192, seed=1)
    table = DescriptorTable(16, src.backing.open_file)
    handle = src.open("f")
    table.track(handle)
    old = handle.fd
    replace_by_rename(src, "f", seed=3)

    async def main() -> None:
        with caplog.at_level(logging.WARNING, logger="stfs.descriptors"), \
                pytest.raises(OSError) as caught:
            await table.reopen(handle)
        assert caught.value.errno == errno.EIO
        assert handle.fd == old and table.open_count == 1
        assert os.pread(await table.pin(handle), 8192, 0) == old_bytes
        table.unpin(handle)

    trio_run(main)
    table.close_all()
    assert not fd_is_open(old)


def test_a_closed_descriptor_of_a_replaced_file_is_not_reopened(
        src: Source, caplog: pytest.LogCaptureFixture) -> None:
    src.write("f", 8192, seed=1)
    src.write("g", 8192, seed=2)
    table = DescriptorTable(1, src.backing.open_file)
    handle, other = src.open("f"), src.open("g")
    table.track(handle)
    table.track(other)
    fds_before = fd_count()

    async def main() -> None:
        await table.trim()                       # over the limit: the older one closes
        assert handle.fd == -1 and other.fd >= 0
        replace_by_rename(src, "f", seed=2)
        with caplog.at_level(logging.WARNING, logger="stfs.descriptors"), \
                pytest.raises(OSError) as caught:
            await table.pin(handle)
        assert caught.value.errno == errno.EIO
        assert handle.fd == -1 and table.reopens == 0 and table.open_count == 1
        assert "another file" in caplog.text

    trio_run(main)
    assert fd_count() == fds_before - 1                      # the probe was closed too
    table.close_all()


def test_without_an_opener_a_closed_descriptor_fails_with_ebadf(
        src: Source) -> None:
    src.write("f", 4096)
    table = DescriptorTable(16, None)
    handle = src.open("f")
    table.track(handle)

    async def main() -> None:
        await table.close(handle)
        with pytest.raises(OSError) as caught:
            await table.pin(handle)
        assert caught.value.errno == errno.EBADF
        assert table.open_count == 0 and handle.fd == -1
        await table.close(handle)      # the failed pin left nothing to wait for

    trio_run(main)


def test_concurrent_pins_of_a_closed_descriptor_reopen_it_once(
        src: Source) -> None:
    src.write("f", 4096)
    table = DescriptorTable(16, src.backing.open_file)
    handle = src.open("f")
    table.track(handle)

    async def main() -> tuple[int, int]:
        fd, handle.fd = handle.fd, -1  # closed as the limit closes idle descriptors
        os.close(fd)
        before = fd_count()
        fds: list[int] = []

        async def reader() -> None:
            fds.append(await table.pin(handle))
            await trio.sleep(0.01)
            table.unpin(handle)

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(reader)
        assert len(set(fds)) == 1
        opened = fd_count() - before
        await table.close(handle)
        return opened, fd_count() - before

    opened, left = trio_run(main)
    assert table.reopens == 1
    assert (opened, left) == (1, 0)


# -- through the engine -----------------------------------------------------------------

def limited_engine(source: Source, limit: int = 16, reader: BackingReader | None = None,
                   **extra: Any) -> ReadEngine:
    return make_engine(source, reader=reader, memory_limit=64 * MIB, cache_limit=48 * MIB,
                       max_streams=8, descriptor_limit=limit, **extra)


def test_a_hundred_handles_under_a_limit_of_sixteen_read_exactly(
        src: Source) -> None:
    """Every backing read in a worker thread (pins its descriptor, trims the rest)."""
    names = [f"f{i:03d}" for i in range(100)]
    for i, name in enumerate(names):
        src.write(name, 48 * KIB + i, seed=i)
    engine = limited_engine(src, inline_cached_reads=False)

    async def body() -> None:
        fds_before = fd_count()
        handles: list[OpenFile] = []
        for name in names:
            handle = src.open(name)
            engine.open(handle)
            handles.append(handle)
        peak_after_trim = 0
        for _ in range(2):                                   # two rounds: reopen again
            for name, handle in zip(names, handles):
                got = await read_to_size(engine, handle, 16 * KIB)
                assert got == src.data[name], name
                peak_after_trim = max(peak_after_trim, engine.descriptors.open_count)
                assert fd_count() - fds_before <= 16
            engine.cache.shrink_to(0)                        # the second round reads again
        assert peak_after_trim <= 16
        open_now = sum(1 for h in handles if h.fd >= 0)
        assert open_now == engine.descriptors.open_count <= 16
        assert fd_count() == fds_before + open_now
        assert engine.descriptors.reopens >= 100 + 84 - 16
        assert engine.descriptors.closed_idle >= 84
        for handle in handles:
            await engine.release(handle)
        assert engine.descriptors.open_count == 0 and engine.resources.total() == 0
        assert fd_count() == fds_before

    run(engine, body, timeout=25)
    assert engine.counters.errors == 0


def test_the_limit_holds_with_inline_page_cache_reads(
        src: Source, monkeypatch: pytest.MonkeyPatch) -> None:
    names = [f"f{i:03d}" for i in range(100)]
    for i, name in enumerate(names):
        src.write(name, 48 * KIB + i, seed=i)
    # whatever the file system under the test: a local disk with every page cached
    engine = limited_engine(src, reader=FakeBacking(local=True, cached=True))

    async def body() -> int:
        fds_before = fd_count()
        handles: list[OpenFile] = []
        for name in names:
            handle = src.open(name)
            engine.open(handle)
            handles.append(handle)
        await trio.testing.wait_all_tasks_blocked()
        assert engine.descriptors.open_count <= 16          # opening trims too
        with trio.fail_after(30):
            while fd_count() - fds_before > 16:             # closed in worker threads
                await trio.sleep(0.005)
        worst = 0
        for name, handle in zip(names, handles):
            assert await read_to_size(engine, handle, 16 * KIB) == src.data[name]
            worst = max(worst, engine.descriptors.open_count)
        for handle in handles:
            await engine.release(handle)
        return worst

    # Regression: open() only tracked the new descriptor and the inline page-cache
    # path never pins, so nothing trimmed: 100 descriptors stayed open until a sweep.
    assert run(engine, body) <= 16
    # (with trimming at open, most reads now find their descriptor closed and reopen it)


def test_a_file_renamed_over_while_its_descriptor_sat_closed_fails_with_eio(
        src: Source, caplog: pytest.LogCaptureFixture) -> None:
    names = [f"f{i}" for i in range(20)]
    for i, name in enumerate(names):
        src.write(name, 64 * KIB, seed=i)
    engine = limited_engine(src, limit=16, inline_cached_reads=False)
    outcome: dict[str, Any] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            handles = [src.open(name) for name in names]
            for handle in handles:
                engine.open(handle)
            for name, handle in zip(names, handles):
                assert bytes(await engine.read(handle, 0, 4096)) == src.data[name][:4096]
            victim = handles[0]
            assert victim.fd == -1                   # closed for the limit meanwhile
            old = src.data["f0"]
            replace_by_rename(src, "f0", seed=3)
            engine.cache.shrink_to(0)
            try:
                await engine.read(victim, 4096, 4096)
            except OSError as exc:
                outcome["errno"] = exc.errno
            outcome["fd"] = victim.fd
            # another handle of the old version is unaffected; a new open sees the new file
            other = handles[19]
            assert bytes(await engine.read(other, 4096, 4096)) == src.data["f19"][4096:8192]
            fresh = src.open("f0")
            engine.open(fresh)
            outcome["fresh"] = bytes(await engine.read(fresh, 0, 4096)) == src.data["f0"][:4096]
            outcome["old_differs"] = old[:4096] != src.data["f0"][:4096]
            for handle in [*handles, fresh]:
                await engine.release(handle)
            outcome["open"] = engine.descriptors.open_count
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.WARNING):
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert outcome["errno"] == errno.EIO
    assert outcome["fd"] == -1
    assert outcome["fresh"] and outcome["old_differs"]
    assert outcome["open"] == 0
    assert "now holds another file" in caplog.text
    assert engine.counters.errors == 1


def test_a_file_renamed_over_while_its_descriptor_is_open_keeps_serving_the_old_bytes(
        src: Source) -> None:
    old = src.write("f", 2 * MIB, seed=1)
    engine = limited_engine(src)

    async def body() -> None:
        handle = src.open("f")
        engine.open(handle)
        assert bytes(await engine.read(handle, 0, 128 * KIB)) == old[:128 * KIB]
        replace_by_rename(src, "f", seed=5)
        assert await read_to_size(engine, handle, 128 * KIB) == old
        assert engine.descriptors.reopens == 0
        await engine.release(handle)

    run(engine, body)
    assert engine.counters.errors == 0 and engine.counters.changed_files == 0
