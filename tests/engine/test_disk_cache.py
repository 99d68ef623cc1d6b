"""The persistent chunk cache (``stfs.disk_cache``, ``stfs.disk_store``), without FUSE:
its files and their checks, its index, and the engine reading through it across
"remounts" (a new engine on the same directory)."""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from stfs import disk_store
from stfs.backing import FileIdentity
from stfs.budget import MemoryBudget
from stfs.cache import ChunkCache
from stfs.config import MountConfig
from stfs.disk_cache import ENTRY_BYTES, DiskIndex
from stfs.disk_store import DiskStore, EntryKey, disk_bytes, entry_name, parse_name
from stfs.engine import EngineConfig, ReadEngine
from stfs.errors import StfsError, UsageError
from stfs.metrics import Counters
from tests.engine.fakes import FakeBacking
from tests.engine.helpers import DEFAULTS, KERNEL_REQUEST, KIB, MIB, Source, read_all, run

ID = FileIdentity(1, 2, 10 * MIB, 3, 4)
T = TypeVar("T")


def key(start: int, length: int = 64 * KIB, identity: FileIdentity = ID) -> EntryKey:
    return EntryKey(identity, start, length)


# -- the files ---------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[DiskStore]:
    (tmp_path / "cache").mkdir()
    s = DiskStore.open(tmp_path / "cache")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    path = tmp_path / "cache"
    path.mkdir(exist_ok=True)
    return path


def test_names_round_trip_and_reject_what_is_not_an_entry() -> None:
    k = EntryKey(FileIdentity(66305, 12, 5000, -1_000_000_007, 1_700_000_000_123_456_789),
                 4096, 904)
    assert parse_name(entry_name(k)) == k
    for junk in ("", "x", "1_2_3", entry_name(k) + ".123.0", entry_name(k).upper() + "_",
                 "1_2_3_4_5_6_0", "01_2_3_4_5_6_7"):
        assert parse_name(junk) is None, junk


def test_an_entry_reads_back_whole_and_checked(store: DiskStore) -> None:
    data = os.urandom(100_000)
    k = key(8192, len(data))
    store.write(k, data)
    buf = bytearray(len(data))
    assert store.read(k, buf) is True
    assert bytes(buf) == data
    assert os.listdir(store.tmp) == []
    assert (store.chunks / entry_name(k)).stat().st_size == disk_store.file_size(len(data))


def test_a_damaged_entry_fails_its_check(store: DiskStore) -> None:
    data = os.urandom(50_000)
    k = key(0, len(data))
    store.write(k, data)
    path = store.chunks / entry_name(k)
    raw = bytearray(path.read_bytes())
    raw[12345] ^= 0x01
    path.write_bytes(raw)
    assert store.read(k, bytearray(len(data))) is False
    path.write_bytes(bytes(raw[:20_000]))  # torn: a crash before writeback
    assert store.read(k, bytearray(len(data))) is False


def test_an_entry_is_checked_against_the_key_asked_for(store: DiskStore) -> None:
    """A file renamed by hand to another key's name is not that key's bytes."""
    data = os.urandom(4096)
    store.write(key(0, 4096), data)
    os.rename(store.chunks / entry_name(key(0, 4096)), store.chunks / entry_name(key(4096, 4096)))
    assert store.read(key(4096, 4096), bytearray(4096)) is False
    assert store.read(key(0, 4096), bytearray(4096)) is None  # no such entry


def test_open_empties_tmp_and_scan_drops_what_is_not_a_whole_entry(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    first = DiskStore.open(tmp_path / "c")
    good, short = key(0, 5000), key(8192, 5000)
    first.write(good, os.urandom(5000))
    first.write(short, os.urandom(5000))
    first.close()
    chunks = tmp_path / "c" / "chunks"
    os.truncate(chunks / entry_name(short), 100)  # cut short
    (chunks / "not-an-entry").write_bytes(b"x")
    (tmp_path / "c" / "tmp" / (entry_name(good) + ".99.0")).write_bytes(b"half")  # kill -9
    again = DiskStore.open(tmp_path / "c")
    try:
        assert [e.key for e in again.scan()] == [good]
        assert os.listdir(tmp_path / "c" / "tmp") == []
        assert sorted(os.listdir(chunks)) == [entry_name(good)]
        assert (tmp_path / "c" / "CACHEDIR.TAG").read_bytes().startswith(
            b"Signature: 8a477f597d28d172789f06886806bc55")
    finally:
        again.close()


def test_a_second_owner_is_refused_with_one_line(store: DiskStore) -> None:
    with pytest.raises(StfsError) as info:
        DiskStore.open(store.path)
    assert info.value.exit_code == 1
    assert "in use by another stfs mount" in info.value.message
    assert f"pid {os.getpid()}" in info.value.message
    assert disk_store.lock_holder(store.path) == (os.getpid(), disk_store.MOUNTED)
    with pytest.raises(StfsError, match="in use"):
        disk_store.check_cache_dir(store.path, None, 2 * MIB)
    with pytest.raises(StfsError, match="in use"):
        disk_store.clear(store.path)


def test_stfs_cache_counts_entries_and_clears_them(store: DiskStore,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    store.write(key(0, 100_000), os.urandom(100_000))
    store.close()
    size = disk_store.human_bytes(disk_bytes(100_000))
    assert disk_store.cache_command(store.path, False) == 0
    assert capsys.readouterr().out == f"{store.path}: 1 entry, {size} (not in use)\n"
    assert disk_store.cache_command(store.path, True) == 0
    assert capsys.readouterr().out == f"{store.path}: removed 1 entry ({size})\n"
    assert disk_store.cache_command(store.path, False) == 0
    assert capsys.readouterr().out.startswith(f"{store.path}: 0 entries, ")


def test_a_new_owner_waits_for_one_that_is_closing(tmp_path: Path) -> None:
    """An unmounted daemon still writing its last entries: a new mount of DIR waits
    for it instead of failing; clearing DIR is still refused meanwhile."""
    (tmp_path / "c").mkdir()
    first = DiskStore.open(tmp_path / "c")
    first.closing()
    assert disk_store.lock_holder(first.path) == (os.getpid(), disk_store.CLOSING)
    assert disk_store.check_cache_dir(first.path, 8 * MIB, 2 * MIB) == 8 * MIB
    with pytest.raises(StfsError, match="writing its last entries; try again when it has exited"):
        disk_store.clear(first.path)
    opened: list[DiskStore] = []
    waiter = threading.Thread(target=lambda: opened.append(DiskStore.open(first.path)))
    waiter.start()
    try:
        assert not opened  # waiting (the lock is held)
        first.close()
    finally:
        waiter.join(30)
    assert opened and disk_store.lock_holder(first.path) == (os.getpid(), disk_store.MOUNTED)
    opened[0].close()


def test_the_lock_goes_with_its_owner(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    DiskStore.open(tmp_path / "c").close()
    assert disk_store.lock_holder(tmp_path / "c") is None
    DiskStore.open(tmp_path / "c").close()


def test_check_cache_dir_refuses_bad_directories(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such file or directory"):
        disk_store.check_cache_dir(tmp_path / "missing", None, 2 * MIB)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(UsageError, match="not a directory"):
        disk_store.check_cache_dir(tmp_path / "file", None, 2 * MIB)
    with pytest.raises(UsageError, match="more than the file system"):
        disk_store.check_cache_dir(tmp_path, 1 << 60, 2 * MIB)
    fs = os.statvfs(tmp_path)
    default = disk_store.check_cache_dir(tmp_path, None, 2 * MIB)
    assert 2 * MIB <= default <= disk_store.DEFAULT_MAX_BYTES
    assert default <= fs.f_bavail * fs.f_frsize - 0.1 * fs.f_blocks * fs.f_frsize + MIB
    assert disk_store.check_cache_dir(tmp_path, 8 * MIB, 2 * MIB) == 8 * MIB


def test_a_disk_cache_below_one_chunk_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="too small for a disk cache"):
        MountConfig(source="/s", mountpoint="/m", cache_dir=tmp_path, cache_size=MIB)
    MountConfig(source="/s", mountpoint="/m", cache_dir=tmp_path, cache_size=2 * MIB)
    # Without --cache-dir, --cache-size is still the memory cache's share.
    config = MountConfig(source="/s", mountpoint="/m", cache_size=8 * MIB)
    assert config.cache_limit_bytes == 8 * MIB
    with pytest.raises(UsageError, match="larger than --memory-limit"):
        MountConfig(source="/s", mountpoint="/m", cache_size=64 * MIB)
    both = MountConfig(source="/s", mountpoint="/m", cache_dir=tmp_path, cache_size=1 << 30,
                       memory_cache_size=4 * MIB)
    assert both.cache_limit_bytes == 4 * MIB
    assert MountConfig(source="/s", mountpoint="/m", cache_dir=tmp_path,
                       cache_size=1 << 30).cache_limit_bytes == 50 * MIB * 3 // 4


# -- the index ---------------------------------------------------------------------


def test_the_index_finds_the_entry_holding_a_byte() -> None:
    index = DiskIndex(1 << 30, 1000)
    index.add(key(0, 100), 0)
    index.add(key(100, 50), 0)
    index.add(key(1000, 10), 0)
    assert index.find(ID, 0) == key(0, 100)
    assert index.find(ID, 99) == key(0, 100)
    assert index.find(ID, 149) == key(100, 50)
    assert index.find(ID, 150) is None
    assert index.find(ID, 1009) == key(1000, 10)
    assert index.find(ID._replace(mtime_ns=5), 0) is None  # another version: never
    assert index.covers(key(10, 50)) and not index.covers(key(90, 100))
    # Overlapping entries (chunk boundaries of another pass): a later start that
    # ends early hides no byte of an earlier, longer entry.
    index.add(key(2000, 1000), 0)
    index.add(key(2100, 10), 0)
    assert index.find(ID, 2500) == key(2000, 1000)
    assert index.find(ID, 2105) == key(2100, 10)


def test_the_index_stays_within_bytes_and_entries() -> None:
    index = DiskIndex(10 * disk_bytes(64 * KIB), 1000)
    evicted = []
    for i in range(30):
        evicted += index.add(key(i * 64 * KIB), 0)
    assert len(index) == 10 and len(evicted) == 20
    assert index.used_bytes <= index.capacity_bytes
    few = DiskIndex(1 << 40, 5)
    for i in range(9):
        few.add(key(i * 64 * KIB), 0)
    assert len(few) == 5


def test_a_scan_does_not_flush_entries_read_back() -> None:
    """2Q: entries read back (real reuse) survive a one-off scan of another file."""
    index = DiskIndex(20 * disk_bytes(64 * KIB), 10_000)
    hot = [key(i * 64 * KIB) for i in range(8)]
    for k in hot:
        index.add(k, 0)
        index.used(k)
    other = ID._replace(ino=99, size=1 << 40)
    for i in range(500):
        index.add(key(i * 64 * KIB, identity=other), 0)
    assert all(index.find(ID, k.start) == k for k in hot)
    assert index.used_bytes <= index.capacity_bytes


def test_room_is_made_before_a_write() -> None:
    index = DiskIndex(4 * disk_bytes(64 * KIB), 100)
    for i in range(4):
        index.add(key(i * 64 * KIB), 0)
    evicted = index.reserve(disk_bytes(64 * KIB))
    assert len(evicted) == 1 and index.used_bytes <= index.capacity_bytes
    index.add(key(4 * 64 * KIB), disk_bytes(64 * KIB))
    assert index.used_bytes <= index.capacity_bytes and len(index) == 4


def test_an_index_entry_costs_no_more_than_is_counted() -> None:
    """ENTRY_BYTES (what the budget holds per entry) covers what one really takes,
    with its share of the ghost list (a full index keeps evicting)."""
    n = 10_000
    index = DiskIndex(n * disk_bytes(262_144 + 999), n)
    identities = [FileIdentity(2049, 10_000 + i, 1 << 30, 1_700_000_000_000_000_000 + i,
                               1_700_000_000_000_000_000 + i) for i in range(20)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for identity in identities:  # shared, as the handle's identity is
        for j in range(1000):
            index.add(EntryKey(identity, 1_000_000 + j * 262_144, 262_144 + j), 0)
    per_entry = (tracemalloc.get_traced_memory()[0] - before) / n
    tracemalloc.stop()
    assert len(index) == n and index.evictions == n
    assert per_entry <= ENTRY_BYTES, per_entry


def test_a_pinned_chunk_stays_held_until_unpinned() -> None:
    budget = MemoryBudget(10 * MIB)
    cache = ChunkCache(2 * MIB, budget)
    budget.try_reserve(MIB)
    cache.insert((ID, 0), bytearray(MIB), MIB, 1)
    assert cache.pin((ID, 0)) is not None
    assert cache.pin((ID, MIB)) is None
    cache.clear()
    assert len(cache) == 0 and budget.held_bytes == MIB  # gone from the cache, still held
    cache.unpin((ID, 0))
    assert budget.held_bytes == 0


def test_a_pinned_chunk_evicted_before_its_write_is_still_kept_for_the_writer() -> None:
    """A reply waiting to be hashed pins its chunk; evicted meanwhile, the chunk
    must still reach the disk cache's keep (else its queued write finds nothing
    and the next pass reads SOURCE): the keep takes over its bytes."""
    budget = MemoryBudget(10 * MIB)
    cache = ChunkCache(2 * MIB, budget)
    kept: dict[object, object] = {}
    cache.on_evict = lambda key, data: kept.setdefault(key, data) is data
    budget.try_reserve(MIB)
    cache.insert((ID, 0), bytearray(MIB), MIB, 1)
    assert cache.pin((ID, 0)) is not None
    cache.shrink_to(0)
    assert (ID, 0) in kept and budget.held_bytes == MIB   # held once, by the keep
    assert cache.unpin((ID, 0)) == 0 and budget.held_bytes == MIB


# -- the engine through it -----------------------------------------------------------


class Mount:
    """One engine on SOURCE with the disk cache in a directory: a mount's life."""

    def __init__(self, src: Source, cache_dir: Path, size: int = 256 * MIB,
                 reader: FakeBacking | None = None, **config: object) -> None:
        self.store = DiskStore.open(cache_dir)
        self.reader = reader or FakeBacking(cached=False, local=False)
        self.engine = ReadEngine(
            EngineConfig(**{**DEFAULTS, **config}), Counters(), opener=src.backing.open_file,
            reader=self.reader, handles_of=src.handles.files_of_node,
            disk_store=self.store, disk_cache_bytes=size, disk_entries=self.store.scan())
        assert self.engine.disk is not None
        self.disk = self.engine.disk
        self.src = src
        self.errors = _Errors()

    def run(self, body: Callable[[], Awaitable[T]]) -> T:
        """*body* on the engine; a background error of the disk cache fails the test."""
        logger = logging.getLogger("stfs.disk_cache")
        logger.addHandler(self.errors)
        try:
            result: T = run(self.engine, body, timeout=60)
        finally:
            logger.removeHandler(self.errors)
            self.store.close()
        assert not self.errors.records, [r.getMessage() for r in self.errors.records]
        return result

    def hold_writes(self, monkeypatch: pytest.MonkeyPatch) -> trio.Event:
        """The writer waits before each step's writes until the event is set."""
        gate = trio.Event()
        real = self.disk._write

        async def held(batch: list[EntryKey]) -> None:
            await gate.wait()
            await real(batch)

        monkeypatch.setattr(self.disk, "_write", held)
        return gate

    def read(self, *names: str, request: int = KERNEL_REQUEST) -> list[bytes]:
        async def body() -> list[bytes]:
            out = []
            for name in names:
                handle = self.src.open(name)
                out.append(await read_all(self.engine, handle, request))
                await self.engine.release(handle)
                self.src.handles.pop_file(handle.fh)
            await self.engine.flush(30)
            return out

        return self.run(body)


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_remount_reads_from_disk_and_not_from_source(src: Source, cache_dir: Path) -> None:
    a, b = src.write("a.bin", 6 * MIB + 12345), src.write("b.bin", 3000)
    first = Mount(src, cache_dir)
    assert first.read("a.bin", "b.bin") == [a, b]
    assert first.reader.calls and first.disk.writes > 0
    assert first.disk.writes_missed == 0
    # Every byte is on disk (read-ahead's chunks too).
    entries = sorted(disk_store.parse_name(n) for n in os.listdir(cache_dir / "chunks"))
    covered = [e for e in entries if e is not None and e.identity == src.identity("a.bin")]
    end = 0
    for e in covered:
        assert e.start <= end
        end = max(end, e.start + e.length)
    assert end == len(a)

    second = Mount(src, cache_dir)
    assert second.read("a.bin", "b.bin") == [a, b]
    assert second.reader.calls == []  # no byte of file data from SOURCE
    assert second.disk.hits > 0 and second.disk.hit_bytes >= len(a) + len(b)
    assert second.disk.verify_failures == 0
    assert second.engine.counters.bytes_served == len(a) + len(b)


def test_a_damaged_entry_is_dropped_counted_and_read_from_source(src: Source,
                                                                 cache_dir: Path) -> None:
    data = src.write("a.bin", 2 * MIB)
    Mount(src, cache_dir).read("a.bin")
    names = sorted(os.listdir(cache_dir / "chunks"))
    for name in names:  # every entry (entries may overlap: any of them may be read)
        victim = cache_dir / "chunks" / name
        raw = bytearray(victim.read_bytes())
        raw[len(raw) // 3] ^= 0xFF
        victim.write_bytes(raw)
    second = Mount(src, cache_dir)
    assert second.read("a.bin") == [data]
    assert 1 <= second.disk.verify_failures <= len(names)
    assert second.disk.hits == 0 and covered(second.reader.calls) >= len(data)
    third = Mount(src, cache_dir)  # what was read again was written again, right
    assert third.read("a.bin") == [data]
    assert third.disk.hits > 0


def test_a_changed_file_is_never_served_from_disk(src: Source, cache_dir: Path) -> None:
    src.write("a.bin", MIB + 5)
    Mount(src, cache_dir).read("a.bin")
    new = src.rewrite_in_place("a.bin", seed=77)
    second = Mount(src, cache_dir)
    assert second.read("a.bin") == [new]
    assert covered(second.reader.calls) >= len(new)  # every byte of it from SOURCE


def covered(calls: list[tuple[int, int]]) -> int:
    """Bytes of [0, ...) that reads at (offset, size) covered, from 0 without a gap."""
    end = 0
    for offset, size in sorted(calls):
        if offset > end:
            break
        end = max(end, offset + size)
    return end


def test_the_disk_cache_stays_within_its_size(src: Source, cache_dir: Path) -> None:
    files = [src.write(f"f{i}", 2 * MIB, seed=i) for i in range(4)]
    size = 3 * MIB
    m = Mount(src, cache_dir, size=size)
    assert m.read(*(f"f{i}" for i in range(4))) == files
    stats = m.disk.statistics()
    assert stats.bytes <= size and stats.evictions > 0
    on_disk = sum(os.stat(cache_dir / "chunks" / n).st_blocks * 512
                  for n in os.listdir(cache_dir / "chunks"))
    assert on_disk <= size
    again = Mount(src, cache_dir, size=size)
    assert again.read("f3") == [files[3]]  # what stayed is still good


def test_memory_stays_within_the_limit_with_the_index_held(src: Source,
                                                           cache_dir: Path) -> None:
    data = src.write("a.bin", 8 * MIB)
    limit = 4 * MIB
    first = Mount(src, cache_dir, memory_limit=limit, cache_limit=3 * MIB)
    assert first.read("a.bin") == [data]
    assert first.engine.budget.peak_held_bytes <= limit
    assert first.disk.writes > 0
    second = Mount(src, cache_dir, memory_limit=limit, cache_limit=3 * MIB)
    assert second.read("a.bin") == [data]
    assert second.engine.budget.peak_held_bytes <= limit
    assert second.disk.index_bytes == limit // 16
    assert second.disk.hits > 0


def test_a_lower_entry_bound_drops_the_oldest_at_start(src: Source, cache_dir: Path) -> None:
    src.write("a.bin", 8 * MIB)
    Mount(src, cache_dir, memory_limit=64 * MIB, cache_limit=48 * MIB).read(
        "a.bin", request=64 * KIB)
    had = len(os.listdir(cache_dir / "chunks"))
    small = Mount(src, cache_dir, memory_limit=4 * MIB, cache_limit=3 * MIB)
    bound = small.disk.index.max_entries
    small.store.close()
    assert len(os.listdir(cache_dir / "chunks")) == min(had, bound)


def test_reads_wait_for_nothing_when_disk_writes_are_slow(src: Source, cache_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """Writes are behind the reply: a writer stuck on the disk holds up no read."""
    data = src.write("a.bin", 3 * MIB)
    m = Mount(src, cache_dir)
    gate = m.hold_writes(monkeypatch)

    async def body() -> bytes:
        handle = src.open("a.bin")
        got = await read_all(m.engine, handle, KERNEL_REQUEST)  # would hang if it waited
        assert m.disk.writes == 0
        gate.set()
        await m.engine.flush(30)
        return got

    assert m.run(body) == data
    assert m.disk.writes > 0


def test_chunks_evicted_before_their_write_are_kept_within_a_share(
        src: Source, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that falls behind: what memory evicts meanwhile stays held for it
    up to its share (inside the limit), the rest is not written, and nothing waits."""
    data = src.write("a.bin", 12 * MIB)
    limit = 8 * MIB
    m = Mount(src, cache_dir, memory_limit=limit, cache_limit=4 * MIB)
    gate = trio.Event()
    real = m.disk._write
    kept_peak = 0

    async def stuck(batch: list[EntryKey]) -> None:
        nonlocal kept_peak
        await gate.wait()
        kept_peak = max(kept_peak, m.disk.kept_bytes)
        await real(batch)

    monkeypatch.setattr(m.disk, "_write", stuck)

    async def body() -> bytes:
        handle = src.open("a.bin")
        got = await read_all(m.engine, handle, KERNEL_REQUEST)
        assert 0 < m.disk.kept_bytes <= m.disk.keep_bytes
        gate.set()
        await m.engine.flush(30)
        assert m.disk.kept_bytes == 0
        return got

    assert m.run(body) == data
    assert m.engine.budget.peak_held_bytes <= limit
    assert m.disk.writes_missed > 0  # more than the share was evicted unwritten
    assert kept_peak > 0 and m.disk.writes > 0  # what was kept was written after all


def _outrun_the_writer(src: Source, cache_dir: Path, monkeypatch: pytest.MonkeyPatch,
                       name: str, before_flush: Callable[[], None] = lambda: None) -> Mount:
    """One pass of *name* while the writer is stuck, at a limit whose keep share
    cannot hold what memory evicts meanwhile; then the writer goes on and the
    mount closes (flush). *before_flush* runs just before the writer goes on."""
    data = src.data[name]
    m = Mount(src, cache_dir, memory_limit=8 * MIB, cache_limit=4 * MIB)
    gate = m.hold_writes(monkeypatch)

    async def body() -> bytes:
        handle = src.open(name)
        got = await read_all(m.engine, handle, KERNEL_REQUEST)
        await m.engine.release(handle)
        src.handles.pop_file(handle.fh)
        before_flush()
        gate.set()
        await m.engine.flush(30)
        return got

    assert m.run(body) == data
    assert m.disk.writes_missed > 0  # the writer found chunks gone from memory
    return m


def test_chunks_missed_by_a_lagging_writer_are_read_again_and_written(
        src: Source, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the keep share an evicted chunk is not written then, but it is
    remembered: once the writer is idle it reads it from SOURCE again and
    writes it, so the next pass reads nothing from SOURCE."""
    data = src.write("a.bin", 12 * MIB)
    m = _outrun_the_writer(src, cache_dir, monkeypatch, "a.bin")
    assert m.disk.refills == m.disk.writes_missed
    assert m.engine.budget.peak_held_bytes <= 8 * MIB
    assert m.engine.budget.held_bytes == m.engine.index_bytes + m.engine.cache.cached_bytes
    reads_of_refills = m.reader.calls[-m.disk.refills:]
    assert all(size <= 1 * MIB for _, size in reads_of_refills)

    second = Mount(src, cache_dir)
    assert second.read("a.bin") == [data]
    assert second.reader.calls == []
    assert second.disk.verify_failures == 0


def test_refills_wait_until_no_read_is_in_progress(
        src: Source, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A refill is a SOURCE read the mount's readers did not ask for: it waits
    while any read is in progress, so it never competes with a pass."""
    src.write("a.bin", 12 * MIB)
    b = src.write("b.bin", 1 * MIB)
    m = Mount(src, cache_dir, memory_limit=8 * MIB, cache_limit=4 * MIB)
    gate = m.hold_writes(monkeypatch)
    seen: list[tuple[int, int]] = []
    real_refill = m.disk._refill
    assert real_refill is not None

    async def refill(key: EntryKey, path: bytes, buf: Any) -> bool:
        seen.append((m.engine.counters.active_reads, m.engine.reads.in_flight()))
        return await real_refill(key, path, buf)

    monkeypatch.setattr(m.disk, "_refill", refill)

    async def body() -> bytes:
        first = src.open("a.bin")
        await read_all(m.engine, first, KERNEL_REQUEST)
        await m.engine.release(first)
        src.handles.pop_file(first.fh)
        m.reader.arm()  # the next SOURCE read is held: a read in progress
        other = src.open("b.bin")
        got = b""
        async with trio.open_nursery() as nursery:
            async def read_b() -> None:
                nonlocal got
                got = await read_all(m.engine, other, KERNEL_REQUEST)

            nursery.start_soon(read_b)
            while m.reader.held == 0:
                await trio.sleep(0.01)
            gate.set()  # the writer goes on: it misses chunks, and may not refill yet
            while m.disk._pending or (m.disk._busy and not seen):
                await trio.sleep(0.01)
            assert m.disk.writes_missed > 0 and seen == []
            m.reader.release()
        await m.engine.flush(30)
        return got

    assert m.run(body) == b
    assert m.disk.refills == m.disk.writes_missed and seen
    assert all(s == (0, 0) for s in seen), seen


def test_a_missed_chunk_of_a_file_changed_since_is_not_written(
        src: Source, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The refill opens the file by path: another version there now is not
    written under the old one's key, and the next pass reads the new bytes."""
    src.write("a.bin", 12 * MIB)
    old = src.identity("a.bin")
    m = _outrun_the_writer(src, cache_dir, monkeypatch, "a.bin",
                           before_flush=lambda: src.rewrite_in_place("a.bin", seed=7))
    assert m.disk.refills == 0 and m.disk.writes_missed > 0
    entries = [parse_name(n) for n in os.listdir(cache_dir / "chunks")]
    assert sum(e.length for e in entries if e is not None and e.identity == old) < 12 * MIB
    second = Mount(src, cache_dir)
    assert second.read("a.bin") == [src.data["a.bin"]]
    assert covered(second.reader.calls) >= 12 * MIB  # the new version, from SOURCE


def test_read_ahead_from_source_pauses_while_the_writer_lags(
        src: Source, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """More than the keep share waiting to be written: read-ahead stops reading
    SOURCE (memory would drop chunks before the disk has them); demand reads go
    on, and read-ahead comes back once the writer has caught up."""
    data = src.write("a.bin", 32 * MIB)
    more = src.write("b.bin", 8 * MIB)
    m = Mount(src, cache_dir, memory_limit=8 * MIB, cache_limit=4 * MIB)
    gate = m.hold_writes(monkeypatch)
    started: list[tuple[bool, bool]] = []
    """(read-ahead, the writer lagging) of each SOURCE read, as it started."""
    real_read = m.engine.fetcher.reads.read_chunk

    async def read_chunk(*args: Any, speculative: bool, **kwargs: Any) -> Any:
        started.append((speculative, m.disk.lagging()))
        return await real_read(*args, speculative=speculative, **kwargs)

    monkeypatch.setattr(m.engine.fetcher.reads, "read_chunk", read_chunk)

    async def read(name: str) -> bytes:
        handle = src.open(name)
        got = await read_all(m.engine, handle, KERNEL_REQUEST)
        await m.engine.release(handle)
        src.handles.pop_file(handle.fh)
        return got

    async def body() -> tuple[bytes, bytes, int]:
        got = await read("a.bin")
        assert m.disk.lagging()
        gate.set()
        await m.engine.flush(30)
        assert not m.disk.lagging() and m.disk.unwritten_bytes == 0
        first = len(started)
        got_more = await read("b.bin")
        return got, got_more, first

    got, got_more, first = m.run(body)
    assert (got, got_more) == (data, more)
    assert (True, False) in started[:first]  # read-ahead ran until the writer fell behind
    assert (False, True) in started[:first]  # then demand reads went on alone
    assert (True, True) not in started  # and no read-ahead started meanwhile
    assert (True, False) in started[first:]  # the writer caught up: read-ahead is back


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs: a disk cache that fills up long before its --cache-size."""
    path = tmp_path / "small"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_costs_writes_never_reads(src: Source, small_fs: Path) -> None:
    data = src.write("a.bin", 8 * MIB)
    m = Mount(src, small_fs, size=64 * MIB)
    assert m.read("a.bin") == [data]
    stats = m.disk.statistics()
    assert stats.write_errors > 0 and stats.writes > 0
    assert stats.limit_bytes == 64 * MIB and m.disk.index.capacity_bytes < 8 * MIB  # lowered
    names = os.listdir(small_fs / "chunks")
    assert names  # what fitted is whole and right
    store = DiskStore.open(small_fs)
    try:
        for name in names:
            k = parse_name(name)
            assert k is not None
            buf = bytearray(k.length)
            assert store.read(k, buf) is True
            assert bytes(buf) == data[k.start:k.start + k.length]
    finally:
        store.close()
    again = Mount(src, small_fs, size=64 * MIB)
    assert again.read("a.bin") == [data]
    assert again.disk.verify_failures == 0


def test_read_ahead_may_evict_only_what_the_disk_holds_or_can_keep() -> None:
    """With a disk cache, read-ahead's reservation may evict cached chunks, but the
    reclaimer stops at a chunk not yet written that cannot be kept."""
    budget = MemoryBudget(4 * MIB)
    cache = ChunkCache(4 * MIB, budget)
    for i in range(3):
        assert budget.try_reserve(MIB)
        cache.insert((ID, i * MIB), bytearray(MIB), MIB, 1)
    assert not budget.try_reserve_speculative(2 * MIB)  # never evicts by itself
    unwritten = {(ID, MIB)}
    budget.speculative_reclaimer = lambda n: cache.reclaim_if(
        n, lambda key, _size: key not in unwritten)
    assert budget.try_reserve_speculative(2 * MIB, evict=True)  # chunk 0 went, then it stopped
    assert (ID, 0) not in cache and (ID, MIB) in cache and (ID, 2 * MIB) in cache
    budget.speculative_done(2 * MIB)
    budget.release(2 * MIB)
    assert budget.try_reserve(MIB)
    cache.insert((ID, 3 * MIB), bytearray(MIB), MIB, 1)  # 3 MiB held again
    assert not budget.try_reserve_speculative(2 * MIB, evict=True)  # the unwritten one stays
    assert (ID, MIB) in cache and budget.held_bytes == 3 * MIB


def test_the_index_comes_out_of_the_memory_cache_share(src: Source, cache_dir: Path) -> None:
    m = Mount(src, cache_dir, memory_limit=16 * MIB, cache_limit=12 * MIB)
    m.store.close()
    assert m.engine.index_bytes == MIB
    assert m.engine.cache.capacity_bytes == 11 * MIB
    assert m.engine.budget.held_bytes == MIB
    m.engine.set_memory_limit(32 * MIB, 24 * MIB)  # a cgroup refit keeps it out
    assert m.engine.cache.capacity_bytes == 23 * MIB
