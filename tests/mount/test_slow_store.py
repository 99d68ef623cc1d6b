"""stfs over a slow store (faultfs with a per-request read delay): one
sequential reader keeps several backing reads in flight, within the memory
budget, and every byte is right."""

from __future__ import annotations

import hashlib
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from tests.conftest import Mount, wait_for
from tests.faultfs import FaultFS, faultfs_mount

MIB = 1024 * 1024
DELAY_S = 0.05
HOLD_S = 120.0
"""A hold at the store outlasts any wait of the test (it ends at release)."""
WAIT_S = 30.0
"""Generous bounds for what a loaded machine does in well under a second."""


@pytest.fixture
def slow_store(tmp_path: Path) -> Iterator[FaultFS]:
    """faultfs taking DELAY_S per read request (requested before ``mounter``, so
    stfs on top of it is unmounted first)."""
    with faultfs_mount(tmp_path) as fs:
        fs.set_read_delay(DELAY_S)
        yield fs


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(MIB):
            digest.update(block)
    return digest.hexdigest()


@pytest.mark.parametrize("limit", ["50M", "16M"])
def test_one_sequential_reader_keeps_several_reads_in_flight_within_the_budget(
        slow_store: FaultFS, mounter, limit: str) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(24 * MIB)
    (slow_store.backing / "big").write_bytes(data)
    mount: Mount = mounter(slow_store.mountpoint, "--memory-limit", limit)
    slow_store.reset_stats()
    assert sha256_of(mount.mountpoint / "big") == hashlib.sha256(data).hexdigest()
    store = slow_store.stats()
    stats = mount.stats()
    # The reader reads one request at a time; the store saw several at once.
    assert store["peak_reads_in_flight"] >= 3, store
    # One request per MiB of each chunk (faultfs takes 1 MiB requests): buffers
    # that do not start on a page would cost a second, tiny request per chunk.
    chunk_sizes = stats["chunk_sizes"]
    assert isinstance(chunk_sizes, dict)
    requests = sum(count * -(-int(size) // MIB) for size, count in chunk_sizes.items())
    assert 0 < store["reads"] <= requests, (store, chunk_sizes)
    assert stats["readahead_chunks"] > 0
    assert int(stats["peak_held_bytes"]) <= int(stats["memory_limit_bytes"])  # type: ignore[call-overload]
    assert stats["errors"] == 0
    concurrency = stats["concurrency"]
    assert isinstance(concurrency, dict)
    assert concurrency["backoffs"] == 0                 # steady latency is not congestion


def test_random_reads_fetch_wider_chunks_and_are_answered_from_the_cache(
        slow_store: FaultFS, mounter) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(4 * MIB)
    (slow_store.backing / "db").write_bytes(data)
    mount: Mount = mounter(slow_store.mountpoint)
    rng = random.Random(3)
    fd = os.open(mount.mountpoint / "db", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for _ in range(60):
            offset = rng.randrange(len(data) // 4096) * 4096
            assert os.pread(fd, 4096, offset) == data[offset:offset + 4096]
    finally:
        os.close(fd)
    stats = mount.stats()
    # 60 random requests over 64 chunks of 64K (the base chunk): some hit earlier ones.
    assert int(stats["random_widened"]) > 0, stats      # type: ignore[call-overload]
    assert int(stats["cache_hits"]) > 0                 # type: ignore[call-overload]
    assert stats["errors"] == 0


EDGE_SIZES = [0, 1, 4095, 4096, 65535, 65536, 65537, MIB - 1, MIB, MIB + 1, 3 * MIB + 12345]


def test_files_of_edge_sizes_read_byte_exact_through_a_network_source(
        tmp_path: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    # A FUSE SOURCE is not a local disk: its chunks are read into page-aligned
    # maps, shortened at the end of each file.
    with faultfs_mount(tmp_path) as store:
        files = {f"f{size}": os.urandom(size) for size in EDGE_SIZES}
        for name, data in files.items():
            (store.backing / name).write_bytes(data)
        mount: Mount = mounter(store.mountpoint)
        for name, data in files.items():
            path = mount.mountpoint / name
            assert path.read_bytes() == data, name
            fd = os.open(path, os.O_RDONLY)
            try:
                for offset in (0, 4095, 65537, MIB - 3, len(data) - 1, len(data) + 5):
                    offset = max(0, offset)
                    assert os.pread(fd, 70000, offset) == data[offset:offset + 70000], name
            finally:
                os.close(fd)
            assert sha256_of(path) == hashlib.sha256(data).hexdigest()
        stats = mount.stats()
        assert stats["errors"] == 0


def test_stats_show_the_reads_in_flight_at_the_store_while_a_reader_reads(
        slow_store: FaultFS, mounter) -> None:  # type: ignore[no-untyped-def]
    # The store's reads of the file are held at faultfs's gate while the stats are
    # sampled: they are in flight for as long as the test needs, however fast the
    # reader would otherwise be, and are let go only once a sample was taken.
    data = os.urandom(16 * MIB)
    (slow_store.backing / "big").write_bytes(data)
    mount: Mount = mounter(slow_store.mountpoint)
    digest: list[str] = []
    failed: list[BaseException] = []

    def read_all(f: BinaryIO) -> None:
        try:
            hasher = hashlib.sha256()
            while block := f.read(MIB):
                hasher.update(block)
            digest.append(hasher.hexdigest())
        except BaseException as exc:  # reported by the test below
            failed.append(exc)

    def in_flight(into: list[tuple[int, int]]) -> tuple[int, int]:
        concurrency = mount.stats()["concurrency"]
        assert isinstance(concurrency, dict)
        into.append((int(concurrency["in_flight_reads"]), int(concurrency["in_flight_bytes"])))
        return into[-1]

    # Opened before the hold (which also holds opens): only the reads wait.
    with open(mount.mountpoint / "big", "rb", buffering=0) as f:
        reader = threading.Thread(target=read_all, args=(f,), daemon=True)
        samples: list[tuple[int, int]] = []
        slow_store.hold("big", timeout_s=HOLD_S)
        try:
            reader.start()
            # The reader's first request makes stfs read the store; those reads
            # cannot end while the hold lasts.
            assert wait_for(lambda: in_flight(samples)[0] > 0,
                            WAIT_S, interval=0.05), \
                f"no read was ever seen in flight (held at the store): {samples[-5:]}"
            in_flight(samples)                       # and they stay in flight
            assert reader.is_alive(), "the reader finished while the store held its reads"
        finally:
            slow_store.release("big")
            reader.join(WAIT_S)
    assert not reader.is_alive() and not failed, failed
    assert digest == [hashlib.sha256(data).hexdigest()]
    for reads, n_bytes in samples[-2:]:
        assert 0 < reads and reads * 4096 <= n_bytes <= reads * 16 * MIB, samples[-2:]
    # Live, not stale: with the reader done, nothing is in flight.
    last: list[tuple[int, int]] = []
    assert wait_for(lambda: in_flight(last) == (0, 0), WAIT_S,
                    interval=0.05), last[-5:]
