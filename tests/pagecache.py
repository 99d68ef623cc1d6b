"""Keeping a test's files in the kernel's page cache, and seeing when they were not.

Free memory does not keep pages cached on this machine (nor on CI's): it runs
DAMON proactive reclaim (a kdamond whose scheme pages out what it judges cold).
Its judgement is per region of physical memory, sampled every half second, so
pages read a moment ago can be paged out with their cold neighbours. A test
whose premise is "these pages are cached" pins them: ``mlock`` of a shared
read-only mapping faults them in (through the file system, like a read) and
makes them unevictable until the mapping goes. Reclaim and ``drop_caches``
skip locked pages; truncation and a FUSE open without keep_cache still drop
them, so pinning does not hide what those tests look for.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager

from stfs.backing import cachestat

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value

_pins: list[tuple[int, int]] = []   # (address, length) of mappings held until unpin_all


def pin(path: os.PathLike[str] | str, length: int | None = None) -> None:
    """Fault in the first *length* bytes of *path* (all of it by default) and keep
    them in the page cache until ``unpin_all`` (the test's teardown calls it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size if length is None else length
        if size == 0:
            return
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address == _MAP_FAILED:
            raise OSError(ctypes.get_errno(), f"mmap of {path}")
    finally:
        os.close(fd)
    _pins.append((address, size))
    if _libc.mlock(address, size) != 0:
        raise OSError(ctypes.get_errno(), f"mlock of {size} bytes of {path}")


def unpin_all() -> None:
    """Drop every pin: the pages become ordinary page cache again."""
    while _pins:
        address, size = _pins.pop()
        _libc.munmap(address, size)


@contextmanager
def pinned(path: os.PathLike[str] | str, length: int | None = None) -> Iterator[None]:
    """``pin`` for the body of a ``with`` only."""
    held = len(_pins)
    pin(path, length)
    try:
        yield
    finally:
        while len(_pins) > held:
            address, size = _pins.pop()
            _libc.munmap(address, size)


def evictions(path: os.PathLike[str] | str) -> int:
    """How many of *path*'s pages reclaim has evicted so far (cachestat's
    nr_evicted; 0 where the kernel lacks cachestat)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        result = cachestat(fd, 0, 0)
        return 0 if result is None else int(result.nr_evicted)
    finally:
        os.close(fd)

