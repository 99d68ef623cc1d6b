"""Live counters of the mount, and the stats snapshot served to ``stfs stats``.

Components increment counters here; nothing here does I/O except reading the
process's own RSS and descriptor count (psutil) when a snapshot is taken.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Iterable
from typing import Any

import psutil


@dataclasses.dataclass
class Counters:
    """Monotonic counters and current gauges, updated on the event loop."""

    started_at: float = dataclasses.field(default_factory=time.monotonic)
    bytes_served: int = 0
    reads: int = 0
    errors: int = 0
    retries: int = 0
    recoveries: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    active_reads: int = 0
    interrupted_streams: int = 0
    """Streams (open handles) whose reads met a transient backing error."""
    failed_streams: int = 0
    """Interrupted streams that got an error anyway (retries exhausted, or the file changed)."""
    changed_files: int = 0
    """Streams failed with EIO because the file changed under them."""
    checksums_computed: int = 0
    corruptions_detected: int = 0

    def uptime_s(self) -> float:
        return time.monotonic() - self.started_at


_process = psutil.Process(os.getpid())


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return int(_process.memory_info().rss)


def reset_process() -> None:
    """Point RSS readings at the current process (after daemonizing forks)."""
    global _process
    _process = psutil.Process(os.getpid())


def open_fd_count() -> int:
    """File descriptors open in this process now."""
    return int(_process.num_fds())


PERCENTILES = {"p50": 50, "p95": 95, "p99": 99}


def percentiles(samples: Iterable[float]) -> dict[str, float]:
    """p50, p95 and p99 of *samples*, in their unit; all 0.0 when there are none.

    ``statistics.quantiles`` with the "inclusive" method: linear interpolation
    between the two closest samples, the smallest sample being p0 and the largest
    p100 (numpy's default), so a percentile never lies outside the samples.
    """
    data = list(samples)
    if len(data) < 2:  # quantiles needs two points before Python 3.13
        only = float(data[0]) if data else 0.0
        return {name: only for name in PERCENTILES}
    cuts = statistics.quantiles(data, n=100, method="inclusive")
    return {name: cuts[q - 1] for name, q in PERCENTILES.items()}


def snapshot_json_ready(values: dict[str, Any]) -> dict[str, Any]:
    """Round floats so the JSON stays readable."""
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in values.items()}


LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclasses.dataclass
class Histogram:
    """Cumulative-bucket histogram (Prometheus style) of durations in seconds."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS_S
    counts: list[int] = dataclasses.field(
        default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(self.bounds):
            if seconds <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += seconds
        self.count += 1

    def as_dict(self) -> dict[str, Any]:
        cumulative = 0
        buckets: list[list[float | str | int]] = []
        for bound, n in zip(self.bounds, self.counts):
            cumulative += n
            buckets.append([bound, cumulative])
        buckets.append(["+Inf", self.count])
        return {"buckets": buckets, "sum": round(self.total, 6), "count": self.count}
