"""The Prometheus collector (``stfs.prometheus``), without a mount."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from stfs import metrics, prometheus

REPO = Path(__file__).resolve().parent.parent


def families(text: str) -> dict[str, Metric]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def full_snapshot() -> dict[str, Any]:
    """A snapshot with every key the exposition reads (and some it does not)."""
    hist = metrics.Histogram()
    for seconds in (0.0002, 0.003, 0.003, 0.07, 4.0):
        hist.observe(seconds)
    numbers = {key: 1 for key, _, _ in prometheus.COUNTERS}
    numbers.update({key: 2 for key, _, _, _ in prometheus.GAUGES})
    numbers.update({key: 3 for key, _, _ in prometheus.MEMORY_COUNTERS})
    return {
        **numbers, "version": 1, "pid": 7, "source": "/src", "mountpoint": "/m",
        "handles": [], "learned_throughput_bps": [1000], "metrics_port": None,
        "pressure_level": "light", "memory_trend": "steady",
        "kernel": {"read_ahead_kb": 128, "max_background": 12, "max_request_bytes": 131072},
        "chunk_latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0},
        "resources": {"tracked": {"descriptor": 1, "stream": 2, "readahead": 0},
                      "sweeps": 3, "swept": 0, "emergency_cleanups": 0},
        "backing_fds": {"open": 1, "limit": 64, "reopens": 0},
        "read_latency_seconds": hist.as_dict(),
        "memory_limit_source": "cgroup v1 /box",
        "concurrency": {"source": "/src", "baseline_latency_ms": 100.0, "latency_ms": 102.0,
                        "latency_ratio": 1.02, "throughput_bps": 5e7, "target": 10, "cap": 10,
                        "ceiling": 10, "reason": "holding: at the ceiling (10)",
                        "in_flight_reads": 8, "in_flight_bytes": 8 << 20, "errors": 0,
                        "backoffs": 1},
    }


def type_lines(text: str) -> dict[str, str]:
    """Metric name -> type, from the ``# TYPE`` lines."""
    return {line.split()[2]: line.split()[3] for line in text.splitlines()
            if line.startswith("# TYPE ")}


def documented_names() -> set[str]:
    """The metric names METRICS.md's Prometheus section lists."""
    text = (REPO / "METRICS.md").read_text()
    section = text.split("## Prometheus", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`(stfs_[a-z_]+)", section))


def test_every_family_of_a_full_snapshot_is_documented_with_its_type() -> None:
    text = prometheus.render(full_snapshot())
    types = type_lines(text)
    assert set(types) == documented_names()
    for name, kind in types.items():
        if name.endswith("_total"):
            assert kind == "counter", name
        elif name == "stfs_read_duration_seconds":
            assert kind == "histogram"
        else:
            assert kind == "gauge", name
    assert all(line.startswith("stfs_") for line in text.splitlines() if line[:1] != "#")
    for family in families(text).values():
        assert family.documentation
        assert family.samples
        assert all(sample.labels["mountpoint"] == "/m" for sample in family.samples)


def test_values_are_scaled_into_the_units_of_their_names() -> None:
    fams = families(prometheus.render(full_snapshot() | {"memory_use_pct": 150.0}))
    assert fams["stfs_memory_use_ratio"].samples[0].value == 1.5
    assert fams["stfs_kernel_read_ahead_bytes"].samples[0].value == 128 * 1024
    quantiles = {s.labels["quantile"]: s.value
                 for s in fams["stfs_chunk_latency_quantile_seconds"].samples}
    assert quantiles == {"0.5": 0.001, "0.95": 0.002, "0.99": 0.003}
    assert fams["stfs_pressure_level"].samples[0].value == 1  # light
    tracked = {s.labels["kind"]: s.value for s in fams["stfs_tracked_resources"].samples}
    assert tracked == {"descriptor": 1, "stream": 2, "readahead": 0}


def test_histogram_buckets_are_cumulative_with_sum_and_count() -> None:
    fams = families(prometheus.render(full_snapshot()))
    hist = fams["stfs_read_duration_seconds"]
    assert hist.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in hist.samples if s.name.endswith("_bucket")}
    assert len(buckets) == len(metrics.LATENCY_BUCKETS_S) + 1
    assert buckets["0.0005"] == 1
    assert buckets["0.0025"] == 1
    assert buckets["0.005"] == 3
    assert buckets["0.1"] == 4
    assert buckets["2.5"] == 4
    assert buckets["+Inf"] == 5
    by_name = {s.name: s.value for s in hist.samples}
    assert by_name["stfs_read_duration_seconds_count"] == 5
    assert by_name["stfs_read_duration_seconds_sum"] == pytest.approx(4.0762)


def test_a_histogram_without_an_inf_bucket_gets_one_holding_the_count() -> None:
    hist = {"buckets": [[0.1, 2], [1.0, 3], ["bad"], [None, 1]], "sum": 1.5, "count": 4}
    fams = families(prometheus.render({"mountpoint": "/m", "read_latency_seconds": hist}))
    samples = fams["stfs_read_duration_seconds"].samples
    assert [(s.labels.get("le"), s.value) for s in samples if s.name.endswith("_bucket")] \
        == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]


def test_missing_null_and_malformed_keys_leave_their_family_out() -> None:
    stats = full_snapshot()
    for key in ("bytes_served", "rss_bytes", "resources"):
        del stats[key]
    stats |= {"reads": None, "errors": "3", "open_fds": True, "kernel": "4.19",
              "backing_fds": [1, 2], "chunk_latency_ms": {"p50": None, "mean": 1.0},
              "read_latency_seconds": {"sum": 1.0}, "pressure_level": "unheard-of",
              "memory_trend": 3}
    types = type_lines(prometheus.render(stats))
    for gone in ("stfs_served_bytes_total", "stfs_rss_bytes", "stfs_reads_total",
                 "stfs_errors_total", "stfs_open_fds", "stfs_tracked_resources",
                 "stfs_resource_sweeps_total", "stfs_kernel_read_ahead_bytes",
                 "stfs_backing_fds", "stfs_chunk_latency_quantile_seconds",
                 "stfs_read_duration_seconds", "stfs_pressure_level", "stfs_memory_trend_info"):
        assert gone not in types
    assert types["stfs_pressure_level_info"] == "gauge"  # the name is still worth a label
    assert types["stfs_cache_hits_total"] == "counter"
    assert prometheus.render({}) == ""


def test_the_collector_takes_a_fresh_snapshot_on_every_scrape() -> None:
    stats: dict[str, Any] = {"mountpoint": "/m", "reads": 1}
    registry = prometheus.registry_for(lambda: stats)
    first = families(generate_latest(registry).decode())
    stats["reads"] = 5
    stats["held_bytes"] = 10
    second = families(generate_latest(registry).decode())
    assert first["stfs_reads"].samples[0].value == 1
    assert second["stfs_reads"].samples[0].value == 5
    assert "stfs_held_bytes" not in first and second["stfs_held_bytes"].samples[0].value == 10


def test_the_content_type_is_the_one_of_the_text_format_written() -> None:
    assert prometheus.CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


def test_the_store_controller_is_exported_with_its_store_label() -> None:
    got = families(prometheus.render(full_snapshot()))
    baseline = got["stfs_store_baseline_latency_seconds"].samples[0]
    assert baseline.labels == {"mountpoint": "/m", "store": "/src"}
    assert baseline.value == pytest.approx(0.1)
    assert got["stfs_store_concurrency_target"].samples[0].value == 10
    assert got["stfs_store_backoffs"].samples[0].value == 1            # a counter's family name
    reason = got["stfs_store_concurrency_reason_info"].samples[0]
    assert reason.labels["reason"] == "holding: at the ceiling (10)" and reason.value == 1
    without = {k: v for k, v in full_snapshot().items() if k != "concurrency"}
    assert "stfs_store_concurrency_target" not in families(prometheus.render(without))
