"""ChecksumStore: whole-file checksums by file identity in the state directory's
SQLite file, kept across mounts, first checksum wins, never a reason to fail."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from stfs.backing import FileIdentity
from stfs.checksums import (
    COARSE_RACY_NS,
    FINE_RACY_NS,
    ChecksumRegistry,
    ChecksumStore,
    racy_window_ns,
)
from stfs.metrics import Counters

A = FileIdentity(dev=2049, ino=1234, size=4096, mtime_ns=1_700_000_000_000_000_000,
                 ctime_ns=1_700_000_000_500_000_000)
DIGEST = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"


def test_nothing_is_known_before_a_record(tmp_path: Path) -> None:
    store = ChecksumStore(tmp_path)
    assert store.get(A) is None
    store.close()


def test_a_recorded_checksum_is_returned_and_survives_a_new_store(tmp_path: Path) -> None:
    store = ChecksumStore(tmp_path)
    assert store.record(A, DIGEST, "dir/a.bin") is None      # nothing to compare with
    assert store.get(A) == DIGEST
    store.close()
    assert (tmp_path / "checksums.sqlite").is_file()
    again = ChecksumStore(tmp_path)                          # a remount
    assert again.get(A) == DIGEST
    db = sqlite3.connect(tmp_path / "checksums.sqlite")
    rows = db.execute("SELECT dev, ino, size, mtime_ns, ctime_ns, xxh3_128, path "
                      "FROM checksums").fetchall()
    db.close()
    assert [row[:6] for row in rows] == [(*A, DIGEST)]
    assert os.fsdecode(rows[0][6]) == "dir/a.bin"
    again.close()


def test_a_non_utf8_path_is_kept(tmp_path: Path) -> None:
    store = ChecksumStore(tmp_path)
    assert store.record(A, DIGEST, b"caf\xe9.bin") is None
    assert store.get(A) == DIGEST
    store.close()


@pytest.mark.parametrize("field", FileIdentity._fields)
def test_every_identity_field_is_part_of_the_key(tmp_path: Path, field: str) -> None:
    store = ChecksumStore(tmp_path)
    store.record(A, DIGEST, "a")
    other = A._replace(**{field: getattr(A, field) + 1})
    assert store.get(other) is None
    assert store.record(other, OTHER, "a") is None           # a new identity: no mismatch
    assert (store.get(A), store.get(other)) == (DIGEST, OTHER)
    store.close()


def test_the_same_checksum_again_is_no_mismatch(tmp_path: Path) -> None:
    store = ChecksumStore(tmp_path)
    store.record(A, DIGEST, "a")
    assert store.record(A, DIGEST, "a") is None
    assert store.get(A) == DIGEST
    store.close()


def test_a_different_checksum_for_the_same_identity_returns_and_keeps_the_first(
        tmp_path: Path) -> None:
    store = ChecksumStore(tmp_path)
    store.record(A, DIGEST, "a")
    assert store.record(A, OTHER, "a") == DIGEST
    assert store.get(A) == DIGEST                            # the first one stays
    store.close()
    later = ChecksumStore(tmp_path)
    assert later.record(A, OTHER, "a") == DIGEST             # also in a later mount
    assert later.get(A) == DIGEST
    later.close()


def test_two_stores_on_one_state_dir_see_each_others_records(tmp_path: Path) -> None:
    one, two = ChecksumStore(tmp_path), ChecksumStore(tmp_path)
    one.record(A, DIGEST, "a")
    assert two.get(A) == DIGEST
    assert two.record(A, OTHER, "a") == DIGEST
    one.close()
    two.close()


def test_concurrent_records_from_threads_are_all_kept(tmp_path: Path) -> None:
    store = ChecksumStore(tmp_path)

    def worker(k: int) -> None:
        for i in range(25):
            store.record(A._replace(ino=k * 1000 + i), f"{k:016x}{i:016x}", f"f{k}-{i}")

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for future in [pool.submit(worker, k) for k in range(4)]:
            future.result(timeout=10)            # re-raises whatever a thread raised
    assert all(store.get(A._replace(ino=k * 1000 + i)) == f"{k:016x}{i:016x}"
               for k in range(4) for i in range(25))
    store.close()


def test_the_state_dir_is_created(tmp_path: Path) -> None:
    state = tmp_path / "state" / "deeper"
    store = ChecksumStore(state)
    store.record(A, DIGEST, "a")
    assert (state / "checksums.sqlite").is_file()
    assert ChecksumStore(state).get(A) == DIGEST
    store.close()


def test_a_corrupt_database_file_is_a_warning_never_an_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "checksums.sqlite").write_bytes(b"this is not sqlite at all " * 400)
    store = ChecksumStore(tmp_path)
    with caplog.at_level(logging.WARNING, logger="stfs.checksums"):
        assert store.get(A) is None
        assert store.record(A, DIGEST, "a") is None
        assert store.get(A) is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1                                 # reported once
    assert "checksum store" in warnings[0].getMessage()
    assert str(tmp_path / "checksums.sqlite") in warnings[0].getMessage()
    store.close()


def test_an_unwritable_state_dir_is_a_warning_never_an_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"x")
    store = ChecksumStore(blocker / "state")                  # cannot be created
    with caplog.at_level(logging.WARNING, logger="stfs.checksums"):
        assert store.record(A, DIGEST, "a") is None
        assert store.get(A) is None
        assert store.record(A, OTHER, "a") is None
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert not (blocker / "state").exists()
    store.close()


def test_close_then_use_again_reopens(tmp_path: Path) -> None:
    store = ChecksumStore(tmp_path)
    store.record(A, DIGEST, "a")
    store.close()
    store.close()                                             # twice is harmless
    assert store.get(A) == DIGEST
    store.close()


# -- racy records: a write within the timestamp granularity keeps the identity --------

def test_racy_window_by_timestamp_granularity() -> None:
    assert racy_window_ns(1_700_000_000_000_000_000) == COARSE_RACY_NS   # whole seconds
    assert racy_window_ns(1_700_000_000_000_000_001) == FINE_RACY_NS
    assert FINE_RACY_NS < COARSE_RACY_NS


def test_a_mismatch_with_a_racy_record_replaces_it(tmp_path: Path) -> None:
    fresh = A._replace(ctime_ns=time.time_ns() - 1_000, mtime_ns=time.time_ns() - 1_000)
    store = ChecksumStore(tmp_path)
    assert store.record(fresh, DIGEST, "a") is None
    assert store.record(fresh, OTHER, "a") is None              # not a corruption...
    assert store.get(fresh) == OTHER                            # ...the newer bytes win
    store.close()


def test_a_whole_second_ctime_gets_the_coarse_window(tmp_path: Path) -> None:
    now = time.time_ns()
    second = now - now % 1_000_000_000 - 1_000_000_000         # 1-2 s ago, whole second
    coarse = A._replace(ctime_ns=second, mtime_ns=second)
    store = ChecksumStore(tmp_path)
    store.record(coarse, DIGEST, "a")
    assert store.record(coarse, OTHER, "a") is None
    assert store.get(coarse) == OTHER
    store.close()


def test_a_record_made_after_the_window_is_trusted(tmp_path: Path) -> None:
    written = time.time_ns() - FINE_RACY_NS - 1_000_000 - 1   # just past the window
    old = A._replace(ctime_ns=written, mtime_ns=written)
    store = ChecksumStore(tmp_path)
    store.record(old, DIGEST, "a")
    assert store.record(old, OTHER, "a") == DIGEST
    assert store.get(old) == DIGEST
    store.close()


def test_open_says_whether_the_store_is_usable(tmp_path: Path) -> None:
    good = ChecksumStore(tmp_path / "ok")
    assert good.open() is True
    assert (tmp_path / "ok" / "checksums.sqlite").is_file()
    good.close()
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    bad = ChecksumStore(blocker)
    assert bad.open() is False
    assert bad.open() is False


# -- the registry the read path reports to -------------------------------------------

def registry_run(registry: ChecksumRegistry, body: Any) -> Any:
    async def main() -> Any:
        async with trio.open_nursery() as nursery:
            registry.attach(nursery)
            result = await body()
            registry.attach(None)
            return result
    return trio.run(main)


def test_the_registry_keeps_records_and_looks_up_checksums(tmp_path: Path) -> None:
    store = ChecksumStore(tmp_path)
    counters = Counters()
    registry = ChecksumRegistry(store, counters)
    ident = FileIdentity(1, 2, 3, 4, 5)

    async def body() -> list[str | None]:
        registry.completed(b"f", ident, "a" * 32)
        return [await registry.lookup(ident), await registry.lookup(ident._replace(ino=9))]

    assert registry_run(registry, body) == ["a" * 32, None]
    assert registry.known() == {ident: "a" * 32}
    assert store.get(ident) == "a" * 32 and counters.checksums_computed == 1
    later = ChecksumRegistry(store, Counters())                 # a later mount
    assert registry_run(later, lambda: later.lookup(ident)) == "a" * 32
    store.close()


def test_a_different_checksum_for_the_same_identity_is_reported_as_corruption(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = ChecksumStore(tmp_path)
    ident = FileIdentity(1, 2, 3, 4, 5)
    assert store.record(ident, "a" * 32, b"f") is None       # long after its ctime: not racy
    counters = Counters()
    registry = ChecksumRegistry(store, counters)

    async def body() -> None:
        registry.completed(b"f", ident, "b" * 32)

    with caplog.at_level(logging.ERROR, logger="stfs"):
        registry_run(registry, body)
    assert counters.corruptions_detected == 1 and "SOURCE CORRUPTION" in caplog.text
    assert registry.known() == {ident: "a" * 32}                # the recorded one stands
    store.close()
