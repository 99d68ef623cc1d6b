"""The fetcher on its own (through an engine's parts, no read entry): single
flight, cache insertion, speculative refusals, and a chunk that lands under
another identity."""

from __future__ import annotations

import ctypes
import mmap

import pytest
import trio

from stfs.streams import Stream
from stfs.versions import IdentityChanged
from tests.engine.fakes import FakeBacking
from tests.engine.helpers import KIB, MIB, Source, make_engine, opened, run

CHUNK = 256 * KIB


def test_concurrent_requests_for_one_chunk_share_one_backing_read(src: Source) -> None:
    data = src.write("f", 4 * MIB)
    fake = FakeBacking(delay_s=0.05)
    engine = make_engine(src, reader=fake)

    async def body() -> list[tuple[int, bytes]]:
        streams = [opened(engine, src.open("f")) for _ in range(8)]
        got: list[tuple[int, bytes]] = []

        async def one(stream: Stream, offset: int) -> None:
            start, chunk, _ = await engine.fetcher.chunk_at(stream, offset, CHUNK, False,
                                                            offset + 4096)
            got.append((start, bytes(chunk)))

        async with trio.open_nursery() as nursery:
            for i, stream in enumerate(streams):
                nursery.start_soon(one, stream, MIB + i * 1000)
        return got

    got = run(engine, body)
    assert got == [(MIB, data[MIB:MIB + CHUNK])] * 8
    assert fake.offsets == [MIB]
    assert engine.counters.cache_misses == 1 and engine.counters.cache_hits == 7
    assert engine.cache.cached_bytes == CHUNK == engine.budget.held_bytes


def test_read_ahead_is_refused_when_covered_or_when_the_budget_is_short(src: Source) -> None:
    src.write("f", 4 * MIB)
    fake = FakeBacking()
    engine = make_engine(src, reader=fake, memory_limit=2 * MIB, cache_limit=1 * MIB)

    async def body() -> list[object]:
        stream = opened(engine, src.open("f"))
        await engine.fetcher.fetch(stream, 0, CHUNK, speculative=False)
        covered = await engine.fetcher.fetch(stream, 0, CHUNK, speculative=True)
        assert engine.budget.try_reserve(engine.budget.free_bytes)       # no room left
        short = await engine.fetcher.fetch(stream, CHUNK, CHUNK, speculative=True)
        return [covered, short]

    assert run(engine, body) == [None, None]
    assert fake.offsets == [0]
    assert engine.budget.refused_speculative >= 1


def test_a_chunk_of_another_version_is_never_cached(src: Source) -> None:
    src.write("f", 2 * MIB, seed=1)
    engine = make_engine(src, reader=FakeBacking())

    async def body() -> None:
        handle = src.open("f")
        stream = opened(engine, handle)
        src.rewrite_in_place("f", seed=2)
        with pytest.raises(IdentityChanged) as caught:
            await engine.fetcher.fetch(stream, 0, CHUNK, speculative=False)
        assert caught.value.identity == src.identity("f") == handle.seen_identity
        assert engine.fetcher.flight_at(handle.identity, 0) is None

    run(engine, body)
    assert len(engine.cache) == 0 and engine.budget.held_bytes == 0


def test_covered_to_counts_only_chunks_covering_the_whole_range(src: Source) -> None:
    src.write("f", 4 * MIB)
    engine = make_engine(src, reader=FakeBacking())

    async def body() -> list[int | None]:
        handle = src.open("f")
        stream = opened(engine, handle)
        await engine.fetcher.fetch(stream, 0, CHUNK, speculative=False)
        covered = engine.fetcher.covered_to
        return [covered(handle.identity, 0, CHUNK), covered(handle.identity, 4096, CHUNK),
                covered(handle.identity, CHUNK, CHUNK)]

    assert run(engine, body) == [CHUNK, None, None]


@pytest.mark.parametrize("local", [True, False])
def test_chunks_of_a_network_source_land_in_page_aligned_buffers(src: Source,
                                                                 local: bool) -> None:
    # A FUSE direct_io SOURCE gets one request per MiB of an aligned buffer; on
    # a local disk heap buffers stay (no map to make and reclaim per chunk).
    data = src.write("f", 4 * MIB)
    engine = make_engine(src, reader=FakeBacking(local=local))

    async def body() -> list[object]:
        stream = opened(engine, src.open("f"))
        got = []
        for offset in (0, MIB):
            _, chunk, _ = await engine.fetcher.chunk_at(stream, offset, MIB, False, offset + 4096)
            got.append(chunk)
        return got

    for i, chunk in enumerate(run(engine, body)):
        assert bytes(chunk) == data[i * MIB:(i + 1) * MIB]
        assert isinstance(chunk, mmap.mmap) != local
        if not local:
            assert ctypes.addressof(ctypes.c_char.from_buffer(chunk)) % mmap.PAGESIZE == 0
