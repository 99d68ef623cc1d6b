"""View without FUSE, driven by trio: what each request means in SOURCE terms."""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from stfs.backing import Backing
from stfs.config import MountConfig
from stfs.daemon import engine_config
from stfs.engine import ReadEngine
from stfs.inodes import ROOT_NODEID
from stfs.metrics import Counters
from stfs.view import View

MIB = 1024 * 1024


def make_view(source: Path) -> View:
    """A View over *source* with the engine at its default settings."""
    config = MountConfig(source=str(source), mountpoint="/nonexistent-mountpoint")
    backing = Backing(str(source))
    return View(backing, ReadEngine(engine_config(config), Counters(), opener=backing.open_file))


def run_with_view(source: Path, body: Callable[[View], Awaitable[Any]]) -> Any:
    """Run *body(view)* under trio with the engine's background tasks, then close the view."""
    view = make_view(source)

    async def main() -> Any:
        async with trio.open_nursery() as nursery:
            await nursery.start(view.engine.run)  # hosts read-ahead tasks
            try:
                return await body(view)
            finally:
                nursery.cancel_scope.cancel()

    try:
        return trio.run(main)
    finally:
        view.close()


def overwrite_in_place(path: Path, data: bytes, mtime_step_ns: int) -> None:
    """Change *path*'s content without changing its inode; move its mtime forward."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + mtime_step_ns))


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def src(tmp_path: Path) -> Path:
    s = tmp_path / "src"
    (s / "dir").mkdir(parents=True)
    (s / "hello.txt").write_bytes(b"hello, world\n")
    (s / "dir" / "deep.txt").write_bytes(b"deep\n")
    (s / "big.bin").write_bytes(os.urandom(3 * MIB + 17))
    return s


def test_lookup_getattr_open_read_release_round_trip(src: Path) -> None:
    async def body(view: View) -> None:
        node, st = await view.lookup(ROOT_NODEID, b"hello.txt")
        assert node.nodeid == os.stat(src / "hello.txt").st_ino
        assert st.st_size == 13
        attrs = await view.getattr(node.nodeid)
        assert attrs.st_ino == st.st_ino and attrs.st_size == 13
        handle, _ = await view.open(node.nodeid, os.O_RDONLY)
        assert bytes(await view.read(handle.fh, 0, 4096)) == b"hello, world\n"
        assert bytes(await view.read(handle.fh, 7, 5)) == b"world"
        assert bytes(await view.read(handle.fh, 13, 100)) == b""
        await view.release(handle.fh)
        assert view.handles.open_files == 0

    run_with_view(src, body)


def test_lookup_through_subdirectory_and_read(src: Path) -> None:
    async def body(view: View) -> None:
        d, _ = await view.lookup(ROOT_NODEID, b"dir")
        f, _ = await view.lookup(d.nodeid, b"deep.txt")
        handle, _ = await view.open(f.nodeid, os.O_RDONLY)
        try:
            assert bytes(await view.read(handle.fh, 0, 100)) == b"deep\n"
        finally:
            await view.release(handle.fh)

    run_with_view(src, body)


def test_reads_of_a_large_file_return_the_backing_bytes(src: Path) -> None:
    expected = (src / "big.bin").read_bytes()

    async def body(view: View) -> None:
        node, _ = await view.lookup(ROOT_NODEID, b"big.bin")
        handle, _ = await view.open(node.nodeid, os.O_RDONLY)
        try:
            for offset, size in [(0, 131072), (MIB + 5, 131072), (MIB - 10, 20),
                                 (3 * MIB, 4096), (len(expected) - 3, 4096)]:
                got = bytes(await view.read(handle.fh, offset, size))
                assert got == expected[offset:offset + size], (offset, size)
            # a sequential pass reassembles the whole file
            parts = []
            offset = 0
            while True:
                piece = bytes(await view.read(handle.fh, offset, 131072))
                if not piece:
                    break
                parts.append(piece)
                offset += len(piece)
            assert b"".join(parts) == expected
        finally:
            await view.release(handle.fh)

    run_with_view(src, body)


def test_lookup_of_missing_name_is_enoent(src: Path) -> None:
    async def body(view: View) -> None:
        with pytest.raises(OSError) as info:
            await view.lookup(ROOT_NODEID, b"nope")
        assert info.value.errno == errno.ENOENT

    run_with_view(src, body)


def test_getattr_of_replaced_path_answers_estale(src: Path) -> None:
    async def body(view: View) -> None:
        node, _ = await view.lookup(ROOT_NODEID, b"hello.txt")
        replacement = src / "hello.new"
        replacement.write_bytes(b"another file\n")
        os.replace(replacement, src / "hello.txt")
        with pytest.raises(OSError) as info:
            await view.getattr(node.nodeid)
        assert info.value.errno == errno.ESTALE
        # the kernel looks the name up again and gets the new file
        fresh, st = await view.lookup(ROOT_NODEID, b"hello.txt")
        assert fresh.nodeid == os.stat(src / "hello.txt").st_ino != node.nodeid
        assert st.st_size == len(b"another file\n")

    run_with_view(src, body)


def test_open_of_replaced_path_answers_estale(src: Path) -> None:
    async def body(view: View) -> None:
        node, _ = await view.lookup(ROOT_NODEID, b"hello.txt")
        replacement = src / "hello.new"
        replacement.write_bytes(b"another file\n")
        before = fd_count()
        os.replace(replacement, src / "hello.txt")
        with pytest.raises(OSError) as info:
            await view.open(node.nodeid, os.O_RDONLY)
        assert info.value.errno == errno.ESTALE
        assert fd_count() == before  # the descriptor opened to check was closed

    run_with_view(src, body)


def test_getattr_of_forgotten_node_answers_estale(src: Path) -> None:
    async def body(view: View) -> None:
        node, _ = await view.lookup(ROOT_NODEID, b"hello.txt")
        view.forget(node.nodeid, 1)
        with pytest.raises(OSError) as info:
            await view.getattr(node.nodeid)
        assert info.value.errno == errno.ESTALE

    run_with_view(src, body)


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC,
                                   os.O_WRONLY | os.O_APPEND])
def test_open_for_writing_answers_erofs(src: Path, flags: int) -> None:
    async def body(view: View) -> None:
        node, _ = await view.lookup(ROOT_NODEID, b"hello.txt")
        before = fd_count()
        with pytest.raises(OSError) as info:
            await view.open(node.nodeid, flags)
        assert info.value.errno == errno.EROFS
        assert fd_count() == before
        assert view.handles.open_files == 0

    run_with_view(src, body)
    assert (src / "hello.txt").read_bytes() == b"hello, world\n"


def test_keep_cache_only_while_the_file_is_unchanged(src: Path) -> None:
    path = src / "hello.txt"

    async def body(view: View) -> None:
        node, _ = await view.lookup(ROOT_NODEID, b"hello.txt")
        h1, keep1 = await view.open(node.nodeid, os.O_RDONLY)
        await view.release(h1.fh)
        assert keep1 is False, "first open: the kernel has nothing cached to keep"

        h2, keep2 = await view.open(node.nodeid, os.O_RDONLY)
        await view.release(h2.fh)
        assert keep2 is True, "unchanged file: cached pages may be kept"

        ino = path.stat().st_ino
        overwrite_in_place(path, b"HELLO, WORLD, AGAIN\n", 1_000_000_000)  # new size too
        assert path.stat().st_ino == ino
        h3, keep3 = await view.open(node.nodeid, os.O_RDONLY)
        try:
            assert keep3 is False, "changed file: cached pages must be dropped"
            assert bytes(await view.read(h3.fh, 0, 100)) == b"HELLO, WORLD, AGAIN\n"
        finally:
            await view.release(h3.fh)

        h4, keep4 = await view.open(node.nodeid, os.O_RDONLY)
        await view.release(h4.fh)
        assert keep4 is True

    run_with_view(src, body)


def test_keep_cache_false_after_same_size_rewrite_with_new_mtime(src: Path) -> None:
    path = src / "hello.txt"

    async def body(view: View) -> None:
        node, _ = await view.lookup(ROOT_NODEID, b"hello.txt")
        h1, _ = await view.open(node.nodeid, os.O_RDONLY)
        await view.release(h1.fh)
        size = path.stat().st_size
        overwrite_in_place(path, b"HELLO", 2_000_000_000)
        assert path.stat().st_size == size
        h2, keep = await view.open(node.nodeid, os.O_RDONLY)
        try:
            assert keep is False
            assert bytes(await view.read(h2.fh, 0, 100)) == b"HELLO, world\n"
        finally:
            await view.release(h2.fh)

    run_with_view(src, body)


def test_release_closes_the_backing_descriptor(src: Path) -> None:
    async def body(view: View) -> None:
        node, _ = await view.lookup(ROOT_NODEID, b"hello.txt")
        idle = fd_count()
        handles = [await view.open(node.nodeid, os.O_RDONLY) for _ in range(5)]
        assert fd_count() == idle + 5
        assert view.handles.open_files == 5
        for handle, _ in handles:
            await view.read(handle.fh, 0, 10)
            await view.release(handle.fh)
        assert fd_count() == idle
        assert view.handles.open_files == 0
        # releasing twice is harmless and closes nothing else
        await view.release(handles[0][0].fh)
        assert fd_count() == idle

    run_with_view(src, body)


def test_read_after_release_is_ebadf(src: Path) -> None:
    async def body(view: View) -> None:
        node, _ = await view.lookup(ROOT_NODEID, b"hello.txt")
        handle, _ = await view.open(node.nodeid, os.O_RDONLY)
        await view.release(handle.fh)
        with pytest.raises(OSError) as info:
            await view.read(handle.fh, 0, 10)
        assert info.value.errno == errno.EBADF

    run_with_view(src, body)


def test_close_frees_every_descriptor(src: Path) -> None:
    before = fd_count()
    view = make_view(src)

    async def body() -> None:
        node, _ = await view.lookup(ROOT_NODEID, b"hello.txt")
        for _ in range(3):
            await view.open(node.nodeid, os.O_RDONLY)

    trio.run(body)
    assert fd_count() == before + 4  # SOURCE's descriptor and three open files
    view.close()
    assert fd_count() == before


def test_open_of_a_directory_is_refused(src: Path) -> None:
    async def body(view: View) -> None:
        node, _ = await view.lookup(ROOT_NODEID, b"dir")
        with pytest.raises(OSError) as info:
            await view.open(node.nodeid, os.O_RDONLY)
        assert info.value.errno == errno.EISDIR

    run_with_view(src, body)
