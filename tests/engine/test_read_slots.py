"""ReadSlots on its own: the cap, the order reads start in, read-ahead's share,
promotion, a slot given back early, cancellation and a changing cap (real
worker threads held on ``threading.Event`` gates)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import trio

from stfs import read_slots
from stfs.read_slots import ReadSlots, Release
from tests.engine.helpers import wait_until

TIMEOUT_S = 30.0


class Gates:
    """Blocking jobs that record when they start and wait for their gate."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.running = 0
        self.peak = 0
        self._gates: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def job(self, name: str, *, release_early: bool = False) -> Callable[[Release], str]:
        gate = self._gates.setdefault(name, threading.Event())

        def run(release: Release) -> str:
            with self._lock:
                self.started.append(name)
                self.running += 1
                self.peak = max(self.peak, self.running)
            try:
                if release_early:
                    release()
                assert gate.wait(TIMEOUT_S), f"{name} never released"
                return name
            finally:
                with self._lock:
                    self.running -= 1
        return run

    def open(self, *names: str) -> None:
        for name in names:
            self._gates.setdefault(name, threading.Event()).set()


async def start_all(nursery: trio.Nursery, slots: ReadSlots, gates: Gates,
                    names: list[str], results: dict[str, str], *, speculative: bool = False,
                    release_early: bool = False) -> None:
    """Queue *names* in this order (each queued before the next starts)."""
    for name in names:
        queued = trio.Event()

        async def one(name: str = name, queued: trio.Event = queued) -> None:
            results[name] = await slots.run(gates.job(name, release_early=release_early),
                                            speculative=speculative,
                                            on_queued=lambda _promote: queued.set())
        nursery.start_soon(one)
        await queued.wait()


def test_at_most_cap_reads_run_and_they_start_in_the_order_queued() -> None:
    slots = ReadSlots(3, 3)
    gates = Gates()
    names = [f"r{i}" for i in range(8)]
    results: dict[str, str] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await start_all(nursery, slots, gates, names, results)
            await wait_until(lambda: len(gates.started) == 3)
            assert slots.running == 3 and slots.waiting() == 5
            for name in names:
                gates.open(name)
                await wait_until(lambda name=name: name in results)

    trio.run(main)
    assert gates.started == names and gates.peak == 3
    assert results == {name: name for name in names}
    assert slots.running == 0 and slots.waiting() == 0


def test_demand_reads_go_before_queued_read_ahead_which_keeps_to_its_share() -> None:
    slots = ReadSlots(3, 2)
    gates = Gates()
    results: dict[str, str] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await start_all(nursery, slots, gates, ["a0", "a1", "a2", "a3"], results,
                            speculative=True)
            await wait_until(lambda: len(gates.started) == 2)
            await trio.sleep(0.05)
            assert gates.started == ["a0", "a1"]          # the third slot is left to demand
            await start_all(nursery, slots, gates, ["d0", "d1"], results)
            await wait_until(lambda: len(gates.started) == 3)
            assert gates.started[2] == "d0"
            gates.open("a0")                              # a slot frees: demand first
            await wait_until(lambda: len(gates.started) == 4)
            assert gates.started[3] == "d1"
            gates.open("a1", "a2", "a3", "d0", "d1")

    trio.run(main)
    assert gates.started == ["a0", "a1", "d0", "d1", "a2", "a3"]


def test_a_promoted_read_ahead_goes_before_the_read_ahead_queued_before_it() -> None:
    slots = ReadSlots(1, 1)
    gates = Gates()
    results: dict[str, str] = {}
    promotes: dict[str, Callable[[], None]] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for name in ("a0", "a1", "a2"):
                queued = trio.Event()

                async def one(name: str = name, queued: trio.Event = queued) -> None:
                    def on_queued(promote: Callable[[], None]) -> None:
                        promotes[name] = promote
                        queued.set()
                    results[name] = await slots.run(gates.job(name), speculative=True,
                                                    on_queued=on_queued)
                nursery.start_soon(one)
                await queued.wait()
            await wait_until(lambda: gates.started == ["a0"])
            promotes["a2"]()                              # a reader waits for a2
            promotes["a0"]()                              # running already: nothing to do
            gates.open("a0", "a1", "a2")

    trio.run(main)
    assert gates.started == ["a0", "a2", "a1"]


def test_a_slot_given_back_early_lets_the_next_read_start() -> None:
    slots = ReadSlots(1, 1)
    gates = Gates()
    results: dict[str, str] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await start_all(nursery, slots, gates, ["first"], results, release_early=True)
            await start_all(nursery, slots, gates, ["second"], results)
            await wait_until(lambda: len(gates.started) == 2)   # first still runs
            assert slots.running == 1
            gates.open("first", "second")

    trio.run(main)
    assert results == {"first": "first", "second": "second"} and slots.running == 0


def test_a_cancelled_queued_read_never_runs_and_a_running_one_is_waited_for() -> None:
    slots = ReadSlots(1, 1)
    gates = Gates()
    results: dict[str, str] = {}

    async def main() -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                await start_all(nursery, slots, gates, ["running", "queued"], results)
                await wait_until(lambda: gates.started == ["running"])
                scope.cancel()
                with trio.CancelScope(shield=True):
                    await trio.sleep(0.05)
                    assert slots.waiting() == 0 and slots.running == 1
                    gates.open("running")   # the cancelled scope ends only once it is done
        assert gates.running == 0 and slots.waiting() == 0
        await trio.sleep(0.05)

    trio.run(main)
    assert gates.started == ["running"] and "queued" not in results
    assert slots.running == 0


def test_promoting_a_read_cancelled_while_queued_does_nothing() -> None:
    slots = ReadSlots(1, 1)
    gates = Gates()
    promotes: list[Callable[[], None]] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await start_all(nursery, slots, gates, ["running"], {})
            with trio.CancelScope() as scope:
                async def queued() -> None:
                    await slots.run(gates.job("queued"), speculative=True,
                                    on_queued=promotes.append)
                async with trio.open_nursery() as inner:
                    inner.start_soon(queued)
                    await wait_until(lambda: len(promotes) == 1)
                    scope.cancel()
            promotes[0]()                                 # a reader comes too late
            assert slots.waiting() == 0
            gates.open("running", "queued")

    trio.run(main)
    assert gates.started == ["running"]


def test_an_error_in_a_read_is_raised_in_its_task() -> None:
    slots = ReadSlots(2, 2)

    def fail(_release: Release) -> None:
        raise OSError(5, "injected")

    async def main() -> None:
        with pytest.raises(OSError):
            await slots.run(fail)
        assert await slots.run(lambda _release: 7) == 7

    trio.run(main)
    assert slots.running == 0


def test_a_lower_cap_holds_new_reads_until_below_it_and_a_higher_one_starts_them() -> None:
    slots = ReadSlots(3, 3)
    gates = Gates()
    results: dict[str, str] = {}
    names = [f"r{i}" for i in range(6)]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await start_all(nursery, slots, gates, names, results)
            await wait_until(lambda: len(gates.started) == 3)
            slots.set_cap(1, 1)
            gates.open("r0", "r1")
            await wait_until(lambda: "r1" in results and "r0" in results)
            await trio.sleep(0.05)
            assert len(gates.started) == 3                # r2 still runs: above the cap
            gates.open("r2")
            await wait_until(lambda: len(gates.started) == 4)
            slots.set_cap(4, 4)
            await wait_until(lambda: len(gates.started) == 6)
            gates.open(*names)

    trio.run(main)
    assert gates.started == names


def test_idle_threads_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(read_slots, "IDLE_EXIT_S", 0.05)
    slots = ReadSlots(4, 4)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(slots.run, lambda _release: None)
        await wait_until(lambda: slots.threads == 0)

    trio.run(main)


def test_running_bytes_sum_the_sizes_of_the_reads_holding_a_slot() -> None:
    slots = ReadSlots(2, 2)
    gates = Gates()
    results: dict[str, str] = {}

    async def one(name: str, size: int, release_early: bool = False) -> None:
        results[name] = await slots.run(gates.job(name, release_early=release_early), size=size)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, "a", 1000)
            nursery.start_soon(one, "b", 200)
            await wait_until(lambda: len(gates.started) == 2)
            nursery.start_soon(one, "c", 30)           # queued: not in flight
            await wait_until(lambda: slots.waiting() == 1)
            assert (slots.running, slots.running_bytes) == (2, 1200)
            gates.open("a")
            await wait_until(lambda: len(gates.started) == 3)
            assert (slots.running, slots.running_bytes) == (2, 230)
            nursery.start_soon(one, "d", 4, True)     # gives its slot back at once
            gates.open("b", "c")
            await wait_until(lambda: "d" in gates.started and slots.running == 0)
            assert slots.running_bytes == 0
            gates.open("d")

    trio.run(main)
    assert sorted(results) == ["a", "b", "c", "d"]
