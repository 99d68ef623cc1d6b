"""MemoryBudget without FUSE: demand reservations wait or reclaim, speculative ones
are refused, and held_bytes never exceeds the limit, whatever the concurrency."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from stfs.budget import MemoryBudget

KIB = 1024


def test_try_reserve_grants_within_the_limit_and_refuses_beyond_it() -> None:
    budget = MemoryBudget(100)
    assert budget.try_reserve(60)
    assert budget.try_reserve(40)            # exactly full is allowed
    assert budget.held_bytes == 100
    assert budget.free_bytes == 0
    assert not budget.try_reserve(1)
    assert budget.held_bytes == 100
    budget.release(30)
    assert not budget.try_reserve(31)
    assert budget.try_reserve(30)
    assert budget.peak_held_bytes == 100


def test_try_reserve_does_not_call_the_reclaimer() -> None:
    budget = MemoryBudget(100)
    calls: list[int] = []
    budget.set_reclaimer(lambda n: calls.append(n) or 0)  # type: ignore[func-returns-value]
    assert budget.try_reserve(100)
    assert not budget.try_reserve(10)
    assert calls == []


def test_reserve_larger_than_the_limit_is_an_error_not_a_hang() -> None:
    budget = MemoryBudget(100)

    async def main() -> None:
        with trio.fail_after(10):                    # a hang, not a slow machine
            with pytest.raises(ValueError):
                await budget.reserve(101)

    trio.run(main)
    assert budget.held_bytes == 0


def test_reserve_waits_while_full_and_is_woken_by_release() -> None:
    budget = MemoryBudget(100)
    got: list[str] = []

    async def reader() -> None:
        await budget.reserve(50)
        got.append("granted")

    async def main() -> None:
        assert budget.try_reserve(80)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            assert budget.waiting == 1
            budget.release(10)               # 30 free: still not enough
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            assert budget.waiting == 1
            budget.release(20)               # 50 free
            await trio.testing.wait_all_tasks_blocked()
            assert got == ["granted"]
        assert budget.waiting == 0
        assert budget.held_bytes == 100

    trio.run(main)


def test_reserve_asks_the_reclaimer_first_and_does_not_wait_when_it_frees_enough() -> None:
    budget = MemoryBudget(100)
    asked: list[int] = []

    def reclaim(n: int) -> int:
        asked.append(n)
        budget.release(n)
        return n

    budget.set_reclaimer(reclaim)

    async def main() -> None:
        assert budget.try_reserve(90)
        with trio.fail_after(10):                    # a hang, not a slow machine
            await budget.reserve(30)
        assert budget.waiting == 0

    trio.run(main)
    assert asked == [20]                     # exactly the shortfall
    assert budget.held_bytes == 100
    assert budget.peak_held_bytes == 100


def test_reserve_never_parks_when_the_reclaimer_frees_enough() -> None:
    budget = MemoryBudget(100)
    parked = []

    def reclaim(n: int) -> int:
        budget.release(n)
        return n

    budget.set_reclaimer(reclaim)

    async def reader() -> None:
        await budget.reserve(60)
        parked.append(budget.waiting)

    async def main() -> None:
        assert budget.try_reserve(100)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert budget.waiting == 0
            assert parked == [0]

    trio.run(main)


def test_reserve_waits_when_the_reclaimer_frees_too_little_and_retries_on_release() -> None:
    budget = MemoryBudget(100)
    asked: list[int] = []

    def reclaim(n: int) -> int:
        asked.append(n)
        budget.release(min(n, 5))
        return min(n, 5)

    budget.set_reclaimer(reclaim)
    done: list[bool] = []

    async def reader() -> None:
        await budget.reserve(40)
        done.append(True)

    async def main() -> None:
        assert budget.try_reserve(100)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert not done and budget.waiting == 1
            assert asked == [40]
            budget.release(30)               # 35 free; the reclaimer gets the last 5
            await trio.testing.wait_all_tasks_blocked()
            assert done == [True]

    trio.run(main)
    assert asked == [40, 5]
    assert budget.held_bytes == 100


def test_cancelled_waiter_stops_counting_as_waiting() -> None:
    budget = MemoryBudget(100)

    async def main() -> None:
        assert budget.try_reserve(100)
        with trio.move_on_after(0.05):
            await budget.reserve(10)
        assert budget.waiting == 0
        assert budget.held_bytes == 100
        budget.release(50)
        assert budget.try_reserve_speculative(10)   # no phantom waiter blocks read-ahead

    trio.run(main)


def test_speculative_reservation_refused_beyond_its_share() -> None:
    budget = MemoryBudget(1000, speculative_share=0.5)
    assert budget.try_reserve_speculative(300)
    assert budget.try_reserve_speculative(200)          # exactly the share
    assert not budget.try_reserve_speculative(1)
    assert budget.held_bytes == 500
    assert budget.speculative_bytes == 500
    assert budget.refused_speculative == 1
    budget.speculative_done(200)                        # became ordinary cached data
    assert budget.try_reserve_speculative(200)
    assert budget.held_bytes == 700


def test_speculative_reservation_refused_when_the_budget_is_full() -> None:
    budget = MemoryBudget(1000, speculative_share=0.5)
    assert budget.try_reserve(900)
    assert not budget.try_reserve_speculative(200)      # within its share, but no room
    assert budget.held_bytes == 900
    assert budget.speculative_bytes == 0
    assert budget.refused_speculative == 1
    assert budget.try_reserve_speculative(100)


def test_speculative_reservation_never_calls_the_reclaimer() -> None:
    budget = MemoryBudget(1000)
    calls: list[int] = []

    def reclaim(n: int) -> int:
        calls.append(n)
        budget.release(n)
        return n

    budget.set_reclaimer(reclaim)
    assert budget.try_reserve(1000)
    assert not budget.try_reserve_speculative(10)
    assert calls == []


def test_speculative_reservation_refused_while_a_demand_reservation_waits() -> None:
    budget = MemoryBudget(1000, speculative_share=0.5)

    async def main() -> None:
        assert budget.try_reserve(800)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(budget.reserve, 500)
            await trio.testing.wait_all_tasks_blocked()
            assert budget.waiting == 1
            assert not budget.try_reserve_speculative(100)  # 200 free, but a reader waits
            assert budget.held_bytes == 800
            budget.release(400)
        assert budget.waiting == 0
        assert budget.held_bytes == 900
        assert budget.try_reserve_speculative(100)

    trio.run(main)
    assert budget.refused_speculative == 1


def test_releasing_more_than_was_reserved_trips_the_assertion() -> None:
    budget = MemoryBudget(100)
    assert budget.try_reserve(10)
    with pytest.raises(AssertionError):
        budget.release(11)


def test_held_bytes_never_exceeds_the_limit_under_many_concurrent_tasks() -> None:
    """Many trio tasks reserve (demand and speculative) and release random sizes
    against a small limit, with a reclaimer standing in for the cache; every
    single ``_take`` is checked, and the peak at the end."""
    limit = 64 * KIB
    budget = MemoryBudget(limit)
    violations: list[int] = []
    takes = [0]
    original_take = budget._take

    def checked_take(n: int) -> None:
        original_take(n)
        takes[0] += 1
        if budget.held_bytes > limit:
            violations.append(budget.held_bytes)

    budget._take = checked_take  # type: ignore[method-assign]

    # A "cache" of reservations that can be given back on demand.
    evictable: list[int] = []

    def reclaim(n: int) -> int:
        freed = 0
        while evictable and freed < n:
            size = evictable.pop(0)
            budget.release(size)
            freed += size
        return freed

    budget.set_reclaimer(reclaim)
    rng = random.Random(4)
    speculative_granted = [0]

    async def worker(seed: int) -> None:
        r = random.Random(seed)
        for _ in range(60):
            size = r.randrange(1, 24 * KIB)
            if r.random() < 0.2:
                if budget.try_reserve_speculative(size):
                    speculative_granted[0] += 1
                    await trio.sleep(r.random() * 0.001)
                    budget.speculative_done(size)
                    budget.release(size)
                continue
            await budget.reserve(size)
            await trio.sleep(r.random() * 0.001)
            if r.random() < 0.5:
                evictable.append(size)       # stays held, as a cached chunk would
            else:
                budget.release(size)

    async def main() -> None:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for i in range(64):
                    nursery.start_soon(worker, rng.randrange(1 << 30))

    trio.run(main)
    assert violations == []
    assert takes[0] > 64 * 40
    assert budget.peak_held_bytes <= limit
    assert budget.peak_held_bytes > limit // 2       # the limit was actually contended
    assert budget.waiting == 0
    assert budget.speculative_bytes == 0
    assert budget.held_bytes == sum(evictable)
    assert speculative_granted[0] > 0


def test_a_lower_limit_reclaims_at_once_and_reservations_wait_for_the_rest() -> None:
    budget = MemoryBudget(100, speculative_share=0.5)
    cached = [30]                            # what the reclaimer can free

    def reclaim(n: int) -> int:
        freed = min(n, cached[0])
        cached[0] -= freed
        budget.release(freed)
        return freed

    budget.set_reclaimer(reclaim)
    got: list[str] = []

    async def reader() -> None:
        await budget.reserve(10)
        got.append("granted")

    async def main() -> None:
        assert budget.try_reserve(90)        # 30 cached, 60 in flight
        budget.set_limit(50)
        assert budget.held_bytes == 60       # the cache went; in flight stays
        assert budget.speculative_limit_bytes == 25
        assert not budget.try_reserve_speculative(1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert got == [] and budget.waiting == 1
            budget.release(15)               # 45 held: 10 more would not fit
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            budget.release(5)
            await trio.testing.wait_all_tasks_blocked()
            assert got == ["granted"]
        assert budget.held_bytes == 50

    trio.run(main)


def test_a_higher_limit_wakes_waiting_readers() -> None:
    budget = MemoryBudget(100)
    got: list[str] = []

    async def reader() -> None:
        await budget.reserve(50)
        got.append("granted")

    async def main() -> None:
        assert budget.try_reserve(100)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            budget.set_limit(150)
            await trio.testing.wait_all_tasks_blocked()
            assert got == ["granted"] and budget.held_bytes == 150

    trio.run(main)
