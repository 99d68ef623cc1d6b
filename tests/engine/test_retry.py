"""Retry classes and backoff, with faults injected by call index (MockClock: instant)."""

from __future__ import annotations

import errno
import random
from typing import Any

import pytest
import trio
import trio.testing

from stfs import retry
from stfs.engine import ReadEngine
from tests.engine.fakes import FakeBacking
from tests.engine.helpers import MIB, Source, make_engine


@pytest.mark.parametrize(("err", "policy"), [
    (errno.EINTR, retry.FILE_SYSTEM), (errno.EAGAIN, retry.FILE_SYSTEM),
    (errno.EBUSY, retry.FILE_SYSTEM), (errno.EIO, retry.FILE_SYSTEM),
    (errno.ENOMEM, retry.FILE_SYSTEM), (errno.EMFILE, retry.FILE_SYSTEM),
    (errno.ENFILE, retry.FILE_SYSTEM), (errno.ETIMEDOUT, retry.NETWORK),
    (errno.ESTALE, retry.NETWORK), (errno.ENOTCONN, retry.NETWORK),
    (errno.ECONNRESET, retry.NETWORK), (errno.EHOSTUNREACH, retry.NETWORK),
    (errno.ENETUNREACH, retry.NETWORK), (errno.EREMOTEIO, retry.NETWORK),
    (errno.EACCES, retry.NO_RETRY), (errno.EPERM, retry.NO_RETRY),
    (errno.ENOENT, retry.NO_RETRY), (None, retry.NO_RETRY),
])
def test_errors_are_classified_like_the_seeds(err: int | None, policy: retry.RetryPolicy) -> None:
    assert retry.policy_for(err) is policy


def test_seed_policies_have_the_seeds_numbers() -> None:
    assert (retry.FILE_SYSTEM.attempts, retry.FILE_SYSTEM.base_delay_s,
            retry.FILE_SYSTEM.multiplier) == (3, 1.0, 2.0)
    assert (retry.NETWORK.attempts, retry.NETWORK.base_delay_s, retry.NETWORK.multiplier,
            retry.NETWORK.max_delay_s) == (5, 0.5, 1.5, 10.0)


def test_delays_grow_are_capped_and_jittered_within_a_quarter() -> None:
    rng = random.Random(7)
    for n, nominal in [(1, 0.5), (2, 0.75), (3, 1.125), (20, 10.0)]:
        for _ in range(50):
            assert nominal * 0.75 <= retry.NETWORK.delay_s(n, rng) <= nominal * 1.25


def engine_and_read(source: Source, name: str,
                    faults: FakeBacking) -> tuple[ReadEngine, Any, float]:
    engine = make_engine(reader=faults, memory_limit=16 * MIB, cache_limit=8 * MIB,
                         max_streams=4, inline_cached_reads=False)
    outcome: list[Any] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            handle = source.open(name)
            began = trio.current_time()
            try:
                outcome.append(bytes(await engine.read(handle, 0, 65536)))
            except OSError as exc:
                outcome.append(exc)
            outcome.append(trio.current_time() - began)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return engine, outcome[0], outcome[1]


def test_transient_errors_are_retried_with_backoff_and_the_read_recovers(
        src: Source) -> None:
    data = src.write("f", 300 * 1024)
    engine, got, waited = engine_and_read(src, "f", FakeBacking(errnos=[errno.EIO, errno.EINTR]))
    assert got == data[:65536]
    assert (engine.counters.retries, engine.counters.recoveries) == (2, 1)
    assert 0.75 * (1.0 + 2.0) <= waited <= 1.25 * (1.0 + 2.0)   # 1 s then 2 s, jittered


def test_a_fault_that_persists_fails_after_the_policys_attempts(
        src: Source) -> None:
    src.write("f", 300 * 1024)
    faults = FakeBacking(errnos=[errno.EIO] * 10)
    engine, got, _ = engine_and_read(src, "f", faults)
    assert isinstance(got, OSError) and got.errno == errno.EIO
    assert len(faults.calls) == 3
    assert engine.counters.retries == 2 and engine.counters.recoveries == 0


def test_network_errors_get_five_attempts(src: Source) -> None:
    data = src.write("f", 300 * 1024)
    faults = FakeBacking(errnos=[errno.ETIMEDOUT] * 4)
    engine, got, _ = engine_and_read(src, "f", faults)
    assert got == data[:65536]
    assert len(faults.calls) == 5 and engine.counters.retries == 4


@pytest.mark.parametrize("err", [errno.EACCES, errno.EPERM, errno.ENOENT])
def test_permission_and_missing_file_errors_fail_at_once(
        src: Source, err: int) -> None:
    src.write("f", 300 * 1024)
    faults = FakeBacking(errnos=[err])
    engine, got, waited = engine_and_read(src, "f", faults)
    assert isinstance(got, OSError) and got.errno == err
    assert len(faults.calls) == 1 and engine.counters.retries == 0 and waited == 0
