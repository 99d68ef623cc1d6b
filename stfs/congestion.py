"""Concurrency control for one backing store that tells latency from congestion.

A store that takes 100 ms per request is slow, not overloaded: the way to
read it fast is to keep many requests in flight. A store that is overloaded
shows it differently: as more requests are sent, each takes longer than it
used to and the bytes delivered per second stay flat, because the extra
requests only wait in the store's queue. ``CongestionController`` tells the
two apart the way TCP Vegas and BBR do, and moves a concurrency *target*
(how many backing reads stfs runs at once on this store) accordingly.

* **Baseline.** Per request-size class (powers of two, 4 KiB up), the
  minimum over the last ``BASELINE_WINDOW_S`` (30 s, kept as six 5-s slots)
  of each interval's median latency: the store's latency with no queue in
  front of it. Medians, not single reads, so a store whose latency merely
  varies is not taken for a queueing one. An interval's *ratio* is its
  median over the baseline, per size class (4 KiB and 1 MiB reads are each
  compared with their own kind), averaged by read count. The window is the
  re-learning time: a store that becomes slower for good is the new normal
  after 30 s.
* **Each update** (the pressure tick, once a second) judges the reads that
  completed since the last one (at least ``MIN_SAMPLES`` of one size class,
  else the interval runs on) by the ratio, the throughput (bytes per second
  of the interval) and the mean number of reads in flight:

  - errors or timeouts reported: target x 0.7, no growth for 5 s;
  - ratio >= 2, at least 5 ms of queueing per read, at least two
    reads in flight and throughput not up 10 % on the interval before:
    the store is queueing, target x max(0.5, 1.5 / ratio);
  - otherwise, only if the cap was the limit (reads waited for it, or the
    mean in flight was >= 80 % of it): ratio < 1.2, latency at baseline:
    target x 2 (slow start: no queue yet); throughput up 10 %: +1; ratio
    < 1.5: +1; else hold (the Vegas band 1.5-2: a little queue, kept);
  - busy after a growth step and throughput not up 10 % on the interval
    before it: the step is taken back and growth waits 30 s (a fast store or
    a busy host, where more reads in flight queue for the CPU, not the store);
  - busy, and no interval's median within 10 % of the baseline for 20 s: the
    next interval runs at half the cap to measure the baseline again (BBR's
    ProbeRTT), so a queue that was there from the start is not taken for
    the store's latency;
  - a latency backoff after which the reads in flight fell but their latency
    did not found no queue: the store itself got slower, and its baseline
    is re-learned at once (else the window re-learns it in 30 s).

  A steady 100 ms store has ratio 1 at any concurrency, so it is never
  backed off; its target grows as long as readers want more.
* **Bounds.** 1 .. ``--max-streams``: the option is the most backing reads
  the user allows at once, and the controller never goes past it (raise it
  for a high-latency store: at 100 ms per request, 10 reads of 1 MiB in
  flight carry at most 100 MB/s). The pressure level's cap applies on top
  (``limit``): the cap in force is the smaller of the two.

Pure: no I/O, no clock, no trio. Every input is a plain number with its
time, so tests drive it with fake clocks. Not thread-safe: feed it from the
event loop.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics as stats_

BASELINE_WINDOW_S = 30.0
BASELINE_SLOTS = 6
SMALLEST_CLASS = 12
"""Size classes are powers of two from 4 KiB (2**12) up."""

GROW_RATIO = 1.2
NEAR_RATIO = 1.5
BACKOFF_RATIO = 2.0
MIN_QUEUE_DELAY_S = 0.005
"""Queueing below this per read is not backed off: for a store of 5 ms or more a
ratio of 2 means this much anyway; faster stores (local disks, the page cache)
queue for less than a thread hand-off on a busy host costs, and more reads in
flight keep their device queue full. Only errors back them off."""
RISING = 1.10
BUSY_SHARE = 0.8
MIN_SAMPLES = 4
GROW_FACTOR = 2.0
MAX_DECREASE = 0.5
ERROR_DECREASE = 0.7
ERROR_HOLD_S = 5.0
NO_GAIN = "holding: more reads in flight brought no more throughput"
REFRESH_RATIO = 1.1
PROBE_AFTER_S = 20.0
LATENCIES_KEPT = 2048
"""Per size class and interval: enough for a median."""


def size_class(size: int) -> int:
    """The power of two at or above *size* (4 KiB at least), as its exponent."""
    return max(SMALLEST_CLASS, (max(1, size) - 1).bit_length())


class WindowedMin:
    """The minimum of the values seen in the last *window_s*, kept in slots."""

    def __init__(self, window_s: float = BASELINE_WINDOW_S, slots: int = BASELINE_SLOTS) -> None:
        self.window_s = window_s
        self.slot_s = window_s / slots
        self._slots: collections.deque[list[float]] = collections.deque()  # [slot, minimum]

    def add(self, now: float, value: float) -> None:
        slot = math.floor(now / self.slot_s)
        if self._slots and self._slots[-1][0] == slot:
            self._slots[-1][1] = min(self._slots[-1][1], value)
        else:
            self._slots.append([slot, value])
        self._expire(now)

    def get(self, now: float) -> float | None:
        self._expire(now)
        return min((m for _, m in self._slots), default=None)

    def _expire(self, now: float) -> None:
        # A slot counts while any of it is inside the window.
        while self._slots and (self._slots[0][0] + 1) * self.slot_s <= now - self.window_s:
            self._slots.popleft()


@dataclasses.dataclass(frozen=True)
class CongestionStats:
    """What the controller knows and decided, for ``stfs stats``."""

    name: str
    baseline_latency_s: float | None
    """Baseline of the size class most reads of the last interval had."""
    latency_s: float | None
    """Median latency of that class in the last interval."""
    latency_ratio: float | None
    """Median of the last interval's reads' latency over their class's baseline."""
    throughput_bps: float
    target: int
    cap: int
    """The cap in force: the target, or the pressure level's cap if lower."""
    ceiling: int
    reason: str
    in_flight_reads: int | None
    in_flight_bytes: int | None
    errors: int
    backoffs: int

    def as_dict(self) -> dict[str, object]:
        """JSON-ready, latencies in milliseconds."""
        def ms(value: float | None) -> float | None:
            return None if value is None else round(1000 * value, 3)

        return {"source": self.name, "baseline_latency_ms": ms(self.baseline_latency_s),
                "latency_ms": ms(self.latency_s),
                "latency_ratio": (None if self.latency_ratio is None
                                  else round(self.latency_ratio, 2)),
                "throughput_bps": round(self.throughput_bps), "target": self.target,
                "cap": self.cap, "ceiling": self.ceiling, "reason": self.reason,
                "in_flight_reads": self.in_flight_reads, "in_flight_bytes": self.in_flight_bytes,
                "errors": self.errors, "backoffs": self.backoffs}


class CongestionController:
    """The concurrency target of one store (see the module docstring)."""

    def __init__(self, max_streams: int, *, name: str = "", now: float = 0.0,
                 ceiling: int | None = None, window_s: float = BASELINE_WINDOW_S) -> None:
        self.name = name
        self.ceiling = max(1, max_streams if ceiling is None else ceiling)
        self.target = min(self.ceiling, max(1, max_streams))
        self.cap = self.target
        self.window_s = window_s
        self.reason = "starting"
        self._target_reason = "starting"
        self._baselines: dict[int, WindowedMin] = {}
        self._hold_until = -math.inf
        self._prev_throughput: float | None = None
        self.errors = 0
        self.timeouts = 0
        self.backoffs = 0
        self.in_flight_reads: int | None = None
        self.in_flight_bytes: int | None = None
        self._last: _Interval | None = None
        self._refreshed_at: dict[int, float] = {}
        self._probing = False
        self._backed_off: tuple[float, float, int] | None = None
        self._grew: tuple[int, float] | None = None
        self._no_gain_until = -math.inf
        self._reset_interval(now)

    def _reset_interval(self, now: float) -> None:
        self._interval_start = now
        self._count = 0
        self._bytes = 0
        self._busy_s = 0.0
        self._by_class: dict[int, collections.deque[float]] = {}
        self._class_counts: collections.Counter[int] = collections.Counter()
        self._in_flight_sum = 0.0
        self._in_flight_n = 0
        self._interval_errors = 0

    # -- inputs ------------------------------------------------------------------

    def record(self, now: float, size: int, seconds: float, in_flight: int | None = None,
               in_flight_bytes: int | None = None) -> None:
        """A backing read of *size* bytes that took *seconds* in the store (the
        read itself, not the wait for the cap), completed at *now*; *in_flight*:
        reads in flight (this one included) when it completed, if known."""
        cls = size_class(size)
        latencies = self._by_class.get(cls)
        if latencies is None:
            latencies = self._by_class[cls] = collections.deque(maxlen=LATENCIES_KEPT)
        latencies.append(max(0.0, seconds))
        self._class_counts[cls] += 1
        self._count += 1
        self._bytes += size
        self._busy_s += max(0.0, seconds)
        if in_flight is not None:
            self._in_flight_sum += in_flight
            self._in_flight_n += 1
            self.in_flight_reads = in_flight
        if in_flight_bytes is not None:
            self.in_flight_bytes = in_flight_bytes

    def observe_in_flight(self, reads: int, n_bytes: int | None = None) -> None:
        """What is in flight now, for the statistics (the mean in flight comes
        from ``record``'s *in_flight*, or else from the reads' own durations)."""
        self.in_flight_reads = reads
        if n_bytes is not None:
            self.in_flight_bytes = n_bytes

    def on_error(self, now: float, *, timeout: bool = False) -> None:
        """A backing read failed (or was abandoned as too slow, *timeout*)."""
        self.errors += 1
        self.timeouts += timeout
        self._interval_errors += 1

    # -- the decision --------------------------------------------------------------

    def update(self, now: float, waiting: int = 0) -> int:
        """One control step over the reads since the last; returns the target.

        *waiting*: reads waiting for the cap now, if the caller knows (any
        means the cap is what limits them). With fewer than ``MIN_SAMPLES``
        reads of any one size and no error the interval is extended to the
        next update (a store at seconds per read is judged over several ticks)."""
        dt = now - self._interval_start
        if dt <= 0:
            return self.target
        n, errors = self._count, self._interval_errors
        counts = {c: k for c, k in self._class_counts.items() if k >= MIN_SAMPLES}
        if n and not counts and not errors:
            self.reason = self._target_reason = "holding: too few reads to judge"
            return self.target
        throughput = self._bytes / dt
        mean_in_flight = (self._in_flight_sum / self._in_flight_n if self._in_flight_n
                          else self._busy_s / dt)
        medians = {c: stats_.median(self._by_class[c]) for c in counts}
        busy = waiting > 0 or mean_in_flight >= BUSY_SHARE * self.cap
        prev = self._prev_throughput
        rising = prev is not None and throughput >= RISING * prev
        probed, self._probing = self._probing, False
        backed_off, self._backed_off = self._backed_off, None
        grew, self._grew = self._grew, None
        self._reset_interval(now)

        dominant = max(counts, key=lambda c: counts[c]) if counts else None
        rebased = False
        if backed_off is not None and dominant is not None and not errors:
            # The backoff was the experiment: fewer reads in flight and no lower
            # latency means there was no queue to drain; the store is slower.
            median, in_flight, cls = backed_off
            if (cls == dominant and mean_in_flight <= BUSY_SHARE * in_flight
                    and medians[cls] >= 0.9 * median):
                for c in medians:
                    self._baselines[c] = WindowedMin(self.window_s)
                rebased = True
        if errors:
            self._set(math.floor(self.target * ERROR_DECREASE),
                      f"error backoff: {errors} failed or timed-out read(s)")
            self._hold_until = now + ERROR_HOLD_S
            self.backoffs += 1
        if dominant is None:
            self._last = None
            self._prev_throughput = None
            if not errors:
                self._target_reason = "idle" if n == 0 else "holding: too few reads to judge"
            self.reason = self._target_reason
            return self.target
        figures = self._figures(now, medians, counts, dominant, throughput)
        self._last = figures
        self._prev_throughput = None if probed else throughput
        ratio, excess = figures.ratio, figures.excess_s
        if probed:
            self._refreshed_at[dominant] = now
        if errors:
            pass
        elif rebased:
            self._target_reason = ("holding: baseline re-learned (latency did not fall with "
                                   "fewer reads in flight)")
        elif probed:
            self._target_reason = "holding: baseline probed at half the cap"
        elif (ratio >= BACKOFF_RATIO and excess >= MIN_QUEUE_DELAY_S and mean_in_flight >= 2
              and not rising):
            factor = max(MAX_DECREASE, NEAR_RATIO / ratio)
            self._set(min(self.target - 1, math.floor(self.target * factor)),
                      f"backing off: latency {ratio:.1f}x baseline at flat throughput")
            self.backoffs += 1
            self._backed_off = (medians[dominant], mean_in_flight, dominant)
        elif now < self._hold_until:
            self._target_reason = "holding: after an error backoff"
        elif grew is not None and busy and throughput < RISING * grew[1]:
            # Busy at the higher cap and no more bytes: the limit is not the
            # store's concurrency (a fast store, a busy host); give it back.
            self._set(grew[0], NO_GAIN)
            self._no_gain_until = now + self.window_s
        elif not busy:
            self._target_reason = (f"holding: latency {_ratio_words(ratio)}, "
                                   "demand below the cap")
        elif self.target >= 2 and now - self._refreshed_at[dominant] >= PROBE_AFTER_S:
            self._probing = True
            self._target_reason = "probing: the baseline at half the cap"
        elif now < self._no_gain_until:
            self._target_reason = NO_GAIN
        elif ratio < GROW_RATIO:
            self._grow(max(1, math.ceil(self.target * (GROW_FACTOR - 1))),
                       "growing: latency at baseline", throughput)
        elif rising:
            self._grow(1, "growing: throughput rising", throughput)
        elif ratio < NEAR_RATIO:
            self._grow(1, f"growing: latency near baseline ({ratio:.1f}x)", throughput)
        else:
            self._target_reason = f"holding: latency {ratio:.1f}x baseline, throughput flat"
        self.reason = self._target_reason
        return self.target

    def _figures(self, now: float, medians: dict[int, float], counts: dict[int, int],
                 dominant: int, throughput: float) -> _Interval:
        """Medians per size class against their baselines (which take this
        interval's medians in first: a ratio is never below 1)."""
        weights = ratios = excess = 0.0
        for cls, median in medians.items():
            window = self._baselines.get(cls)
            if window is None:
                window = self._baselines[cls] = WindowedMin(self.window_s)
            before = window.get(now)
            if before is None or median <= REFRESH_RATIO * before:
                self._refreshed_at[cls] = now
            window.add(now, median)
            baseline = window.get(now) or median
            weights += counts[cls]
            ratios += counts[cls] * (median / baseline if baseline > 0 else 1.0)
            excess += counts[cls] * (median - baseline)
        return _Interval(ratios / weights, excess / weights, medians[dominant],
                         self._baselines[dominant].get(now), throughput)

    def _set(self, target: int, reason: str) -> None:
        self.target = max(1, min(self.ceiling, target))
        self._target_reason = reason

    def _grow(self, step: int, reason: str, throughput: float) -> None:
        if self.target >= self.ceiling:
            self._target_reason = f"holding: at the ceiling ({self.ceiling})"
        else:
            self._grew = (self.target, throughput)
            self._set(self.target + step, reason)

    def limit(self, level_cap: int, level: str) -> int:
        """The cap in force: the target, or *level_cap* (the pressure level
        *level*'s) if lower. Returns it and remembers it."""
        own = max(1, self.target // 2) if self._probing else self.target
        self.cap = max(1, min(own, level_cap))
        self.reason = (f"capped by pressure level {level}" if level_cap < own
                       else self._target_reason)
        return self.cap

    # -- outputs ----------------------------------------------------------------------

    def degradation(self) -> tuple[float | None, float | None]:
        """(median latency ratio to baseline, queueing seconds per read) of the
        last interval judged, (None, None) when idle."""
        if self._last is None:
            return None, None
        return self._last.ratio, self._last.excess_s

    def baseline(self, size: int, now: float) -> float | None:
        """The baseline latency of reads of *size* bytes (None: none in the window)."""
        window = self._baselines.get(size_class(size))
        return None if window is None else window.get(now)

    def statistics(self) -> CongestionStats:
        """A snapshot of what the controller knows and why the cap is where it is."""
        last = self._last
        return CongestionStats(
            name=self.name, baseline_latency_s=last.baseline_s if last else None,
            latency_s=last.latency_s if last else None, latency_ratio=last.ratio if last else None,
            throughput_bps=last.throughput_bps if last else 0.0, target=self.target,
            cap=self.cap, ceiling=self.ceiling, reason=self.reason,
            in_flight_reads=self.in_flight_reads, in_flight_bytes=self.in_flight_bytes,
            errors=self.errors, backoffs=self.backoffs)


@dataclasses.dataclass(frozen=True)
class _Interval:
    """The figures of one judged interval."""

    ratio: float
    excess_s: float
    latency_s: float
    baseline_s: float | None
    throughput_bps: float


def _ratio_words(ratio: float) -> str:
    return "at baseline" if ratio < GROW_RATIO else f"{ratio:.1f}x baseline"
