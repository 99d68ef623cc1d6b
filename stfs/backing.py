"""The only module that touches SOURCE.

SOURCE is opened as a directory descriptor before the mount (so mounting over
SOURCE itself works) and every later access goes through that descriptor with
``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)``: no symlink inside SOURCE is
ever followed and no path outside it is ever resolved, even if a directory
inside SOURCE is swapped for a symlink while mounted. On kernels without
openat2 the same guarantee comes from opening one component at a time with
``O_NOFOLLOW``.

Paths here are ``bytes`` relative to SOURCE, ``b""`` meaning SOURCE itself.
Every function blocks: callers run them in worker threads, never on the event
loop. Errors are raised as ``OSError`` carrying the backing errno.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Callable
from typing import NamedTuple, Protocol

from stfs.buffers import Buffer, shorten

_libc = ctypes.CDLL(None, use_errno=True)

_SYS_OPENAT2 = 437  # the same number on every architecture with the generic syscall table
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_RESOLVE = _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS

_O_PATH_NOFOLLOW = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


ChunkData = bytes | Buffer
"""File data as read: never modified after the read that produced it."""


class FileIdentity(NamedTuple):
    """What makes file content the same content: equal identities, equal bytes."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _probe_openat2() -> bool:
    how = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0, _RESOLVE)
    fd = _libc.syscall(_SYS_OPENAT2, -100, b".", ctypes.byref(how), ctypes.sizeof(how))
    if fd >= 0:
        os.close(fd)
        return True
    return False


HAVE_OPENAT2 = _probe_openat2()


def _check_name(name: bytes) -> None:
    """A directory entry name from the kernel: one component, never . or .."""
    if not name or b"/" in name or name in (b".", b".."):
        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))


def join(parent: bytes, name: bytes) -> bytes:
    """Path of *name* inside directory *parent* (both relative to SOURCE)."""
    _check_name(name)
    return parent + b"/" + name if parent else name


class Backing:
    """SOURCE, reached only through a directory descriptor opened up front."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.dir_fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self.root_stat = os.fstat(self.dir_fd)
        except BaseException:
            os.close(self.dir_fd)
            raise

    def close(self) -> None:
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1

    # -- resolution ------------------------------------------------------

    def _open(self, path: bytes, flags: int) -> int:
        """Open *path* beneath SOURCE without following any symlink."""
        if not path:
            return os.open(".", flags & ~os.O_NOFOLLOW, dir_fd=self.dir_fd)
        if HAVE_OPENAT2:
            return self._openat2(path, flags)
        return self._open_by_components(path, flags)

    def _openat2(self, path: bytes, flags: int) -> int:
        how = _OpenHow(flags, 0, _RESOLVE)
        for _ in range(16):  # EAGAIN: a concurrent rename raced the resolution
            fd = _libc.syscall(_SYS_OPENAT2, self.dir_fd, path, ctypes.byref(how),
                               ctypes.sizeof(how))
            if fd >= 0:
                return int(fd)
            err = ctypes.get_errno()
            if err != errno.EAGAIN:
                if err == errno.EXDEV:  # an absolute symlink or .. escape attempt
                    err = errno.ELOOP
                raise OSError(err, os.strerror(err), os.fsdecode(path))
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), os.fsdecode(path))

    def _open_by_components(self, path: bytes, flags: int) -> int:
        parts = path.split(b"/")
        for part in parts:
            _check_name(part)
        fd = self.dir_fd
        try:
            for part in parts[:-1]:
                next_fd = os.open(part, _O_PATH_NOFOLLOW | os.O_DIRECTORY, dir_fd=fd)
                if fd != self.dir_fd:
                    os.close(fd)
                fd = next_fd
            return os.open(parts[-1], flags, dir_fd=fd)
        finally:
            if fd != self.dir_fd:
                os.close(fd)

    # -- metadata --------------------------------------------------------

    def lstat(self, path: bytes) -> os.stat_result:
        """Attributes of *path* itself (a symlink is not followed)."""
        if not path:
            return os.fstat(self.dir_fd)
        fd = self._open(path, _O_PATH_NOFOLLOW)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def readlink(self, path: bytes) -> bytes:
        """The target of symlink *path*, verbatim."""
        parent, _, name = path.rpartition(b"/")
        fd = self._open(parent, _O_PATH_NOFOLLOW | os.O_DIRECTORY)
        try:
            return os.readlink(name, dir_fd=fd)
        finally:
            os.close(fd)

    def list_dir(self, path: bytes) -> tuple[os.stat_result, list[tuple[bytes, os.stat_result]]]:
        """Directory *path*'s own attributes and its entries with theirs, . and .. first.

        SOURCE's own .. is shown as SOURCE: nothing outside it is looked at.
        """
        fd = self._open(path, _O_READ | os.O_DIRECTORY)
        try:
            dir_stat = os.fstat(fd)
            parent_stat = self.lstat(path.rpartition(b"/")[0]) if path else dir_stat
            entries = [(b".", dir_stat), (b"..", parent_stat)]
            with os.scandir(fd) as it:
                for entry in it:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed since the directory was read
                    entries.append((os.fsencode(entry.name), st))
        finally:
            os.close(fd)
        return dir_stat, entries

    def listxattr(self, path: bytes) -> list[bytes]:
        fd = self._open(path, _O_PATH_NOFOLLOW)
        try:
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                return []  # reaching a symlink's own attributes would mean following it
            return [os.fsencode(n) for n in os.listxattr(f"/proc/self/fd/{fd}")]
        finally:
            os.close(fd)

    def getxattr(self, path: bytes, name: bytes) -> bytes:
        fd = self._open(path, _O_PATH_NOFOLLOW)
        try:
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))
            return os.getxattr(f"/proc/self/fd/{fd}", name)
        finally:
            os.close(fd)

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.dir_fd)

    # -- data ------------------------------------------------------------

    def open_file(self, path: bytes) -> tuple[int, os.stat_result]:
        """Open regular file *path* for reading; returns the descriptor and its stat."""
        fd = self._open(path, _O_READ)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL,
                              "not a regular file", os.fsdecode(path))
        except BaseException:
            os.close(fd)
            raise
        return fd, st


def pread_identified(fd: int, buf: Buffer, offset: int,
                     expected: FileIdentity | None = None,
                     read_done: Callable[[], None] | None = None,
                     ) -> tuple[Buffer, FileIdentity]:
    """Fill *buf* from *offset* (shorter only at end of file) and say which
    version of the file the bytes belong to.

    The descriptor is fstat'ed before and after the read; a change in between
    means the file was written during the read, so it is read again (the bytes
    of one version never come labelled with another). With the *expected*
    identity, one fstat after the read does when it matches: any write since
    that identity was seen would have moved the file's ctime. *read_done()* is
    called once, when the first read has filled *buf*.
    """
    if expected is not None:
        n = _preadv_full(fd, buf, offset, 0)
        if read_done is not None:
            read_done()
            read_done = None
        if FileIdentity.of(os.fstat(fd)) == expected:
            return shorten(buf, n), expected
    before = FileIdentity.of(os.fstat(fd))
    for _ in range(3):
        n = _preadv_full(fd, buf, offset, 0)
        if read_done is not None:
            read_done()
            read_done = None
        after = FileIdentity.of(os.fstat(fd))
        if after == before:
            break
        before = after
    return shorten(buf, n), before


def _preadv_full(fd: int, buf: Buffer, offset: int, flags: int) -> int:
    view = memoryview(buf)
    try:
        got = 0
        while got < len(buf):
            n = os.preadv(fd, [view[got:]], offset + got, flags)
            if n <= 0:
                break
            got += n
        return got
    finally:
        view.release()


class Hasher(Protocol):
    def update(self, data: memoryview, /) -> None: ...
    def intdigest(self) -> int: ...


def pread_digest(fd: int, scratch: Buffer, start: int, end: int,
                 hasher: Hasher) -> tuple[int, int, FileIdentity]:
    """The digest *hasher* gives the bytes ``[start, end)`` (read through
    *scratch*, which is not resized), how many there were, and the identity
    they were read under."""
    before = FileIdentity.of(os.fstat(fd))
    got = 0
    # Every view is released on the way out, even on an error: a traceback that
    # kept one alive would pin *scratch* (a chunk buffer) against resizing.
    with memoryview(scratch) as view:
        while start + got < end:
            with view[:min(len(view), end - start - got)] as piece:
                n = os.preadv(fd, [piece], start + got)
                if n <= 0:
                    break
                with piece[:n] as part:
                    hasher.update(part)
            got += n
    if FileIdentity.of(os.fstat(fd)) != before:
        before = FileIdentity.of(os.fstat(fd))
        got = -1  # written meanwhile: the digest proves nothing
    return hasher.intdigest(), got, before


RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


def is_local_block_device_id(dev: int) -> bool:
    """Whether device *dev* is a local block device (not NFS, FUSE, tmpfs...):
    there fstat never waits on a network and the page cache is the only cache."""
    return os.major(dev) != 0


def pread_if_cached(fd: int, buf: Buffer, offset: int) -> tuple[Buffer, FileIdentity] | None:
    """Like ``pread_identified``, but only if every byte is in the page cache.

    Uses ``preadv2(RWF_NOWAIT)``, which fails with EAGAIN instead of waiting for
    the disk, so it may run on the event loop. Returns None when any part would
    have to come from the device (the caller then reads in a worker thread).
    """
    if not RWF_NOWAIT:
        return None
    before = FileIdentity.of(os.fstat(fd))
    try:
        n = os.preadv(fd, [buf], offset, RWF_NOWAIT)
    except OSError:  # EAGAIN: not all cached; EOPNOTSUPP: no RWF_NOWAIT here
        return None
    if n < len(buf) and offset + n < before.size:
        return None  # a partial read: the rest is not cached
    if FileIdentity.of(os.fstat(fd)) != before:
        return None
    return shorten(buf, n), before


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [("nr_cache", ctypes.c_uint64), ("nr_dirty", ctypes.c_uint64),
                ("nr_writeback", ctypes.c_uint64), ("nr_evicted", ctypes.c_uint64),
                ("nr_recently_evicted", ctypes.c_uint64)]


_SYS_CACHESTAT = 451  # the same number on every architecture (Linux 6.5+)
_cachestat_works = True


def cachestat(fd: int, offset: int, length: int) -> _Cachestat | None:
    """``cachestat(2)`` of ``[offset, offset + length)`` (length 0: to the end):
    pages cached, dirty, evicted... None where the kernel lacks cachestat."""
    global _cachestat_works
    if not _cachestat_works:
        return None
    span = _CachestatRange(offset, length)
    result = _Cachestat()
    if _libc.syscall(_SYS_CACHESTAT, ctypes.c_uint(fd), ctypes.byref(span),
                     ctypes.byref(result), ctypes.c_uint(0)) != 0:
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):
            _cachestat_works = False  # EPERM: a seccomp filter that predates it
        return None
    return result


def cached_pages(fd: int, offset: int, length: int) -> int | None:
    """How many pages of ``[offset, offset + length)`` are in the page cache
    (``cachestat(2)``: no side effect, unlike a RWF_NOWAIT read, which starts
    read-ahead of what it misses). None where the kernel lacks cachestat."""
    result = cachestat(fd, offset, length)
    return None if result is None else int(result.nr_cache)


def drop_cached(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to drop SOURCE's clean cached pages of ``[offset, offset +
    length)`` (``POSIX_FADV_DONTNEED``; pages mapped or in use stay): for bytes
    stfs already holds, when the memory cgroup that is charged for them is near
    its limit. It never changes SOURCE; later reads just go to the device."""
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
