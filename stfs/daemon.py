"""The daemon: one mount's runtime.

``Daemon.run`` fits the memory budget, builds the read engine, the view and
the FUSE session, and serves them in one trio nursery with the pressure
keeper, the sweep, the control socket, the signal watcher and (optionally)
the metrics listener; whatever is set up is torn down in reverse order on
unmount, signal or error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import resource
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pyfuse3
import trio

from stfs import (
    cgroup,
    control,
    descriptors,
    disk_store,
    kernel,
    memory,
    metrics,
    metrics_http,
    notify,
    pressure,
)
from stfs.backing import Backing, FileIdentity
from stfs.checksums import ChecksumStore
from stfs.config import MountConfig, human_bytes
from stfs.disk_store import DiskStore, StoredEntry
from stfs.engine import EngineConfig, ReadEngine
from stfs.errors import EXIT_OK, StfsError, path_error
from stfs.fs_ops import Operations
from stfs.handles import HandleTable
from stfs.metrics import Counters
from stfs.state import StateStore
from stfs.stats_doc import stats_document
from stfs.versions import RECHECK_S
from stfs.view import View

log = logging.getLogger("stfs")

READY_TIMEOUT_S = 30.0
DISK_FLUSH_TIMEOUT_S = 60.0
"""After unmounting, how long the disk cache may go on writing what is queued."""
NOTIFY_STATUS_INTERVAL_S = 5.0


@contextlib.contextmanager
def _captured_stderr() -> Iterator[Callable[[], str]]:
    """Catch what libfuse prints on fd 2 while mounting, for a one-line error."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)

        def text() -> str:
            capture.seek(0)
            lines = capture.read().decode("utf-8", "replace").strip().splitlines()
            return lines[-1].strip() if lines else ""

        try:
            yield text
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _fuse_options(config: MountConfig, source: str) -> set[str]:
    fsname = (config.fsname or source).replace("\\", "\\\\").replace(",", "\\,")
    options = {"fsname=" + fsname, "subtype=stfs", "ro", "default_permissions"}
    if config.allow_other:
        options.add("allow_other")
    return options


KERNEL_MAX_BACKGROUND = 32
"""Read-ahead requests the kernel keeps in flight (its default is 12). One
event loop answers them in turn, so a deeper queue adds waiting: with 16
readers (``scripts/bench --workloads readers16 --peers``) 64 gave
1200-1300 MB/s at a p95 of 22-24 ms, 32 gave 1000-1060 MB/s at 16-17 ms,
and 16 cut throughput to 570-800 MB/s."""


def kernel_read_ahead_kb(config: MountConfig) -> int:
    """The kernel read-ahead window: the largest chunk, within 128 KiB..1 MiB."""
    return max(128, min(1024, config.max_chunk // 1024))


def _store_pages(nodeid: int, offset: int, data: memoryview) -> None:
    """Put *data* into the kernel's page cache of *nodeid* (blocking: a worker thread)."""
    pyfuse3.notify_store(nodeid, offset, data)  # type: ignore[arg-type]  # any buffer


def _invalidate_pages(nodeid: int) -> None:
    """Drop the kernel's cached pages of *nodeid* (blocking: a worker thread)."""
    pyfuse3.invalidate_inode(nodeid, attr_only=False)


def engine_config(config: MountConfig, nofile_soft: int = 1024) -> EngineConfig:
    return EngineConfig(memory_limit=config.memory_limit, cache_limit=config.cache_limit_bytes,
                        max_streams=config.max_streams, min_chunk=config.min_chunk,
                        max_chunk=config.max_chunk,
                        descriptor_limit=config.max_open_fds or descriptors.default_limit(
                            nofile_soft),
                        retry=config.retry, read_around_bytes=config.read_around,
                        recheck_s=min(RECHECK_S, config.attr_timeout))


class Daemon:
    """One mount's runtime: owns the view, the FUSE session and the control socket."""

    def __init__(self, config: MountConfig, source: str, mountpoint: str) -> None:
        self.config = config
        self.source = source
        self.mountpoint = mountpoint
        self.counters = Counters()
        self.view: View | None = None
        self.engine: ReadEngine
        self.kernel = kernel.KernelTuning()
        self.pressure: pressure.PressureController | None = None
        self.group: cgroup.MemoryGroup | None = None
        self.fit: memory.BudgetFit | None = None
        self.keeper: memory.MemoryKeeper | None = None
        self._live = False
        self.warnings: list[str] = []
        """Warnings of the start (the budget lowered) for the parent's terminal."""
        self.metrics_port: int | None = None
        self.unmount_on_exit = False
        self.disk_store: DiskStore | None = None

    def stats(self) -> dict[str, Any]:
        """The live stats snapshot (SPEC.md's keys; METRICS.md lists them all)."""
        assert self.view is not None
        return stats_document(source=self.source, mountpoint=self.mountpoint, view=self.view,
                              engine=self.engine, pressure=self.pressure, kernel=self.kernel,
                              metrics_port=self.metrics_port, memory=self._memory_stats())

    def _memory_stats(self) -> dict[str, Any]:
        if self.keeper is not None:
            return self.keeper.statistics()
        return {"memory_limit_requested_bytes": self.config.memory_limit,
                "memory_limit_source": self.fit.source if self.fit else "option"}

    def history(self) -> dict[str, Any]:
        """The pressure controller's recent samples (level, cap, RSS over time)."""
        samples = list(self.pressure.history) if self.pressure else []
        started = self.counters.started_at
        return {"pressure": [
            {"t": round(s.at - started, 3), "level": s.level.label, "score": s.score,
             "memory_use_pct": round(s.memory_use_pct, 1), "cap": s.cap,
             "rss_bytes": s.rss_bytes} for s in samples]}

    def run(self, on_ready: Callable[[], None]) -> int:
        """Mount, serve until unmounted or signalled, clean up. Returns the exit status."""
        try:
            backing = Backing(self.source)
        except OSError as exc:
            raise path_error(self.source, exc) from None
        nofile = descriptors.raise_nofile_limit()
        fit = self._fit_budget()
        self.disk_store, disk_bytes, disk_entries = self._open_disk_cache()
        self.checksums = ChecksumStore(self.config.state_dir)
        self.checksums.open()
        handles = HandleTable()
        self.engine = ReadEngine(dataclasses.replace(engine_config(self.config, nofile),
                                                     memory_limit=fit.limit,
                                                     cache_limit=fit.cache_limit),
                                 self.counters,
                                 opener=backing.open_file, checksums=self.checksums,
                                 kernel_store=_store_pages,
                                 kernel_invalidate=_invalidate_pages,
                                 handles_of=handles.files_of_node, store_name=self.source,
                                 disk_store=self.disk_store, disk_cache_bytes=disk_bytes,
                                 disk_entries=disk_entries)
        state_store = StateStore(self.config.state_dir)
        learned = state_store.throughputs(backing.root_stat.st_dev)
        if learned:
            self.engine.reads.tracker.seed(learned)
            log.info("starting from %d throughput samples learned in earlier mounts", len(learned))
        self.view = View(backing, self.engine, handles)
        ops = Operations(self.view, self.config.attr_timeout, self.config.entry_timeout)
        try:
            with _captured_stderr() as libfuse_said:
                try:
                    pyfuse3.init(ops, self.mountpoint, _fuse_options(self.config, self.source))
                except RuntimeError:
                    cause = libfuse_said() or "the kernel refused the mount"
                    raise StfsError(f"{self.mountpoint}: mount failed: {cause}") from None
            try:
                trio.run(self._serve, on_ready)
            except BaseExceptionGroup as group:  # a nursery's: surface an expected error as is
                expected = group.subgroup(StfsError)
                if expected is not None:
                    self.unmount_on_exit = True
                    raise expected.exceptions[0] from None
                raise
            finally:
                pyfuse3.close(unmount=self.unmount_on_exit)
                state_store.save_throughputs(backing.root_stat.st_dev,
                                             self.engine.reads.tracker.throughputs())
                log.info("unmounted %s", self.summary())
        finally:
            self.view.close()
            self.checksums.close()
            if self.disk_store is not None:
                self.disk_store.close()
        return EXIT_OK

    def _open_disk_cache(self) -> tuple[DiskStore | None, int, list[StoredEntry]]:
        """``--cache-dir``: checked, locked, scanned (before the mount, so the
        first reads already find what earlier mounts left)."""
        cache_dir = self.config.cache_dir
        if cache_dir is None:
            return None, 0, []
        size = disk_store.check_cache_dir(cache_dir, self.config.cache_size,
                                          self.config.disk_cache_min_bytes)
        store = DiskStore.open(cache_dir)
        reading = self.group.read() if self.group is not None else None
        store.start_writeback = reading is not None and reading.limit_bytes is not None
        try:
            entries = store.scan()
        except OSError as exc:
            store.close()
            raise StfsError(f"--cache-dir {cache_dir}: {exc}") from None
        log.info("disk cache %s: %d entries, %s, size %s", cache_dir, len(entries),
                 human_bytes(sum(e.disk_bytes for e in entries)), human_bytes(size))
        return store, size, entries

    def _fit_budget(self) -> memory.BudgetFit:
        """The budget in use: ``--memory-limit``, or what the memory cgroup leaves
        (``memory.fit_budget``); a group too small to serve fails the mount."""
        self.group = cgroup.find_memory_group()
        reading = self.group.read() if self.group is not None else None
        own = memory.own_anon_bytes()
        fit = memory.fit_budget(self.config.memory_limit, self.config.cache_limit_bytes,
                                memory.min_budget(self.config.max_chunk), reading, own,
                                own + memory.STARTUP_BYTES)
        if fit.too_small:
            raise StfsError(f"{self.mountpoint}: the memory cgroup is too small to serve: "
                            f"{fit.why()}, and stfs needs at least {human_bytes(fit.floor)}")
        if fit.lowered:
            message = (f"--memory-limit {human_bytes(fit.requested)} lowered to "
                       f"{human_bytes(fit.limit)} to fit the memory cgroup: {fit.why()}")
            log.warning("%s", message)
            self.warnings.append(message)
        self.fit = fit
        return fit

    def summary(self) -> str:
        """The unmount log line's figures."""
        c = self.counters
        ratio = c.cache_hits / max(1, c.cache_hits + c.cache_misses)
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        peak_held = self.engine.budget.peak_held_bytes if hasattr(self, "engine") else 0
        return (f"{self.mountpoint}: {c.bytes_served} bytes served in {c.reads} reads, "
                f"cache hit ratio {ratio:.1%}, peak RSS {peak_rss} bytes, "
                f"peak held {peak_held} bytes, {c.retries} retries, {c.recoveries} recoveries, "
                f"{c.errors} errors, up {c.uptime_s():.0f} s")

    def status_line(self) -> str:
        """A short stats line for systemd's STATUS=."""
        c = self.counters
        handles = self.view.handles.open_files if self.view else 0
        return (f"served {human_bytes(c.bytes_served)}, {c.reads} reads, "
                f"pressure {self.engine.level.label}, {handles} open")

    async def _notify_status(self) -> None:
        """STATUS= every few seconds: 5 monitor intervals, within 1..5 s."""
        interval = min(NOTIFY_STATUS_INTERVAL_S, max(1.0, 5 * self.config.monitor_interval))
        while True:
            await trio.sleep(interval)
            notify.status(self.status_line())

    async def _serve(self, on_ready: Callable[[], None]) -> None:
        try:
            await self._serve_until_unmounted(on_ready)
        finally:
            with trio.CancelScope(shield=True):
                assert self.view is not None
                await self.view.release_all()

    async def _sweep(self) -> None:
        """Free orphaned and idle resources every ``--sweep-interval``."""
        assert self.view is not None
        interval = self.config.sweep_interval
        while True:
            await trio.sleep(interval)
            freed = await self.view.sweep(idle_s=interval)
            if freed:
                log.info("sweep freed %d idle or orphaned resources", freed)

    async def _serve_until_unmounted(self, on_ready: Callable[[], None]) -> None:
        async with trio.open_nursery() as nursery:

            async def fuse_main() -> None:
                await pyfuse3.main()
                notify.stopping(f"unmounted: {self.status_line()}")
                await self.engine.flush(DISK_FLUSH_TIMEOUT_S)
                nursery.cancel_scope.cancel()

            await nursery.start(self.engine.run)
            nursery.start_soon(self._control_pressure)
            nursery.start_soon(self._sweep)
            if self.config.metrics_listen is not None:
                host, port = self.config.metrics_listen
                try:
                    self.metrics_port = await nursery.start(metrics_http.serve, host, port,
                                                            self.stats)
                except OSError as exc:
                    raise StfsError(f"--metrics-listen {host}:{port}: "
                                    f"{os.strerror(exc.errno or 0).lower()}") from None
            nursery.start_soon(fuse_main)
            nursery.start_soon(self._watch_signals)
            await nursery.start(control.serve, control.socket_path(self.mountpoint),
                                {"stats": self.stats, "history": self.history})
            # A statfs through our own handlers proves the mount answers.
            with trio.fail_after(READY_TIMEOUT_S):
                await trio.to_thread.run_sync(os.statvfs, self.mountpoint, abandon_on_cancel=True)
            self._live = True
            await self._tune_kernel(self.keeper.fit if self.keeper else self.fit)
            log.info("mounted %s on %s (memory limit %d bytes)", self.source, self.mountpoint,
                     self.engine.budget.limit_bytes)
            on_ready()
            if notify.enabled():
                notify.ready(self.status_line())
                nursery.start_soon(self._notify_status)

    async def _tune_kernel(self, fit: memory.BudgetFit | None) -> None:
        """Read-ahead window and background requests for the mount (once live)."""
        read_ahead_kb, background = kernel_read_ahead_kb(self.config), KERNEL_MAX_BACKGROUND
        if fit is not None:
            read_ahead_kb, background = memory.kernel_requests(fit, read_ahead_kb, background)
        if self._live and (read_ahead_kb, background) != (self.kernel.read_ahead_kb,
                                                          self.kernel.max_background):
            self.kernel = await trio.to_thread.run_sync(kernel.tune, self.mountpoint,
                                                        read_ahead_kb, background)

    async def _control_pressure(self) -> None:
        """Steer the engine by memory pressure (``memory.MemoryKeeper``): once per
        ``--monitor-interval`` and on the memory cgroup's notifications."""
        assert self.fit is not None
        idle_rss, idle_anon = metrics.rss_bytes(), memory.own_anon_bytes()
        monitor = pressure.MemoryMonitor(group=self.group)
        self.pressure = pressure.PressureController(self.engine, monitor, idle_rss)
        self.keeper = memory.MemoryKeeper(
            self.engine, self.pressure, self.group, self.fit, idle_anon,
            self.config.monitor_interval, self._source_spans,
            lambda: self.engine.read_around.pause(True), self._tune_kernel)
        self.engine.trimmer.needed = self.keeper.heap_over_slack
        log.debug("idle: RSS %d bytes, %d anonymous (%d estimated at the budget fit)",
                  idle_rss, idle_anon, self.fit.idle)
        await self.keeper.refit(monitor.read_group(), idle_anon, initial=True)  # idle measured now
        await self.keeper.run()

    def _source_spans(self) -> Iterator[tuple[FileIdentity, int, int, int]]:
        """SOURCE bytes the chunk cache holds, with a descriptor of their file."""
        assert self.view is not None
        fds: dict[FileIdentity, int] = {}
        for handle in self.view.handles.files():
            if handle.fd >= 0 and not handle.released:
                fds.setdefault(handle.identity, handle.fd)
        for identity, start, length in self.engine.cache.spans():
            fd = fds.get(identity)
            if fd is not None:
                yield identity, start, length, fd

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("%s received: unmounting %s", signal.Signals(signum).name, self.mountpoint)
                notify.stopping(f"unmounting on {signal.Signals(signum).name}")
                self.unmount_on_exit = True
                pyfuse3.terminate()
                return
