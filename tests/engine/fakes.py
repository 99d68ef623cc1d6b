"""A configurable fake SOURCE reader for engine tests (a ``BackingReader``).

It reads the real files, and can delay each worker-thread read, hold reads
until released, fail reads by call index, flip a bit of what it returns, lie
about verification digests, pretend a file is or is not in the page cache, and
it counts everything. Pass it to ``make_engine(reader=...)``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from stfs import backing
from stfs.backing import ChunkData, FileIdentity, Hasher
from stfs.backing_reads import SourceReader

HOLD_TIMEOUT_S = 30.0
"""A held read goes on after this long anyway: a failing test must not hang."""


class FakeBacking(SourceReader):
    """Real reads with injected delay, holds, failures and corruption.

    * ``delay_s``: each worker-thread read sleeps this long first.
    * ``errnos``: the n-th worker-thread read fails with ``errnos[n]`` (None: it
      reads); ``before(n)`` runs just before such a failure.
    * ``armed`` (or ``hold_before``/``hold_after``): reads wait in their worker
      thread until ``release()``.
    * ``cached``: None reads SOURCE's page cache for real on the event loop;
      False never (every read goes to a worker thread); True always (every
      read is an inline copy). ``local`` overrides the local-device check.
    * ``corrupt(offset, data)`` may alter what a read returns; ``lie_digests``
      makes every verification re-read disagree.
    """

    def __init__(self, *, delay_s: float = 0.0, errnos: Sequence[int | None] = (),
                 before: Callable[[int], None] | None = None, cached: bool | None = False,
                 local: bool | None = None,
                 corrupt: Callable[[int, ChunkData], None] | None = None,
                 lie_digests: bool = False) -> None:
        self.delay_s = delay_s
        self.errnos = list(errnos)
        self.before = before
        self.cached = cached
        self.local = local
        self.corrupt = corrupt
        self.lie_digests = lie_digests
        self.calls: list[tuple[int, int]] = []
        """(offset, size) of every worker-thread read, in order."""
        self.digest_calls: list[tuple[int, int]] = []
        """(start, end) of every verification re-read."""
        self.in_flight = 0
        self.peak = 0
        self.armed = False
        self.hold_before: Callable[[int, int], bool] = lambda offset, index: self.armed
        self.hold_after: Callable[[int, int], bool] = lambda offset, index: False
        self.held = 0
        self._gate = threading.Event()
        self._lock = threading.Lock()

    @property
    def offsets(self) -> list[int]:
        return [offset for offset, _ in self.calls]

    def arm(self) -> None:
        """Hold reads from now on (again, after a ``release()``)."""
        self._gate.clear()
        self.armed = True

    def release(self) -> None:
        """Let every held read go on, and hold no more."""
        self.armed = False
        self._gate.set()

    def _wait(self) -> None:
        with self._lock:
            self.held += 1
        self._gate.wait(HOLD_TIMEOUT_S)

    def pread(self, fd: int, buf: bytearray, offset: int,
              expected: FileIdentity | None = None,
              read_done: Callable[[], None] | None = None) -> tuple[ChunkData, FileIdentity]:
        """In flight (``in_flight``, ``peak``) until the bytes are in: the fstat
        after them runs with the read slot given back."""
        with self._lock:
            index = len(self.calls)
            self.calls.append((offset, len(buf)))
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        landed = False

        def done() -> None:
            nonlocal landed
            if not landed:
                landed = True
                with self._lock:
                    self.in_flight -= 1
            if read_done is not None:
                read_done()

        try:
            if index < len(self.errnos) and self.errnos[index] is not None:
                if self.before is not None:
                    self.before(index)
                raise OSError(self.errnos[index], "injected")
            if self.hold_before(offset, index + 1):
                self._wait()
            if self.delay_s:
                time.sleep(self.delay_s)
            data, identity = super().pread(fd, buf, offset, expected, done)
            if self.corrupt is not None:
                self.corrupt(offset, data)
            if self.hold_after(offset, index + 1):
                self._wait()
            return data, identity
        finally:
            if not landed:
                landed = True
                with self._lock:
                    self.in_flight -= 1

    def pread_if_cached(self, fd: int, buf: bytearray,
                        offset: int) -> tuple[ChunkData, FileIdentity] | None:
        if self.cached is None:
            return super().pread_if_cached(fd, buf, offset)
        return backing.pread_identified(fd, buf, offset) if self.cached else None

    def pread_digest(self, fd: int, scratch: bytearray, start: int, end: int,
                     hasher: Hasher) -> tuple[int, int, FileIdentity]:
        self.digest_calls.append((start, end))
        digest, got, identity = super().pread_digest(fd, scratch, start, end, hasher)
        return (digest ^ 1 if self.lie_digests else digest), got, identity

    def is_local(self, dev: int) -> bool:
        return super().is_local(dev) if self.local is None else self.local


def flip_bit_at(position: int, mask: int = 0x40) -> Callable[[int, Any], None]:
    """A ``corrupt`` hook: flips *mask* in the byte at file *position* when read."""
    def corrupt(offset: int, data: Any) -> None:
        if offset <= position < offset + len(data):
            data[position - offset] ^= mask
    return corrupt
