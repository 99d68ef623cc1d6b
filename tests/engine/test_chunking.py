"""Chunk sizing without I/O: the seeds' numbers, table-driven.

``file_class_size``, ``memory_factor`` and ``throughput_factor`` are the seeds'
AdaptiveChunkSizer rules; ``ChunkSample``/``ChunkPerformanceTracker`` its
performance history; ``StreamState`` the per-handle part
(grow while sequential, fall back on a seek, as rclone and mountpoint-s3 do).
"""

from __future__ import annotations

import pytest

from stfs.chunking import (
    EAGER_REQUEST,
    EAGER_WINDOW,
    PAGE,
    AdaptiveChunkSizer,
    ChunkPerformanceTracker,
    ChunkSample,
    RequestPlanner,
    StreamState,
    file_class_size,
    memory_factor,
    throughput_factor,
)

KIB = 1024
MIB = 1024 * KIB
FAST = 100 * MIB  # bytes/s, well above the 5 MB/s threshold
SLOW = 1 * MIB


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# -- the seeds' rules ----------------------------------------------------------

@pytest.mark.parametrize(("file_size", "expected"), [
    (0, 32 * KIB),
    (1, 32 * KIB),
    (1 * MIB - 1, 32 * KIB),
    (1 * MIB, 64 * KIB),
    (10 * MIB - 1, 64 * KIB),
    (10 * MIB, 128 * KIB),
    (100 * MIB - 1, 128 * KIB),
    (100 * MIB, 256 * KIB),
    (50 * 1024 * MIB, 256 * KIB),
])
def test_file_class_size_switches_exactly_at_the_class_boundaries(file_size: int,
                                                                   expected: int) -> None:
    assert file_class_size(file_size) == expected


@pytest.mark.parametrize(("memory_pct", "expected"), [
    (100, 0.5),
    (81, 0.5),
    (80.01, 0.5),
    (80, 0.75),
    (61, 0.75),
    (60.01, 0.75),
    (60, 1.0),
    (50, 1.0),
    (40, 1.0),
    (39.99, 1.25),
    (39, 1.25),
    (0, 1.25),
])
def test_memory_factor_halves_above_80_shrinks_above_60_grows_below_40(memory_pct: float,
                                                                        expected: float) -> None:
    assert memory_factor(memory_pct) == expected


@pytest.mark.parametrize(("throughputs", "expected"), [
    ([], 1.0),
    ([SLOW], 1.0),
    ([SLOW, SLOW], 1.0),                      # fewer than 3 samples: no opinion
    ([SLOW, SLOW, SLOW], 1.2),
    ([FAST, FAST, FAST], 1.0),
    ([5 * MIB] * 5, 1.0),                     # exactly 5 MB/s is not "under"
    ([5 * MIB - 1] * 5, 1.2),
    ([SLOW] * 5 + [FAST] * 5, 1.0),           # only the last five count
    ([FAST] * 5 + [SLOW] * 5, 1.2),
    ([FAST, SLOW, SLOW, SLOW, SLOW, SLOW], 1.2),  # the fast one is the 6th from the end
    ([SLOW, SLOW, SLOW, SLOW, 30 * MIB], 1.0),    # (4 x 1 + 30) / 5 = 6.8 MB/s
    ([SLOW, SLOW, SLOW, SLOW, 20 * MIB], 1.2),    # (4 x 1 + 20) / 5 = 4.8 MB/s
])
def test_throughput_factor_needs_three_samples_and_averages_the_last_five(
        throughputs: list[float], expected: float) -> None:
    assert throughput_factor(throughputs) == expected


def test_throughput_factor_accepts_any_iterable() -> None:
    assert throughput_factor(iter([SLOW] * 4)) == 1.2
    assert throughput_factor(x for x in [FAST] * 4) == 1.0


@pytest.mark.parametrize(("file_size", "memory_pct", "throughputs", "expected"), [
    # class size x memory factor x throughput factor, within 4K..1M
    (512 * KIB, 50, [], 32 * KIB),
    (512 * KIB, 20, [], 40 * KIB),                       # 32K x 1.25
    (512 * KIB, 70, [], 24 * KIB),                       # 32K x 0.75
    (512 * KIB, 90, [], 16 * KIB),                       # 32K x 0.5
    (5 * MIB, 50, [], 64 * KIB),
    (5 * MIB, 50, [SLOW] * 3, round(64 * KIB * 1.2)),
    (5 * MIB, 20, [SLOW] * 3, round(64 * KIB * 1.25 * 1.2)),
    (50 * MIB, 90, [SLOW] * 5, round(128 * KIB * 0.5 * 1.2)),
    (50 * MIB, 70, [FAST] * 5, 96 * KIB),                # 128K x 0.75
    (500 * MIB, 50, [], 256 * KIB),
    (500 * MIB, 10, [SLOW] * 4, round(256 * KIB * 1.25 * 1.2)),
])
def test_base_size_multiplies_class_memory_and_throughput_factors(
        file_size: int, memory_pct: float, throughputs: list[float], expected: int) -> None:
    sizer = AdaptiveChunkSizer(4 * KIB, 1 * MIB)
    assert sizer.base_size(file_size, memory_pct, throughputs) == expected


@pytest.mark.parametrize(("min_chunk", "max_chunk", "file_size", "memory_pct", "throughputs",
                          "expected"), [
    (64 * KIB, 1 * MIB, 512 * KIB, 90, [], 64 * KIB),          # 16K raised to min
    (4 * KIB, 100 * KIB, 500 * MIB, 10, [SLOW] * 3, 100 * KIB),  # 384K lowered to max
    (4 * KIB, 16 * KIB, 5 * MIB, 50, [], 16 * KIB),
    (40 * KIB, 40 * KIB, 1, 100, [], 40 * KIB),                  # min == max
])
def test_base_size_is_clamped_to_min_and_max_chunk(min_chunk: int, max_chunk: int,
                                                   file_size: int, memory_pct: float,
                                                   throughputs: list[float],
                                                   expected: int) -> None:
    sizer = AdaptiveChunkSizer(min_chunk, max_chunk)
    assert sizer.base_size(file_size, memory_pct, throughputs) == expected


@pytest.mark.parametrize(("size", "expected"), [
    (1, 4 * KIB),
    (4 * KIB, 4 * KIB),
    (4 * KIB + 1, 4 * KIB),
    (40 * KIB, 32 * KIB),
    (64 * KIB, 64 * KIB),
    (96 * KIB, 64 * KIB),
    (round(64 * KIB * 1.25 * 1.2), 64 * KIB),
    (1 * MIB - 1, 512 * KIB),
    (1 * MIB, 1 * MIB),
    (10 * MIB, 1 * MIB),
])
def test_aligned_is_the_largest_power_of_two_not_above_the_clamped_size(size: int,
                                                                        expected: int) -> None:
    assert AdaptiveChunkSizer(4 * KIB, 1 * MIB).aligned(size) == expected


@pytest.mark.parametrize(("min_chunk", "max_chunk"), [
    (4 * KIB, 1 * MIB),
    (4 * KIB, 4 * KIB),
    (8 * KIB, 256 * KIB),
    (64 * KIB, 64 * KIB),
    (4 * KIB, 768 * KIB),          # max not a power of two
    (512, 2 * KIB),                # below the page: powers of two of the bounds themselves
])
def test_aligned_always_gives_a_power_of_two_within_the_bounds(min_chunk: int,
                                                               max_chunk: int) -> None:
    sizer = AdaptiveChunkSizer(min_chunk, max_chunk)
    for size in [0, 1, 511, 512, 1000, 4095, 4096, 5000, 40_000, 65_536, 100_000,
                 262_144, 700_000, 786_432, 1 << 20, 5 << 20]:
        got = sizer.aligned(size)
        assert is_power_of_two(got), (size, got)
        assert min_chunk <= got <= max_chunk, (size, got)
        if max_chunk >= PAGE:
            assert got >= PAGE


def test_aligned_with_an_odd_min_chunk_rounds_up_to_the_next_power_of_two_not_to_max() -> None:
    """min 5000: the nearest power of two inside the bounds is 8K, not the 1 MiB max."""
    sizer = AdaptiveChunkSizer(5000, 1 * MIB)
    assert sizer.aligned(6000) == 8 * KIB
    assert sizer.aligned(1) == 8 * KIB


@pytest.mark.parametrize(("memory_pct", "expected"), [
    (0, 1 * MIB),       # x1.25 never lifts the cap above max_chunk
    (39, 1 * MIB),
    (50, 1 * MIB),
    (60, 1 * MIB),
    (61, 512 * KIB),    # 0.75 MiB, aligned down
    (80, 512 * KIB),
    (81, 512 * KIB),    # 0.5 MiB
    (100, 512 * KIB),
])
def test_cap_shrinks_the_largest_stream_chunk_under_memory_use(memory_pct: float,
                                                               expected: int) -> None:
    assert AdaptiveChunkSizer(4 * KIB, 1 * MIB).cap(memory_pct) == expected


def test_cap_under_pressure_follows_a_non_power_of_two_max() -> None:
    sizer = AdaptiveChunkSizer(4 * KIB, 2 * MIB)
    assert sizer.cap(50) == 2 * MIB
    assert sizer.cap(70) == 1 * MIB   # 1.5 MiB aligned down
    assert sizer.cap(90) == 1 * MIB
    assert AdaptiveChunkSizer(4 * KIB, 8 * KIB).cap(90) == 4 * KIB


# -- performance history -------------------------------------------------------

def test_chunk_sample_throughput_is_bytes_per_second() -> None:
    assert ChunkSample(4 * MIB, 2.0).throughput_bps == 2 * MIB
    assert ChunkSample(4 * MIB, 0.0).throughput_bps == float("inf")


def test_tracker_keeps_only_the_last_ten_chunks() -> None:
    tracker = ChunkPerformanceTracker()
    for i in range(1, 16):
        tracker.record(i * KIB, 0.001 * i)
    assert tracker.throughputs() == pytest.approx([KIB / 0.001] * 10)
    tracker.record(2 * KIB, 0.001)
    assert tracker.throughputs()[-1] == pytest.approx(2 * KIB / 0.001)
    assert len(tracker.throughputs()) == 10


# -- per-stream state ------------------------------------------------------------

BASE = 64 * KIB
CAP = 1 * MIB
WINDOW = 8


def read_sequentially(state: StreamState, start: int, size: int, count: int,
                      cap: int = CAP, window: int = WINDOW) -> list[tuple[int, int]]:
    """Feed *count* back-to-back requests; returns (chunk_size, window) after each."""
    trace = []
    for i in range(count):
        assert state.observe(start + i * size, size, BASE, cap, window) is True
        trace.append((state.chunk_size, state.readahead_chunks))
    return trace


def test_sequential_requests_double_chunk_size_and_read_ahead_window_up_to_the_caps() -> None:
    state = StreamState(chunk_size=BASE)
    trace = read_sequentially(state, 0, 128 * KIB, 7)
    assert trace == [
        (64 * KIB, 0),           # one request proves nothing
        (128 * KIB, 1),          # second sequential: grow (never below the request) and open
        (256 * KIB, 2),
        (512 * KIB, 4),
        (1 * MIB, 8),
        (1 * MIB, 8),            # capped
        (1 * MIB, 8),
    ]
    assert state.sequential_reads == 7
    assert state.next_offset == 7 * 128 * KIB


def test_sequential_growth_never_leaves_chunk_below_request_rounded_to_power_of_two() -> None:
    state = StreamState(chunk_size=4 * KIB)
    read_sequentially(state, 0, 100 * KIB, 2)
    assert state.chunk_size == 128 * KIB     # not 8K: ceil_pow2(100K)
    state = StreamState(chunk_size=4 * KIB)
    read_sequentially(state, 0, 4 * KIB, 2)
    assert state.chunk_size == 8 * KIB       # doubling when the request is small


def test_sequential_growth_is_capped_even_for_requests_larger_than_the_cap() -> None:
    state = StreamState(chunk_size=BASE)
    read_sequentially(state, 0, 1 * MIB, 4, cap=256 * KIB, window=3)
    assert state.chunk_size == 256 * KIB
    assert state.readahead_chunks == 3


def test_a_seek_resets_chunk_size_to_base_and_closes_the_read_ahead_window() -> None:
    state = StreamState(chunk_size=BASE)
    read_sequentially(state, 0, 128 * KIB, 6)
    assert state.chunk_size == CAP and state.readahead_chunks == WINDOW
    assert state.observe(500 * MIB, 128 * KIB, BASE, CAP, WINDOW) is False
    assert state.chunk_size == BASE
    assert state.readahead_chunks == 0
    assert state.sequential_reads == 0
    assert state.next_offset == 500 * MIB + 128 * KIB
    # ... and the stream grows again from there
    assert state.observe(500 * MIB + 128 * KIB, 128 * KIB, BASE, CAP, WINDOW) is True
    assert state.observe(500 * MIB + 256 * KIB, 128 * KIB, BASE, CAP, WINDOW) is True
    assert state.chunk_size == 128 * KIB and state.readahead_chunks == 1


def test_a_seek_backwards_also_resets() -> None:
    state = StreamState(chunk_size=BASE)
    assert state.observe(100 * MIB, 128 * KIB, BASE, CAP, WINDOW) is False
    read_sequentially(state, 100 * MIB + 128 * KIB, 128 * KIB, 4)
    assert state.chunk_size > BASE and state.readahead_chunks > 0
    assert state.observe(0, 128 * KIB, BASE, CAP, WINDOW) is False
    assert (state.chunk_size, state.readahead_chunks) == (BASE, 0)


def test_reset_chunk_size_respects_the_current_cap() -> None:
    state = StreamState(chunk_size=BASE)
    state.observe(50 * MIB, 4 * KIB, 256 * KIB, 32 * KIB, WINDOW)
    assert state.chunk_size == 32 * KIB


def test_slightly_out_of_order_requests_within_the_slack_still_count_as_sequential() -> None:
    state = StreamState(chunk_size=BASE)
    read_sequentially(state, 0, 128 * KIB, 3)
    size_before = state.chunk_size
    n = state.next_offset
    # the kernel had two requests in flight: the later one arrives first ...
    assert state.observe(n + 128 * KIB, 128 * KIB, BASE, CAP, WINDOW) is True
    grown = state.chunk_size
    assert grown > size_before
    # ... then the earlier one: still sequential, and no extra growth for it
    assert state.observe(n, 128 * KIB, BASE, CAP, WINDOW) is True
    assert state.chunk_size == grown
    assert state.next_offset == n + 256 * KIB
    # a small step back inside the slack is not a seek either
    assert state.observe(n + 64 * KIB, 128 * KIB, BASE, CAP, WINDOW) is True
    assert state.chunk_size == grown


def test_a_jump_beyond_the_slack_is_a_seek() -> None:
    state = StreamState(chunk_size=BASE)
    read_sequentially(state, 0, 128 * KIB, 3)
    slack = 2 * max(state.chunk_size, 128 * KIB)
    n = state.next_offset
    assert state.observe(n + slack, 128 * KIB, BASE, CAP, WINDOW) is True
    state = StreamState(chunk_size=BASE)
    read_sequentially(state, 0, 128 * KIB, 3)
    assert state.observe(n + slack + 1, 128 * KIB, BASE, CAP, WINDOW) is False
    assert (state.chunk_size, state.readahead_chunks) == (BASE, 0)


def test_first_request_at_offset_zero_is_sequential_but_does_not_grow_yet() -> None:
    state = StreamState(chunk_size=BASE)
    assert state.observe(0, 4 * KIB, BASE, CAP, WINDOW) is True
    assert (state.chunk_size, state.readahead_chunks, state.sequential_reads) == (BASE, 0, 1)


# -- the request planner -----------------------------------------------------------

def planner(min_chunk: int = 4 * KIB, max_chunk: int = 1 * MIB) -> RequestPlanner:
    return RequestPlanner(AdaptiveChunkSizer(min_chunk, max_chunk))


@pytest.mark.parametrize(("size", "small", "whole"), [
    (0, True, 4 * KIB), (1, True, 4 * KIB), (700 * KIB, True, 1 * MIB),
    (1 * MIB - 1, True, 1 * MIB), (1 * MIB, False, 1 * MIB)])
def test_small_files_are_one_chunk_of_the_next_power_of_two(size: int, small: bool,
                                                           whole: int) -> None:
    assert planner().is_small(size) is small
    assert RequestPlanner.whole_file_chunk(size) == whole
    assert not planner(max_chunk=256 * KIB).is_small(700 * KIB)   # larger than a chunk


@pytest.mark.parametrize(("offset", "size", "chunk"), [
    (0, 4 * KIB, 4 * KIB), (4 * KIB, 4 * KIB, 4 * KIB), (2 * KIB, 4 * KIB, 8 * KIB),
    (60 * KIB, 8 * KIB, 128 * KIB), (0, 3 * MIB, 1 * MIB)])
def test_a_random_chunk_is_the_smallest_aligned_one_holding_the_request(
        offset: int, size: int, chunk: int) -> None:
    assert planner().random_chunk(offset, size) == chunk


def test_plan_grows_a_sequential_stream_and_falls_back_on_a_seek() -> None:
    p = planner()
    tracker = ChunkPerformanceTracker()
    file_size = 200 * MIB
    state = StreamState(chunk_size=p.base_chunk(file_size, 0.0))
    assert state.chunk_size == 256 * KIB
    plans = [p.plan(state, file_size, offset, 128 * KIB, 0.0, tracker, 8)
             for offset in range(0, 6 * 128 * KIB, 128 * KIB)]
    assert all(sequential for _, sequential in plans)
    assert plans[-1][0] == 1 * MIB and state.readahead_chunks > 0
    chunk, sequential = p.plan(state, file_size, 100 * MIB, 4 * KIB, 0.0, tracker, 8)
    assert (chunk, sequential) == (256 * KIB, False)
    chunk, sequential = p.plan(state, file_size, 50 * MIB, 4 * KIB, 0.0, tracker, 8)
    assert (chunk, sequential) == (4 * KIB, False)              # keeps seeking: request-sized


def test_plan_reads_a_small_file_whole_and_never_sequentially() -> None:
    state = StreamState(chunk_size=1 * MIB)
    assert planner().plan(state, 700 * KIB, 0, 4 * KIB, 0.0, ChunkPerformanceTracker(),
                          8) == (1 * MIB, False)


def test_a_slow_stores_window_grows_four_times_per_request() -> None:
    def windows(latency_s: float) -> list[int]:
        p, tracker = planner(), ChunkPerformanceTracker()
        tracker.record(1 * MIB, latency_s)
        state = StreamState(chunk_size=256 * KIB)
        trace = []
        for offset in range(0, 5 * MIB, MIB):
            p.plan(state, 200 * MIB, offset, MIB, 0.0, tracker, 64)
            trace.append(state.readahead_chunks)
        return trace

    # A first request of 1 MiB at offset 0 opens the window at once (EAGER_REQUEST,
    # EAGER_WINDOW chunks).
    assert windows(0.001) == [4, 8, 16, 32, 64]       # a local disk: doubling
    assert windows(0.1) == [4, 16, 64, 64, 64]        # 100 ms a read: four times


def test_only_a_big_first_request_at_the_start_opens_the_window_at_once() -> None:
    def first_window(offset: int, size: int) -> int:
        state = StreamState(chunk_size=256 * KIB, next_offset=offset)
        planner().plan(state, 200 * MIB, offset, size, 0.0, ChunkPerformanceTracker(), 64)
        return state.readahead_chunks

    assert first_window(0, EAGER_REQUEST) == EAGER_WINDOW
    assert first_window(0, 1 * MIB) == EAGER_WINDOW
    assert first_window(0, 128 * KIB) == 0          # a small first read: wait for the second
    assert first_window(0, 4 * KIB) == 0            # file(1), a database's header
    assert first_window(64 * MIB, 1 * MIB) == 0     # a first read elsewhere in the file
