"""stfs soak test: a long mixed workload through stfs over a fault-injecting SOURCE.

Run through ``scripts/soak`` (mounts: root, or a user allowed to use FUSE).
SOURCE is ``tests/faultfs.py``, a FUSE passthrough of a generated BACKING
directory that injects transient faults into the backing reads stfs makes
(``--fault-rate`` of them fail with EIO, EAGAIN, ESTALE, ETIMEDOUT or EINTR,
1 % more are slow). stfs (``stfs mount -f --memory-limit ...``) is mounted on
top of it and read by, for ``--duration`` seconds:

  sequential  2 readers of whole files, read sizes 4 KiB..1 MiB (os.read)
  random      2 readers, 8-64 preads of 512 B..200 KiB at random offsets per open
  slow        1 reader of the biggest files in 64 KiB reads with pauses (streams of
              seconds, which the replacer's changes hit)
  storm       open, pread 4 KiB, close, paced to reach the cycle target
  readers16   16 concurrent sequential readers (40 %..55 % of the run)
  holder      200 files held open at once (from 60 % of the run, a few seconds)
  replacer    every ~2 s (1 s in short runs) rewrites one file: 3 in 4 in place
              (same inode, new content and mtime, made atomic as seen through
              faultfs by a faultfs hold), 1 in 4 by rename over it (new inode)

Every byte read is checked against the content the file had: content is a
function of (file, version), so any read can be recomputed. Three in four
streams first drop their file from the kernel's page cache (POSIX_FADV_DONTNEED)
so that their reads reach stfs rather than the page cache of the stfs mount. A stream is one
open..close; all of a stream's bytes must come from one version of the file.

Figures (report.md / report.json in --out, also printed):

  read success rate   good reads / (good + failed + wrong reads + failed opens);
                      a read failing with EIO on a file changed in place during
                      its stream is not counted (that EIO is correct behaviour)
  interrupted streams streams (not failed by a change) while whose open or one of
                      whose reads was in flight faultfs injected an error into an
                      operation on their file (EINTR excluded: Python retries it
                      below stfs); recovered = those whose reads all succeeded
                      with the right bytes
  wrong bytes         bytes matching no version of the file, plus the bytes of
                      reads that switched a stream to another version (mixed)
  EIO on changed      a stream failing with EIO after its file changed (in place,
                      or replaced by rename: a retry that reopens the name then finds
                      another file) since it was opened: correct, not a failed read.
                      Streams spanning an in-place change of their file: how many
                      ended in EIO, how many read one version throughout, how many
                      mixed versions (must be 0); eio_without_change = EIO where
                      no change happened (counts against the success rate)
  descriptors         the daemon's /proc/PID/fd count right after mount (idle) and
                      after the last close, and the time until stfs stats'
                      open_handles is 0 after the last close
  RSS drift           median daemon RSS over the last minute (last 20 % of short
                      runs) minus the median over the first minute (first 20 %)
                      after a warm-up of 10 % of the run

Targets: read success >= 99.9 %; >= 95 % of interrupted streams recover;
0 wrong bytes; no stream mixes versions across a change; >= 5000 open/read/close
cycles (scaled down for runs under 5 minutes) and 200 files held open; afterwards
open_handles 0 within 2 s of the last close and daemon descriptors back to idle
+-2; RSS drift < 5 MiB; no traceback in the daemon log. Exit 0 if all pass.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import contextlib
import dataclasses
import errno
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stfs.mountinfo import mount_at, mounts  # noqa: E402 - after the path setup
from tests.faultfs import FaultFS  # noqa: E402

PYTHON = sys.executable
KIB = 1024
MIB = 1024 * 1024
PERIOD = MIB + 4099
"""Content repeats every PERIOD bytes: no multiple of a page, chunk or request size."""
FILES = 40
HELD_FILES = 200
CYCLES_TARGET = 5000
STORM_THREADS = 4
FAULT_KINDS = ["EIO", "EAGAIN", "ESTALE", "ETIMEDOUT", "EINTR"]
COLD_SHARE = 0.75
"""Share of streams that first drop their file from the kernel's page cache."""
SLOW_RATE = 0.01
SLOW_S = 0.05
MOUNT_TIMEOUT_S = 30.0
HANDLES_ZERO_WITHIN_S = 2.0
FD_SLACK = 2
RSS_DRIFT_LIMIT = 5 * MIB
STATS_KEYS = ("retries", "recoveries", "errors", "open_handles", "open_fds", "rss_bytes",
              "interrupted_streams", "recovered_streams", "failed_streams", "changed_files",
              "corruptions_detected", "held_bytes", "cache_bytes", "bytes_served", "reads")


class Aborted(Exception):
    """A signal asked the soak to stop."""


def log(msg: str) -> None:
    print(f"soak: {msg}", file=sys.stderr, flush=True)


# -- content --------------------------------------------------------------------------


class Content:
    """The bytes of (file, version): a seeded pattern of min(size, PERIOD) bytes, repeated."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.cache: collections.OrderedDict[tuple[str, int], bytes] = collections.OrderedDict()
        self.lock = threading.Lock()

    def pattern(self, rel: str, version: int, size: int) -> bytes:
        key = (rel, version)
        with self.lock:
            found = self.cache.get(key)
            if found is not None:
                self.cache.move_to_end(key)
                return found
        made = random.Random(f"{self.seed}/{rel}/{version}").randbytes(max(1, min(size, PERIOD)))
        with self.lock:
            self.cache[key] = made
            while len(self.cache) > 160:
                self.cache.popitem(last=False)
        return made

    def expected(self, rel: str, version: int, size: int, offset: int, length: int) -> bytes:
        length = max(0, min(length, size - offset))
        if length == 0:
            return b""
        pattern = self.pattern(rel, version, size)
        period = len(pattern)
        pos = offset % period
        if pos + length <= period:
            return pattern[pos:pos + length]
        parts = []
        while length:
            n = min(length, period - pos)
            parts.append(pattern[pos:pos + n])
            length -= n
            pos = 0
        return b"".join(parts)

    def write(self, f: Any, rel: str, version: int, size: int) -> None:
        offset = 0
        while offset < size:
            n = min(8 * MIB, size - offset)
            f.write(self.expected(rel, version, size, offset, n))
            offset += n


@dataclasses.dataclass
class Version:
    number: int
    start: float  # its bytes may be seen from here (-inf for the first)
    end: float = math.inf  # ... until here (the end of the change that replaced it)


@dataclasses.dataclass
class Change:
    start: float
    end: float
    how: str  # in-place | replaced


@dataclasses.dataclass
class DataFile:
    rel: str
    size: int
    versions: list[Version]
    changes: list[Change] = dataclasses.field(default_factory=list)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def snapshot(self) -> list[Version]:
        with self.lock:
            return list(self.versions)

    def changes_between(self, start: float, end: float, how: str | None = None) -> list[Change]:
        """Changes (of kind *how*, or any) that overlap start..end."""
        with self.lock:
            return [c for c in self.changes if (how is None or c.how == how)
                    and c.start <= end and c.end >= start]


def count_diff(a: bytes, b: bytes) -> int:
    """How many bytes differ (length difference counted too)."""
    diff = abs(len(a) - len(b))
    block = 4096
    for i in range(0, min(len(a), len(b)), block):
        x, y = a[i:i + block], b[i:i + block]
        if x != y:
            diff += sum(p != q for p, q in zip(x, y))
    return diff


# -- streams and verification ---------------------------------------------------------


@dataclasses.dataclass
class Stream:
    rel: str
    kind: str
    t_open: float
    t_close: float = 0.0
    opened: bool = False
    reads_ok: int = 0
    reads_wrong: int = 0
    wrong_bytes: int = 0
    stale_reads: int = 0
    short_reads: int = 0
    mixed: bool = False
    versions: set[int] | None = None
    error: int | None = None
    t_error: float = 0.0
    t_last_read: float = 0.0
    torn_reads: int = 0
    switched_bytes: int = 0
    busy: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    """When the stream's open and reads were in flight."""
    log: collections.deque[tuple[Any, ...]] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=6))


class Verifier:
    def __init__(self, content: Content, files: dict[str, DataFile]) -> None:
        self.content = content
        self.files = files

    def torn(self, f: DataFile, versions: list[Version], offset: int, data: bytes) -> bool:
        """Whether *data* is pieces of two or more versions (page by page): one read that
        mixes versions, rather than bytes of no version at all."""
        used = set()
        pos = 0
        while pos < len(data):
            n = min(len(data) - pos, 4096 - (offset + pos) % 4096)
            piece = data[pos:pos + n]
            hit = next((v.number for v in versions if self.content.expected(
                f.rel, v.number, f.size, offset + pos, n) == piece), None)
            if hit is None:
                return False
            used.add(hit)
            pos += n
        return len(used) > 1

    def check(self, stream: Stream, offset: int, requested: int, data: bytes,
              t0: float, t1: float) -> bool:
        """Whether *data* (read at *offset*) is right for *stream*; records what was wrong."""
        f = self.files[stream.rel]
        versions = f.snapshot()
        want_len = max(0, min(requested, f.size - offset))
        if len(data) < want_len:
            stream.short_reads += 1
        candidates = [v for v in versions if v.start <= t1 and v.end >= stream.t_open]
        matched = {v.number for v in candidates
                   if len(data) <= want_len
                   and self.content.expected(f.rel, v.number, f.size, offset, len(data)) == data}
        if not matched and len(data) <= want_len:
            matched = {v.number for v in versions if v not in candidates
                       and self.content.expected(f.rel, v.number, f.size, offset,
                                                 len(data)) == data}
            if matched:
                stream.stale_reads += 1
        if not matched:
            ref = candidates[-1] if candidates else versions[-1]
            want = self.content.expected(f.rel, ref.number, f.size, offset, want_len)
            stream.reads_wrong += 1
            stream.wrong_bytes += count_diff(data, want)
            torn = self.torn(f, candidates or versions, offset, data)
            stream.torn_reads += torn
            stream.log.append((offset, len(data), t0, t1, "torn" if torn else "garbage"))
            return False
        stream.log.append((offset, len(data), t0, t1, sorted(matched)))
        if stream.versions is None:
            stream.versions = matched
        else:
            common = stream.versions & matched
            if not common:
                stream.log[-1] = (*stream.log[-1][:4], f"switched to {sorted(matched)}")
                stream.mixed = True
                stream.reads_wrong += 1
                stream.wrong_bytes += len(data)
                stream.switched_bytes += len(data)
                stream.versions = matched
                return False
            stream.versions = common
        return True


# -- the soak ---------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    duration: float
    warmup: float
    window: float
    readers16: tuple[float, float]
    hold_at: float
    hold_s: float
    replace_every: float
    cycles_target: int
    storm_rate: float

    @classmethod
    def for_duration(cls, d: float) -> Plan:
        cycles = CYCLES_TARGET if d >= 300 else max(500, int(CYCLES_TARGET * d / 300))
        return cls(duration=d, warmup=0.1 * d, window=60.0 if d >= 300 else 0.2 * d,
                   readers16=(0.40 * d, 0.55 * d), hold_at=0.60 * d,
                   hold_s=max(3.0, min(30.0, 0.05 * d)), replace_every=2.0 if d >= 120 else 1.0,
                   cycles_target=cycles, storm_rate=1.3 * cycles / (0.9 * d))


class Soak:
    def __init__(self, args: argparse.Namespace, root: Path, out: Path) -> None:
        self.args = args
        self.root = root
        self.out = out
        self.plan = Plan.for_duration(args.duration)
        self.backing = root / "backing"
        self.ffs_mnt = root / "faultfs"
        self.stfs_mnt = root / "stfs"
        self.content = Content(args.seed)
        self.files: dict[str, DataFile] = {}
        self.big: list[str] = []
        self.small: list[str] = []
        self.verifier = Verifier(self.content, self.files)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.streams: list[Stream] = []
        self.latencies: list[float] = []
        self.cycles = 0
        self.last_close = 0.0
        self.t0 = 0.0
        self.ffs: FaultFS | None = None
        self.stfs: subprocess.Popen[bytes] | None = None
        self.stfs_stderr: Any = None
        self.threads: list[threading.Thread] = []
        self.samples: list[dict[str, Any]] = []
        self.events_next = 0
        self.events_dropped = 0
        self.injections: collections.defaultdict[str, list[float]] = collections.defaultdict(list)
        self.held_handles_seen = 0
        self.slow_current: str | None = None
        self.storm_slots = 0
        self.identity_kept = 0
        self.change_log: list[list[Any]] = []
        self.held_opened = 0
        self.hold_window = [math.nan, math.nan]
        self.worker_errors: list[str] = []
        self.result: dict[str, Any] = {}
        self.aborted: str | None = None

    def check_abort(self) -> None:
        if self.aborted:
            raise Aborted(self.aborted)

    # setup
    def make_data(self) -> None:
        rng = random.Random(self.args.seed)
        (self.backing / "files").mkdir(parents=True)
        (self.backing / "many").mkdir()
        (self.backing / ".staging").mkdir()
        for i in range(FILES):
            # log-uniform 64 KiB .. 8 MiB, never a round size
            size = (int(math.exp(rng.uniform(math.log(64 * KIB), math.log(8 * MIB))))
                    + rng.randrange(4096))
            self._add_file(f"files/f{i:02d}.bin", size)
            self.big.append(f"files/f{i:02d}.bin")
        for i in range(HELD_FILES):
            self._add_file(f"many/m{i:03d}.bin", rng.randrange(4 * KIB, 16 * KIB))
            self.small.append(f"many/m{i:03d}.bin")
        total = sum(f.size for f in self.files.values())
        log(f"data: {len(self.files)} files, {total / MIB:.1f} MiB in {self.backing}")

    def _add_file(self, rel: str, size: int) -> None:
        with open(self.backing / rel, "wb") as f:
            self.content.write(f, rel, 0, size)
        self.files[rel] = DataFile(rel, size, [Version(0, -math.inf)])

    def mount(self) -> None:
        self.ffs_mnt.mkdir()
        self.stfs_mnt.mkdir()
        self.ffs = FaultFS.start(self.backing, self.ffs_mnt, self.root / "faultfs.sock",
                                 seed=self.args.seed, log_path=self.out / "faultfs.log")
        stfs_log = self.out / "stfs.log"
        stfs_log.unlink(missing_ok=True)
        (self.out / "faultfs.log").unlink(missing_ok=True)
        self.stfs_stderr = open(self.out / "stfs.stderr", "wb")  # noqa: SIM115 - closed in cleanup
        self.stfs = subprocess.Popen(
            [PYTHON, "-m", "stfs", "mount", "-f", "--memory-limit", self.args.memory_limit,
             "--log-file", str(stfs_log), str(self.ffs_mnt), str(self.stfs_mnt)],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=self.stfs_stderr, start_new_session=True)
        deadline = time.monotonic() + MOUNT_TIMEOUT_S
        while True:
            if self.stfs.poll() is not None:
                raise RuntimeError(f"stfs exited with {self.stfs.returncode}: "
                                   f"{(self.out / 'stfs.stderr').read_text(errors='replace')}")
            if fstype_at(self.stfs_mnt) == "fuse.stfs" and "mounted " in read_text(stfs_log):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"stfs did not mount within {MOUNT_TIMEOUT_S}s")
            time.sleep(0.05)
        os.statvfs(self.stfs_mnt)
        log(f"faultfs (pid {self.ffs.pid}) on {self.ffs_mnt}, "
            f"stfs (pid {self.stfs.pid}) on {self.stfs_mnt}")

    def fault_rules(self) -> list[dict[str, Any]]:
        return [{"op": "read", "path": "*", "kind": "slow", "probability": SLOW_RATE,
                 "delay_s": SLOW_S},
                {"op": "read", "path": "*", "kind": FAULT_KINDS,
                 "probability": self.args.fault_rate}]

    # daemon figures
    def daemon_fds(self) -> int | None:
        assert self.stfs is not None
        try:
            return int(psutil.Process(self.stfs.pid).num_fds())
        except psutil.Error:
            return None

    def daemon_rss(self) -> int | None:
        assert self.stfs is not None
        try:
            return int(psutil.Process(self.stfs.pid).memory_info().rss)
        except psutil.Error:
            return None

    def stfs_stats(self) -> dict[str, Any]:
        try:
            from stfs import control

            return control.request_stats(os.path.realpath(self.stfs_mnt), timeout=5.0)
        except ImportError:
            done = subprocess.run([PYTHON, "-m", "stfs", "stats", "--json", str(self.stfs_mnt)],
                                  cwd=REPO, capture_output=True, text=True, timeout=20,
                                  check=False)
            if done.returncode != 0:
                raise RuntimeError(done.stderr.strip())
            return json.loads(done.stdout)  # type: ignore[no-any-return]

    def now(self) -> float:
        return time.monotonic() - self.t0

    def phase(self) -> str:
        t = self.now()
        p = self.plan
        if p.readers16[0] <= t < p.readers16[1]:
            return "readers16"
        if p.hold_at <= t < p.hold_at + p.hold_s + 2:
            return "holder"
        return "base"

    # sampling
    def sample(self) -> dict[str, Any]:
        s: dict[str, Any] = {"t": round(self.now(), 2), "rss": self.daemon_rss(),
                             "fds": self.daemon_fds(), "phase": self.phase()}
        try:
            stats = self.stfs_stats()
            for key in STATS_KEYS:
                s[key] = stats.get(key, 0)
        except Exception as exc:  # noqa: BLE001 - a missed sample is reported, not fatal
            s["stats_error"] = str(exc)
        return s

    def poll_events(self) -> None:
        assert self.ffs is not None
        reply = self.ffs.events(self.events_next)
        self.events_dropped += reply.get("dropped", 0)
        self.events_next = reply["next"]
        for _seq, t, _op, path, kind in reply["events"]:
            if kind not in ("slow", "corrupt", "EINTR"):
                self.injections[path].append(t)

    def sampler(self) -> None:
        while not self.stop.wait(max(0.0, 1.0 - (self.now() % 1.0))):
            self.samples.append(self.sample())
            with contextlib.suppress(Exception):
                self.poll_events()

    # workload primitives
    def open_stream(self, rel: str, kind: str, cold: bool = False) -> tuple[Stream, int | None]:
        """Open *rel* through stfs; *cold* first drops the file's pages from the kernel's
        page cache (POSIX_FADV_DONTNEED), so that the reads reach the daemon."""
        stream = Stream(rel, kind, time.monotonic())
        try:
            fd = os.open(self.stfs_mnt / rel, os.O_RDONLY)
        except OSError as exc:
            stream.error = exc.errno
            stream.t_error = stream.t_close = time.monotonic()
            self.finish(stream)
            return stream, None
        stream.opened = True
        stream.busy.append((stream.t_open, time.monotonic()))
        if cold:
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return stream, fd

    def read(self, stream: Stream, fd: int, offset: int, size: int,
             positional: bool) -> bytes | None:
        t0 = time.monotonic()
        try:
            data = os.pread(fd, size, offset) if positional else os.read(fd, size)
        except OSError as exc:
            stream.error = exc.errno
            stream.t_error = time.monotonic()
            stream.busy.append((t0, stream.t_error))
            stream.log.append((offset, size, t0, stream.t_error,
                               errno.errorcode.get(exc.errno or 0, str(exc.errno))))
            return None
        t1 = time.monotonic()
        stream.t_last_read = t1
        stream.busy.append((t0, t1))
        if self.verifier.check(stream, offset, size, data, t0, t1):
            stream.reads_ok += 1
            with self.lock:
                self.latencies.append(t1 - t0)
            return data
        return None  # wrong bytes end the stream

    def close_stream(self, stream: Stream, fd: int) -> None:
        with contextlib.suppress(OSError):
            os.close(fd)
        stream.t_close = time.monotonic()
        self.finish(stream)

    def finish(self, stream: Stream) -> None:
        with self.lock:
            self.streams.append(stream)
            self.last_close = max(self.last_close, stream.t_close)

    def sequential(self, stream: Stream, fd: int, block: int) -> None:
        offset = 0
        while not self.stop.is_set():
            data = self.read(stream, fd, offset, block, positional=False)
            if not data:
                return
            offset += len(data)

    # workers
    def worker(self, name: str, body: Callable[[random.Random], None]) -> threading.Thread:
        def run() -> None:
            try:
                body(random.Random(f"{self.args.seed}/{name}"))
            except Exception as exc:  # noqa: BLE001
                self.worker_errors.append(f"{name}: {exc!r}")
                log(f"worker {name} failed: {exc!r}")

        thread = threading.Thread(target=run, name=name, daemon=True)
        self.threads.append(thread)
        thread.start()
        return thread

    def seq_reader(self, rng: random.Random) -> None:
        while not self.stop.is_set():
            stream, fd = self.open_stream(rng.choice(self.big), "sequential",
                                          cold=rng.random() < COLD_SHARE)
            if fd is not None:
                self.sequential(stream, fd, rng.choice([4 * KIB, 16 * KIB, 64 * KIB, 128 * KIB,
                                                        256 * KIB, MIB]))
                self.close_stream(stream, fd)

    def random_reader(self, rng: random.Random) -> None:
        while not self.stop.is_set():
            rel = rng.choice(self.big)
            size = self.files[rel].size
            stream, fd = self.open_stream(rel, "random", cold=rng.random() < COLD_SHARE)
            if fd is None:
                continue
            for _ in range(rng.randint(8, 64)):
                if self.stop.is_set():
                    break
                n = rng.choice([512, 4 * KIB, 16 * KIB, 64 * KIB, 200 * KIB])
                if self.read(stream, fd, rng.randrange(size), n, positional=True) is None:
                    break
            self.close_stream(stream, fd)

    def slow_reader(self, rng: random.Random) -> None:
        """Long streams (a few seconds) of the biggest files, so that changes hit them:
        the replacer picks the file read here half of the time."""
        biggest = sorted(self.big, key=lambda rel: self.files[rel].size)[-4:]
        while not self.stop.is_set():
            rel = rng.choice(biggest)
            stream, fd = self.open_stream(rel, "slow", cold=True)
            if fd is None:
                continue
            self.slow_current = rel
            offset = 0
            while not self.stop.is_set():
                data = self.read(stream, fd, offset, 64 * KIB, positional=False)
                if not data:
                    break
                offset += len(data)
                self.stop.wait(rng.uniform(0.005, 0.03))
            self.slow_current = None
            self.close_stream(stream, fd)

    def storm(self, rng: random.Random) -> None:
        """Open, pread 4 KiB, close; STORM_THREADS of these share one pace."""
        every = 1.0 / self.plan.storm_rate
        everything = self.big + self.small
        while not self.stop.is_set():
            with self.lock:
                due = self.t0 + self.storm_slots * every
                self.storm_slots += 1
            delay = due - time.monotonic()
            if delay > 0 and self.stop.wait(delay):
                break
            rel = rng.choice(everything)
            stream, fd = self.open_stream(rel, "storm", cold=rng.random() < 0.5)
            if fd is None:
                continue
            self.read(stream, fd, rng.randrange(self.files[rel].size), 4 * KIB, positional=True)
            self.close_stream(stream, fd)
            with self.lock:
                self.cycles += 1

    def wait_until(self, t: float) -> bool:
        """Sleep until *t* seconds into the run; False if stopped first."""
        return not self.stop.wait(max(0.0, t - self.now()))

    def readers16(self) -> None:
        start, end = self.plan.readers16
        if not self.wait_until(start):
            return

        def one(rng: random.Random) -> None:
            while not self.stop.is_set() and self.now() < end:
                stream, fd = self.open_stream(rng.choice(self.big), "readers16",
                                              cold=rng.random() < COLD_SHARE)
                if fd is not None:
                    self.sequential(stream, fd, 128 * KIB)
                    self.close_stream(stream, fd)

        for i in range(16):
            self.worker(f"readers16-{i}", one)

    def holder(self, rng: random.Random) -> None:
        if not self.wait_until(self.plan.hold_at):
            return
        held: list[tuple[Stream, int]] = []
        self.hold_window[0] = self.now()
        try:
            for rel in self.small:
                stream, fd = self.open_stream(rel, "holder")
                if fd is not None:
                    held.append((stream, fd))
                    self.read(stream, fd, 0, 4 * KIB, positional=True)
            self.held_opened = len(held)
            with contextlib.suppress(Exception):
                self.held_handles_seen = int(self.stfs_stats().get("open_handles", 0))
            deadline = time.monotonic() + self.plan.hold_s
            while not self.stop.is_set() and time.monotonic() < deadline:
                for stream, fd in rng.sample(held, min(20, len(held))):
                    if stream.error is None and not stream.reads_wrong:
                        size = self.files[stream.rel].size
                        self.read(stream, fd, rng.randrange(size), 1024, positional=True)
                with contextlib.suppress(Exception):
                    self.held_handles_seen = max(self.held_handles_seen,
                                                 int(self.stfs_stats().get("open_handles", 0)))
                self.stop.wait(0.5)
        finally:
            for stream, fd in held:
                self.close_stream(stream, fd)
            self.hold_window[1] = self.now()

    def replacer(self, rng: random.Random) -> None:
        assert self.ffs is not None
        n = 0
        while not self.stop.wait(self.plan.replace_every * rng.uniform(0.5, 1.5)):
            current = self.slow_current
            rel = current if current is not None and rng.random() < 0.5 else rng.choice(self.big)
            f = self.files[rel]
            with f.lock:
                version = f.versions[-1].number + 1
            n += 1
            path = self.backing / rel
            if n % 4:
                with self.ffs.held(rel):
                    start = time.monotonic()
                    before = os.stat(path)
                    with open(path, "r+b") as out:
                        self.content.write(out, rel, version, f.size)
                    after = os.stat(path)
                    end = time.monotonic()
                how = "in-place"
                if ((before.st_mtime_ns, before.st_ctime_ns)
                        == (after.st_mtime_ns, after.st_ctime_ns)):
                    self.identity_kept += 1  # the harness's fault, not stfs's: reported
            else:
                staging = self.backing / ".staging" / Path(rel).name
                with open(staging, "wb") as out:
                    self.content.write(out, rel, version, f.size)
                start = time.monotonic()
                os.replace(staging, path)
                end = time.monotonic()
                how = "replaced"
            with f.lock:
                f.versions[-1].end = end
                f.versions.append(Version(version, start))
                f.changes.append(Change(start, end, how))
            self.change_log.append([rel, version, how, round(start - self.t0, 3),
                                    round(end - self.t0, 3)])

    # the run
    def run(self) -> None:
        self.make_data()
        self.check_abort()
        self.mount()
        assert self.ffs is not None
        self.check_abort()
        time.sleep(1.0)
        idle_fds = self.daemon_fds()
        idle_rss = self.daemon_rss()
        idle_stats = self.stfs_stats()
        self.ffs.reset_stats()
        self.ffs.set_rules(self.fault_rules(), seed=self.args.seed)
        self.events_next = self.ffs.events()["next"]
        self.t0 = time.monotonic()
        log(f"running {self.plan.duration:.0f} s; idle: {idle_fds} fds, "
            f"RSS {idle_rss / MIB if idle_rss else 0:.1f} MiB; faults on "
            f"{self.args.fault_rate:.0%} of backing reads")
        self.worker("sampler", lambda _rng: self.sampler())
        self.worker("replacer", self.replacer)
        for i in range(2):
            self.worker(f"sequential-{i}", self.seq_reader)
            self.worker(f"random-{i}", self.random_reader)
        self.worker("slow", self.slow_reader)
        for i in range(STORM_THREADS):
            self.worker(f"storm-{i}", self.storm)
        self.worker("readers16", lambda _rng: self.readers16())
        self.worker("holder", self.holder)
        next_note = 0.0
        while self.now() < self.plan.duration:
            self.stop.wait(min(1.0, self.plan.duration - self.now()))
            self.check_abort()
            if self.now() >= next_note:
                next_note += max(10.0, self.plan.duration / 10)
                log(f"t={self.now():.0f}s streams={len(self.streams)} cycles={self.cycles} "
                    f"phase={self.phase()}")
        self.stop.set()
        workers = [t for t in self.threads if t.name != "sampler"]
        join_deadline = time.monotonic() + 120
        for thread in workers:
            thread.join(max(0.1, join_deadline - time.monotonic()))
        stuck = [t.name for t in workers if t.is_alive()]
        ended = time.monotonic()
        # after the last close: open handles to 0, descriptors back to idle
        handles_zero_s = None
        handles_end = None
        while True:
            with contextlib.suppress(Exception):
                handles_end = int(self.stfs_stats().get("open_handles", 0))
                if handles_end == 0:
                    handles_zero_s = time.monotonic() - self.last_close
                    break
            if time.monotonic() - max(self.last_close, ended) > 5:
                break
            time.sleep(0.02)
        fds_end = self.daemon_fds()
        while (idle_fds is not None and fds_end is not None and abs(fds_end - idle_fds) > FD_SLACK
               and time.monotonic() - self.last_close < HANDLES_ZERO_WITHIN_S):
            time.sleep(0.05)
            fds_end = self.daemon_fds()
        self.ffs.set_rules([])
        for thread in self.threads:
            thread.join(5)
        with contextlib.suppress(Exception):
            self.poll_events()
        final_stats = self.stfs_stats()
        ffs_stats = self.ffs.stats()
        self.result = self.figures(idle_fds=idle_fds, idle_rss=idle_rss, idle_stats=idle_stats,
                                   final_stats=final_stats, ffs_stats=ffs_stats,
                                   handles_zero_s=handles_zero_s, handles_end=handles_end,
                                   fds_end=fds_end, stuck=stuck)

    # figures
    def interrupted(self, stream: Stream) -> bool:
        """Whether faultfs injected an error into an operation on the stream's file while
        the stream's open or one of its reads was in flight."""
        times = self.injections.get(stream.rel)
        if not times:
            return False
        for began, ended in stream.busy:
            i = bisect.bisect_left(times, began)
            if i < len(times) and times[i] <= ended:
                return True
        return False

    def figures(self, **k: Any) -> dict[str, Any]:
        for times in self.injections.values():
            times.sort()
        reads_ok = sum(s.reads_ok for s in self.streams)
        reads_wrong = sum(s.reads_wrong for s in self.streams)
        wrong_bytes = sum(s.wrong_bytes for s in self.streams)
        failed_opens = sum(1 for s in self.streams if not s.opened)
        errors_by_errno: collections.Counter[str] = collections.Counter()
        eio_on_changed = eio_without_change = failed_reads = 0
        spanning = {"streams": 0, "eio": 0, "one_version": 0, "mixed": 0, "other_error": 0}
        interrupted = recovered = 0
        by_kind: collections.Counter[str] = collections.Counter()
        for s in self.streams:
            by_kind[s.kind] += 1
            f = self.files[s.rel]
            changed_during = bool(f.changes_between(s.t_open, s.t_close, "in-place"))
            eio_changed = s.error == errno.EIO and bool(f.changes_between(s.t_open, s.t_error))
            if s.error is not None:
                errors_by_errno[errno.errorcode.get(s.error, str(s.error))] += 1
                if eio_changed:
                    eio_on_changed += 1
                else:
                    if s.opened:
                        failed_reads += 1
                    if s.error == errno.EIO:
                        eio_without_change += 1
            if changed_during and s.opened:
                spanning["streams"] += 1
                if s.mixed:
                    spanning["mixed"] += 1
                elif eio_changed:
                    spanning["eio"] += 1
                elif s.error is not None or s.reads_wrong:
                    spanning["other_error"] += 1
                else:
                    spanning["one_version"] += 1
            if s.opened and not eio_changed and self.interrupted(s):
                interrupted += 1
                if s.error is None and not s.reads_wrong:
                    recovered += 1
        problems: list[dict[str, Any]] = []
        for s in self.streams:
            f = self.files[s.rel]
            eio_changed = s.error == errno.EIO and bool(f.changes_between(s.t_open, s.t_error))
            if not (s.mixed or s.reads_wrong or (s.error is not None and not eio_changed)):
                continue
            if len(problems) >= 40:
                break

            def rel_t(t: float) -> float:
                return round(t - self.t0, 3)

            with f.lock:
                near = [{"how": c.how, "start": rel_t(c.start), "end": rel_t(c.end)}
                        for c in f.changes if c.start <= s.t_close + 1 and c.end >= s.t_open - 1]
            problems.append({
                "file": s.rel, "kind": s.kind, "open": rel_t(s.t_open), "close": rel_t(s.t_close),
                "reads_ok": s.reads_ok, "reads_wrong": s.reads_wrong, "torn_reads": s.torn_reads,
                "wrong_bytes": s.wrong_bytes, "mixed": s.mixed,
                "error": errno.errorcode.get(s.error, s.error) if s.error is not None else None,
                "last_reads": [[o, n, rel_t(a), rel_t(b), what] for o, n, a, b, what in s.log],
                "changes_nearby": near})
        bad = failed_reads + reads_wrong + failed_opens
        success = reads_ok / (reads_ok + bad) if reads_ok + bad else 0.0
        lat = sorted(self.latencies)

        def pct(p: float) -> float | None:
            return round(1000 * lat[min(len(lat) - 1, int(p * len(lat)))], 2) if lat else None

        p = self.plan
        rss_early = [s["rss"] for s in self.samples
                     if s["rss"] and p.warmup <= s["t"] <= p.warmup + p.window]
        rss_late = [s["rss"] for s in self.samples
                    if s["rss"] and p.duration - p.window <= s["t"] <= p.duration]
        drift = (statistics.median(rss_late) - statistics.median(rss_early)
                 if rss_early and rss_late else None)
        changes = collections.Counter(c.how for f in self.files.values() for c in f.changes)
        final = k["final_stats"]
        idle_fds, fds_end = k["idle_fds"], k["fds_end"]
        figures: dict[str, Any] = {
            "run": {"duration_s": p.duration, "fault_rate": self.args.fault_rate,
                    "fault_kinds": FAULT_KINDS, "slow_rate": SLOW_RATE, "slow_s": SLOW_S,
                    "memory_limit": self.args.memory_limit, "seed": self.args.seed,
                    "files": len(self.files),
                    "data_bytes": sum(f.size for f in self.files.values()),
                    "command": " ".join(["scripts/soak", *sys.argv[1:]]),
                    "kernel": os.uname().release, "cpus": os.cpu_count()},
            "reads": {"ok": reads_ok, "failed": failed_reads, "wrong": reads_wrong,
                      "failed_opens": failed_opens, "eio_on_changed": eio_on_changed,
                      "errors_seen": dict(errors_by_errno), "success_rate": success,
                      "latency_ms": {"p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99)},
                      "short_reads": sum(s.short_reads for s in self.streams),
                      "stale_reads": sum(s.stale_reads for s in self.streams)},
            "streams": {"total": len(self.streams), "by_kind": dict(by_kind),
                        "interrupted": interrupted, "recovered": recovered,
                        "recovery_rate": recovered / interrupted if interrupted else None,
                        "mixed": sum(1 for s in self.streams if s.mixed)},
            "wrong_bytes": wrong_bytes,
            "wrong": {"bytes_in_reads_of_no_version": wrong_bytes - sum(
                          s.switched_bytes for s in self.streams),
                      "bytes_in_reads_switching_version": sum(
                          s.switched_bytes for s in self.streams),
                      "torn_reads": sum(s.torn_reads for s in self.streams),
                      "mixed_streams": sum(1 for s in self.streams if s.mixed)},
            "changes": {"in_place": changes["in-place"], "replaced": changes["replaced"],
                        "in_place_keeping_mtime_ctime": self.identity_kept,
                        "streams_spanning_a_change": spanning["streams"],
                        "eio_on_changed": spanning["eio"],
                        "one_version": spanning["one_version"], "mixed": spanning["mixed"],
                        "other_error": spanning["other_error"],
                        "eio_without_change": eio_without_change},
            "cycles": {"done": self.cycles, "target": p.cycles_target},
            "held": {"opened": self.held_opened, "open_handles_seen": self.held_handles_seen,
                     "from_s": _finite(self.hold_window[0]), "to_s": _finite(self.hold_window[1])},
            "descriptors": {"idle_fds": idle_fds, "end_fds": fds_end,
                            "max_fds": max((s["fds"] for s in self.samples if s["fds"]),
                                           default=None),
                            "open_handles_end": k["handles_end"],
                            "open_handles_zero_after_s": (
                                round(k["handles_zero_s"], 3)
                                if k["handles_zero_s"] is not None else None),
                            "idle_open_fds_stat": k["idle_stats"].get("open_fds"),
                            "end_open_fds_stat": final.get("open_fds"),
                            "faultfs_open_files_end": k["ffs_stats"].get("open_files")},
            "rss": {"idle": k["idle_rss"], "early_median": _median(rss_early),
                    "late_median": _median(rss_late), "drift": drift,
                    "max": max((s["rss"] for s in self.samples if s["rss"]), default=None),
                    "early_window_s": [round(p.warmup, 1), round(p.warmup + p.window, 1)],
                    "late_window_s": [round(p.duration - p.window, 1), round(p.duration, 1)]},
            "stfs": {key: final.get(key, 0) for key in STATS_KEYS}
            | {"tracked_resources": final.get("tracked_resources", final.get("resources", {})),
               "backing_fds": final.get("backing_fds", {})},
            "faultfs": {"ops": k["ffs_stats"].get("ops"),
                        "injected": k["ffs_stats"].get("injected"),
                        "reads": k["ffs_stats"].get("reads"),
                        "read_bytes": k["ffs_stats"].get("read_bytes"),
                        "events_dropped": self.events_dropped},
            "daemon_log": log_findings(self.out / "stfs.log"),
            "stuck_workers": k["stuck"], "worker_errors": self.worker_errors,
            "problems": problems,
            "change_log": self.change_log,
        }
        figures["targets"] = targets(figures)
        figures["pass"] = all(t["pass"] for t in figures["targets"])
        return figures

    # cleanup: whatever happened
    def cleanup(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(2)
        if self.stfs is not None:
            unmount_stfs(self.stfs, self.stfs_mnt)
        if self.ffs is not None:
            self.ffs.stop()
        if self.stfs_stderr is not None:
            self.stfs_stderr.close()
        left = [m for m in mounts_under(self.root)]
        if left:
            log(f"mounts left under {self.root}: {left}; not removing it")
        else:
            shutil.rmtree(self.root, ignore_errors=True)


def _finite(x: float) -> float | None:
    return round(x, 1) if math.isfinite(x) else None


def _median(values: list[int]) -> float | None:
    return statistics.median(values) if values else None


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def log_findings(path: Path) -> dict[str, Any]:
    lines = read_text(path).splitlines()
    return {"tracebacks": sum("Traceback" in line for line in lines),
            "error_lines": sum((" ERROR " in line or " CRITICAL " in line) for line in lines),
            "warning_lines": sum(" WARNING " in line for line in lines),
            "changed_file_lines": sum("changed" in line for line in lines),
            "corruption_lines": sum("CORRUPTION" in line.upper() for line in lines)}


def fstype_at(path: Path) -> str | None:
    """The type of the topmost mount at *path*, None if nothing is mounted there."""
    entry = mount_at(os.path.realpath(path))
    return entry.fstype if entry is not None else None


def mounts_under(root: Path) -> list[str]:
    base = os.path.realpath(root) + "/"
    return [entry.mountpoint for entry in mounts() if entry.mountpoint.startswith(base)]


def unmount_stfs(proc: subprocess.Popen[bytes], mountpoint: Path) -> None:
    """fusermount3 -u, then SIGTERM/SIGKILL by PID, then -uz as the last resort."""
    if fstype_at(mountpoint) == "fuse.stfs":
        subprocess.run(["fusermount3", "-u", "-q", str(mountpoint)], stdin=subprocess.DEVNULL,
                       capture_output=True, check=False)
    try:
        proc.wait(15 if fstype_at(mountpoint) != "fuse.stfs" else 1)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
    if fstype_at(mountpoint) == "fuse.stfs":
        subprocess.run(["fusermount3", "-u", "-z", "-q", str(mountpoint)], stdin=subprocess.DEVNULL,
                       capture_output=True, check=False)


# -- report ------------------------------------------------------------------------------


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def target(name: str, value: str, ok: bool | None, note: str = "") -> None:
        out.append({"target": name, "value": value, "pass": ok is not False,
                    "status": "n/a" if ok is None else "PASS" if ok else "FAIL", "note": note})

    reads = r["reads"]
    target("read success >= 99.9 %", f"{reads['success_rate']:.4%} "
           f"({reads['ok']} good, {reads['failed']} failed, {reads['wrong']} wrong, "
           f"{reads['failed_opens']} failed opens)",
           reads["success_rate"] >= 0.999 and reads["ok"] > 0)
    streams = r["streams"]
    rate = streams["recovery_rate"]
    target(">= 95 % of interrupted streams recover",
           f"{streams['recovered']} of {streams['interrupted']}"
           + (f" ({rate:.1%})" if rate is not None else ""),
           None if rate is None else rate >= 0.95,
           "" if rate is not None else "no stream was interrupted")
    target("0 wrong bytes", f"{r['wrong_bytes']} ({streams['mixed']} streams mixed versions)",
           r["wrong_bytes"] == 0)
    ch = r["changes"]
    target("streams spanning a change end in EIO or read one version",
           f"{ch['streams_spanning_a_change']} spanning: {ch['eio_on_changed']} EIO, "
           f"{ch['one_version']} one version, {ch['mixed']} mixed, {ch['other_error']} other errors"
           f"; EIO without a change: {ch['eio_without_change']}",
           None if ch["streams_spanning_a_change"] == 0 else ch["mixed"] == 0,
           "" if ch["streams_spanning_a_change"] else "no stream spanned a change")
    cyc = r["cycles"]
    target(f"open/read/close cycles >= {cyc['target']}", str(cyc["done"]),
           cyc["done"] >= cyc["target"])
    held = r["held"]
    target(f"{HELD_FILES} files held open at once", f"{held['opened']} opened, "
           f"open_handles seen {held['open_handles_seen']}",
           held["opened"] >= HELD_FILES and held["open_handles_seen"] >= HELD_FILES)
    d = r["descriptors"]
    zero = d["open_handles_zero_after_s"]
    target(f"open_handles 0 within {HANDLES_ZERO_WITHIN_S:g} s of the last close",
           f"{zero:.3f} s" if zero is not None else f"still {d['open_handles_end']}",
           zero is not None and zero <= HANDLES_ZERO_WITHIN_S)
    target(f"daemon descriptors back to idle +-{FD_SLACK}",
           f"idle {d['idle_fds']}, end {d['end_fds']} (peak {d['max_fds']})",
           d["idle_fds"] is not None and d["end_fds"] is not None
           and abs(d["end_fds"] - d["idle_fds"]) <= FD_SLACK)
    rss = r["rss"]
    drift = rss["drift"]
    target("RSS drift < 5 MiB", f"{drift / MIB:+.2f} MiB" if drift is not None else "no samples",
           drift is not None and drift < RSS_DRIFT_LIMIT,
           f"median of {rss['late_window_s']} s minus median of {rss['early_window_s']} s")
    logs = r["daemon_log"]
    target("no traceback in the daemon log", f"{logs['tracebacks']} tracebacks, "
           f"{logs['error_lines']} ERROR lines", logs["tracebacks"] == 0)
    if r["stuck_workers"] or r["worker_errors"]:
        target("workload finished", f"stuck: {r['stuck_workers']}, errors: {r['worker_errors']}",
               False)
    return out


def markdown(r: dict[str, Any], plotted: str) -> str:
    run = r["run"]
    head = (f"`{run['command']}`: {run['duration_s']:.0f} s, {run['files']} files "
            f"({run['data_bytes'] / MIB:.0f} MiB), --memory-limit {run['memory_limit']}, "
            f"{run['fault_rate']:.0%} of backing reads fail ({', '.join(run['fault_kinds'])}), "
            f"{run['slow_rate']:.0%} slow ({run['slow_s'] * 1000:.0f} ms), seed {run['seed']}; "
            f"kernel {run['kernel']}, {run['cpus']} CPUs")
    lines = [f"# stfs soak — {'PASS' if r['pass'] else 'FAIL'}", "", head, "",
             "| target | value | result |", "|---|---|---|"]
    for t in r["targets"]:
        note = f" ({t['note']})" if t["note"] else ""
        lines.append(f"| {t['target']} | {t['value']}{note} | {t['status']} |")
    reads, streams, ch = r["reads"], r["streams"], r["changes"]
    lat = reads["latency_ms"]
    figures = [
        (f"reads: {reads['ok']} good, {reads['failed']} failed, {reads['wrong']} wrong "
         f"(errors seen, by errno: {reads['errors_seen'] or 'none'}), "
         f"{reads['eio_on_changed']} EIO on changed files (not counted); latency p50 "
         f"{lat['p50']} ms, p95 {lat['p95']} ms, p99 {lat['p99']} ms; "
         f"{reads['stale_reads']} stale reads (a superseded version, consistent), "
         f"{reads['short_reads']} short reads"),
        (f"wrong bytes: {r['wrong']} (torn: one read mixing versions page by page; "
         "switching: a read of another version than the stream's earlier reads)"),
        (f"streams: {streams['total']} ({streams['by_kind']}); interrupted by an injected "
         f"fault {streams['interrupted']}, recovered {streams['recovered']}"),
        (f"changes: {ch['in_place']} in place, {ch['replaced']} by rename; streams spanning "
         f"an in-place change {ch['streams_spanning_a_change']}: {ch['eio_on_changed']} EIO, "
         f"{ch['one_version']} one version, {ch['mixed']} mixed, {ch['other_error']} other "
         f"errors; EIO without a change {ch['eio_without_change']}"),
        f"descriptors: {r['descriptors']}",
        f"held: {r['held']}; cycles: {r['cycles']}",
        "RSS: " + ", ".join(f"{k} {v / MIB:.2f} MiB" if isinstance(v, (int, float)) else
                            f"{k} {v}" for k, v in r["rss"].items()),
        f"stfs stats at the end: {json.dumps(r['stfs'])}",
        f"faultfs: {json.dumps(r['faultfs'])}",
        f"daemon log: {r['daemon_log']}",
        (f"problem streams (first {len(r['problems'])}, details in report.json): "
         + (", ".join(f"{p['file']} {p['kind']} {'mixed' if p['mixed'] else p['error'] or 'wrong'}"
                      for p in r["problems"][:10]) or "none")),
    ]
    lines += ["", "## Figures", "", *(f"- {line}" for line in figures), "", plotted]
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], samples: list[dict[str, Any]], plan: Plan, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not samples:
        return False
    t = [s["t"] for s in samples]
    fig, ax = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ax[0].plot(t, [(s["rss"] or math.nan) / MIB for s in samples], color="#2ca02c",
               label="daemon RSS")
    for lo, hi in (r["rss"]["early_window_s"], r["rss"]["late_window_s"]):
        ax[0].axvspan(lo, hi, color="#2ca02c", alpha=0.08)
    ax[0].set_ylabel("MiB")
    ax[0].set_title(f"stfs daemon RSS (drift windows shaded; drift "
                    f"{(r['rss']['drift'] or 0) / MIB:+.2f} MiB)", fontsize=10)
    ax[1].plot(t, [s["fds"] if s["fds"] is not None else math.nan for s in samples],
               label="daemon fds (/proc/PID/fd)")
    ax[1].plot(t, [s.get("open_handles", math.nan) for s in samples], label="open_handles")
    if r["descriptors"]["idle_fds"] is not None:
        ax[1].axhline(r["descriptors"]["idle_fds"], color="#888", linestyle=":", label="idle fds")
    ax[1].set_ylabel("count")
    ax[1].set_xlabel("seconds since the workload started")
    ax[1].set_title("open descriptors and handles", fontsize=10)
    for a in ax:
        a.axvspan(*plan.readers16, color="#1f77b4", alpha=0.06)
        lo, hi = r["held"]["from_s"], r["held"]["to_s"]
        if lo is not None and hi is not None:
            a.axvspan(lo, hi, color="#ff7f0e", alpha=0.08)
    ax[1].legend(fontsize=7, loc="upper left")
    fig.text(0.01, 0.005, "blue band: 16 concurrent readers; orange: opening, holding and "
             f"closing {HELD_FILES} files",
             fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- main ---------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, help="seconds of workload (default 600)")
    parser.add_argument("--quick", action="store_true", help="a short run: 45 s unless --duration")
    parser.add_argument("--fault-rate", type=float, default=0.10,
                        help="share of backing reads that fail transiently (default 0.10)")
    parser.add_argument("--memory-limit", default="32M", help="stfs --memory-limit (default 32M)")
    parser.add_argument("--out", default=str(REPO / "bench-results" / "soak"),
                        help="report directory (default bench-results/soak)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.duration is None:
        args.duration = 45.0 if args.quick else 600.0
    if args.duration < 10 or not 0 <= args.fault_rate <= 1:
        parser.error("--duration is at least 10 s; --fault-rate is within 0..1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="stfs-soak-", dir="/tmp"))
    soak = Soak(args, root, out)
    cleaning = False

    def on_signal(signum: int, _frame: object) -> None:
        """The first signal stops the run at its next step; a second one interrupts
        whatever the main thread is doing. Cleanup itself is never interrupted."""
        if cleaning:
            return
        name = signal.Signals(signum).name
        if soak.aborted:
            raise Aborted(name)
        soak.aborted = name
        soak.stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        soak.run()
    except Aborted as exc:
        log(f"aborted by {exc}; cleaning up")
        return 130
    finally:
        cleaning = True
        soak.cleanup()
    r = soak.result
    (out / "samples.json").write_text(json.dumps(soak.samples) + "\n")
    plotted = plot(r, soak.samples, soak.plan, out / "soak.png")
    note = ("Plot: soak.png (RSS, descriptors and open handles over time)." if plotted else
            "No plot: matplotlib is not installed (pip install -e '.[bench]').")
    (out / "report.json").write_text(json.dumps(r, indent=2) + "\n")
    text = markdown(r, note)
    (out / "report.md").write_text(text)
    print(text)
    log(f"wrote {out / 'report.md'}, report.json, samples.json" + (", soak.png" if plotted else ""))
    return 0 if r["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
