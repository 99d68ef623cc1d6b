"""mount(8) and fstab: ``mount -t fuse.stfs`` and ``mount --fstab FILE`` with the
real util-linux mount, which hands ``fuse.stfs`` to mount.fuse3, which runs
``stfs SOURCE MOUNTPOINT -o rw,...`` through /bin/sh with the system PATH.

Needs root and ``/usr/local/bin/stfs`` (installed by scripts/setup as root; if
it is missing, the module installs the same wrapper for its own run and removes
it afterwards). Every mount is cleaned up in a ``finally``: ``stfs umount``,
then the daemon (PID from ``stfs stats --json``) ended if still alive, then
``fusermount3 -uz``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from stfs.mountinfo import mount_at
from tests.conftest import cleanup_mount, is_mounted, pid_alive, wait_for
from tests.mount.test_lifecycle import stats_of

WRAPPER = Path("/usr/local/bin/stfs")
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def installed() -> Iterator[Path]:
    """/usr/local/bin/stfs running this checkout's stfs for the module (as scripts/setup
    installs it); whatever was installed before is put back afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mount -t fuse.stfs and fstab mounts need root")
    if shutil.which("mount.fuse3") is None:
        pytest.skip("mount.fuse3 (package fuse3) is not installed")
    target = Path(sys.executable).parent / "stfs"
    if not os.access(target, os.X_OK):
        pytest.skip(f"/usr/local/bin/stfs cannot be installed: no {target}")
    before = WRAPPER.read_bytes() if WRAPPER.exists() else None
    try:
        WRAPPER.write_text(f"#!/bin/sh\nexec '{target}' \"$@\"\n")
        WRAPPER.chmod(0o755)
    except OSError as exc:
        pytest.skip(f"/usr/local/bin/stfs cannot be installed: {exc}")
    try:
        check = subprocess.run(["stfs", "--version"], check=False, capture_output=True, text=True,
                               timeout=30,
                               env={"PATH": "/usr/local/bin:" + SYSTEM_PATH},
                               stdin=subprocess.DEVNULL)
        assert check.returncode == 0 and check.stdout.startswith("stfs "), check
        yield WRAPPER
    finally:
        if before is None:
            with contextlib.suppress(FileNotFoundError):
                WRAPPER.unlink()
        else:
            WRAPPER.write_bytes(before)


@contextlib.contextmanager
def cleaned(mountpoint: Path) -> Iterator[list[int]]:
    pids: list[int] = []
    try:
        yield pids
    finally:
        if is_mounted(mountpoint):
            with contextlib.suppress(Exception):
                pids.append(int(stats_of(mountpoint)["pid"]))  # type: ignore[call-overload]
        cleanup_mount(mountpoint, pids)


def run_mount(*args: str) -> subprocess.CompletedProcess[str]:
    """util-linux mount with a minimal environment (as at boot)."""
    return subprocess.run(["mount", *args], check=False, capture_output=True, text=True,
                          timeout=60, env={"PATH": SYSTEM_PATH, "LANG": "C"},
                          stdin=subprocess.DEVNULL)


def check_served(source: Path, mountpoint: Path, pids: list[int]) -> dict[str, object]:
    assert is_mounted(mountpoint)
    stats = stats_of(mountpoint)
    pids.append(int(stats["pid"]))  # type: ignore[call-overload]
    assert (mountpoint / "hello.txt").read_text() == "hello, world\n"
    assert (mountpoint / "dir" / "sub" / "deep.txt").read_text() == "deep\n"
    assert (mountpoint / "data.bin").read_bytes() == (source / "data.bin").read_bytes()
    assert os.readlink(mountpoint / "link") == "hello.txt"
    stats = stats_of(mountpoint)
    assert stats["memory_limit_bytes"] == 32 * MIB
    assert stats["bytes_served"] >= (source / "data.bin").stat().st_size  # type: ignore[operator]
    with open(f"/proc/{stats['pid']}/cmdline", "rb") as f:
        argv = f.read().decode().split("\0")
    assert "-o" in argv and "mount" not in argv, argv  # mount.fuse3's form
    return stats


def umount_and_wait(mountpoint: Path, pid: int) -> None:
    result = subprocess.run(["umount", str(mountpoint)], check=False, capture_output=True,
                            text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert not is_mounted(mountpoint)
    assert wait_for(lambda: not pid_alive(pid), 15), f"daemon {pid} still running after umount"


def test_mount_t_fuse_stfs(installed: Path, source: Path, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with cleaned(mountpoint) as pids:
        result = run_mount("-t", "fuse.stfs", str(source), str(mountpoint),
                           "-o", "memory_limit=32M")
        assert result.returncode == 0, result.stderr
        stats = check_served(source, mountpoint, pids)
        entry = mount_at(str(mountpoint))
        assert entry is not None and entry.source == str(source)
        assert "ro" in entry.options.split(",")
        umount_and_wait(mountpoint, int(stats["pid"]))  # type: ignore[call-overload]


def test_mount_t_fuse_stfs_with_mount8_options(installed: Path, source: Path,
                                               tmp_path: Path) -> None:
    """rw, atime and suid/dev options, repeated -o: accepted and ignored, still read-only."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with cleaned(mountpoint) as pids:
        result = run_mount("-t", "fuse.stfs", "-o", "rw,nosuid,nodev,relatime",
                           "-o", "memory_limit=32M,max_streams=4", str(source), str(mountpoint))
        assert result.returncode == 0, result.stderr
        stats = check_served(source, mountpoint, pids)
        with pytest.raises(OSError):
            (mountpoint / "new").write_text("x")
        umount_and_wait(mountpoint, int(stats["pid"]))  # type: ignore[call-overload]


def test_mount_bad_option_fails_cleanly(installed: Path, source: Path, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with cleaned(mountpoint):
        result = run_mount("-t", "fuse.stfs", str(source), str(mountpoint),
                           "-o", "memory_limit=lots")
        assert result.returncode != 0
        assert "stfs: " in result.stderr and "memory" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert not is_mounted(mountpoint)


def test_fstab_line(installed: Path, source: Path, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text("# test fstab\n"
                     f"{source} {mountpoint} fuse.stfs memory_limit=32M,allow_other 0 0\n")
    with cleaned(mountpoint) as pids:
        result = run_mount("--fstab", str(fstab), str(mountpoint))
        assert result.returncode == 0, result.stderr
        stats = check_served(source, mountpoint, pids)
        entry = mount_at(str(mountpoint))
        assert entry is not None and "allow_other" in entry.options.split(","), entry
        umount_and_wait(mountpoint, int(stats["pid"]))  # type: ignore[call-overload]


def test_fstab_line_with_boot_options(installed: Path, source: Path, tmp_path: Path) -> None:
    """Options typical of fstab lines (nofail, _netdev, x-systemd.*, noatime) and -T."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{source}\t{mountpoint}\tfuse.stfs\tdefaults,nofail,_netdev,noatime,"
                     "x-systemd.requires=network-online.target,memory_limit=32M 0 0\n")
    with cleaned(mountpoint) as pids:
        result = run_mount("-T", str(fstab), str(mountpoint))
        assert result.returncode == 0, result.stderr
        stats = check_served(source, mountpoint, pids)
        umount_and_wait(mountpoint, int(stats["pid"]))  # type: ignore[call-overload]
