"""The ``disk-cache`` workload of ``scripts/bench``: a slow store read twice,
across a remount, through stfs's persistent chunk cache (issue 23).

SOURCE (8 files of 64 MiB; ``--quick``: 8 of 16 MiB) sits behind faultfs with a
per-request delay (``--delays``). One reader reads the files in order, whole,
as ``cp -r`` or ``tar`` would, in 1 MiB reads. Per delay and run:

* ``store``: the faultfs mount read directly (time-limited: a figure, not a copy);
* ``local``: BACKING itself read directly, caches dropped (the local disk);
* ``bindfs local`` (where ``bindfs`` is installed): a bindfs mount of BACKING
  read the same way, caches dropped: what a FUSE mount written in C gets from
  the local disk, beside which stfs's pass 2 (a FUSE mount of the disk cache)
  can be judged;
* ``stfs 16M``: stfs at ``--memory-limit 16M`` without a disk cache (pass 1);
* ``stfs 16M disk``: the same with ``--cache-dir`` (cleared first): pass 1,
  unmount, remount, caches dropped, pass 2, with faultfs's count of data reads
  in pass 2, the daemon's peak RSS against idle + 16M + 16 MiB, and the
  cache's use on disk (``du``) against ``--cache-size``;
* ``rclone full`` (where ``rclone`` is installed): ``rclone mount`` of the
  store's mount with ``--vfs-cache-mode full`` (cache cleared first), the same
  two passes.

Ratios are taken pair by pair within a run, then the median over runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import (
    MIB,
    PYTHON,
    REPO,
    RSS_SLACK_MIB,
    Target,
    bindfs_peer,
    drop_caches,
    read_prefix,
    warm_source,
    write_random,
)

FILES = 8
LIMIT = "16M"
CACHE_SIZE = "1G"
TARGETS = {"pass 1 ×stfs": "≥ 0.9", "pass 2 ×local": "≥ 0.8", "pass 2 ×store": "≥ 20 at 100 ms",
           "store data reads in pass 2": "0"}


@dataclasses.dataclass
class Pass:
    seconds: float
    n_bytes: int

    @property
    def mbps(self) -> float:
        return self.n_bytes / self.seconds / 1e6 if self.seconds else 0.0


def make_source(root: Path, file_bytes: int) -> Path:
    backing = root / "disk-cache-source"
    backing.mkdir(parents=True, exist_ok=True)
    for i in range(FILES):
        path = backing / f"f{i}.bin"
        if not path.exists() or path.stat().st_size != file_bytes:
            write_random(path, file_bytes)
    return backing


def read_files(top: Path, file_bytes: int, deadline: float) -> Pass:
    began = time.perf_counter()
    total = 0
    for i in range(FILES):
        total += read_prefix(top / f"f{i}.bin", file_bytes, deadline)
        if time.monotonic() >= deadline:
            break
    return Pass(time.perf_counter() - began, total)


def du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True,
                         check=False).stdout.split()
    return int(out[0]) if out else 0


def rclone_target(store_mnt: Path, mnt: Path, cache: Path) -> Target:
    return Target("rclone full", [
        # --vfs-fast-fingerprint: without it rclone hashes every file it opens from
        # a local-path remote (reading all of it from the store) to check its cache.
        "rclone", "mount", str(store_mnt), str(mnt), "--read-only", "--vfs-cache-mode", "full",
        "--vfs-fast-fingerprint",
        "--cache-dir", str(cache), "--vfs-cache-max-size", CACHE_SIZE, "--config", "/dev/null",
        "--log-level", "ERROR"], mnt)


def two_passes(target: Target, store: object, backing: Path, file_bytes: int,
               clear: list[str] | None, wipe: Path | None, time_limit: float
               ) -> dict[str, float]:
    """Pass 1 from cold (cache cleared), unmount, remount, pass 2 from cold."""
    if wipe is not None:
        shutil.rmtree(wipe, ignore_errors=True)
        wipe.mkdir(parents=True)
    if clear is not None:
        subprocess.run(clear, capture_output=True, check=False)
    target.mount()
    drop_caches()
    warm_source(backing)
    target.reset_peak_rss()
    idle = target.peak_rss_mib() or 0.0
    first = read_files(target.mountpoint, file_bytes, time.monotonic() + time_limit)
    peak = target.peak_rss_mib() or 0.0
    target.unmount()
    target.mount()
    drop_caches()
    store.reset_stats()  # type: ignore[attr-defined]
    target.reset_peak_rss()
    second = read_files(target.mountpoint, file_bytes, time.monotonic() + time_limit)
    reads = store.stats()["reads"]  # type: ignore[attr-defined]
    peak = max(peak, target.peak_rss_mib() or 0.0)
    target.unmount()
    return {"pass 1 MB/s": first.mbps, "pass 1 MiB": first.n_bytes / MIB,
            "pass 2 MB/s": second.mbps, "pass 2 MiB": second.n_bytes / MIB,
            "store data reads in pass 2": float(reads), "idle RSS MiB": idle,
            "peak RSS MiB": peak}


def disk_cache_scenario(root: Path, args: argparse.Namespace) -> dict[str, object]:
    sys.path.insert(0, str(REPO))
    from tests.faultfs import FaultFS

    quick = bool(args.quick)
    runs = args.runs or (1 if quick else 3)
    file_bytes = (16 if quick else 64) * MIB
    time_limit = 60.0 if quick else 300.0
    peer_limit = 20.0 if quick else 60.0
    """rclone reads its local backend 32 KiB at a time: at 100 ms a request it
    would take hours, so its passes stop here (its figure is over what it read)."""
    backing = make_source(root, file_bytes)
    mnt = root / "mnt"
    store_mnt = mnt / "dc-store"
    store_mnt.mkdir(parents=True, exist_ok=True)
    cache = root / "dc-cache"
    rclone_cache = root / "dc-rclone-cache"
    cache.mkdir(parents=True, exist_ok=True)
    sockdir = Path(tempfile.mkdtemp(prefix="stfs-bench-"))
    stfs = [PYTHON, "-m", "stfs", "mount", "-f", "--memory-limit", LIMIT,
            "--log-file", str(root / "stfs-disk-cache.log")]
    plain = Target("stfs 16M", [*stfs, str(store_mnt), str(mnt / "dc-stfs")], mnt / "dc-stfs")
    disk = Target("stfs 16M disk", [*stfs, "--cache-dir", str(cache), "--cache-size",
                                    CACHE_SIZE, str(store_mnt), str(mnt / "dc-stfs-disk")],
                  mnt / "dc-stfs-disk")
    rclone = (rclone_target(store_mnt, mnt / "dc-rclone", rclone_cache)
              if shutil.which("rclone") and "rclone" in args.peers else None)
    bindfs = bindfs_peer("bindfs local", backing, mnt / "dc-bindfs", args)
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    du: list[int] = []
    store = None
    try:
        store = FaultFS.start(backing, store_mnt, sockdir / "control.sock",
                              log_path=root / "faultfs-disk-cache.log")
        for run_index in range(runs):
            for delay_ms in args.delays:
                store.set_read_delay(delay_ms / 1000)
                key = f"{delay_ms:g} ms"
                row: dict[str, dict[str, float]] = {}
                drop_caches()
                warm_source(backing)
                row["store"] = {"MB/s": read_files(
                    store_mnt, file_bytes, time.monotonic() + min(60.0, time_limit)).mbps}
                drop_caches()
                row["local"] = {"MB/s": read_files(backing, file_bytes,
                                                   time.monotonic() + 600).mbps}
                if bindfs is not None:
                    bindfs.mount()
                    drop_caches()
                    row["bindfs local"] = {"MB/s": read_files(bindfs.mountpoint, file_bytes,
                                                              time.monotonic() + 600).mbps}
                    bindfs.unmount()
                plain.mount()
                drop_caches()
                warm_source(backing)
                row["stfs 16M"] = {"MB/s": read_files(plain.mountpoint, file_bytes,
                                                      time.monotonic() + time_limit).mbps}
                plain.unmount()
                row["stfs 16M disk"] = two_passes(
                    disk, store, backing, file_bytes,
                    [PYTHON, "-m", "stfs", "cache", "--clear", str(cache)], None, time_limit)
                du.append(du_bytes(cache))
                if rclone is not None:
                    row["rclone full"] = two_passes(rclone, store, backing, file_bytes, None,
                                                    rclone_cache, peer_limit)
                for name, figures in row.items():
                    results.setdefault(key, {}).setdefault(name, []).append(figures)
                    print(f"bench: disk-cache run {run_index + 1}/{runs} {key} {name:14s} "
                          + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()),
                          file=sys.stderr)
    finally:
        for target in (plain, disk, rclone, bindfs):
            if target is not None:
                with contextlib.suppress(Exception):
                    target.unmount()
        if store is not None:
            store.stop()
        shutil.rmtree(sockdir, ignore_errors=True)
    return summarize(results, du, runs, file_bytes)


def _median(per_run: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in per_run)


def summarize(results: dict[str, dict[str, list[dict[str, float]]]], du: list[int],
              runs: int, file_bytes: int) -> dict[str, object]:
    table: dict[str, dict[str, object]] = {}
    for key, by_target in results.items():
        disk = by_target["stfs 16M disk"]

        def ratio(num: list[dict[str, float]], num_key: str, den: str, den_key: str = "MB/s",
                  by_target: dict[str, list[dict[str, float]]] = by_target) -> float:
            pairs = [n[num_key] / d[den_key] for n, d in zip(num, by_target[den]) if d[den_key]]
            return statistics.median(pairs) if pairs else 0.0

        row: dict[str, object] = {
            "store MB/s": _median(by_target["store"], "MB/s"),
            "local MB/s": _median(by_target["local"], "MB/s"),
            "stfs 16M MB/s": _median(by_target["stfs 16M"], "MB/s"),
            "stfs disk pass 1 MB/s": _median(disk, "pass 1 MB/s"),
            "stfs disk pass 2 MB/s": _median(disk, "pass 2 MB/s"),
            "pass 1 ×stfs": ratio(disk, "pass 1 MB/s", "stfs 16M"),
            "pass 2 ×local": ratio(disk, "pass 2 MB/s", "local"),
            "pass 2 ×store": ratio(disk, "pass 2 MB/s", "store"),
            "store data reads in pass 2": max(r["store data reads in pass 2"] for r in disk),
            "peak RSS MiB": max(r["peak RSS MiB"] for r in disk),
            "RSS bound MiB": min(r["idle RSS MiB"] for r in disk) + 16 + RSS_SLACK_MIB,
        }
        if "bindfs local" in by_target:
            row |= {"bindfs local MB/s": _median(by_target["bindfs local"], "MB/s"),
                    "pass 2 ×bindfs local": ratio(disk, "pass 2 MB/s", "bindfs local"),
                    "bindfs local ×local": ratio(by_target["bindfs local"], "MB/s", "local")}
        if "rclone full" in by_target:
            rc = by_target["rclone full"]
            row |= {"rclone pass 1 MB/s": _median(rc, "pass 1 MB/s"),
                    "rclone pass 2 MB/s": _median(rc, "pass 2 MB/s"),
                    "rclone store reads in pass 2": max(r["store data reads in pass 2"]
                                                        for r in rc),
                    "rclone peak RSS MiB": max(r["peak RSS MiB"] for r in rc)}
        table[key] = row
    return {"runs": runs, "files": FILES, "file_bytes": file_bytes, "memory_limit": LIMIT,
            "cache_size": CACHE_SIZE, "cache_du_bytes_max": max(du) if du else 0,
            "results": table, "raw": results}


def markdown(summary: dict[str, object]) -> list[str]:
    results = summary["results"]
    assert isinstance(results, dict)
    lines = [(f"**disk cache** ({summary['files']} files of "
              f"{int(summary['file_bytes']) // MIB} MiB behind faultfs, read in order "  # type: ignore[call-overload]
              f"by one reader; `--memory-limit {LIMIT} --cache-size {CACHE_SIZE}`; medians of "
              f"{summary['runs']} run(s); cache on disk at most "
              f"{int(summary['cache_du_bytes_max']) / MIB:.1f} MiB)"), ""]  # type: ignore[call-overload]
    keys = [k for k in next(iter(results.values()))] if results else []
    lines += ["| figure | " + " | ".join(results) + " | target |",
              "|" + "---|" * (len(results) + 2)]
    for k in keys:
        cells = [k]
        for row in results.values():
            value = row.get(k)
            cells.append("–" if value is None else f"{value:.2f}" if "×" in k else f"{value:.1f}")
        cells.append(TARGETS.get(k, ""))
        lines.append("| " + " | ".join(cells) + " |")
    return lines
