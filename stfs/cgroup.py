"""Control groups: this process's memory cgroup, its limits, usage and events.

Everything stfs knows about control groups is here, for the unified (v2) and
the legacy (v1) hierarchy, read from the files the kernel exposes:

* **Where.** ``/proc/self/cgroup`` names the group; ``/proc/self/mountinfo``
  says where its hierarchy is mounted and which part of it the mount shows (a
  container often sees its own group as the root).
* **Limits.** Every level from the group up to the top of the mount may limit
  memory: v2 ``memory.max`` (the OOM killer's line) and ``memory.high`` (above
  it the kernel throttles and reclaims hard), v1 ``memory.limit_in_bytes``.
  v1 also reports ``hierarchical_memory_limit``, which covers ancestors a
  container cannot see. v1's ``memory.memsw.limit_in_bytes`` is never below
  ``memory.limit_in_bytes``, so it never binds first. A level's usage counts
  its whole subtree, so the limit that binds is the one with the least room
  left (usually the smallest).
* **Usage.** What the kernel charges (v2 ``memory.current``, v1
  ``memory.usage_in_bytes``, both with kernel memory) includes the page cache
  of every file the group's processes read. Clean file pages that no process
  maps (``active_file + inactive_file - mapped``) are reclaimed before the
  group runs out; the rest (anonymous memory, mapped pages, kernel memory) is
  the working set, which must fit under the limit.
* **Events.** v2: the ``memory.events`` counters (``high``, ``max``, ``oom``,
  ``oom_kill``), which wake ``poll(POLLPRI)`` when they change, and a PSI
  trigger on ``memory.pressure`` (stall time in a window). v1: eventfds armed
  through ``cgroup.event_control`` on usage thresholds, on
  ``memory.pressure_level`` critical (reclaim failing: about to go out of
  memory; low and medium come with any reclaim of page cache) and on
  ``memory.oom_control``.
  ``MemoryNotifier`` waits for all of them in one thread.

Parsing functions take paths or texts, so tests run them on fake trees.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import select
import threading
from pathlib import Path

log = logging.getLogger(__name__)

UNLIMITED = 1 << 60
"""Limits at or above this are no limit (v1 says 2**63 rounded down to a page)."""
THRESHOLDS_PCT = (80, 90)
"""v1 usage thresholds armed, in percent of the limit."""
PSI_TRIGGERS = (b"some 100000 1000000", b"some 200000 2000000")
"""v2 PSI triggers tried in turn (stall microseconds per window): 10 % of a
second, else the 2 s window that unprivileged processes may ask for."""


# -- where ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CgroupMount:
    """A mounted cgroup hierarchy: v1 with the memory controller, or v2."""

    version: int
    point: Path
    root: str
    """The path inside the hierarchy that the mount shows at ``point``."""


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[CgroupMount]:
    """The cgroup mounts in a ``/proc/self/mountinfo`` text that can hold memory."""
    found = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, kind = left.split(), right.split()
        if not sep or len(fields) < 5 or len(kind) < 3:
            continue
        point, root = Path(_unescape(fields[4])), _unescape(fields[3])
        if kind[0] == "cgroup2":
            found.append(CgroupMount(2, point, root))
        elif kind[0] == "cgroup" and "memory" in kind[2].split(","):
            found.append(CgroupMount(1, point, root))
    return found


def parse_proc_cgroup(text: str) -> dict[int, str]:
    """{1: the v1 memory group's path, 2: the v2 group's path}, as far as present."""
    paths = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if "memory" in controllers.split(","):
            paths[1] = path
        elif hierarchy == "0" and controllers == "":
            paths[2] = path
    return paths


def _inside(path: str, root: str) -> str | None:
    """*path* relative to a mount's *root*, or None when the mount does not show it."""
    root = root.rstrip("/")
    if not root:
        return path.strip("/")
    if path == root or path.startswith(root + "/"):
        return path[len(root):].strip("/")
    return None


@dataclasses.dataclass(frozen=True)
class Usage:
    """What a group is charged, and what of it the kernel can reclaim."""

    total: int
    file: int
    """Page cache: ``active_file + inactive_file``."""
    mapped: int
    """Page cache mapped by some process: only reclaimed after unmapping."""

    @property
    def reclaimable(self) -> int:
        return max(0, self.file - self.mapped)

    @property
    def working_set(self) -> int:
        """What must fit under the limit: everything the kernel cannot just drop."""
        return max(0, self.total - self.reclaimable)


@dataclasses.dataclass(frozen=True)
class Limit:
    """One memory limit and the file that sets it."""

    bytes: int
    file: Path
    version: int

    def describe(self) -> str:
        return f"cgroup v{self.version} {self.file}"


@dataclasses.dataclass(frozen=True)
class GroupReading:
    """The group's state at one moment."""

    limit: Limit | None
    """The limit that binds (least room left), None when nothing limits the group."""
    usage: Usage | None
    """Usage at the binding limit's level (the group's own without a limit)."""
    level: Path | None
    """Directory of the binding limit's level."""

    @property
    def limit_bytes(self) -> int | None:
        return self.limit.bytes if self.limit is not None else None

    @property
    def room_bytes(self) -> int | None:
        """Limit minus working set: what the group may still grow by."""
        if self.limit is None or self.usage is None:
            return None
        return self.limit.bytes - self.usage.working_set


def parse_flat_keyed(text: str) -> dict[str, int]:
    """``key value`` lines (``memory.stat``, ``memory.events``, ``memory.oom_control``)."""
    values = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            values[key] = int(value)
    return values


def read_limit_file(path: Path) -> int | None:
    """A limit file's bytes; None for no limit (``max``, huge) or no file."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value < UNLIMITED else None


def _read_flat(path: Path) -> dict[str, int]:
    try:
        return parse_flat_keyed(path.read_text())
    except OSError:
        return {}


@dataclasses.dataclass(frozen=True)
class MemoryGroup:
    """This process's memory cgroup: its directory and the top of its mount."""

    version: int
    path: Path
    top: Path

    @property
    def label(self) -> str:
        return f"cgroup v{self.version} {self.path}"

    def levels(self) -> list[Path]:
        """The group and its ancestors up to the top of the mount."""
        chain = [self.path]
        level = self.path
        while level != self.top and self.top in level.parents:
            level = level.parent
            chain.append(level)
        return chain

    def limit_at(self, level: Path) -> Limit | None:
        """The smallest memory limit set at one level."""
        names = ("memory.max", "memory.high") if self.version == 2 else ("memory.limit_in_bytes",)
        limits = [Limit(b, level / name, self.version) for name in names
                  if (b := read_limit_file(level / name)) is not None]
        return min(limits, key=lambda limit: limit.bytes, default=None)

    def usage_at(self, level: Path) -> Usage | None:
        """What *level* (with its subtree) is charged, and its page cache."""
        if self.version == 2:
            total = read_limit_file(level / "memory.current")
            stat = _read_flat(level / "memory.stat")
            prefix, mapped_key = "", "file_mapped"
        else:
            total = read_limit_file(level / "memory.usage_in_bytes")
            stat = _read_flat(level / "memory.stat")
            prefix, mapped_key = "total_", "total_mapped_file"
        if total is None:
            return None
        file = stat.get(prefix + "active_file", 0) + stat.get(prefix + "inactive_file", 0)
        return Usage(total, file, stat.get(mapped_key, 0))

    def read(self) -> GroupReading:
        """The binding limit (least room along the hierarchy) and its level's usage."""
        best: tuple[int, Limit, Usage, Path] | None = None
        for level in self.levels():
            limit = self.limit_at(level)
            usage = self.usage_at(level) if limit is not None else None
            if limit is None or usage is None:
                continue
            room = limit.bytes - usage.working_set
            if best is None or room < best[0]:
                best = (room, limit, usage, level)
        own = self.usage_at(self.path)
        if self.version == 1:
            # A limit on an ancestor above the mount (a container's view): only
            # the kernel's hierarchical figure shows it; the group's own usage
            # is the best known part of that ancestor's.
            stat = self.path / "memory.stat"
            hidden = _read_flat(stat).get("hierarchical_memory_limit")
            if (hidden is not None and hidden < UNLIMITED and own is not None
                    and (best is None or hidden < best[1].bytes)):
                best = (hidden - own.working_set, Limit(hidden, stat, 1), own, self.path)
        if best is None:
            return GroupReading(None, own, None)
        return GroupReading(best[1], best[2], best[3])

    def events(self) -> dict[str, int]:
        """Counters of the times the group met its limits: ``high`` (v2 only),
        ``max`` (v1: ``failcnt``), ``oom``, ``oom_kill``."""
        if self.version == 2:
            counts = _read_flat(self.path / "memory.events")
            return {key: counts.get(key, 0) for key in ("high", "max", "oom", "oom_kill")}
        oom = _read_flat(self.path / "memory.oom_control")
        failcnt = read_limit_file(self.path / "memory.failcnt")
        return {"high": 0, "max": failcnt or 0, "oom": oom.get("under_oom", 0),
                "oom_kill": oom.get("oom_kill", 0)}


def find_memory_group(proc_cgroup: Path = Path("/proc/self/cgroup"),
                      mountinfo: Path = Path("/proc/self/mountinfo")) -> MemoryGroup | None:
    """This process's memory cgroup (v1 when the memory controller is bound
    there, else v2 when the unified group has memory files), or None."""
    try:
        paths = parse_proc_cgroup(proc_cgroup.read_text())
        mounts = parse_mountinfo(mountinfo.read_text())
    except OSError:
        return None
    for version, marker in ((1, "memory.usage_in_bytes"), (2, "memory.current")):
        if version not in paths:
            continue
        for mount in mounts:
            rel = _inside(paths[version], mount.root) if mount.version == version else None
            if rel is None:
                continue
            path = mount.point / rel if rel else mount.point
            if (path / marker).exists():
                return MemoryGroup(version, path, mount.point)
    return None


# -- events ----------------------------------------------------------------------


@dataclasses.dataclass
class _Source:
    fd: int
    name: str
    events: int
    kind: str
    """"eventfd" (v1: read the counter), "kernfs" (v2 memory.events: read again
    to re-arm), "psi" (nothing to read)."""
    keep: list[int] = dataclasses.field(default_factory=list)
    """Descriptors that must stay open while armed (v1: the watched file)."""


def _event_control(level: Path, watched: str, args: str, name: str) -> _Source:
    """Arm a v1 eventfd on *level*/*watched* through ``cgroup.event_control``."""
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        wfd = os.open(level / watched, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with open(level / "cgroup.event_control", "w") as control:
                control.write(f"{efd} {wfd} {args}".rstrip())
        except BaseException:
            os.close(wfd)
            raise
    except BaseException:
        os.close(efd)
        raise
    return _Source(efd, name, select.POLLIN, "eventfd", [wfd])


def _psi_trigger(path: Path) -> _Source:
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    for trigger in PSI_TRIGGERS:
        try:
            os.write(fd, trigger + b"\0")
            return _Source(fd, "psi", select.POLLPRI, "psi")
        except OSError as exc:
            error = exc
    os.close(fd)
    raise error


def arm_sources(group: MemoryGroup, reading: GroupReading) -> list[_Source]:
    """Arm every notification the group's kernel offers; those that fail are skipped."""
    sources: list[_Source] = []
    level = reading.level or group.path

    def attempt(what: str, make: object) -> None:
        try:
            sources.append(make())  # type: ignore[operator]
        except OSError as exc:
            log.debug("%s: cannot arm %s: %s", group.label, what, exc)

    if group.version == 1:
        if reading.limit is not None and reading.level is not None:
            for pct in THRESHOLDS_PCT:
                threshold = reading.limit.bytes * pct // 100
                attempt(f"the {pct} % threshold", lambda t=threshold: _event_control(
                    level, "memory.usage_in_bytes", str(t), "threshold"))
        attempt("memory.pressure_level", lambda: _event_control(
            group.path, "memory.pressure_level", "critical", "pressure"))
        attempt("memory.oom_control", lambda: _event_control(
            group.path, "memory.oom_control", "", "oom"))
    else:
        for where in dict.fromkeys((level, group.path)):
            attempt(f"{where}/memory.events", lambda w=where: _Source(
                os.open(w / "memory.events", os.O_RDONLY | os.O_CLOEXEC), "events",
                select.POLLPRI, "kernfs"))
        attempt("memory.pressure", lambda: _psi_trigger(group.path / "memory.pressure"))
    return sources


class MemoryNotifier:
    """Waits in one thread for the kernel's memory notifications on a group.

    The event loop waits for ``fileno()`` to become readable (a pipe the thread
    writes a byte to), then ``take()`` says what fired. ``close()`` stops the
    thread before closing any descriptor, so a descriptor number is never
    polled or read after it was closed.
    """

    def __init__(self, sources: list[_Source]) -> None:
        self.sources = sources
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._fired: list[str] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.received = 0

    @classmethod
    def arm(cls, group: MemoryGroup, reading: GroupReading) -> MemoryNotifier:
        return cls(arm_sources(group, reading))

    @property
    def kinds(self) -> list[str]:
        return sorted({source.name for source in self.sources})

    def fileno(self) -> int:
        """Readable when a notification came (for ``trio.lowlevel.wait_readable``)."""
        return self._wake_r

    def start(self) -> None:
        if self.sources and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="stfs-cgroup-events",
                                            daemon=True)
            self._thread.start()

    def take(self) -> list[str]:
        """What fired since the last call (names, in order), emptying the pipe."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass
        with self._lock:
            fired, self._fired = self._fired, []
        return fired

    def close(self) -> None:
        """Stop the thread, then close every descriptor (which disarms v1 events)."""
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join()
            self._thread = None
        for source in self.sources:
            for fd in (source.fd, *source.keep):
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.sources = []
        for fd in (self._wake_r, self._wake_w, self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _run(self) -> None:
        poller = select.poll()
        by_fd = {source.fd: source for source in self.sources}
        for source in self.sources:
            poller.register(source.fd, source.events)
            if source.kind == "kernfs":
                _reread(source.fd)  # arm: poll reports changes after the last read
        poller.register(self._stop_r, select.POLLIN)
        while True:
            fired = []
            for fd, events in poller.poll():
                if fd == self._stop_r:
                    return
                source = by_fd[fd]
                if events & select.POLLNVAL or (source.kind == "eventfd"
                                                and events & select.POLLERR):
                    poller.unregister(fd)  # the group went away
                    continue
                if source.kind == "eventfd":
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(fd)
                elif source.kind == "kernfs":
                    _reread(fd)
                fired.append(source.name)
            if fired:
                with self._lock:
                    self._fired.extend(fired)
                    self.received += len(fired)
                with contextlib.suppress(BlockingIOError):
                    os.write(self._wake_w, b"!")


def _reread(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.pread(fd, 4096, 0)
