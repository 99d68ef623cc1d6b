"""The stats document: what ``stfs stats --json``, ``--prometheus`` and
``/metrics`` show, built from the components' ``statistics()``.

Every key is documented in METRICS.md; SPEC.md names the ones that must be
there. Nothing here reads a component's private state: each answers for
itself with a frozen dataclass.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Any

from stfs import metrics
from stfs.disk_cache import NO_DISK_CACHE
from stfs.engine import ReadEngine
from stfs.kernel import KernelTuning
from stfs.pressure import PressureController
from stfs.view import View

VERSION = 1


def stats_document(*, source: str, mountpoint: str, view: View, engine: ReadEngine,
                   pressure: PressureController | None, kernel: KernelTuning,
                   metrics_port: int | None, memory: dict[str, Any]) -> dict[str, Any]:
    """The live stats snapshot of one mount; *memory*: the memory keeper's figures
    (the budget's source, the memory cgroup's)."""
    c = engine.counters
    handles = view.handles
    eng = engine.statistics()
    cache = engine.cache.statistics()
    budget = engine.budget.statistics()
    reads = engine.reads.statistics()
    ahead = engine.readahead.statistics()
    monitor = pressure.monitor if pressure is not None else None
    reading = monitor.reading if monitor is not None else None
    return metrics.snapshot_json_ready({
        "version": VERSION,
        "pid": os.getpid(),
        "source": source,
        "mountpoint": mountpoint,
        "bytes_served": c.bytes_served,
        "reads": c.reads,
        "cache_bytes": cache.cached_bytes,
        "cache_limit_bytes": cache.capacity_bytes,
        "cache_entries": cache.entries,
        "cache_hits": c.cache_hits,
        "cache_misses": c.cache_misses,
        "memory_limit_bytes": budget.limit_bytes,
        **(engine.disk.statistics().as_stats() if engine.disk is not None else NO_DISK_CACHE),
        **memory,
        "heap_trims": int(memory.get("heap_trims") or 0) + engine.trimmer.trims,
        "held_bytes": budget.held_bytes,
        "peak_held_bytes": budget.peak_held_bytes,
        "open_handles": handles.open_files,
        "open_dirs": handles.open_dirs,
        "known_inodes": len(view.inodes),
        "active_reads": c.active_reads,
        "backing_reads": reads.reads,
        "inline_reads": reads.inline_reads,
        "backing_read_seconds": round(reads.read_seconds, 3),
        "readahead_chunks": ahead.chunks,
        "readahead_used": ahead.used,
        "readahead_wasted": ahead.wasted,
        "readahead_earned": round(ahead.earned, 3),
        "random_widened": engine.reads.wide_chunks.widened,
        "random_hit_ratio": round(engine.reads.wide_chunks.hit_rate(), 3),
        "readahead_refused": budget.refused_speculative,
        "read_around_pushes": ahead.read_around_pushes,
        "read_around_bytes": ahead.read_around_bytes,
        "pressure_level": eng.pressure_level.label,
        "pressure_score": pressure.last_score.total if pressure else 0,
        "pressure_level_changes": pressure.level_changes if pressure else 0,
        "concurrency_cap": eng.concurrency_cap,
        "concurrency": (None if pressure is None else {
            **pressure.congestion.statistics().as_dict(),
            "in_flight_reads": reads.in_flight, "in_flight_bytes": reads.in_flight_bytes}),
        "memory_use_pct": round(eng.memory_use_pct, 1),
        "metrics_port": metrics_port,
        "learned_throughput_bps": [round(x) for x in reads.learned_throughput_bps
                                   if math.isfinite(x)],
        "memory_trend": monitor.trend() if monitor else "steady",
        "rss_growth_bytes_per_s": round(monitor.growth_bytes_per_s()) if monitor else 0,
        "cgroup_memory_limit_bytes": reading.limit_bytes if reading else None,
        "rss_bytes": metrics.rss_bytes(),
        "python_blocks": sys.getallocatedblocks(),
        "buffer_pool_bytes": engine.pool.free_bytes,
        "open_fds": metrics.open_fd_count(),
        "retries": c.retries,
        "recoveries": c.recoveries,
        "errors": c.errors,
        "interrupted_streams": c.interrupted_streams,
        "recovered_streams": c.interrupted_streams - c.failed_streams,
        "failed_streams": c.failed_streams,
        "changed_files": c.changed_files,
        "checksums_computed": c.checksums_computed,
        "corruptions_detected": c.corruptions_detected,
        "resources": dataclasses.asdict(engine.resources.statistics()),
        "backing_fds": dataclasses.asdict(engine.descriptors.statistics()),
        "uptime_s": c.uptime_s(),
        "chunk_latency_ms": reads.latency_ms,
        "read_latency_seconds": eng.read_latency.as_dict(),
        "cache_hit_ratio": round(c.cache_hits / max(1, c.cache_hits + c.cache_misses), 4),
        "kernel_request_bytes": eng.kernel_request_bytes,
        "kernel": dataclasses.asdict(kernel),
        "chunk_sizes": {str(k): v for k, v in reads.chunk_sizes.items()},
        "request_sizes": {str(k): v for k, v in eng.request_sizes.items()},
        "handles": [
            {"fh": h.fh, "path": os.fsdecode(h.path), "bytes_read": h.bytes_read,
             "age_s": round(time.monotonic() - h.opened_at, 3), **engine.stream_info(h.fh)}
            for h in handles.files()
        ],
    })
