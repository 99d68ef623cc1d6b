"""Shared fixtures: real stfs mounts that are always unmounted, whatever happens.

``mounter`` starts ``stfs mount -f`` as a child process (so the test knows the
daemon's PID), waits until the mount answers, and in teardown unmounts
(``fusermount3 -u``, ``-uz`` as the last resort), ends the daemon by PID and
fails the test if the daemon logged an unexpected error or traceback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stfs.mountinfo import mount_at, mounts
from tests.pagecache import unpin_all

STFS = [sys.executable, "-m", "stfs"]
MOUNT_TIMEOUT_S = 20.0


def run_stfs(*args: str, timeout: float = 60, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run the stfs command line; output captured as text."""
    return subprocess.run([*STFS, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False, **kwargs)  # type: ignore[call-overload]


def run_stfs_detached(*args: str, timeout: float = 120,
                      **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Like run_stfs, but output goes to files: a daemon that keeps the caller's
    stdout/stderr open cannot make the call hang."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.run([*STFS, *args], stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                              timeout=timeout, check=False, **kwargs)  # type: ignore[call-overload]
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())


def is_mounted(path: Path | str) -> bool:
    entry = mount_at(os.path.realpath(path))
    return entry is not None and entry.fstype == "fuse.stfs"


def force_unmount(path: Path | str) -> None:
    """Last resort: lazy unmount, ignoring errors."""
    subprocess.run(["fusermount3", "-u", "-z", "-q", str(path)], stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def wait_for(predicate, timeout: float, interval: float = 0.02) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def pid_alive(pid: int) -> bool:
    """Whether *pid* runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in (b"Z", b"X")


def daemon_pids(mountpoint: Path) -> list[int]:
    """Our stfs daemons serving *mountpoint* (found by their command line)."""
    pids = []
    target = str(mountpoint)
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "stfs" in " ".join(args) and any(a.rstrip("/") == target for a in args):
            pids.append(int(entry))
    return [p for p in pids if pid_alive(p)]


def cleanup_mount(mountpoint: Path, pids: list[int]) -> None:
    """stfs umount, then end the daemon by PID, then fusermount3 -uz as the last resort."""
    pids = sorted(set(pids) | set(daemon_pids(mountpoint)))
    if is_mounted(mountpoint):
        try:
            os.statvfs(mountpoint)
        except OSError:  # stale or hung: no daemon to talk to
            force_unmount(mountpoint)
        else:
            with contextlib.suppress(subprocess.TimeoutExpired):
                run_stfs("umount", str(mountpoint), timeout=20)
    for pid in pids:
        if pid_alive(pid) and not wait_for(lambda pid=pid: not pid_alive(pid), 3):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not wait_for(lambda pid=pid: not pid_alive(pid), 5):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    if mount_at(os.path.realpath(mountpoint)) is not None:
        entry = mount_at(os.path.realpath(mountpoint))
        if entry is not None and entry.fstype.startswith("fuse"):
            force_unmount(mountpoint)


class Mount:
    """One foreground stfs daemon serving SOURCE at MOUNTPOINT."""

    def __init__(self, source: Path, mountpoint: Path, log_file: Path, args: list[str],
                 prefix: list[str] | None = None) -> None:
        self.prefix = prefix or []
        self.source = source
        self.mountpoint = mountpoint
        self.log_file = log_file
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Mount:
        self.proc = subprocess.Popen(
            [*self.prefix, *STFS, "mount", "-f", "--log-file", str(self.log_file), *self.args,
             str(self.source), str(self.mountpoint)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + MOUNT_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise AssertionError(f"stfs exited with {self.proc.returncode}: {err}\n"
                                     f"{self.log()}")
            if is_mounted(self.mountpoint) and "mounted " in self.log():
                return self
            time.sleep(0.02)
        raise AssertionError(f"stfs did not mount within {MOUNT_TIMEOUT_S}s\n{self.log()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stats(self) -> dict[str, object]:
        import json

        result = run_stfs("stats", "--json", str(self.mountpoint))
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)  # type: ignore[no-any-return]

    def unmount(self, timeout: float = 15) -> int | None:
        """Unmount and wait for the daemon; returns its exit status."""
        if self.proc is None:
            return None
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], stdin=subprocess.DEVNULL,
                           capture_output=True, check=False)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(5)
        finally:
            if is_mounted(self.mountpoint):
                force_unmount(self.mountpoint)
            if self.proc.stderr:
                self.proc.stderr.close()


UNEXPECTED_LOG = ("Traceback", " ERROR ", " CRITICAL ")


@pytest.fixture
def mounter(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    """Factory: ``mounter(source, *extra_args, mountpoint=None)`` -> a live Mount."""
    mounts: list[Mount] = []
    allowed: list[str] = []

    def make(source: Path, *args: str, mountpoint: Path | None = None,
             allow_log: tuple[str, ...] = (), prefix: list[str] | None = None) -> Mount:
        if mountpoint is None:
            mountpoint = tmp_path / f"mnt{len(mounts)}"
            mountpoint.mkdir()
        allowed.extend(allow_log)
        mount = Mount(source, mountpoint, tmp_path / f"stfs{len(mounts)}.log", list(args), prefix)
        mounts.append(mount)
        return mount.start()

    try:
        yield make
    finally:
        unpin_all()  # a mapped file keeps its mount busy
        for mount in reversed(mounts):
            mount.unmount()
    for mount in mounts:
        for line in mount.log().splitlines():
            if any(bad in line for bad in UNEXPECTED_LOG) and not any(a in line for a in allowed):
                pytest.fail(f"unexpected daemon log line: {line}")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A small SOURCE tree with a file of each common kind."""
    src = tmp_path / "source"
    (src / "dir" / "sub").mkdir(parents=True)
    (src / "hello.txt").write_text("hello, world\n")
    (src / "dir" / "sub" / "deep.txt").write_text("deep\n")
    (src / "data.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (src / "empty").write_bytes(b"")
    os.symlink("hello.txt", src / "link")
    os.link(src / "hello.txt", src / "dir" / "hardlink")
    return src


@pytest.fixture
def mounted(mounter, source: Path) -> Mount:  # type: ignore[no-untyped-def]
    """SOURCE from the ``source`` fixture, mounted with default options."""
    return mounter(source)  # type: ignore[no-any-return]


@pytest.fixture(autouse=True)
def _no_mount_left_behind(tmp_path: Path) -> Iterator[None]:
    """Whatever a test mounted under its tmp_path (even by mistake) is gone afterwards,
    and so is whatever it pinned in the page cache."""
    yield
    unpin_all()
    base = os.path.realpath(tmp_path) + "/"
    for _ in range(5):
        left = [e.mountpoint for e in mounts()
                if e.fstype.startswith("fuse") and e.mountpoint.startswith(base)]
        if not left:
            break
        for point in reversed(left):
            cleanup_mount(Path(point), [])
