"""Mount lifecycle through real mounts: daemon readiness, unmount, busy mounts,
signals, stale mounts, remounts, and that unmounting or closing frees everything.

Every mount made outside the ``mounter`` fixture is cleaned up in a ``finally``
(``stfs umount``, then the daemon ended by PID, then ``fusermount3 -uz``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stfs.mountinfo import mount_at
from tests.conftest import (
    STFS,
    Mount,
    cleanup_mount,
    daemon_pids,
    is_mounted,
    pid_alive,
    run_stfs,
    run_stfs_detached,
    wait_for,
)

MIB = 1024 * 1024
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


# -- helpers ---------------------------------------------------------------


def stats_of(mountpoint: Path) -> dict[str, object]:
    result = run_stfs("stats", "--json", str(mountpoint), timeout=15)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


@contextlib.contextmanager
def cleaned(mountpoint: Path) -> Iterator[list[int]]:
    """Whatever gets mounted at *mountpoint* inside is gone afterwards; add PIDs to the list."""
    pids: list[int] = []
    try:
        yield pids
    finally:
        cleanup_mount(mountpoint, pids)


def daemon_mount(source: Path | None, mountpoint: Path, *options: str,
                 pids: list[int]) -> subprocess.CompletedProcess[str]:
    """``stfs mount [options] SOURCE MOUNTPOINT`` (daemonizing; ``--demo`` when *source* is
    None); records the daemon's PID."""
    args = ["mount", *options] + ([str(source)] if source is not None else ["--demo"]) + [
        str(mountpoint)]
    result = run_stfs_detached(*args)
    if result.returncode == 0 and is_mounted(mountpoint):
        pids.append(int(stats_of(mountpoint)["pid"]))  # type: ignore[call-overload]
    return result


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    detail = f"exit {result.returncode}\nstderr: {result.stderr!r}"
    assert "Traceback" not in result.stderr, detail
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("stfs: "), detail
    return lines[0]


def daemon_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def inode_map(root: Path) -> dict[str, int]:
    """relative path -> st_ino for everything under *root* (symlinks not followed)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            found[os.path.relpath(full, root)] = os.lstat(full).st_ino
    return found


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    return path


# -- daemon mode -------------------------------------------------------------


def test_daemon_mount_exits_zero_only_once_the_mount_is_live(source: Path, mnt: Path) -> None:
    expected = sorted(os.listdir(source))
    for _ in range(3):
        with cleaned(mnt) as pids:
            result = daemon_mount(source, mnt, pids=pids)
            # immediately, with no waiting: the mount answers
            assert result.returncode == 0, result.stderr
            assert sorted(os.listdir(mnt)) == expected
            entry = mount_at(os.path.realpath(mnt))
            assert entry is not None and entry.fstype == "fuse.stfs"
            assert (mnt / "hello.txt").read_text() == "hello, world\n"
            assert "Traceback" not in result.stderr
            assert result.stderr == ""
            umount = run_stfs("umount", str(mnt))
            assert umount.returncode == 0, umount.stderr
            assert not is_mounted(mnt)
            assert pids and wait_for(lambda: not pid_alive(pids[0]), 30), "daemon did not exit"
            assert os.listdir(mnt) == []


def test_umount_unmounts_and_the_daemon_exits(source: Path, mnt: Path) -> None:
    with cleaned(mnt) as pids:
        assert daemon_mount(source, mnt, pids=pids).returncode == 0
        pid = pids[0]
        assert pid_alive(pid)
        result = run_stfs("umount", str(mnt))
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        assert mount_at(os.path.realpath(mnt)) is None
        assert wait_for(lambda: not pid_alive(pid), 30), f"daemon {pid} still running"
        # and the place is free for the next mount at once
        assert daemon_mount(source, mnt, pids=pids).returncode == 0
        assert (mnt / "hello.txt").read_text() == "hello, world\n"


def test_daemon_failure_is_reported_as_one_line_with_nonzero_exit() -> None:
    base = Path(tempfile.mkdtemp(prefix="stfs-life-", dir="/tmp"))
    point = base / "mnt"
    try:
        base.chmod(0o755)
        src = base / "src"
        src.mkdir()
        (src / "a").write_text("a\n")
        point.mkdir()  # owned by root: user nobody may not mount here
        with cleaned(point):
            result = subprocess.run([*NOBODY, *STFS, "mount", str(src), str(point)],
                                    capture_output=True, text=True, timeout=60,
                                    stdin=subprocess.DEVNULL, check=False)
            assert result.returncode != 0
            line = one_error_line(result)
            assert str(point) in line
            assert not is_mounted(point)
            assert wait_for(lambda: not daemon_pids(point), 30), "the failed daemon lingers"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("with_log_file", [False, True], ids=["no-log-file", "log-file"])
def test_daemon_does_not_keep_the_callers_output_open(source: Path, mnt: Path, tmp_path: Path,
                                                      with_log_file: bool) -> None:
    """`out=$(stfs mount ...)` must return: the daemon lets go of the caller's pipes."""
    options = ["--log-file", str(tmp_path / "daemon.log")] if with_log_file else []
    with cleaned(mnt) as pids:
        proc = subprocess.Popen([*STFS, "mount", *options, str(source), str(mnt)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        try:
            assert proc.wait(60) == 0
            pids.append(int(stats_of(mnt)["pid"]))  # type: ignore[call-overload]
            for pipe, name in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
                assert pipe is not None
                ready, _, _ = select.select([pipe], [], [], 3)
                assert ready, f"the daemon still holds the caller's {name} open"
                assert pipe.read() == b"", name
        finally:
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()


def test_daemon_keeps_no_directory_of_the_caller_busy(source: Path, mnt: Path,
                                                      tmp_path: Path) -> None:
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    with cleaned(mnt) as pids:
        result = run_stfs_detached("mount", str(source), str(mnt), cwd=str(workdir))
        assert result.returncode == 0, result.stderr
        pids.append(int(stats_of(mnt)["pid"]))  # type: ignore[call-overload]
        assert os.readlink(f"/proc/{pids[0]}/cwd") == "/"


def test_relative_paths_work_for_mount_stats_and_umount(source: Path, mnt: Path) -> None:
    cwd = str(mnt.parent)
    with cleaned(mnt) as pids:
        result = run_stfs_detached("mount", os.path.relpath(source, cwd), "mnt", cwd=cwd)
        assert result.returncode == 0, result.stderr
        assert is_mounted(mnt)
        stats = run_stfs("stats", "--json", "mnt/", cwd=cwd)
        assert stats.returncode == 0, stats.stderr
        pid = json.loads(stats.stdout)["pid"]
        pids.append(pid)
        assert json.loads(stats.stdout)["mountpoint"] == os.path.realpath(mnt)
        umount = run_stfs("umount", "mnt/", cwd=cwd)
        assert umount.returncode == 0, umount.stderr
        assert not is_mounted(mnt)
        assert wait_for(lambda: not pid_alive(pid), 30)


# -- busy mounts -------------------------------------------------------------------


@contextlib.contextmanager
def holder_in(path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process whose working directory is inside *path* (keeps the mount busy)."""
    proc = subprocess.Popen(["sleep", "30"], cwd=str(path), stdin=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: os.path.exists(f"/proc/{proc.pid}/cwd")
                        and os.readlink(f"/proc/{proc.pid}/cwd") == str(path), 5)
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_umount_of_a_busy_mount_fails_and_the_mount_stays(mounted: Mount) -> None:
    point = mounted.mountpoint
    with holder_in(point / "dir"):
        result = run_stfs("umount", str(point))
        assert result.returncode == 1, result.stderr
        line = one_error_line(result)
        assert "busy" in line.lower()
        assert str(point) in line
        assert is_mounted(point)
        assert (point / "hello.txt").read_text() == "hello, world\n"
        assert mounted.proc is not None and mounted.proc.poll() is None


def test_lazy_umount_detaches_a_busy_mount_and_the_daemon_exits_after(mounted: Mount) -> None:
    point = mounted.mountpoint
    assert mounted.proc is not None
    with holder_in(point / "dir") as holder:
        umount = subprocess.Popen([*STFS, "umount", "--lazy", str(point)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            assert wait_for(lambda: mount_at(os.path.realpath(point)) is None, 30), \
                "the lazy unmount did not detach the busy mount"
            assert holder.poll() is None
            assert os.listdir(point) == []  # the mount point is the plain directory again
            holder.kill()
            holder.wait()
            _, err = umount.communicate(timeout=20)
            assert umount.returncode == 0, err
            assert err == ""
        finally:
            if umount.poll() is None:
                umount.kill()
                umount.wait()
    assert mounted.proc.wait(10) == 0, "the daemon did not exit once the mount was released"


def test_lazy_umount_of_a_busy_mount_returns_promptly(mounted: Mount) -> None:
    point = mounted.mountpoint
    with holder_in(point):
        started = time.monotonic()
        umount = subprocess.Popen([*STFS, "umount", "--lazy", str(point)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        try:
            try:
                umount.wait(15)         # a loaded machine starts Python slowly; the holder
            except subprocess.TimeoutExpired:  # stays 30 s, so blocking still shows
                pytest.fail("stfs umount --lazy blocks while the detached mount is still in use "
                            f"({time.monotonic() - started:.1f}s and counting)")
            assert umount.returncode == 0
            assert mount_at(os.path.realpath(point)) is None
        finally:
            if umount.poll() is None:
                umount.kill()
                umount.wait()
            if umount.stderr is not None:
                umount.stderr.close()


# -- signals, stale mounts ------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_foreground_daemon_unmounts_cleanly_and_exits_zero(mounter, source: Path,  # type: ignore[no-untyped-def]
                                                                    signum: int) -> None:
    mount = mounter(source)
    assert (mount.mountpoint / "hello.txt").read_text() == "hello, world\n"
    mount.proc.send_signal(signum)
    assert mount.proc.wait(15) == 0
    assert mount_at(os.path.realpath(mount.mountpoint)) is None
    assert os.listdir(mount.mountpoint) == []  # not a stale "Transport endpoint" mount
    assert "Traceback" not in mount.log()


def test_signal_to_daemonized_mount_unmounts_cleanly(source: Path, mnt: Path) -> None:
    with cleaned(mnt) as pids:
        assert daemon_mount(source, mnt, pids=pids).returncode == 0
        os.kill(pids[0], signal.SIGTERM)
        assert wait_for(lambda: not pid_alive(pids[0]), 30)
        assert mount_at(os.path.realpath(mnt)) is None
        assert os.listdir(mnt) == []


def test_stale_mount_after_kill_9_is_cleaned_up_by_next_mount(mounter, source: Path) -> None:  # type: ignore[no-untyped-def]
    mount = mounter(source)
    point = mount.mountpoint
    mount.proc.send_signal(signal.SIGKILL)
    mount.proc.wait(10)
    # what a supervisor restarting the daemon would do: remount at once
    with pytest.raises(OSError) as info:
        os.listdir(point)
    assert info.value.errno == errno.ENOTCONN  # "Transport endpoint is not connected"
    with cleaned(point) as pids:
        result = daemon_mount(source, point, pids=pids)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        assert sorted(os.listdir(point)) == sorted(os.listdir(source))
        assert (point / "data.bin").read_bytes() == (source / "data.bin").read_bytes()
        with open("/proc/self/mountinfo") as f:
            stfs_mounts = [m for m in f if f" {point} " in m]
        assert len(stfs_mounts) == 1, stfs_mounts  # the stale one is gone, not shadowed


def test_stale_mount_is_cleaned_up_once_cached_attributes_expired(mounter, source: Path) -> None:  # type: ignore[no-untyped-def]
    first = mounter(source)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    time.sleep(1.5)  # past --attr-timeout (1 s): the kernel no longer answers stat from cache
    second = mounter(source, mountpoint=first.mountpoint,
                     allow_log=("stale mount",))
    assert (second.mountpoint / "hello.txt").read_text() == "hello, world\n"
    assert second.unmount() == 0
    assert mount_at(os.path.realpath(second.mountpoint)) is None


def test_umount_of_a_stale_mount_succeeds_promptly(mounter, source: Path) -> None:  # type: ignore[no-untyped-def]
    mount = mounter(source)
    point = mount.mountpoint
    mount.proc.send_signal(signal.SIGKILL)
    mount.proc.wait(10)
    umount = subprocess.Popen([*STFS, "umount", str(point)], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        try:
            umount.wait(4)
        except subprocess.TimeoutExpired:
            pytest.fail("stfs umount of a stale mount (daemon killed) hangs: it waits for "
                        "the control socket the dead daemon left behind")
        assert umount.returncode == 0
        assert mount_at(os.path.realpath(point)) is None
        assert os.listdir(point) == []
    finally:
        if umount.poll() is None:
            umount.kill()
            umount.wait()
        if umount.stderr is not None:
            umount.stderr.close()


# -- where and how often ----------------------------------------------------------------


def test_mount_over_source_itself_shows_the_original_content(mounter, source: Path) -> None:  # type: ignore[no-untyped-def]
    names = sorted(os.listdir(source))
    data = (source / "data.bin").read_bytes()
    inodes = inode_map(source)
    mount = mounter(source, mountpoint=source)
    assert is_mounted(source)
    assert sorted(os.listdir(source)) == names
    assert (source / "data.bin").read_bytes() == data
    assert (source / "dir" / "sub" / "deep.txt").read_text() == "deep\n"
    assert os.readlink(source / "link") == "hello.txt"
    assert inode_map(source) == inodes
    with pytest.raises(OSError) as info:
        (source / "new").write_text("x")
    assert info.value.errno == errno.EROFS
    assert mount.unmount() == 0
    assert sorted(os.listdir(source)) == names  # SOURCE untouched


def test_remount_cycles_work_and_inode_numbers_stay_the_same(mounter, source: Path,  # type: ignore[no-untyped-def]
                                                             mnt: Path) -> None:
    backing = inode_map(source)
    seen = []
    for _ in range(5):
        mount = mounter(source, mountpoint=mnt)
        seen.append(inode_map(mnt))
        assert (mnt / "hello.txt").read_text() == "hello, world\n"
        assert mount.unmount() == 0
        assert not is_mounted(mnt)
    assert all(s == seen[0] for s in seen)
    assert seen[0] == backing
    assert os.stat(mnt / "..").st_ino == os.stat(mnt.parent).st_ino


# -- nothing leaks ------------------------------------------------------------------------


def test_reading_files_leaves_no_open_handles(mounted: Mount, source: Path) -> None:
    point = mounted.mountpoint
    for name in ("hello.txt", "data.bin", "empty", "dir/sub/deep.txt", "dir/hardlink"):
        assert (point / name).read_bytes() == (source / name).read_bytes()
    assert wait_for(lambda: mounted.stats()["open_handles"] == 0, 30, interval=0.1), \
        mounted.stats()


def idle_handles(mount: Mount) -> bool:
    stats = mount.stats()
    return stats["open_handles"] == 0 and stats["open_dirs"] == 0


def test_open_and_close_cycles_return_daemon_to_idle(mounter, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "many"
    src.mkdir()
    for i in range(200):
        (src / f"f{i:03d}").write_bytes(b"%d\n" % i)
    mount = mounter(src)
    point = mount.mountpoint
    pid = mount.pid
    os.listdir(point)
    # The kernel sends RELEASEDIR after closedir returns: idle is counted once the
    # daemon has closed the directory (not after a sleep assumed long enough).
    assert wait_for(lambda: idle_handles(mount), 30, interval=0.05), mount.stats()
    idle = daemon_fds(pid)
    for cycle in range(2):
        fds = [os.open(point / f"f{i:03d}", os.O_RDONLY) for i in range(200)]
        try:
            assert os.pread(fds[7], 10, 0) == b"7\n"
            stats = mount.stats()
            assert stats["open_handles"] == 200, stats
            assert daemon_fds(pid) >= idle + 200
        finally:
            for fd in fds:
                os.close(fd)
        released = wait_for(lambda: mount.stats()["open_handles"] == 0
                            and daemon_fds(pid) == idle, 30, interval=0.05)
        assert released, (f"cycle {cycle}: open_handles={mount.stats()['open_handles']}, "
                          f"fds={daemon_fds(pid)} (idle {idle})")
    assert mount.unmount() == 0


def test_demo_mount_serves_the_demo_tree(tmp_path: Path, mnt: Path) -> None:
    state = tmp_path / "state"
    with cleaned(mnt) as pids:
        result = daemon_mount(None, mnt, "--state-dir", str(state), pids=pids)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        assert is_mounted(mnt)
        assert (mnt / "README.txt").is_file()
        assert "stfs" in (mnt / "README.txt").read_text()
        big = mnt / "large" / "dataset-64M.bin"
        assert big.stat().st_size == 64 * MIB
        with open(big, "rb") as f:
            f.seek(40 * MIB)
            got = f.read(MIB)
        with open(state / "demo-source" / "large" / "dataset-64M.bin", "rb") as f:
            f.seek(40 * MIB)
            assert got == f.read(MIB)
        umount = run_stfs("umount", str(mnt))
        assert umount.returncode == 0, umount.stderr
        assert wait_for(lambda: not pid_alive(pids[0]), 30)
