"""Checks before mounting: SOURCE and MOUNTPOINT, stale mounts, a hung mount.

Every path check probes in a thread with a timeout, since a hung FUSE mount
never answers; a stale stfs mount (its daemon gone, "Transport endpoint is
not connected") is detached lazily before the mount point is checked.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import subprocess
import threading

from stfs.errors import StfsError, path_error
from stfs.mountinfo import FSTYPE, mount_at, resolve

log = logging.getLogger("stfs")

PROBE_TIMEOUT_S = 5.0
_STALE_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED)


def probe_path(path: str, timeout: float = PROBE_TIMEOUT_S) -> os.stat_result | OSError | None:
    """stat *path* in a thread, since a hung FUSE mount never answers.

    statvfs comes first: unlike stat, which the kernel may answer from its
    attribute cache, it always reaches the file system, so a dead daemon shows
    as ENOTCONN at once. Returns the stat result, the OSError, or None when it
    did not answer in time.
    """
    result: list[os.stat_result | OSError] = []

    def run() -> None:
        try:
            os.statvfs(path)
            result.append(os.stat(path))
        except OSError as exc:
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    return result[0] if result else None


def detach(mountpoint: str) -> None:
    """Lazily unmount *mountpoint* (used for stale mounts)."""
    subprocess.run(["fusermount3", "-u", "-z", "-q", mountpoint],
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=False)
    entry = mount_at(mountpoint)
    if entry is not None and os.geteuid() == 0:
        subprocess.run(["umount", "-l", mountpoint], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def check_source(source: str) -> str:
    """SOURCE must be a readable directory; returns its resolved path."""
    try:
        st = os.stat(source)
    except OSError as exc:
        raise path_error(source, exc) from None
    if not stat.S_ISDIR(st.st_mode):
        raise StfsError(f"{source}: not a directory")
    try:
        fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            with os.scandir(fd) as it:
                next(it, None)
        finally:
            os.close(fd)
    except OSError as exc:
        raise path_error(source, exc) from None
    if not os.access(source, os.X_OK):
        raise StfsError(f"{source}: permission denied")
    return os.path.realpath(source)


def check_mountpoint(mountpoint: str, source: str) -> str:
    """MOUNTPOINT must be a directory that is not mounted and not inside SOURCE.

    A stale stfs mount (daemon gone: "Transport endpoint is not connected") is
    detached first. Returns the resolved mount point.
    """
    path = resolve(mountpoint)
    probe = probe_path(path)
    if isinstance(probe, OSError) and probe.errno in _STALE_ERRNOS:
        entry = mount_at(path)
        if entry is not None and entry.fstype.startswith("fuse"):
            log.warning("%s: cleaning up a stale mount left by a daemon that died", path)
            detach(path)
            probe = probe_path(path)
    if probe is None:
        raise StfsError(f"{mountpoint}: mount point does not respond "
                        "(a hung file system is mounted there)")
    if isinstance(probe, OSError):
        raise path_error(mountpoint, probe)
    if not stat.S_ISDIR(probe.st_mode):
        raise StfsError(f"{mountpoint}: not a directory")
    path = os.path.realpath(path)
    if path.startswith(source.rstrip("/") + "/"):
        raise StfsError(f"{mountpoint}: mount point is inside SOURCE {source} "
                        "(the view would contain itself)")
    entry = mount_at(path)
    if entry is not None and (path != source or entry.fstype == FSTYPE):
        raise StfsError(f"{mountpoint}: already a mount point ({entry.fstype} from "
                        f"{entry.source}); unmount it first")
    return path
