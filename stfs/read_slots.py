"""Read slots: the cap on concurrent backing reads, kept full by worker threads.

``trio.to_thread`` hands each read to a thread and its result back: between
one read's end and the next read's start a slot waits for the event loop
twice (the result in, the next read out), on a busy loop a good part of a
millisecond. Here worker threads take queued reads themselves: a thread
whose read ends starts the next queued one at once, and only the result
goes back to the loop. On a store answering in 5 ms that gap was most of
the difference between a cap of 10 and 10 reads in flight.

* Queued reads start in order, demand reads before read-ahead; read-ahead
  runs in at most its share of the cap (``speculative_cap``), so demand
  reads find room. A read-ahead a reader is waiting for can be promoted to
  a demand read while it is still queued.
* A job may give its slot back before it ends (``release``): the fstat that
  labels a read's bytes with the file's version is no read of bytes, and on
  a network store it is a round trip of its own.
* A read still queued when its task is cancelled never runs; one already
  running is waited for (its buffer is being written), as
  ``trio.to_thread.run_sync`` waits.
"""

from __future__ import annotations

import collections
import functools
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import outcome
import trio

T = TypeVar("T")
IDLE_EXIT_S = 10.0
"""A worker thread with nothing to do for this long exits (another starts on demand)."""

Release = Callable[[], None]
"""Gives a running job's slot back before the job ends (idempotent)."""


class _Job(Generic[T]):
    __slots__ = ("dropped", "fn", "released", "size", "speculative", "started", "task", "token")

    def __init__(self, fn: Callable[[Release], T], speculative: bool, size: int) -> None:
        self.fn = fn
        self.speculative = speculative
        self.size = size
        self.task = trio.lowlevel.current_task()
        self.token = trio.lowlevel.current_trio_token()
        self.started = False
        self.dropped = False
        """Cancelled while queued: out of the queue for good."""
        self.released = False


class ReadSlots:
    """At most ``cap`` blocking reads at once (``speculative_cap`` of them
    read-ahead), run by worker threads that each take the next queued read."""

    def __init__(self, cap: int, speculative_cap: int) -> None:
        self.cap = cap
        self.speculative_cap = speculative_cap
        self._cond = threading.Condition(threading.Lock())
        self._demand: collections.deque[_Job[Any]] = collections.deque()
        self._speculative: collections.deque[_Job[Any]] = collections.deque()
        self._running = 0
        """Jobs holding a slot."""
        self._running_bytes = 0
        """The sizes of those jobs, summed."""
        self._running_speculative = 0
        self._finishing = 0
        """Jobs that gave their slot back and still run."""
        self._threads = 0

    @property
    def running(self) -> int:
        """Reads holding a slot now."""
        return self._running

    @property
    def running_bytes(self) -> int:
        """Bytes of the reads holding a slot now (as given to ``run``)."""
        return self._running_bytes

    @property
    def threads(self) -> int:
        """Worker threads alive now (idle ones exit after ``IDLE_EXIT_S``)."""
        return self._threads

    def waiting(self) -> int:
        """Reads queued for a slot now."""
        return len(self._demand) + len(self._speculative)

    def set_cap(self, cap: int, speculative_cap: int) -> None:
        """Allow *cap* reads at once (*speculative_cap* of them read-ahead).
        Reads running over a lower cap finish; no new one starts until below it."""
        with self._cond:
            self.cap, self.speculative_cap = cap, speculative_cap
            self._spawn_locked()
            self._cond.notify_all()

    async def run(self, fn: Callable[[Release], T], *, speculative: bool = False,
                  size: int = 0,
                  on_queued: Callable[[Callable[[], None]], None] | None = None) -> T:
        """Run blocking *fn(release)* in a slot (queued until one is free) and
        return its result. *size*: the bytes it reads, for ``running_bytes``.
        *on_queued(promote)* runs once it is queued (reads of its class queued
        after it start after it); ``promote()`` makes a read-ahead still queued
        a demand read: a reader is waiting for it."""
        await trio.lowlevel.checkpoint_if_cancelled()
        job: _Job[T] = _Job(fn, speculative, size)
        with self._cond:
            queue = self._speculative if speculative else self._demand
            queue.append(job)
            try:
                self._spawn_locked()
            except BaseException:  # no thread to be had: this read never runs
                queue.remove(job)
                raise
            self._cond.notify()
        if on_queued is not None:
            on_queued(functools.partial(self._promote, job))

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            with self._cond:
                if job.started:
                    return trio.lowlevel.Abort.FAILED  # its buffer is being written: wait
                (self._speculative if job.speculative else self._demand).remove(job)
                job.dropped = True
            return trio.lowlevel.Abort.SUCCEEDED

        result: T = await trio.lowlevel.wait_task_rescheduled(abort)  # the outcome, unwrapped
        return result

    def _promote(self, job: _Job[Any]) -> None:
        with self._cond:
            if job.started or job.dropped or not job.speculative:
                return
            self._speculative.remove(job)
            job.speculative = False
            self._demand.append(job)
            self._spawn_locked()
            self._cond.notify()

    # -- worker threads (what follows runs outside the event loop) ----------------

    def _next_locked(self) -> _Job[Any] | None:
        if self._running >= self.cap:
            return None
        if self._demand:
            return self._demand.popleft()
        if self._speculative and self._running_speculative < self.speculative_cap:
            return self._speculative.popleft()
        return None

    def _spawn_locked(self) -> None:
        """A thread for each read that may start now and no free thread will take."""
        runnable = min(self.cap - self._running, len(self._demand) + min(
            len(self._speculative), max(0, self.speculative_cap - self._running_speculative)))
        free = self._threads - self._running - self._finishing  # waiting, or about to look
        for _ in range(runnable - free):
            # Counted once started: a thread that cannot start must not count.
            threading.Thread(target=self._work, name="stfs-read", daemon=True).start()
            self._threads += 1

    def _release(self, job: _Job[Any]) -> None:
        with self._cond:
            if job.released:
                return
            job.released = True
            self._running -= 1
            self._running_bytes -= job.size
            self._running_speculative -= job.speculative
            self._finishing += 1
            self._spawn_locked()
            self._cond.notify()

    def _work(self) -> None:
        cond = self._cond
        while True:
            with cond:
                job = self._next_locked()
                while job is None:
                    woken = cond.wait(IDLE_EXIT_S)
                    job = self._next_locked()
                    if job is None and not woken:
                        self._threads -= 1
                        return
                job.started = True
                self._running += 1
                self._running_bytes += job.size
                self._running_speculative += job.speculative
            result = outcome.capture(job.fn, functools.partial(self._release, job))
            with cond:
                if job.released:
                    self._finishing -= 1
                else:
                    self._running -= 1
                    self._running_bytes -= job.size
                    self._running_speculative -= job.speculative
            # This thread takes the next read itself, right after handing this one back.
            job.token.run_sync_soon(trio.lowlevel.reschedule, job.task, result)
            del job, result  # a job holds its read's buffer
