"""The view's semantics through real mounts (README "The view", SPEC.md "The view").

Every test mounts a SOURCE built for it and checks one promise with ordinary
system calls on the mount point: attributes, extended attributes, read-only,
containment, odd names, access control, freshness, the bounded inode table and
file systems mounted inside SOURCE.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stfs.mountinfo import mounts
from tests.conftest import Mount, force_unmount
from tests.pagecache import pinned

ENTRY_TIMEOUT_S = 1.0  # stfs's default --entry-timeout / --attr-timeout
FRESH_WITHIN_S = 2.0  # a change in SOURCE must show within the timeout plus slack
POLL_FOR_S = 3.0

ATTR_FIELDS = ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size", "st_rdev",
               "st_mtime_ns", "st_ctime_ns")

# A nanosecond part that no coarse clock produces, so a rounded value cannot pass.
ODD_NS = 1_234_567_891_987_654_321
ODD_NS_2 = 1_111_111_111_000_000_007


# -- helpers ---------------------------------------------------------------


def walk(root: Path) -> Iterator[bytes]:
    """Every path under *root* (bytes, relative, b"" for root itself); symlinks not followed."""
    broot = os.fsencode(root)
    yield b""
    for dirpath, dirnames, filenames in os.walk(broot):
        rel = os.path.relpath(dirpath, broot)
        prefix = b"" if rel == b"." else rel + b"/"
        for name in sorted(dirnames + filenames):
            yield prefix + name


def at(root: Path, rel: bytes) -> bytes:
    return os.path.join(os.fsencode(root), rel) if rel else os.fsencode(root)


def attrs(st: os.stat_result) -> dict[str, int]:
    return {field: getattr(st, field) for field in ATTR_FIELDS}


def read(path: Path | bytes, flags: int = 0) -> bytes:
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        chunks: list[bytes] = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def try_read(path: Path | bytes, flags: int = 0) -> bytes | OSError:
    try:
        return read(path, flags)
    except OSError as exc:
        return exc


def snapshot(root: Path) -> dict[bytes, tuple[Any, ...]]:
    """Names, types, modes, owners, sizes, inode numbers, times (no atime), content
    hashes, link targets and xattrs of everything under *root*."""
    result: dict[bytes, tuple[Any, ...]] = {}
    for rel in walk(root):
        path = at(root, rel)
        st = os.lstat(path)
        extra: Any = None
        if stat.S_ISREG(st.st_mode):
            extra = hashlib.sha256(read(path)).hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            extra = os.readlink(path)
        xattrs: Any = None
        if not stat.S_ISLNK(st.st_mode):
            xattrs = sorted((n, os.getxattr(path, n)) for n in os.listxattr(path))
        result[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_ino, st.st_nlink,
                       st.st_mtime_ns, st.st_ctime_ns, extra, xattrs)
    return result


def bind_socket(path: Path) -> None:
    """Leave a unix socket file at *path* (bound relative to dodge the 108-byte limit)."""
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path.name)
        finally:
            sock.close()
    finally:
        os.chdir(cwd)


def poll(fn: Callable[[], bool], timeout: float = POLL_FOR_S,
         interval: float = 0.02) -> float | None:
    """Seconds until *fn* is true, or None if it never was within *timeout*."""
    start = time.monotonic()
    while True:
        if fn():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            return None
        time.sleep(interval)


def stat_int(m: Mount, key: str) -> int:
    """One integer figure from ``stfs stats --json``."""
    value = m.stats()[key]
    assert isinstance(value, int), (key, value)
    return value


def rewrite_in_place(path: Path, data: bytes) -> None:
    """Overwrite *path*'s bytes without changing its inode."""
    fd = os.open(path, os.O_WRONLY)
    try:
        if len(data) < os.fstat(fd).st_size:
            os.ftruncate(fd, len(data))
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)


def replace_by_rename(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.rename(tmp, path)


def run_as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv],
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
                          check=False)


# -- 1. attributes -----------------------------------------------------------


@pytest.fixture
def zoo(tmp_path: Path) -> Path:
    """A SOURCE with one entry of every kind, odd owners, modes and timestamps."""
    src = tmp_path / "zoo"
    src.mkdir()
    (src / "file").write_bytes(b"regular file\n" * 100)
    (src / "empty").write_bytes(b"")
    (src / "dir").mkdir()
    (src / "dir" / "inner").write_bytes(b"inner\n")
    (src / "dir" / "subdir").mkdir()
    os.link(src / "file", src / "dir" / "hardlink")
    os.link(src / "file", src / "hardlink2")
    os.symlink("file", src / "rel_link")
    os.symlink("/etc/passwd", src / "abs_link")
    os.symlink("does/not/exist", src / "dangling")
    os.symlink("../../../../../../../../outside", src / "dir" / "climbing_link")
    os.mkfifo(src / "fifo", 0o640)
    bind_socket(src / "sock")
    os.mknod(src / "chardev", 0o620 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(src / "blockdev", 0o660 | stat.S_IFBLK, os.makedev(259, 70000))
    (src / "setuid").write_bytes(b"#!/bin/sh\n")
    os.chown(src / "setuid", 12345, 23456)
    os.chmod(src / "setuid", 0o4751)
    (src / "nomode").write_bytes(b"no access\n")
    os.chmod(src / "nomode", 0o000)
    (src / "sticky_dir").mkdir()
    os.chown(src / "sticky_dir", 4242, 4343)
    os.chmod(src / "sticky_dir", 0o1703)
    os.utime(src / "file", ns=(ODD_NS_2, ODD_NS))
    os.utime(src / "rel_link", ns=(ODD_NS, ODD_NS_2), follow_symlinks=False)
    os.utime(src / "fifo", ns=(ODD_NS, ODD_NS + 1))
    os.utime(src / "dir", ns=(ODD_NS, ODD_NS - 1))
    return src


def mount_attrs(root: Path, rels: list[bytes]) -> dict[bytes, dict[str, int]]:
    return {rel: attrs(os.lstat(at(root, rel))) for rel in rels}


def test_lstat_of_every_entry_kind_equals_source(mounter, zoo: Path) -> None:  # type: ignore[no-untyped-def]
    m: Mount = mounter(zoo)
    rels = list(walk(zoo))
    assert len(rels) >= 18
    expected = mount_attrs(zoo, rels)
    got = mount_attrs(m.mountpoint, rels)
    diffs = {rel: {f: (got[rel][f], expected[rel][f]) for f in ATTR_FIELDS
                   if got[rel][f] != expected[rel][f]}
             for rel in rels}
    assert {rel: d for rel, d in diffs.items() if d} == {}, "(mount, source) values that differ"
    # Spot checks that the zoo is what it claims to be (so the comparison means something).
    assert stat.S_ISSOCK(got[b"sock"]["st_mode"]) and stat.S_ISFIFO(got[b"fifo"]["st_mode"])
    assert stat.S_ISCHR(got[b"chardev"]["st_mode"])
    assert got[b"chardev"]["st_rdev"] == os.makedev(1, 3)
    assert stat.S_ISBLK(got[b"blockdev"]["st_mode"])
    assert stat.S_IMODE(got[b"setuid"]["st_mode"]) == 0o4751
    assert (got[b"setuid"]["st_uid"], got[b"setuid"]["st_gid"]) == (12345, 23456)
    assert stat.S_IMODE(got[b"nomode"]["st_mode"]) == 0
    assert got[b"file"]["st_mtime_ns"] == ODD_NS and got[b"dir"]["st_mtime_ns"] == ODD_NS - 1


def test_listing_shows_every_entry_with_its_type(mounter, zoo: Path) -> None:  # type: ignore[no-untyped-def]
    m: Mount = mounter(zoo)
    for rel in walk(zoo):
        if stat.S_ISDIR(os.lstat(at(zoo, rel)).st_mode):
            with os.scandir(at(m.mountpoint, rel)) as it:
                got = {e.name: (e.is_dir(follow_symlinks=False), e.is_symlink(),
                                e.is_file(follow_symlinks=False), e.inode()) for e in it}
            with os.scandir(at(zoo, rel)) as it:
                want = {e.name: (e.is_dir(follow_symlinks=False), e.is_symlink(),
                                 e.is_file(follow_symlinks=False), e.inode()) for e in it}
            assert got == want, rel


def test_hard_links_share_st_ino_and_link_count_on_mount(mounter, zoo: Path) -> None:  # type: ignore[no-untyped-def]
    m: Mount = mounter(zoo)
    a, b, c = (os.lstat(m.mountpoint / p) for p in ("file", "dir/hardlink", "hardlink2"))
    assert a.st_ino == b.st_ino == c.st_ino == os.lstat(zoo / "file").st_ino
    assert a.st_nlink == b.st_nlink == c.st_nlink == 3
    assert os.path.samefile(m.mountpoint / "file", m.mountpoint / "dir" / "hardlink")
    assert (m.mountpoint / "dir" / "hardlink").read_bytes() == (zoo / "file").read_bytes()


def test_removing_one_hard_link_in_source_keeps_the_other_name_readable(  # type: ignore[no-untyped-def]
        mounter, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "b").mkdir(parents=True)
    (src / "a").write_bytes(b"shared content\n")
    os.link(src / "a", src / "b" / "hl")
    m: Mount = mounter(src)
    mp = m.mountpoint
    # Both names are one node; the daemon must still find it after one name goes.
    assert read(mp / "a") == b"shared content\n"
    assert read(mp / "b" / "hl") == b"shared content\n"  # the name looked up last
    os.unlink(src / "b" / "hl")
    # "a" was never touched: it must stay readable and stat-able, at once.
    assert try_read(mp / "a") == b"shared content\n"
    assert not isinstance(_stat_or_error(mp / "a"), OSError)
    elapsed = poll(lambda: not os.path.lexists(mp / "b" / "hl")
                   and getattr(_stat_or_error(mp / "a"), "st_nlink", None) == 1)
    assert elapsed is not None and elapsed <= FRESH_WITHIN_S, elapsed
    assert read(mp / "a") == b"shared content\n"


def _stat_or_error(path: Path) -> os.stat_result | OSError:
    try:
        return os.stat(path)
    except OSError as exc:
        return exc


def test_mount_root_reports_source_inode_number(mounter, zoo: Path) -> None:  # type: ignore[no-untyped-def]
    m: Mount = mounter(zoo)
    assert os.lstat(m.mountpoint).st_ino == os.lstat(zoo).st_ino
    assert os.stat(m.mountpoint / ".").st_ino == os.lstat(zoo).st_ino
    assert os.stat(m.mountpoint / "dir" / "..").st_ino == os.lstat(zoo).st_ino
    with os.scandir(m.mountpoint / "dir") as it:
        list(it)  # readdir of a child must not change what the root reports
    assert os.lstat(m.mountpoint).st_ino == os.lstat(zoo).st_ino


def test_inode_numbers_are_stable_across_remount(mounter, zoo: Path) -> None:  # type: ignore[no-untyped-def]
    rels = list(walk(zoo))
    first: Mount = mounter(zoo)
    before = {rel: os.lstat(at(first.mountpoint, rel)).st_ino for rel in rels}
    assert first.unmount() == 0
    second: Mount = mounter(zoo)
    after = {rel: os.lstat(at(second.mountpoint, rel)).st_ino for rel in rels}
    assert before == after
    assert after == {rel: os.lstat(at(zoo, rel)).st_ino for rel in rels}


def test_readlink_is_verbatim_and_never_follows(mounter, zoo: Path) -> None:  # type: ignore[no-untyped-def]
    m: Mount = mounter(zoo)
    for name in ("rel_link", "abs_link", "dangling", "dir/climbing_link"):
        assert os.readlink(m.mountpoint / name) == os.readlink(zoo / name), name
        assert os.readlink(os.fsencode(m.mountpoint / name)) == os.readlink(os.fsencode(zoo / name))
        st = os.lstat(m.mountpoint / name)
        assert stat.S_ISLNK(st.st_mode)
        assert st.st_size == len(os.readlink(os.fsencode(zoo / name)))
    assert os.readlink(m.mountpoint / "abs_link") == "/etc/passwd"
    assert not os.path.exists(m.mountpoint / "dangling")
    with pytest.raises(OSError) as info:
        os.open(m.mountpoint / "abs_link", os.O_RDONLY | os.O_NOFOLLOW)
    assert info.value.errno == errno.ELOOP
    with pytest.raises(OSError) as info:
        os.readlink(m.mountpoint / "file")
    assert info.value.errno == errno.EINVAL


def test_statvfs_of_mount_equals_source(mounter, zoo: Path) -> None:  # type: ignore[no-untyped-def]
    m: Mount = mounter(zoo)
    got, want = os.statvfs(m.mountpoint), os.statvfs(zoo)
    for field in ("f_bsize", "f_frsize", "f_blocks", "f_files", "f_namemax"):
        assert getattr(got, field) == getattr(want, field), field
    for field in ("f_bfree", "f_bavail", "f_ffree", "f_favail"):
        assert abs(getattr(got, field) - getattr(want, field)) <= max(
            1000, getattr(want, field) // 100), field
    assert got.f_flag & os.ST_RDONLY


# -- 2. extended attributes ----------------------------------------------------


def test_xattrs_listed_and_read_like_source_missing_is_enodata(mounter, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "f").write_bytes(b"data")
    os.symlink("f", src / "link")
    os.setxattr(src / "f", "user.plain", b"value")
    os.setxattr(src / "f", "user.binary", bytes(range(256)))
    os.setxattr(src / "f", "user.empty", b"")
    os.setxattr(src / "d", "user.on_dir", b"dir value \xff")
    os.setxattr(src / "d", "user.big", os.urandom(3000))
    os.setxattr(src, "user.on_root", b"root value")
    m: Mount = mounter(src)
    assert os.getxattr(m.mountpoint, "user.on_root") == b"root value"
    assert sorted(os.listxattr(m.mountpoint)) == sorted(os.listxattr(src))
    for name in ("f", "d"):
        want = sorted(os.listxattr(src / name))
        assert sorted(os.listxattr(m.mountpoint / name)) == want
        assert any(n.startswith("user.") for n in want)
        for attr in want:
            assert os.getxattr(m.mountpoint / name, attr) == os.getxattr(src / name, attr), attr
    for name in ("f", "d"):
        with pytest.raises(OSError) as info:
            os.getxattr(m.mountpoint / name, "user.missing")
        assert info.value.errno == errno.ENODATA
    # A symlink's own attributes are not reachable without following it: none shown.
    assert os.listxattr(m.mountpoint / "link", follow_symlinks=False) == []
    # Following the link (done by the kernel) reaches f's attributes.
    assert os.getxattr(m.mountpoint / "link", "user.plain") == b"value"


# -- 3. read-only ----------------------------------------------------------------


def test_every_mutation_fails_with_erofs_and_source_is_untouched(mounter, zoo: Path) -> None:  # type: ignore[no-untyped-def]
    os.setxattr(zoo / "file", "user.keep", b"keep")
    os.chmod(zoo / "nomode", 0o644)  # so that opens reach the read-only check for every file
    before = snapshot(zoo)
    m: Mount = mounter(zoo)
    mp = m.mountpoint
    mutations: list[tuple[str, Callable[[], object]]] = [
        ("open O_WRONLY", lambda: os.open(mp / "file", os.O_WRONLY)),
        ("open O_RDWR", lambda: os.open(mp / "file", os.O_RDWR)),
        ("open O_RDONLY|O_TRUNC", lambda: os.open(mp / "file", os.O_RDONLY | os.O_TRUNC)),
        ("open O_WRONLY|O_TRUNC", lambda: os.open(mp / "file", os.O_WRONLY | os.O_TRUNC)),
        ("open O_WRONLY|O_APPEND", lambda: os.open(mp / "file", os.O_WRONLY | os.O_APPEND)),
        ("open empty O_RDWR", lambda: os.open(mp / "empty", os.O_RDWR)),
        ("open dir/inner O_WRONLY", lambda: os.open(mp / "dir" / "inner", os.O_WRONLY)),
        ("truncate", lambda: os.truncate(mp / "file", 0)),
        ("truncate grow", lambda: os.truncate(mp / "empty", 100)),
        ("create", lambda: os.open(mp / "new", os.O_WRONLY | os.O_CREAT, 0o644)),
        ("create excl", lambda: os.open(mp / "dir" / "new", os.O_RDONLY | os.O_CREAT | os.O_EXCL)),
        ("mkdir", lambda: os.mkdir(mp / "newdir")),
        ("rmdir", lambda: os.rmdir(mp / "dir" / "subdir")),
        ("unlink", lambda: os.unlink(mp / "file")),
        ("unlink symlink", lambda: os.unlink(mp / "rel_link")),
        ("rename", lambda: os.rename(mp / "file", mp / "renamed")),
        ("rename over", lambda: os.rename(mp / "empty", mp / "file")),
        ("rename dir", lambda: os.rename(mp / "dir", mp / "dir2")),
        ("link", lambda: os.link(mp / "file", mp / "file_link")),
        ("symlink", lambda: os.symlink("file", mp / "newlink")),
        ("mknod fifo", lambda: os.mknod(mp / "newfifo", 0o644 | stat.S_IFIFO)),
        ("mkfifo", lambda: os.mkfifo(mp / "newfifo2")),
        ("mknod chardev", lambda: os.mknod(mp / "newdev", 0o644 | stat.S_IFCHR, os.makedev(1, 3))),
        ("chmod", lambda: os.chmod(mp / "file", 0o777)),
        ("chmod dir", lambda: os.chmod(mp / "dir", 0o700)),
        ("lchmod-ish chown", lambda: os.chown(mp / "rel_link", 1, 1, follow_symlinks=False)),
        ("chown", lambda: os.chown(mp / "file", 1, 1)),
        ("utime", lambda: os.utime(mp / "file", ns=(1, 1))),
        ("utime now", lambda: os.utime(mp / "file")),
        ("setxattr", lambda: os.setxattr(mp / "file", "user.new", b"x")),
        ("setxattr replace", lambda: os.setxattr(mp / "file", "user.keep", b"changed")),
        ("removexattr", lambda: os.removexattr(mp / "file", "user.keep")),
    ]
    wrong: dict[str, str] = {}
    for label, action in mutations:
        try:
            result = action()
        except OSError as exc:
            if exc.errno != errno.EROFS:
                wrong[label] = f"errno {errno.errorcode.get(exc.errno or 0, exc.errno)}"
        else:
            wrong[label] = "succeeded"
            if isinstance(result, int):
                os.close(result)
    assert not os.access(mp / "file", os.W_OK)
    assert wrong == {}, "mutations that did not fail with EROFS"
    # Reads still work after all that.
    assert (mp / "file").read_bytes() == (zoo / "file").read_bytes()
    assert snapshot(zoo) == before


def test_ftruncate_and_write_on_read_only_descriptor_fail(mounter, zoo: Path) -> None:  # type: ignore[no-untyped-def]
    before = (zoo / "file").read_bytes()
    m: Mount = mounter(zoo)
    fd = os.open(m.mountpoint / "file", os.O_RDONLY)
    try:
        with pytest.raises(OSError):
            os.write(fd, b"x")
        with pytest.raises(OSError):
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)
    assert (zoo / "file").read_bytes() == before


# -- 4. containment ------------------------------------------------------------


@pytest.fixture
def escape_layout(tmp_path: Path) -> dict[str, Path]:
    """base/outside/f holds a secret; SOURCE is base/s/src; the mount point is
    base/p/q/mnt, so ``../../outside`` from SOURCE's top reaches the secret while
    the same text followed by the kernel from the mount's top reaches base/p/outside."""
    base = tmp_path
    (base / "outside").mkdir()
    (base / "outside" / "f").write_bytes(SECRET)
    (base / "p" / "outside").mkdir(parents=True)
    (base / "p" / "outside" / "f").write_bytes(MOUNT_SIDE)
    (base / "p" / "q" / "mnt").mkdir(parents=True)
    src = base / "s" / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(INSIDE)
    return {"base": base, "src": src, "mnt": base / "p" / "q" / "mnt"}


SECRET = b"TOP SECRET bytes from outside SOURCE\n"
MOUNT_SIDE = b"what ../../outside means next to the mount point\n"
INSIDE = b"the real d/f inside SOURCE\n"
ALLOWED_ERRNOS = {errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.ESTALE}


def assert_not_secret(result: bytes | OSError, what: str, secret: bytes = SECRET) -> None:
    if isinstance(result, OSError):
        assert result.errno in ALLOWED_ERRNOS, f"{what}: unexpected {result!r}"
    else:
        assert secret not in result, f"{what}: served bytes from outside SOURCE"


def test_directory_swapped_for_symlink_never_serves_outside_bytes(  # type: ignore[no-untyped-def]
        mounter, escape_layout: dict[str, Path]) -> None:
    src, mnt, base = escape_layout["src"], escape_layout["mnt"], escape_layout["base"]
    m: Mount = mounter(src, mountpoint=mnt)
    assert read(mnt / "d" / "f") == INSIDE
    dir_fd = os.open(mnt / "d", os.O_RDONLY | os.O_DIRECTORY)
    file_fd = os.open(mnt / "d" / "f", os.O_RDONLY)
    try:
        assert os.pread(file_fd, 4, 0) == INSIDE[:4]
        os.rename(src / "d", base / "d_moved_away")
        os.symlink("../../outside", src / "d")
        # At once: the kernel still has d and d/f cached.
        assert_not_secret(try_read(mnt / "d" / "f"), "cached path")
        assert_not_secret(try_read(mnt / "d" / "f", os.O_NOFOLLOW), "cached path, O_NOFOLLOW")
        assert_not_secret(_read_at(dir_fd, b"f"), "old dir fd")
        # The descriptor opened before the swap keeps reading the file it opened.
        assert os.pread(file_fd, 1000, 0) == INSIDE
        time.sleep(ENTRY_TIMEOUT_S + 0.3)
        result = try_read(mnt / "d" / "f")
        assert_not_secret(result, "after the entry timeout")
        # Followed by the kernel, the relative link resolves next to the mount point.
        assert result == MOUNT_SIDE
        assert_not_secret(_read_at(dir_fd, b"f"), "old dir fd after the timeout")
        st = os.lstat(mnt / "d")
        assert stat.S_ISLNK(st.st_mode) and st.st_ino == os.lstat(src / "d").st_ino
        assert os.readlink(mnt / "d") == "../../outside"
        assert os.pread(file_fd, 1000, 0) == INSIDE
    finally:
        os.close(file_fd)
        os.close(dir_fd)
    assert read(base / "outside" / "f") == SECRET  # the secret really was reachable from SOURCE
    assert poll(lambda: stat_int(m, "open_handles") == 0, interval=0.1) is not None


def _read_at(dir_fd: int, name: bytes, flags: int = 0) -> bytes | OSError:
    try:
        fd = os.open(name, os.O_RDONLY | flags, dir_fd=dir_fd)
    except OSError as exc:
        return exc
    try:
        return os.pread(fd, 1 << 16, 0)
    except OSError as exc:
        return exc
    finally:
        os.close(fd)


def test_nested_directory_swap_via_cached_child_never_escapes(  # type: ignore[no-untyped-def]
        mounter, escape_layout: dict[str, Path]) -> None:
    src, mnt, base = escape_layout["src"], escape_layout["mnt"], escape_layout["base"]
    (src / "top" / "mid").mkdir(parents=True)
    (src / "top" / "mid" / "f").write_bytes(INSIDE)
    (base / "outside" / "mid").mkdir()
    (base / "outside" / "mid" / "f").write_bytes(SECRET)
    (base / "outside" / "mid" / "secret_only").write_bytes(SECRET)
    mounter(src, mountpoint=mnt)
    mid_fd = os.open(mnt / "top" / "mid", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert _read_at(mid_fd, b"f") == INSIDE
        # Swap an ancestor: top -> ../../outside (which has mid/f with the secret).
        os.rename(src / "top", base / "top_moved_away")
        os.symlink("../../outside", src / "top")
        for _ in range(2):
            assert_not_secret(_read_at(mid_fd, b"f"), "dir fd under a swapped ancestor")
            assert_not_secret(try_read(mnt / "top" / "mid" / "f", os.O_NOFOLLOW),
                              "cached path under a swapped ancestor")
            with contextlib.suppress(OSError):  # listing the old directory may fail...
                assert "secret_only" not in os.listdir(mid_fd)  # ...but never show outside's
            time.sleep(ENTRY_TIMEOUT_S + 0.3)
    finally:
        os.close(mid_fd)


def test_symlink_pointing_outside_is_shown_verbatim_and_not_followed_by_daemon(  # type: ignore[no-untyped-def]
        mounter, escape_layout: dict[str, Path]) -> None:
    src, mnt = escape_layout["src"], escape_layout["mnt"]
    os.symlink("../../outside/f", src / "esc")
    os.symlink("../../outside", src / "escdir")
    os.symlink(str(escape_layout["base"] / "outside" / "f"), src / "abs_esc")
    mounter(src, mountpoint=mnt)
    assert os.readlink(mnt / "esc") == "../../outside/f"
    assert os.readlink(mnt / "escdir") == "../../outside"
    assert stat.S_ISLNK(os.lstat(mnt / "esc").st_mode)
    for name in ("esc", "escdir", "abs_esc"):
        with pytest.raises(OSError) as info:
            os.open(mnt / name, os.O_RDONLY | os.O_NOFOLLOW)
        assert info.value.errno == errno.ELOOP, name
    # Followed by the kernel, a relative link resolves relative to the mount (normal).
    assert read(mnt / "esc") == MOUNT_SIDE
    assert read(mnt / "escdir" / "f") == MOUNT_SIDE
    assert os.listdir(mnt / "escdir") == ["f"]


def test_file_replaced_by_symlink_to_etc_passwd_never_serves_passwd_via_stale_name(  # type: ignore[no-untyped-def]
        mounter, tmp_path: Path) -> None:
    passwd = read(b"/etc/passwd")
    src = tmp_path / "src"
    src.mkdir()
    plain = b"plain content, not passwd\n"
    (src / "plain").write_bytes(plain)
    (src / "d").mkdir()
    (src / "d" / "plain").write_bytes(plain)
    m: Mount = mounter(src)
    mp = m.mountpoint
    assert read(mp / "plain") == plain and read(mp / "d" / "plain") == plain
    held = os.open(mp / "plain", os.O_RDONLY)
    dir_fd = os.open(mp / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.symlink("/etc/passwd", src / "plain.tmp")
        os.rename(src / "plain.tmp", src / "plain")
        os.symlink("/etc/passwd", src / "d" / "plain.tmp")
        os.rename(src / "d" / "plain.tmp", src / "d" / "plain")
        seen: list[bytes | OSError] = []
        deadline = time.monotonic() + ENTRY_TIMEOUT_S + 0.5
        while time.monotonic() < deadline:
            seen.append(try_read(mp / "plain", os.O_NOFOLLOW))
            seen.append(_read_at(dir_fd, b"plain", os.O_NOFOLLOW))
            seen.append(os.pread(held, 1 << 16, 0))
            time.sleep(0.05)
        for result in seen:
            assert_not_secret(result, "stale name", secret=passwd)
            if not isinstance(result, OSError):
                assert result == plain
        assert os.pread(held, 1 << 16, 0) == plain
        assert os.readlink(mp / "plain") == "/etc/passwd"
        with pytest.raises(OSError) as info:
            os.open(mp / "plain", os.O_RDONLY | os.O_NOFOLLOW)
        assert info.value.errno == errno.ELOOP
    finally:
        os.close(held)
        os.close(dir_fd)


# -- 5. odd names --------------------------------------------------------------


ODD_NAMES = [b"\xff\xfe", b"sp ace", b"new\nline", b"tab\t", "caf\u00e9".encode(),
             "cafe\u0301".encode(), b"x" * 255, b"-rf", b"--help", b"-", b" leading",
             b"trailing ", b"\x01ctrl\x7f", b"back\\slash", b"*?[glob]", b"'quote\"",
             b"...", b".hidden", b"\xc3\x28 invalid utf8", "\U0001f600 emoji".encode()]


def test_odd_names_listed_byte_exact_and_read_back(mounter, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "src"
    src.mkdir()
    bsrc = os.fsencode(src)
    for name in ODD_NAMES:
        with open(os.path.join(bsrc, name), "wb") as f:
            f.write(b"content of " + name)
    os.mkdir(os.path.join(bsrc, b"dir \xff\n"))
    with open(os.path.join(bsrc, b"dir \xff\n", b"-n\xfe"), "wb") as f:
        f.write(b"nested")
    m: Mount = mounter(src)
    bmp = os.fsencode(m.mountpoint)
    assert sorted(os.listdir(bmp)) == sorted(os.listdir(bsrc))
    assert len(os.listdir(bmp)) == len(ODD_NAMES) + 1
    for name in ODD_NAMES:
        assert read(os.path.join(bmp, name)) == b"content of " + name, name
        assert os.lstat(os.path.join(bmp, name)).st_ino == os.lstat(os.path.join(bsrc, name)).st_ino
    assert os.listdir(os.path.join(bmp, b"dir \xff\n")) == [b"-n\xfe"]
    assert read(os.path.join(bmp, b"dir \xff\n", b"-n\xfe")) == b"nested"
    # str paths (surrogateescape) work too.
    assert sorted(os.listdir(m.mountpoint)) == sorted(os.listdir(src))
    with pytest.raises(OSError) as info:
        os.lstat(os.path.join(bmp, b"x" * 256))
    assert info.value.errno == errno.ENAMETOOLONG


# -- 6. access control -----------------------------------------------------------


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory that user nobody can traverse (pytest's base dir is 0700)."""
    base = Path(tempfile.mkdtemp(prefix="stfs-access-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        for entry in reversed(mounts()):
            if entry.mountpoint.startswith(str(base) + "/"):
                force_unmount(entry.mountpoint)
        if not any(e.mountpoint.startswith(str(base) + "/") for e in mounts()):
            shutil.rmtree(base, ignore_errors=True)


def test_other_users_refused_without_allow_other(mounter, world_dir: Path) -> None:  # type: ignore[no-untyped-def]
    src, mnt = world_dir / "src", world_dir / "mnt"
    src.mkdir(mode=0o755)
    mnt.mkdir(mode=0o755)
    (src / "pub").write_bytes(b"world readable\n")
    (src / "pub").chmod(0o644)
    m: Mount = mounter(src, mountpoint=mnt)
    try:
        control = run_as_nobody("cat", str(src / "pub"))
        assert control.returncode == 0 and control.stdout == "world readable\n", control.stderr
        for argv in (["cat", str(mnt / "pub")], ["stat", str(mnt)], ["ls", str(mnt)]):
            result = run_as_nobody(*argv)
            assert result.returncode != 0, argv
            assert "Permission denied" in result.stderr, (argv, result.stderr)
            assert "world readable" not in result.stdout
        assert read(mnt / "pub") == b"world readable\n"  # the mounting user gets in
    finally:
        m.unmount()


def test_allow_other_lets_others_in_subject_to_mode_bits(mounter, world_dir: Path) -> None:  # type: ignore[no-untyped-def]
    src, mnt = world_dir / "src", world_dir / "mnt"
    src.mkdir(mode=0o755)
    mnt.mkdir(mode=0o755)
    (src / "pub").write_bytes(b"world readable\n")
    (src / "pub").chmod(0o644)
    (src / "private").write_bytes(b"root only\n")
    (src / "private").chmod(0o600)
    (src / "closed").mkdir(mode=0o700)
    (src / "closed" / "inner").write_bytes(b"inner\n")
    (src / "closed" / "inner").chmod(0o644)
    m: Mount = mounter(src, "-o", "allow_other", mountpoint=mnt)
    try:
        ok = run_as_nobody("cat", str(mnt / "pub"))
        assert ok.returncode == 0 and ok.stdout == "world readable\n", ok.stderr
        assert run_as_nobody("stat", str(mnt)).returncode == 0
        for path in (mnt / "private", mnt / "closed" / "inner"):
            denied = run_as_nobody("cat", str(path))
            assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied
            assert denied.stdout == ""
        assert read(mnt / "private") == b"root only\n"
    finally:
        m.unmount()


# -- 7. freshness ---------------------------------------------------------------


def test_in_place_same_size_change_seen_by_next_open(mounter, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "src"
    src.mkdir()
    old = os.urandom(200_000)
    new = os.urandom(200_000)
    (src / "f").write_bytes(old)
    m: Mount = mounter(src)
    f = m.mountpoint / "f"
    assert read(f) == old and read(f) == old  # cached by the kernel, kept across opens
    rewrite_in_place(src / "f", new)
    seen: list[bytes] = []

    def is_new() -> bool:
        seen.append(read(f))
        return seen[-1] == new

    elapsed = poll(is_new)
    assert elapsed is not None, "the new content never showed"
    assert elapsed <= FRESH_WITHIN_S, f"took {elapsed:.2f}s"
    assert all(s in (old, new) for s in seen), "a read mixed old and new bytes"


@pytest.mark.parametrize("new_size", [300_000, 50_000], ids=["grow", "shrink"])
def test_in_place_size_change_seen_with_new_size(mounter, tmp_path: Path, new_size: int) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "src"
    src.mkdir()
    old = os.urandom(200_000)
    new = os.urandom(new_size)
    (src / "f").write_bytes(old)
    m: Mount = mounter(src)
    f = m.mountpoint / "f"
    assert read(f) == old and os.stat(f).st_size == len(old)
    rewrite_in_place(src / "f", new)
    want_mtime = os.stat(src / "f").st_mtime_ns
    elapsed = poll(lambda: read(f) == new and os.stat(f).st_size == new_size
                   and os.stat(f).st_mtime_ns == want_mtime)
    assert elapsed is not None, f"never saw the new content/size/mtime ({os.stat(f)})"
    assert elapsed <= FRESH_WITHIN_S, f"took {elapsed:.2f}s"


def test_open_descriptor_sees_in_place_change_after_attr_timeout(mounter, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "src"
    src.mkdir()
    old = os.urandom(1024 * 1024)
    new = os.urandom(1024 * 1024)
    (src / "f").write_bytes(old)
    m: Mount = mounter(src)
    fd = os.open(m.mountpoint / "f", os.O_RDONLY)
    try:
        assert os.pread(fd, len(old), 0) == old  # now in the kernel's page cache
        rewrite_in_place(src / "f", new)
        elapsed = poll(lambda: os.pread(fd, len(new), 0) == new)
        assert elapsed is not None, "an open descriptor kept serving stale cached pages"
        assert elapsed <= FRESH_WITHIN_S, f"took {elapsed:.2f}s"
    finally:
        os.close(fd)


def test_file_replaced_by_rename_is_seen_by_the_very_next_open(mounter, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"old version\n")
    (src / "g").write_bytes(b"old g\n" * 1000)
    (src / "d").mkdir()
    m: Mount = mounter(src)
    f, g = m.mountpoint / "f", m.mountpoint / "g"
    assert read(f) == b"old version\n" and read(g) == b"old g\n" * 1000
    assert os.listdir(m.mountpoint / "d") == []
    os.stat(f)
    replace_by_rename(src / "f", b"new version, longer than before\n")
    replace_by_rename(src / "g", b"new g\n")
    (src / "d.new").mkdir()
    (src / "d.new" / "inside").write_bytes(b"in the new d\n")
    os.rename(src / "d.new", src / "d")
    assert os.listdir(m.mountpoint / "d") == ["inside"]
    assert read(m.mountpoint / "d" / "inside") == b"in the new d\n"
    # No waiting: the stale node answers ESTALE and the kernel looks the name up again.
    assert read(f) == b"new version, longer than before\n"
    assert read(g) == b"new g\n"
    assert os.stat(f).st_ino == os.stat(src / "f").st_ino
    assert os.stat(g).st_size == len(b"new g\n")


def test_file_deleted_in_source_disappears_within_timeout(mounter, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "gone").write_bytes(b"soon gone\n")
    (src / "d" / "gone_too").write_bytes(b"soon gone\n")
    m: Mount = mounter(src)
    mp = m.mountpoint
    assert read(mp / "gone") == b"soon gone\n" and os.path.lexists(mp / "d" / "gone_too")
    assert "gone" in os.listdir(mp)
    os.unlink(src / "gone")
    os.unlink(src / "d" / "gone_too")
    assert "gone" not in os.listdir(mp)  # a new listing is read from SOURCE
    elapsed = poll(lambda: not os.path.lexists(mp / "gone")
                   and not os.path.lexists(mp / "d" / "gone_too"))
    assert elapsed is not None and elapsed <= FRESH_WITHIN_S, elapsed
    with pytest.raises(FileNotFoundError):
        os.open(mp / "gone", os.O_RDONLY)
    # A name that was just looked up in vain appears as soon as SOURCE has it.
    (src / "gone").write_bytes(b"back again\n")
    elapsed = poll(lambda: not isinstance(try_read(mp / "gone"), OSError))
    assert elapsed is not None and elapsed <= FRESH_WITHIN_S, elapsed
    assert read(mp / "gone") == b"back again\n"


def test_open_descriptor_keeps_old_content_after_rename_replacement(  # type: ignore[no-untyped-def]
        mounter, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    size = 4 * 1024 * 1024
    old = os.urandom(size)
    new = os.urandom(size - 1024 * 1024)
    (src / "f").write_bytes(old)
    m: Mount = mounter(src)
    mount_fd = os.open(m.mountpoint / "f", os.O_RDONLY)
    source_fd = os.open(src / "f", os.O_RDONLY)
    try:
        head = os.read(mount_fd, 4096)
        replace_by_rename(src / "f", new)
        rest = b""
        while chunk := os.read(mount_fd, 256 * 1024):
            rest += chunk
        assert head + rest == old, "the open descriptor mixed versions or changed file"
        assert os.pread(mount_fd, size, 0) == os.pread(source_fd, size, 0) == old
        assert os.fstat(mount_fd).st_size == size
        assert read(m.mountpoint / "f") == new
        time.sleep(ENTRY_TIMEOUT_S + 0.2)  # attributes refreshed: the fd still means the old file
        assert os.fstat(mount_fd).st_size == size
        assert os.pread(mount_fd, size, 0) == old
        assert os.pread(mount_fd, 100, size - 100) == old[-100:]
    finally:
        os.close(mount_fd)
        os.close(source_fd)


def test_unchanged_file_is_served_from_kernel_cache_on_reopen(mounter, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "src"
    src.mkdir()
    size = 512 * 1024
    old = os.urandom(size)
    (src / "f").write_bytes(old)
    m: Mount = mounter(src)
    f = m.mountpoint / "f"
    assert read(f) == old
    assert stat_int(m, "bytes_served") >= size
    # Reclaim and drop_caches would take the pages now and then; an open
    # without keep_cache would still drop them, pinned or not.
    with pinned(f):
        served_1 = stat_int(m, "bytes_served")
        assert read(f) == old
        time.sleep(ENTRY_TIMEOUT_S + 0.2)  # attributes expire and are refreshed: still unchanged
        assert read(f) == old
        served_2 = stat_int(m, "bytes_served")
    assert served_2 == served_1, (
        f"an unchanged file was read from SOURCE again: {served_2 - served_1} bytes")
    served_2 = stat_int(m, "bytes_served")
    new = os.urandom(size)
    rewrite_in_place(src / "f", new)
    # The identity changed, so the next open drops the cached pages: no waiting.
    assert read(f) == new
    served_3 = stat_int(m, "bytes_served")
    assert served_3 >= served_2 + size, "a changed file was not read again"


# -- 8. inode table bounded --------------------------------------------------------


def test_forgotten_inodes_are_dropped_from_the_table(mounter, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "src"
    count = 0
    for top in range(20):
        for sub in range(10):
            d = src / f"t{top}" / f"s{sub}"
            d.mkdir(parents=True)
            for i in range(100):
                os.close(os.open(d / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644))
                count += 1
    assert count == 20_000
    m: Mount = mounter(src)
    seen = 0
    for dirpath, dirnames, filenames in os.walk(m.mountpoint):
        for name in dirnames + filenames:
            os.lstat(os.path.join(dirpath, name))
            seen += 1
    assert seen == count + 20 + 200
    known = stat_int(m, "known_inodes")
    assert known >= count, known
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")
    samples: list[int] = []

    def small() -> bool:
        samples.append(stat_int(m, "known_inodes"))
        return samples[-1] < 100

    assert poll(small, timeout=10, interval=0.3) is not None, samples
    # The mount still works after the kernel forgot everything.
    deep = Path("t3") / "s4" / "f5"
    assert os.lstat(m.mountpoint / deep).st_ino == os.lstat(src / deep).st_ino
    assert len(os.listdir(m.mountpoint / "t19" / "s9")) == 100


# -- 9. file systems mounted inside SOURCE ---------------------------------------------


def test_entries_on_inner_mount_get_reserved_inode_numbers_and_read_correctly(  # type: ignore[no-untyped-def]
        mounter, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "outer").write_bytes(b"outer\n")
    inner = src / "sub"
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "stfs-test", str(inner)],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {result.stderr.strip()}")
    m: Mount | None = None
    try:
        (inner / "a").write_bytes(b"on tmpfs a\n")
        (inner / "b").write_bytes(b"on tmpfs b\n" * 1000)
        (inner / "dir").mkdir()
        (inner / "dir" / "c").write_bytes(b"deep on tmpfs\n")
        os.link(inner / "a", inner / "a_link")
        m = mounter(src)
        mp = m.mountpoint
        names = ["sub", "sub/a", "sub/b", "sub/dir", "sub/dir/c", "sub/a_link"]
        inos = {n: os.lstat(mp / n).st_ino for n in names}
        assert all(ino >= 2**63 for ino in inos.values()), inos
        assert len(set(inos.values())) == len(names) - 1  # a and a_link share one
        assert inos["sub/a"] == inos["sub/a_link"]
        assert os.lstat(mp / "outer").st_ino == os.lstat(src / "outer").st_ino < 2**63
        for n in ("sub/a", "sub/b", "sub/dir/c", "sub/a_link"):
            assert read(mp / n) == read(inner / n[4:]), n
            assert os.lstat(mp / n).st_size == os.lstat(inner / n[4:]).st_size
        assert sorted(os.listdir(mp / "sub")) == sorted(os.listdir(inner))
        assert os.lstat(mp / "sub" / "dir").st_mode == os.lstat(inner / "dir").st_mode
        # Still unique while mounted: asking again gives the same numbers.
        assert {n: os.lstat(mp / n).st_ino for n in names} == inos
    finally:
        if m is not None:
            m.unmount()
        if subprocess.run(["umount", str(inner)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(inner)], capture_output=True, check=False)
    assert not any(e.mountpoint == str(inner) for e in mounts())
