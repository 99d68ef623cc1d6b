"""Read-ahead scheduling and the stream table on their own (through an
engine's parts): the window bound, what schedules nothing, cancelling on
disable and on drop."""

from __future__ import annotations

import errno
import threading

import pytest
import trio
import trio.testing

from stfs.engine import ReadEngine
from stfs.readahead import EARNED_FULL, EARNED_OUTCOMES, MAX_READAHEAD_BYTES, bdp_chunks
from stfs.streams import RATE_SAMPLES, Stream
from tests.engine.fakes import FakeBacking
from tests.engine.helpers import (
    KIB,
    MIB,
    Source,
    make_engine,
    opened,
    read_to_size,
    run,
    settle,
    wait_until,
)

CHUNK = 128 * KIB


def streaming(engine: ReadEngine, src: Source, window: int) -> Stream:
    handle = src.open("f")
    engine.open(handle)
    stream, _ = engine.streams.of(handle)
    stream.state.readahead_chunks = window
    return stream


def test_the_window_is_a_share_of_the_cache_per_stream(src: Source) -> None:
    src.write("f", 1 * MIB)
    engine = make_engine(src, cache_limit=8 * MIB)
    first = streaming(engine, src, 0)
    assert engine.readahead.max_window_chunks(first, CHUNK) == 4 * MIB // CHUNK  # half the cache
    for _ in range(3):
        streaming(engine, src, 0)
    assert engine.readahead.max_window_chunks(first, CHUNK) == 1 * MIB // CHUNK  # shared by four
    big = make_engine(src, memory_limit=256 * MIB, cache_limit=200 * MIB)
    assert big.readahead.max_window_chunks(streaming(big, src, 0),
                                           CHUNK) == MAX_READAHEAD_BYTES // CHUNK


def measured(stream: Stream, latency_s: float, rate_bps: float) -> None:
    """Give *stream* chunk reads of *latency_s* and replies at *rate_bps*."""
    for _ in range(10):
        stream.tracker.record(CHUNK, latency_s)
    for i in range(RATE_SAMPLES):
        stream.served.append((i * CHUNK / rate_bps, CHUNK))


@pytest.mark.parametrize(("latency_s", "rate_bps", "window"), [
    (0.100, 40 * MIB, 64),     # 100 ms at 40 MiB/s: 32 chunks in flight, room to double
    (0.100, 5 * MIB, 8),       # a slow reader: the product, doubled
    (0.001, 500 * MIB, 8),     # a fast disk: 4 chunks cover it
    (0.0001, 100 * MIB, 4),    # never below the floor
])
def test_the_window_covers_the_bandwidth_delay_product(
        src: Source, latency_s: float, rate_bps: float, window: int) -> None:
    src.write("f", 1 * MIB)
    engine = make_engine(src, memory_limit=256 * MIB, cache_limit=200 * MIB)
    stream = streaming(engine, src, 0)
    assert bdp_chunks(stream, CHUNK) is None                       # nothing measured yet
    measured(stream, latency_s, rate_bps)
    assert engine.readahead.max_window_chunks(stream, CHUNK) == min(window, 128)


def test_a_window_is_fetched_once_and_disabling_schedules_nothing(src: Source) -> None:
    data = src.write("f", 8 * MIB)
    fake = FakeBacking()
    engine = make_engine(src, reader=fake)

    async def body() -> list[int]:
        stream = streaming(engine, src, 4)
        engine.readahead.schedule(stream, 0, CHUNK)
        engine.readahead.schedule(stream, 0, CHUNK)            # covered: nothing more
        await wait_until(lambda: engine.readahead.chunks == 4)
        engine.readahead.set_enabled(False)
        engine.readahead.schedule(stream, 4 * CHUNK, CHUNK)
        await trio.testing.wait_all_tasks_blocked()
        found = engine.cache.lookup(stream.handle.identity, 3 * CHUNK, -1)
        assert found is not None and bytes(found[1]) == data[3 * CHUNK:4 * CHUNK]
        return fake.offsets

    assert sorted(run(engine, body)) == [0, CHUNK, 2 * CHUNK, 3 * CHUNK]
    assert engine.readahead.statistics().chunks == 4


def test_disabling_and_dropping_cancel_queued_read_ahead(src: Source) -> None:
    src.write("f", 8 * MIB)
    fake = FakeBacking()
    fake.arm()
    engine = make_engine(src, reader=fake, max_streams=1)      # one read at a time

    async def body() -> None:
        stream = streaming(engine, src, 4)
        engine.readahead.schedule(stream, 0, CHUNK)
        await wait_until(lambda: fake.held == 1 and len(stream.readahead_scopes) == 4)
        engine.readahead.set_enabled(False)
        fake.release()
        await wait_until(lambda: stream.readahead_bytes == 0)
        assert len(fake.calls) == 1               # the one in its thread; none queued ran
        engine.readahead.set_enabled(True)
        other = streaming(engine, src, 4)
        fake.arm()
        engine.readahead.schedule(other, 4 * MIB, CHUNK)
        await wait_until(lambda: fake.held == 2 and len(other.readahead_scopes) == 4)
        assert engine.streams.drop(other.handle.fh)
        assert engine.streams.get(other.handle.fh) is None
        fake.release()
        await wait_until(lambda: other.readahead_bytes == 0)
        assert len(fake.calls) == 2

    run(engine, body)
    assert engine.budget.speculative_bytes == 0 and not engine.resources.counts().get(
        "readahead")


def test_a_lone_stream_reads_ahead_in_every_slot_and_leaves_some_once_others_open(
        src: Source) -> None:
    """Read-ahead keeps a slot free for each other stream's demand reads (up to
    DEMAND_RESERVE); a lone stream's demand reads are its own read-ahead,
    promoted, so it needs none."""
    src.write("f", 8 * MIB)
    fake = FakeBacking()
    fake.arm()
    engine = make_engine(src, reader=fake, max_streams=4)

    async def body() -> None:
        alone = streaming(engine, src, 8)
        engine.readahead.schedule(alone, 0, CHUNK)
        await wait_until(lambda: fake.held == 4)      # held: reads that came to the gate
        fake.release()
        await wait_until(lambda: alone.readahead_bytes == 0)
        fake.arm()
        streaming(engine, src, 0)                     # two more streams open
        streaming(engine, src, 0)
        engine.readahead.schedule(alone, 8 * CHUNK, CHUNK)
        await wait_until(lambda: fake.held == 4 + 2)
        await trio.sleep(0.05)
        assert fake.held == 4 + 2 and engine.reads.waiting() == 6
        fake.release()

    run(engine, body)
    assert fake.peak == 4


def test_a_reader_waiting_for_read_ahead_still_queued_makes_it_a_demand_read(
        src: Source) -> None:
    src.write("f", 8 * MIB)
    src.write("g", 8 * MIB)
    fake = FakeBacking()
    fake.arm()
    engine = make_engine(src, reader=fake, max_streams=1)      # one read at a time

    async def body() -> None:
        other = streaming(engine, src, 3)
        engine.readahead.schedule(other, 0, CHUNK)             # f: one held, two queued
        await wait_until(lambda: fake.held == 1 and engine.reads.waiting() == 2)
        handle = src.open("g")
        engine.open(handle)
        reader, _ = engine.streams.of(handle)
        reader.state.readahead_chunks = 1
        engine.readahead.schedule(reader, 0, 2 * CHUNK)        # g: queued last
        await wait_until(lambda: engine.reads.waiting() == 3)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.read, handle, 0, CHUNK)  # waits for g's chunk
            await trio.testing.wait_all_tasks_blocked()
            fake.release()

    run(engine, body)
    # g's chunk (its size tells it apart) was read right after f's first, before
    # f's two queued ahead of it (which may not have run when the engine closed).
    assert fake.calls[:2] == [(0, CHUNK), (0, 2 * CHUNK)]


def test_read_ahead_takes_read_slots_in_file_order(src: Source) -> None:
    """Tasks started together run in any order (trio shuffles them); read-ahead
    must still read the chunk the reader needs next first."""
    src.write("f", 8 * MIB)
    fake = FakeBacking(delay_s=0.002)
    engine = make_engine(src, reader=fake, max_streams=1)      # one read at a time

    async def body() -> None:
        stream = streaming(engine, src, 6)
        for batch in range(6):  # each batch a new draw of trio's order
            engine.readahead.schedule(stream, batch * 6 * CHUNK, CHUNK)
            await wait_until(lambda: stream.readahead_bytes == 0)

    run(engine, body)
    assert fake.offsets == list(range(0, 36 * CHUNK, CHUNK))


def test_a_request_schedules_read_ahead_before_its_own_chunk_arrives(src: Source) -> None:
    """On a network store the next chunks' reads overlap the current one's."""
    src.write("f", 8 * MIB)
    fake = FakeBacking(local=False)
    fake.arm()
    engine = make_engine(src, reader=fake, max_streams=8)

    async def body() -> None:
        handle = src.open("f")
        engine.open(handle)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.read, handle, 0, 1 * MIB)   # a first big read
            await wait_until(lambda: fake.held >= 2)              # its chunk and the next
            assert sorted(fake.offsets)[:2] == [0, 1 * MIB]
            fake.release()

    run(engine, body)


def test_what_read_ahead_earns_is_counted_and_cuts_windows_when_low(src: Source) -> None:
    """Chunks read ahead are used by replies or wasted by a seek or a close. When
    programs keep reading a file's head and leaving, windows shrink and a first
    request no longer starts read-ahead; whole-file readers earn it back."""
    fake = FakeBacking(local=False)                # a network store: read-ahead starts early
    engine = make_engine(src, reader=fake)
    ahead = engine.readahead
    files = iter(range(1000))

    async def read(whole: bool) -> None:
        name = f"f{next(files)}"                   # a new file: nothing of it cached
        data = src.write(name, 8 * MIB)
        handle = src.open(name)
        engine.open(handle)
        if whole:
            assert await read_to_size(engine, handle, MIB) == data
        else:
            for offset in (0, MIB, 2 * MIB):
                assert bytes(await engine.read(handle, offset, MIB)) == \
                    data[offset:offset + MIB]
        await settle(engine)
        await engine.release(handle)

    async def body() -> None:
        await read(whole=True)
        assert ahead.wasted == 0 and ahead.used > 0 and ahead.earned() == 1.0
        used = ahead.used
        while len(ahead._outcomes) < EARNED_OUTCOMES or ahead.earns_in_full():
            await read(whole=False)
        assert ahead.wasted > 0 and ahead.statistics().earned < EARNED_FULL
        # A first big request at offset 0 reads nothing ahead now...
        src.write("g", 8 * MIB)
        handle = src.open("g")
        stream = opened(engine, handle)
        calls = len(fake.calls)
        await engine.read(handle, 0, MIB)
        await settle(engine)
        assert stream.state.readahead_chunks == 0 and len(fake.calls) == calls + 1
        # ...and a sequential stream's window is cut (at least one chunk stays).
        assert 1 <= ahead.max_window_chunks(stream, MIB) < MAX_READAHEAD_BYTES // MIB
        await engine.release(handle)
        while not ahead.earns_in_full():
            await read(whole=True)
        assert ahead.used > used

    run(engine, body)


def test_a_reader_waiting_on_a_failed_read_ahead_reads_for_itself(src: Source) -> None:
    """Read-ahead is tried once: its transient error must not reach the reader
    whose request waited for it; that request reads the chunk again, with retries."""
    data = src.write("f", 4 * MIB)
    gate = threading.Event()
    fake = FakeBacking(errnos=[errno.EIO], before=lambda _index: gate.wait(5), local=False)
    engine = make_engine(src, reader=fake)

    async def body() -> bytes:
        stream = streaming(engine, src, 1)
        engine.readahead.schedule(stream, 0, CHUNK)            # the read that will fail
        await wait_until(lambda: len(fake.calls) == 1)
        async with trio.open_nursery() as nursery:
            got: list[bytes] = []

            async def reader() -> None:
                got.append(bytes(await engine.read(stream.handle, 0, CHUNK)))

            nursery.start_soon(reader)
            await wait_until(lambda: engine.counters.active_reads == 1)
            await trio.testing.wait_all_tasks_blocked()         # waiting on the flight
            gate.set()
        return got[0]

    assert run(engine, body) == data[:CHUNK]
    assert engine.counters.errors == 0 and len(fake.calls) == 2
