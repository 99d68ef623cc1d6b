"""Recovery end to end: stfs mounted over faultfs, a FUSE SOURCE that fails on demand.

stfs meets real EIO, ESTALE, EACCES and silently corrupted bytes from the
kernel, and files rewritten or appended to under a reader. Retry delays are
shortened with the retry options so the tests stay fast.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
import xxhash

from stfs.versions import RECHECK_S
from tests.conftest import Mount
from tests.faultfs import FaultFS, faultfs_mount
from tests.pagecache import pinned

MIB = 1024 * 1024
FAST_RETRIES = ("--retry-file-system", "3:0.01:2:0.05", "--retry-network", "5:0.01:1.5:0.05")


@pytest.fixture
def faulty(tmp_path: Path) -> Iterator[FaultFS]:
    """faultfs over ``tmp_path/faultfs-backing`` (requested before ``mounter``, so
    stfs on top of it is unmounted first)."""
    with faultfs_mount(tmp_path) as fs:
        yield fs


def write(fs: FaultFS, name: str, data: bytes, age_s: float = 0.0) -> Path:
    path = fs.backing / name
    path.write_bytes(data)
    if age_s:
        past = time.time_ns() - int(age_s * 1e9)
        os.utime(path, ns=(past, past))
    return path


def change(fs: FaultFS, name: str, data: bytes, mode: str = "r+b", settle: bool = True) -> None:
    """Write *data* into SOURCE's *name* in place (atomically as seen through
    faultfs); *settle*: then wait out the attribute timeout."""
    with fs.held(name), open(fs.backing / name, mode) as w:
        w.write(data)
    if settle:
        time.sleep(1.1)


def read_all(path: Path, request: int = MIB) -> bytes:
    with open(path, "rb", buffering=0) as f:
        chunks = []
        while chunk := f.read(request):
            chunks.append(chunk)
    return b"".join(chunks)


def read_on_to_eio(f: BinaryIO, got: bytearray) -> None:
    """Append what *f* reads from where it is to its end to *got*; an EIO
    (a file that changed under its reader) ends it early."""
    try:
        while chunk := f.read(MIB):
            got += chunk
    except OSError as exc:
        assert exc.errno == errno.EIO


def stfs_over(mounter, fs: FaultFS, *args: str, allow_log: tuple[str, ...] = ()) -> Mount:  # type: ignore[no-untyped-def]
    return mounter(fs.mountpoint, *FAST_RETRIES, *args, allow_log=allow_log)  # type: ignore[no-any-return]


def test_transient_faults_are_retried_and_the_copy_is_exact(faulty, mounter) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(4 * MIB + 123)
    write(faulty, "big", data)
    mount = stfs_over(mounter, faulty)
    # The first read of byte 0 is the reader's own (read-ahead starts further on).
    faulty.set_rules([{"op": "read", "path": "big", "kind": "EIO", "offset": 0, "nth": [0]},
                      {"op": "read", "path": "big", "kind": "EIO", "nth": [2]},
                      {"op": "read", "path": "big", "kind": "ETIMEDOUT", "nth": [5]}])
    assert read_all(mount.mountpoint / "big") == data
    injected = faulty.stats()["injected"]
    assert injected.get("EIO") == 2 and injected.get("ETIMEDOUT") == 1, injected
    stats = mount.stats()
    # The first read is the reader's own and is retried; later faults may hit a
    # read-ahead instead, which is dropped and read again on demand, unretried.
    assert stats["retries"] >= 1 and stats["recoveries"] >= 1, stats
    assert stats["errors"] == 0, mount.log()
    assert stats["interrupted_streams"] == 1 and stats["failed_streams"] == 0
    assert stats["recovered_streams"] == 1
    assert "retry 1 of 2 (file_system policy)" in mount.log()


def test_estale_reopens_the_file_and_goes_on(faulty, mounter) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(3 * MIB)
    write(faulty, "f", data)
    mount = stfs_over(mounter, faulty)
    # the reader's own first read (read-ahead starts further on)
    faulty.set_rules([{"op": "read", "path": "f", "kind": "ESTALE", "offset": 0, "nth": [0]}])
    assert read_all(mount.mountpoint / "f") == data
    stats = mount.stats()
    assert stats["backing_fds"]["reopens"] >= 1, stats["backing_fds"]
    assert stats["errors"] == 0 and stats["retries"] >= 1


def test_a_fault_that_persists_fails_with_its_errno_after_the_attempts(faulty, mounter) -> None:  # type: ignore[no-untyped-def]
    write(faulty, "bad", os.urandom(2 * MIB))
    mount = stfs_over(mounter, faulty)
    faulty.set_rules([{"op": "read", "path": "bad", "kind": "EIO"}])
    with pytest.raises(OSError) as caught:
        read_all(mount.mountpoint / "bad")
    assert caught.value.errno == errno.EIO
    stats = mount.stats()
    assert stats["errors"] >= 1 and stats["failed_streams"] == 1
    assert faulty.stats()["injected"]["EIO"] >= 3  # three attempts at least
    # the mount is fine afterwards
    faulty.clear_rules()
    write(faulty, "good", b"still serving\n")
    assert (mount.mountpoint / "good").read_bytes() == b"still serving\n"


def test_permission_errors_are_not_retried(faulty, mounter) -> None:  # type: ignore[no-untyped-def]
    write(faulty, "locked", os.urandom(256 * 1024))
    mount = stfs_over(mounter, faulty)
    faulty.set_rules([{"op": "read", "path": "locked", "kind": "EACCES"}])
    with pytest.raises(PermissionError):
        read_all(mount.mountpoint / "locked")
    assert mount.stats()["retries"] == 0


def test_a_file_rewritten_mid_read_fails_with_eio_and_never_mixes(faulty, mounter) -> None:  # type: ignore[no-untyped-def]
    old = os.urandom(12 * MIB)
    new = os.urandom(12 * MIB)
    write(faulty, "moving", old)
    mount = stfs_over(mounter, faulty, allow_log=())
    got = bytearray()
    with open(mount.mountpoint / "moving", "rb", buffering=0) as f:
        for _ in range(3):
            got += f.read(MIB)
        change(faulty, "moving", new, settle=False)
        # Chunks read ahead of the old version may be served whole for RECHECK_S
        # after the handle's last check (SEMANTICS.md); then the change is noticed.
        time.sleep(RECHECK_S + 0.1)
        with pytest.raises(OSError) as caught:
            while chunk := f.read(MIB):
                got += chunk
        assert caught.value.errno == errno.EIO
        with pytest.raises(OSError):  # the broken pass stays broken
            f.read(MIB)
    assert len(got) < len(old) and bytes(got) == old[:len(got)], "old and new bytes were mixed"
    assert mount.stats()["changed_files"] == 1
    assert "moving changed while being read" in mount.log()
    # a new pass gets the new version, whole
    assert read_all(mount.mountpoint / "moving") == new


def test_a_random_reader_whose_bytes_were_rewritten_gets_eio_not_new_bytes(faulty, mounter) -> None:  # type: ignore[no-untyped-def]
    old = os.urandom(8 * MIB)
    new = os.urandom(8 * MIB)
    write(faulty, "table", old)
    mount = stfs_over(mounter, faulty)
    offsets = (5 * MIB, 1 * MIB + 8192, 7 * MIB - 4096)
    fd = os.open(mount.mountpoint / "table", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for offset in offsets:
            assert os.pread(fd, 4096, offset) == old[offset:offset + 4096]
        change(faulty, "table", new)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # make the reads reach stfs
        with pytest.raises(OSError) as caught:
            os.pread(fd, 4096, 3 * MIB)
        assert caught.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert mount.stats()["changed_files"] == 1
    assert "table changed while being read" in mount.log()
    with open(mount.mountpoint / "table", "rb") as f:   # a new handle reads the new version
        f.seek(3 * MIB)
        assert f.read(4096) == new[3 * MIB:3 * MIB + 4096]


def test_a_reader_served_from_the_kernel_page_cache_gets_eio_not_the_new_rest(  # type: ignore[no-untyped-def]
        faulty, mounter) -> None:
    """A first full read leaves the file in the mount's page cache (kept across
    opens): a second reader's first half then never reaches stfs. The file is
    rewritten; the rest of that reader's pass must not be the new version."""
    old = os.urandom(8 * MIB)
    new = os.urandom(8 * MIB)
    write(faulty, "cached", old)
    mount = stfs_over(mounter, faulty)
    assert read_all(mount.mountpoint / "cached") == old
    got = bytearray()
    with open(mount.mountpoint / "cached", "rb", buffering=0) as f:
        with pinned(mount.mountpoint / "cached", 4 * MIB):  # reclaim could take some pages
            reads_before = mount.stats()["reads"]
            for _ in range(4):
                got += f.read(MIB)
            assert mount.stats()["reads"] == reads_before, (
                "the first half did not come from the page cache")
        change(faulty, "cached", new)
        read_on_to_eio(f, got)
    assert bytes(got) == old[:len(got)], "old and new bytes were mixed"
    assert len(got) < len(old)
    assert mount.stats()["changed_files"] == 1
    assert read_all(mount.mountpoint / "cached") == new


def test_a_new_reader_of_a_rewritten_file_never_hands_its_pages_to_an_old_one(  # type: ignore[no-untyped-def]
        faulty, mounter) -> None:
    """The kernel's page cache is shared by every handle of a file: a reader that
    opened the new version must not fill it with pages the old reader then gets."""
    old = os.urandom(8 * MIB)
    new = os.urandom(8 * MIB)
    write(faulty, "shared", old)
    mount = stfs_over(mounter, faulty)
    got = bytearray()
    with open(mount.mountpoint / "shared", "rb", buffering=0) as f:
        got += f.read(2 * MIB)
        change(faulty, "shared", new)
        assert read_all(mount.mountpoint / "shared") == new   # a new reader, whole
        read_on_to_eio(f, got)
    assert bytes(got) == old[:len(got)], "the old reader got pages of the new version"
    assert len(got) < len(old)


def test_a_file_appended_to_mid_read_is_read_on_to_its_new_end(faulty, mounter) -> None:  # type: ignore[no-untyped-def]
    old = os.urandom(6 * MIB)
    tail = os.urandom(MIB + 5)
    write(faulty, "log", old)
    mount = stfs_over(mounter, faulty)
    with open(mount.mountpoint / "log", "rb", buffering=0) as f:
        got = f.read(2 * MIB)
        change(faulty, "log", tail, mode="ab")
        while chunk := f.read(MIB):
            got += chunk
    assert got == old + tail
    assert mount.stats()["changed_files"] == 0


def test_checksum_is_shown_kept_across_remounts_and_corruption_is_detected(
        faulty, mounter, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(3 * MIB + 7)
    write(faulty, "dataset", data, age_s=60)
    state = tmp_path / "state"
    want = xxhash.xxh3_128(data).hexdigest()
    mount = stfs_over(mounter, faulty, "--state-dir", str(state))
    target = mount.mountpoint / "dataset"
    assert "user.stfs.xxh3_128" not in os.listxattr(target)
    assert read_all(target) == data
    assert os.getxattr(target, "user.stfs.xxh3_128").decode() == want
    assert "user.stfs.xxh3_128" not in os.listxattr(target)  # readable by name, never listed
    assert mount.stats()["checksums_computed"] == 1
    assert mount.unmount() == 0

    again = stfs_over(mounter, faulty, "--state-dir", str(state),
                      allow_log=("SOURCE CORRUPTION",))
    target = again.mountpoint / "dataset"
    assert os.getxattr(target, "user.stfs.xxh3_128").decode() == want  # before any read
    faulty.set_rules([{"op": "read", "path": "dataset", "kind": "corrupt", "count": 1}])
    assert read_all(target) != data
    deadline = time.monotonic() + 30
    while again.stats()["corruptions_detected"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert again.stats()["corruptions_detected"] == 1
    assert "SOURCE CORRUPTION: dataset" in again.log()
    assert os.getxattr(target, "user.stfs.xxh3_128").decode() == want  # the first one is kept


def test_open_close_cycles_and_held_files_return_to_idle(faulty, mounter) -> None:  # type: ignore[no-untyped-def]
    for i in range(50):
        write(faulty, f"s{i:02d}", b"%d\n" % i * 100)
    mount = stfs_over(mounter, faulty, "--max-open-fds", "16")
    point = mount.mountpoint
    os.listdir(point)
    # RELEASEDIR reaches the daemon after closedir returns: count idle once it has.
    deadline = time.monotonic() + 30
    while (mount.stats()["open_dirs"], mount.stats()["open_handles"]) != (0, 0):
        assert time.monotonic() < deadline, mount.stats()
        time.sleep(0.05)
    idle = len(os.listdir(f"/proc/{mount.pid}/fd"))
    for cycle in range(300):
        name = point / f"s{cycle % 50:02d}"
        assert name.read_bytes() == b"%d\n" % (cycle % 50) * 100
    held = [open(point / f"s{i:02d}", "rb") for i in range(50)]  # noqa: SIM115
    try:
        for i, f in enumerate(held):
            assert f.read() == b"%d\n" % i * 100
        stats = mount.stats()
        assert stats["open_handles"] == 50
        assert stats["backing_fds"]["open"] <= 16, stats["backing_fds"]
    finally:
        for f in held:
            f.close()
    deadline = time.monotonic() + 30                 # releases reach the daemon after close
    while time.monotonic() < deadline:
        stats = mount.stats()
        fds = len(os.listdir(f"/proc/{mount.pid}/fd"))
        if stats["open_handles"] == 0 and abs(fds - idle) <= 2:
            break
        time.sleep(0.05)
    assert stats["open_handles"] == 0 and abs(fds - idle) <= 2, (stats["resources"], fds, idle)
    assert stats["resources"]["tracked_total"] == 0
