"""The engine under each pressure level: caps, read-ahead switch, cache shedding,
and every read still answered with the right bytes (slow fake backing, no FUSE)."""

from __future__ import annotations

import pytest
import trio
import trio.lowlevel

from stfs.engine import ReadEngine
from stfs.pressure import CACHE_SHARE, Level, cap_for
from tests.engine.fakes import FakeBacking
from tests.engine.helpers import MIB, Source, make_engine, run, settle


def pressure_engine(reader: FakeBacking | None = None) -> ReadEngine:
    return make_engine(reader=reader, memory_limit=32 * MIB, cache_limit=24 * MIB,
                       max_chunk=256 * 1024, inline_cached_reads=False)


@pytest.mark.parametrize("level", list(Level))
def test_each_level_caps_backing_reads_and_still_serves_right_bytes(
        src: Source, level: Level) -> None:
    slow = FakeBacking(delay_s=0.01)
    names = [f"f{i}" for i in range(16)]
    for name in names:
        src.write(name, 2 * MIB)
    engine = pressure_engine(slow)
    cap = cap_for(level, 10)

    async def body() -> None:
        engine.apply_pressure(level, cap, 0.0)

        async def reader(name: str) -> None:
            handle = src.open(name)
            offset = 0
            out = bytearray()
            while chunk := await engine.read(handle, offset, 128 * 1024):
                out += chunk
                offset += len(chunk)
            assert bytes(out) == src.data[name]
            await engine.release(handle)

        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(reader, name)

    run(engine, body, timeout=60)
    assert slow.peak <= cap
    assert engine.counters.errors == 0
    if level >= Level.HEAVY:
        assert engine.readahead.chunks == 0
    assert engine.cache.capacity_bytes == max(min(24 * MIB, 512 * 1024),
                                              int(24 * MIB * CACHE_SHARE[level]))


def test_rising_pressure_sheds_cache_and_cancels_read_ahead(
        src: Source) -> None:
    data = src.write("big", 12 * MIB)
    engine = pressure_engine(FakeBacking(delay_s=0.005))

    async def body() -> None:
        handle = src.open("big")
        offset = 0
        while offset < 6 * MIB:
            chunk = await engine.read(handle, offset, 128 * 1024)
            assert bytes(chunk) == data[offset:offset + len(chunk)]
            offset += len(chunk)
            await trio.lowlevel.checkpoint()
        await settle(engine)                                      # read-ahead done
        assert engine.cache.cached_bytes > 2 * MIB
        assert engine.readahead.chunks > 0
        engine.apply_pressure(Level.CRITICAL, 1, 90.0)
        assert engine.cache.cached_bytes <= 512 * 1024           # shed to the floor
        assert not engine.readahead.enabled
        before = engine.readahead.chunks
        while chunk := await engine.read(handle, offset, 128 * 1024):
            assert bytes(chunk) == data[offset:offset + len(chunk)]
            offset += len(chunk)
        assert offset == len(data)
        await trio.sleep(0.1)
        assert engine.readahead.chunks == before                  # none while critical
        engine.apply_pressure(Level.NONE, 10, 0.0)
        assert engine.readahead.enabled
        assert engine.cache.capacity_bytes == 24 * MIB

    run(engine, body, timeout=60)


def test_critical_memory_use_shrinks_new_chunks(src: Source) -> None:
    src.write("big", 200 * MIB // 64)                              # a 3 MiB file: 64K class
    engine = pressure_engine()

    async def body() -> int:
        engine.apply_pressure(Level.CRITICAL, 1, 90.0)               # > 80 %: x0.5
        handle = src.open("big")
        await engine.read(handle, 1 * MIB, 4096)
        await engine.read(handle, 2 * MIB, 4096)                     # a seek: base size
        return int(engine.stream_info(handle.fh)["chunk_size"])

    assert run(engine, body) <= 32 * 1024
