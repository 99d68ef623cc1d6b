"""stfs benchmark: reading SOURCE directly vs stfs vs peer FUSE mounts, side by side.

Run through ``scripts/bench`` (root: it drops caches and mounts). One run
generates the data once, then for every target (direct, stfs at each memory
limit, bindfs, pyfuse3's passthroughfs example) measures:

  cold      sequential read of the big file after dropping all caches (MB/s)
  warm      first read through a fresh view with SOURCE in the page cache (MB/s)
  reread    the same read again through the same mount (MB/s)
  readers16 16 concurrent readers of different files (aggregate MB/s, p95 ms/read)
  rand4k    4 KiB random preads, POSIX_FADV_RANDOM (IOPS, p95 ms/read)
  find, du  over a tree of >= 20 000 small files (seconds; lower is better)

and the daemon's peak RSS during each workload. Every figure is the median of
several runs and is also given as a ratio to direct in the same run. Writes
bench-results/bench.md, bench.json and (with matplotlib) bench.png.

Three scenarios follow: ``pressure`` (16 readers at --memory-limit 16M in a
memory cgroup, with and without a hog), ``slow`` (SOURCE behind faultfs
with a per-request delay, --delays: one reader, 8 readers and 4 KiB random
reads against the store read directly, bindfs and stfs) and ``disk-cache``
(the slow store read twice across a remount through stfs's --cache-dir and
rclone's full VFS cache; ``scripts/bench_disk_cache.py``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from stfs.mountinfo import mount_at

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
MIB = 1024 * 1024
READ_SIZE = 1 * MIB
READER_BLOCK = 128 * 1024


# -- data -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sizes:
    big_bytes: int
    reader_bytes: int
    readers: int
    small_files: int
    random_reads: int
    runs: int


FULL = Sizes(big_bytes=1024 * MIB, reader_bytes=64 * MIB, readers=16, small_files=20_000,
             random_reads=20_000, runs=3)
QUICK = Sizes(big_bytes=256 * MIB, reader_bytes=16 * MIB, readers=16, small_files=20_000,
              random_reads=5_000, runs=1)


def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        remaining = size
        while remaining:
            n = min(remaining, 8 * MIB)
            f.write(os.urandom(n))
            remaining -= n


def make_data(root: Path, sizes: Sizes) -> Path:
    """SOURCE for every target, generated once and reused while it matches."""
    source = root / "source"
    manifest = root / "manifest.json"
    wanted = dataclasses.asdict(sizes) | {"runs": 0, "random_reads": 0}
    if manifest.exists() and json.loads(manifest.read_text()) == wanted and source.is_dir():
        return source
    shutil.rmtree(source, ignore_errors=True)
    (source / "readers").mkdir(parents=True)
    print(f"bench: generating data in {source}", file=sys.stderr)
    write_random(source / "big.bin", sizes.big_bytes)
    for i in range(sizes.readers):
        write_random(source / "readers" / f"r{i:02d}.bin", sizes.reader_bytes)
    tree = source / "tree"
    for i in range(sizes.small_files):
        d = tree / f"d{i // 500:03d}"
        if i % 500 == 0:
            d.mkdir(parents=True)
        (d / f"f{i:05d}.txt").write_bytes(b"x" * (i % 2048))
    manifest.write_text(json.dumps(wanted))
    return source


# -- targets ------------------------------------------------------------------


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def is_mounted(path: Path) -> bool:
    return mount_at(os.path.realpath(path)) is not None


def wait_mounted(path: Path, proc: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mount helper for {path} exited with {proc.returncode}")
        if is_mounted(path):
            os.statvfs(path)
            return
        time.sleep(0.05)
    raise RuntimeError(f"{path} was not mounted within {timeout}s")


@dataclasses.dataclass
class Target:
    """Something to read SOURCE through: a directory, maybe a mount with a daemon."""

    name: str
    command: list[str] | None  # foreground daemon command, None for direct reads
    mountpoint: Path
    proc: subprocess.Popen[bytes] | None = None

    def mount(self) -> None:
        if self.command is None:
            return
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_mounted(self.mountpoint, self.proc)

    def unmount(self) -> None:
        if self.command is None:
            return
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True,
                           check=False)
        if self.proc is not None:
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True,
                           check=False)
        self.proc = None

    def remount(self) -> None:
        self.unmount()
        self.mount()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def reset_peak_rss(self) -> None:
        if self.pid is not None:
            try:
                Path(f"/proc/{self.pid}/clear_refs").write_text("5\n")
            except OSError:
                pass

    def peak_rss_mib(self) -> float | None:
        if self.pid is None:
            return None
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None


def bindfs_peer(name: str, source: Path, mountpoint: Path, args: argparse.Namespace
                ) -> Target | None:
    """A read-only bindfs mount of *source* (a FUSE mount written in C), if
    installed and among ``--peers``."""
    if not (shutil.which("bindfs") and "bindfs" in args.peers):
        return None
    return Target(name, ["bindfs", "-f", "-r", "--no-allow-other", str(source),
                         str(mountpoint)], mountpoint)


def passthroughfs_script(cache: Path) -> Path:
    """pyfuse3's own passthroughfs.py example, from the pyfuse3 source distribution."""
    script = cache / "passthroughfs.py"
    if script.exists():
        return script
    cache.mkdir(parents=True, exist_ok=True)
    import pyfuse3

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([PYTHON, "-m", "pip", "download", "-q", "--no-deps", "--no-binary",
                        ":all:", f"pyfuse3=={pyfuse3.__version__}", "-d", tmp], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        archive = next(Path(tmp).glob("pyfuse3-*.tar.gz"))
        with tarfile.open(archive) as tar:
            member = next(m for m in tar.getmembers()
                          if m.name.endswith("examples/passthroughfs.py"))
            extracted = tar.extractfile(member)
            assert extracted is not None
            script.write_bytes(extracted.read())
    return script


# -- workloads ------------------------------------------------------------------


def read_sequential(path: Path) -> tuple[int, float]:
    fd = os.open(path, os.O_RDONLY)
    try:
        began = time.perf_counter()
        total = 0
        while chunk := os.read(fd, READ_SIZE):
            total += len(chunk)
        return total, time.perf_counter() - began
    finally:
        os.close(fd)


def read_with_latencies(path: Path) -> tuple[int, list[float]]:
    fd = os.open(path, os.O_RDONLY)
    latencies = []
    total = 0
    try:
        while True:
            began = time.perf_counter()
            chunk = os.read(fd, READER_BLOCK)
            latencies.append(time.perf_counter() - began)
            if not chunk:
                return total, latencies
            total += len(chunk)
    finally:
        os.close(fd)


def p95_ms(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return 1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def warm_source(source: Path, *names: str) -> None:
    for name in names:
        top = source / name
        for path in sorted(top.rglob("*")) if top.is_dir() else [top]:
            if path.is_file():
                read_sequential(path)


class Workloads:
    def __init__(self, source: Path, sizes: Sizes) -> None:
        self.source = source
        self.sizes = sizes

    def cold(self, t: Target) -> dict[str, float]:
        drop_caches()
        n, seconds = read_sequential(t.mountpoint / "big.bin")
        return {"MB/s": n / seconds / 1e6}

    def warm(self, t: Target) -> dict[str, float]:
        t.remount()
        drop_caches()
        warm_source(self.source, "big.bin")
        t.reset_peak_rss()
        n, seconds = read_sequential(t.mountpoint / "big.bin")
        return {"MB/s": n / seconds / 1e6}

    def reread(self, t: Target) -> dict[str, float]:
        read_sequential(t.mountpoint / "big.bin")
        n, seconds = read_sequential(t.mountpoint / "big.bin")
        return {"MB/s": n / seconds / 1e6}

    def readers16(self, t: Target) -> dict[str, float]:
        t.remount()
        drop_caches()
        warm_source(self.source, "readers")
        t.reset_peak_rss()
        paths = sorted((t.mountpoint / "readers").iterdir())
        began = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(paths)) as pool:
            results = list(pool.map(read_with_latencies, paths))
        seconds = time.perf_counter() - began
        total = sum(n for n, _ in results)
        latencies = [x for _, lat in results for x in lat]
        return {"MB/s": total / seconds / 1e6, "p95 ms": p95_ms(latencies)}

    def rand4k(self, t: Target) -> dict[str, float]:
        t.remount()
        drop_caches()
        warm_source(self.source, "big.bin")
        t.reset_peak_rss()
        rng = random.Random(4096)
        pages = self.sizes.big_bytes // 4096
        offsets = [rng.randrange(pages) * 4096 for _ in range(self.sizes.random_reads)]
        fd = os.open(t.mountpoint / "big.bin", os.O_RDONLY)
        latencies = []
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            began = time.perf_counter()
            for offset in offsets:
                t0 = time.perf_counter()
                os.pread(fd, 4096, offset)
                latencies.append(time.perf_counter() - t0)
            seconds = time.perf_counter() - began
        finally:
            os.close(fd)
        return {"IOPS": len(offsets) / seconds, "p95 ms": p95_ms(latencies)}

    def _tree_command(self, t: Target, argv: Callable[[Path], list[str]]) -> dict[str, float]:
        t.remount()
        drop_caches()
        subprocess.run(argv(self.source / "tree"), stdout=subprocess.DEVNULL, check=True)
        t.reset_peak_rss()
        began = time.perf_counter()
        subprocess.run(argv(t.mountpoint / "tree"), stdout=subprocess.DEVNULL, check=True)
        return {"s": time.perf_counter() - began}

    def find(self, t: Target) -> dict[str, float]:
        return self._tree_command(t, lambda p: ["find", str(p)])

    def du(self, t: Target) -> dict[str, float]:
        return self._tree_command(t, lambda p: ["du", "-s", str(p)])


WORKLOADS = ("cold", "warm", "reread", "readers16", "rand4k", "find", "du", "pressure", "slow",
             "disk-cache")
MAIN_WORKLOADS = WORKLOADS[:-3]
HIGHER_IS_BETTER = {"MB/s": True, "IOPS": True, "p95 ms": False, "s": False}


# -- the run ------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, object]:
    sizes = QUICK if args.quick else FULL
    runs = args.runs or sizes.runs
    root = Path(args.data_dir)
    root.mkdir(parents=True, exist_ok=True)
    if not any(w in args.workloads for w in (*MAIN_WORKLOADS, "pressure")):
        summary = summarize({}, {}, sizes, runs, args)  # the slow-store scenarios alone
        return slow_scenarios(summary, root, args)
    source = make_data(root, sizes)
    mnt = root / "mnt"
    stfs = [PYTHON, "-m", "stfs", "mount", "-f", "--log-file", str(root / "stfs.log")]
    targets = [Target("direct", None, source)]
    for limit in args.limits:
        targets.append(Target(f"stfs {limit}", [*stfs, "--memory-limit", limit, str(source),
                                                str(mnt / f"stfs-{limit}")],
                              mnt / f"stfs-{limit}"))
    if (bindfs := bindfs_peer("bindfs", source, mnt / "bindfs", args)) is not None:
        targets.append(bindfs)
    if "passthroughfs" in args.peers:
        script = passthroughfs_script(root / "peers")
        targets.append(Target("passthroughfs", [PYTHON, str(script), str(source),
                                                str(mnt / "passthroughfs")],
                              mnt / "passthroughfs"))
    workloads = Workloads(source, sizes)
    selected = [w for w in MAIN_WORKLOADS if w in args.workloads]
    # results[workload][target] = list of per-run dicts
    results: dict[str, dict[str, list[dict[str, float]]]] = {w: {} for w in selected}
    idle_rss: dict[str, float | None] = {}
    try:
        for target in targets:
            target.mount()
            idle_rss[target.name] = target.peak_rss_mib()
        for run_index in range(runs):
            for workload in selected:
                for target in targets:  # interleaved, so drift hits every target alike
                    target.reset_peak_rss()
                    figures = getattr(workloads, workload)(target)
                    rss = target.peak_rss_mib()
                    if rss is not None:
                        figures["peak RSS MiB"] = rss
                    results[workload].setdefault(target.name, []).append(figures)
                    print(f"bench: run {run_index + 1}/{runs} {workload:9s} {target.name:14s} "
                          + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()),
                          file=sys.stderr)
    finally:
        for target in targets:
            target.unmount()
    summary = summarize(results, idle_rss, sizes, runs, args)
    if "pressure" in args.workloads:
        summary["pressure"] = pressure_scenario(source, root, Path(args.out))
    return slow_scenarios(summary, root, args)


def slow_scenarios(summary: dict[str, object], root: Path,
                   args: argparse.Namespace) -> dict[str, object]:
    if "slow" in args.workloads:
        summary["slow"] = slow_scenario(root, args)
    if "disk-cache" in args.workloads:
        from bench_disk_cache import disk_cache_scenario

        summary["disk_cache"] = disk_cache_scenario(root, args)
    return summary


# -- the pressure scenario -------------------------------------------------------

PRESSURE_CGROUP_LIMIT = 320 * MIB
LEVELS = ["none", "light", "moderate", "heavy", "critical"]
HOG_BYTES = 250 * MIB


def child_memory_cgroup(name: str) -> tuple[Path, str] | None:
    """A new child of this process's memory cgroup (v1 or v2), or None."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            group = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / name
            limit = "memory.limit_in_bytes"
            break
        if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            group, limit = Path("/sys/fs/cgroup") / path.lstrip("/") / name, "memory.max"
            break
    else:
        return None
    try:
        group.mkdir(exist_ok=True)
        (group / limit).write_text(f"{PRESSURE_CGROUP_LIMIT}\n")
    except OSError:
        return None
    return group, limit


def in_cgroup(group: Path, argv: list[str]) -> list[str]:
    return ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *argv]


def _stats(mountpoint: Path, command: str = "stats") -> dict[str, object]:
    from stfs import control

    return control.request_stats(str(mountpoint), command=command)


def _readers(target: Target, paths: list[Path], source: Path) -> dict[str, float]:
    drop_caches()  # nothing left in the mount's page cache from the phase before
    warm_source(source, "readers")
    target.reset_peak_rss()
    began = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(paths)) as pool:
        results = list(pool.map(read_with_latencies, paths))
    seconds = time.perf_counter() - began
    return {"MB/s": sum(n for n, _ in results) / seconds / 1e6,
            "p95 ms": p95_ms([x for _, lat in results for x in lat]),
            "peak RSS MiB": target.peak_rss_mib() or 0.0}


def pressure_scenario(source: Path, root: Path, out: Path) -> dict[str, object]:
    """16 readers at --memory-limit 16M inside a memory cgroup, without and with
    a hog in the same cgroup; level, cap and RSS over time from the daemon."""
    made = child_memory_cgroup(f"stfs-bench-{os.getpid()}")
    if made is None:
        print("bench: pressure scenario skipped (no memory cgroup to make a child of)",
              file=sys.stderr)
        return {"skipped": "no memory cgroup"}
    group, _ = made
    mountpoint = root / "mnt" / "stfs-pressure"
    command = in_cgroup(group, [PYTHON, "-m", "stfs", "mount", "-f", "--memory-limit", "16M",
                                "--monitor-interval", "0.25", "--log-file",
                                str(root / "stfs-pressure.log"), str(source), str(mountpoint)])
    target = Target("stfs 16M (cgroup)", command, mountpoint)
    paths: list[Path] = []
    phases: dict[str, dict[str, float]] = {}
    hog: subprocess.Popen[bytes] | None = None
    recovery_s = None
    try:
        target.mount()
        paths = sorted((mountpoint / "readers").iterdir())
        phases["no hog"] = _readers(target, paths, source)
        hog = subprocess.Popen(in_cgroup(group, [PYTHON, "-c",
                               (f"import time; b = b'x' * {HOG_BYTES}; print('ready', flush=True);"
                                " time.sleep(600)")]), stdout=subprocess.PIPE,
                               stdin=subprocess.DEVNULL)
        assert hog.stdout is not None
        hog.stdout.readline()
        time.sleep(1.0)
        phases["with hog"] = _readers(target, paths, source)
        phases["with hog"]["level"] = float(LEVELS.index(str(_stats(mountpoint)["pressure_level"])))
        hog.kill()
        hog.wait(10)
        hog = None
        gone = time.monotonic()
        while time.monotonic() - gone < 30:
            if _stats(mountpoint)["pressure_level"] == "none":
                recovery_s = time.monotonic() - gone
                break
            time.sleep(0.1)
        phases["after hog"] = _readers(target, paths, source)
        history = _stats(mountpoint, "history")["pressure"]
    finally:
        if hog is not None:
            hog.kill()
            hog.wait(10)
        target.unmount()
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    baseline = phases["no hog"]["MB/s"]
    result: dict[str, object] = {
        "phases": phases,
        "level_back_to_none_s": recovery_s,
        "throughput_after_vs_before": phases["after hog"]["MB/s"] / baseline if baseline else None,
        "history": history,
    }
    plot_pressure(history, out / "bench-pressure.png")
    return result


def plot_pressure(history: object, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    assert isinstance(history, list)
    if not history:
        return False
    levels = LEVELS
    t = [h["t"] for h in history]
    fig, ax = plt.subplots(3, 1, figsize=(8, 6), sharex=True)
    ax[0].step(t, [levels.index(h["level"]) for h in history], where="post")
    ax[0].set_yticks(range(5), levels, fontsize=7)
    ax[0].set_title("pressure level")
    ax[1].step(t, [h["cap"] for h in history], where="post", color="#ff7f0e")
    ax[1].set_title("concurrent backing reads allowed")
    ax[2].plot(t, [h["rss_bytes"] / MIB for h in history], color="#2ca02c")
    ax[2].set_title("daemon RSS (MiB)")
    ax[2].set_xlabel("seconds since mount")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


# -- the slow-store scenario ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SlowSizes:
    """What each workload reads at one per-request delay (a read stops at the
    deadline too: figures are bytes or reads over the time taken)."""

    big_bytes: int
    reader_bytes: int
    random_reads: int


SLOW_READERS = 8
SLOW_RANDOM_FILE = 64 * MIB


def slow_sizes(delay_ms: float, quick: bool) -> SlowSizes:
    if delay_ms <= 20:
        return (SlowSizes(64 * MIB, 16 * MIB, 300) if quick
                else SlowSizes(256 * MIB, 32 * MIB, 1000))
    return SlowSizes(16 * MIB, 4 * MIB, 30) if quick else SlowSizes(64 * MIB, 8 * MIB, 100)


def big_name(sizes: SlowSizes) -> str:
    return f"big-{sizes.big_bytes // MIB}M.bin"


def readers_dir(sizes: SlowSizes) -> str:
    return f"readers-{sizes.reader_bytes // MIB}M"


def make_slow_data(root: Path, delays: list[float], quick: bool) -> Path:
    """BACKING of the slow store: for each delay's sizes a big file and a file per
    reader, each read whole (as cp or sha256sum read them: nothing is read past
    what the workload reads), and a file read at random. Kept between runs."""
    backing = root / "slow-source"
    print(f"bench: slow-store data in {backing}", file=sys.stderr)
    for sizes in {slow_sizes(d, quick) for d in delays}:
        big = backing / big_name(sizes)
        if not big.exists() or big.stat().st_size != sizes.big_bytes:
            big.parent.mkdir(parents=True, exist_ok=True)
            write_random(big, sizes.big_bytes)
        readers = backing / readers_dir(sizes)
        readers.mkdir(parents=True, exist_ok=True)
        for i in range(SLOW_READERS):
            path = readers / f"r{i}.bin"
            if not path.exists() or path.stat().st_size != sizes.reader_bytes:
                write_random(path, sizes.reader_bytes)
    rand = backing / "rand.bin"
    if not rand.exists() or rand.stat().st_size != SLOW_RANDOM_FILE:
        write_random(rand, SLOW_RANDOM_FILE)
    return backing


def read_prefix(path: Path, limit: int, deadline: float) -> int:
    """Read up to *limit* bytes of *path* in 1 MiB reads, stopping at *deadline*."""
    fd = os.open(path, os.O_RDONLY)
    total = 0
    try:
        while total < limit and time.monotonic() < deadline:
            chunk = os.read(fd, min(READ_SIZE, limit - total))
            if not chunk:
                break
            total += len(chunk)
        return total
    finally:
        os.close(fd)


class SlowWorkloads:
    """The issue's three workloads, cold: each run starts on a fresh mount with
    the kernel's caches dropped and BACKING (under faultfs) back in the page
    cache, so the store costs its delay per request and nothing else. faultfs
    opens every file direct_io: nothing of it is cached in the kernel."""

    def __init__(self, backing: Path, sizes: SlowSizes, time_limit: float) -> None:
        self.backing = backing
        self.sizes = sizes
        self.time_limit = time_limit
        self.idle_rss_mib = 0.0

    def _cold(self, t: Target, *names: str) -> float:
        t.remount()
        drop_caches()
        warm_source(self.backing, *names)
        t.reset_peak_rss()  # the peak from here on; now, the fresh daemon's idle RSS
        self.idle_rss_mib = t.peak_rss_mib() or 0.0
        return time.monotonic() + self.time_limit

    def one_reader(self, t: Target) -> dict[str, float]:
        name = big_name(self.sizes)
        deadline = self._cold(t, name)
        began = time.perf_counter()
        n = read_prefix(t.mountpoint / name, self.sizes.big_bytes, deadline)
        return {"MB/s": n / (time.perf_counter() - began) / 1e6, "MiB": n / MIB}

    def readers8(self, t: Target) -> dict[str, float]:
        name = readers_dir(self.sizes)
        deadline = self._cold(t, name)
        paths = [t.mountpoint / name / f"r{i}.bin" for i in range(SLOW_READERS)]
        began = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(paths)) as pool:
            done = list(pool.map(lambda p: read_prefix(p, self.sizes.reader_bytes, deadline),
                                 paths))
        return {"MB/s": sum(done) / (time.perf_counter() - began) / 1e6,
                "MiB": sum(done) / MIB}

    def rand4k(self, t: Target) -> dict[str, float]:
        deadline = self._cold(t, "rand.bin")
        rng = random.Random(4096)
        pages = SLOW_RANDOM_FILE // 4096
        fd = os.open(t.mountpoint / "rand.bin", os.O_RDONLY)
        done = 0
        latencies = []
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            began = time.perf_counter()
            while done < self.sizes.random_reads and time.monotonic() < deadline:
                t0 = time.perf_counter()
                os.pread(fd, 4096, rng.randrange(pages) * 4096)
                latencies.append(time.perf_counter() - t0)
                done += 1
            seconds = time.perf_counter() - began
        finally:
            os.close(fd)
        return {"IOPS": done / seconds, "p95 ms": p95_ms(latencies)}


SLOW_WORKLOADS = ("one_reader", "readers8", "rand4k")
SLOW_LABELS = {"one_reader": "one reader, MB/s", "readers8": "8 readers at once, MB/s total",
               "rand4k": "random 4 KiB of an unread file, IOPS"}
RSS_SLACK_MIB = 16


def slow_scenario(root: Path, args: argparse.Namespace) -> dict[str, object]:
    """SOURCE behind faultfs with a per-request delay: the store read directly
    (faultfs's mount), bindfs over it, and stfs over it (default options, and
    at --memory-limit 16M for the peak RSS), at each of ``--delays``."""
    sys.path.insert(0, str(REPO))
    from tests.faultfs import FaultFS

    quick = bool(args.quick)
    runs = args.runs or (1 if quick else 3)
    backing = make_slow_data(root, args.delays, quick)
    mnt = root / "mnt"
    store_mnt = mnt / "slow-store"
    store_mnt.mkdir(parents=True, exist_ok=True)
    sockdir = Path(tempfile.mkdtemp(prefix="stfs-bench-"))
    stfs = [PYTHON, "-m", "stfs", "mount", "-f", "--log-file", str(root / "stfs-slow.log")]
    targets = [Target("store", None, store_mnt)]
    if (bindfs := bindfs_peer("bindfs", store_mnt, mnt / "slow-bindfs", args)) is not None:
        targets.append(bindfs)
    targets.append(Target("stfs", [*stfs, str(store_mnt), str(mnt / "slow-stfs")],
                          mnt / "slow-stfs"))
    targets.append(Target("stfs 16M", [*stfs, "--memory-limit", "16M", str(store_mnt),
                                       str(mnt / "slow-stfs-16M")], mnt / "slow-stfs-16M"))
    time_limit = 20.0 if quick else 60.0
    # results[delay][workload][target] = per-run figures
    results: dict[str, dict[str, dict[str, list[dict[str, float]]]]] = {}
    concurrency: dict[str, object] = {}
    store = None
    try:
        store = FaultFS.start(backing, store_mnt, sockdir / "control.sock",
                              log_path=root / "faultfs-slow.log")
        for target in targets:
            target.mount()
        for run_index in range(runs):
            for delay_ms in args.delays:
                store.set_read_delay(delay_ms / 1000)
                key = f"{delay_ms:g} ms"
                work = SlowWorkloads(backing, slow_sizes(delay_ms, quick), time_limit)
                for workload in SLOW_WORKLOADS:
                    for target in targets:
                        figures = getattr(work, workload)(target)
                        if target.pid is not None:
                            figures["peak RSS MiB"] = target.peak_rss_mib() or 0.0
                            figures["idle RSS MiB"] = work.idle_rss_mib
                        if target.name.startswith("stfs"):
                            concurrency[f"{key} {workload} {target.name}"] = \
                                _concurrency_stats(target.mountpoint)
                        results.setdefault(key, {}).setdefault(workload, {}).setdefault(
                            target.name, []).append(figures)
                        print(f"bench: slow run {run_index + 1}/{runs} {key} {workload:10s} "
                              f"{target.name:9s} " + ", ".join(f"{k} {v:.1f}"
                                                             for k, v in figures.items()),
                              file=sys.stderr)
    finally:
        for target in targets:
            target.unmount()
        if store is not None:
            store.stop()
        shutil.rmtree(sockdir, ignore_errors=True)
    return summarize_slow(results, concurrency, quick, runs, args.delays)


SLOW_TARGETS = {"one_reader": "≥ 0.8 × store, 8 readers", "readers8": "≥ 1.0 × store",
                "rand4k": "≥ 0.95 × store"}
"""Issue 14's targets for stfs."""


def _concurrency_stats(mountpoint: Path) -> object:
    """The daemon's congestion controller after a workload (None if it has none)."""
    try:
        return _stats(mountpoint).get("concurrency")
    except (OSError, ValueError) as exc:
        return f"stats failed: {exc}"


def summarize_slow(results: dict[str, dict[str, dict[str, list[dict[str, float]]]]],
                   concurrency: dict[str, object], quick: bool, runs: int,
                   delays: list[float]) -> dict[str, object]:
    """Medians per delay, workload and target; ratios to the store read directly,
    pair by pair within a run, then the median; one reader also against 8 readers
    of the store (issue 14's reference); the 16M daemon's RSS against its bound."""
    table: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    rss: dict[str, dict[str, float]] = {}
    for key, by_workload in results.items():
        table[key] = {}
        for workload, by_target in by_workload.items():
            metric = "IOPS" if workload == "rand4k" else "MB/s"
            store = by_target.get("store", [])
            store8 = by_workload.get("readers8", {}).get("store", [])
            table[key][workload] = {}
            for target, per_run in by_target.items():
                medians = {k: statistics.median(r[k] for r in per_run) for k in per_run[0]}
                refs = [("×store", store)]
                if workload == "one_reader":
                    refs.append(("×store 8 readers", store8))
                for label, ref in refs:
                    ratios = [r[metric] / d[metric] for r, d in zip(per_run, ref) if d[metric]]
                    if ratios:
                        medians[label] = statistics.median(ratios)
                table[key][workload][target] = medians
                for r in per_run:
                    if "peak RSS MiB" in r:
                        seen = rss.setdefault(target, {"peak MiB": 0.0, "idle MiB": 0.0})
                        if (r["peak RSS MiB"] - r["idle RSS MiB"]
                                >= seen["peak MiB"] - seen["idle MiB"]):
                            seen["peak MiB"] = r["peak RSS MiB"]
                            seen["idle MiB"] = r["idle RSS MiB"]
    if "stfs 16M" in rss:
        bound = rss["stfs 16M"]["idle MiB"] + 16 + RSS_SLACK_MIB
        rss["stfs 16M"]["bound MiB"] = bound
        rss["stfs 16M"]["within bound"] = float(rss["stfs 16M"]["peak MiB"] <= bound)
    return {"delays_ms": delays, "runs": runs,
            "sizes": {f"{d:g} ms": dataclasses.asdict(slow_sizes(d, quick)) for d in delays},
            "results": table, "rss": rss, "concurrency": concurrency}


def slow_markdown(slow: dict[str, object]) -> list[str]:
    results = slow["results"]
    assert isinstance(results, dict)
    targets: list[str] = []
    for by_workload in results.values():
        for by_target in by_workload.values():
            targets += [t for t in by_target if t not in targets]
    lines = [(f"**slow store** (SOURCE behind faultfs with a per-request read delay; "
              f"medians of {slow['runs']} run(s); the store read directly with 1 MiB reads; "
              "ratios are stfs's to the store's in the same run)"), "",
             "| delay | workload | " + " | ".join(targets) + " | stfs ×store | "
             "stfs ×store, 8 readers | target |", "|" + "---|" * (len(targets) + 5)]
    for key, by_workload in results.items():
        for workload, by_target in by_workload.items():
            metric = "IOPS" if workload == "rand4k" else "MB/s"
            cells = [key, SLOW_LABELS[workload]]
            cells += [f"{by_target[t][metric]:.1f}" if t in by_target else "–" for t in targets]
            stfs = by_target.get("stfs", {})
            cells += [f"{stfs['×store']:.2f}" if "×store" in stfs else "–",
                      f"{stfs['×store 8 readers']:.2f}" if "×store 8 readers" in stfs else "–",
                      SLOW_TARGETS[workload]]
            lines.append("| " + " | ".join(cells) + " |")
    rss = slow.get("rss")
    if isinstance(rss, dict) and "stfs 16M" in rss:
        r = rss["stfs 16M"]
        lines += ["", (f"stfs `--memory-limit 16M`: peak RSS {r['peak MiB']:.1f} MiB, idle "
                       f"{r['idle MiB']:.1f} MiB; bound idle + 16M + {RSS_SLACK_MIB} MiB = "
                       f"{r['bound MiB']:.1f} MiB ({'within' if r['within bound'] else 'OVER'})")]
    return lines


def summarize(results: dict[str, dict[str, list[dict[str, float]]]],
              idle_rss: dict[str, float | None], sizes: Sizes, runs: int,
              args: argparse.Namespace) -> dict[str, object]:
    table: dict[str, dict[str, dict[str, float]]] = {}
    for workload, by_target in results.items():
        table[workload] = {}
        direct = by_target.get("direct", [])
        for target, per_run in by_target.items():
            medians = {k: statistics.median(r[k] for r in per_run) for k in per_run[0]}
            # Ratio to direct, pair by pair within the same run, then the median.
            for metric in HIGHER_IS_BETTER:
                if metric in medians and direct and metric in direct[0]:
                    ratios = [r[metric] / d[metric] for r, d in zip(per_run, direct) if d[metric]]
                    medians[f"{metric} ×direct"] = statistics.median(ratios)
            table[workload][target] = medians
    return {
        "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release},
        "sizes": dataclasses.asdict(sizes) | {"runs": runs},
        "idle_rss_mib": idle_rss,
        "results": table,
        "command": " ".join(["scripts/bench", *sys.argv[1:]]),
    }


def markdown(summary: dict[str, object]) -> str:
    results = summary["results"]
    assert isinstance(results, dict)
    lines = [(f"`{summary['command']}` — medians of {summary['sizes']['runs']} run(s); "  # type: ignore[index]
              "ratios are to direct reads in the same run."), ""]
    for workload, by_target in results.items():
        metrics = [m for m in HIGHER_IS_BETTER if m in next(iter(by_target.values()))]
        header = ["target", *metrics, *[f"{m} ×direct" for m in metrics], "peak RSS MiB"]
        lines += [f"**{workload}**", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        for target, figures in by_target.items():
            cells = [target]
            for key in header[1:]:
                value = figures.get(key)
                cells.append("" if value is None
                             else f"{value:.3g}" if "×" in key else f"{value:.1f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"idle RSS MiB: {summary['idle_rss_mib']}")
    slow = summary.get("slow")
    if isinstance(slow, dict) and "results" in slow:
        lines += ["", *slow_markdown(slow)]
    disk_cache = summary.get("disk_cache")
    if isinstance(disk_cache, dict) and "results" in disk_cache:
        from bench_disk_cache import markdown as disk_cache_markdown

        lines += ["", *disk_cache_markdown(disk_cache)]
    scenario = summary.get("pressure")
    if isinstance(scenario, dict) and "phases" in scenario:
        lines += ["", ("**pressure** (16 readers, `--memory-limit 16M`, in a "
                       f"{PRESSURE_CGROUP_LIMIT // MIB} MiB memory cgroup; "
                       f"hog {HOG_BYTES // MIB} MiB "
                       "in the same cgroup)"), "", "| phase | MB/s | p95 ms | peak RSS MiB |",
                  "|---|---|---|---|"]
        for phase, figures in scenario["phases"].items():
            lines.append(f"| {phase} | {figures['MB/s']:.1f} | {figures['p95 ms']:.1f} | "
                         f"{figures['peak RSS MiB']:.1f} |")
        lines += ["", (f"level back to none {scenario['level_back_to_none_s']} s after the hog "
                       f"ended; throughput after / before: "
                       f"{scenario['throughput_after_vs_before']:.2f}")]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, object], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    results = summary["results"]
    assert isinstance(results, dict)
    workloads = list(results)
    if not workloads:
        return False
    fig, axes = plt.subplots(1, len(workloads), figsize=(3.2 * len(workloads), 3.6))
    for ax, workload in zip(axes if len(workloads) > 1 else [axes], workloads):
        by_target = results[workload]
        metric = next(m for m in HIGHER_IS_BETTER if m in next(iter(by_target.values())))
        names = list(by_target)
        ax.bar(range(len(names)), [by_target[n][metric] for n in names],
               color=["#888" if n == "direct" else "#1f77b4" if n.startswith("stfs") else "#ff7f0e"
                      for n in names])
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{workload} ({metric})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller data, one run (< 2 min)")
    parser.add_argument("--runs", type=int, help="runs per workload (default 3, quick 1)")
    parser.add_argument("--limits", nargs="+", default=["50M", "16M"],
                        help="stfs --memory-limit values to measure")
    parser.add_argument("--peers", nargs="*", default=["bindfs", "passthroughfs", "rclone"])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--delays", nargs="+", type=float, default=[5.0, 100.0], metavar="MS",
                        help="the slow-store scenario's per-request delays (ms)")
    parser.add_argument("--data-dir", default="/var/tmp/stfs-bench")
    parser.add_argument("--out", default=str(REPO / "bench-results"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (drops caches, mounts)", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # before the run: the pressure scenario writes here
    summary = run(args)
    (out / "bench.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = markdown(summary)
    (out / "bench.md").write_text(table)
    plotted = plot(summary, out / "bench.png")
    print(table)
    print(f"bench: wrote {out / 'bench.md'}, bench.json" + (", bench.png" if plotted else
                                                              " (no matplotlib: no plot)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
