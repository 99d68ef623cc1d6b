"""Backing without FUSE: containment beneath SOURCE, listings, and what open refuses.

Every containment test runs twice: with openat2 (when the kernel has it) and
with the component-by-component O_NOFOLLOW fallback (HAVE_OPENAT2 = False).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import stfs.backing
from stfs.backing import Backing

# What a refused resolution may answer: never success, never the outside object.
REFUSED = {errno.ELOOP, errno.ENOTDIR, errno.EXDEV, errno.ENOENT, errno.EPERM, errno.EACCES}


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(params=["openat2", "components"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "openat2":
        if not stfs.backing.HAVE_OPENAT2:
            pytest.skip("kernel has no openat2")
    else:
        monkeypatch.setattr(stfs.backing, "HAVE_OPENAT2", False)
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """SOURCE with symlinks that lead elsewhere, and an OUTSIDE that must stay unreached."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("outside!\n")
    (outside / "inner-link").symlink_to("secret")
    src = tmp_path / "src"
    (src / "dir" / "sub").mkdir(parents=True)
    (src / "dir" / "f").write_text("inside f\n")
    (src / "dir" / "rel-link").symlink_to("f")
    (src / "hello.txt").write_text("hello\n")
    (src / "linkdir").symlink_to("dir")                  # relative symlink to a dir inside
    (src / "outlink").symlink_to(str(outside))           # absolute symlink to a dir outside
    (src / "uplink").symlink_to("../outside")            # relative symlink escaping
    (src / "filelink").symlink_to("hello.txt")
    (src / "secret").write_text("decoy inside\n")  # same name as the outside file
    return src


@pytest.fixture
def backing(tree: Path, resolver: str) -> Iterator[Backing]:
    b = Backing(str(tree))
    try:
        yield b
    finally:
        b.close()


ESCAPES = [
    b"linkdir/f",            # through a symlinked directory (inside target)
    b"outlink/secret",       # through an absolute symlink to outside
    b"uplink/secret",        # through a relative symlink climbing out
    b"../outside/secret",    # .. escape
    b"dir/../../outside/secret",
]


@pytest.mark.parametrize("path", ESCAPES)
def test_lstat_refuses_symlinked_dirs_and_dotdot_escapes(backing: Backing, path: bytes) -> None:
    before = fd_count()
    with pytest.raises(OSError) as info:
        backing.lstat(path)
    assert info.value.errno in REFUSED
    assert fd_count() == before  # nothing leaked on the error path


def test_lstat_refuses_absolute_paths(backing: Backing, tree: Path) -> None:
    absolute = os.fsencode(tree.parent / "outside" / "secret")
    with pytest.raises(OSError) as info:
        backing.lstat(absolute)
    assert info.value.errno in REFUSED
    with pytest.raises(OSError):
        backing.lstat(b"/etc/passwd")


def test_lstat_of_symlink_itself_is_not_followed(backing: Backing, tree: Path) -> None:
    st = backing.lstat(b"outlink")
    assert stat.S_ISLNK(st.st_mode)
    assert st.st_ino == os.lstat(tree / "outlink").st_ino
    assert backing.lstat(b"dir/f").st_ino == os.stat(tree / "dir" / "f").st_ino
    assert backing.lstat(b"").st_ino == os.stat(tree).st_ino


@pytest.mark.parametrize("path", [b"linkdir/rel-link", b"outlink/inner-link",
                                  b"uplink/inner-link", b"../outside/inner-link"])
def test_readlink_refuses_paths_through_symlinks_or_outside(backing: Backing, path: bytes) -> None:
    with pytest.raises(OSError) as info:
        backing.readlink(path)
    assert info.value.errno in REFUSED


def test_readlink_returns_targets_verbatim(backing: Backing, tree: Path) -> None:
    assert backing.readlink(b"outlink") == os.fsencode(str(tree.parent / "outside"))
    assert backing.readlink(b"uplink") == b"../outside"
    assert backing.readlink(b"dir/rel-link") == b"f"


@pytest.mark.parametrize("path", [b"linkdir", b"outlink", b"uplink", b"..", b"../outside",
                                  b"dir/../.."])
def test_list_dir_refuses_symlinked_dirs_and_escapes(backing: Backing, path: bytes) -> None:
    before = fd_count()
    with pytest.raises(OSError) as info:
        backing.list_dir(path)
    assert info.value.errno in REFUSED
    assert fd_count() == before


def test_list_dir_of_source_returns_dot_and_dotdot_first(backing: Backing, tree: Path) -> None:
    dir_stat, entries = backing.list_dir(b"")
    names = [name for name, _ in entries]
    assert names[:2] == [b".", b".."]
    assert sorted(names[2:]) == sorted(os.fsencode(n) for n in os.listdir(tree))
    assert dir_stat.st_ino == os.stat(tree).st_ino
    # SOURCE's .. is shown as SOURCE itself: nothing outside is looked at
    assert entries[1][1].st_ino == os.stat(tree).st_ino


def test_list_dir_of_subdirectory_has_parent_as_dotdot(backing: Backing, tree: Path) -> None:
    _, entries = backing.list_dir(b"dir/sub")
    assert [n for n, _ in entries] == [b".", b".."]
    assert entries[0][1].st_ino == os.stat(tree / "dir" / "sub").st_ino
    assert entries[1][1].st_ino == os.stat(tree / "dir").st_ino


def test_list_dir_entries_are_lstat_not_followed(backing: Backing, tree: Path) -> None:
    _, entries = backing.list_dir(b"")
    by_name = dict(entries)
    assert stat.S_ISLNK(by_name[b"outlink"].st_mode)
    assert by_name[b"outlink"].st_ino == os.lstat(tree / "outlink").st_ino


@pytest.mark.parametrize("path", ESCAPES + [b"filelink", b"dir/rel-link"])
def test_open_file_refuses_symlinks_and_escapes(backing: Backing, path: bytes) -> None:
    before = fd_count()
    with pytest.raises(OSError) as info:
        backing.open_file(path)
    assert info.value.errno in REFUSED
    assert fd_count() == before


def test_open_file_reads_a_regular_file_inside(backing: Backing, tree: Path) -> None:
    fd, st = backing.open_file(b"dir/f")
    try:
        assert stat.S_ISREG(st.st_mode)
        assert st.st_ino == os.stat(tree / "dir" / "f").st_ino
        assert os.pread(fd, 100, 0) == b"inside f\n"
    finally:
        os.close(fd)


def test_open_file_refuses_a_directory(backing: Backing) -> None:
    before = fd_count()
    with pytest.raises(OSError) as info:
        backing.open_file(b"dir")
    assert info.value.errno == errno.EISDIR
    assert fd_count() == before


def test_open_file_refuses_a_fifo_without_blocking(backing: Backing, tree: Path) -> None:
    fifo = tree / "fifo"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            fd, _ = backing.open_file(b"fifo")
            os.close(fd)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome.append(exc)

    before = fd_count()
    thread = threading.Thread(target=attempt, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(30)
    try:
        assert not thread.is_alive(), "open_file blocked on a fifo with no writer"
        assert time.monotonic() - started < 30
        assert len(outcome) == 1 and isinstance(outcome[0], OSError), outcome
        assert outcome[0].errno not in (0, None)
        assert fd_count() == before
    finally:
        if thread.is_alive():  # unblock the stuck open so the thread can end
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
            thread.join(5)


def test_directory_swapped_for_symlink_is_not_followed(backing: Backing, tree: Path) -> None:
    assert backing.lstat(b"dir/f").st_size == len(b"inside f\n")
    os.rename(tree / "dir", tree / "dir-moved")
    os.symlink(str(tree.parent / "outside"), tree / "dir")
    with pytest.raises(OSError) as info:
        backing.lstat(b"dir/secret")
    assert info.value.errno in REFUSED
    with pytest.raises(OSError):
        backing.open_file(b"dir/secret")
    with pytest.raises(OSError):
        backing.list_dir(b"dir")


def test_source_directory_swapped_after_open_is_still_the_original(tmp_path: Path,
                                                                   resolver: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("original\n")
    b = Backing(str(src))
    try:
        os.rename(src, tmp_path / "src-old")
        src.mkdir()
        (src / "a").write_text("impostor\n")
        fd, _ = b.open_file(b"a")
        try:
            assert os.pread(fd, 100, 0) == b"original\n"
        finally:
            os.close(fd)
    finally:
        b.close()


def test_close_releases_the_source_descriptor(tree: Path) -> None:
    before = fd_count()
    b = Backing(str(tree))
    assert fd_count() == before + 1
    b.close()
    b.close()  # idempotent
    assert fd_count() == before


def test_pread_identified_with_the_expected_identity_needs_it_to_still_hold(
        tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"a" * 10000)
    fd = os.open(path, os.O_RDONLY)
    try:
        now = stfs.backing.FileIdentity.of(os.fstat(fd))
        data, identity = stfs.backing.pread_identified(fd, bytearray(4096), 8192, now)
        assert (bytes(data), identity) == (b"a" * 1808, now)
        st = path.stat()
        with open(path, "r+b") as f:
            f.write(b"b" * 10000)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        data, identity = stfs.backing.pread_identified(fd, bytearray(4096), 0, now)
        assert identity != now and identity == stfs.backing.FileIdentity.of(os.fstat(fd))
        assert bytes(data) == b"b" * 4096           # labelled with the version it is of
    finally:
        os.close(fd)


@pytest.mark.parametrize("known", [True, False])
def test_read_done_is_called_once_the_bytes_are_in_before_the_fstat_after_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, known: bool) -> None:
    """The read slot is given back at ``read_done``: the fstat that labels the
    bytes is a round trip of its own on a network store, not a read of bytes."""
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 64)
    events: list[str] = []
    real_fstat = os.fstat

    def fstat(fd: int) -> os.stat_result:
        events.append("fstat")
        return real_fstat(fd)

    fd = os.open(path, os.O_RDONLY)
    try:
        expected = stfs.backing.FileIdentity.of(os.fstat(fd)) if known else None
        monkeypatch.setattr(stfs.backing.os, "fstat", fstat)
        buf, identity = stfs.backing.pread_identified(
            fd, bytearray(4096), 4096, expected, read_done=lambda: events.append("done"))
    finally:
        monkeypatch.undo()
        os.close(fd)
    assert bytes(buf) == (bytes(range(256)) * 64)[4096:8192]
    assert identity == stfs.backing.FileIdentity.of(os.stat(path))
    assert events == (["done", "fstat"] if known else ["fstat", "done", "fstat"])
