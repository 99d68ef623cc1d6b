"""BackingReads on its own: the concurrency cap, read-ahead's half of it, the
records it keeps, retries by policy and inline page-cache copies (a fake
reader over real files; trio's MockClock where backoff would wait)."""

from __future__ import annotations

import errno

import pytest
import trio
import trio.testing

from stfs.backing_reads import BackingReads
from stfs.chunking import StreamState
from stfs.descriptors import DescriptorTable
from stfs.handles import OpenFile
from stfs.metrics import Counters
from stfs.recovery import StreamVerifier
from stfs.streams import Stream
from tests.engine.fakes import FakeBacking
from tests.engine.helpers import KIB, MIB, Source

CHUNK = 64 * KIB


def reads_for(reader: FakeBacking, max_streams: int = 8) -> BackingReads:
    return BackingReads(reader, DescriptorTable(64, None), Counters(), max_streams=max_streams)


def stream_of(handle: OpenFile) -> Stream:
    verifier = StreamVerifier(handle.identity, lambda n: True, lambda n: None)
    return Stream(handle, StreamState(chunk_size=CHUNK), verifier)


async def read_many(reads: BackingReads, stream: Stream, count: int,
                    speculative: bool = False) -> list[bytes]:
    got: dict[int, bytes] = {}

    async def one(i: int) -> None:
        data, _ = await reads.read_chunk(stream, bytearray(CHUNK), i * CHUNK,
                                         speculative=speculative)
        got[i] = bytes(data)

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, i)
    return [got[i] for i in range(count)]


@pytest.mark.parametrize(("cap", "speculative", "bound"), [
    (3, False, 3),
    (10, True, 8),             # read-ahead leaves two reads to demand reads
    (3, True, 1),
    (1, True, 1)])
def test_the_cap_bounds_reads_in_worker_threads(src: Source, cap: int, speculative: bool,
                                                bound: int) -> None:
    data = src.write("f", 12 * CHUNK)
    fake = FakeBacking(delay_s=0.02)
    reads = reads_for(fake, max_streams=16)
    reads.set_cap(cap)
    stream = stream_of(src.open("f"))

    got = trio.run(read_many, reads, stream, 12, speculative)
    assert b"".join(got) == data
    assert 1 <= fake.peak <= bound
    assert reads.statistics().cap == cap and reads.in_flight() == 0


def test_reads_are_recorded_for_the_sizer_the_score_and_stats(src: Source) -> None:
    src.write("f", 4 * CHUNK)
    reads = reads_for(FakeBacking(delay_s=0.01))
    stream = stream_of(src.open("f"))

    trio.run(read_many, reads, stream, 4)
    stats = reads.statistics()
    assert (stats.reads, stats.inline_reads, stats.chunk_sizes) == (4, 0, {CHUNK: 4})
    assert stats.latency_ms["p50"] >= 9.0              # the device time, at least the delay
    assert [size for size, _ in reads.recent(0.0)] == [CHUNK] * 4
    assert len(stream.tracker.throughputs()) == 4 and len(stats.learned_throughput_bps) == 4


def test_a_transient_error_is_retried_after_resume_and_counted(src: Source) -> None:
    data = src.write("f", 2 * CHUNK)
    fake = FakeBacking(errnos=[errno.EIO])
    reads = reads_for(fake)
    stream = stream_of(src.open("f"))
    resumed: list[int] = []

    async def resume() -> None:
        resumed.append(len(fake.calls))

    async def main() -> bytes:
        got, _ = await reads.read_chunk(stream, bytearray(CHUNK), CHUNK, speculative=False,
                                        resume=resume)
        return bytes(got)

    assert trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0)) == data[CHUNK:]
    assert resumed == [1]                                   # after the failure, before the retry
    c = reads.counters
    assert (c.retries, c.recoveries, c.interrupted_streams) == (1, 1, 1)
    assert stream.interrupted and fake.offsets == [CHUNK, CHUNK]


def test_speculative_reads_are_never_retried(src: Source) -> None:
    src.write("f", 2 * CHUNK)
    fake = FakeBacking(errnos=[errno.EIO])
    reads = reads_for(fake)
    stream = stream_of(src.open("f"))

    async def main() -> None:
        with pytest.raises(OSError):
            await reads.read_chunk(stream, bytearray(CHUNK), 0, speculative=True)

    trio.run(main)
    assert reads.counters.retries == 0 and len(fake.calls) == 1


def test_a_memory_error_sheds_before_the_retry(src: Source) -> None:
    src.write("f", CHUNK)
    shed: list[bool] = []
    reads = BackingReads(FakeBacking(errnos=[errno.ENOMEM]), DescriptorTable(4, None),
                         Counters(), max_streams=2, shed_memory=lambda: shed.append(True))
    stream = stream_of(src.open("f"))

    async def main() -> None:
        await reads.read_chunk(stream, bytearray(CHUNK), 0, speculative=False)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert shed == [True]


def test_bytes_in_the_page_cache_are_copied_inline_without_a_thread(src: Source) -> None:
    data = src.write("f", 2 * MIB)
    fake = FakeBacking(cached=True, local=True)
    reads = reads_for(fake)
    stream = stream_of(src.open("f"))

    async def main() -> bytes:
        got, _ = await reads.read_chunk(stream, bytearray(CHUNK), 0, speculative=False)
        return bytes(got)

    assert trio.run(main) == data[:CHUNK]
    assert fake.calls == [] and reads.statistics().inline_reads == 1
    assert stream.source_cached
