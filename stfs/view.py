"""The view: what each FUSE request means in terms of SOURCE.

Resolves node ids and handles to backing paths and descriptors, checks that
the object found is still the one the kernel means (same device and inode),
and hands every blocking call to a worker thread behind a bounded limiter.
Returns plain Python values and raises ``OSError``; turning those into FUSE
replies is ``fs_ops``'s job. Testable with trio alone, no mount needed.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from stfs.backing import Backing, FileIdentity, join
from stfs.checksums import XATTR_NAME
from stfs.engine import ReadEngine
from stfs.handles import HandleTable, OpenDir, OpenFile
from stfs.inodes import Inode, InodeTable

T = TypeVar("T")

METADATA_THREADS = 8
_GONE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)
"""What resolving a node's recorded path gives when something else is there now."""
"""Concurrent backing metadata calls (stat, readdir, readlink, xattr)."""


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class View:
    """SOURCE as the kernel sees it through this mount."""

    def __init__(self, backing: Backing, engine: ReadEngine,
                 handles: HandleTable | None = None) -> None:
        """*handles*: the handle table the engine was given (``handles_of``)."""
        self.backing = backing
        self.engine = engine
        self.counters = engine.counters
        self.inodes = InodeTable(backing.root_stat)
        self.handles = handles if handles is not None else HandleTable()
        self._metadata_limiter = trio.CapacityLimiter(METADATA_THREADS)

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._metadata_limiter)

    # -- names and attributes ---------------------------------------------

    async def lookup(self, parent: int, name: bytes) -> tuple[Inode, os.stat_result]:
        """Find *name* in directory *parent*; counts one kernel reference."""
        parent_path = self.inodes.get(parent).path
        if name == b".":
            path = parent_path
        elif name == b"..":
            path = parent_path.rpartition(b"/")[0]
        else:
            path = join(parent_path, name)
        st = await self._blocking(self.backing.lstat, path)
        return self.inodes.remember(path, st), st

    def forget(self, nodeid: int, count: int) -> None:
        self.inodes.forget(nodeid, count)

    async def getattr(self, nodeid: int) -> os.stat_result:
        """Attributes of *nodeid*.

        When its recorded path no longer holds it (removed, replaced, or that hard
        link gone), an open descriptor still reaches it; otherwise the answer is
        ESTALE, on which the kernel looks the name up again (so another hard link,
        or a new file under the name, is found, and a removed one gives ENOENT).
        A changed identity seen here is passed to the open handles: the engine
        decides on their next read whether they go on with the new version or,
        having been served bytes that changed, fail rather than mix versions.
        """
        node = self.inodes.get(nodeid)
        try:
            st: os.stat_result | None = await self._blocking(self.backing.lstat, node.path)
        except OSError as exc:
            if exc.errno not in _GONE:
                raise
            st = None
        handles = self.handles.files_of_node(nodeid)
        if st is not None and self.inodes.matches(node, st):
            if handles:
                identity = FileIdentity.of(st)
                for handle in handles:
                    handle.seen_identity = identity
            return st
        for handle in handles:
            if handle.fd >= 0:
                fd = await self.engine.descriptors.pin(handle)
                try:
                    return await self._blocking(os.fstat, fd)
                finally:
                    self.engine.descriptors.unpin(handle)
        raise _err(errno.ESTALE)

    async def readlink(self, nodeid: int) -> bytes:
        return await self._blocking(self.backing.readlink, self.inodes.get(nodeid).path)

    async def listxattr(self, nodeid: int) -> list[bytes]:
        """Exactly SOURCE's attribute names.

        stfs's own ``user.stfs.xxh3_128`` is never listed, only answered by
        name: copy tools (``cp -a``, ``rsync -aX``, ``tar --xattrs``) copy what
        is listed, and a copy through the mount must be a copy of SOURCE.
        """
        return await self._blocking(self.backing.listxattr, self.inodes.get(nodeid).path)

    async def getxattr(self, nodeid: int, name: bytes) -> bytes:
        """SOURCE's attribute *name*; ``user.stfs.xxh3_128``, when SOURCE has
        no attribute of that name, is the file's checksum once known."""
        path = self.inodes.get(nodeid).path
        try:
            return await self._blocking(self.backing.getxattr, path, name)
        except OSError as exc:
            if name != XATTR_NAME or exc.errno not in (errno.ENODATA, errno.ENOTSUP):
                raise
        digest = await self._checksum(path)
        if digest is None:
            raise _err(errno.ENODATA)
        return digest.encode()

    async def _checksum(self, path: bytes) -> str | None:
        """The whole-file checksum of regular file *path* as it is now, if known."""
        st = await self._blocking(self.backing.lstat, path)
        if not stat.S_ISREG(st.st_mode):
            return None
        return await self.engine.checksum_of(FileIdentity.of(st))

    async def statfs(self) -> os.statvfs_result:
        return await self._blocking(self.backing.statvfs)

    # -- directories -------------------------------------------------------

    async def opendir(self, nodeid: int) -> OpenDir:
        node = self.inodes.get(nodeid)
        dir_stat, entries = await self._blocking(self.backing.list_dir, node.path)
        if not self.inodes.matches(node, dir_stat):
            raise _err(errno.ESTALE)
        return self.handles.add_dir(nodeid, node.path, entries)

    def remember_entry(self, handle: OpenDir, name: bytes, st: os.stat_result) -> None:
        """The kernel took a reference to a readdirplus entry (never to . or ..)."""
        if name not in (b".", b".."):
            self.inodes.remember(join(handle.path, name), st)

    def releasedir(self, fh: int) -> None:
        self.handles.pop_dir(fh)

    # -- files -------------------------------------------------------------

    async def open(self, nodeid: int, flags: int) -> tuple[OpenFile, bool]:
        """Open *nodeid* for reading; returns the handle and whether the kernel
        may keep the pages it cached for this node (identity unchanged).

        While handles opened on an older version of the file are still open, a
        new handle reads with direct I/O (``handle.direct_io``): the kernel's
        page cache is shared by all handles of a node, so the new version's
        pages would otherwise be handed to the old readers, mixing versions."""
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            raise _err(errno.EROFS)
        node = self.inodes.get(nodeid)
        try:
            fd, st = await self._blocking(self.backing.open_file, node.path)
        except OSError as exc:
            if exc.errno in _GONE:
                raise _err(errno.ESTALE) from None  # the kernel looks the name up again
            raise
        if not self.inodes.matches(node, st):
            os.close(fd)
            raise _err(errno.ESTALE)
        identity = FileIdentity.of(st)
        older_readers = any(other.identity != identity and not other.released
                            for other in self.handles.files_of_node(nodeid))
        keep_cache = node.cached_identity == identity and not older_readers
        node.cached_identity = identity
        handle = self.handles.add_file(nodeid, node.path, fd, identity)
        handle.direct_io = older_readers
        self.engine.open(handle)
        return handle, keep_cache

    async def read(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        return await self.engine.read(self.handles.file(fh), offset, size)

    async def release(self, fh: int) -> None:
        handle = self.handles.pop_file(fh)
        if handle is None:
            return
        await self.engine.release(handle)  # closes its descriptor, whatever it held

    async def sweep(self, idle_s: float) -> int:
        """Periodic cleanup of what no open handle should still hold."""
        return await self.engine.sweep({h.fh for h in self.handles.files()}, idle_s)

    async def release_all(self) -> None:
        """Unmount: free every open handle's resources through the engine."""
        await self.engine.close()

    def close(self) -> None:
        """Close whatever descriptor is left, and SOURCE (unmount, last step)."""
        self.engine.descriptors.close_all()
        self.handles.close_all()
        self.backing.close()
