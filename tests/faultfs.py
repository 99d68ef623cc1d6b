"""faultfs: a small fault-injecting FUSE file system, used as stfs's SOURCE in tests.

A read-only pyfuse3/trio passthrough of a directory BACKING whose replies can be
made to fail, stall or lie, by rules set at runtime over a control socket, so
that stfs meets real EIO, ESTALE, EAGAIN, ETIMEDOUT..., slow replies and
silently corrupted data from the kernel, plus files rewritten under it::

    python tests/faultfs.py BACKING MOUNTPOINT --control SOCKET [--seed N] [--allow-other]
                            [--read-delay SECONDS]

It runs in the foreground until SIGTERM/SIGINT/SIGHUP (or an external
unmount), then unmounts and exits 0. The mount is ``fuse.faultfs`` (fsname and
subtype ``faultfs``), read-only: every mutating request answers EROFS.

What stfs sees through it
-------------------------
* Node ids are the backing inode numbers (the backing root is node 1; an entry
  from another device, or a backing inode numbered 1, gets a number from a
  reserved range). A node whose path now names another inode answers ESTALE.
* Entry and attribute timeouts are 0 and every open file is ``direct_io``: no
  kernel cache sits between stfs and faultfs, so every read, fstat and lookup
  of stfs reaches faultfs, and a file rewritten in BACKING is seen at once
  (fstat of an open file is the fstat of faultfs's own descriptor of it).
* Each open is its own backing descriptor; reads are ``os.pread`` in a worker
  thread, so a file rewritten in place (same inode) is read in its new content
  through handles opened before.
* ``--read-delay SECONDS`` (or the ``read_delay`` command) makes every read
  request take that much longer, like a network or cloud store. Requests are
  tasks that sleep, so concurrent requests are served in parallel, each
  taking the delay: eight readers at 100 ms get eight times what one gets.
  The kernel splits an application's read into requests of at most 1 MiB of
  whole pages, sent one after the other, each delayed: a 1 MiB ``pread``
  into a buffer that does not start on a page (a ``bytes`` object's) is two.

Control protocol (unix stream socket, JSON lines: one request line, one reply line)
-----------------------------------------------------------------------------------
``{"cmd": "ping"}``                       -> ``{"ok": true, "pid": N}``
``{"cmd": "set", "rules": [...], "seed": N}`` -> ``{"ok": true, "rules": n}``; replaces the
    rules, restarts their call counters and the random generator (``random.Random(seed)``).
    A bad rule is ``{"ok": false, "error": "..."}`` and leaves the old rules in place.
``{"cmd": "stats"}`` -> ``{"ok": true, "ops": {op: count}, "injected": {kind: count},
    "reads": n, "read_bytes": n, "read_delay_s": S, "peak_reads_in_flight": n,
    "read_seconds": S (the reads' durations summed: over a span of time, its growth
    divided by the span is the mean number of reads in flight), "open_files": n,
    "open_dirs": n, "rules": [{"calls": n, "injected": n}, ...]}``
``{"cmd": "reset_stats"}``                -> ``{"ok": true}`` (ops, injected, reads, read_bytes,
    read_seconds, peak_reads_in_flight)
``{"cmd": "read_delay", "seconds": S}``  -> ``{"ok": true, "read_delay_s": S}``: every read
    request from now on takes S seconds more (0 turns it off; 0..3600), on top of any rule.
``{"cmd": "events", "since": SEQ}``       -> ``{"ok": true, "events": [[seq, t, op, path, kind],
    ...], "next": SEQ, "dropped": n}``: every injection in order; ``t`` is
    ``time.monotonic()`` (CLOCK_MONOTONIC, comparable across processes); the last
    100 000 are kept, ``dropped`` counts those lost before ``since``.
``{"cmd": "hold", "path": P, "timeout_s": S}`` -> ``{"ok": true}`` once no operation on path
    P is in flight; until ``{"cmd": "release", "path": P}`` (or S seconds, default 10)
    every open, read, getattr and lookup of P waits. A test rewrites a file in place
    between hold and release, so the change is atomic as seen through faultfs (a
    plain in-place write is not: a reader could see half of it). A hold lasts at
    least 25 ms (see the note on kernel ticks below).

A rule is a JSON object::

    {"op": "read",         # read|open|getattr|lookup|readdir|opendir|readlink|statfs|
                           # listxattr|getxattr|release|releasedir|*; default "*"
     "path": "files/*",    # fnmatch glob on the path relative to BACKING ("" is BACKING
                           # itself; "*" also matches "/"); default "*"
     "kind": "EIO",        # an errno name (EIO, EINTR, ESTALE, EAGAIN, ETIMEDOUT, ...),
                           # "slow" or "corrupt"; or a list of them, one picked at random
                           # per injection
     "probability": 0.1,   # chance per matching call; default 1
     "nth": [0, 3],        # only these matching calls (0-based, counted per rule)
     "count": 5,           # at most this many injections by this rule
     "offset": 0,          # reads only: only requests whose bytes include this offset
     "delay_s": 0.2}       # "slow": the delay (default 0.2 s); errors: a delay before
                           # the error reply

For each request the rules are tried in order; every rule whose op and path
match counts the call. A rule fires when the call's index is in ``nth`` (if
given), its ``count`` is not used up and a draw is below ``probability``. A
firing "slow" rule adds its delay and the next rules are tried; "corrupt"
(reads only) flips a few bytes of the data returned while the file and its
attributes stay as they are (silent corruption); a firing errno rule ends the
evaluation: after its ``delay_s`` the request fails with
``pyfuse3.FUSEError(errno)``, which the kernel hands to the caller as exactly
that errno. The draws come from one ``random.Random(seed)``, so a run of
requests that arrive one at a time is reproducible.

Note: with timeouts of 0 the kernel still treats attributes (and names) it
fetched as valid until the end of the kernel tick (jiffy, 4 ms at HZ=250) in
which it fetched them. A test that rewrites a file in BACKING and at once
fstat's it through faultfs may get the previous attributes for up to one tick:
wait a few ms, or rewrite inside a hold, which outlasts the tick.

Note: Python's ``os.read``/``os.pread``/``os.preadv`` retry EINTR themselves
(PEP 475), so an injected EINTR on a read is invisible to a Python reader
(stfs included): the read is simply sent again. The injection is still
counted. An ESTALE on open is retried once by the kernel's path walk.

Client side: ``FaultFS.start(backing, mountpoint, control)`` spawns the file
system (``sys.executable`` running this file), waits until the mount answers
and returns a handle with ``set_rules``, ``set_read_delay``, ``stats``, ``reset_stats``,
``events``, ``hold``/``release``/``held`` and ``stop`` (idempotent: SIGTERM by
PID, then ``fusermount3 -u``, ``-uz`` as the last resort); it is a context
manager. ``faultfs_mount(tmp_path)`` is a context manager for tests: it makes
``tmp_path/faultfs-backing`` and ``tmp_path/faultfs-mnt``, mounts, yields the
``FaultFS`` and stops it whatever happens.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import errno
import fnmatch
import itertools
import json
import logging
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, Self, TypeVar

log = logging.getLogger("faultfs")

FSNAME = "faultfs"
FSTYPE = "fuse.faultfs"
OPS = ("read", "open", "getattr", "lookup", "readdir", "opendir", "readlink", "statfs",
       "listxattr", "getxattr", "release", "releasedir")
SPECIAL_KINDS = ("slow", "corrupt")
DEFAULT_SLOW_S = 0.2
MAX_DELAY_S = 3600.0
DEFAULT_HOLD_S = 10.0
MIN_HOLD_S = 0.025
"""A hold lasts at least this long: longer than a kernel tick (jiffy) at HZ >= 100."""
EVENTS_KEPT = 100_000
REQUEST_LIMIT = 1 << 20
RESERVED_NODEIDS = 1 << 63


# -- rules ----------------------------------------------------------------------


@dataclasses.dataclass
class Rule:
    op: str = "*"
    path: str = "*"
    kinds: tuple[str, ...] = ("EIO",)
    probability: float = 1.0
    nth: frozenset[int] | None = None
    count: int | None = None
    delay_s: float | None = None
    offset: int | None = None
    calls: int = 0
    injected: int = 0

    KEYS = frozenset({"op", "path", "kind", "probability", "nth", "count", "delay_s",
                      "offset"})

    @classmethod
    def parse(cls, raw: object) -> Rule:
        if not isinstance(raw, dict):
            raise TypeError(f"a rule is an object, not {raw!r}")
        unknown = set(raw) - cls.KEYS
        if unknown:
            raise ValueError(f"unknown rule keys: {sorted(unknown)}")
        op = raw.get("op", "*")
        if op != "*" and op not in OPS:
            raise ValueError(f"unknown op {op!r} (one of {', '.join(OPS)} or *)")
        path = raw.get("path", "*")
        if not isinstance(path, str):
            raise TypeError("path is a glob string")
        kind = raw.get("kind", "EIO")
        kinds = tuple(kind) if isinstance(kind, list) else (kind,)
        if not kinds:
            raise ValueError("kind: an empty list")
        for k in kinds:
            if not isinstance(k, str) or (k not in SPECIAL_KINDS and not _errno_of(k)):
                raise ValueError(f"unknown kind {k!r} (an errno name, slow or corrupt)")
        probability = float(raw.get("probability", 1.0))
        if not 0.0 <= probability <= 1.0:
            raise ValueError("probability is within 0..1")
        nth = raw.get("nth")
        if nth is not None:
            if not isinstance(nth, list) or not all(isinstance(i, int) and i >= 0 for i in nth):
                raise ValueError("nth is a list of call indexes (0-based)")
            nth = frozenset(nth)
        count = raw.get("count")
        if count is not None and (not isinstance(count, int) or count < 0):
            raise ValueError("count is a non-negative integer")
        delay = raw.get("delay_s")
        if delay is not None:
            delay = float(delay)
            if not 0.0 <= delay <= MAX_DELAY_S:
                raise ValueError("delay_s is within 0..3600")
        offset = raw.get("offset")
        if offset is not None and (not isinstance(offset, int) or offset < 0):
            raise ValueError("offset is a non-negative integer")
        return cls(op, path, kinds, probability, nth, count, delay, offset)

    def matches(self, op: str, path: str, span: tuple[int, int] | None = None) -> bool:
        """Whether a call of *op* on *path* counts (*span*: a read's offset and size)."""
        if self.offset is not None and (
                span is None or not span[0] <= self.offset < span[0] + span[1]):
            return False
        return (self.op == "*" or self.op == op) and fnmatch.fnmatchcase(path, self.path)


def _errno_of(name: str) -> int | None:
    value = getattr(errno, name, None) if name.isupper() and name.startswith("E") else None
    return value if isinstance(value, int) else None


@dataclasses.dataclass
class Decision:
    delay_s: float = 0.0
    errno: int | None = None
    corrupt: bool = False


class Faults:
    """The rule list, its counters and the statistics; no I/O, no awaits."""

    def __init__(self, seed: int = 0, read_delay_s: float = 0.0) -> None:
        self.rules: list[Rule] = []
        self.read_delay_s = 0.0
        self.set_read_delay(read_delay_s)
        self.rng = random.Random(seed)
        self.ops: collections.Counter[str] = collections.Counter()
        self.injected: collections.Counter[str] = collections.Counter()
        self.reads = 0
        self.read_bytes = 0
        self.reads_in_flight = 0
        self.peak_reads_in_flight = 0
        self.read_seconds = 0.0
        self.events: collections.deque[list[Any]] = collections.deque(maxlen=EVENTS_KEPT)
        self.next_seq = 0

    def set(self, raw_rules: object, seed: int) -> int:
        if not isinstance(raw_rules, list):
            raise TypeError("rules is a list")
        rules = [Rule.parse(r) for r in raw_rules]
        self.rules = rules
        self.rng = random.Random(seed)
        return len(rules)

    def set_read_delay(self, seconds: float) -> float:
        seconds = float(seconds)
        if not 0.0 <= seconds <= MAX_DELAY_S:
            raise ValueError(f"read delay is within 0..{MAX_DELAY_S:g} seconds")
        self.read_delay_s = seconds
        return seconds

    def reset_stats(self) -> None:
        self.ops.clear()
        self.injected.clear()
        self.reads = 0
        self.read_bytes = 0
        self.read_seconds = 0.0
        self.peak_reads_in_flight = self.reads_in_flight

    def decide(self, op: str, path: str, span: tuple[int, int] | None = None) -> Decision:
        self.ops[op] += 1
        decision = Decision()
        for rule in self.rules:
            if not rule.matches(op, path, span):
                continue
            index = rule.calls
            rule.calls += 1
            if rule.nth is not None and index not in rule.nth:
                continue
            if rule.count is not None and rule.injected >= rule.count:
                continue
            if rule.probability < 1.0 and self.rng.random() >= rule.probability:
                continue
            kind = rule.kinds[0] if len(rule.kinds) == 1 else self.rng.choice(rule.kinds)
            if kind == "corrupt" and op != "read":
                continue
            rule.injected += 1
            self.injected[kind] += 1
            self.events.append([self.next_seq, time.monotonic(), op, path, kind])
            self.next_seq += 1
            if kind == "slow":
                decision.delay_s += DEFAULT_SLOW_S if rule.delay_s is None else rule.delay_s
            elif kind == "corrupt":
                decision.corrupt = True
            else:
                decision.delay_s += rule.delay_s or 0.0
                decision.errno = _errno_of(kind)
                break
        return decision

    def corrupt(self, data: bytes) -> bytes:
        if not data:
            return data
        out = bytearray(data)
        for _ in range(1 + self.rng.randrange(4)):
            out[self.rng.randrange(len(out))] ^= 1 + self.rng.randrange(255)
        return bytes(out)

    def events_since(self, since: int) -> dict[str, Any]:
        oldest = self.events[0][0] if self.events else self.next_seq
        since = max(0, since)
        events = list(itertools.islice(self.events, max(0, since - oldest), None))
        return {"events": events, "next": self.next_seq, "dropped": max(0, oldest - since)}

    def stats(self) -> dict[str, Any]:
        return {"ops": dict(self.ops), "injected": dict(self.injected), "reads": self.reads,
                "read_bytes": self.read_bytes, "read_delay_s": self.read_delay_s,
                "peak_reads_in_flight": self.peak_reads_in_flight,
                "read_seconds": self.read_seconds,
                "rules": [{"calls": r.calls, "injected": r.injected} for r in self.rules]}


# -- the file system (server side; pyfuse3 and trio are imported only here) ---------


def serve(backing: str, mountpoint: str, control: str, seed: int, allow_other: bool,
          read_delay_s: float = 0.0) -> int:
    import pyfuse3
    import trio

    T = TypeVar("T")
    faults = Faults(seed, read_delay_s)

    def fuse_errors(
            fn: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., Coroutine[Any, Any, T]]:
        async def wrapper(*args: Any) -> T:
            try:
                return await fn(*args)
            except pyfuse3.FUSEError:
                raise
            except OSError as exc:
                raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
            except Exception:
                log.exception("faultfs: internal error in %s", fn.__name__)
                raise pyfuse3.FUSEError(errno.EIO) from None
        wrapper.__name__ = fn.__name__
        return wrapper

    async def erofs(*_args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    class Gate:
        """Per-path holds: operations wait while a path is held; a hold waits until the
        operations in flight on its path are done."""

        def __init__(self) -> None:
            self.held: dict[str, trio.Event] = {}
            self.inflight: collections.Counter[str] = collections.Counter()
            self.drained: dict[str, trio.Event] = {}
            self.since: dict[str, float] = {}

        @contextlib.asynccontextmanager
        async def enter(self, path: str):  # type: ignore[no-untyped-def]
            while path in self.held:
                await self.held[path].wait()
            self.inflight[path] += 1
            try:
                yield
            finally:
                self.inflight[path] -= 1
                if self.inflight[path] <= 0:
                    del self.inflight[path]
                    if path in self.drained:
                        self.drained.pop(path).set()

        async def hold(self, path: str, timeout_s: float, nursery: trio.Nursery) -> None:
            if path in self.held:
                raise ValueError(f"{path!r} is already held")
            event = trio.Event()
            self.held[path] = event
            self.since[path] = trio.current_time()
            if self.inflight[path] > 0:
                drained = self.drained.setdefault(path, trio.Event())
                with trio.move_on_after(timeout_s):
                    await drained.wait()

            async def expire() -> None:
                await trio.sleep(timeout_s)
                if self.held.get(path) is event:
                    log.warning("faultfs: hold on %s expired after %.1f s", path, timeout_s)
                    await self.release(path)

            nursery.start_soon(expire)

        async def release(self, path: str) -> bool:
            event = self.held.get(path)
            if event is None:
                return False
            # Attributes the kernel fetched before the hold stay "fresh" for the rest of
            # that jiffy even with attr_timeout 0: outlast it, or a reader could see the
            # new bytes with the old attributes.
            await trio.sleep_until(self.since.pop(path) + MIN_HOLD_S)
            del self.held[path]
            event.set()
            return True

    gate = Gate()

    class Ops(pyfuse3.Operations):
        supports_dot_lookup = True
        enable_writeback_cache = False
        enable_acl = False

        def __init__(self) -> None:
            super().__init__()
            self.root = os.fsencode(os.path.abspath(backing))
            st = os.lstat(self.root)
            self.root_key = (st.st_dev, st.st_ino)
            self.paths: dict[int, bytes] = {pyfuse3.ROOT_INODE: b""}
            self.reserved: dict[tuple[int, int], int] = {}
            self.files: dict[int, tuple[int, int, str]] = {}  # fh -> fd, nodeid, path
            self.fds_of: collections.defaultdict[int, set[int]] = collections.defaultdict(set)
            self.dirs: dict[int, list[tuple[bytes, os.stat_result]]] = {}
            self.dir_paths: dict[int, bytes] = {}
            self.next_fh = 1

        # helpers
        def full(self, rel: bytes) -> bytes:
            return self.root + b"/" + rel if rel else self.root

        def nodeid_for(self, st: os.stat_result) -> int:
            key = (st.st_dev, st.st_ino)
            if key == self.root_key:
                return pyfuse3.ROOT_INODE
            if st.st_dev == self.root_key[0] and st.st_ino > 1 and st.st_ino < RESERVED_NODEIDS:
                return st.st_ino
            if key not in self.reserved:
                self.reserved[key] = RESERVED_NODEIDS + len(self.reserved)
            return self.reserved[key]

        def path_of(self, nodeid: int) -> bytes:
            try:
                return self.paths[nodeid]
            except KeyError:
                raise pyfuse3.FUSEError(errno.ESTALE) from None

        def attrs(self, nodeid: int, st: os.stat_result) -> Any:
            a = pyfuse3.EntryAttributes()
            a.st_ino = nodeid
            a.generation = 0
            a.entry_timeout = 0
            a.attr_timeout = 0
            for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                         "st_blksize", "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
                setattr(a, name, getattr(st, name))
            return a

        def stat_node(self, nodeid: int) -> os.stat_result:
            fds = self.fds_of.get(nodeid)
            if fds:  # the open file itself, even if its name has moved on
                return os.fstat(next(iter(fds)))
            st = os.lstat(self.full(self.path_of(nodeid)))
            if self.nodeid_for(st) != nodeid:
                raise pyfuse3.FUSEError(errno.ESTALE)
            return st

        async def fault(self, op: str, path: bytes) -> Decision:
            decision = faults.decide(op, os.fsdecode(path))
            if decision.delay_s:
                await trio.sleep(decision.delay_s)
            if decision.errno is not None:
                raise pyfuse3.FUSEError(decision.errno)
            return decision

        # names and attributes
        @fuse_errors
        async def lookup(self, parent: int, name: bytes, ctx: Any = None) -> Any:
            base = self.path_of(parent)
            if name == b".":
                rel = base
            elif name == b"..":
                rel = os.path.dirname(base)
            else:
                rel = base + b"/" + name if base else name
            async with gate.enter(os.fsdecode(rel)):
                await self.fault("lookup", rel)
                st = os.lstat(self.full(rel))
                nodeid = self.nodeid_for(st)
                self.paths[nodeid] = rel
                return self.attrs(nodeid, st)

        async def forget(self, inode_list: Any) -> None:
            return None

        @fuse_errors
        async def getattr(self, inode: int, ctx: Any = None) -> Any:
            path = self.path_of(inode)
            async with gate.enter(os.fsdecode(path)):
                await self.fault("getattr", path)
                return self.attrs(inode, self.stat_node(inode))

        @fuse_errors
        async def readlink(self, inode: int, ctx: Any = None) -> bytes:
            path = self.path_of(inode)
            await self.fault("readlink", path)
            return os.readlink(self.full(path))

        @fuse_errors
        async def access(self, inode: int, mode: int, ctx: Any = None) -> bool:
            if mode & os.W_OK:
                raise pyfuse3.FUSEError(errno.EROFS)
            return True

        @fuse_errors
        async def statfs(self, ctx: Any = None) -> Any:
            await self.fault("statfs", b"")
            vfs = os.statvfs(self.root)
            data = pyfuse3.StatvfsData()
            for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                         "f_ffree", "f_favail", "f_namemax"):
                setattr(data, name, getattr(vfs, name))
            return data

        @fuse_errors
        async def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
            path = self.path_of(inode)
            await self.fault("listxattr", path)
            st = self.stat_node(inode)
            if stat.S_ISLNK(st.st_mode):
                return []
            return [os.fsencode(n) for n in os.listxattr(self.full(path), follow_symlinks=False)]

        @fuse_errors
        async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
            path = self.path_of(inode)
            await self.fault("getxattr", path)
            try:
                return os.getxattr(self.full(path), name, follow_symlinks=False)
            except OSError as exc:
                if exc.errno == errno.ENODATA:
                    raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
                raise

        # directories
        @fuse_errors
        async def opendir(self, inode: int, ctx: Any = None) -> int:
            path = self.path_of(inode)
            await self.fault("opendir", path)
            entries = []
            with os.scandir(self.full(path)) as it:
                for entry in it:
                    try:
                        entries.append((os.fsencode(entry.name), entry.stat(follow_symlinks=False)))
                    except FileNotFoundError:
                        continue
            entries.sort()
            fh = self.next_fh
            self.next_fh += 1
            self.dirs[fh] = entries
            self.dir_paths[fh] = path
            return fh

        @fuse_errors
        async def readdir(self, fh: int, start_id: int, token: Any) -> None:
            path = self.dir_paths[fh]
            await self.fault("readdir", path)
            entries = self.dirs[fh]
            for index in range(start_id, len(entries)):
                name, st = entries[index]
                nodeid = self.nodeid_for(st)
                if not pyfuse3.readdir_reply(token, name, self.attrs(nodeid, st), index + 1):
                    break
                self.paths[nodeid] = path + b"/" + name if path else name

        @fuse_errors
        async def releasedir(self, fh: int) -> None:
            faults.ops["releasedir"] += 1
            self.dirs.pop(fh, None)
            self.dir_paths.pop(fh, None)

        # files
        @fuse_errors
        async def open(self, inode: int, flags: int, ctx: Any = None) -> Any:
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
                raise pyfuse3.FUSEError(errno.EROFS)
            path = self.path_of(inode)
            async with gate.enter(os.fsdecode(path)):
                await self.fault("open", path)
                fd = os.open(self.full(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                             | os.O_NOCTTY | os.O_NONBLOCK)
                try:
                    if self.nodeid_for(os.fstat(fd)) != inode:
                        raise pyfuse3.FUSEError(errno.ESTALE)
                except BaseException:
                    os.close(fd)
                    raise
            fh = self.next_fh
            self.next_fh += 1
            self.files[fh] = (fd, inode, os.fsdecode(path))
            self.fds_of[inode].add(fd)
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

        @fuse_errors
        async def read(self, fh: int, off: int, size: int) -> bytes:
            fd, _, path = self.files[fh]
            async with gate.enter(path):
                decision = faults.decide("read", path, (off, size))
                delay = decision.delay_s + faults.read_delay_s
                faults.reads_in_flight += 1
                faults.peak_reads_in_flight = max(faults.peak_reads_in_flight,
                                                  faults.reads_in_flight)
                began = time.monotonic()
                try:
                    if delay:
                        await trio.sleep(delay)
                    if decision.errno is not None:
                        raise pyfuse3.FUSEError(decision.errno)
                    data = await trio.to_thread.run_sync(os.pread, fd, size, off)
                finally:
                    faults.reads_in_flight -= 1
                    faults.read_seconds += time.monotonic() - began
            if decision.corrupt:
                data = faults.corrupt(data)
            faults.reads += 1
            faults.read_bytes += len(data)
            return data

        @fuse_errors
        async def flush(self, fh: int) -> None:
            return None

        @fuse_errors
        async def release(self, fh: int) -> None:
            faults.ops["release"] += 1
            entry = self.files.pop(fh, None)
            if entry is not None:
                fd, nodeid, _ = entry
                fds = self.fds_of.get(nodeid)
                if fds is not None:
                    fds.discard(fd)
                    if not fds:
                        del self.fds_of[nodeid]
                os.close(fd)

        setattr = mknod = mkdir = unlink = rmdir = erofs  # type: ignore[assignment]
        symlink = rename = link = create = erofs  # type: ignore[assignment]
        write = setxattr = removexattr = erofs  # type: ignore[assignment]

    ops = Ops()

    async def handle_control(stream: Any, nursery: trio.Nursery) -> None:
        async with stream:
            buf = b""
            while True:
                while b"\n" not in buf:
                    try:
                        chunk = await stream.receive_some(65536)
                    except trio.BrokenResourceError:
                        return
                    if not chunk or len(buf) > REQUEST_LIMIT:
                        return
                    buf += chunk
                line, buf = buf.split(b"\n", 1)
                reply = await answer(line, nursery)
                try:
                    await stream.send_all(json.dumps(reply).encode() + b"\n")
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return

    async def answer(line: bytes, nursery: trio.Nursery) -> dict[str, Any]:
        try:
            request = json.loads(line)
            cmd = request.get("cmd") if isinstance(request, dict) else None
            if cmd == "ping":
                return {"ok": True, "pid": os.getpid()}
            if cmd == "set":
                n = faults.set(request.get("rules", []), int(request.get("seed", 0)))
                return {"ok": True, "rules": n}
            if cmd == "stats":
                return {"ok": True, **faults.stats(), "open_files": len(ops.files),
                        "open_dirs": len(ops.dirs)}
            if cmd == "reset_stats":
                faults.reset_stats()
                return {"ok": True}
            if cmd == "read_delay":
                return {"ok": True,
                        "read_delay_s": faults.set_read_delay(request.get("seconds", 0.0))}
            if cmd == "events":
                return {"ok": True, **faults.events_since(int(request.get("since", 0)))}
            if cmd == "hold":
                await gate.hold(str(request["path"]),
                                float(request.get("timeout_s", DEFAULT_HOLD_S)), nursery)
                return {"ok": True}
            if cmd == "release":
                return {"ok": True, "released": await gate.release(str(request["path"]))}
            return {"ok": False, "error": f"unknown cmd {cmd!r}"}
        except (ValueError, KeyError, TypeError) as exc:
            return {"ok": False, "error": str(exc)}

    async def main_task() -> None:
        async with trio.open_nursery() as nursery:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(control)
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await sock.bind(control)
            os.chmod(control, 0o600)
            sock.listen(16)
            listener = trio.SocketListener(sock)

            async def control_server() -> None:
                await trio.serve_listeners(lambda s: handle_control(s, nursery), [listener])

            async def signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as rx:
                    async for _ in rx:
                        pyfuse3.terminate()
                        return

            nursery.start_soon(control_server)
            nursery.start_soon(signals)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    options = set(pyfuse3.default_options) | {f"fsname={FSNAME}", f"subtype={FSNAME}", "ro"}
    if allow_other:
        options.add("allow_other")
    pyfuse3.init(ops, mountpoint, options)
    try:
        trio.run(main_task)
    finally:
        pyfuse3.close(unmount=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control)
        for fd, _, _ in list(ops.files.values()):
            with contextlib.suppress(OSError):
                os.close(fd)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="faultfs", description=__doc__.split("\n\n")[0])
    parser.add_argument("backing")
    parser.add_argument("mountpoint")
    parser.add_argument("--control", required=True, help="unix socket for the rules and stats")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allow-other", action="store_true")
    parser.add_argument("--read-delay", type=float, default=0.0, metavar="SECONDS",
                        help="every read request takes this much longer (a slow store)")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    if not 0.0 <= args.read_delay <= MAX_DELAY_S:
        parser.error(f"--read-delay is within 0..{MAX_DELAY_S:g} seconds")
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(asctime)s faultfs %(levelname)s %(message)s")
    return serve(args.backing, args.mountpoint, args.control, args.seed, args.allow_other,
                 args.read_delay)


# -- client side ----------------------------------------------------------------------


def _mount_fstype(path: Path) -> str | None:
    """fstype of the topmost mount exactly at *path*, from /proc/self/mountinfo."""
    real = os.path.realpath(path)
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            point = left.split(" ")[4].replace("\\040", " ").replace("\\011", "\t") \
                .replace("\\012", "\n").replace("\\134", "\\")
            if point == real:
                found = right.split(" ")[0]
    return found


class FaultFSError(RuntimeError):
    pass


class FaultFS:
    """A running faultfs process and its control channel."""

    START_TIMEOUT_S = 20.0

    def __init__(self, backing: Path, mountpoint: Path, control: Path,
                 proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.backing = Path(backing)
        self.mountpoint = Path(mountpoint)
        self.control = Path(control)
        self.proc = proc
        self.log_path = log_path
        self._stopped = False

    @classmethod
    def start(cls, backing: Path, mountpoint: Path, control: Path, *, seed: int = 0,
              log_path: Path | None = None, allow_other: bool = False,
              read_delay_s: float = 0.0, timeout: float = START_TIMEOUT_S) -> FaultFS:
        """Spawn faultfs serving *backing* at *mountpoint*; returns once the mount answers.
        *control* (the socket) must be a short path (a unix socket path has < 108 bytes)."""
        if len(os.fsencode(os.path.abspath(control))) >= 107:
            raise FaultFSError(f"control socket path too long for a unix socket: {control}")
        if log_path is None:
            log_path = Path(str(control) + ".log")
        argv = [sys.executable, os.path.abspath(__file__), os.fspath(backing),
                os.fspath(mountpoint), "--control", os.fspath(control), "--seed", str(seed)]
        if allow_other:
            argv.append("--allow-other")
        if read_delay_s:
            argv += ["--read-delay", repr(float(read_delay_s))]
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                    stderr=log_file, start_new_session=True)
        fs = cls(Path(backing), Path(mountpoint), Path(control), proc, log_path)
        try:
            fs._wait_ready(timeout)
        except BaseException:
            fs.stop()
            raise
        return fs

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise FaultFSError(f"faultfs exited with {self.proc.returncode}: {self.log()}")
            if _mount_fstype(self.mountpoint) == FSTYPE:
                try:
                    os.statvfs(self.mountpoint)
                    self.ping()
                    return
                except OSError:
                    pass
            time.sleep(0.02)
        raise FaultFSError(f"faultfs did not mount {self.mountpoint} within {timeout}s: "
                           f"{self.log()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def is_mounted(self) -> bool:
        return _mount_fstype(self.mountpoint) == FSTYPE

    # control channel
    def request(self, payload: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(os.fspath(self.control))
            sock.sendall(json.dumps(payload).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
        reply = json.loads(data)
        if not reply.get("ok"):
            raise ValueError(f"faultfs: {reply.get('error', reply)}")
        return reply  # type: ignore[no-any-return]

    def ping(self) -> dict[str, Any]:
        return self.request({"cmd": "ping"}, timeout=5.0)

    def set_rules(self, rules: list[dict[str, Any]], seed: int = 0) -> None:
        self.request({"cmd": "set", "rules": rules, "seed": seed})

    def clear_rules(self) -> None:
        self.set_rules([])

    def set_read_delay(self, seconds: float) -> None:
        """Every read request from now on takes *seconds* more (0: off)."""
        self.request({"cmd": "read_delay", "seconds": seconds})

    def stats(self) -> dict[str, Any]:
        return self.request({"cmd": "stats"})

    def reset_stats(self) -> None:
        self.request({"cmd": "reset_stats"})

    def events(self, since: int = 0) -> dict[str, Any]:
        return self.request({"cmd": "events", "since": since})

    def hold(self, path: str, timeout_s: float = DEFAULT_HOLD_S) -> None:
        self.request({"cmd": "hold", "path": path, "timeout_s": timeout_s},
                     timeout=timeout_s + 5)

    def release(self, path: str) -> None:
        self.request({"cmd": "release", "path": path})

    @contextlib.contextmanager
    def held(self, path: str, timeout_s: float = DEFAULT_HOLD_S) -> Iterator[None]:
        """Operations on *path* (relative to BACKING) wait inside this block."""
        self.hold(path, timeout_s)
        try:
            yield
        finally:
            self.release(path)

    # lifecycle
    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM by PID and wait; then fusermount3 -u, -uz as the last resort. Idempotent."""
        if not self._stopped:
            self._stopped = True
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        self.proc.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.proc.wait(5)
        if self.is_mounted():
            subprocess.run(["fusermount3", "-u", "-q", os.fspath(self.mountpoint)],
                           stdin=subprocess.DEVNULL, capture_output=True, check=False)
        if self.is_mounted():
            subprocess.run(["fusermount3", "-u", "-z", "-q", os.fspath(self.mountpoint)],
                           stdin=subprocess.DEVNULL, capture_output=True, check=False)
        with contextlib.suppress(FileNotFoundError):
            self.control.unlink()
        return self.proc.returncode

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def faultfs_mount(tmp_path: Path, *, seed: int = 0, backing: Path | None = None,
                  allow_other: bool = False, read_delay_s: float = 0.0) -> Iterator[FaultFS]:
    """A live faultfs for a test: BACKING ``tmp_path/faultfs-backing`` (made if missing,
    or *backing*), mounted at ``tmp_path/faultfs-mnt``; stopped and unmounted on exit.
    The control socket lives in a short temporary directory (socket path limit)."""
    backing = Path(backing) if backing is not None else tmp_path / "faultfs-backing"
    backing.mkdir(parents=True, exist_ok=True)
    mountpoint = tmp_path / "faultfs-mnt"
    mountpoint.mkdir(exist_ok=True)
    sockdir = Path(tempfile.mkdtemp(prefix="faultfs-"))
    fs = None
    try:
        fs = FaultFS.start(backing, mountpoint, sockdir / "control.sock", seed=seed,
                           log_path=tmp_path / "faultfs.log", allow_other=allow_other,
                           read_delay_s=read_delay_s)
        yield fs
    finally:
        if fs is not None:
            fs.stop()
        elif _mount_fstype(mountpoint) == FSTYPE:
            subprocess.run(["fusermount3", "-u", "-z", "-q", os.fspath(mountpoint)],
                           stdin=subprocess.DEVNULL, capture_output=True, check=False)
        shutil.rmtree(sockdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
