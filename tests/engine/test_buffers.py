"""Chunk buffer pool and the glibc heap controls."""

from __future__ import annotations

import ctypes.util

import pytest

from stfs import buffers
from stfs.buffers import BufferPool

GLIBC = ctypes.util.find_library("c") is not None and buffers._libc is not None


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


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_heap_controls_work_on_glibc() -> None:
    assert buffers.limit_malloc_arenas()
    buffers.trim_heap()
    blobs = [bytearray(100_000) for _ in range(300)]   # under the mmap threshold: heap
    del blobs
    assert buffers.trim_heap()                         # 30 MB of free heap went back
