"""Chunk buffer pool."""

from __future__ import annotations

from stfs.buffers import BufferPool


def test_the_pool_reuses_a_buffer_only_when_nothing_else_holds_it() -> None:
    pool = BufferPool(4 * 1024 * 1024)
    buf = pool.take(65536)
    view = memoryview(buf)
    pool.give(buf)                      # a reply still refers to it: not kept
    assert pool.free_bytes == 0
    view.release()
    pool.give(buf)
    assert pool.free_bytes == 65536
    assert pool.take(65536) is buf and pool.reused == 1


def test_the_pool_keeps_only_power_of_two_sizes_within_its_bound() -> None:
    pool = BufferPool(128 * 1024)
    pool.give(bytearray(3000))
    pool.give(bytearray(65536))
    pool.give(bytearray(65536))
    pool.give(bytearray(65536))         # over the bound
    assert pool.free_bytes == 128 * 1024


def test_a_lower_bound_lets_idle_buffers_go_largest_first() -> None:
    pool = BufferPool(4 * 1024 * 1024)
    for size in (1024 * 1024, 1024 * 1024, 65536, 65536):
        pool.give(bytearray(size))
    assert pool.free_bytes == 2 * 1024 * 1024 + 2 * 65536
    pool.set_max_free_bytes(1024 * 1024)
    assert pool.free_bytes == 2 * 65536                # both 1 MiB buffers went
    assert pool.take(65536) is not None and pool.reused == 1
    pool.give(bytearray(1024 * 1024))                  # over the new bound: not kept
    assert pool.free_bytes == 65536


def test_a_buffer_the_pool_does_not_keep_is_reported_dropped() -> None:
    dropped: list[int] = []
    pool = BufferPool(8192, on_drop=dropped.append)
    pool.give(bytearray(4096))                 # kept
    held = bytearray(4096)
    keeper = [held]                            # someone else still refers to it
    pool.give(held)
    pool.give(bytearray(4096))                 # kept: the bound is reached
    pool.give(bytearray(4096))                 # over the bound
    pool.give(bytearray(3000))                 # not a power of two
    assert dropped == [4096, 4096, 3000] and keeper
