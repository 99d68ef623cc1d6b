"""pyfuse3 request handlers: translate requests to ``View`` calls and back.

Thin on purpose. The one rule kept here: only ``FUSEError`` leaves a handler.
``OSError`` becomes ``FUSEError(errno)``; anything else is a bug, logged with
its traceback and answered with EIO so the mount survives it. Every mutating
operation answers EROFS.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from stfs.inodes import ROOT_NODEID
from stfs.view import View

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


def _fuse_errors(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("internal error in %s", fn.__name__)
            ops = args[0]
            if isinstance(ops, Operations):
                ops.view.counters.errors += 1
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


async def _erofs(*_args: Any, **_kwargs: Any) -> Any:
    """Any operation that would change SOURCE."""
    raise pyfuse3.FUSEError(errno.EROFS)


class Operations(pyfuse3.Operations):
    """The FUSE face of a ``View``."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, view: View, attr_timeout: float, entry_timeout: float) -> None:
        super().__init__()
        self.view = view
        self.attr_timeout = attr_timeout
        self.entry_timeout = entry_timeout

    def _attrs(self, nodeid: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = nodeid
        attrs.generation = 0
        attrs.entry_timeout = self.entry_timeout
        attrs.attr_timeout = self.attr_timeout
        attrs.st_mode = st.st_mode
        attrs.st_nlink = st.st_nlink
        attrs.st_uid = st.st_uid
        attrs.st_gid = st.st_gid
        attrs.st_rdev = st.st_rdev
        attrs.st_size = st.st_size
        attrs.st_blksize = st.st_blksize
        attrs.st_blocks = st.st_blocks
        attrs.st_atime_ns = st.st_atime_ns
        attrs.st_mtime_ns = st.st_mtime_ns
        attrs.st_ctime_ns = st.st_ctime_ns
        return attrs

    # -- names and attributes ---------------------------------------------

    @_fuse_errors
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node, st = await self.view.lookup(parent_inode, name)
        return self._attrs(node.nodeid, st)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for nodeid, count in inode_list:
            self.view.forget(nodeid, count)

    @_fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        st = await self.view.getattr(inode)
        attrs = self._attrs(inode, st)
        if inode == ROOT_NODEID:
            attrs.st_ino = st.st_ino  # only the reply's attributes carry it; node id stays 1
        return attrs

    @_fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.view.readlink(inode)

    @_fuse_errors
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        await self.view.getattr(inode)
        return True

    @_fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        vfs = await self.view.statfs()
        data = pyfuse3.StatvfsData()
        data.f_bsize = vfs.f_bsize
        data.f_frsize = vfs.f_frsize
        data.f_blocks = vfs.f_blocks
        data.f_bfree = vfs.f_bfree
        data.f_bavail = vfs.f_bavail
        data.f_files = vfs.f_files
        data.f_ffree = vfs.f_ffree
        data.f_favail = vfs.f_favail
        data.f_namemax = vfs.f_namemax
        return data

    @_fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return await self.view.listxattr(inode)

    @_fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.view.getxattr(inode, name)

    # -- directories -------------------------------------------------------

    @_fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return (await self.view.opendir(inode)).fh

    @_fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self.view.handles.dir(fh)
        inodes = self.view.inodes
        for index in range(start_id, len(handle.entries)):
            name, st = handle.entries[index]
            attrs = self._attrs(inodes.nodeid_for(st), st)
            if not pyfuse3.readdir_reply(token, name, attrs, index + 1):
                break
            self.view.remember_entry(handle, name, st)

    @_fuse_errors
    async def releasedir(self, fh: int) -> None:
        self.view.releasedir(fh)

    @_fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    # -- files -------------------------------------------------------------

    @_fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        handle, keep_cache = await self.view.open(inode, flags)
        return pyfuse3.FileInfo(fh=handle.fh, keep_cache=keep_cache, direct_io=handle.direct_io)

    @_fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:  # or any buffer
        return await self.view.read(fh, off, size)  # type: ignore[return-value]

    @_fuse_errors
    async def flush(self, fh: int) -> None:
        return None

    @_fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        return None

    @_fuse_errors
    async def release(self, fh: int) -> None:
        await self.view.release(fh)

    # -- everything that would change SOURCE: EROFS ------------------------

    setattr = _erofs
    mknod = _erofs
    mkdir = _erofs
    unlink = _erofs
    rmdir = _erofs
    symlink = _erofs
    rename = _erofs
    link = _erofs
    create = _erofs
    write = _erofs
    setxattr = _erofs
    removexattr = _erofs
