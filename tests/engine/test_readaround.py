"""Read-around: windows around random reads pushed into the kernel page cache,
with a fake kernel store (no FUSE)."""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest
import trio
import trio.testing

from stfs.backing import cached_pages
from stfs.engine import EngineConfig, ReadEngine
from stfs.metrics import Counters
from stfs.readaround import MAX_GROWTH, MAX_QUEUED, WINDOW_BYTES
from tests.engine.helpers import KIB, MIB, Source, read_all, run
from tests.pagecache import pin


class FakeKernel:
    """Records stores and invalidations; *on_store* runs inside a store."""

    def __init__(self) -> None:
        self.stores: list[tuple[int, int, bytes]] = []
        self.invalidated: list[int] = []
        self.threads: set[int] = set()
        self.on_store: Any = None

    def store(self, nodeid: int, offset: int, data: memoryview) -> None:
        self.threads.add(threading.get_ident())
        self.stores.append((nodeid, offset, bytes(data)))
        if self.on_store is not None:
            self.on_store()

    def invalidate(self, nodeid: int) -> None:
        self.invalidated.append(nodeid)


def engine_with(kernel: FakeKernel, read_around: int = WINDOW_BYTES, **config: Any) -> ReadEngine:
    cfg: dict[str, Any] = {"memory_limit": 50 * MIB, "cache_limit": 37 * MIB,
                           "max_streams": 10, "min_chunk": 4096, "max_chunk": MIB,
                           "read_around_bytes": read_around, **config}
    return ReadEngine(EngineConfig(**cfg), Counters(), kernel_store=kernel.store,
                      kernel_invalidate=kernel.invalidate)


async def settle(engine: ReadEngine) -> None:
    """Let the read-around worker finish what was queued."""
    await trio.to_thread.run_sync(engine.read_around.wait_idle)


def warm(path: os.PathLike[str]) -> None:
    """Read *path* into the page cache and keep it there for the test (pushes
    need SOURCE's pages cached)."""
    pin(path)


def warm_file_engine(src: Source, size: int, seed: int,
                     piece: int = WINDOW_BYTES) -> tuple[bytes, FakeKernel, ReadEngine]:
    """A file "big" in SOURCE's page cache and an engine pushing *piece*-sized pieces."""
    data = src.write("big", size, seed=seed)
    warm(src.root / "big")
    kernel = FakeKernel()
    return data, kernel, engine_with(kernel, read_around=piece)


def test_a_random_read_pushes_its_aligned_window_once(src: Source) -> None:
    data, kernel, engine = warm_file_engine(src, 8 * MIB, 1)

    async def body() -> int:
        handle = src.open("big")
        offset = 3 * MIB + 70 * KIB
        assert bytes(await engine.read(handle, offset, 4096)) == data[offset:offset + 4096]
        await settle(engine)
        await engine.read(handle, offset + 64 * KIB, 4096)       # same window: no push
        await settle(engine)
        return handle.nodeid

    nodeid = run(engine, body)
    start = 3 * MIB
    assert kernel.stores == [(nodeid, start, data[start:start + WINDOW_BYTES])]
    assert threading.get_ident() not in kernel.threads          # never on the event loop
    assert engine.read_around.pushes == 1
    assert engine.read_around.pushed_bytes == WINDOW_BYTES
    waiting = sum(s.verifier.reserved_bytes for s in engine.streams)
    assert engine.budget.held_bytes == engine.cache.cached_bytes + waiting  # buffer given back


def test_a_sequential_reader_pushes_nothing(src: Source) -> None:
    data, kernel, engine = warm_file_engine(src, 4 * MIB, 2)

    async def body() -> bytes:
        got = await read_all(engine, src.open("big"), 128 * KIB)
        await settle(engine)
        return got

    assert run(engine, body) == data
    assert kernel.stores == []


def test_a_small_file_read_at_an_offset_is_pushed_whole(src: Source) -> None:
    data = src.write("small", 300 * KIB, seed=3)
    warm(src.root / "small")
    kernel = FakeKernel()
    engine = engine_with(kernel)

    async def body() -> None:
        await engine.read(src.open("small"), 200 * KIB, 4096)
        await settle(engine)

    run(engine, body)
    assert [(off, blob) for _, off, blob in kernel.stores] == [(0, data)]


def test_nothing_is_pushed_that_source_does_not_have_cached(src: Source) -> None:
    src.write("cold", 8 * MIB, seed=4)
    kernel = FakeKernel()
    engine = engine_with(kernel, inline_cached_reads=False)

    async def body() -> None:
        handle = src.open("cold")
        fd = handle.fd
        os.fsync(fd)                                            # dirty pages stay cached
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert engine.read_around.offer(fd, handle.nodeid, handle.identity,
                                        [(5 * MIB, WINDOW_BYTES)])
        await settle(engine)
        assert cached_pages(fd, 5 * MIB, WINDOW_BYTES) == 0     # and caused no read-ahead

    run(engine, body)
    assert kernel.stores == []
    assert engine.read_around.skipped == 1


def test_the_window_grows_with_a_random_reader_and_starts_where_it_reads(src: Source) -> None:
    piece = 64 * KIB
    data, kernel, engine = warm_file_engine(src, 64 * MIB, 9, piece)
    # offsets in windows no earlier window covered (each is the last piece of its window)
    offsets = [(2 * i + 1) * 8 * MIB - piece + 100 for i in range(4)]

    async def body() -> list[list[int]]:
        handle = src.open("big")
        windows = []
        for offset in offsets:
            before = len(kernel.stores)
            assert bytes(await engine.read(handle, offset, 4096)) == data[offset:offset + 4096]
            await settle(engine)
            windows.append([off for _, off, _ in kernel.stores[before:]])
        return windows

    windows = run(engine, body)
    assert [len(w) for w in windows] == [1, 1, 2, 2]      # doubles every second window
    for offset, window in zip(offsets, windows):
        assert window[0] == offset - offset % piece          # the piece read comes first
        size = len(window) * piece                          # aligned to its own size
        assert sorted(window) == list(range(offset - offset % size, offset - offset % size + size,
                                            piece))
    for _, off, blob in kernel.stores:
        assert blob == data[off:off + piece]


def test_growth_stops_at_max_growth_and_each_piece_is_pushed_once(src: Source) -> None:
    piece = 4 * KIB
    data, kernel, engine = warm_file_engine(src, 16 * MIB, 10, piece)

    async def body() -> None:
        handle = src.open("big")
        for i in range(16):
            await engine.read(handle, i * MIB + 8 * KIB, 512)
            await settle(engine)
        again = engine.read_around.window(8 * KIB, handle.identity)
        assert len(again) == MAX_GROWTH
        assert not engine.read_around.offer(handle.fd, handle.nodeid, handle.identity,
                                            again[:1])          # pushed already: not again

    run(engine, body)
    offsets = [off for _, off, _ in kernel.stores]
    assert len(offsets) == len(set(offsets))                    # each piece pushed once
    assert len(offsets) == sum(min(MAX_GROWTH, 1 << (n // 2)) for n in range(16))
    assert all(blob == data[off:off + piece] for _, off, blob in kernel.stores)
    assert len([o for o in offsets if o >= 15 * MIB]) == MAX_GROWTH   # the largest window


def test_pause_stops_a_window_between_pieces(src: Source) -> None:
    piece = 64 * KIB
    _, kernel, engine = warm_file_engine(src, 8 * MIB, 11, piece)
    kernel.on_store = lambda: engine.read_around.pause(True)

    async def body() -> None:
        handle = src.open("big")
        pieces = [(i * piece, piece) for i in range(8)]
        assert engine.read_around.offer(handle.fd, handle.nodeid, handle.identity, pieces)
        await settle(engine)
        assert not engine.read_around.offer(handle.fd, handle.nodeid, handle.identity,
                                            [(4 * MIB, piece)])        # refused while paused

    run(engine, body)
    assert len(kernel.stores) == 1


def test_a_full_queue_drops_offers_without_remembering_them(src: Source) -> None:
    src.write("big", 16 * MIB, seed=8)
    warm(src.root / "big")
    kernel = FakeKernel()
    release = threading.Event()
    kernel.on_store = release.wait            # the worker blocks in its first store
    engine = engine_with(kernel)

    async def body() -> None:
        handle = src.open("big")
        offers = [engine.read_around.offer(handle.fd, handle.nodeid, handle.identity,
                                           [(i * WINDOW_BYTES, WINDOW_BYTES)])
                  for i in range(12)]
        assert offers.count(True) <= 1 + MAX_QUEUED and not offers[-1]
        assert engine.read_around.dropped >= 12 - 1 - MAX_QUEUED
        release.set()
        await settle(engine)
        # a dropped window is offered again later
        assert engine.read_around.offer(handle.fd, handle.nodeid, handle.identity,
                                        [(11 * WINDOW_BYTES, WINDOW_BYTES)])
        await settle(engine)

    run(engine, body)
    assert (11 * WINDOW_BYTES) in [off for _, off, _ in kernel.stores]


def test_a_file_changed_during_the_store_is_invalidated_again(src: Source) -> None:
    src.write("moving", 4 * MIB, seed=5)
    warm(src.root / "moving")
    kernel = FakeKernel()
    kernel.on_store = lambda: src.rewrite_in_place("moving", seed=6)
    engine = engine_with(kernel)

    async def body() -> int:
        handle = src.open("moving")
        await engine.read(handle, 2 * MIB, 4096)
        await settle(engine)
        return handle.nodeid

    nodeid = run(engine, body)
    assert len(kernel.stores) == 1 and kernel.invalidated == [nodeid]
    assert engine.read_around.pushes == 0


@pytest.mark.parametrize("why", ["off", "pressure"])
def test_no_push_when_off_or_under_pressure(src: Source, why: str) -> None:
    src.write("big", 4 * MIB, seed=7)
    warm(src.root / "big")
    kernel = FakeKernel()
    engine = engine_with(kernel, read_around=0 if why == "off" else WINDOW_BYTES)
    if why == "pressure":
        engine.readahead.enabled = False      # what heavy pressure does

    async def body() -> None:
        await engine.read(src.open("big"), 2 * MIB, 4096)
        await settle(engine)

    run(engine, body)
    assert kernel.stores == []
