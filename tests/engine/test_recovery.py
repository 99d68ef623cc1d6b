"""Recovery (issue 6): checkpoints and whole-file checksums of what each stream
served (StreamVerifier on its own, then through the engine and the checksum
store), files that change under a reader in the middle of a pass, resuming
after a transient backing error, configurable retry policies and reopening
after ESTALE/EBADF. Faults are injected by monkeypatching the engine's thread
read; trio's MockClock makes backoff instant."""

from __future__ import annotations

import errno
import logging
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import xxhash

from stfs import retry
from stfs.backing import FileIdentity
from stfs.budget import MemoryBudget
from stfs.checksums import ChecksumStore, racy_window_ns
from stfs.engine import ReadEngine
from stfs.handles import OpenFile
from stfs.recovery import CHECKPOINT_CHUNKS, MAX_REORDER_BYTES, Piece, StreamVerifier
from stfs.retry import RetryPolicy, RetrySettings
from tests.engine.fakes import FakeBacking, flip_bit_at
from tests.engine.helpers import (
    KIB,
    MIB,
    Source,
    make_engine,
    mock_run,
    payload,
    read_all,
    run,
    settle,
    wait_until,
)

IDENT = FileIdentity(dev=2049, ino=77, size=0, mtime_ns=1, ctime_ns=2)


def xxh128(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def xxh64(data: bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


def chained(data: bytes, start: int, end: int) -> Piece:
    """A piece of a run from offset 0: its digest is the xxh3-128 of the run so far."""
    return Piece(start, end, xxhash.xxh3_128_intdigest(data[:end]))


def assert_replayable(pieces: list[Piece], data: bytes) -> None:
    """Each piece's digest is reproduced from the bytes it covers, and from no others."""
    for piece in pieces:
        served = data[piece.start:piece.end]
        assert piece.digest_of(served) == piece.digest
        altered = bytes([served[0] ^ 1]) + served[1:]
        assert piece.digest_of(altered) != piece.digest


class Reservations:
    """reserve/release for a verifier, with a tally (and an optional refusal)."""

    def __init__(self, allow: bool = True) -> None:
        self.allow = allow
        self.held = 0
        self.peak = 0
        self.reserved = 0
        self.released = 0

    def reserve(self, n: int) -> bool:
        if not self.allow:
            return False
        self.held += n
        self.reserved += n
        self.peak = max(self.peak, self.held)
        return True

    def release(self, n: int) -> None:
        self.held -= n
        self.released += n
        assert self.held >= 0


def verifier_for(data: bytes, res: Reservations | None = None) -> tuple[StreamVerifier,
                                                                        Reservations]:
    res = res or Reservations()
    return StreamVerifier(IDENT._replace(size=len(data)), res.reserve, res.release), res


def requests(size: int, request: int) -> list[tuple[int, int]]:
    return [(o, min(request, size - o)) for o in range(0, size, request)]


def serve(verifier: StreamVerifier, data: bytes, order: list[tuple[int, int]],
          chunk: int = 64 * KIB, sequential: bool = True) -> list[str]:
    digests = []
    for offset, n in order:
        got = verifier.served(offset, data[offset:offset + n], chunk, sequential)
        if got is not None:
            digests.append(got)
    return digests


# -- StreamVerifier: pieces and checkpoints -------------------------------------------

def test_pieces_per_chunk_and_a_checkpoint_every_five() -> None:
    chunk = 4096
    data = payload(10 * chunk + 1500, 1)
    v, _ = verifier_for(data)
    assert CHECKPOINT_CHUNKS == 5
    serve(v, data, requests(len(data), 1000), chunk)        # requests across chunk ends
    assert v.checkpoints == 2
    cp = v.checkpoint
    assert cp is not None
    assert (cp.offset, cp.identity) == (10 * chunk, v.identity)
    assert cp.last == chained(data, 9 * chunk, 10 * chunk)
    span = xxhash.xxh3_64()
    for i in range(5, 10):
        span.update(chained(data, i * chunk, (i + 1) * chunk).digest.to_bytes(16, "little"))
    assert cp.digest == span.intdigest()
    assert v.pending_pieces == []
    assert v.pieces_to_verify() == [cp.last, chained(data, 10 * chunk, len(data))]
    assert_replayable(v.pieces_to_verify(), data)


def test_pieces_to_verify_are_the_checkpointed_piece_pending_pieces_and_the_partial_one(
        ) -> None:
    chunk = 8192
    data = payload(7 * chunk + 100, 2)
    v, _ = verifier_for(data)
    serve(v, data[:7 * chunk + 100], requests(7 * chunk + 100, 3000), chunk)
    pieces = v.pieces_to_verify()
    expected = [chained(data, i * chunk, (i + 1) * chunk) for i in (4, 5, 6)]
    expected.append(chained(data, 7 * chunk, 7 * chunk + 100))
    assert pieces == expected
    assert_replayable(pieces, data)
    assert v.checkpoints == 1 and v.checkpoint is not None
    assert v.checkpoint.last == expected[0]
    assert v.pending_pieces == expected[1:3]


def test_no_checkpoint_and_nothing_to_verify_before_anything_is_served() -> None:
    v, _ = verifier_for(payload(4096, 3))
    assert v.pieces_to_verify() == []
    assert v.checkpoint is None and not v.served_anything()
    assert v.continues(0) and not v.served_anything()  # a fresh verifier waits for a pass from 0


def test_piece_sizes_follow_the_chunk_size_passed_with_each_request() -> None:
    data = payload(64 * KIB, 4)
    v, _ = verifier_for(data)
    v.served(0, data[:4096], 4096)                   # one 4K piece
    v.served(4096, data[4096:12288], 8192)           # one 8K piece
    v.served(12288, data[12288:16384], 16384)        # a partial 16K piece
    assert v.pieces_to_verify() == [chained(data, 0, 4096), chained(data, 4096, 12288),
                                    chained(data, 12288, 16384)]
    assert_replayable(v.pieces_to_verify(), data)


def test_a_run_that_starts_past_zero_hashes_each_piece_on_its_own() -> None:
    data = payload(64 * KIB, 9)
    v, _ = verifier_for(data)
    v.served(8192, data[8192:16384], 4096, sequential=False)
    v.served(16384, data[16384:20000], 4096)
    assert v.pieces_to_verify() == [Piece(8192, 12288, xxh64(data[8192:12288])),
                                    Piece(12288, 16384, xxh64(data[12288:16384])),
                                    Piece(16384, 20000, xxh64(data[16384:20000]))]
    assert_replayable(v.pieces_to_verify(), data)


def test_retarget_keeps_the_checkpoints_under_the_new_identity_and_drops_the_checksum(
        ) -> None:
    chunk = 4096
    data = payload(6 * chunk, 5)
    v, _ = verifier_for(data)
    serve(v, data, requests(6 * chunk - 1, chunk), chunk)
    newer = v.identity._replace(size=len(data) + 10, mtime_ns=99)
    v.retarget(newer)
    assert v.identity == newer and v.checkpoint is not None
    assert v.checkpoint.identity == newer and v.checkpoint.offset == 5 * chunk
    assert v.served(6 * chunk - 1, data[-1:], chunk) is None     # no checksum any more


# -- StreamVerifier: the whole-file checksum ----------------------------------------------

@pytest.mark.parametrize("size", [1, 4095, 4096, 700 * KIB + 3, 3 * MIB + 17])
@pytest.mark.parametrize("req_size", [4096, 128 * KIB, 1 * MIB, 1000, 8 * MIB])
def test_a_pass_from_zero_to_eof_yields_the_files_xxh3_128_once(size: int,
                                                                 req_size: int) -> None:
    data = payload(size, size)
    v, res = verifier_for(data)
    assert serve(v, data, requests(size, req_size)) == [xxh128(data)]
    assert res.reserved == 0                                   # in order: no buffering


def test_the_checksum_is_given_once_and_not_again_for_bytes_served_again() -> None:
    data = payload(300 * KIB, 6)
    v, _ = verifier_for(data)
    assert serve(v, data, requests(len(data), 64 * KIB)) == [xxh128(data)]
    assert serve(v, data, [(200 * KIB, 100 * KIB)]) == []          # the tail re-read


def test_overlapping_requests_hash_each_byte_once() -> None:
    data = payload(256 * KIB, 7)
    v, _ = verifier_for(data)
    order = [(0, 64 * KIB), (32 * KIB, 64 * KIB), (96 * KIB, 4096), (64 * KIB, 100 * KIB),
             (100 * KIB, 156 * KIB)]
    assert serve(v, data, order) == [xxh128(data)]


def swapped_pairs(reqs: list[tuple[int, int]], first: int = 0) -> list[tuple[int, int]]:
    """Requests from *first* on in swapped pairs (1, 0, 3, 2, ...)."""
    out = list(reqs[:first])
    rest = reqs[first:]
    for i in range(0, len(rest) - 1, 2):
        out += [rest[i + 1], rest[i]]
    if len(rest) % 2:
        out.append(rest[-1])
    return out


def kernel_like(reqs: list[tuple[int, int]], in_flight: int, seed: int,
                first: int = 1) -> list[tuple[int, int]]:
    """Completion order of requests sent *in_flight* at a time: each window finishes
    in a random order (the first *first* requests alone, in order)."""
    rng = random.Random(seed)
    out = list(reqs[:first])
    for i in range(first, len(reqs), in_flight):
        window = reqs[i:i + in_flight]
        rng.shuffle(window)
        out += window
    return out


@pytest.mark.parametrize("req_size", [4096, 128 * KIB, 1 * MIB])
def test_out_of_order_pairs_after_the_first_request_still_give_the_checksum(
        req_size: int) -> None:
    data = payload(5 * MIB + 123, 8)
    v, res = verifier_for(data)
    assert serve(v, data, swapped_pairs(requests(len(data), req_size), first=1)) == [
        xxh128(data)]
    assert res.reserved > 0 and res.peak <= 2 * req_size          # only what waited
    assert res.held == 0 and res.reserved == res.released         # all given back
    assert v.ahead_bytes == 0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("in_flight", [2, 4, 8])
def test_kernel_like_completion_order_still_gives_the_checksum(seed: int,
                                                               in_flight: int) -> None:
    data = payload(4 * MIB + 4097, seed)
    v, res = verifier_for(data)
    order = kernel_like(requests(len(data), 128 * KIB), in_flight, seed)
    assert order != requests(len(data), 128 * KIB)
    assert serve(v, data, order) == [xxh128(data)]
    assert res.held == 0 and res.reserved == res.released > 0
    assert res.peak <= (in_flight - 1) * 128 * KIB


def test_swapped_pairs_from_the_very_first_request_still_give_the_checksum() -> None:
    data = payload(3 * MIB + 17, 9)
    v, res = verifier_for(data)
    assert serve(v, data, swapped_pairs(requests(len(data), 128 * KIB))) == [xxh128(data)]
    assert res.held == 0 and v.ahead_bytes == 0


def test_a_non_sequential_request_not_at_the_position_starts_a_new_run() -> None:
    data = payload(1 * MIB, 10)
    v, res = verifier_for(data)
    v.served(0, data[:64 * KIB], 64 * KIB)
    assert v.served(128 * KIB, data[128 * KIB:192 * KIB], 64 * KIB, sequential=False) is None
    assert (v.run_start, v.position) == (128 * KIB, 192 * KIB)
    assert res.reserved == 0                                       # nothing waited
    # the rest of the file from there: no checksum (the run did not start at 0)
    assert serve(v, data, requests(len(data), 64 * KIB)[3:]) == []
    # a new pass from 0 gives it
    assert serve(v, data, requests(len(data), 64 * KIB), sequential=False) == [xxh128(data)]


def test_a_request_far_beyond_the_reorder_window_starts_a_new_run() -> None:
    data = payload(MAX_REORDER_BYTES + 2 * MIB, 11)
    v, res = verifier_for(data)
    v.served(0, data[:64 * KIB], 64 * KIB)
    assert v.continues(64 * KIB + MAX_REORDER_BYTES)
    far = 64 * KIB + MAX_REORDER_BYTES + 1
    assert not v.continues(far)
    v.served(far, data[far:far + 4096], 64 * KIB)
    assert (v.run_start, v.position) == (far, far + 4096) and res.reserved == 0


def test_a_reorder_buffer_over_its_bound_gives_the_run_up_and_releases_everything() -> None:
    data = payload(MAX_REORDER_BYTES + 4 * MIB, 12)
    v, res = verifier_for(data)
    v.served(0, data[:1 * MIB], 1 * MIB)
    # the request at 1 MiB never comes; everything after it waits...
    offset = 2 * MIB
    while v.ahead_bytes + 1 * MIB <= MAX_REORDER_BYTES:
        v.served(offset, data[offset:offset + 1 * MIB], 1 * MIB)
        offset += 1 * MIB
    assert v.ahead_bytes == MAX_REORDER_BYTES and res.held == MAX_REORDER_BYTES
    v.served(offset, data[offset:offset + 1 * MIB], 1 * MIB)       # ...until it overflows
    assert v.ahead_bytes == 0 and res.held == 0
    assert (v.run_start, v.position) == (offset, offset + 1 * MIB)


def test_a_refused_reservation_gives_the_run_up_instead_of_holding_memory() -> None:
    data = payload(1 * MIB, 13)
    res = Reservations(allow=False)
    v, _ = verifier_for(data, res)
    v.served(0, data[:128 * KIB], 128 * KIB)
    assert v.served(256 * KIB, data[256 * KIB:384 * KIB], 128 * KIB) is None
    assert v.ahead_bytes == 0 and v.run_start == 256 * KIB
    assert serve(v, data, requests(len(data), 128 * KIB)[1:]) == []   # the pass is gone


def test_free_buffers_and_reset_give_back_the_reorder_buffer() -> None:
    data = payload(1 * MIB, 14)
    v, res = verifier_for(data)
    v.served(0, data[:128 * KIB], 128 * KIB)
    v.served(256 * KIB, data[256 * KIB:384 * KIB], 128 * KIB)
    v.served(512 * KIB, data[512 * KIB:640 * KIB], 128 * KIB)
    assert res.held == v.ahead_bytes == 256 * KIB
    assert v.free_buffers() == 256 * KIB
    assert res.held == 0 and v.run_start == 0 and v.position == 0 and v.pieces_to_verify() == []
    assert v.free_buffers() == 0
    v.served(0, data[:128 * KIB], 128 * KIB)
    v.served(256 * KIB, data[256 * KIB:384 * KIB], 128 * KIB)
    v.reset()
    assert res.held == 0 and res.reserved == res.released


def test_the_reorder_buffer_through_a_real_budget_balances() -> None:
    budget = MemoryBudget(16 * MIB)
    data = payload(6 * MIB, 15)
    def release(n: int) -> None:
        budget.speculative_done(n)
        budget.release(n)

    v = StreamVerifier(IDENT._replace(size=len(data)), budget.try_reserve_speculative, release)
    order = kernel_like(requests(len(data), 128 * KIB), 6, 15)
    assert serve(v, data, order) == [xxh128(data)]
    assert budget.peak_held_bytes > 0
    assert budget.held_bytes == 0 and budget.speculative_bytes == 0


class Pins:
    """A verifier's *keep*: pins taken and given back, each giving back *frees* bytes."""

    def __init__(self, frees: int = 0) -> None:
        self.held = 0
        self.taken = 0
        self.frees = frees

    def keep(self) -> Callable[[], int]:
        self.held += 1
        self.taken += 1
        given = []

        def give_back() -> int:
            assert not given, "a pin given back twice"
            given.append(True)
            self.held -= 1
            return self.frees
        return give_back


def test_out_of_order_bytes_that_can_be_kept_wait_pinned_without_a_reservation() -> None:
    data = payload(2 * MIB + 5, 16)
    v, res = verifier_for(data, Reservations(allow=False))   # no room for any copy
    pins = Pins()
    digests = []
    for offset, n in kernel_like(requests(len(data), 128 * KIB), 6, 16):
        view = memoryview(bytearray(data[offset:offset + n]))
        got = v.served(offset, view, 64 * KIB, keep=pins.keep)
        if got is not None:
            digests.append(got)
    assert digests == [xxh128(data)]
    assert pins.taken > 0 and pins.held == 0 and res.reserved == 0
    assert v.ahead_bytes == v.reserved_bytes == 0


def test_a_reply_that_cannot_be_kept_is_copied_into_reserved_room() -> None:
    data = payload(1 * MIB, 17)
    v, res = verifier_for(data)
    v.served(0, data[:128 * KIB], 128 * KIB)
    v.served(256 * KIB, data[256 * KIB:384 * KIB], 128 * KIB, keep=lambda: None)
    assert res.held == v.reserved_bytes == v.ahead_bytes == 128 * KIB
    assert serve(v, data, [(128 * KIB, 128 * KIB)] + requests(len(data), 128 * KIB)[3:]) == [
        xxh128(data)]
    assert res.held == v.reserved_bytes == 0


def test_free_buffers_gives_back_pins_and_copies_and_says_what_that_freed() -> None:
    data = payload(1 * MIB, 18)
    v, res = verifier_for(data)
    pins = Pins(frees=7)
    v.served(0, data[:128 * KIB], 128 * KIB)
    v.served(256 * KIB, data[256 * KIB:384 * KIB], 128 * KIB, keep=pins.keep)
    v.served(512 * KIB, data[512 * KIB:640 * KIB], 128 * KIB)               # copied
    assert (pins.held, res.held, v.ahead_bytes) == (1, 128 * KIB, 256 * KIB)
    assert v.free_buffers() == 7 + 128 * KIB
    assert (pins.held, res.held, v.ahead_bytes, v.position) == (0, 0, 0, 0)
    v.served(0, data[:128 * KIB], 128 * KIB)
    v.served(256 * KIB, data[256 * KIB:384 * KIB], 128 * KIB, keep=pins.keep)
    v.reset()
    assert pins.held == 0 and pins.taken == 2


# -- the engine: whole-file checksums ---------------------------------------------------

@pytest.mark.parametrize(("size", "req_size"), [
    (1, 4096), (700 * KIB, 4096), (700 * KIB, 128 * KIB), (3 * MIB + 17, 128 * KIB),
    (3 * MIB + 17, 1 * MIB), (9 * MIB, 128 * KIB), (2 * MIB, 3 * MIB)])
def test_the_engine_keeps_the_checksum_of_every_full_pass(src: Source, size: int,
                                                          req_size: int) -> None:
    data = src.write("f", size, seed=size)
    engine = make_engine()

    async def body() -> FileIdentity:
        handle = src.open("f")
        assert await read_all(engine, handle, req_size) == data
        return handle.identity

    identity = run(engine, body)
    assert engine.checksums.known() == {identity: xxh128(data)}
    assert engine.counters.checksums_computed == 1
    assert engine.budget.held_bytes == engine.cache.cached_bytes


def test_no_checksum_for_a_pass_that_did_not_start_at_zero_or_did_not_reach_the_end(
        src: Source) -> None:
    data = src.write("f", 3 * MIB, seed=1)
    engine = make_engine()

    async def body() -> None:
        tail = src.open("f")
        assert await read_all(engine, tail, 128 * KIB, start=4096) == data[4096:]
        head = src.open("f")
        for offset in range(0, 2 * MIB, 128 * KIB):
            await engine.read(head, offset, 128 * KIB)

    run(engine, body)
    assert engine.checksums.known() == {} and engine.counters.checksums_computed == 0


def test_out_of_order_replies_after_the_first_still_give_the_checksum(
        src: Source) -> None:
    data = src.write("f", 4 * MIB + 17, seed=2)
    engine = make_engine()

    async def body() -> FileIdentity:
        handle = src.open("f")
        for offset, n in swapped_pairs(requests(len(data), 128 * KIB), first=1):
            assert bytes(await engine.read(handle, offset, n)) == data[offset:offset + n]
        await wait_until(lambda: engine.budget.speculative_bytes == 0)
        assert engine.budget.held_bytes == engine.cache.cached_bytes   # nothing waits
        return handle.identity

    assert run(engine, body) in engine.checksums.known()
    assert list(engine.checksums.known().values()) == [xxh128(data)]


def test_a_small_file_read_with_replies_out_of_order_still_gets_its_checksum(
        src: Source) -> None:
    data = src.write("s", 700 * KIB, seed=3)
    engine = make_engine()

    async def body() -> FileIdentity:
        handle = src.open("s")
        for offset, n in swapped_pairs(requests(len(data), 128 * KIB), first=1):
            assert bytes(await engine.read(handle, offset, n)) == data[offset:offset + n]
        return handle.identity

    identity = run(engine, body)
    assert engine.checksums.known().get(identity) == xxh128(data)


def test_concurrent_first_reads_completing_out_of_order_still_give_the_checksum(
        src: Source) -> None:
    data = src.write("f", 3 * MIB + 17, seed=4)
    engine = make_engine()

    async def body() -> tuple[FileIdentity, int]:
        handle = src.open("f")
        for offset, n in swapped_pairs(requests(len(data), 128 * KIB)):
            assert bytes(await engine.read(handle, offset, n)) == data[offset:offset + n]
        await settle(engine)                          # read-ahead done
        return handle.identity, engine.budget.held_bytes - engine.cache.cached_bytes

    identity, waiting = run(engine, body)
    assert (engine.checksums.known().get(identity), waiting) == (xxh128(data), 0)


def test_out_of_order_replies_get_the_checksum_with_no_room_to_copy_them(
        src: Source, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full budget (read-ahead's room refused, as at a small --memory-limit with
    a disk cache) still gives the checksum: a waiting reply keeps its cached chunk
    pinned instead of a copy, even when the cache evicts that chunk meanwhile."""
    data = src.write("f", 4 * MIB + 17, seed=6)
    engine = make_engine()
    monkeypatch.setattr(engine.budget, "try_reserve_speculative",
                        lambda n, evict=False: False)

    async def body() -> FileIdentity:
        handle = src.open("f")
        for i, (offset, n) in enumerate(swapped_pairs(requests(len(data), 128 * KIB), first=1)):
            assert bytes(await engine.read(handle, offset, n)) == data[offset:offset + n]
            if i % 2 == 1:
                engine.cache.shrink_to(0)      # evicts chunks a waiting reply is a view of
                waiting = sum(s.verifier.ahead_bytes for s in engine.streams)
                assert waiting > 0 and engine.budget.held_bytes >= waiting   # still held
        assert engine.budget.held_bytes == engine.cache.cached_bytes   # nothing waits
        return handle.identity

    identity = run(engine, body)
    assert engine.checksums.known().get(identity) == xxh128(data)
    assert engine.counters.checksums_computed == 1


def test_concurrent_reads_of_a_pass_are_exact_and_leave_the_budget_balanced(
        src: Source) -> None:
    """Kernel-like: several requests of one handle in flight at once. Whatever
    order they complete in, every reply is exact and, once the handle is
    released, nothing stays reserved; when the checksum comes it is right."""
    data = src.write("f", 6 * MIB + 5, seed=5)
    engine = make_engine()

    async def body() -> FileIdentity:
        handle = src.open("f")
        got: dict[int, bytes] = {}
        reqs = requests(len(data), 128 * KIB)
        got[0] = bytes(await engine.read(handle, 0, 128 * KIB))

        async def one(offset: int, n: int) -> None:
            got[offset] = bytes(await engine.read(handle, offset, n))

        for i in range(1, len(reqs), 4):
            async with trio.open_nursery() as nursery:
                for offset, n in reqs[i:i + 4]:
                    nursery.start_soon(one, offset, n)
        assert b"".join(got[o] for o, _ in reqs) == data
        identity = handle.identity
        await engine.release(handle)
        await wait_until(lambda: engine.budget.speculative_bytes == 0)
        assert engine.budget.held_bytes == engine.cache.cached_bytes
        return identity

    identity = run(engine, body)
    assert engine.checksums.known().get(identity, xxh128(data)) == xxh128(data)


@pytest.fixture
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


def test_a_full_pass_checksum_is_recorded_in_the_state_dir_and_survives_a_remount(
        src: Source, state_dir: Path) -> None:
    data = src.write("f", 2 * MIB + 3, seed=6)
    store = ChecksumStore(state_dir)
    engine = make_engine(checksums=store)

    async def body() -> FileIdentity:
        handle = src.open("f")
        assert await read_all(engine, handle, 128 * KIB) == data
        await wait_until(lambda: store.get(handle.identity) is not None)
        assert await engine.checksum_of(handle.identity) == xxh128(data)
        return handle.identity

    identity = run(engine, body)
    store.close()
    remounted = ChecksumStore(state_dir)
    assert remounted.get(identity) == xxh128(data)
    # a fresh engine (no recent checksums) finds it in the store
    later = make_engine(checksums=remounted)

    async def ask() -> str | None:
        return await later.checksum_of(identity)

    assert run(later, ask) == xxh128(data)
    assert later.checksums.known() == {}
    assert engine.counters.corruptions_detected == 0
    remounted.close()


def test_bytes_that_change_without_their_identity_are_reported_as_corruption(
        src: Source, state_dir: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    data = src.write("f", 2 * MIB, seed=7)
    wait_out_racy_window(src.identity("f"))      # else a mismatch replaces the record
    store = ChecksumStore(state_dir)
    first = make_engine(checksums=store)

    async def full_pass(engine: ReadEngine, recorded: Callable[[], bool]) -> FileIdentity:
        handle = src.open("f")
        got = await read_all(engine, handle, 128 * KIB)
        assert len(got) == len(data)
        assert engine.counters.checksums_computed == 1
        await wait_until(recorded)                   # the record runs as a background task
        await trio.sleep(0.05)
        return handle.identity

    identity = run(first, lambda: full_pass(first, lambda: store.get(src.identity("f"))
                                            is not None))
    assert store.get(identity) == xxh128(data)
    assert first.counters.corruptions_detected == 0

    rotten = FakeBacking(corrupt=flip_bit_at(1000))  # a bit flipped on the way: same identity
    second = make_engine(reader=rotten, checksums=store, inline_cached_reads=False)
    with caplog.at_level(logging.ERROR, logger="stfs"):
        assert run(second, lambda: full_pass(
            second, lambda: second.counters.corruptions_detected > 0)) == identity
        assert second.counters.corruptions_detected == 1
    rotten_data = bytearray(data)
    rotten_data[1000] ^= 0x40
    assert second.counters.checksums_computed == 1
    assert store.get(identity) == xxh128(data)                   # the first one stays
    assert second.checksums.known()[identity] == xxh128(data)     # and is the one known
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    message = errors[0].getMessage()
    assert "CORRUPTION" in message and "f" in message
    assert xxh128(data) in message and xxh128(bytes(rotten_data)) in message
    store.close()


# -- the engine: a file that changes in the middle of a pass ---------------------------------

CHUNK = 64 * KIB


def pass_engine(source: Source | None = None, **config: Any) -> ReadEngine:
    """Fixed 64K chunks and 64K requests: each request starts a new chunk, so
    each is checked against the file's identity before being served."""
    return make_engine(source, min_chunk=CHUNK, max_chunk=CHUNK, **config)


async def read_until(engine: ReadEngine, handle: OpenFile, end: int,
                     start: int = 0) -> bytes:
    out = bytearray()
    offset = start
    while offset < end:
        got = bytes(await engine.read(handle, offset, CHUNK))
        assert got
        out += got
        offset += len(got)
        await trio.lowlevel.checkpoint()
    return bytes(out)


def test_an_in_place_rewrite_in_the_middle_of_a_pass_fails_the_pass_with_eio(
        src: Source, caplog: pytest.LogCaptureFixture) -> None:
    old = src.write("movie.bin", 8 * MIB, seed=1)
    engine = pass_engine()

    async def body() -> bytes:
        handle = src.open("movie.bin")
        assert await read_until(engine, handle, 512 * KIB) == old[:512 * KIB]
        new = src.rewrite_in_place("movie.bin", seed=2)
        with caplog.at_level(logging.WARNING, logger="stfs"), \
                pytest.raises(OSError) as caught:
            await engine.read(handle, 512 * KIB, CHUNK)
        assert caught.value.errno == errno.EIO
        for offset in (512 * KIB, 576 * KIB, 1 * MIB):         # the pass stays failed
            with pytest.raises(OSError) as again:
                await engine.read(handle, offset, CHUNK)
            assert again.value.errno == errno.EIO
        # so does a read far from the pass: the handle was served bytes that changed
        with pytest.raises(OSError) as far:
            await engine.read(handle, 6 * MIB, CHUNK)
        assert far.value.errno == errno.EIO
        # a read at offset 0 starts a new pass, of the new version
        assert bytes(await engine.read(handle, 0, CHUNK)) == new[:CHUNK]
        assert handle.identity == src.identity("movie.bin")
        return new

    run(engine, body)
    assert engine.counters.changed_files == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "movie.bin" in warnings[0] and "changed" in warnings[0]
    assert engine.counters.errors == 5


def test_after_a_failed_pass_a_new_pass_from_zero_gets_the_new_version(
        src: Source) -> None:
    old = src.write("f", 4 * MIB, seed=1)
    engine = pass_engine()

    async def body() -> tuple[FileIdentity, bytes]:
        handle = src.open("f")
        assert await read_until(engine, handle, 512 * KIB) == old[:512 * KIB]
        new = src.rewrite_in_place("f", seed=2)
        with pytest.raises(OSError):
            await engine.read(handle, 512 * KIB, CHUNK)
        assert await read_all(engine, handle, CHUNK) == new
        return handle.identity, new

    identity, new = run(engine, body)
    assert identity == src.identity("f")
    assert engine.counters.changed_files == 1 and engine.counters.errors == 1
    assert engine.counters.checksums_computed == 1               # the new pass was whole
    assert list(engine.checksums.known().values()) == [xxh128(new)]


def wait_out_racy_window(identity: FileIdentity) -> None:
    """Checksums recorded within the file system's timestamp granularity after a
    write may be replaced (racy); wait until a record of *identity* is not."""
    import time
    left = identity.ctime_ns + racy_window_ns(identity.ctime_ns) - time.time_ns()
    if left > 0:
        time.sleep(left / 1e9 + 0.01)


def test_a_new_pass_after_a_change_is_checksummed_under_the_new_identity(
        src: Source, state_dir: Path) -> None:
    old = src.write("f", 2 * MIB, seed=31)
    wait_out_racy_window(src.identity("f"))
    store = ChecksumStore(state_dir)
    engine = pass_engine(checksums=store)

    async def body() -> tuple[FileIdentity, FileIdentity, bytes]:
        handle = src.open("f")
        first = handle.identity
        assert await read_all(engine, handle, CHUNK) == old
        await wait_until(lambda: store.get(first) is not None)
        new = src.rewrite_in_place("f", seed=32)
        assert await read_all(engine, handle, CHUNK) == new      # a new pass, same handle
        second = handle.identity
        await wait_until(lambda: store.get(second) is not None
                     or engine.counters.corruptions_detected > 0)
        return first, second, new

    first, second, new = run(engine, body)
    assert engine.counters.corruptions_detected == 0
    assert engine.checksums.known() == {first: xxh128(old), second: xxh128(new)}
    assert (store.get(first), store.get(second)) == (xxh128(old), xxh128(new))
    store.close()


def test_truncation_below_what_was_read_fails_the_pass_with_eio(
        src: Source, caplog: pytest.LogCaptureFixture) -> None:
    old = src.write("f", 4 * MIB, seed=3)
    engine = pass_engine()

    async def body() -> None:
        handle = src.open("f")
        assert await read_until(engine, handle, 1 * MIB) == old[:1 * MIB]
        os.truncate(src.root / "f", 512 * KIB)
        with caplog.at_level(logging.WARNING, logger="stfs"), \
                pytest.raises(OSError) as caught:
            await engine.read(handle, 1 * MIB, CHUNK)
        assert caught.value.errno == errno.EIO

    run(engine, body)
    assert engine.counters.changed_files == 1
    assert "512" in caplog.text or "524288" in caplog.text


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def test_an_append_in_the_middle_of_a_pass_is_read_on_to_the_new_end(
        src: Source, caplog: pytest.LogCaptureFixture) -> None:
    old = src.write("log.txt", 2 * MIB + 100, seed=4)
    extra = payload(300 * KIB + 7, 5)
    engine = pass_engine()

    async def body() -> FileIdentity:
        handle = src.open("log.txt")
        got = await read_until(engine, handle, 1 * MIB)
        append(src.root / "log.txt", extra)
        with caplog.at_level(logging.INFO, logger="stfs"):
            got += await read_all(engine, handle, CHUNK, start=1 * MIB)
        assert got == old + extra
        assert handle.identity == src.identity("log.txt")
        assert handle.identity.size == len(old) + len(extra)
        return handle.identity

    run(engine, body)
    assert engine.counters.changed_files == 0 and engine.counters.errors == 0
    assert "unchanged" in caplog.text
    # the checksum of a pass spanning two identities is not kept
    assert engine.checksums.known() == {}


def test_a_touch_in_the_middle_of_a_pass_changes_nothing_for_the_reader(
        src: Source) -> None:
    data = src.write("f", 3 * MIB, seed=6)
    engine = pass_engine()

    async def body() -> None:
        handle = src.open("f")
        got = await read_until(engine, handle, 1 * MIB + 4096)
        before = handle.identity
        st = os.stat(src.root / "f")
        os.utime(src.root / "f", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
        assert src.identity("f") != before
        got += await read_all(engine, handle, CHUNK, start=len(got))
        assert got == data
        assert handle.identity == src.identity("f")

    run(engine, body)
    assert engine.counters.changed_files == 0 and engine.counters.errors == 0


RANDOM_OFFSETS = (5 * MIB + 8 * KIB, 1 * MIB + 12 * KIB, 7 * MIB + 4 * KIB, 3 * MIB)


def test_a_random_reader_whose_bytes_changed_gets_eio_until_it_reads_offset_zero(
        src: Source, caplog: pytest.LogCaptureFixture) -> None:
    old = src.write("db", 8 * MIB, seed=21)
    engine = pass_engine()

    async def body() -> bytes:
        handle = src.open("db")
        for offset in RANDOM_OFFSETS:
            assert bytes(await engine.read(handle, offset, 4 * KIB)) == \
                old[offset:offset + 4 * KIB]
        new = src.rewrite_in_place("db", seed=22)
        for offset in (2 * MIB, RANDOM_OFFSETS[0], 6 * MIB):
            with pytest.raises(OSError) as caught:
                await engine.read(handle, offset, 4 * KIB)
            assert caught.value.errno == errno.EIO
        assert bytes(await engine.read(handle, 0, 4 * KIB)) == new[:4 * KIB]
        assert bytes(await engine.read(handle, 2 * MIB, 4 * KIB)) == new[2 * MIB:2 * MIB + 4 * KIB]
        return new

    with caplog.at_level(logging.WARNING, logger="stfs"):
        run(engine, body)
    assert engine.counters.changed_files == 1
    assert any("db changed while being read" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("where", ["early", "late"])
def test_a_random_reader_is_checked_on_each_of_its_recent_reads(src: Source,
                                                                 where: str) -> None:
    """Only one of the pieces the reader was served changes: still EIO."""
    old = src.write("db", 8 * MIB, seed=23)
    engine = pass_engine()
    changed = RANDOM_OFFSETS[0] if where == "early" else RANDOM_OFFSETS[-1]

    async def body() -> None:
        handle = src.open("db")
        for offset in RANDOM_OFFSETS:
            await engine.read(handle, offset, 4 * KIB)
        with open(src.root / "db", "r+b") as f:  # noqa: ASYNC230 (an outside writer)
            f.seek(changed + 100)
            f.write(bytes(b ^ 0xFF for b in old[changed + 100:changed + 110]))
        with pytest.raises(OSError) as caught:
            await engine.read(handle, 2 * MIB, 4 * KIB)
        assert caught.value.errno == errno.EIO

    run(engine, body)
    assert engine.counters.changed_files == 1


def test_a_random_reader_goes_on_when_the_change_left_its_bytes_alone(src: Source) -> None:
    """A change elsewhere in the file (or an append) leaves everything the reader
    was served true of the new version: no error, and the new bytes are served."""
    old = src.write("db", 8 * MIB, seed=24)
    engine = pass_engine()

    async def body() -> None:
        handle = src.open("db")
        for offset in RANDOM_OFFSETS:
            await engine.read(handle, offset, 4 * KIB)
        patched = bytes(b ^ 0x5A for b in old[2 * MIB:2 * MIB + 4 * KIB])
        with open(src.root / "db", "r+b") as f:  # noqa: ASYNC230 (an outside writer)
            f.seek(2 * MIB)
            f.write(patched)
        assert bytes(await engine.read(handle, 2 * MIB, 4 * KIB)) == patched
        offset = RANDOM_OFFSETS[1]
        assert bytes(await engine.read(handle, offset, 4 * KIB)) == old[offset:offset + 4 * KIB]
        assert handle.identity == src.identity("db")

    run(engine, body)
    assert engine.counters.changed_files == 0 and engine.counters.errors == 0


def test_earlier_pieces_are_bounded(src: Source) -> None:
    from stfs.recovery import EARLIER_PIECES, StreamVerifier
    identity = src.identity(src.write("f", 1, seed=1) and "f")
    verifier = StreamVerifier(identity, lambda n: True, lambda n: None)
    for i in range(EARLIER_PIECES * 3):
        verifier.served(i * 8192 + 4096, b"x" * 4096, CHUNK, sequential=False)
    assert len(verifier.earlier) <= EARLIER_PIECES
    assert verifier.must_verify(1) and not verifier.must_verify(0)
    verifier.reset(identity)
    assert not verifier.earlier and not verifier.must_verify(1)


def test_a_handle_that_served_nothing_yet_simply_reads_the_new_version(
        src: Source) -> None:
    src.write("f", 3 * MIB, seed=7)
    engine = pass_engine()

    async def body() -> None:
        handle = src.open("f")
        new = src.rewrite_in_place("f", seed=8)
        assert await read_all(engine, handle, CHUNK) == new
        assert handle.identity == src.identity("f")

    run(engine, body)
    assert engine.counters.changed_files == 0 and engine.counters.errors == 0


@pytest.mark.parametrize("hint", [False, True])
def test_the_getattr_hint_is_acted_on_even_inside_the_chunk_being_served(
        src: Source, hint: bool) -> None:
    """16K requests in 64K chunks: the rest of a chunk already read is served
    without another fstat. Without a hint that is the old version (consistent with
    what the pass got); with View.getattr's hint the change is checked at once."""
    old = src.write("f", 3 * MIB, seed=9)
    engine = pass_engine()
    step = 16 * KIB

    async def body() -> Any:
        handle = src.open("f")
        for offset in range(0, 3 * step + 64 * KIB, step):      # 1 chunk and 3/4
            got = bytes(await engine.read(handle, offset, step))
            assert got == old[offset:offset + step]
        src.rewrite_in_place("f", seed=10)
        if hint:
            handle.seen_identity = src.identity("f")       # what View.getattr does
        try:
            return bytes(await engine.read(handle, 64 * KIB + 3 * step, step))
        except OSError as exc:
            return exc

    got = run(engine, body)
    if hint:
        assert isinstance(got, OSError) and got.errno == errno.EIO
        assert engine.counters.changed_files == 1
    else:
        assert got == old[64 * KIB + 3 * step:128 * KIB]
        assert engine.counters.changed_files == 0


def test_the_getattr_hint_for_a_handle_that_served_nothing_gives_the_new_version(
        src: Source) -> None:
    src.write("f", 3 * MIB, seed=11)
    engine = pass_engine()

    async def body() -> None:
        handle = src.open("f")
        new = src.rewrite_in_place("f", seed=12)
        handle.seen_identity = src.identity("f")
        assert bytes(await engine.read(handle, 0, CHUNK)) == new[:CHUNK]
        assert handle.identity == handle.seen_identity

    run(engine, body)
    assert engine.counters.changed_files == 0


@pytest.mark.parametrize("req_size", [CHUNK, 200 * KIB])
def test_replies_around_a_rewrite_are_each_of_one_version(src: Source,
                                                          req_size: int) -> None:
    """Rewrites at random moments of a pass: every reply that is not an error is
    entirely old or entirely new bytes (here: always old, as the pass began on it)."""
    old = src.write("f", 4 * MIB, seed=13)
    engine = pass_engine()
    rng = random.Random(req_size)
    request = req_size

    async def body() -> tuple[int, int]:
        handle = src.open("f")
        offset = ok = failed = 0
        new = old
        rewrite_at = rng.randrange(1, 20) * request
        while offset < len(old):
            if offset >= rewrite_at and new is old:
                new = src.rewrite_in_place("f", seed=14)
            try:
                got = bytes(await engine.read(handle, offset, request))
            except OSError as exc:
                assert exc.errno == errno.EIO
                failed += 1
            else:
                assert got == old[offset:offset + len(got)], "a reply mixing versions"
                ok += 1
            offset += request
        return ok, failed

    ok, failed = run(engine, body)
    assert ok >= 1 and failed >= 1
    assert engine.counters.changed_files == 1


# -- resuming after a transient error -------------------------------------------------------

def fault_engine(source: Source | None = None, **config: Any) -> ReadEngine:
    engine = make_engine(source, min_chunk=CHUNK, max_chunk=CHUNK, inline_cached_reads=False,
                         **config)
    engine.readahead.enabled = False      # every backing read is a demand read, in order
    return engine


@pytest.mark.parametrize("lie", [False, True])
def test_a_retried_read_first_re_reads_the_last_checkpointed_chunk(
        src: Source, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        lie: bool) -> None:
    data = src.write("f", 2 * MIB, seed=15)
    faults = FakeBacking(errnos=[None] * 6 + [errno.EIO],      # the 7th chunk's first try fails
                         lie_digests=lie)
    engine = fault_engine(reader=faults)

    async def body() -> Any:
        handle = src.open("f")
        assert await read_until(engine, handle, 6 * CHUNK) == data[:6 * CHUNK]
        assert faults.offsets == [i * CHUNK for i in range(6)]
        try:
            got = bytes(await engine.read(handle, 6 * CHUNK, CHUNK))
        except OSError as exc:
            return exc
        return got

    with caplog.at_level(logging.INFO, logger="stfs"):
        outcome = mock_run(engine, body)
    # the checkpoint after 5 chunks holds chunk 4 ([256K, 320K)); chunk 5 is pending
    assert faults.digest_calls[0] == (4 * CHUNK, 5 * CHUNK)
    c = engine.counters
    assert (c.retries, c.interrupted_streams) == (1, 1)
    if lie:
        assert isinstance(outcome, OSError) and outcome.errno == errno.EIO
        assert (c.recoveries, c.changed_files, c.failed_streams, c.errors) == (0, 1, 1, 1)
        assert len(faults.offsets) == 7                   # never read on from changed bytes
        assert "changed while its read was being retried" in caplog.text
    else:
        assert outcome == data[6 * CHUNK:7 * CHUNK]
        assert (c.recoveries, c.changed_files, c.failed_streams, c.errors) == (1, 0, 0, 0)
        assert faults.offsets[6:] == [6 * CHUNK, 6 * CHUNK]
        assert "recovered after 1 retries" in caplog.text


def test_a_stream_that_exhausts_its_retries_counts_as_failed_once(
        src: Source, monkeypatch: pytest.MonkeyPatch) -> None:
    data = src.write("f", 2 * MIB, seed=16)
    fake = FakeBacking(errnos=[None] + [errno.EIO] * 6)
    engine = fault_engine(reader=fake)

    async def body() -> None:
        handle = src.open("f")
        assert bytes(await engine.read(handle, 0, CHUNK)) == data[:CHUNK]
        for _ in range(2):
            with pytest.raises(OSError):
                await engine.read(handle, CHUNK, CHUNK)
        assert bytes(await engine.read(handle, CHUNK, CHUNK)) == data[CHUNK:2 * CHUNK]

    mock_run(engine, body)
    c = engine.counters
    assert (c.interrupted_streams, c.failed_streams, c.errors) == (1, 1, 2)
    assert c.recoveries == 0 and c.retries == 4       # 2 per failed read (3 attempts)


# -- retry settings and reopening ---------------------------------------------------------

def test_retry_policy_parse_and_spec() -> None:
    policy = RetryPolicy.parse("network", "7:0.25:1.5:12")
    assert policy == RetryPolicy("network", 7, 0.25, 1.5, 12.0)
    assert policy.spec() == "7:0.25:1.5:12"
    assert RetryPolicy.parse("x", retry.FILE_SYSTEM.spec()).spec() == "3:1:2:5"
    assert RetryPolicy.parse("x", retry.NETWORK.spec()).spec() == "5:0.5:1.5:10"
    for bad in ["", "3:1:2", "3:1:2:5:6", "a:1:2:5", "0:1:2:5", "101:1:2:5", "3:-1:2:5",
                "3:1:0.5:5", "3:1:2:4000", "3:x:2:5"]:
        with pytest.raises(ValueError):
            RetryPolicy.parse("x", bad)


def test_delays_without_jitter_are_exact_and_capped() -> None:
    settings = RetrySettings(jitter=0.0)
    policy = settings.network
    assert [settings.delay_s(policy, n) for n in (1, 2, 3, 4, 9)] == [
        0.5, 0.75, 1.125, 1.6875, 10.0]
    assert [settings.delay_s(settings.file_system, n) for n in (1, 2, 3, 4)] == [
        1.0, 2.0, 4.0, 5.0]


def test_ebadf_is_retried_like_a_network_error_and_reopens() -> None:
    assert retry.policy_for(errno.EBADF) is retry.NETWORK
    assert retry.REOPEN_ERRNOS == {errno.ESTALE, errno.EBADF}
    settings = RetrySettings(network=RetryPolicy("n", 2, 0, 1, 0))
    assert settings.policy_for(errno.ESTALE).attempts == 2
    assert settings.policy_for(errno.EIO) is retry.FILE_SYSTEM
    assert settings.policy_for(errno.ENOENT) is retry.NO_RETRY


def read_once(source: Source, name: str, engine: ReadEngine, size: int = CHUNK) -> tuple[Any,
                                                                                         float]:
    outcome: list[Any] = []

    async def body() -> None:
        handle = source.open(name)
        engine.open(handle)
        began = trio.current_time()
        try:
            outcome.append(bytes(await engine.read(handle, 0, size)))
        except OSError as exc:
            outcome.append(exc)
        outcome.append(trio.current_time() - began)
        await engine.release(handle)

    mock_run(engine, body)
    return outcome[0], outcome[1]


def test_configured_policies_replace_the_defaults(src: Source,
                                                  monkeypatch: pytest.MonkeyPatch
                                                  ) -> None:
    data = src.write("f", 1 * MIB, seed=17)
    faults = FakeBacking(errnos=[errno.EIO] * 10)
    settings = RetrySettings(file_system=RetryPolicy.parse("file_system", "4:0.25:3:1"),
                             jitter=0.0)
    engine = fault_engine(reader=faults, retry=settings)
    got, waited = read_once(src, "f", engine)
    assert isinstance(got, OSError) and got.errno == errno.EIO
    assert len(faults.offsets) == 4
    assert waited == pytest.approx(0.25 + 0.75 + 1.0)        # x3, capped at 1 s
    assert engine.counters.retries == 3

    faults2 = FakeBacking(errnos=[errno.EIO] * 3)
    engine2 = fault_engine(reader=faults2, retry=settings)
    got2, waited2 = read_once(src, "f", engine2)
    assert got2 == data[:CHUNK] and waited2 == pytest.approx(2.0)
    assert engine2.counters.recoveries == 1


def test_the_per_read_deadline_stops_retrying(src: Source,
                                              monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    src.write("f", 1 * MIB, seed=18)
    faults = FakeBacking(errnos=[errno.ETIMEDOUT] * 20)
    settings = RetrySettings(network=RetryPolicy.parse("network", "20:1:2:100"), jitter=0.0,
                             deadline_s=5.0)
    engine = fault_engine(reader=faults, retry=settings)
    got, waited = read_once(src, "f", engine)
    assert isinstance(got, OSError) and got.errno == errno.ETIMEDOUT
    assert len(faults.offsets) == 3                   # 1 s + 2 s; 4 s more would pass 5 s
    assert waited == pytest.approx(3.0)


@pytest.mark.parametrize("jitter", [0.0, 0.1])
def test_jitter_is_configurable(src: Source, monkeypatch: pytest.MonkeyPatch,
                                jitter: float) -> None:
    src.write("f", 1 * MIB, seed=19)
    waits = []
    for _ in range(5):
        fake = FakeBacking(errnos=[errno.EBUSY])
        engine = fault_engine(reader=fake, retry=RetrySettings(jitter=jitter))
        got, waited = read_once(src, "f", engine)
        assert isinstance(got, bytes)
        waits.append(waited)
    assert all(0.9 - 1e-9 <= w <= 1.1 + 1e-9 for w in waits)
    if jitter == 0.0:
        assert waits == [pytest.approx(1.0)] * 5


@pytest.mark.parametrize("err", [errno.ESTALE, errno.EBADF])
def test_estale_and_ebadf_reopen_the_file_before_retrying(
        src: Source, monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    data = src.write("f", 1 * MIB, seed=20)
    faults = FakeBacking(errnos=[err])
    engine = fault_engine(src, reader=faults)
    fds_before = len(os.listdir("/proc/self/fd"))
    got, _ = read_once(src, "f", engine)
    assert got == data[:CHUNK]
    assert engine.descriptors.reopens == 1
    assert engine.counters.recoveries == 1 and len(faults.offsets) == 2
    assert engine.descriptors.open_count == 0
    assert len(os.listdir("/proc/self/fd")) == fds_before     # the old fd was closed too


def test_other_errors_do_not_reopen(src: Source, monkeypatch: pytest.MonkeyPatch
                                    ) -> None:
    data = src.write("f", 1 * MIB, seed=21)
    fake = FakeBacking(errnos=[errno.EIO, errno.ETIMEDOUT])
    engine = fault_engine(src, reader=fake)
    got, _ = read_once(src, "f", engine)
    assert got == data[:CHUNK] and engine.descriptors.reopens == 0


def test_estale_on_a_name_that_now_holds_another_file_fails_with_eio(
        src: Source, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    src.write("f", 1 * MIB, seed=22)

    def replace(_index: int) -> None:
        tmp = src.root / "f.new"
        tmp.write_bytes(payload(1 * MIB, 23))
        os.replace(tmp, src.root / "f")

    faults = FakeBacking(errnos=[errno.ESTALE], before=replace)
    engine = fault_engine(src, reader=faults)
    with caplog.at_level(logging.WARNING, logger="stfs.descriptors"):
        got, _ = read_once(src, "f", engine)
    assert isinstance(got, OSError) and got.errno == errno.EIO
    assert len(faults.offsets) == 1                   # nothing read from the other file
    assert engine.descriptors.reopens == 0
    assert "another file" in caplog.text
    assert engine.descriptors.open_count == 0


def test_a_file_rewritten_during_a_retry_fails_that_read_and_every_later_one(
        src: Source, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rewrite lands while a read waits to be retried: the resume check fails
    the read, and the next reads continuing the pass fail too (they must not
    verify against the new version and go on)."""
    data = src.write("f", 2 * MIB, seed=16)
    new: list[bytes] = []
    faults = FakeBacking(errnos=[None] * 6 + [errno.EAGAIN, errno.EAGAIN],
                    before=lambda i: new.append(src.rewrite_in_place("f", seed=17))
                    if i == 6 else None)
    engine = fault_engine(reader=faults)

    async def body() -> list[Any]:
        handle = src.open("f")
        assert await read_until(engine, handle, 6 * CHUNK) == data[:6 * CHUNK]
        outcomes: list[Any] = []
        for offset in (6 * CHUNK, 6 * CHUNK, 7 * CHUNK):
            try:
                outcomes.append(bytes(await engine.read(handle, offset, CHUNK)))
            except OSError as exc:
                outcomes.append(exc.errno)
        outcomes.append(bytes(await engine.read(handle, 0, CHUNK)) == new[0][:CHUNK])
        return outcomes

    outcomes = mock_run(engine, body)
    assert outcomes == [errno.EIO, errno.EIO, errno.EIO, True]
    assert engine.counters.changed_files == 1


def test_a_handle_that_may_have_read_from_the_kernel_page_cache_is_not_given_the_new_rest(
        src: Source) -> None:
    """Another handle read the old version through the mount, so the kernel may have
    served this one old pages stfs never saw: its first request past offset 0 after
    a change fails, a request at 0 or wholly past the old end (an append) does not."""
    old = src.write("f", 2 * MIB, seed=18)
    engine = pass_engine()

    async def body() -> list[Any]:
        first = src.open("f")
        assert await read_all(engine, first, CHUNK) == old
        quiet = src.open("f")          # its reads were all page-cache hits
        appender = src.open("f")
        outcomes: list[Any] = []
        new = src.rewrite_in_place("f", seed=19)
        for handle, offset in ((quiet, MIB), (quiet, 0)):
            try:
                got = bytes(await engine.read(handle, offset, CHUNK))
                outcomes.append(got == new[offset:offset + CHUNK])
            except OSError as exc:
                outcomes.append(exc.errno)
        with open(src.root / "f", "ab") as f:  # noqa: ASYNC230 (an outside writer)
            f.write(b"tail")
        got = bytes(await engine.read(appender, len(old), CHUNK))
        outcomes.append(got == b"tail")
        return outcomes

    assert run(engine, body) == [errno.EIO, True, True]
    assert engine.counters.changed_files == 1


def test_a_new_pass_waits_for_the_handles_still_on_the_old_version(src: Source) -> None:
    """Replies go into the page cache every handle of the file reads from: a handle
    may start over on the new version only once no other handle reads the old one."""
    old = src.write("f", 2 * MIB, seed=20)
    engine = pass_engine(src)

    async def body() -> list[Any]:
        reader, restarter = src.open("f"), src.open("f")
        engine.open(reader)
        engine.open(restarter)
        assert await read_until(engine, reader, 256 * KIB) == old[:256 * KIB]
        assert await read_until(engine, restarter, 256 * KIB) == old[:256 * KIB]
        new = src.rewrite_in_place("f", seed=21)
        outcomes: list[Any] = []
        for _ in range(2):
            try:
                outcomes.append(bytes(await engine.read(restarter, 0, CHUNK)) == new[:CHUNK])
            except OSError as exc:
                outcomes.append(exc.errno)
        src.handles.pop_file(reader.fh)
        await engine.release(reader)
        outcomes.append(bytes(await engine.read(restarter, 0, CHUNK)) == new[:CHUNK])
        await engine.release(restarter)
        return outcomes

    assert run(engine, body) == [errno.EIO, errno.EIO, True]
    assert engine.counters.changed_files == 1
