"""Kernel-side tuning of a live mount: request size and background requests.

The kernel sends FUSE reads of at most ``max_pages`` pages (libfuse asks for
256: 1 MiB), but buffered sequential reads are cut to the mount's read-ahead
window, ``/sys/class/bdi/<major>:<minor>/read_ahead_kb``, 128 KiB by default.
Every request costs a round trip through the daemon, so stfs raises the window
to match its largest chunk (1 MiB by default): fewer, larger requests, each
answered from one chunk. ``max_background`` (how many read-ahead requests the
kernel keeps in flight, 12 by default) lives under the fusectl file system.
Both need root; without it the kernel's defaults stay and the log says so.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

BDI_ROOT = Path("/sys/class/bdi")
FUSECTL_ROOT = Path("/sys/fs/fuse/connections")
MAX_PAGES_LIMIT = Path("/proc/sys/fs/fuse/max_pages_limit")
PAGE_KIB = 4


@dataclasses.dataclass
class KernelTuning:
    """What the kernel was asked for and what it runs with."""

    read_ahead_kb: int | None = None
    max_background: int | None = None
    max_request_bytes: int = 0

    def as_dict(self) -> dict[str, int | None]:
        return dataclasses.asdict(self)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _write_int(path: Path, value: int) -> bool:
    try:
        path.write_text(f"{value}\n")
        return True
    except OSError as exc:
        log.info("cannot set %s to %d (%s); keeping the kernel default", path, value,
                 os.strerror(exc.errno or 0))
        return False


def _ensure_fusectl() -> None:
    if FUSECTL_ROOT.is_dir() and not any(FUSECTL_ROOT.iterdir()) and os.geteuid() == 0:
        subprocess.run(["mount", "-t", "fusectl", "none", str(FUSECTL_ROOT)],
                       stdin=subprocess.DEVNULL, capture_output=True, check=False)


def tune(mountpoint: str, read_ahead_kb: int, max_background: int) -> KernelTuning:
    """Apply the read-ahead window and background limit to the mount at *mountpoint*."""
    st = os.stat(mountpoint)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    result = KernelTuning()
    max_pages = _read_int(MAX_PAGES_LIMIT) or 256
    result.max_request_bytes = min(max_pages, 256) * PAGE_KIB * 1024
    bdi = BDI_ROOT / f"{major}:{minor}" / "read_ahead_kb"
    if bdi.exists():
        _write_int(bdi, read_ahead_kb)
        result.read_ahead_kb = _read_int(bdi)
    _ensure_fusectl()
    conn = FUSECTL_ROOT / str(minor)
    if (conn / "max_background").exists():
        if _write_int(conn / "max_background", max_background):
            _write_int(conn / "congestion_threshold", max(1, max_background * 3 // 4))
        result.max_background = _read_int(conn / "max_background")
    log.info("kernel: read-ahead %s KiB, up to %d-byte requests, %s background requests",
             result.read_ahead_kb, result.max_request_bytes, result.max_background)
    return result
