"""Mount configuration: one frozen dataclass built by the CLI and passed down.

Also owns byte counts as people write and read them: SIZE values (``4K``,
``50M``, ``1G``; powers of 1024) parsed and spelled back, and the one
human-readable formatter (``12.3 MiB``); and the default locations (state
directory, runtime directory).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from stfs.errors import UsageError
from stfs.resources import SWEEP_INTERVAL_S
from stfs.retry import FILE_SYSTEM, JITTER, NETWORK, READ_DEADLINE_S, RetryPolicy, RetrySettings

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmg]?)(i?b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": KIB, "m": MIB, "g": GIB}

MAX_REQUEST = 1 * MIB
"""Largest read the kernel sends a FUSE file system (256 pages)."""

LOG_LEVELS = ("debug", "info", "warning", "error")


def parse_size(text: str, what: str = "size") -> int:
    """Parse a SIZE: plain bytes or a K/M/G suffix (powers of 1024)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise UsageError(f"invalid {what} '{text}': expected bytes or a number with K, M or G")
    number, unit, _ = match.groups()
    return int(number) * _SIZE_UNITS[unit.lower()]


def format_size(n_bytes: int) -> str:
    """The shortest exact K/M/G spelling of a byte count."""
    for suffix, unit in (("G", GIB), ("M", MIB), ("K", KIB)):
        if n_bytes and n_bytes % unit == 0:
            return f"{n_bytes // unit}{suffix}"
    return str(n_bytes)


def human_bytes(value: object) -> str:
    """``12.3 MiB`` style (powers of 1024); whole bytes below 1 KiB; '-' if not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def default_state_dir() -> Path:
    """XDG state directory for stfs (``$XDG_STATE_HOME/stfs``)."""
    xdg = os.environ.get("XDG_STATE_HOME")
    if xdg:
        return Path(xdg) / "stfs"
    home = os.environ.get("HOME")
    if home:
        return Path(home) / ".local" / "state" / "stfs"
    return Path("/var/lib/stfs") if os.geteuid() == 0 else Path(f"/tmp/stfs-state-{os.geteuid()}")


def runtime_dir() -> Path:
    """Where control sockets live: ``/run/stfs`` for root, else the XDG runtime dir."""
    if os.geteuid() == 0:
        return Path("/run/stfs")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "stfs"
    return Path(f"/tmp/stfs-run-{os.geteuid()}")


@dataclasses.dataclass(frozen=True)
class MountConfig:
    """Everything a mount needs, validated; built once by the CLI."""

    source: str | None
    """Backing directory; None exactly when *demo*."""
    mountpoint: str
    demo: bool = False
    """Serve the built-in demo source (``--demo``) instead of a SOURCE."""
    foreground: bool = False
    allow_other: bool = False
    fsname: str | None = None
    memory_limit: int = 50 * MIB
    cache_size: int | None = None
    """The disk cache's size with *cache_dir*; without it, ``memory_cache_size``."""
    memory_cache_size: int | None = None
    """Chunk-cache share of the memory limit (default: three quarters)."""
    cache_dir: Path | None = None
    """Where the persistent chunk cache lives (``stfs.disk_cache``); None: no disk cache."""
    max_streams: int = 10
    min_chunk: int = 4 * KIB
    max_chunk: int = 1 * MIB
    read_around: int = 1 * MIB
    """Window pushed into the kernel page cache around a random read; 0: off."""
    metrics_listen: tuple[str, int] | None = None
    """Where to serve /metrics over HTTP, if anywhere."""
    monitor_interval: float = 1.0
    """Seconds between memory snapshots and pressure decisions."""
    sweep_interval: float = SWEEP_INTERVAL_S
    """Seconds between sweeps for orphaned and idle resources."""
    max_open_fds: int = 0
    """Backing descriptors kept open at once; 0: from the open-file limit."""
    retry_file_system: RetryPolicy = FILE_SYSTEM
    retry_network: RetryPolicy = NETWORK
    retry_jitter: float = JITTER
    read_deadline: float = READ_DEADLINE_S
    attr_timeout: float = 1.0
    entry_timeout: float = 1.0
    state_dir: Path = dataclasses.field(default_factory=default_state_dir)
    log_level: str = "info"
    log_file: str | None = None

    def __post_init__(self) -> None:
        if self.demo != (self.source is None):
            raise UsageError("give either SOURCE or --demo, not both" if self.demo
                             else "SOURCE is required (or --demo for the built-in demo source)")
        if self.memory_limit <= 0:
            raise UsageError("--memory-limit must be greater than 0")
        if self.min_chunk < 512:
            raise UsageError("--min-chunk must be at least 512 bytes")
        if self.min_chunk > self.max_chunk:
            raise UsageError(
                f"--min-chunk ({format_size(self.min_chunk)}) is larger than "
                f"--max-chunk ({format_size(self.max_chunk)})"
            )
        if self.memory_limit < self.max_chunk + MAX_REQUEST:
            raise UsageError(
                f"--memory-limit ({format_size(self.memory_limit)}) must be at least "
                f"--max-chunk ({format_size(self.max_chunk)}) plus 1M for a kernel request"
            )
        if self.cache_dir is None and None not in (self.cache_size, self.memory_cache_size):
            raise UsageError("--cache-size without --cache-dir is --memory-cache-size: "
                             "give one of them")
        memory_share = self.memory_cache_size
        if memory_share is None and self.cache_dir is None:
            memory_share = self.cache_size
        if memory_share is not None and memory_share > self.memory_limit:
            option = "--memory-cache-size" if self.memory_cache_size is not None else "--cache-size"
            raise UsageError(
                f"{option} ({format_size(memory_share)}) is larger than "
                f"--memory-limit ({format_size(self.memory_limit)})"
            )
        if (self.cache_dir is not None and self.cache_size is not None
                and self.cache_size < self.disk_cache_min_bytes):
            raise UsageError(
                f"--cache-size ({format_size(self.cache_size)}) is too small for a disk cache: "
                f"at least one chunk (--max-chunk {format_size(self.max_chunk)}) and its "
                f"bookkeeping, {format_size(self.disk_cache_min_bytes)}")
        if self.read_around and not (4 * KIB <= self.read_around <= 16 * MIB
                                     and self.read_around & (self.read_around - 1) == 0):
            raise UsageError("--read-around must be 0 or a power of two from 4K to 16M")
        if self.max_streams < 1:
            raise UsageError("--max-streams must be at least 1")
        if not 0 <= self.attr_timeout <= 3600 or not 0 <= self.entry_timeout <= 3600:
            raise UsageError(
                "--attr-timeout and --entry-timeout must be between 0 and 3600 seconds")
        if not 0.05 <= self.monitor_interval <= 60:
            raise UsageError("--monitor-interval must be between 0.05 and 60 seconds")
        if not 0.1 <= self.sweep_interval <= 86400:
            raise UsageError("--sweep-interval must be between 0.1 and 86400 seconds")
        if self.max_open_fds < 0 or 0 < self.max_open_fds < 16:
            raise UsageError("--max-open-fds must be at least 16 (or 0 for automatic)")
        if not 0 <= self.retry_jitter <= 1:
            raise UsageError("--retry-jitter must be between 0 and 1")
        if not 0 < self.read_deadline <= 3600:
            raise UsageError("--read-deadline must be between 0 and 3600 seconds")
        if self.log_level not in LOG_LEVELS:
            raise UsageError(f"invalid --log-level '{self.log_level}': "
                             f"choose from {', '.join(LOG_LEVELS)}")

    @property
    def retry(self) -> RetrySettings:
        return RetrySettings(self.retry_file_system, self.retry_network, self.retry_jitter,
                             self.read_deadline)

    @property
    def cache_limit_bytes(self) -> int:
        """Chunk-cache share of the memory limit (default: three quarters)."""
        if self.memory_cache_size is not None:
            return self.memory_cache_size
        if self.cache_dir is None and self.cache_size is not None:
            return self.cache_size
        return self.memory_limit * 3 // 4

    @property
    def disk_cache_min_bytes(self) -> int:
        """The smallest ``--cache-size`` of a disk cache: one largest chunk and room
        for its directory entries."""
        return self.max_chunk + 128 * KIB
