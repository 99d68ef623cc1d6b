"""``stfs.metrics``: percentiles, descriptor counts."""

from __future__ import annotations

import os
import random

import pytest

from stfs import metrics


def test_percentiles_interpolate_between_the_closest_samples() -> None:
    samples = list(range(1, 101))
    random.Random(3).shuffle(samples)
    assert metrics.percentiles(iter(samples)) == pytest.approx(
        {"p50": 50.5, "p95": 95.05, "p99": 99.01})
    assert metrics.percentiles([1.0, 3.0]) == pytest.approx({"p50": 2.0, "p95": 2.9, "p99": 2.98})


def test_percentiles_stay_within_the_samples() -> None:
    rng = random.Random(5)
    for n in (2, 3, 7, 20):
        samples = [rng.expovariate(10) for _ in range(n)]
        found = metrics.percentiles(samples)
        assert min(samples) <= found["p50"] <= found["p95"] <= found["p99"] <= max(samples)


def test_percentiles_of_no_sample_or_one() -> None:
    assert metrics.percentiles([]) == {"p50": 0.0, "p95": 0.0, "p99": 0.0}
    assert metrics.percentiles([0.25]) == {"p50": 0.25, "p95": 0.25, "p99": 0.25}


def test_open_fd_count_follows_descriptors_opened_and_closed() -> None:
    before = metrics.open_fd_count()
    pipes = [os.pipe() for _ in range(3)]
    try:
        assert metrics.open_fd_count() == before + 6
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)
    assert metrics.open_fd_count() == before
