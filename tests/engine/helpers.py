"""Helpers shared by the engine tests: a temporary SOURCE, an engine on it,
trio runners and reading loops. Fakes live in ``tests.engine.fakes``."""

from __future__ import annotations

import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
import trio.testing

from stfs.backing import Backing, FileIdentity
from stfs.backing_reads import BackingReader
from stfs.checksums import ChecksumStore
from stfs.engine import EngineConfig, ReadEngine
from stfs.handles import HandleTable, OpenFile
from stfs.metrics import Counters
from stfs.streams import Stream

KIB = 1024
MIB = 1024 * KIB
KERNEL_REQUEST = 128 * KIB       # what the kernel sends by default (read_ahead_kb)
LARGE_REQUEST = 1 * MIB          # what it sends with max_pages 256


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


class Source:
    """A temporary SOURCE directory with files, opened the way View.open does."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.backing = Backing(str(root))
        self.handles = HandleTable()
        self.data: dict[str, bytes] = {}
        self._nodeids: dict[str, int] = {}

    def write(self, name: str, size: int, seed: int | None = None) -> bytes:
        data = payload(size, seed if seed is not None else size ^ len(name))
        (self.root / name).write_bytes(data)
        self.data[name] = data
        return data

    def rewrite_in_place(self, name: str, seed: int) -> bytes:
        """New bytes of the same size in the same inode, with a later mtime."""
        path = self.root / name
        st = path.stat()
        data = payload(st.st_size, seed)
        with open(path, "r+b") as f:
            f.write(data)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        self.data[name] = data
        return data

    def identity(self, name: str) -> FileIdentity:
        return FileIdentity.of(os.stat(self.root / name))

    def open(self, name: str) -> OpenFile:
        fd, st = self.backing.open_file(name.encode())
        nodeid = self._nodeids.setdefault(name, len(self._nodeids) + 2)
        return self.handles.add_file(nodeid, name.encode(), fd, FileIdentity.of(st))

    def close(self) -> None:
        self.handles.close_all()
        self.backing.close()


DEFAULTS: dict[str, Any] = {"memory_limit": 50 * MIB, "cache_limit": 37 * MIB,
                            "max_streams": 10, "min_chunk": 4096, "max_chunk": 1 * MIB}


def make_engine(source: Source | None = None, *, reader: BackingReader | None = None,
                checksums: ChecksumStore | None = None, **config: Any) -> ReadEngine:
    """An engine with the daemon's defaults at a 50M limit, overridden by *config*
    (``EngineConfig`` fields). *source*: reopen its files through its backing and
    share its handle table (which handles of a node are open)."""
    return ReadEngine(EngineConfig(**{**DEFAULTS, **config}), Counters(),
                      opener=source.backing.open_file if source else None, reader=reader,
                      checksums=checksums,
                      handles_of=source.handles.files_of_node if source else lambda _n: ())


def run(engine: ReadEngine, body: Callable[[], Awaitable[Any]], timeout: float = 20) -> Any:
    """Run *body* under trio with the engine's background tasks (read-ahead) hosted."""
    result: list[Any] = []

    async def main() -> None:
        with trio.fail_after(timeout):
            async with trio.open_nursery() as nursery:
                await nursery.start(engine.run)
                result.append(await body())
                nursery.cancel_scope.cancel()

    trio.run(main)
    return result[0]


def mock_run(engine: ReadEngine, body: Callable[[], Awaitable[Any]]) -> Any:
    """Like ``run`` but on trio's MockClock (sleeps are instant; no fail_after, which
    the clock's autojump would fire while a worker thread reads)."""
    result: list[Any] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            result.append(await body())
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return result[0]


async def read_all(engine: ReadEngine, handle: OpenFile, request: int,
                   start: int = 0) -> bytes:
    """Read like a program does: back-to-back requests until a short/empty reply.

    Between requests the event loop runs (in the daemon it waits for the
    kernel's next request), which is when read-ahead tasks make progress."""
    out = bytearray()
    offset = start
    while True:
        got = await engine.read(handle, offset, request)
        out += got
        offset += len(got)
        await trio.lowlevel.checkpoint()
        if len(got) < request:
            return bytes(out)


async def read_to_size(engine: ReadEngine, handle: OpenFile, request: int) -> bytes:
    """Read like the kernel does: it knows the size and never asks past the end."""
    out = bytearray()
    size = handle.identity.size
    while len(out) < size:
        got = await engine.read(handle, len(out), min(request, size - len(out)))
        assert len(got) > 0
        out += got
        await trio.lowlevel.checkpoint()
    return bytes(out)


WAIT_S = 30.0
"""How long ``wait_until`` waits: what takes milliseconds on an idle machine can take
seconds on a loaded one, and a wait for a condition costs nothing when it is met."""


async def wait_until(predicate: Callable[[], bool], timeout: float = WAIT_S) -> None:
    """Poll *predicate* until it is true (fails after *timeout*)."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


async def settle(engine: ReadEngine) -> None:
    """Let scheduled read-ahead start and finish."""
    # Every task scheduled so far has run up to where it waits (for a read slot,
    # a worker thread...): read-ahead scheduled before this call is registered.
    await trio.testing.wait_all_tasks_blocked()
    await wait_until(lambda: engine.budget.speculative_bytes == 0
                     and "readahead" not in engine.resources.counts())
    await trio.testing.wait_all_tasks_blocked()


def opened(engine: ReadEngine, handle: OpenFile) -> Stream:
    """Open *handle* in *engine* and give its stream (as a first read would make it)."""
    engine.open(handle)
    stream, _ = engine.streams.of(handle)
    return stream


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))
