"""ReadEngine end to end without FUSE: real files in a temporary SOURCE, trio tasks
as the kernel's requests, and the engine's own figures (backing reads, read-ahead,
cache hits, budget peak) as the evidence."""

from __future__ import annotations

import errno
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from stfs.engine import ReadEngine
from stfs.handles import OpenFile
from tests.engine.fakes import FakeBacking
from tests.engine.helpers import (
    KERNEL_REQUEST,
    KIB,
    LARGE_REQUEST,
    MIB,
    Source,
    make_engine,
    read_all,
    read_to_size,
    run,
    wait_until,
)
from tests.pagecache import pin

# -- correctness over real files ------------------------------------------------------

SIZES = [0, 1, 4095, 4096, 700 * KIB, 1 * MIB - 1, 1 * MIB, 1 * MIB + 1, 3 * MIB + 17,
         20 * MIB]


@pytest.mark.parametrize("request_size", [KERNEL_REQUEST, LARGE_REQUEST, 4096])
def test_sequential_reads_return_every_file_exactly(src: Source, request_size: int) -> None:
    for size in SIZES:
        src.write(f"f{size}", size)
    engine = make_engine()

    async def body() -> None:
        for size in SIZES:
            if request_size == 4096 and size > 3 * MIB + 17:
                continue  # 5120 requests of 4K: covered by the random test instead
            handle = src.open(f"f{size}")
            got = await read_all(engine, handle, request_size)
            assert len(got) == size
            assert got == src.data[f"f{size}"], size
            assert bytes(await engine.read(handle, size, request_size)) == b""
            assert bytes(await engine.read(handle, size + 12345, request_size)) == b""
            await engine.release(handle)

    run(engine, body)
    assert engine.counters.errors == 0


def test_a_second_pass_over_a_cached_file_is_still_exact(src: Source) -> None:
    data = src.write("f", 3 * MIB + 17)
    engine = make_engine()

    async def body() -> None:
        for request in (KERNEL_REQUEST, LARGE_REQUEST, 64 * KIB + 3):
            handle = src.open("f")
            assert await read_all(engine, handle, request) == data
            await engine.release(handle)

    run(engine, body)
    assert engine.counters.cache_hits > 0


def boundary_offsets(size: int) -> list[int]:
    """Offsets right at, before and after the chunk boundaries the engine may use."""
    out = []
    for unit in (4 * KIB, 32 * KIB, 64 * KIB, 128 * KIB, 256 * KIB, 1 * MIB):
        for k in range(1, min(size // unit, 6) + 1):
            out += [k * unit - 1, k * unit, k * unit + 1]
    return [o for o in out if o <= size + 1]


@pytest.mark.parametrize("config", ["roomy", "tiny"])
def test_random_offsets_and_sizes_return_exact_bytes(src: Source, config: str) -> None:
    names = {}
    for size in (4095, 700 * KIB, 1 * MIB + 1, 3 * MIB + 17, 20 * MIB):
        names[f"r{size}"] = src.write(f"r{size}", size)
    if config == "roomy":
        engine = make_engine()
    else:
        engine = make_engine(memory_limit=2 * MIB, cache_limit=1 * MIB, max_streams=4,
                             max_chunk=256 * KIB)
    rng = random.Random(20240611)

    async def body() -> int:
        handles = {name: [src.open(name) for _ in range(2)] for name in names}
        checked = 0
        for name, data in names.items():
            size = len(data)
            offsets = boundary_offsets(size) + [rng.randrange(0, size + 1) for _ in range(40)]
            offsets += [size - 1, size, size + 1, size + 5 * MIB]
            for offset in offsets:
                offset = max(0, offset)
                length = rng.choice([1, 7, 4096, 4097, 65535, 128 * KIB, 200_000,
                                     1 * MIB, 1 * MIB + 3, rng.randrange(1, 1_500_000)])
                handle = rng.choice(handles[name])
                got = await engine.read(handle, offset, length)
                assert bytes(got) == data[offset:offset + length], (name, offset, length)
                checked += 1
        return checked

    assert run(engine, body, timeout=60) > 200
    assert engine.counters.errors == 0
    assert engine.budget.peak_held_bytes <= engine.budget.limit_bytes


def test_replies_stay_intact_after_later_reads_evict_and_reuse_their_chunks(
        src: Source) -> None:
    """A reply may be a view of a cached chunk: evicting (or recycling) that chunk
    must never change bytes already handed out."""
    data = src.write("f", 6 * MIB + 5)
    engine = make_engine(memory_limit=2 * MIB, cache_limit=1 * MIB, max_chunk=256 * KIB)

    async def body() -> None:
        kept = []
        for request in (4096, KERNEL_REQUEST, 100_000, 4096):
            handle = src.open("f")
            offset = 0
            n = 0
            while offset < len(data):
                got = await engine.read(handle, offset, request)
                n += 1
                if n % 3 == 0:       # some replies are still held (being written) ...
                    kept.append((offset, got))
                offset += len(got)   # ... the others are dropped, their chunks reusable
                await trio.lowlevel.checkpoint()
            await engine.release(handle)
        for offset, got in kept:
            assert bytes(got) == data[offset:offset + len(got)], offset

    run(engine, body)
    pool = getattr(engine, "pool", None)
    if pool is not None:
        assert pool.reused > 0       # buffers really were recycled meanwhile


# -- memory ceiling under concurrency ---------------------------------------------------

CONCURRENT_FILES = [("a", 3 * MIB + 17), ("b", 700 * KIB), ("c", 2 * MIB), ("d", 5 * MIB + 3),
                    ("e", 1 * MIB + 1), ("f", 4095)]


def concurrent_round(src: Source, files: dict[str, bytes], request_size: int, limit: int,
                     sequential: int = 24, scattered: int = 8) -> ReadEngine:
    """*sequential* + *scattered* readers at once against a budget of *limit* bytes;
    every reservation is checked against the limit as it is taken."""
    engine = make_engine(memory_limit=limit, cache_limit=limit // 2, max_streams=4,
                         max_chunk=256 * KIB)
    over: list[int] = []
    original_take = engine.budget._take

    def checked_take(n: int) -> None:
        original_take(n)
        if engine.budget.held_bytes > limit:
            over.append(engine.budget.held_bytes)

    engine.budget._take = checked_take  # type: ignore[method-assign]
    names = sorted(files)

    async def sequential_reader(i: int) -> None:
        name = names[i % len(names)]
        handle = src.open(name)
        assert await read_all(engine, handle, request_size) == files[name], name
        await engine.release(handle)

    async def random_reader(i: int) -> None:
        rng = random.Random(i)
        name = names[i % len(names)]
        handle = src.open(name)
        data = files[name]
        for _ in range(15):
            offset = rng.randrange(0, len(data) + 1)
            got = await engine.read(handle, offset, request_size)
            assert bytes(got) == data[offset:offset + request_size], (name, offset)
            await trio.lowlevel.checkpoint()
        await engine.release(handle)

    async def body() -> None:
        async def watchdog() -> None:
            """Fail fast (with the state) when no read completes for 10 s: a deadlock
            (a loaded machine can stall a read for a second or two, not for ten)."""
            last, still = -1, 0.0
            while True:
                await trio.sleep(0.25)
                reads = engine.counters.reads
                still = still + 0.25 if reads == last else 0.0
                last = reads
                if still >= 10:
                    raise AssertionError(
                        f"no read completed for 10 s: held={engine.budget.held_bytes} "
                        f"cached={engine.cache.cached_bytes} waiting={engine.budget.waiting} "
                        f"active_reads={engine.counters.active_reads} reads={reads}")

        async with trio.open_nursery() as outer:
            outer.start_soon(watchdog)
            async with trio.open_nursery() as nursery:
                for i in range(sequential):
                    nursery.start_soon(sequential_reader, i)
                for i in range(scattered):
                    nursery.start_soon(random_reader, i)
            outer.cancel_scope.cancel()

    run(engine, body, timeout=30)
    assert over == []
    assert engine.budget.peak_held_bytes <= limit
    return engine


@pytest.mark.parametrize("request_size", [KERNEL_REQUEST, LARGE_REQUEST])
def test_many_concurrent_readers_under_a_tiny_limit_are_exact_and_never_exceed_it(
        src: Source, request_size: int) -> None:
    """32 readers (sequential and scattered) against memory_limit=2 MiB. Trio
    shuffles its run queue, so the interleaving differs per round: several
    rounds make a hold-and-wait deadlock show up reliably."""
    files = {name: src.write(name, size) for name, size in CONCURRENT_FILES}
    limit = 2 * MIB
    for _round in range(4):
        engine = concurrent_round(src, files, request_size, limit)
        assert engine.budget.peak_held_bytes > limit // 2   # the limit was contended
        assert engine.counters.errors == 0
        assert engine.budget.held_bytes == engine.cache.cached_bytes  # nothing in flight


def test_a_read_past_end_of_file_does_not_leave_the_cache_unable_to_make_room(
        src: Source) -> None:
    """A read past EOF caches an empty chunk. Later, one reader whose request spans
    chunks fills the budget (cache + reply buffer) and needs the cache to give
    room back: it must get it, not wait forever."""
    data = src.write("big", 20 * MIB)
    engine = make_engine(memory_limit=2 * MIB, cache_limit=1 * MIB, max_streams=4,
                         max_chunk=256 * KIB)

    async def body() -> None:
        handle = src.open("big")
        assert bytes(await engine.read(handle, len(data) + 5 * MIB, 4096)) == b""
        for k in range(1, 8):                                  # random reads fill the cache
            offset = k * MIB + 1000
            assert bytes(await engine.read(handle, offset, 4096)) == data[offset:offset + 4096]
        offset = 10 * MIB + 5
        got = await engine.read(handle, offset, 1 * MIB)       # spans chunks: assembled
        assert bytes(got) == data[offset:offset + 1 * MIB]

    run(engine, body, timeout=30)                    # a hang, not a slow machine
    assert engine.budget.held_bytes == engine.cache.cached_bytes


# -- single flight ----------------------------------------------------------------

@pytest.mark.parametrize("backing", ["page-cache", "slow-thread"])
def test_concurrent_readers_of_one_missing_chunk_cause_one_backing_read(
        src: Source, monkeypatch: pytest.MonkeyPatch, backing: str) -> None:
    data = src.write("big", 20 * MIB)
    engine = make_engine(reader=FakeBacking(delay_s=0.05) if backing == "slow-thread" else None)
    offset = 5 * MIB + 123

    async def body() -> None:
        handles = [src.open("big") for _ in range(16)]

        async def reader(handle: OpenFile) -> None:
            got = await engine.read(handle, offset, 4096)
            assert bytes(got) == data[offset:offset + 4096]

        async with trio.open_nursery() as nursery:
            for handle in handles:
                nursery.start_soon(reader, handle)

    run(engine, body)
    assert engine.reads.reads == 1
    assert engine.counters.cache_misses == 1


def test_concurrent_readers_of_one_small_file_cause_one_backing_read(
        src: Source, monkeypatch: pytest.MonkeyPatch) -> None:
    data = src.write("small", 700 * KIB)
    engine = make_engine(reader=FakeBacking(delay_s=0.05))

    async def body() -> None:
        async def reader(i: int) -> None:
            handle = src.open("small")
            offset = (i * 37 * KIB) % len(data)
            got = await engine.read(handle, offset, 4096)
            assert bytes(got) == data[offset:offset + 4096]

        async with trio.open_nursery() as nursery:
            for i in range(16):
                nursery.start_soon(reader, i)

    run(engine, body)
    assert engine.reads.reads == 1


def test_concurrent_kernel_sized_first_reads_share_backing_reads(
        src: Source, monkeypatch: pytest.MonkeyPatch) -> None:
    """N programs opening one file and issuing the same first 128K request at
    offset 0 cause exactly the backing reads a single program causes."""
    data = src.write("f", 3 * MIB + 17)

    def backing_reads_for(readers: int) -> int:
        engine = make_engine(reader=FakeBacking(delay_s=0.02))

        async def body() -> None:
            async def reader() -> None:
                handle = src.open("f")
                got = await engine.read(handle, 0, KERNEL_REQUEST)
                assert bytes(got) == data[:KERNEL_REQUEST]

            async with trio.open_nursery() as nursery:
                for _ in range(readers):
                    nursery.start_soon(reader)

        run(engine, body)
        return engine.reads.reads

    alone = backing_reads_for(1)
    assert backing_reads_for(8) == alone


# -- streaming trigger ---------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 4095, 4096, 700 * KIB, 1 * MIB - 1])
def test_a_file_under_1_mib_is_read_whole_in_one_backing_read_even_in_4k_pieces(
        src: Source, size: int) -> None:
    data = src.write("small", size)
    engine = make_engine()

    async def body() -> None:
        handle = src.open("small")
        assert await read_to_size(engine, handle, 4096) == data
        # random 4K pieces from a second handle: still no new backing read
        other = src.open("small")
        rng = random.Random(size)
        for _ in range(50):
            offset = rng.randrange(0, size)
            assert bytes(await engine.read(other, offset, 4096)) == data[offset:offset + 4096]

    run(engine, body)
    assert engine.reads.reads == 1
    assert engine.readahead.chunks == 0


@pytest.mark.parametrize("size", [1 * MIB, 1 * MIB + 1, 3 * MIB + 17])
def test_a_file_of_1_mib_or_more_streams_chunk_by_chunk(src: Source, size: int) -> None:
    data = src.write("f", size)
    engine = make_engine()

    async def body() -> dict[int, int]:
        handle = src.open("f")
        assert bytes(await engine.read(handle, 0, 4096)) == data[:4096]
        first = dict(engine.reads.sizes)
        assert await read_all(engine, handle, KERNEL_REQUEST) == data
        return first

    first = run(engine, body)
    assert max(first) < size           # the first backing read did not take the whole file
    assert engine.reads.reads > 1


# -- streams: growth and read-ahead ----------------------------------------------------

def test_a_sequential_stream_grows_its_chunks_and_read_ahead_feeds_later_reads(
        src: Source) -> None:
    data = src.write("big", 20 * MIB)
    engine = make_engine(inline_cached_reads=False)   # reads that wait, as from a device
    counters = engine.counters

    async def body() -> tuple[list[int], int, int]:
        handle = src.open("big")
        sizes = []
        offset = 0
        for _ in range(8):
            got = await engine.read(handle, offset, KERNEL_REQUEST)
            assert bytes(got) == data[offset:offset + KERNEL_REQUEST]
            offset += len(got)
            await trio.lowlevel.checkpoint()
            sizes.append(engine.stream_info(handle.fh)["chunk_size"])
        assert engine.stream_info(handle.fh)["readahead_chunks"] > 0
        misses_before = counters.cache_misses
        hits_before = counters.cache_hits
        while offset < len(data):
            got = await engine.read(handle, offset, KERNEL_REQUEST)
            assert bytes(got) == data[offset:offset + KERNEL_REQUEST]
            offset += len(got)
            await trio.lowlevel.checkpoint()     # the kernel's round trip
        return sizes, counters.cache_misses - misses_before, counters.cache_hits - hits_before

    sizes, later_misses, later_hits = run(engine, body)
    assert sizes == sorted(sizes)
    assert sizes[-1] > sizes[0]
    assert sizes[-1] == 1 * MIB                     # grew to max_chunk
    assert engine.readahead.chunks > 0
    later_requests = (len(data) - 8 * KERNEL_REQUEST) // KERNEL_REQUEST
    assert later_misses == 0                        # every later request was prefetched
    assert later_hits >= later_requests
    assert engine.budget.peak_held_bytes <= engine.budget.limit_bytes


def test_a_random_access_stream_gets_no_read_ahead(src: Source) -> None:
    data = src.write("big", 20 * MIB)
    engine = make_engine()
    rng = random.Random(99)

    async def body() -> dict[str, int]:
        handle = src.open("big")
        previous = 10 * MIB
        for _ in range(60):
            offset = rng.randrange(0, len(data) - 4096)
            while abs(offset - previous) < 2 * MIB:
                offset = rng.randrange(0, len(data) - 4096)
            previous = offset
            got = await engine.read(handle, offset, 4096)
            assert bytes(got) == data[offset:offset + 4096]
            await trio.testing.wait_all_tasks_blocked()
            assert engine.stream_info(handle.fh)["readahead_chunks"] == 0
        await trio.sleep(0.05)
        return engine.stream_info(handle.fh)

    info = run(engine, body)
    assert engine.readahead.chunks == 0
    assert engine.budget.refused_speculative == 0     # none was even attempted
    assert info["chunk_size"] <= 256 * KIB            # no growth on random access
    assert engine.reads.reads <= 60


def start_read_ahead(engine: ReadEngine, handle: OpenFile, data: bytes,
                     reads: int = 4) -> Callable[[], Awaitable[int]]:
    async def go() -> int:
        offset = 0
        for _ in range(reads):
            got = await engine.read(handle, offset, KERNEL_REQUEST)
            assert bytes(got) == data[offset:offset + KERNEL_REQUEST]
            offset += len(got)
        return offset
    return go


def test_release_cancels_read_ahead_and_forgets_the_stream(
        src: Source, monkeypatch: pytest.MonkeyPatch) -> None:
    data = src.write("big", 20 * MIB)
    slow = FakeBacking()
    engine = make_engine(reader=slow, max_streams=2)              # one read-ahead at a time

    async def body() -> tuple[int, int]:
        handle = src.open("big")
        await start_read_ahead(engine, handle, data)()
        slow.armed = True           # from here on only read-ahead reads the backing
        await wait_until(lambda: slow.held >= 1)      # one read-ahead in a worker thread
        await trio.testing.wait_all_tasks_blocked()
        assert engine.stream_info(handle.fh)["readahead_chunks"] > 0
        assert engine.budget.speculative_bytes > 0
        calls_at_release = len(slow.calls)
        in_thread = slow.held
        await engine.release(handle)
        assert engine.stream_info(handle.fh) == {}
        slow.release()
        await wait_until(lambda: engine.budget.speculative_bytes == 0)
        await trio.sleep(0.1)
        await trio.testing.wait_all_tasks_blocked()
        return len(slow.calls) - calls_at_release, in_thread

    started_after_release, in_thread = run(engine, body)
    assert started_after_release == 0                 # queued read-ahead never ran
    assert in_thread >= 1
    assert engine.budget.held_bytes == engine.cache.cached_bytes


def test_a_seek_cancels_pending_read_ahead_and_closes_the_window(
        src: Source, monkeypatch: pytest.MonkeyPatch) -> None:
    data = src.write("big", 20 * MIB)
    slow = FakeBacking()
    slow.hold_before = lambda offset, index: slow.armed and offset < 10 * MIB
    engine = make_engine(reader=slow, max_streams=2)

    async def body() -> int:
        handle = src.open("big")
        await start_read_ahead(engine, handle, data)()
        slow.armed = True           # read-ahead from here on is held in its thread
        await wait_until(lambda: slow.held >= 1)
        await trio.testing.wait_all_tasks_blocked()
        calls = len(slow.calls)
        offset = 15 * MIB + 7
        got: list[bytes] = []

        async def seek() -> None:
            got.append(bytes(await engine.read(handle, offset, 4096)))  # not held itself

        async with trio.open_nursery() as nursery:
            nursery.start_soon(seek)
            # The seek closes the window at once; its own read may still need a slot
            # from the read-ahead already running (a lone stream's read-ahead may hold
            # them all), which the test lets go only now, never by a hold timing out.
            await wait_until(lambda: engine.stream_info(handle.fh)["readahead_chunks"] == 0)
            slow.release()
        assert got == [data[offset:offset + 4096]]
        assert engine.stream_info(handle.fh)["readahead_chunks"] == 0
        await wait_until(lambda: engine.budget.speculative_bytes == 0)
        await trio.sleep(0.1)
        return len(slow.calls) - calls

    assert run(engine, body) == 1                     # only the seek's own read
    assert engine.budget.held_bytes == engine.cache.cached_bytes


def test_demand_read_waiting_on_a_cancelled_read_ahead_flight_still_gets_its_bytes(
        src: Source, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: the read-ahead flight a reader waits on is cancelled by a
    release of the stream that started it. The reader must neither see the
    read-ahead task's Cancelled nor wrong bytes: it reads the chunk itself."""
    data = src.write("big", 20 * MIB)
    slow = FakeBacking()
    engine = make_engine(reader=slow, max_streams=2)              # read-ahead limiter of one

    async def body() -> dict[int, Any]:
        streamer = src.open("big")
        end = await start_read_ahead(engine, streamer, data, reads=4)()
        slow.armed = True        # every backing read from here on waits for the gate
        await wait_until(lambda: slow.held >= 1)     # a read-ahead in its worker thread
        await trio.testing.wait_all_tasks_blocked()  # others queued behind the limiter
        assert engine.budget.speculative_bytes > 0
        results: dict[int, Any] = {}

        async def reader(offset: int) -> None:
            handle = src.open("big")
            try:
                got = await engine.read(handle, offset, 4096)
                results[offset] = bytes(got) == data[offset:offset + 4096]
            except BaseException as exc:  # recorded, then re-raised
                results[offset] = repr(exc)
                raise

        async with trio.open_nursery() as nursery:
            # readers inside every chunk the read-ahead may be fetching
            for offset in range(end, end + 4 * MIB, 64 * KIB + 1000):
                nursery.start_soon(reader, offset)
            await trio.testing.wait_all_tasks_blocked()
            await engine.release(streamer)            # cancels the read-ahead flights
            await trio.testing.wait_all_tasks_blocked()
            slow.release()
        return results

    results = run(engine, body)
    assert results and all(v is True for v in results.values()), results
    assert engine.counters.errors == 0
    assert engine.budget.held_bytes == engine.cache.cached_bytes


# -- a file that changes under an open handle ---------------------------------------------

def test_file_changed_between_reads_fails_then_a_read_from_zero_returns_the_new_bytes_whole(
        src: Source) -> None:
    old = src.write("f", 3 * MIB + 17, seed=1)
    engine = make_engine()

    async def body() -> None:
        handle = src.open("f")
        offset = 1 * MIB
        assert bytes(await engine.read(handle, offset, 4096)) == old[offset:offset + 4096]
        assert bytes(await engine.read(handle, 2 * MIB, 4096)) == old[2 * MIB:2 * MIB + 4096]
        before = handle.identity
        new = src.rewrite_in_place("f", seed=2)
        assert src.identity("f") != before
        start = offset + 1000
        with pytest.raises(OSError) as caught:   # bytes this handle was served changed
            await engine.read(handle, start, 256 * KIB)
        assert caught.value.errno == errno.EIO
        assert bytes(await engine.read(handle, 0, 4096)) == new[:4096]
        # starts inside the chunk cached from the old version, ends beyond it
        got = bytes(await engine.read(handle, start, 256 * KIB))
        assert got == new[start:start + 256 * KIB]
        assert got != old[start:start + 256 * KIB]
        assert handle.identity == src.identity("f")
        # every later read is of the new version, including offsets cached from the old
        assert bytes(await engine.read(handle, 2 * MIB, 4096)) == new[2 * MIB:2 * MIB + 4096]
        assert await read_all(engine, handle, KERNEL_REQUEST) == new
        # and a new handle of the changed file too
        assert await read_all(engine, src.open("f"), LARGE_REQUEST) == new

    run(engine, body)
    assert engine.counters.errors == 1 and engine.counters.changed_files == 1


def test_no_read_ahead_while_source_has_the_bytes_in_its_page_cache(src: Source) -> None:
    """Copies from SOURCE's page cache are as quick as read-ahead would make them:
    read-ahead would only add work (tasks, reservations, evictions)."""
    data = src.write("big", 8 * MIB)
    pin(src.root / "big")
    engine = make_engine()

    async def body() -> bytes:
        return await read_all(engine, src.open("big"), KERNEL_REQUEST)

    assert run(engine, body) == data
    assert engine.reads.inline_reads > 0 and engine.readahead.chunks == 0


def test_small_file_changed_between_reads_is_read_again_whole(src: Source) -> None:
    old = src.write("s", 700 * KIB, seed=1)
    engine = make_engine()

    async def body() -> None:
        handle = src.open("s")
        assert bytes(await engine.read(handle, 0, 4096)) == old[:4096]
        new = src.rewrite_in_place("s", seed=2)
        handle.identity = src.identity("s")   # what View.getattr does on a change
        assert await read_to_size(engine, handle, 4096) == new

    run(engine, body)
    assert engine.reads.reads == 2


def test_file_changed_during_a_multi_chunk_read_never_yields_a_mix_of_versions(
        src: Source, monkeypatch: pytest.MonkeyPatch) -> None:
    """One request spanning several chunks: the file is rewritten while the second
    chunk's backing read is in progress (its bytes are of the old version) and
    the handle learns the new identity meanwhile, as View.getattr does. The reply
    must be one version, old or new, never old bytes followed by new ones."""
    old = src.write("f", 3 * MIB + 17, seed=1)
    slow = FakeBacking()
    slow.hold_after = lambda offset, index: index == 2
    engine = make_engine(reader=slow, max_chunk=256 * KIB)    # the request spans chunks
    start, size = 1 * MIB + 32 * KIB, 1 * MIB

    async def body() -> tuple[bytes, bytes]:
        handle = src.open("f")
        box: list[bytes] = []

        async def reader() -> None:
            box.append(bytes(await engine.read(handle, start, size)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await wait_until(lambda: slow.held >= 1)
            new = src.rewrite_in_place("f", seed=2)
            handle.identity = src.identity("f")      # View.getattr retargets handles
            slow.release()
        return box[0], new

    got, new = run(engine, body)
    assert len(got) == size
    old_part, new_part = old[start:start + size], new[start:start + size]
    assert got in (old_part, new_part), (
        f"mixed reply: first {sum(1 for a, b in zip(got, old_part) if a == b)} bytes "
        "match the old version")
