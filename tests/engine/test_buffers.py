"""Chunk buffer pool."""

from __future__ import annotations

import ctypes
import mmap

from stfs.buffers import ALIGNED_FROM, BufferPool, allocate, shorten

MIB = 1024 * 1024


def address_of(buf: bytearray | mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def test_aligned_buffers_start_on_a_page_and_others_are_bytearrays() -> None:
    # An unaligned 1 MiB buffer spans 257 pages: a FUSE SOURCE with direct_io
    # would get a second request, of a few bytes, for every chunk.
    pool = BufferPool(4 * MIB)
    for size in (ALIGNED_FROM, MIB, 4 * MIB):
        buf = pool.take(size, aligned=True)
        assert len(buf) == size and address_of(buf) % mmap.PAGESIZE == 0
        assert isinstance(pool.take(size), bytearray)   # local disks: heap buffers
    small = pool.take(ALIGNED_FROM // 2, aligned=True)
    assert isinstance(small, bytearray) and len(small) == ALIGNED_FROM // 2


def test_a_short_read_shortens_either_kind_of_buffer_keeping_its_bytes() -> None:
    for size in (4096, MIB):
        buf = allocate(size, aligned=True)
        buf[:5] = b"hello"
        short = shorten(buf, 5)
        assert len(short) == 5 and bytes(short) == b"hello"
        assert len(shorten(allocate(size, aligned=True), size)) == size
        assert len(shorten(allocate(size, aligned=True), 0)) == 0


def test_the_pool_hands_each_kind_back_only_to_its_own_kind() -> None:
    pool = BufferPool(4 * MIB)
    pool.give(mmap.mmap(-1, 4096))      # a map for a small buffer: never taken
    assert pool.free_bytes == 0
    heap, mapped = bytearray(MIB), allocate(MIB, aligned=True)
    pool.give(heap)
    pool.give(mapped)
    assert pool.free_bytes == 2 * MIB
    assert pool.take(MIB, aligned=True) is mapped
    assert pool.take(MIB) is heap
    assert pool.take(MIB, aligned=True) is not heap and pool.reused == 2


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
    pool.give(allocate(65536, aligned=True))
    pool.give(allocate(65536, aligned=True))
    pool.give(allocate(65536, aligned=True))          # over the bound
    assert pool.free_bytes == 128 * 1024


def test_a_lower_bound_lets_idle_buffers_go_largest_first() -> None:
    pool = BufferPool(4 * 1024 * 1024)
    for size in (1024 * 1024, 1024 * 1024, 65536, 65536):
        pool.give(bytearray(size))
    assert pool.free_bytes == 2 * 1024 * 1024 + 2 * 65536
    pool.set_max_free_bytes(1024 * 1024)
    assert pool.free_bytes == 2 * 65536                # both 1 MiB buffers went
    assert pool.take(65536) is not None and pool.reused == 1
    pool.give(bytearray(2 * 1024 * 1024))              # over the new bound: not kept
    assert pool.free_bytes == 65536


def test_a_buffer_of_another_size_takes_the_room_of_the_oldest_idle_ones() -> None:
    dropped: list[int] = []
    pool = BufferPool(2 * 1024 * 1024, on_drop=dropped.append)
    for _ in range(3):
        pool.give(bytearray(512 * 1024))
    pool.give(bytearray(1024 * 1024))          # the oldest 512 KiB one makes room
    assert dropped == [512 * 1024]
    assert pool.free_bytes == 2 * 1024 * 1024
    one = pool.take(1024 * 1024)
    assert len(one) == 1024 * 1024 and pool.reused == 1
    pool.give(one)
    pool.give(bytearray(1024 * 1024))          # the other two 512 KiB ones make room
    assert pool.free_bytes == 2 * 1024 * 1024 and len(dropped) == 3
    pool.give(bytearray(1024 * 1024))          # only its own kind is left: not kept
    assert pool.free_bytes == 2 * 1024 * 1024 and dropped[-1] == 1024 * 1024
    assert pool.take(512 * 1024) is not None and pool.reused == 1  # none left: new


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
