"""The version guard on its own (through an engine's parts): identity checks,
and what a change means for a stream that served nothing, one whose bytes
are unchanged, one whose bytes changed, and one that shares the page cache
with handles still on the old version."""

from __future__ import annotations

import errno

import pytest

from stfs import versions
from stfs.engine import ReadEngine
from stfs.versions import IdentityChanged
from tests.engine.helpers import KIB, MIB, Source, make_engine, opened, run

CHUNK = 64 * KIB


def guard_engine(src: Source) -> ReadEngine:
    return make_engine(src, min_chunk=CHUNK, max_chunk=CHUNK)


def test_check_passes_an_unchanged_file_and_raises_on_a_change(src: Source) -> None:
    src.write("f", 2 * MIB, seed=1)
    engine = guard_engine(src)

    async def body() -> None:
        stream = opened(engine, src.open("f"))
        await engine.guard.check(stream)
        src.rewrite_in_place("f", seed=2)
        with pytest.raises(IdentityChanged) as caught:
            await engine.guard.check(stream)
        assert caught.value.identity == src.identity("f")

    run(engine, body)


class GuardClock:
    """The version guard's clock, moved by hand: the window after a confirmation is
    a span of this clock, not of a machine that may be too loaded to read a few
    chunks within it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_a_recent_confirmation_spares_the_fstat_before_a_new_chunk(
        src: Source, monkeypatch: pytest.MonkeyPatch) -> None:
    """Within recheck_s of a check (or a backing read that found the file
    unchanged) a new chunk is served without an fstat; then it checks again."""
    clock = GuardClock()
    monkeypatch.setattr(versions, "time", clock)
    old = src.write("f", 2 * MIB, seed=1)
    engine = make_engine(src, min_chunk=CHUNK, max_chunk=CHUNK, recheck_s=0.3)

    async def body() -> None:
        handle = src.open("f")
        stream = opened(engine, handle)
        assert engine.guard.check_due(stream)
        await engine.read(handle, 0, CHUNK)                 # read: confirmed now
        assert not engine.guard.check_due(stream)
        await engine.read(handle, 4 * CHUNK, CHUNK)
        src.rewrite_in_place("f", seed=2)
        # Within the window chunk 0, cached, is served again without a check...
        assert bytes(await engine.read(handle, 0, CHUNK)) == old[:CHUNK]
        clock.now += 0.25
        assert not engine.guard.check_due(stream)
        clock.now += 0.25
        assert engine.guard.check_due(stream)
        # ...after it, the next new chunk checks and finds the change (EIO: this
        # handle was served bytes that differ now).
        with pytest.raises(OSError) as caught:
            await engine.read(handle, 4 * CHUNK, CHUNK)
        assert caught.value.errno == errno.EIO

    run(engine, body)
    assert engine.counters.changed_files == 1


def test_a_stream_that_served_nothing_takes_the_new_version(src: Source) -> None:
    src.write("f", 2 * MIB, seed=1)
    engine = guard_engine(src)

    async def body() -> None:
        handle = src.open("f")
        stream = opened(engine, handle)
        src.rewrite_in_place("f", seed=2)
        await engine.guard.on_changed(stream, 0, src.identity("f"))
        assert handle.identity == src.identity("f")

    run(engine, body)
    assert engine.counters.changed_files == 0


@pytest.mark.parametrize("change", ["rewrite", "touch"])
def test_a_stream_that_served_bytes_goes_on_only_if_they_are_unchanged(
        src: Source, change: str) -> None:
    src.write("f", 2 * MIB, seed=1)
    engine = guard_engine(src)

    async def body() -> object:
        handle = src.open("f")
        stream = opened(engine, handle)
        for offset in range(0, 4 * CHUNK, CHUNK):
            await engine.read(handle, offset, CHUNK)
        if change == "rewrite":
            src.rewrite_in_place("f", seed=2)
        else:
            src.rewrite_in_place("f", seed=1)          # same bytes, a new mtime
        try:
            await engine.guard.on_changed(stream, 4 * CHUNK, src.identity("f"))
        except OSError as exc:
            return exc.errno
        return handle.identity == src.identity("f")

    outcome = run(engine, body)
    assert outcome == (errno.EIO if change == "rewrite" else True)
    assert engine.counters.changed_files == (1 if change == "rewrite" else 0)


def test_a_new_version_waits_while_other_handles_read_the_old_one(src: Source) -> None:
    src.write("f", 2 * MIB, seed=1)
    engine = guard_engine(src)

    async def body() -> object:
        old_reader, newcomer = src.open("f"), src.open("f")
        opened(engine, old_reader)
        stream = opened(engine, newcomer)
        src.rewrite_in_place("f", seed=2)
        with pytest.raises(OSError) as caught:
            await engine.guard.on_changed(stream, 0, src.identity("f"))
        return caught.value.errno

    assert run(engine, body) == errno.EIO
