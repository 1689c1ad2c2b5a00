"""net/sweeper.py: the clean-up timer runs only while there is state to clean up."""

from __future__ import annotations

import asyncio

from corral.net.sweeper import Sweeper

INTERVAL = 0.01


class Part:
    """A part whose state is a count of items; each sweep forgets one."""

    def __init__(self) -> None:
        self.items = 0
        self.sweeps = 0
        self.delay = INTERVAL

    def sweep(self) -> float | None:
        self.sweeps += 1
        self.items = max(0, self.items - 1)
        return self.delay if self.items > 0 else None


def run(body):  # type: ignore[no-untyped-def]
    return asyncio.run(body())


def test_no_state_no_timer() -> None:
    async def body() -> None:
        part = Part()
        sweeper = Sweeper(INTERVAL, part.sweep)
        sweeper.start(asyncio.get_running_loop())
        await asyncio.sleep(INTERVAL * 10)
        assert part.sweeps == 0
        assert not sweeper.armed

    run(body)


def test_sweeps_while_state_remains_then_stops() -> None:
    async def body() -> None:
        part = Part()
        sweeper = Sweeper(INTERVAL, part.sweep)
        sweeper.start(asyncio.get_running_loop())
        part.items = 3
        sweeper.arm()
        sweeper.arm()  # a second arm while one sweep is due adds no timer
        await asyncio.sleep(INTERVAL * 30)
        assert part.items == 0
        assert part.sweeps == 3  # the third found nothing left and did not re-arm
        assert not sweeper.armed
        part.items = 1
        sweeper.arm()  # new state after it stopped starts it again
        assert sweeper.armed
        await asyncio.sleep(INTERVAL * 10)
        assert part.sweeps == 4

    run(body)


def test_a_sweep_sets_when_the_next_comes() -> None:
    async def body() -> None:
        part = Part()
        part.delay = INTERVAL * 1000  # the next sweep, much later
        sweeper = Sweeper(INTERVAL, part.sweep)
        sweeper.start(asyncio.get_running_loop())
        part.items = 3
        sweeper.arm()
        await asyncio.sleep(INTERVAL * 10)
        assert part.sweeps == 1 and sweeper.armed
        sweeper.close()

    run(body)


def test_close_cancels_and_later_arms_do_nothing() -> None:
    async def body() -> None:
        part = Part()
        sweeper = Sweeper(INTERVAL, part.sweep)
        sweeper.start(asyncio.get_running_loop())
        part.items = 5
        sweeper.arm()
        sweeper.close()
        sweeper.arm()
        await asyncio.sleep(INTERVAL * 10)
        assert part.sweeps == 0
        assert not sweeper.armed

    run(body)


def test_arm_before_start_is_harmless() -> None:
    part = Part()
    sweeper = Sweeper(INTERVAL, part.sweep)
    sweeper.arm()  # a part that adds state before its start (tests) has no loop yet
    assert not sweeper.armed
