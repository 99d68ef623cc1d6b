"""Prometheus exposition of a daemon's stats snapshot, through ``prometheus_client``.

``StatsCollector`` turns the dict ``stfs stats --json`` prints into metric
families; ``prometheus_client`` writes the text. Every metric has the prefix
``stfs_``, counters end in ``_total``, units are in the names (bytes, seconds,
ratio), and every sample carries a ``mountpoint`` label. A key missing from the
snapshot, ``null`` or not a number (an older or newer daemon) leaves its family
out rather than inventing a value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

Stats = Mapping[str, Any]

PREFIX = "stfs_"
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
"""The type of what ``generate_latest`` writes (the library's CONTENT_TYPE_LATEST is 1.0.0)."""

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
    ("backing_read_seconds", "backing_read_seconds_total",
     "Time in backing reads run in worker threads, summed (its rate is the mean reads "
     "in flight)."),
    ("inline_reads", "inline_reads_total",
     "Backing reads of bytes already in the page cache, copied on the event loop (RWF_NOWAIT)."),
    ("readahead_chunks", "readahead_chunks_total", "Chunks fetched ahead of the reader."),
    ("readahead_used", "readahead_used_total",
     "Chunks read ahead whose bytes a reply then included."),
    ("readahead_wasted", "readahead_wasted_total",
     "Chunks read ahead, or being read, when their stream seeked or closed."),
    ("random_widened", "random_widened_total",
     "Random requests read as a wider chunk (free on a high-latency store)."),
    ("readahead_refused", "readahead_refused_total",
     "Read-ahead chunks refused by the memory budget."),
    ("read_around_pushes", "read_around_pushes_total",
     "Windows around random reads put into the kernel page cache."),
    ("read_around_bytes", "read_around_bytes_total",
     "Bytes put into the kernel page cache around random reads."),
    ("pressure_level_changes", "pressure_level_changes_total",
     "Changes of the memory pressure level."),
    ("disk_cache_hits", "disk_cache_hits_total",
     "Chunks read from the disk cache (memory missed, SOURCE not read)."),
    ("disk_cache_misses", "disk_cache_misses_total",
     "Reads that missed memory and the disk cache and went to SOURCE."),
    ("disk_cache_hit_bytes", "disk_cache_hit_bytes_total", "Bytes read from the disk cache."),
    ("disk_cache_writes", "disk_cache_writes_total", "Chunks written to the disk cache."),
    ("disk_cache_written_bytes", "disk_cache_written_bytes_total",
     "Bytes written to the disk cache."),
    ("disk_cache_writes_missed", "disk_cache_writes_missed_total",
     "Chunks read from SOURCE that left memory before the disk cache could write them."),
    ("disk_cache_refills", "disk_cache_refills_total",
     "Missed chunks read from SOURCE again and written once the writer was idle."),
    ("disk_cache_write_errors", "disk_cache_write_errors_total",
     "Disk cache writes that failed (the read was served all the same)."),
    ("disk_cache_evictions", "disk_cache_evictions_total",
     "Entries removed from the disk cache to stay within its size."),
    ("disk_cache_verify_failures", "disk_cache_verify_failures_total",
     "Disk cache entries that failed their xxh3 check: dropped, SOURCE read instead."),
)

# JSON key -> (metric name without prefix, help text, scale)
GAUGES: tuple[tuple[str, str, str, Scale], ...] = (
    ("cache_bytes", "cache_bytes", "File data held in the chunk cache.", _same),
    ("cache_limit_bytes", "cache_limit_bytes", "Capacity of the chunk cache now.", _same),
    ("cache_entries", "cache_entries", "Chunks held in the page cache.", _same),
    ("disk_cache_bytes", "disk_cache_bytes",
     "Bytes the disk cache uses on disk (entries, their names, its directories).", _same),
    ("disk_cache_limit_bytes", "disk_cache_limit_bytes", "Size of the disk cache (--cache-size).",
     _same),
    ("disk_cache_entries", "disk_cache_entries", "Chunks in the disk cache.", _same),
    ("disk_cache_entry_limit", "disk_cache_entry_limit",
     "Entries the disk cache's index may hold within the memory limit.", _same),
    ("memory_limit_bytes", "memory_limit_bytes",
     "Hard ceiling for all file data held (--memory-limit).", _same),
    ("held_bytes", "held_bytes",
     "All file data held now: cache, in-flight, read-ahead and reply buffers.", _same),
    ("peak_held_bytes", "peak_held_bytes", "Highest held_bytes since the mount.", _same),
    ("open_handles", "open_handles", "Open file handles.", _same),
    ("open_dirs", "open_dirs", "Open directory handles.", _same),
    ("known_inodes", "known_inodes", "Inodes the kernel currently knows about.", _same),
    ("active_reads", "active_reads", "Read requests in progress.", _same),
    ("pressure_score", "pressure_score", "Memory pressure score behind the level.", _same),
    ("concurrency_cap", "concurrency_cap", "Concurrent backing reads allowed now.", _same),
    ("memory_use_pct", "memory_use_ratio",
     "Worst of the engine, RSS, cgroup and system memory views, as a ratio (may exceed 1).",
     lambda v: v / 100.0),
    ("rss_growth_bytes_per_s", "rss_growth_bytes_per_second",
     "Recent growth rate of the daemon's resident set.", _same),
    ("cgroup_memory_limit_bytes", "cgroup_memory_limit_bytes",
     "Memory limit of the daemon's cgroup, when there is one.", _same),
    ("memory_limit_requested_bytes", "memory_limit_requested_bytes",
     "--memory-limit as asked; memory_limit_bytes is the budget in use (fitted to the cgroup).",
     _same),
    ("cgroup_memory_usage_bytes", "cgroup_memory_usage_bytes",
     "Memory the daemon's cgroup is charged for, page cache included.", _same),
    ("cgroup_memory_working_set_bytes", "cgroup_memory_working_set_bytes",
     "The cgroup's usage less the page cache the kernel can reclaim.", _same),
    ("rss_bytes", "rss_bytes", "Resident set size of the daemon.", _same),
    ("open_fds", "open_fds", "File descriptors open in the daemon.", _same),
    ("uptime_s", "uptime_seconds", "Seconds since the daemon started setting up the mount.",
     _same),
    ("cache_hit_ratio", "cache_hit_ratio", "Cache hits over all chunk lookups (0-1).", _same),
    ("random_hit_ratio", "random_hit_ratio",
     "Share of the latest random requests answered without a backing read, or that "
     "would be with wide chunks (0-1).", _same),
    ("readahead_earned", "readahead_earned_ratio",
     "Share of the latest read-ahead chunks that replies used (0-1); below 0.5 windows shrink.",
     _same),
    ("kernel_request_bytes", "kernel_request_bytes",
     "Read request size the kernel sends most often.", _same),
)

# key of the "kernel" object -> (metric name without prefix, help text, scale)
KERNEL_GAUGES: tuple[tuple[str, str, str, Scale], ...] = (
    ("read_ahead_kb", "kernel_read_ahead_bytes", "Kernel read-ahead window of the mount.",
     lambda v: v * 1024),
    ("max_background", "kernel_max_background", "Kernel's limit of background FUSE requests.",
     _same),
    ("max_request_bytes", "kernel_max_request_bytes", "Largest read request the kernel may send.",
     _same),
)

# key of the "resources" object -> (metric name without prefix, help text)
RESOURCE_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("sweeps", "resource_sweeps_total", "Periodic sweeps for orphaned and idle resources."),
    ("swept", "resources_swept_total", "Resources freed by sweeps."),
    ("emergency_cleanups", "emergency_cleanups_total",
     "Emergency cleanups under critical memory pressure."),
)
TRACKED_KINDS = ("descriptor", "stream", "readahead")

# key of the "backing_fds" object -> (metric name without prefix, type, help text)
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


def _object(stats: Stats, key: str) -> Stats:
    value = stats.get(key)
    return value if isinstance(value, Mapping) else {}


class StatsCollector(Collector):
    """Metric families of the snapshot *snapshot()* returns, taken afresh on every collect."""

    def __init__(self, snapshot: Callable[[], Stats]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        return families(self._snapshot())


def families(stats: Stats) -> Iterator[Metric]:
    """The metric families of one ``stfs stats --json`` snapshot, in a fixed order."""
    mountpoint = str(stats.get("mountpoint", ""))

    def one(kind: str, name: str, help_text: str, value: Any,
            scale: Scale = _same) -> Iterator[Metric]:
        number = _number(value)
        if number is None:
            return
        family: CounterMetricFamily | GaugeMetricFamily
        if kind == "counter":
            family = CounterMetricFamily(PREFIX + name, help_text, labels=["mountpoint"])
        else:
            family = GaugeMetricFamily(PREFIX + name, help_text, labels=["mountpoint"])
        family.add_metric([mountpoint], scale(number))
        yield family

    def labelled(name: str, help_text: str, label: str,
                 samples: list[tuple[str, float]]) -> Iterator[Metric]:
        family = GaugeMetricFamily(PREFIX + name, help_text, labels=["mountpoint", label])
        for label_value, value in samples:
            family.add_metric([mountpoint, label_value], value)
        yield family

    for key, name, help_text in COUNTERS:
        yield from one("counter", name, help_text, stats.get(key))
    for key, name, help_text, scale in GAUGES:
        yield from one("gauge", name, help_text, stats.get(key), scale)
    kernel = _object(stats, "kernel")
    for key, name, help_text, scale in KERNEL_GAUGES:
        yield from one("gauge", name, help_text, kernel.get(key), scale)

    level = stats.get("pressure_level")
    if isinstance(level, str):
        if level in PRESSURE_LEVELS:
            yield from one("gauge", "pressure_level",
                           "Memory pressure level: 0 none, 1 light, 2 moderate, 3 heavy, "
                           "4 critical.", PRESSURE_LEVELS.index(level))
        yield from labelled("pressure_level_info", "Memory pressure level by name (always 1).",
                            "level", [(level, 1)])
    trend = stats.get("memory_trend")
    if isinstance(trend, str):
        yield from labelled("memory_trend_info",
                            "Direction of the daemon's memory use by name (always 1).",
                            "trend", [(trend, 1)])

    quantiles = [(str(int(key[1:]) / 100), number / 1000.0)
                 for key, value in _object(stats, "chunk_latency_ms").items()
                 if key.startswith("p") and key[1:].isdigit()
                 and (number := _number(value)) is not None]
    if quantiles:
        yield from labelled("chunk_latency_quantile_seconds",
                            "Recent backing chunk read latency at a quantile.",
                            "quantile", quantiles)

    resources = _object(stats, "resources")
    tracked = resources.get("tracked")
    if isinstance(tracked, Mapping):
        yield from labelled("tracked_resources", "Per-handle resources tracked now, by kind.",
                            "kind", [(kind, _number(tracked.get(kind)) or 0)
                                     for kind in TRACKED_KINDS])
    for key, name, help_text in RESOURCE_COUNTERS:
        yield from one("counter", name, help_text, resources.get(key))
    fds = _object(stats, "backing_fds")
    for key, name, kind, help_text in BACKING_FD_METRICS:
        yield from one(kind, name, help_text, fds.get(key))

    for key, name, help_text in MEMORY_COUNTERS:
        yield from one("counter", name, help_text, stats.get(key))
    source = stats.get("memory_limit_source")
    if isinstance(source, str):
        yield from labelled("memory_limit_source_info",
                            "Where the budget in use comes from (always 1).", "source",
                            [(source, 1)])
    yield from _concurrency(mountpoint, _object(stats, "concurrency"))
    yield from _histogram(mountpoint, stats.get("read_latency_seconds"))


MEMORY_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("source_pages_dropped_bytes", "source_pages_dropped_bytes_total",
     "SOURCE page cache dropped near the cgroup's limit (bytes the chunk cache held)."),
    ("heap_trims", "heap_trims_total", "Times freed heap memory was given back to the system."),
    ("budget_refits", "budget_refits_total", "Times the budget was fitted to the cgroup again."),
)

# concurrency key -> (metric name without prefix, kind, help text, scale)
CONCURRENCY_METRICS: tuple[tuple[str, str, str, str, Scale], ...] = (
    ("baseline_latency_ms", "store_baseline_latency_seconds", "gauge",
     "The store's learned latency with no queue (windowed minimum of interval medians).",
     lambda ms: ms / 1000.0),
    ("latency_ms", "store_latency_seconds", "gauge",
     "Median backing-read latency of the last interval.", lambda ms: ms / 1000.0),
    ("latency_ratio", "store_latency_ratio", "gauge",
     "Latency over the baseline; queueing shows as a ratio rising with concurrency.", _same),
    ("throughput_bps", "store_throughput_bytes_per_second", "gauge",
     "Bytes per second the store delivered in the last interval.", _same),
    ("target", "store_concurrency_target", "gauge",
     "Concurrent backing reads the congestion controller grants the store.", _same),
    ("ceiling", "store_concurrency_ceiling", "gauge",
     "Most the controller ever grants (--max-streams).", _same),
    ("in_flight_reads", "store_in_flight_reads", "gauge",
     "Backing reads holding a read slot now.", _same),
    ("in_flight_bytes", "store_in_flight_bytes", "gauge", "Bytes of those backing reads.",
     _same),
    ("errors", "store_errors_total", "counter",
     "Transient backing-read errors and timeouts the controller backed off for.", _same),
    ("backoffs", "store_backoffs_total", "counter",
     "Times the controller lowered the target for queueing or errors.", _same),
)


def _concurrency(mountpoint: str, figures: Stats) -> Iterator[Metric]:
    """The congestion controller of SOURCE's store (``concurrency``), labelled by store."""
    store = str(figures.get("source", ""))
    for key, name, kind, help_text, scale in CONCURRENCY_METRICS:
        number = _number(figures.get(key))
        if number is None:
            continue
        family: CounterMetricFamily | GaugeMetricFamily
        if kind == "counter":
            family = CounterMetricFamily(PREFIX + name, help_text,
                                         labels=["mountpoint", "store"])
        else:
            family = GaugeMetricFamily(PREFIX + name, help_text, labels=["mountpoint", "store"])
        family.add_metric([mountpoint, store], scale(number))
        yield family
    reason = figures.get("reason")
    if isinstance(reason, str):
        family = GaugeMetricFamily(PREFIX + "store_concurrency_reason_info",
                                   "Why the concurrency cap is where it is (always 1).",
                                   labels=["mountpoint", "store", "reason"])
        family.add_metric([mountpoint, store, reason], 1)
        yield family


def _histogram(mountpoint: str, hist: Any) -> Iterator[Metric]:
    """``read_latency_seconds`` (cumulative ``[bound, count]`` pairs, sum, count)."""
    if not isinstance(hist, Mapping) or not isinstance(hist.get("buckets"), list):
        return
    count = _number(hist.get("count")) or 0
    buckets: list[tuple[str, float]] = []
    for bucket in hist["buckets"]:
        if not isinstance(bucket, (list, tuple)) or len(bucket) != 2:
            continue
        bound, value = bucket
        if bound == "+Inf" or (isinstance(bound, float) and math.isinf(bound)):
            buckets.append(("+Inf", _number(value) or 0))
        elif _number(bound) is not None:
            buckets.append((repr(float(bound)), _number(value) or 0))
    if not buckets or buckets[-1][0] != "+Inf":
        buckets.append(("+Inf", count))  # the +Inf bucket is the count
    family = HistogramMetricFamily(PREFIX + "read_duration_seconds",
                                   "Time to answer one read request.", labels=["mountpoint"])
    family.add_metric([mountpoint], buckets, _number(hist.get("sum")) or 0)
    yield family


def registry_for(snapshot: Callable[[], Stats]) -> CollectorRegistry:
    """A private registry holding only the stats of *snapshot()* (no process metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(snapshot))
    return registry


def render(stats: Stats) -> str:
    """The Prometheus text exposition of a ``stfs stats --json`` snapshot."""
    return generate_latest(registry_for(lambda: stats)).decode()
