"""Prometheus text exposition (format 0.0.4) of a daemon's stats snapshot.

``render(stats)`` is a pure function of the dict ``stfs stats --json`` prints:
every metric gets ``# HELP`` and ``# TYPE`` lines, the prefix ``stfs_``,
counters end in ``_total``, units are in the names (bytes, seconds, ratio),
and every sample carries a ``mountpoint`` label. Keys missing from the
snapshot (an older or newer daemon) are left out rather than invented.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

PREFIX = "stfs_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

PRESSURE_LEVELS = ("none", "light", "moderate", "heavy", "critical")

Scale = Callable[[float], float]


def _same(value: float) -> float:
    return value


# JSON key -> (metric name without prefix, help text)
COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("bytes_served", "served_bytes_total", "Bytes of file data returned to readers."),
    ("reads", "reads_total", "Read requests answered."),
    ("cache_hits", "cache_hits_total", "Chunk lookups answered from the cache."),
    ("cache_misses", "cache_misses_total", "Chunk lookups that needed a backing read."),
    ("retries", "retries_total", "Backing reads retried after a transient error."),
    ("recoveries", "recoveries_total", "Backing reads that succeeded after retries."),
    ("interrupted_streams", "interrupted_streams_total",
     "Streams (open handles) whose reads met a transient backing error."),
    ("recovered_streams", "recovered_streams_total",
     "Interrupted streams that went on without an error."),
    ("failed_streams", "failed_streams_total",
     "Interrupted streams that returned an error to the reader."),
    ("changed_files", "changed_files_total",
     "Streams failed with EIO because the file changed while being read."),
    ("checksums_computed", "checksums_computed_total",
     "Whole-file xxh3-128 checksums computed in a read pass."),
    ("corruptions_detected", "corruptions_detected_total",
     "Whole-file reads whose checksum differed from the one recorded for the same identity."),
    ("errors", "errors_total", "Reads that failed with an error returned to the reader."),
    ("backing_reads", "backing_reads_total", "Reads issued to the backing file system."),
    ("inline_reads", "inline_reads_total", "Backing reads of bytes already in the page cache, copied on the event loop (RWF_NOWAIT)."),
    ("readahead_chunks", "readahead_chunks_total", "Chunks fetched ahead of the reader."),
    ("readahead_refused", "readahead_refused_total",
     "Read-ahead chunks refused by the memory budget."),
    ("read_around_pushes", "read_around_pushes_total",
     "Windows around random reads put into the kernel page cache."),
    ("read_around_bytes", "read_around_bytes_total",
     "Bytes put into the kernel page cache around random reads."),
    ("pressure_level_changes", "pressure_level_changes_total",
     "Changes of the memory pressure level."),
)

# JSON key -> (metric name without prefix, help text, scale)
GAUGES: tuple[tuple[str, str, str, Scale], ...] = (
    ("cache_bytes", "cache_bytes", "File data held in the page cache.", _same),
    ("cache_limit_bytes", "cache_limit_bytes", "Capacity of the page cache now.", _same),
    ("cache_entries", "cache_entries", "Chunks held in the page cache.", _same),
    ("memory_limit_bytes", "memory_limit_bytes",
     "Hard ceiling for all file data held (--memory-limit).", _same),
    ("held_bytes", "held_bytes", "All file data held now: cache, in-flight, read-ahead and reply buffers.",
     _same),
    ("peak_held_bytes", "peak_held_bytes", "Highest held_bytes since the mount.", _same),
    ("open_handles", "open_handles", "Open file handles.", _same),
    ("open_dirs", "open_dirs", "Open directory handles.", _same),
    ("known_inodes", "known_inodes", "Inodes the kernel currently knows about.", _same),
    ("active_reads", "active_reads", "Read requests in progress.", _same),
    ("pressure_score", "pressure_score", "Memory pressure score behind the level.", _same),
    ("concurrency_cap", "concurrency_cap", "Concurrent backing reads allowed now.", _same),
    ("memory_use_pct", "memory_use_ratio", "Worst of the engine, RSS, cgroup and system memory views, as a ratio (may exceed 1).",
     lambda v: v / 100.0),
    ("rss_growth_bytes_per_s", "rss_growth_bytes_per_second",
     "Recent growth rate of the daemon's resident set.", _same),
    ("cgroup_memory_limit_bytes", "cgroup_memory_limit_bytes",
     "Memory limit of the daemon's cgroup, when there is one.", _same),
    ("rss_bytes", "rss_bytes", "Resident set size of the daemon.", _same),
    ("open_fds", "open_fds", "File descriptors open in the daemon.", _same),
    ("uptime_s", "uptime_seconds", "Seconds since the daemon started setting up the mount.", _same),
    ("cache_hit_ratio", "cache_hit_ratio", "Cache hits over all chunk lookups (0-1).", _same),
    ("kernel_request_bytes", "kernel_request_bytes",
     "Read request size the kernel sends most often.", _same),
)

KERNEL_GAUGES: tuple[tuple[str, str, str, Scale], ...] = (
    ("read_ahead_kb", "kernel_read_ahead_bytes", "Kernel read-ahead window of the mount.",
     lambda v: v * 1024),
    ("max_background", "kernel_max_background", "Kernel's limit of background FUSE requests.",
     _same),
    ("max_request_bytes", "kernel_max_request_bytes", "Largest read request the kernel may send.",
     _same),
)

RESOURCE_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("sweeps", "resource_sweeps_total", "Periodic sweeps for orphaned and idle resources."),
    ("swept", "resources_swept_total", "Resources freed by sweeps."),
    ("emergency_cleanups", "emergency_cleanups_total",
     "Emergency cleanups under critical memory pressure."),
)

BACKING_FD_METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("open", "backing_fds", "gauge", "Backing file descriptors open now."),
    ("limit", "backing_fds_limit", "gauge", "Backing descriptors kept open at most."),
    ("reopens", "backing_fd_reopens_total", "counter",
     "Backing descriptors reopened (after ESTALE/EBADF, or closed while idle)."),
)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def format_value(value: float) -> str:
    """A sample value as the exposition format writes it."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{name}="{escape_label(value)}"' for name, value in pairs)
    return "{" + inner + "}" if inner else ""


class _Writer:
    def __init__(self, mountpoint: str) -> None:
        self.base = [("mountpoint", mountpoint)]
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {PREFIX}{name} {escape_help(help_text)}")
        self.lines.append(f"# TYPE {PREFIX}{name} {kind}")

    def sample(self, name: str, value: float, extra: Iterable[tuple[str, str]] = ()) -> None:
        labels = _labels([*self.base, *extra])
        self.lines.append(f"{PREFIX}{name}{labels} {format_value(value)}")

    def simple(self, name: str, kind: str, help_text: str, value: float) -> None:
        self.family(name, kind, help_text)
        self.sample(name, value)


def render(stats: dict[str, Any]) -> str:
    """The Prometheus text exposition (0.0.4) of a ``stfs stats --json`` snapshot."""
    out = _Writer(str(stats.get("mountpoint", "")))

    for key, name, help_text in COUNTERS:
        value = _number(stats.get(key))
        if value is not None:
            out.simple(name, "counter", help_text, value)

    for key, name, help_text, scale in GAUGES:
        value = _number(stats.get(key))
        if value is not None:
            out.simple(name, "gauge", help_text, scale(value))

    kernel = stats.get("kernel")
    if isinstance(kernel, dict):
        for key, name, help_text, scale in KERNEL_GAUGES:
            value = _number(kernel.get(key))
            if value is not None:
                out.simple(name, "gauge", help_text, scale(value))

    level = stats.get("pressure_level")
    if isinstance(level, str):
        if level in PRESSURE_LEVELS:
            out.simple("pressure_level", "gauge",
                       "Memory pressure level: 0 none, 1 light, 2 moderate, 3 heavy, 4 critical.",
                       PRESSURE_LEVELS.index(level))
        out.family("pressure_level_info", "gauge", "Memory pressure level by name (always 1).")
        out.sample("pressure_level_info", 1, [("level", level)])

    trend = stats.get("memory_trend")
    if isinstance(trend, str):
        out.family("memory_trend_info", "gauge",
                   "Direction of the daemon's memory use by name (always 1).")
        out.sample("memory_trend_info", 1, [("trend", trend)])

    latency = stats.get("chunk_latency_ms")
    if isinstance(latency, dict):
        quantiles = [(k, _number(v)) for k, v in latency.items()
                     if k.startswith("p") and k[1:].isdigit()]
        if quantiles:
            out.family("chunk_latency_quantile_seconds", "gauge",
                       "Recent backing chunk read latency at a quantile.")
            for key, value in quantiles:
                if value is not None:
                    out.sample("chunk_latency_quantile_seconds", value / 1000.0,
                               [("quantile", str(int(key[1:]) / 100))])

    resources = stats.get("resources")
    if isinstance(resources, dict):
        tracked = resources.get("tracked")
        if isinstance(tracked, dict):
            out.family("tracked_resources", "gauge",
                       "Per-handle resources tracked now, by kind.")
            for kind in ("descriptor", "stream", "readahead"):
                out.sample("tracked_resources", _number(tracked.get(kind)) or 0,
                           [("kind", kind)])
        for key, name, help_text in RESOURCE_COUNTERS:
            value = _number(resources.get(key))
            if value is not None:
                out.simple(name, "counter", help_text, value)
    fds = stats.get("backing_fds")
    if isinstance(fds, dict):
        for key, name, kind, help_text in BACKING_FD_METRICS:
            value = _number(fds.get(key))
            if value is not None:
                out.simple(name, kind, help_text, value)

    _histogram(out, stats.get("read_latency_seconds"))
    return "\n".join(out.lines) + "\n"


def _histogram(out: _Writer, hist: Any) -> None:
    if not isinstance(hist, dict) or not isinstance(hist.get("buckets"), list):
        return
    name = "read_duration_seconds"
    out.family(name, "histogram", "Time to answer one read request.")
    saw_inf = False
    for bucket in hist["buckets"]:
        if not isinstance(bucket, (list, tuple)) or len(bucket) != 2:
            continue
        bound, count = bucket
        if bound == "+Inf" or (isinstance(bound, float) and math.isinf(bound)):
            le = "+Inf"
            saw_inf = True
        elif _number(bound) is not None:
            le = repr(float(bound))
        else:
            continue
        out.sample(f"{name}_bucket", _number(count) or 0, [("le", le)])
    total_count = _number(hist.get("count")) or 0
    if not saw_inf:
        out.sample(f"{name}_bucket", total_count, [("le", "+Inf")])
    out.sample(f"{name}_sum", _number(hist.get("sum")) or 0)
    out.sample(f"{name}_count", total_count)
