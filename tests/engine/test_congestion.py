"""The congestion controller against fake stores: plain numbers and a fake clock.

A fake store has a fixed latency per request and serves up to ``parallel``
requests at once; beyond that, requests queue and each takes longer
(latency x in flight / parallel) while the bytes per second stay flat.
Readers always want more than the cap unless ``demand`` says otherwise.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from stfs import congestion
from stfs.congestion import CongestionController

KIB = 1024
CHUNK = 256 * KIB


@dataclasses.dataclass
class FakeStore:
    latency_s: float
    parallel: int = 1_000_000
    jitter: float = 0.0
    rng: random.Random = dataclasses.field(default_factory=lambda: random.Random(14))

    def latency(self, in_flight: int) -> float:
        base = self.latency_s * max(1.0, in_flight / self.parallel)
        return base * (1 + self.jitter * (2 * self.rng.random() - 1))


@dataclasses.dataclass
class Run:
    ctl: CongestionController
    now: float = 0.0
    targets: list[int] = dataclasses.field(default_factory=list)
    reasons: list[str] = dataclasses.field(default_factory=list)

    def drive(self, store: FakeStore, seconds: float, *, demand: int | None = None,
              level_cap: int = 1 << 30, level: str = "none", size: int = CHUNK,
              tick: float = 1.0) -> None:
        """*seconds* of reads at the cap in force (or *demand*), one update a tick."""
        for _ in range(round(seconds / tick)):
            in_flight = self.ctl.cap if demand is None else min(demand, self.ctl.cap)
            done = max(1, round(in_flight * tick / store.latency_s
                                / max(1.0, in_flight / store.parallel)))
            for i in range(done):
                self.ctl.record(self.now + (i + 1) * tick / done, size,
                                store.latency(in_flight), in_flight=in_flight)
            self.now += tick
            self.ctl.update(self.now)
            self.ctl.limit(level_cap, level)
            self.targets.append(self.ctl.target)
            self.reasons.append(self.ctl.reason)


def run(max_streams: int = 10, ceiling: int = 40) -> Run:
    """A controller that starts at *max_streams* and may grow to *ceiling* (the
    daemon's ceiling is --max-streams itself; a higher one shows the growth)."""
    return Run(CongestionController(max_streams, name="faultfs", ceiling=ceiling))


def test_the_ceiling_is_max_streams_unless_given() -> None:
    ctl = CongestionController(10)
    assert (ctl.ceiling, ctl.target, ctl.cap) == (10, 10, 10)
    assert CongestionController(4, ceiling=16).target == 4


def test_steady_high_latency_is_never_backed_off_and_grows_to_the_ceiling() -> None:
    r = run()
    r.drive(FakeStore(0.1), 60)
    assert r.ctl.backoffs == 0
    assert r.targets == sorted(r.targets)                  # never fell
    assert r.ctl.target == r.ctl.ceiling == 40
    assert r.reasons[0] == "growing: latency at baseline"
    assert r.reasons[-1] == "holding: at the ceiling (40)"
    stats = r.ctl.statistics()
    assert stats.baseline_latency_s == pytest.approx(0.1)
    assert stats.latency_s == pytest.approx(0.1)
    assert stats.latency_ratio == pytest.approx(1.0)
    assert stats.throughput_bps == pytest.approx(40 * CHUNK / 0.1)


@pytest.mark.parametrize("latency_s", [0.005, 0.1, 0.5])
def test_a_store_whose_latency_varies_without_a_queue_is_not_backed_off(
        latency_s: float) -> None:
    r = run()
    r.drive(FakeStore(latency_s, jitter=0.6), 90)
    assert r.ctl.backoffs == 0
    assert r.ctl.target == r.ctl.ceiling


def test_steady_latency_with_demand_below_the_cap_holds() -> None:
    r = run()
    r.drive(FakeStore(0.1), 20, demand=4)
    assert r.targets == [10] * 20
    assert r.reasons[-1] == "holding: latency at baseline, demand below the cap"


def test_latency_climbing_at_flat_throughput_backs_off() -> None:
    r = run()
    r.drive(FakeStore(0.1), 3, demand=10)                   # baseline 100 ms at 10 in flight
    before = r.ctl.target
    r.drive(FakeStore(0.3), 1, demand=10)                   # 3x: the same reads, queued
    assert r.ctl.target == before // 2                      # x max(0.5, 1.5 / 3)
    assert r.reasons[-1] == "backing off: latency 3.0x baseline at flat throughput"
    assert r.ctl.statistics().latency_ratio == pytest.approx(3.0)


def test_latency_rising_while_throughput_rises_is_not_backed_off() -> None:
    ctl = CongestionController(10, ceiling=40)
    for i in range(20):                                     # 20 reads of 100 ms: 5 MiB/s
        ctl.record(0.05 * i, CHUNK, 0.1, in_flight=2)
    ctl.update(1.0)
    for i in range(80):                                     # 80 reads of 250 ms: 4x the bytes
        ctl.record(1.0 + 0.0125 * i, CHUNK, 0.25, in_flight=20)
    ctl.update(2.0)
    assert ctl.backoffs == 0
    assert ctl.target == 11
    assert ctl.reason == "growing: throughput rising"


def test_a_store_that_saturates_is_held_near_its_parallelism() -> None:
    r = run()
    r.drive(FakeStore(0.1), 5, demand=2)                    # learns 100 ms unloaded
    store = FakeStore(0.1, parallel=32)
    r.drive(store, 30)
    assert r.ctl.backoffs == 0                              # grew into the band, no further
    assert 32 <= r.ctl.target < 2 * 32
    store.parallel = 4                                      # another client takes the store
    r.drive(store, 30)
    assert r.ctl.backoffs >= 2
    assert any(x.startswith("backing off: latency") for x in r.reasons)
    assert r.ctl.target < 2 * 4                             # out of the queue (ratio < 2)
    assert r.ctl.statistics().latency_ratio < 2             # type: ignore[operator]


def test_errors_back_off_and_hold_growth_for_a_while() -> None:
    r = run()
    r.drive(FakeStore(0.1), 2)
    grown = r.ctl.target
    r.ctl.on_error(r.now + 0.5)
    r.ctl.on_error(r.now + 0.6, timeout=True)
    r.drive(FakeStore(0.1), 1)
    assert r.ctl.target == int(grown * 0.7)
    assert r.reasons[-1] == "error backoff: 2 failed or timed-out read(s)"
    r.drive(FakeStore(0.1), 4)                              # latency at baseline, still held
    assert r.targets[-4:] == [int(grown * 0.7)] * 4
    assert r.reasons[-1] == "holding: after an error backoff"
    r.drive(FakeStore(0.1), 2)
    assert r.ctl.target > int(grown * 0.7)
    stats = r.ctl.statistics()
    assert (stats.errors, r.ctl.timeouts, stats.backoffs) == (2, 1, 1)


def test_errors_back_off_down_to_one_read_never_below() -> None:
    ctl = CongestionController(10, ceiling=40)
    for t in range(1, 12):
        ctl.on_error(t - 0.5)
        ctl.update(float(t))
    assert ctl.target == 1


def test_baseline_is_relearned_after_the_window() -> None:
    r = run()
    r.drive(FakeStore(0.01), 10)                            # a 10 ms store
    assert r.ctl.statistics().baseline_latency_s == pytest.approx(0.01)
    r.drive(FakeStore(0.1), 20, demand=1)                   # now 100 ms for good
    assert r.ctl.statistics().baseline_latency_s == pytest.approx(0.01)
    assert r.ctl.statistics().latency_ratio == pytest.approx(10.0)
    r.drive(FakeStore(0.1), congestion.BASELINE_WINDOW_S - 20 + 5, demand=1)
    stats = r.ctl.statistics()
    assert stats.baseline_latency_s == pytest.approx(0.1)
    assert stats.latency_ratio == pytest.approx(1.0)
    assert r.ctl.backoffs == 0                              # one read in flight: no queue of ours


def test_a_backoff_that_does_not_lower_latency_relearns_the_baseline_at_once() -> None:
    r = run()
    r.drive(FakeStore(0.01), 10)                            # a 10 ms store, at the ceiling
    assert r.ctl.target == 40
    r.drive(FakeStore(0.1), 2)                              # 100 ms for good
    assert r.reasons[-2:] == [
        "backing off: latency 10.0x baseline at flat throughput",
        "holding: baseline re-learned (latency did not fall with fewer reads in flight)"]
    assert r.ctl.statistics().baseline_latency_s == pytest.approx(0.1)
    r.drive(FakeStore(0.1), 5)
    assert r.ctl.target == 40                               # grown back
    assert r.ctl.backoffs == 1


def test_a_queue_learned_as_the_baseline_is_found_by_probing() -> None:
    """Busy from the first read on a store that queues beyond 4: the first
    baseline has a queue in it; a probe at half the cap finds it."""
    r = run()
    r.drive(FakeStore(0.1, parallel=4), 20)
    assert not any(x.startswith("probing") for x in r.reasons)
    first, backoffs = r.ctl.target, r.ctl.backoffs
    assert r.reasons[-1] == "holding: latency 1.5x baseline, throughput flat"
    r.drive(FakeStore(0.1, parallel=4), 60)
    assert "probing: the baseline at half the cap" in r.reasons
    assert r.ctl.backoffs > backoffs
    assert r.ctl.target < first
    assert r.ctl.statistics().baseline_latency_s == pytest.approx(0.1)


def test_a_steady_store_is_never_probed() -> None:
    r = run()
    r.drive(FakeStore(0.1), 120)
    assert not any(x.startswith("probing") for x in r.reasons)


def test_pressure_level_caps_on_top() -> None:
    r = run()
    r.drive(FakeStore(0.1), 10)
    assert r.ctl.target == 40
    r.drive(FakeStore(0.1), 3, level_cap=3, level="heavy")
    stats = r.ctl.statistics()
    assert (stats.cap, stats.target) == (3, 40)
    assert stats.reason == "capped by pressure level heavy"
    assert r.ctl.backoffs == 0
    r.drive(FakeStore(0.1), 1)
    assert r.ctl.cap == 40
    assert r.ctl.reason == "holding: at the ceiling (40)"


def test_requests_are_compared_with_their_own_size() -> None:
    """4 KiB reads at 1 ms and 1 MiB reads at 40 ms, both steady: no queue."""
    ctl = CongestionController(10, ceiling=40)
    for t in range(1, 30):
        for i in range(50):
            ctl.record(t - 1 + i / 50, 4 * KIB, 0.001, in_flight=10)
        for i in range(25):
            ctl.record(t - 1 + i / 25, 1024 * KIB, 0.04, in_flight=10)
        ctl.update(float(t))
        ctl.limit(1 << 30, "none")
    assert ctl.backoffs == 0
    assert ctl.degradation() == pytest.approx((1.0, 0.0))
    assert ctl.baseline(4 * KIB, 29.0) == pytest.approx(0.001)
    assert ctl.baseline(1024 * KIB, 29.0) == pytest.approx(0.04)
    assert ctl.statistics().baseline_latency_s == pytest.approx(0.001)   # most reads


def test_a_fast_store_is_not_backed_off_for_sub_millisecond_queueing() -> None:
    r = run()
    r.drive(FakeStore(0.0005), 3, demand=2)
    r.drive(FakeStore(0.0005, parallel=2), 20)              # 10x, but < 5 ms per read
    assert r.ctl.backoffs == 0


def test_more_reads_in_flight_that_bring_no_throughput_are_given_back() -> None:
    """A fast store behind a busy host: beyond 10 reads in flight each read just
    waits longer (under the 5 ms that would count as a queue). The doubling to
    20 bought nothing: back to 10, and no growth for the window."""
    r = run()
    r.drive(FakeStore(0.0005), 3, demand=5)
    store = FakeStore(0.0005, parallel=10)
    r.drive(store, 2)
    assert r.targets[-2:] == [20, 10]
    assert r.reasons[-1] == congestion.NO_GAIN
    r.drive(store, congestion.BASELINE_WINDOW_S - 2)
    assert set(r.targets[-28:]) == {10}
    assert r.ctl.backoffs == 0


def test_a_store_at_seconds_per_read_is_judged_over_several_ticks() -> None:
    ctl = CongestionController(10, ceiling=40)
    reasons = []
    for t in range(1, 9):                                   # one 2-s read completes a second
        ctl.record(t - 0.5, CHUNK, 2.0, in_flight=2)
        ctl.update(float(t))
        reasons.append(ctl.reason)
    assert reasons[:3] == ["holding: too few reads to judge"] * 3
    assert reasons[3] == "holding: latency at baseline, demand below the cap"
    assert ctl.statistics().baseline_latency_s == pytest.approx(2.0)
    assert ctl.degradation() == pytest.approx((1.0, 0.0))


def test_idle_has_no_figures() -> None:
    ctl = CongestionController(10, name="src", ceiling=40)
    assert ctl.update(1.0) == 10
    assert ctl.reason == "idle"
    assert ctl.degradation() == (None, None)
    ctl.observe_in_flight(3, 3 * CHUNK)
    stats = ctl.statistics()
    assert stats.as_dict() == {
        "source": "src", "baseline_latency_ms": None, "latency_ms": None,
        "latency_ratio": None, "throughput_bps": 0, "target": 10, "cap": 10, "ceiling": 40,
        "reason": "idle", "in_flight_reads": 3, "in_flight_bytes": 3 * CHUNK, "errors": 0,
        "backoffs": 0}


def test_mean_in_flight_comes_from_read_durations_when_not_fed() -> None:
    """Little's law: 10 reads of 100 ms a second each is one read in flight on
    average, so a cap of 10 is not what limits them."""
    ctl = CongestionController(10, ceiling=40)
    for t in range(1, 6):
        for i in range(10):
            ctl.record(t - 1 + i / 10, CHUNK, 0.1)
        ctl.update(float(t))
    assert ctl.target == 10
    assert ctl.reason == "holding: latency at baseline, demand below the cap"
    for i in range(100):                                    # 100 x 100 ms: 10 in flight
        ctl.record(5 + i / 100, CHUNK, 0.1)
    ctl.update(6.0)
    assert ctl.target > 10


def test_waiting_readers_mean_the_cap_is_the_limit() -> None:
    """Reads in flight look few (one, when each completes), but readers wait for
    the cap: it is the limit, and more of it brings more reads."""
    ctl = CongestionController(10, ceiling=40)
    for t in range(1, 4):
        n = ctl.target
        for i in range(n):
            ctl.record(t - 1 + i / n, CHUNK, 0.1, in_flight=1)
        ctl.update(float(t), waiting=3)
        ctl.limit(1 << 30, "none")
    assert ctl.target == 40
    assert ctl.backoffs == 0


def windowed(values: list[tuple[float, float]], at: float) -> float | None:
    w = congestion.WindowedMin(30.0, 6)
    for t, v in values:
        w.add(t, v)
    return w.get(at)


def test_windowed_min_forgets_after_the_window() -> None:
    assert windowed([(0.0, 1.0), (10.0, 5.0)], 20.0) == 1.0
    assert windowed([(0.0, 1.0), (10.0, 5.0)], 35.0) == 5.0
    assert windowed([(0.0, 1.0)], 36.0) is None
