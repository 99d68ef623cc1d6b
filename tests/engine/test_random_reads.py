"""Wide chunks for random reads: the policy alone, then through an engine."""

from __future__ import annotations

import random

from stfs.random_reads import HITS_MIN, MIN_SAMPLES, WideChunks
from tests.engine.fakes import FakeBacking
from tests.engine.helpers import KIB, MIB, Source, make_engine, run

NARROW, WIDE = 4 * KIB, 128 * KIB


def timed(policy: WideChunks, size: int, seconds: float, n: int = MIN_SAMPLES) -> None:
    for _ in range(n):
        policy.record_read(size, seconds)


def test_untimed_sizes_are_timed_first() -> None:
    policy = WideChunks()
    assert policy.chunk(NARROW, WIDE) == WIDE           # the wide size is timed first
    timed(policy, WIDE, 0.005)
    assert policy.chunk(NARROW, WIDE) == NARROW         # then the request's size
    timed(policy, NARROW, 0.005)
    assert policy.chunk(NARROW, WIDE) == WIDE
    assert policy.chunk(WIDE, NARROW) == WIDE           # never narrower than the request


def test_wide_only_while_it_costs_no_more_on_average() -> None:
    latency_bound = WideChunks()                        # a 5 ms network store
    timed(latency_bound, NARROW, 0.0050)
    timed(latency_bound, WIDE, 0.0051)
    assert latency_bound.chunk(NARROW, WIDE) == WIDE
    disk = WideChunks()                                 # a device that pays per byte
    timed(disk, NARROW, 0.0001)
    timed(disk, WIDE, 0.0004)
    assert disk.chunk(NARROW, WIDE) == NARROW
    for _ in range(HITS_MIN):                           # unless hits pay for it: 4x the
        disk.record_random(hit=True)                    # cost, 4 of 5 requests answered
        disk.record_random(hit=True)
        disk.record_random(hit=True)
        disk.record_random(hit=True)
        disk.record_random(hit=False)
    assert disk.hit_rate() >= 0.75
    assert disk.chunk(NARROW, WIDE) == WIDE


def test_what_wide_chunks_would_earn_is_counted_while_reading_narrow() -> None:
    """Requests that keep falling in wide chunks recent requests fell in would
    find them cached: that alone turns a narrow policy wide."""
    policy = WideChunks(cache_capacity=lambda: 8 * WIDE)
    timed(policy, NARROW, 0.0050)
    timed(policy, WIDE, 0.0056)                         # wide costs 12 % more per read
    assert policy.chunk(NARROW, WIDE) == NARROW
    rng = random.Random(3)
    for i in range(HITS_MIN):                           # each in a wide chunk of its own
        policy.record_random(False, "f", i * WIDE + rng.randrange(WIDE))
    for i in range(HITS_MIN):                           # the same offsets of another file
        policy.record_random(False, "g", i * WIDE)
    assert policy.hit_rate() == 0.0 and policy.chunk(NARROW, WIDE) == NARROW
    for _ in range(2 * HITS_MIN):                       # within 4 of them: the cache holds 8
        policy.record_random(False, "f", rng.randrange(4 * WIDE))
    assert policy.hit_rate() > 0.4 and policy.chunk(NARROW, WIDE) == WIDE


def random_pass(src: Source, local: bool) -> tuple[dict[int, int], int, int]:
    data = src.write("f", 16 * MIB)
    fake = FakeBacking(delay_s=0.002, local=local)
    engine = make_engine(src, reader=fake)
    rng = random.Random(7)

    async def body() -> None:
        handle = src.open("f")
        engine.open(handle)
        for _ in range(400):
            offset = rng.randrange(len(data) // NARROW) * NARROW
            assert bytes(await engine.read(handle, offset, NARROW)) == \
                data[offset:offset + NARROW]
        await engine.release(handle)

    run(engine, body, timeout=60)
    sizes = engine.reads.statistics().chunk_sizes
    return sizes, engine.reads.wide_chunks.widened, engine.counters.cache_hits


def test_random_reads_of_a_network_store_widen_and_hit_the_cache(src: Source) -> None:
    sizes, widened, hits = random_pass(src, local=False)
    assert widened > 300 and sizes.get(WIDE, 0) > sizes.get(NARROW, 0)
    assert hits > 50                                    # 400 reads of 128 chunks of 128K


def test_random_reads_of_a_local_device_read_just_the_request(src: Source) -> None:
    sizes, widened, hits = random_pass(src, local=True)
    assert widened == 0
    assert sizes.get(NARROW, 0) >= 350 and sizes.get(WIDE, 0) <= 1   # the first seek: base
