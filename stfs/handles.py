"""Open-file registry: every handle the kernel holds and the resources behind it.

A handle's backing descriptor is tracked by the engine (``descriptors`` and
``resources``), which closes it on release; ``close_all`` closes whatever is
left at unmount. Directory handles own a snapshot of
the listing taken at ``opendir``, so offsets stay valid while the kernel pages
through it.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import os
import time

from stfs.backing import FileIdentity


@dataclasses.dataclass
class OpenFile:
    """An open regular file."""

    fh: int
    nodeid: int
    path: bytes
    fd: int
    identity: FileIdentity
    """The version this handle serves (changes only through the engine's checks)."""
    opened_at: float = dataclasses.field(default_factory=time.monotonic)
    bytes_read: int = 0
    released: bool = False
    """Set at release: its descriptor is closed for good."""
    seen_identity: FileIdentity | None = None
    """The newest identity anyone saw for the file (getattr); the engine acts on it."""
    direct_io: bool = False
    """Opened past the kernel's page cache: other handles still read an older
    version of the file, and must never be handed this one's pages."""


@dataclasses.dataclass
class OpenDir:
    """An open directory and the listing the kernel pages through."""

    fh: int
    nodeid: int
    path: bytes
    entries: list[tuple[bytes, os.stat_result]]


class HandleTable:
    """File and directory handles by fh; pure bookkeeping, closes descriptors on release."""

    def __init__(self) -> None:
        self._files: dict[int, OpenFile] = {}
        self._by_node: dict[int, dict[int, OpenFile]] = {}
        self._dirs: dict[int, OpenDir] = {}
        self._next_fh = itertools.count(1)

    @property
    def open_files(self) -> int:
        return len(self._files)

    @property
    def open_dirs(self) -> int:
        return len(self._dirs)

    def add_file(self, nodeid: int, path: bytes, fd: int, identity: FileIdentity) -> OpenFile:
        handle = OpenFile(next(self._next_fh), nodeid, path, fd, identity)
        self._files[handle.fh] = handle
        self._by_node.setdefault(nodeid, {})[handle.fh] = handle
        return handle

    def add_dir(self, nodeid: int, path: bytes,
                entries: list[tuple[bytes, os.stat_result]]) -> OpenDir:
        handle = OpenDir(next(self._next_fh), nodeid, path, entries)
        self._dirs[handle.fh] = handle
        return handle

    def file(self, fh: int) -> OpenFile:
        try:
            return self._files[fh]
        except KeyError:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF)) from None

    def dir(self, fh: int) -> OpenDir:
        try:
            return self._dirs[fh]
        except KeyError:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF)) from None

    def files_of_node(self, nodeid: int) -> list[OpenFile]:
        """The open handles of *nodeid* (their descriptors still reach the object)."""
        return list(self._by_node.get(nodeid, {}).values())

    def pop_file(self, fh: int) -> OpenFile | None:
        """Forget file handle *fh*; the caller closes its descriptor."""
        handle = self._files.pop(fh, None)
        if handle is not None:
            of_node = self._by_node[handle.nodeid]
            del of_node[fh]
            if not of_node:
                del self._by_node[handle.nodeid]
        return handle

    def pop_dir(self, fh: int) -> OpenDir | None:
        return self._dirs.pop(fh, None)

    def files(self) -> list[OpenFile]:
        return list(self._files.values())

    def close_all(self) -> None:
        """Close every descriptor still open (unmount, after the engine freed its own)."""
        for handle in self._files.values():
            if handle.fd >= 0:
                try:
                    os.close(handle.fd)
                except OSError:
                    pass
                handle.fd = -1
        self._files.clear()
        self._by_node.clear()
        self._dirs.clear()
