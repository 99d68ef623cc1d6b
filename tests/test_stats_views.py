"""``stfs stats`` views: table, --prometheus, --watch (through a pseudo-terminal), usage errors."""

from __future__ import annotations

import ast
import fcntl
import json
import os
import pty
import select
import shlex
import signal
import struct
import subprocess
import termios
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stfs import daemon, prometheus, stats_cmd
from stfs.config import human_bytes
from tests.conftest import STFS, Mount, run_stfs

CLEAR = "\x1b[H\x1b[2J"


def families(text: str) -> dict[str, Any]:
    """Parsed exposition by family name, as the real parser names them."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def value_of(fams: dict[str, Any], family: str, sample: str | None = None,
             **labels: str) -> float:
    for s in fams[family].samples:
        if s.name == (sample or family) and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise AssertionError(f"no sample {sample or family} {labels} in {family}")


def read_all(path: Path, block: int = 65536) -> int:
    total = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(block):
            total += len(chunk)
    return total


# -- prometheus.render on a fixed snapshot ----------------------------------------

FIXED: dict[str, Any] = {
    "version": 1, "pid": 42, "source": "/src", "mountpoint": '/mnt/a "b"\\c',
    "bytes_served": 1048576, "reads": 10, "cache_bytes": 524288, "cache_limit_bytes": 39321600,
    "cache_entries": 4, "cache_hits": 7, "cache_misses": 3, "memory_limit_bytes": 52428800,
    "held_bytes": 600000, "peak_held_bytes": 700000, "open_handles": 2, "open_dirs": 1,
    "known_inodes": 9, "active_reads": 1, "backing_reads": 5, "inline_reads": 2,
    "readahead_chunks": 3, "readahead_refused": 0, "pressure_level": "moderate",
    "pressure_score": 2, "pressure_level_changes": 4, "concurrency_cap": 3,
    "memory_use_pct": 62.5, "memory_trend": "rising", "rss_growth_bytes_per_s": 1000,
    "cgroup_memory_limit_bytes": None, "rss_bytes": 40000000, "open_fds": 12, "retries": 1,
    "recoveries": 1, "errors": 0, "uptime_s": 12.5,
    "chunk_latency_ms": {"p50": 1.5, "p95": 20.0, "p99": 40.0},
    "read_latency_seconds": {"buckets": [[0.001, 4], [0.01, 8], [1.0, 9], ["+Inf", 10]],
                             "sum": 3.25, "count": 10},
    "cache_hit_ratio": 0.7, "kernel_request_bytes": 131072,
    "kernel": {"read_ahead_kb": 1024, "max_background": 64, "max_request_bytes": 1048576},
    "handles": [{"fh": 1, "path": "x", "bytes_read": 5, "age_s": 1.0, "chunk_size": 65536,
                 "readahead_chunks": 2, "sequential_reads": 3}],
}


def test_render_of_a_fixed_snapshot_parses_with_the_right_types_and_values() -> None:
    text = prometheus.render(FIXED)
    assert text.endswith("\n")
    fams = families(text)
    mp = FIXED["mountpoint"]
    # every family has HELP and TYPE lines, every sample the mountpoint label
    for line in text.splitlines():
        if not line.startswith("#"):
            assert line.startswith("stfs_")
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    helps = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP")]
    assert names == helps and len(names) == len(set(names))
    for fam in fams.values():
        assert fam.documentation
        for s in fam.samples:
            assert s.labels["mountpoint"] == mp
    counters = {"served_bytes": 1048576, "reads": 10, "cache_hits": 7, "cache_misses": 3,
                "retries": 1, "recoveries": 1, "errors": 0, "backing_reads": 5,
                "readahead_chunks": 3, "pressure_level_changes": 4}
    for name, expected in counters.items():
        fam = fams[f"stfs_{name}"]
        assert fam.type == "counter"
        assert value_of(fams, f"stfs_{name}", f"stfs_{name}_total") == expected
        assert f"# TYPE stfs_{name}_total counter" in text
    gauges: dict[str, float] = {"cache_bytes": 524288, "cache_limit_bytes": 39321600,
              "memory_limit_bytes": 52428800, "held_bytes": 600000, "rss_bytes": 40000000,
              "open_handles": 2, "active_reads": 1, "concurrency_cap": 3, "uptime_seconds": 12.5,
              "kernel_request_bytes": 131072, "memory_use_ratio": 0.625, "pressure_level": 2,
              "cache_hit_ratio": 0.7, "kernel_read_ahead_bytes": 1024 * 1024}
    for name, want in gauges.items():
        assert fams[f"stfs_{name}"].type == "gauge", name
        assert value_of(fams, f"stfs_{name}") == pytest.approx(want), name
    assert "stfs_cgroup_memory_limit_bytes" not in fams  # None: left out, not invented
    assert value_of(fams, "stfs_pressure_level_info", level="moderate") == 1
    assert value_of(fams, "stfs_chunk_latency_quantile_seconds",
                    quantile="0.95") == pytest.approx(0.02)
    hist = fams["stfs_read_duration_seconds"]
    assert hist.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in hist.samples if s.name.endswith("_bucket")}
    assert buckets == {"0.001": 4, "0.01": 8, "1.0": 9, "+Inf": 10}
    assert value_of(fams, "stfs_read_duration_seconds", "stfs_read_duration_seconds_sum") == 3.25
    assert value_of(fams, "stfs_read_duration_seconds",
                    "stfs_read_duration_seconds_count") == 10


def test_render_leaves_out_what_the_daemon_did_not_send() -> None:
    fams = families(prometheus.render({"mountpoint": "/m", "reads": 3}))
    assert set(fams) == {"stfs_reads"}


# -- through a real mount ------------------------------------------------------------


def test_table_shows_the_key_figures(mounted: Mount) -> None:
    with open(mounted.mountpoint / "data.bin", "rb") as f:
        f.read(1024 * 1024)
        result = run_stfs("stats", str(mounted.mountpoint))
        assert result.returncode == 0, result.stderr
    out = result.stdout
    assert result.stderr == ""
    for title in ("Traffic", "Cache", "Memory / pressure", "Backing reads", "Handles"):
        assert f"\n{title}\n" in out
    for label in ("bytes served", "hit ratio", "held / limit", "pressure level",
                  "concurrency cap", "RSS", "retries / recoveries", "open files / dirs"):
        assert label in out
    assert "50.0 MiB" in out  # the default memory limit, human-readable
    # SOURCE's store as the congestion controller sees it
    store = out.split(f"\nStore ({mounted.source})\n", 1)[1].split("\n\n", 1)[0]
    for label in ("baseline latency", "concurrency", "why", "in flight", "throughput",
                  "errors / backoffs"):
        assert f"  {label} " in store, store
    assert "ceiling 10" in store and " reads, " in store
    assert "MiB" in out.split("bytes served", 1)[1].splitlines()[0]
    # the per-handle table
    header = next(line for line in out.splitlines() if line.strip().startswith("PATH"))
    assert header.split() == ["PATH", "READ", "CHUNK", "READ-AHEAD", "AGE"]
    assert any(line.strip().startswith("data.bin ") for line in out.splitlines())


def test_prometheus_matches_json_and_counters_grow(mounted: Mount) -> None:
    mp = str(mounted.mountpoint)
    assert read_all(mounted.mountpoint / "hello.txt") == 13
    first = run_stfs("stats", "--prometheus", mp)
    assert first.returncode == 0, first.stderr
    stats: dict[str, Any] = mounted.stats()
    fams = families(first.stdout)
    assert fams["stfs_served_bytes"].type == "counter"
    assert fams["stfs_held_bytes"].type == "gauge"
    assert fams["stfs_read_duration_seconds"].type == "histogram"
    served = value_of(fams, "stfs_served_bytes", "stfs_served_bytes_total", mountpoint=mp)
    assert served == stats["bytes_served"] > 0
    assert value_of(fams, "stfs_reads", "stfs_reads_total") == stats["reads"]
    assert value_of(fams, "stfs_memory_limit_bytes") == stats["memory_limit_bytes"]
    assert value_of(fams, "stfs_cache_limit_bytes") == stats["cache_limit_bytes"]
    assert value_of(fams, "stfs_pressure_level_info", level=str(stats["pressure_level"])) == 1
    hist = stats["read_latency_seconds"]
    assert isinstance(hist, dict)
    assert value_of(fams, "stfs_read_duration_seconds",
                    "stfs_read_duration_seconds_count") == hist["count"]

    assert read_all(mounted.mountpoint / "data.bin") == 3 * 1024 * 1024 + 17
    second = families(run_stfs("stats", "--prometheus", mp).stdout)
    assert value_of(second, "stfs_served_bytes", "stfs_served_bytes_total") >= served + 3 * 2**20
    assert value_of(second, "stfs_reads", "stfs_reads_total") > stats["reads"]
    assert value_of(second, "stfs_read_duration_seconds", "stfs_read_duration_seconds_count") \
        > hist["count"]


def _stats(args: tuple[str, ...], sigint_ignored: bool) -> list[str]:
    """``stfs stats ARGS``, started with SIGINT ignored if asked, as a job that a
    shell without job control starts in the background inherits it."""
    command = [*STFS, "stats", *args]
    return ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *command] if sigint_ignored else command


class Pty:
    """``stfs stats --watch`` on a pseudo-terminal."""

    def __init__(self, *args: str, sigint_ignored: bool = False) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.master = master
        self.proc = subprocess.Popen(_stats(args, sigint_ignored), stdin=slave, stdout=slave,
                                     stderr=subprocess.PIPE, close_fds=True)
        os.close(slave)
        self.output = b""

    def read_until(self, predicate: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.text()):
                return True
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                self.output += data
        return bool(predicate(self.text()))

    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def finish(self, timeout: float = 10) -> tuple[int, str]:
        rc = self.proc.wait(timeout)
        self.read_until(lambda _: False, 0.3)
        err = self.proc.stderr.read().decode() if self.proc.stderr else ""
        return rc, err

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stderr:
            self.proc.stderr.close()
        os.close(self.master)


SIGINT_AT_START = pytest.mark.parametrize("sigint_ignored", [False, True],
                                          ids=["sigint-inherited", "sigint-ignored"])
"""Ctrl-C ends a watch even when SIGINT came ignored (the suite run by nohup or
from a script in the background once failed every Ctrl-C test here)."""


@SIGINT_AT_START
def test_watch_redraws_in_place_and_exits_cleanly_on_ctrl_c(mounted: Mount,
                                                            sigint_ignored: bool) -> None:
    stop = threading.Event()
    reader_opened = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            with open(mounted.mountpoint / "data.bin", "rb", buffering=0) as f:
                reader_opened.set()
                while not stop.is_set() and f.read(64 * 1024):
                    time.sleep(0.02)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    assert reader_opened.wait(10)
    term = Pty("--watch", "0.4", str(mounted.mountpoint), sigint_ignored=sigint_ignored)
    try:
        assert term.read_until(lambda t: t.count(CLEAR) >= 3, 15), term.text()
        term.proc.send_signal(signal.SIGINT)
        rc, err = term.finish()
    finally:
        stop.set()
        thread.join(10)
        term.close()
    out = term.text()
    assert rc == 0, (err, out)
    assert "Traceback" not in out + err
    assert err == ""
    frames = out.split(CLEAR)
    last = frames[-2] if len(frames) > 2 else frames[-1]
    for word in ("throughput", "reads/s", "hit ratio", "pressure", "held", "RSS",
                 "busiest handles", "data.bin"):
        assert word in last, last
    assert "MiB" in last and "/s" in last


def test_watch_reports_a_mount_that_goes_away(mounter: Any, source: Path) -> None:
    mount = mounter(source)
    term = Pty("--watch", "0.3", str(mount.mountpoint))
    try:
        assert term.read_until(lambda t: CLEAR in t and "throughput" in t, 15), term.text()
        mount.unmount()
        rc, err = term.finish(15)
    finally:
        term.close()
    assert rc == 1, (err, term.text())
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("stfs: "), err
    assert str(mount.mountpoint) in lines[0]
    assert "Traceback" not in term.text()


# -- --json --watch: JSON Lines ------------------------------------------------------

SPEC_KEYS = {"bytes_served", "reads", "cache_bytes", "cache_limit_bytes", "cache_hits",
             "cache_misses", "memory_limit_bytes", "held_bytes", "open_handles", "active_reads",
             "pressure_level", "rss_bytes", "retries", "recoveries", "errors", "uptime_s"}


class Lines:
    """``stfs stats --json --watch ...`` with stdout on a pipe, read line by line."""

    def __init__(self, *args: str, sigint_ignored: bool = False) -> None:
        self.proc = subprocess.Popen(_stats(("--json", "--watch", *args), sigint_ignored),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.buffer = b""

    def line(self, timeout: float) -> bytes | None:
        """The next whole line, or None if none came within *timeout* s (or at EOF)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

    def finish(self, timeout: float = 15) -> tuple[int, bytes, str]:
        """Exit status, what stdout still had, stderr."""
        assert self.proc.stdout is not None and self.proc.stderr is not None
        rc = self.proc.wait(timeout)
        rest = self.buffer + self.proc.stdout.read()
        return rc, rest, self.proc.stderr.read().decode()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()


@SIGINT_AT_START
def test_json_watch_prints_one_object_per_line_until_ctrl_c(mounted: Mount,
                                                            sigint_ignored: bool) -> None:
    with open(mounted.mountpoint / "data.bin", "rb") as held:
        held.read(4096)
        stream = Lines("0.3", str(mounted.mountpoint), sigint_ignored=sigint_ignored)
        try:
            objects = []
            for _ in range(3):
                line = stream.line(15)
                assert line is not None, stream.proc.poll()
                objects.append(json.loads(line))
            stream.proc.send_signal(signal.SIGINT)
            rc, rest, err = stream.finish()
        finally:
            stream.close()
    assert rc == 0, err
    assert err == ""
    assert rest == b"" or (rest.endswith(b"\n") and all(
        isinstance(json.loads(extra), dict) for extra in rest.splitlines()))
    for obj in objects:
        assert SPEC_KEYS <= set(obj), SPEC_KEYS - set(obj)
        assert obj["mountpoint"] == str(mounted.mountpoint)
        assert obj["open_handles"] == 1
    uptimes = [obj["uptime_s"] for obj in objects]
    assert uptimes == sorted(uptimes) and uptimes[0] < uptimes[-1]


def test_json_watch_flushes_each_line_as_it_is_written(mounted: Mount) -> None:
    """With a long interval the first line must arrive alone: a buffered stdout
    would hold it until several objects had filled the buffer, or until exit."""
    stream = Lines("60", str(mounted.mountpoint))
    try:
        line = stream.line(20)
        assert line is not None, "the first line did not come before the next interval"
        assert SPEC_KEYS <= set(json.loads(line))
        assert stream.proc.poll() is None
        stream.proc.send_signal(signal.SIGINT)
        rc, rest, err = stream.finish()
    finally:
        stream.close()
    assert (rc, rest, err) == (0, b"", "")


def test_json_watch_reports_a_mount_that_goes_away(mounter: Any, source: Path) -> None:
    mount = mounter(source)
    stream = Lines("0.2", str(mount.mountpoint))
    try:
        first = stream.line(15)
        assert first is not None and SPEC_KEYS <= set(json.loads(first))
        mount.unmount()
        rc, rest, err = stream.finish()
    finally:
        stream.close()
    assert rc == 1, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("stfs: "), err
    assert str(mount.mountpoint) in lines[0] and "went away" in lines[0], lines[0]
    assert all(isinstance(json.loads(line), dict) for line in rest.splitlines())
    assert rest == b"" or rest.endswith(b"\n")


def test_json_watch_into_a_reader_that_leaves_stops_quietly(mounted: Mount) -> None:
    command = shlex.join([*STFS, "stats", "--json", "--watch", "0.1", str(mounted.mountpoint)])
    result = subprocess.run(["sh", "-c", f'{{ {command}; echo "stfs exit $?" >&2; }} | head -n 2'],
                            capture_output=True, text=True, timeout=60, check=False)
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    assert all(SPEC_KEYS <= set(json.loads(line)) for line in lines)
    assert result.stderr == "stfs exit 0\n"  # and nothing else: no error, no traceback


# -- usage errors and not-a-mount ----------------------------------------------------


@pytest.mark.parametrize("args", [
    ["--watch", "0"], ["--watch", "-1"], ["--watch", "abc"], ["--watch", "nan"],
    ["--watch", "inf"], ["--json", "--watch", "0"], ["--json", "--watch", "x"],
    ["--watch", "1", "--prometheus"], ["--json", "--prometheus"], ["--watch"],
    ["--json", "--prometheus", "--watch", "1"],
])
def test_bad_stats_options_are_usage_errors(args: list[str], tmp_path: Path) -> None:
    result = run_stfs("stats", *args, str(tmp_path))
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("stfs: "), result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("args", [[], ["--prometheus"], ["--json"], ["--watch", "0.5"],
                                  ["--json", "--watch", "0.5"]])
def test_every_view_refuses_a_directory_that_is_not_a_mount(args: list[str],
                                                           tmp_path: Path) -> None:
    result = run_stfs("stats", *args, str(tmp_path), timeout=15)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"stfs: {tmp_path}: not a live stfs mount"]
    assert result.stdout == ""


def test_json_still_prints_one_object(mounted: Mount) -> None:
    result = run_stfs("stats", "--json", str(mounted.mountpoint))
    assert result.returncode == 0
    assert len(result.stdout.strip().splitlines()) == 1
    stats = json.loads(result.stdout)
    assert {"bytes_served", "read_latency_seconds", "handles", "cache_hit_ratio"} <= set(stats)


# -- one byte formatter; stats needs no FUSE --------------------------------------------


@pytest.mark.parametrize("value,shown", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (50 * 1024 * 1024, "50.0 MiB"), (5 * 1024 ** 3, "5.0 GiB"), (3 * 1024 ** 4, "3.0 TiB"),
    (2048.0, "2.0 KiB"), (None, "-"), ("12", "-"), (True, "-"),
])
def test_human_bytes_is_the_one_formatter(value: object, shown: str) -> None:
    assert human_bytes(value) == shown
    assert vars(stats_cmd)["human_bytes"] is human_bytes  # the views use the one formatter
    assert vars(daemon)["human_bytes"] is human_bytes  # and so does systemd's STATUS= line


def test_stats_command_needs_neither_the_mount_module_nor_fuse() -> None:
    probe = ("import sys, stfs.stats_cmd; "
             "print(sorted(m for m in ('stfs.mount', 'pyfuse3') if m in sys.modules))")
    result = subprocess.run([STFS[0], "-c", probe], capture_output=True, text=True, timeout=60,
                            check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_stats_command_imports_no_private_name_of_another_module() -> None:
    tree = ast.parse(Path(stats_cmd.__file__).read_text())
    private = [f"{node.module}.{alias.name}" for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) for alias in node.names
               if alias.name.startswith("_") and alias.name != "__future__"]
    assert private == []
