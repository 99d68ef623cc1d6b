"""``stfs stats``: ask a running daemon for its figures and print them.

Views: a grouped table (default), ``--json`` (the daemon's object as is),
``--prometheus`` (text exposition, see ``stfs.prometheus``) and ``--watch
SECONDS``: the table's live cousin, redrawn in place until Ctrl-C, or with
``--json`` one object per line (JSON Lines) every SECONDS.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from stfs import control, prometheus
from stfs.config import human_bytes
from stfs.errors import StfsError
from stfs.mountinfo import FSTYPE, mount_at, resolve

CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen
HIDE_CURSOR = "\x1b[?25l"
SHOW_CURSOR = "\x1b[?25h"
BUSIEST = 5


def _dict(value: object) -> dict[str, Any]:
    """*value* if it is a JSON object, else an empty one (an older daemon's stats)."""
    return value if isinstance(value, dict) else {}


def stats_command(mountpoint: str, as_json: bool = False, as_prometheus: bool = False,
                  watch: float | None = None) -> int:
    path = resolve(mountpoint)
    entry = mount_at(path)
    if entry is None or entry.fstype != FSTYPE:
        if not os.path.exists(path):
            raise StfsError(f"{mountpoint}: no such file or directory")
        raise StfsError(f"{mountpoint}: not a live stfs mount")
    if watch is not None:
        view = watch_json if as_json else watch_view
        return view(lambda: control.request_stats(path), watch, sys.stdout)
    stats = control.request_stats(path)
    if as_json:
        print(json.dumps(stats, indent=None, sort_keys=False))
    elif as_prometheus:
        sys.stdout.write(prometheus.render(stats))
    else:
        sys.stdout.write(render_table(stats))
    return 0


# -- formatting ------------------------------------------------------------------


def human_rate(value: float) -> str:
    return f"{human_bytes(value)}/s"


def human_duration(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    seconds = float(value)
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    return f"{minutes}m {secs}s"


def _pct(part: Any, whole: Any) -> str:
    if not isinstance(part, (int, float)) or not isinstance(whole, (int, float)) or whole <= 0:
        return "-"
    return f"{100.0 * part / whole:.1f} %"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else (
        "-" if value is None else str(value))


def _section(title: str, rows: list[tuple[str, str]]) -> list[str]:
    width = max(len(label) for label, _ in rows)
    return [title, *(f"  {label:<{width}}  {value}" for label, value in rows), ""]


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        first = f"{row[0]:<{widths[0]}}"
        rest = [f"{cell:>{widths[i + 1]}}" for i, cell in enumerate(row[1:])]
        return (indent + "  ".join([first, *rest])).rstrip()

    return [line(header), *(line(row) for row in rows)]


def _shorten(path: str, width: int) -> str:
    return path if len(path) <= width else "..." + path[-(width - 3):]


def _handle_rows(handles: list[dict[str, Any]], path_width: int,
                 extra: Callable[[dict[str, Any]], str] | None = None) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for h in handles:
        chunk = h.get("chunk_size")
        ahead = h.get("readahead_chunks")
        if isinstance(chunk, int) and isinstance(ahead, int):
            window = f"{ahead} x {human_bytes(chunk)}" if ahead else "0"
        else:
            window = "-"
        row = (_shorten(str(h.get("path", "?")), path_width), human_bytes(h.get("bytes_read")),
               human_bytes(chunk) if chunk is not None else "-", window,
               human_duration(h.get("age_s")))
        rows.append((*row, extra(h)) if extra else row)
    return rows


HANDLE_HEADER = ("PATH", "READ", "CHUNK", "READ-AHEAD", "AGE")


def render_table(stats: dict[str, Any]) -> str:
    """The default, human-readable view of a stats snapshot."""
    s = stats
    latency = s.get("chunk_latency_ms") if isinstance(s.get("chunk_latency_ms"), dict) else {}
    assert isinstance(latency, dict)
    hist = s.get("read_latency_seconds") if isinstance(s.get("read_latency_seconds"), dict) else {}
    assert isinstance(hist, dict)
    mean_ms = (1000 * hist["sum"] / hist["count"]) if hist.get("count") else None
    lines = [(f"stfs {s.get('mountpoint', '?')}  (source {s.get('source', '?')}, "
             f"pid {s.get('pid', '?')}, up {human_duration(s.get('uptime_s'))})"), ""]
    lines += _section("Traffic", [
        ("bytes served", human_bytes(s.get("bytes_served"))),
        ("reads", _count(s.get("reads"))),
        ("active reads", _count(s.get("active_reads"))),
        ("read latency mean", f"{mean_ms:.2f} ms" if mean_ms is not None else "-"),
        ("chunk latency p50/p95/p99", " / ".join(
            f"{latency.get(q, 0.0):.2f}" for q in ("p50", "p95", "p99")) + " ms"),
        ("kernel request size", human_bytes(s.get("kernel_request_bytes"))),
    ])
    ratio = s.get("cache_hit_ratio")
    lines += _section("Cache", [
        ("used / limit", (f"{human_bytes(s.get('cache_bytes'))} / "
                         f"{human_bytes(s.get('cache_limit_bytes'))} "
                         f"({_count(s.get('cache_entries'))} chunks)")),
        ("hits / misses", f"{_count(s.get('cache_hits'))} / {_count(s.get('cache_misses'))}"),
        ("hit ratio", f"{100 * ratio:.1f} %" if isinstance(ratio, (int, float)) else "-"),
    ])
    lines += _disk_cache_section(s)
    cgroup = s.get("cgroup_memory_limit_bytes")
    lines += _section("Memory / pressure", [
        ("held / limit", (f"{human_bytes(s.get('held_bytes'))} / "
                         f"{human_bytes(s.get('memory_limit_bytes'))} "
                         f"({_pct(s.get('held_bytes'), s.get('memory_limit_bytes'))})")),
        ("peak held", human_bytes(s.get("peak_held_bytes"))),
        ("memory use", f"{s.get('memory_use_pct', '-')} %"),
        ("pressure level", (f"{s.get('pressure_level', '-')} (score {s.get('pressure_score', '-')},"
                           f" {_count(s.get('pressure_level_changes'))} changes)")),
        ("concurrency cap", _count(s.get("concurrency_cap"))),
        ("RSS", (f"{human_bytes(s.get('rss_bytes'))} ({s.get('memory_trend', '-')}, "
                f"{human_rate(s.get('rss_growth_bytes_per_s', 0))})")),
        ("cgroup limit", human_bytes(cgroup) if cgroup is not None else "none"),
    ])
    lines += _section("Backing reads", [
        ("backing reads", _count(s.get("backing_reads"))),
        ("inline reads", _count(s.get("inline_reads"))),
        ("read-ahead chunks", (f"{_count(s.get('readahead_chunks'))} "
                              f"({_count(s.get('readahead_refused'))} refused)")),
        ("read-around pushes", (f"{_count(s.get('read_around_pushes'))} "
                               f"({human_bytes(s.get('read_around_bytes'))})")),
        ("errors", _count(s.get("errors"))),
    ])
    lines += _store_section(_dict(s.get("concurrency")))
    lines += _section("Recovery", [
        ("retries / recoveries", (f"{_count(s.get('retries'))} / "
                                       f"{_count(s.get('recoveries'))}")),
        ("interrupted streams", (f"{_count(s.get('interrupted_streams'))} "
                                 f"({_count(s.get('recovered_streams'))} recovered, "
                                 f"{_count(s.get('failed_streams'))} failed)")),
        ("changed while read", _count(s.get("changed_files"))),
        ("checksums / corruptions", (f"{_count(s.get('checksums_computed'))} / "
                                     f"{_count(s.get('corruptions_detected'))}")),
    ])
    handles = [h for h in s.get("handles", []) if isinstance(h, dict)]
    resources = _dict(s.get("resources"))
    fds = _dict(s.get("backing_fds"))
    tracked = _dict(resources.get("tracked"))
    lines += _section("Handles", [
        ("open files / dirs", f"{_count(s.get('open_handles'))} / {_count(s.get('open_dirs'))}"),
        ("known inodes", _count(s.get("known_inodes"))),
        ("open fds", (f"{_count(s.get('open_fds'))} ({_count(fds.get('open'))} backing, "
                      f"limit {_count(fds.get('limit'))}, {_count(fds.get('reopens'))} reopens)")),
        ("tracked resources", ", ".join(f"{k} {_count(v)}" for k, v in tracked.items())
         or "none"),
        ("sweeps", (f"{_count(resources.get('sweeps'))} ({_count(resources.get('swept'))} freed, "
                    f"{_count(resources.get('emergency_cleanups'))} emergencies)")),
    ])[:-1]
    if handles:
        lines += ["", *_table(HANDLE_HEADER, _handle_rows(handles, 48))]
    return "\n".join(lines) + "\n"


def _disk_cache_section(s: dict[str, Any]) -> list[str]:
    """The persistent chunk cache (nothing without ``--cache-dir``)."""
    if not s.get("disk_cache_dir"):
        return []
    return _section(f"Disk cache ({s['disk_cache_dir']})", [
        ("used / size", (f"{human_bytes(s.get('disk_cache_bytes'))} / "
                         f"{human_bytes(s.get('disk_cache_limit_bytes'))} "
                         f"({_count(s.get('disk_cache_entries'))} chunks, index holds "
                         f"{_count(s.get('disk_cache_entry_limit'))})")),
        ("hits / misses", (f"{_count(s.get('disk_cache_hits'))} / "
                           f"{_count(s.get('disk_cache_misses'))} "
                           f"({human_bytes(s.get('disk_cache_hit_bytes'))} read)")),
        ("written", (f"{_count(s.get('disk_cache_writes'))} chunks, "
                     f"{human_bytes(s.get('disk_cache_written_bytes'))} "
                     f"({_count(s.get('disk_cache_writes_missed'))} missed, "
                     f"{_count(s.get('disk_cache_refills'))} refilled, "
                     f"{_count(s.get('disk_cache_write_errors'))} errors)")),
        ("evictions / bad entries", (f"{_count(s.get('disk_cache_evictions'))} / "
                                     f"{_count(s.get('disk_cache_verify_failures'))}")),
    ])


def _store_section(c: dict[str, Any]) -> list[str]:
    """SOURCE's store as the congestion controller sees it (nothing without one)."""
    if not c:
        return []

    def ms(key: str) -> str:
        value = c.get(key)
        return f"{value:.2f} ms" if isinstance(value, (int, float)) else "-"

    ratio = c.get("latency_ratio")
    return _section(f"Store ({c.get('source', '?')})", [
        ("baseline latency", (f"{ms('baseline_latency_ms')} (last interval {ms('latency_ms')}"
                              + (f", {ratio:.2f}x)" if isinstance(ratio, (int, float)) else ")"))),
        ("concurrency", (f"target {_count(c.get('target'))}, cap {_count(c.get('cap'))}, "
                         f"ceiling {_count(c.get('ceiling'))}")),
        ("why", str(c.get("reason", "-"))),
        ("in flight", (f"{_count(c.get('in_flight_reads'))} reads, "
                       f"{human_bytes(c.get('in_flight_bytes'))}")),
        ("throughput", human_rate(c.get("throughput_bps", 0))),
        ("errors / backoffs", f"{_count(c.get('errors'))} / {_count(c.get('backoffs'))}"),
    ])


# -- --watch -----------------------------------------------------------------------


class _Sample:
    def __init__(self, stats: dict[str, Any], at: float) -> None:
        self.stats = stats
        self.at = at

    def number(self, key: str) -> float:
        value = self.stats.get(key)
        return float(value) if isinstance(value, (int, float)) else 0.0

    def handle_bytes(self) -> dict[Any, float]:
        return {h.get("fh"): float(h.get("bytes_read", 0)) for h in self.stats.get("handles", [])
                if isinstance(h, dict)}


def render_watch(now: _Sample, before: _Sample | None, interval: float, columns: int = 100) -> str:
    """One frame of the live view (without the redraw escape)."""
    s = now.stats
    dt = (now.at - before.at) if before else 0.0

    def rate(key: str) -> float | None:
        if before is None or dt <= 0:
            return None
        return max(0.0, now.number(key) - before.number(key)) / dt

    served = rate("bytes_served")
    reads = rate("reads")
    hits, misses = rate("cache_hits"), rate("cache_misses")
    if hits is not None and misses is not None and hits + misses > 0:
        hit_now = f"{100 * hits / (hits + misses):.1f} %"
    else:
        hit_now = "-"
    ratio = s.get("cache_hit_ratio")
    lines = [
        (f"stfs {s.get('mountpoint', '?')}  every {interval:g}s  up "
        f"{human_duration(s.get('uptime_s'))}  {time.strftime('%H:%M:%S')}  (Ctrl-C to quit)"),
        "",
        (f"  throughput   {human_rate(served) if served is not None else 'measuring':>14}"
        f"    served {human_bytes(s.get('bytes_served'))}"),
        (f"  reads/s      {f'{reads:.1f}' if reads is not None else '-':>14}"
        f"    reads {_count(s.get('reads'))}, active {_count(s.get('active_reads'))}"),
        (f"  hit ratio    {hit_now:>14}"
        f"    overall {f'{100 * ratio:.1f} %' if isinstance(ratio, (int, float)) else '-'}"),
        (f"  pressure     {s.get('pressure_level', '-')!s:>14}"
        f"    cap {_count(s.get('concurrency_cap'))} concurrent backing reads"),
        (f"  held         {human_bytes(s.get('held_bytes')):>14}"
        f"    of {human_bytes(s.get('memory_limit_bytes'))} limit "
        f"({_pct(s.get('held_bytes'), s.get('memory_limit_bytes'))}),"
        f" cache {human_bytes(s.get('cache_bytes'))}"),
        (f"  RSS          {human_bytes(s.get('rss_bytes')):>14}"
        f"    {s.get('memory_trend', '-')}"),
        (f"  errors       {_count(s.get('errors')):>14}"
        f"    retries {_count(s.get('retries'))}, recoveries {_count(s.get('recoveries'))}"),
        "",
    ]
    handles = [h for h in s.get("handles", []) if isinstance(h, dict)]
    if handles:
        previous = before.handle_bytes() if before else {}

        def speed(h: dict[str, Any]) -> float:
            if before is None or dt <= 0 or h.get("fh") not in previous:
                return 0.0
            return max(0.0, float(h.get("bytes_read", 0)) - previous[h.get("fh")]) / dt

        busiest = sorted(handles, key=lambda h: (speed(h), h.get("bytes_read", 0)),
                         reverse=True)[:BUSIEST]
        path_width = max(16, columns - 62)
        lines.append(f"  busiest handles ({len(handles)} open)")
        lines += _table((*HANDLE_HEADER, "RATE"),
                        _handle_rows(busiest, path_width, lambda h: human_rate(speed(h))))
    else:
        lines.append("  no open files")
    return "\n".join(line[:columns] for line in lines) + "\n"


def _ticks(interval: float) -> Iterator[None]:
    """Yield at once, then every *interval* seconds on a fixed schedule, so that the
    time a fetch takes does not add up; a tick missed (a slow daemon) is not made up."""
    due = time.monotonic()
    while True:
        yield
        due += interval
        now = time.monotonic()
        due = max(due, now)
        time.sleep(due - now)


def _fetch_while_watching(fetch: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fetch()
    except StfsError as exc:
        raise StfsError(f"{exc.message} (the mount went away while watching)") from None


def _ctrl_c_stops() -> None:
    """Ctrl-C is how a watch ends, even when SIGINT came ignored from the parent
    (a job started in the background by a shell without job control), as
    ``watch(1)`` does: otherwise nothing but a kill would stop it."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def watch_view(fetch: Callable[[], dict[str, Any]], interval: float, out: TextIO) -> int:
    """Redraw the live view every *interval* seconds until Ctrl-C (exit 0)."""
    _ctrl_c_stops()
    before: _Sample | None = None
    try:
        out.write(HIDE_CURSOR)
        for _ in _ticks(interval):
            try:
                now = _Sample(_fetch_while_watching(fetch), time.monotonic())
            except StfsError:
                out.write("\n")
                out.flush()
                raise
            columns = shutil.get_terminal_size((100, 40)).columns
            out.write(CLEAR + render_watch(now, before, interval, columns))
            out.flush()
            before = now
    except KeyboardInterrupt:
        out.write("\n")
        return 0
    finally:
        try:
            out.write(SHOW_CURSOR)
            out.flush()
        except (OSError, ValueError):
            pass
    return 0  # pragma: no cover - _ticks never ends


def watch_json(fetch: Callable[[], dict[str, Any]], interval: float, out: TextIO) -> int:
    """JSON Lines: the daemon's object on one line every *interval* seconds, each
    flushed as it is written, until Ctrl-C (exit 0). A mount that goes away is a
    StfsError (exit 1)."""
    _ctrl_c_stops()
    try:
        for _ in _ticks(interval):
            line = json.dumps(_fetch_while_watching(fetch)) + "\n"
            # Ctrl-C waits until the line is out: a reader never sees half an object.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                out.write(line)
                out.flush()
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    except KeyboardInterrupt:
        return 0
    return 0  # pragma: no cover - _ticks never ends
