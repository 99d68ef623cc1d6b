"""Backing descriptors of open handles, bounded: an LRU with lazy reopen.

Ten thousand open files must not exhaust the daemon's descriptors. At most
``limit`` backing descriptors stay open; the least recently used one of an
idle handle is closed when another is needed, and reopened on the handle's
next read, through SOURCE's directory descriptor like any open, and only if
it is still the same file (device and inode; a changed size or time is the
engine's business). A descriptor in use by a backing read is pinned and never
closed under it; a handle released during a read has its descriptor closed
when the read lets go of it.

The cost of closing: a file renamed or removed in SOURCE while its handle sat
idle cannot be reopened, and its next read fails with EIO (as documented in
SEMANTICS.md). ``limit`` defaults high enough that only hosts with thousands
of open files ever see this.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import logging
import os
import resource
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from stfs.handles import OpenFile

T = TypeVar("T")

log = logging.getLogger(__name__)

Opener = Callable[[bytes], tuple[int, os.stat_result]]
DEFAULT_LIMIT = 8192
RESERVED_FDS = 256
"""Descriptors kept for everything else (sockets, the state store, threads)."""


class FileReplacedError(OSError):
    """The name now holds another file: the handle's file cannot be reached (EIO).
    Never worth a retry."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d: %s", soft, exc)
    return soft


def default_limit(nofile_soft: int) -> int:
    """Backing descriptors to keep open under a soft RLIMIT_NOFILE."""
    return max(16, min(DEFAULT_LIMIT, nofile_soft - RESERVED_FDS))


class DescriptorTable:
    """The open backing descriptors, least recently used first."""

    def __init__(self, limit: int, opener: Opener | None,
                 limiter: trio.CapacityLimiter | None = None) -> None:
        self.limit = max(1, limit)
        self._opener = opener
        self._limiter = limiter
        self._lru: collections.OrderedDict[int, OpenFile] = collections.OrderedDict()
        self._pins: collections.Counter[int] = collections.Counter()
        self._released: dict[int, OpenFile] = {}
        self._reopening: dict[int, trio.Event] = {}
        self._retired: dict[int, list[int]] = {}
        """Replaced descriptors still used by a read in flight: closed at unpin."""
        self.reopens = 0
        self.closed_idle = 0

    @property
    def open_count(self) -> int:
        return (len(self._lru) + len(self._released)
                + sum(len(fds) for fds in self._retired.values()))

    def track(self, handle: OpenFile) -> None:
        """A handle with a fresh descriptor (from open or reopen) joins the LRU."""
        if handle.fd >= 0:
            self._lru[handle.fh] = handle
            self._lru.move_to_end(handle.fh)

    def fd_now(self, handle: OpenFile) -> int:
        """The handle's descriptor if open (-1 if closed); marks it recently used.
        For synchronous use on the event loop, where nothing can close it meanwhile."""
        if handle.fd >= 0:
            if handle.fh in self._lru:
                self._lru.move_to_end(handle.fh)
            else:
                self.track(handle)
        return handle.fd

    async def pin(self, handle: OpenFile) -> int:
        """The handle's descriptor, reopened if it was closed; stays open until
        ``unpin``. Raises EIO when the path now holds another file."""
        if handle.released:
            raise OSError(errno.EBADF, "handle already released")
        self._pins[handle.fh] += 1
        try:
            if self.fd_now(handle) < 0:
                await self._reopen(handle)
            await self.trim()
        except BaseException:
            self.unpin(handle)
            raise
        return handle.fd

    def unpin(self, handle: OpenFile) -> None:
        self._pins[handle.fh] -= 1
        if self._pins[handle.fh] <= 0:
            del self._pins[handle.fh]
            for fd in self._retired.pop(handle.fh, ()):
                _close_quietly(fd)
            released = self._released.pop(handle.fh, None)
            if released is not None:
                self._close_fd(released)  # released while a read used it: close now

    async def reopen(self, handle: OpenFile) -> int:
        """Give the handle a fresh descriptor (after ESTALE/EBADF).

        The new one is opened first and must reach the same file (device and
        inode); only then is the old one retired, closed once no backing read
        uses it (a descriptor is never closed under a read in flight, whose
        number could meanwhile be given to another file). When the name now
        holds another file, the old descriptor stays, since it may still read
        the handle's file, and ``FileReplacedError`` is raised.
        """
        await self._reopen(handle, replacing=handle.fd)
        return handle.fd

    async def _reopen(self, handle: OpenFile, replacing: int = -1) -> None:
        """Open the handle's file again; concurrent callers share one reopen."""
        while (busy := self._reopening.get(handle.fh)) is not None:
            await busy.wait()
            if handle.fd >= 0 and handle.fd != replacing:
                return
        done = self._reopening[handle.fh] = trio.Event()
        try:
            await self._open_again(handle)
        finally:
            del self._reopening[handle.fh]
            done.set()

    async def _open_again(self, handle: OpenFile) -> None:
        if self._opener is None:
            raise OSError(errno.EBADF, "descriptor closed and no way to reopen it")
        fd, st = await self._run(self._opener, handle.path)
        identity = handle.identity
        if (st.st_dev, st.st_ino) != (identity.dev, identity.ino):
            await self._run(_close_quietly, fd)
            log.warning("%s: cannot reopen, the name now holds another file (was inode %d, "
                        "now %d)", os.fsdecode(handle.path), identity.ino, st.st_ino)
            raise FileReplacedError("file replaced while its descriptor was closed")
        if handle.released:  # released meanwhile: nothing will read or close this one
            await self._run(_close_quietly, fd)
            raise OSError(errno.EBADF, "handle released")
        old, handle.fd = handle.fd, fd
        if old >= 0:
            self._retire(handle, old)
        self.reopens += 1
        self.track(handle)

    def _retire(self, handle: OpenFile, fd: int) -> None:
        if self._pins.get(handle.fh):
            self._retired.setdefault(handle.fh, []).append(fd)
        else:
            _close_quietly(fd)

    def over_limit(self) -> bool:
        return len(self._lru) > self.limit

    async def trim(self) -> None:
        """Close least recently used descriptors of idle handles down to the limit."""
        victims: list[int] = []
        if len(self._lru) > self.limit:
            for fh, handle in list(self._lru.items()):
                if len(self._lru) <= self.limit:
                    break
                if self._pins.get(fh):
                    continue
                del self._lru[fh]
                victims.append(handle.fd)
                handle.fd = -1
        for fd in victims:
            self.closed_idle += 1
            await self._run(_close_quietly, fd)

    async def close(self, handle: OpenFile) -> None:
        """The handle is released: close its descriptor (at once, or when the
        last backing read using it ends); it is never reopened."""
        handle.released = True
        self._lru.pop(handle.fh, None)
        if handle.fd < 0:
            return
        if self._pins.get(handle.fh):
            self._released[handle.fh] = handle
            return
        fd, handle.fd = handle.fd, -1
        await self._run(_close_quietly, fd)

    def _close_fd(self, handle: OpenFile) -> None:
        fd, handle.fd = handle.fd, -1
        if fd >= 0:
            _close_quietly(fd)

    def close_all(self) -> None:
        """Unmount: close every descriptor still open (reads are over by now)."""
        for handle in [*self._lru.values(), *self._released.values()]:
            self._close_fd(handle)
        for fds in self._retired.values():
            for fd in fds:
                _close_quietly(fd)
        self._retired.clear()
        self._lru.clear()
        self._released.clear()
        self._pins.clear()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def statistics(self) -> DescriptorStatistics:
        return DescriptorStatistics(self.open_count, self.limit, self.reopens, self.closed_idle)


@dataclasses.dataclass(frozen=True)
class DescriptorStatistics:
    open: int
    """Backing descriptors open now."""
    limit: int
    reopens: int
    closed_idle: int
    """Idle descriptors closed for being over the limit."""


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
