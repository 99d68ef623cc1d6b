"""faultfs itself (tests/faultfs.py): the fault-injecting SOURCE of the end-to-end tests.

Read through a plain reader of the faultfs mount, with no stfs in between:
passthrough is byte-identical, injected errors reach the reader with their
errno, seeded probabilities are reproducible, slow replies are slow (and served
in parallel, each taking its delay, like a network store's), corruption
changes bytes but no attribute, files rewritten in BACKING are seen at once,
holds make a rewrite atomic, and stop() leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faultfs import FSTYPE, FaultFS, _mount_fstype, faultfs_mount

MIB = 1024 * 1024
BLOCK = 4096


@pytest.fixture
def faultfs(tmp_path: Path) -> Iterator[FaultFS]:
    backing = tmp_path / "faultfs-backing"
    (backing / "sub" / "deeper").mkdir(parents=True)
    (backing / "big.bin").write_bytes(os.urandom(3 * MIB + 17))
    (backing / "small.txt").write_text("hello, faultfs\n")
    (backing / "empty").write_bytes(b"")
    (backing / "sub" / "deeper" / "mid.bin").write_bytes(os.urandom(200_000))
    (backing / "sub" / "other.bin").write_bytes(os.urandom(64 * 1024))
    os.symlink("small.txt", backing / "link")
    with faultfs_mount(tmp_path, seed=1) as fs:
        yield fs


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pread_errno(fd: int, offset: int, size: int = BLOCK) -> int | None:
    """The errno of one pread, or None if it succeeded."""
    try:
        os.pread(fd, size, offset)
    except OSError as exc:
        return exc.errno
    return None


def test_passthrough_is_identical(faultfs: FaultFS) -> None:
    mnt, backing = faultfs.mountpoint, faultfs.backing
    assert _mount_fstype(mnt) == FSTYPE
    for rel in ("big.bin", "small.txt", "empty", "sub/deeper/mid.bin", "sub/other.bin"):
        assert sha256(mnt / rel) == sha256(backing / rel), rel
        got, want = os.stat(mnt / rel), os.stat(backing / rel)
        assert (got.st_ino, got.st_size, got.st_mtime_ns, got.st_mode) == \
            (want.st_ino, want.st_size, want.st_mtime_ns, want.st_mode)
    assert sorted(os.listdir(mnt)) == sorted(os.listdir(backing))
    assert sorted(os.listdir(mnt / "sub")) == ["deeper", "other.bin"]
    assert os.readlink(mnt / "link") == "small.txt"
    with pytest.raises(OSError) as info:
        (mnt / "new").write_text("x")
    assert info.value.errno == errno.EROFS


@pytest.mark.parametrize("kind", ["EIO", "ESTALE", "ETIMEDOUT", "EAGAIN"])
def test_errors_by_index_reach_the_reader(faultfs: FaultFS, kind: str) -> None:
    faultfs.set_rules([{"op": "read", "path": "big.bin", "kind": kind, "nth": [1, 3]}])
    fd = os.open(faultfs.mountpoint / "big.bin", os.O_RDONLY)
    try:
        got = [pread_errno(fd, i * BLOCK) for i in range(5)]
    finally:
        os.close(fd)
    code = getattr(errno, kind)
    assert got == [None, code, None, code, None]
    stats = faultfs.stats()
    assert stats["injected"] == {kind: 2}
    assert stats["rules"] == [{"calls": 5, "injected": 2}]


def test_rules_match_op_path_and_count(faultfs: FaultFS) -> None:
    faultfs.set_rules([{"op": "read", "path": "sub/*", "kind": "EIO", "count": 2},
                       {"op": "open", "path": "small.txt", "kind": "EACCES"}])
    fd = os.open(faultfs.mountpoint / "big.bin", os.O_RDONLY)  # not under sub/: untouched
    try:
        assert [pread_errno(fd, 0) for _ in range(3)] == [None, None, None]
    finally:
        os.close(fd)
    fd = os.open(faultfs.mountpoint / "sub" / "deeper" / "mid.bin", os.O_RDONLY)  # * spans /
    try:
        assert [pread_errno(fd, 0) for _ in range(4)] == [errno.EIO, errno.EIO, None, None]
    finally:
        os.close(fd)
    with pytest.raises(PermissionError):
        os.open(faultfs.mountpoint / "small.txt", os.O_RDONLY)
    faultfs.set_rules([])
    assert (faultfs.mountpoint / "small.txt").read_text() == "hello, faultfs\n"


def test_an_offset_rule_hits_only_reads_that_include_the_offset(faultfs: FaultFS) -> None:
    faultfs.set_rules([{"op": "read", "path": "big.bin", "kind": "EIO", "offset": MIB,
                        "nth": [1]}])
    fd = os.open(faultfs.mountpoint / "big.bin", os.O_RDONLY)
    try:
        got = [pread_errno(fd, offset) for offset in
               (0, MIB, 2 * MIB, MIB - BLOCK // 2, MIB + BLOCK, MIB)]
    finally:
        os.close(fd)
    # Reads including byte MIB: the 2nd, 4th (straddling it) and 6th; the 2nd of them fails.
    assert got == [None, None, None, errno.EIO, None, None]
    assert faultfs.stats()["rules"] == [{"calls": 3, "injected": 1}]


def test_bad_rules_are_refused(faultfs: FaultFS) -> None:
    faultfs.set_rules([{"op": "read", "kind": "EIO", "nth": [0]}])
    for bad in ({"op": "write"}, {"kind": "ENOTANERRNO"}, {"probability": 2},
                {"nth": "0"}, {"offset": -1}, {"colour": "red"}):
        with pytest.raises(ValueError):
            faultfs.set_rules([bad])
    assert faultfs.stats()["rules"] == [{"calls": 0, "injected": 0}]  # the old rules stay


def test_probability_is_seeded(faultfs: FaultFS) -> None:
    def run(seed: int) -> list[int | None]:
        faultfs.set_rules([{"op": "read", "path": "big.bin", "kind": ["EIO", "ETIMEDOUT"],
                            "probability": 0.3}], seed=seed)
        fd = os.open(faultfs.mountpoint / "big.bin", os.O_RDONLY)
        try:
            return [pread_errno(fd, (i * BLOCK) % (3 * MIB)) for i in range(300)]
        finally:
            os.close(fd)

    first = run(7)
    failed = [e for e in first if e is not None]
    assert 0.2 * 300 < len(failed) < 0.4 * 300
    assert set(failed) == {errno.EIO, errno.ETIMEDOUT}
    assert run(7) == first
    assert run(8) != first


def test_slow_replies(faultfs: FaultFS) -> None:
    # The delays are the floors; the reply without one must come sooner than the
    # shorter delay, a margin a loaded machine keeps (a read is milliseconds).
    faultfs.set_rules([{"op": "read", "kind": "slow", "delay_s": 1.0, "nth": [0]},
                       {"op": "read", "kind": "EIO", "delay_s": 0.8, "nth": [2]}])
    fd = os.open(faultfs.mountpoint / "big.bin", os.O_RDONLY)
    try:
        times = []
        for i in range(3):
            began = time.monotonic()
            code = pread_errno(fd, i * BLOCK)
            times.append(time.monotonic() - began)
    finally:
        os.close(fd)
    assert code == errno.EIO
    assert times[0] >= 1.0 and times[1] < 0.8 and times[2] >= 0.8, times
    assert faultfs.stats()["injected"] == {"slow": 1, "EIO": 1}


def concurrent_preads(path: Path, n: int, size: int = 65536) -> tuple[float, list[float]]:
    """*n* threads pread *size* bytes each at distinct offsets, started together:
    (wall time of all, each one's time)."""
    fd = os.open(path, os.O_RDONLY)
    barrier = threading.Barrier(n + 1)
    times = [0.0] * n

    def one(i: int) -> None:
        barrier.wait()
        began = time.monotonic()
        assert len(os.pread(fd, size, i * size)) == size
        times[i] = time.monotonic() - began

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    try:
        for t in threads:
            t.start()
        barrier.wait()
        began = time.monotonic()
        for t in threads:
            t.join(30)
        return time.monotonic() - began, times
    finally:
        os.close(fd)


@pytest.mark.parametrize("how", ["read_delay", "slow_rule"])
def test_delayed_requests_are_served_in_parallel(faultfs: FaultFS, how: str) -> None:
    """A slow store is slow per request, not one request at a time: 8 concurrent
    reads of 0.5 s each finish together, well before 8 x 0.5 s (the margin, 2 s,
    is for a loaded machine starting the threads and passing the requests)."""
    delay = 0.5
    if how == "read_delay":
        faultfs.set_read_delay(delay)
    else:
        faultfs.set_rules([{"op": "read", "kind": "slow", "delay_s": delay}])
    faultfs.reset_stats()
    wall, times = concurrent_preads(faultfs.mountpoint / "big.bin", 8)
    assert all(t >= delay for t in times), times
    assert wall < 4 * delay, (wall, times)
    assert faultfs.stats()["reads"] == 8


def test_read_delay_is_set_from_the_command_line_and_the_control_socket(
        tmp_path: Path) -> None:
    backing = tmp_path / "faultfs-backing"
    backing.mkdir()
    (backing / "f.bin").write_bytes(os.urandom(8192))
    with faultfs_mount(tmp_path, read_delay_s=1.0) as fs:
        assert fs.stats()["read_delay_s"] == 1.0
        fd = os.open(fs.mountpoint / "f.bin", os.O_RDONLY)
        try:
            began = time.monotonic()
            os.pread(fd, BLOCK, 0)
            assert time.monotonic() - began >= 1.0
            fs.set_read_delay(0)
            assert fs.stats()["read_delay_s"] == 0
            began = time.monotonic()
            os.pread(fd, BLOCK, BLOCK)
            assert time.monotonic() - began < 1.0          # no delay: milliseconds
            for bad in (-1, 7200, "soon"):
                with pytest.raises(ValueError):
                    fs.set_read_delay(bad)  # type: ignore[arg-type]
            assert fs.stats()["read_delay_s"] == 0
            assert fs.stats()["injected"] == {}               # a delay, not an injection
        finally:
            os.close(fd)


def test_corrupt_changes_bytes_not_attributes(faultfs: FaultFS) -> None:
    faultfs.set_rules([{"op": "read", "path": "big.bin", "kind": "corrupt", "nth": [0]}])
    path = faultfs.mountpoint / "big.bin"
    fd = os.open(path, os.O_RDONLY)
    try:
        before = os.fstat(fd)
        bad = os.pread(fd, 65536, 0)
        good = os.pread(fd, 65536, 0)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    want = (faultfs.backing / "big.bin").read_bytes()[:65536]
    assert len(bad) == len(want) and bad != want
    assert sum(a != b for a, b in zip(bad, want)) <= 4
    assert good == want
    assert (before.st_size, before.st_mtime_ns, before.st_ctime_ns) == \
        (after.st_size, after.st_mtime_ns, after.st_ctime_ns)
    assert faultfs.stats()["injected"] == {"corrupt": 1}


def test_rewrite_in_place_is_seen_through_open_handle(faultfs: FaultFS) -> None:
    backing, path = faultfs.backing / "sub" / "other.bin", faultfs.mountpoint / "sub" / "other.bin"
    fd = os.open(path, os.O_RDONLY)
    try:
        old = os.pread(fd, 65536, 0)
        assert old == backing.read_bytes()
        ino = os.fstat(fd).st_ino
        new = os.urandom(65536)
        with open(backing, "r+b") as f:
            f.write(new)
        os.utime(backing, ns=(1_000_000_000_123, 2_000_000_000_456))
        time.sleep(0.03)  # attributes fetched in this kernel tick count as fresh
        assert os.pread(fd, 65536, 0) == new
        st = os.fstat(fd)
        assert (st.st_ino, st.st_mtime_ns) == (ino, 2_000_000_000_456)
        assert os.stat(path).st_mtime_ns == 2_000_000_000_456
        with open(backing, "ab") as f:  # grown: the new size is seen (after a tick)
            f.write(b"tail")
        time.sleep(0.03)
        assert os.fstat(fd).st_size == 65540
        assert os.pread(fd, 100, 65536) == b"tail"
    finally:
        os.close(fd)
    assert path.read_bytes() == new + b"tail"


def test_replaced_file_is_a_new_node(faultfs: FaultFS) -> None:
    backing, path = faultfs.backing / "small.txt", faultfs.mountpoint / "small.txt"
    fd = os.open(path, os.O_RDONLY)
    try:
        old_ino = os.fstat(fd).st_ino
        tmp = faultfs.backing / ".small.tmp"
        tmp.write_text("replaced\n")
        os.replace(tmp, backing)
        time.sleep(0.03)
        assert os.pread(fd, 100, 0) == b"hello, faultfs\n"  # the open file is the old one
        assert os.fstat(fd).st_ino == old_ino
    finally:
        os.close(fd)
    assert path.read_text() == "replaced\n"
    assert os.stat(path).st_ino == os.stat(backing).st_ino != old_ino


def test_hold_blocks_until_release(faultfs: FaultFS) -> None:
    path = faultfs.mountpoint / "sub" / "other.bin"
    fd = os.open(path, os.O_RDONLY)
    done = threading.Event()
    result: list[bytes] = []

    def reader() -> None:
        result.append(os.pread(fd, 10, 0))
        done.set()

    try:
        before = os.fstat(fd)  # the kernel now holds these attributes for this tick
        with faultfs.held("sub/other.bin"):
            thread = threading.Thread(target=reader, daemon=True)
            thread.start()
            assert not done.wait(0.3)
            with open(faultfs.backing / "sub" / "other.bin", "r+b") as f:
                f.write(b"0123456789")
        after = os.fstat(fd)  # at once: a hold outlasts the kernel tick
        assert done.wait(5)
        thread.join(5)
    finally:
        os.close(fd)
    assert result == [b"0123456789"]
    assert (after.st_mtime_ns, after.st_ctime_ns) != (before.st_mtime_ns, before.st_ctime_ns)


def test_stats_and_events(faultfs: FaultFS) -> None:
    faultfs.reset_stats()
    faultfs.set_rules([{"op": "read", "path": "sub/deeper/mid.bin", "kind": "EIO", "nth": [2]}])
    since = faultfs.events()["next"]
    fd = os.open(faultfs.mountpoint / "sub" / "deeper" / "mid.bin", os.O_RDONLY)
    try:
        codes = [pread_errno(fd, i * 1000, 1000) for i in range(4)]
    finally:
        os.close(fd)
    assert codes == [None, None, errno.EIO, None]
    stats = faultfs.stats()
    assert stats["reads"] == 3 and stats["read_bytes"] == 3000
    assert stats["ops"]["read"] == 4 and stats["ops"]["open"] == 1
    assert stats["injected"] == {"EIO": 1}
    events = faultfs.events(since)
    assert [e[2:] for e in events["events"]] == [["read", "sub/deeper/mid.bin", "EIO"]]
    assert abs(events["events"][0][1] - time.monotonic()) < 10  # the same clock
    faultfs.reset_stats()
    assert faultfs.stats()["reads"] == 0


def test_stop_leaves_nothing(tmp_path: Path) -> None:
    with faultfs_mount(tmp_path) as fs:
        assert fs.is_mounted()
        pid = fs.pid
        (fs.backing / "f").write_text("x")
        fd = os.open(fs.mountpoint / "f", os.O_RDONLY)  # a file still open does not stop it
        try:
            assert fs.stop() == 0
        finally:
            with contextlib.suppress(OSError):  # ENOTCONN: flush has no daemon to go to
                os.close(fd)
        assert not fs.is_mounted()
        assert not os.path.exists(f"/proc/{pid}") or \
            Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        assert fs.stop() == 0  # idempotent
        assert not fs.control.exists()
    assert _mount_fstype(tmp_path / "faultfs-mnt") != FSTYPE


def test_killed_process_is_cleaned_up(tmp_path: Path) -> None:
    with faultfs_mount(tmp_path) as fs:
        fs.proc.kill()
        fs.proc.wait(10)
        fs.stop()
        assert not fs.is_mounted()
