"""The persistent chunk cache's files: layout, format, lock and checks.

Everything here is blocking file-system work, called from worker threads (or
before the mount, from the command line); ``stfs.disk_cache`` decides what to
read, write and evict.

Layout of ``--cache-dir DIR``::

    DIR/CACHEDIR.TAG   tells backup tools to skip DIR (bford.net/cachedir)
    DIR/lock           flock(2)ed by the one mount that owns DIR: "PID mounted", or
                       "PID closing" while an unmounted daemon writes what is queued
                       (a new mount then waits for it)
    DIR/chunks/        one file per cached chunk
    DIR/tmp/           entries being written (emptied at every start)

An entry's name is its key: the file's identity and the chunk,
``DEV_INO_SIZE_MTIMENS_CTIMENS_START_LENGTH`` in hexadecimal. Its content is
the chunk's bytes, zeros to the next 4 KiB, and a 4 KiB trailer block that
starts with the key again and the xxh3-64 of the bytes (block-aligned, so
that it can be written with O_DIRECT). A read checks the trailer against the
key it asked for and the bytes against the digest, so a truncated, torn or damaged file (a crash of
the machine before writeback, a disk error, a hand edit) is detected and
never served. An entry is written under ``tmp/`` and renamed into
``chunks/`` only once complete: a kill -9 at any moment leaves either no
entry or a whole one. Entries are not fsynced: after a power loss a
renamed entry may come back empty or partly written, and the check catches
that too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import mmap
import os
import shutil
import struct
import threading
import time
from pathlib import Path
from typing import NamedTuple

import xxhash

from stfs.backing import FileIdentity
from stfs.buffers import Buffer
from stfs.config import human_bytes
from stfs.errors import EXIT_FAILURE, StfsError, UsageError

MAGIC = b"STFSDC2\0"
TRAILER = struct.Struct("<8s3QqqQQQ")
"""magic, dev, ino, size, mtime_ns, ctime_ns, start, length, xxh3-64 of the bytes
(mtime and ctime are signed: a file may predate 1970)."""
BLOCK = 4096
NAME_BYTES = 128
"""What an entry's name costs in its directory, counted with its blocks."""
FIXED_BYTES = 64 * 1024
"""DIR's own directories, lock and tag."""
DIRECT_WRITES = hasattr(os, "O_DIRECT")
MOUNTED, CLOSING = "mounted", "closing"
"""What the lock's holder says it is doing (in DIR/lock, after its pid)."""
CLOSING_WAIT_S = 65.0
"""How long a new mount waits for an unmounted daemon still writing to DIR (it
stops after ``daemon.DISK_FLUSH_TIMEOUT_S``)."""
KEEP_FREE_SHARE = 0.10
"""Share of the file system a default-sized cache leaves free."""
DEFAULT_MAX_BYTES = 10 * 1024**3
"""``--cache-dir`` without ``--cache-size``: at most this, within the free space."""
TAG = (b"Signature: 8a477f597d28d172789f06886806bc55\n"
       b"# This directory is the chunk cache of stfs (a FUSE file system); it can be\n"
       b"# deleted while no stfs mount uses it: stfs cache --clear DIR\n")


class EntryKey(NamedTuple):
    """What an entry holds: bytes [start, start + length) of one file version."""

    identity: FileIdentity
    start: int
    length: int


class StoredEntry(NamedTuple):
    key: EntryKey
    disk_bytes: int
    mtime_ns: int
    """Last written or used: the order entries are evicted in after a restart."""


def entry_name(key: EntryKey) -> str:
    return "_".join(format(v, "x") for v in (*key.identity, key.start, key.length))


def parse_name(name: str) -> EntryKey | None:
    parts = name.split("_")
    if len(parts) != 7:
        return None
    try:
        values = [int(p, 16) for p in parts]
    except ValueError:
        return None
    key = EntryKey(FileIdentity(*values[:5]), values[5], values[6])
    if key.start < 0 or key.length <= 0 or entry_name(key) != name:
        return None
    return key


def padded(length: int) -> int:
    """Where an entry's trailer block starts: its bytes rounded up to a block."""
    return -(-length // BLOCK) * BLOCK


def file_size(length: int) -> int:
    """The size of an entry's file: its bytes, zeros to a block, the trailer block."""
    return padded(length) + BLOCK


def disk_bytes(length: int) -> int:
    """What an entry of *length* bytes costs on disk, as counted against the size."""
    return file_size(length) + NAME_BYTES


_local = threading.local()


def _scratch() -> mmap.mmap:
    """This thread's page-aligned buffer for an entry's last two blocks."""
    tail = getattr(_local, "tail", None)
    if tail is None:
        tail = _local.tail = mmap.mmap(-1, 2 * BLOCK)
    return tail


def _trailer(key: EntryKey, digest: int) -> bytes:
    return TRAILER.pack(MAGIC, *key.identity, key.start, key.length, digest)


class DiskStore:
    """An open, locked cache directory."""

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path = path
        self.chunks = path / "chunks"
        self.tmp = path / "tmp"
        self._lock_fd = lock_fd
        self._chunks_fd = os.open(self.chunks, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._tmp_fd = os.open(self.tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._serial = itertools.count()
        self.direct = DIRECT_WRITES
        self.start_writeback = False
        """Start each entry's writeback as it is written (``POSIX_FADV_DONTNEED``):
        in a memory cgroup, whose dirty page cache cannot be reclaimed until
        written. Elsewhere the kernel's dirty limits absorb a pass at memory
        speed (measured: 0.45 GB/s with it, 2.9 GB/s without)."""

    @classmethod
    def open(cls, path: Path) -> DiskStore:
        """Create the layout if needed, take the lock, empty ``tmp/``.

        Raises StfsError (one line) when DIR cannot be used or another mount owns it."""
        try:
            for sub in ("chunks", "tmp"):
                (path / sub).mkdir(mode=0o700, exist_ok=True)
            tag = path / "CACHEDIR.TAG"
            if not tag.exists():
                tag.write_bytes(TAG)
            fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise _dir_error(path, exc) from None
        deadline = time.monotonic() + CLOSING_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                owner, state = _read_owner(fd)
                if (exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN) and state == CLOSING
                        and time.monotonic() < deadline):
                    time.sleep(0.05)  # an unmounted daemon writing its last entries
                    continue
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise in_use_error(path, owner) from None
                raise _dir_error(path, exc) from None
        _write_owner(fd, MOUNTED)
        for leftover in os.listdir(path / "tmp"):  # a write cut short by a crash
            with contextlib.suppress(OSError):
                os.unlink(path / "tmp" / leftover)
        return cls(path, fd)

    def closing(self) -> None:
        """Unmounted, writing what is queued: a new mount of DIR may wait for us."""
        with contextlib.suppress(OSError):
            _write_owner(self._lock_fd, CLOSING)

    def close(self) -> None:
        for fd in (self._chunks_fd, self._tmp_fd, self._lock_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- entries ---------------------------------------------------------------

    def scan(self) -> list[StoredEntry]:
        """Every entry on disk, oldest first; names that are not entries and
        entries of the wrong size are removed."""
        found = []
        with os.scandir(self._chunks_fd) as it:
            for item in it:
                key = parse_name(item.name)
                try:
                    st = item.stat(follow_symlinks=False)
                except OSError:
                    continue
                if key is None or st.st_size != file_size(key.length):
                    self.remove([item.name])
                    continue
                found.append(StoredEntry(key, disk_bytes(key.length), st.st_mtime_ns))
        found.sort(key=lambda e: e.mtime_ns)
        return found

    def write(self, key: EntryKey, data: Buffer | bytes) -> None:
        """Write one entry atomically (``tmp/`` then rename); raises OSError.

        Page-aligned chunk buffers (a network SOURCE's) are written with
        O_DIRECT: new page-cache pages cost ext4 here 4 ms of CPU per MiB
        written, a direct write 0.4 ms (``DIRECT_WRITES``); and a direct write
        leaves no dirty pages to charge a memory cgroup. Other buffers, and file
        systems without O_DIRECT, are written through the page cache."""
        name = entry_name(key)
        tmp_name = f"{name}.{os.getpid()}.{next(self._serial)}"
        view = memoryview(data)[:key.length]
        try:
            trailer = _trailer(key, xxhash.xxh3_64_intdigest(view))
            direct = self.direct and isinstance(data, mmap.mmap) and key.length >= BLOCK
            try:
                self._write_file(tmp_name, view, trailer, direct)
            except OSError as exc:
                if not direct or exc.errno != errno.EINVAL:
                    raise
                self.direct = False  # this file system takes no O_DIRECT
                self._write_file(tmp_name, view, trailer, False)
            os.rename(tmp_name, name, src_dir_fd=self._tmp_fd, dst_dir_fd=self._chunks_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name, dir_fd=self._tmp_fd)
            raise
        finally:
            view.release()

    def _write_file(self, tmp_name: str, view: memoryview, trailer: bytes,
                    direct: bool) -> None:
        length = len(view)
        whole = length - length % BLOCK  # the blocks the chunk's own buffer fills
        tail = _scratch()  # the last partial block and the trailer block, aligned
        tail[:] = bytes(2 * BLOCK)
        tail[:length - whole] = view[whole:]
        pad = padded(length) - whole  # 0 or one block: the last, partial one
        tail[pad:pad + TRAILER.size] = trailer
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        fd = os.open(tmp_name, flags | (os.O_DIRECT if direct else 0), 0o600,
                     dir_fd=self._tmp_fd)
        try:
            # One call for the whole blocks and the tail: each call's return waits
            # for the GIL, which the event loop holds most of a busy pass.
            parts = [memoryview(tail)[:pad + BLOCK]]
            if whole:
                parts.insert(0, view[:whole])
            written = os.pwritev(fd, parts, 0)
            if written != file_size(length):
                raise OSError(errno.ENOSPC, "short write")
            if self.start_writeback and not direct:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp_name, dir_fd=self._tmp_fd)
            raise
        os.close(fd)

    def read(self, key: EntryKey, buf: Buffer) -> bool | None:
        """Fill *buf* (``key.length`` bytes) from the entry and check it: True if
        it is whole and right, False if damaged, None if there is no such entry.

        Into a page-aligned buffer, with O_DIRECT: the bytes go to the chunk
        buffer alone, not to the page cache as well (as for writes: less CPU,
        nothing for a memory cgroup to be charged)."""
        length = key.length
        direct = self.direct and isinstance(buf, mmap.mmap) and length >= BLOCK
        try:
            fd = os.open(entry_name(key), os.O_RDONLY | os.O_CLOEXEC
                         | (os.O_DIRECT if direct else 0), dir_fd=self._chunks_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if not direct or exc.errno != errno.EINVAL:
                raise
            self.direct = False
            return self.read(key, buf)
        view = memoryview(buf)[:length]
        try:
            whole = length - length % BLOCK
            if direct:
                tail = _scratch()
                n = os.preadv(fd, [view[:whole], tail], 0)
                end = padded(length) - whole
                view[whole:] = tail[:length - whole]
                rest: bytes | bytearray = tail[end - (padded(length) - length):end + TRAILER.size]
            else:
                # One request for the whole entry: a cold file is otherwise read in
                # read-ahead windows of the device's read_ahead_kb, one at a time.
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
                rest = bytearray(padded(length) - length + TRAILER.size)
                n = os.preadv(fd, [view, rest], 0)
                n += BLOCK - TRAILER.size  # as if the whole trailer block was read
            return (n == file_size(length)
                    and rest[-TRAILER.size:] == _trailer(key, xxhash.xxh3_64_intdigest(view)))
        finally:
            view.release()
            os.close(fd)

    def remove(self, names: list[str]) -> None:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self._chunks_fd)

    def touch(self, names: list[str]) -> None:
        """Mark entries used now (their mtime orders eviction after a restart)."""
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.utime(name, dir_fd=self._chunks_fd)

    def free_bytes(self) -> int:
        st = os.statvfs(self._chunks_fd)
        return st.f_bavail * st.f_frsize


# -- before the mount: the command line's checks, ``stfs cache`` -------------------


def _dir_error(path: Path, exc: OSError) -> StfsError:
    cause = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    return UsageError(f"--cache-dir {path}: {cause}")


def in_use_error(path: Path, owner: int | None) -> StfsError:
    """A mount owns DIR: one line naming its pid."""
    who = f" (pid {owner})" if owner else ""
    return StfsError(f"--cache-dir {path}: in use by another stfs mount{who}; "
                     "each mount needs its own cache directory", EXIT_FAILURE)


def _write_owner(fd: int, state: str) -> None:
    text = f"{os.getpid()} {state}\n".encode()
    os.pwrite(fd, text, 0)
    os.ftruncate(fd, len(text))


def _read_owner(fd: int) -> tuple[int | None, str]:
    """(pid, state) of the lock's holder, as it wrote them."""
    try:
        pid, _, state = os.pread(fd, 64, 0).decode().strip().partition(" ")
        return int(pid) or None, state
    except (OSError, ValueError):
        return None, ""


def lock_holder(path: Path) -> tuple[int, str] | None:
    """(pid, state) of the mount holding DIR's lock (pid 0 if unknown), None when
    nobody holds it. State ``closing``: unmounted, writing its last entries."""
    try:
        fd = os.open(path / "lock", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            pid, state = _read_owner(fd)
            return pid or 0, state
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def used_bytes(path: Path) -> tuple[int, int]:
    """(entries, bytes as counted against the size) of the cache in DIR."""
    entries = total = 0
    try:
        with os.scandir(path / "chunks") as it:
            for item in it:
                key = parse_name(item.name)
                if key is not None:
                    entries += 1
                    total += disk_bytes(key.length)
    except FileNotFoundError:
        pass
    return entries, total


def check_cache_dir(path: Path, size: int | None, min_size: int) -> int:
    """Check ``--cache-dir`` before mounting; returns the cache size to use.

    Missing, not a directory, not writable, too full for one chunk, or owned
    by a running mount: one-line StfsError. Without *size*: the smaller of
    ``DEFAULT_MAX_BYTES`` and what the file system holds while leaving
    ``KEEP_FREE_SHARE`` of it free (the cache's own entries count as room)."""
    try:
        os.stat(path)
    except OSError as exc:
        raise _dir_error(path, exc) from None
    if not os.path.isdir(path):
        raise UsageError(f"--cache-dir {path}: not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"--cache-dir {path}: permission denied (not writable)")
    holder = lock_holder(path)
    if holder is not None and holder[1] != CLOSING:  # a closing one is waited for
        raise in_use_error(path, holder[0])
    fs = os.statvfs(path)
    _, ours = used_bytes(path)
    room = fs.f_bavail * fs.f_frsize + ours - int(fs.f_blocks * fs.f_frsize * KEEP_FREE_SHARE)
    if size is None:
        size = min(DEFAULT_MAX_BYTES, room)
        if size < min_size:
            raise UsageError(
                f"--cache-dir {path}: file system too full for a cache "
                f"({human_bytes(max(room, 0))} free beyond the 10 % kept free, "
                f"at least {human_bytes(min_size)} needed)")
        return size
    if size > fs.f_bavail * fs.f_frsize + ours:
        raise UsageError(
            f"--cache-size {human_bytes(size)} is more than the file system of {path} "
            f"has free ({human_bytes(fs.f_bavail * fs.f_frsize + ours)})")
    return size


def cache_command(path: Path, clear_it: bool) -> int:
    """``stfs cache [--clear] DIR``: what the cache in DIR holds, or empty it."""
    if not (path / "chunks").is_dir() and not (path / "CACHEDIR.TAG").is_file():
        if not path.exists():
            raise UsageError(f"{path}: no such file or directory")
        raise UsageError(f"{path}: not an stfs cache directory (no chunks/ in it)")
    if clear_it:
        entries, total = clear(path)
        print(f"{path}: removed {_entries(entries)} ({human_bytes(total)})")
        return 0
    entries, total = used_bytes(path)
    holder = lock_holder(path)
    state = "not in use" if holder is None else _holder_text(holder)
    print(f"{path}: {_entries(entries)}, {human_bytes(total)} ({state})")
    return 0


def _entries(n: int) -> str:
    return f"{n} entry" if n == 1 else f"{n} entries"


def _holder_text(holder: tuple[int, str]) -> str:
    pid, state = holder
    who = f"pid {pid}" if pid else "unknown pid"
    return (f"in use by the stfs mount of {who}" if state != CLOSING
            else f"the unmounted daemon of {who} is writing its last entries")


def clear(path: Path) -> tuple[int, int]:
    """Delete every entry in DIR (``stfs cache --clear``); refuses while a mount
    owns it. Returns what was removed: (entries, bytes)."""
    holder = lock_holder(path)
    if holder is not None:
        then = "unmount it first" if holder[1] != CLOSING else "try again when it has exited"
        raise StfsError(f"{path}: {_holder_text(holder)}; {then}", EXIT_FAILURE)
    removed = used_bytes(path)
    for sub in ("chunks", "tmp"):
        shutil.rmtree(path / sub, ignore_errors=True)
    return removed
