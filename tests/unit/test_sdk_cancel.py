"""A cancelled blocking step (Sandbox.create's thread) learns of the cancel while it runs.

Deterministic: the step waits for the cancel itself, so the order of events is fixed.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from corral.sdk.sandbox import in_caller_netns

#: Bound on each wait below; every one is for an event that happens at once.
WAIT = 10.0

#: Set by the step once it runs; set by in_caller_netns's on_cancel at the cancel.
started = threading.Event()
cancelled = threading.Event()


def _run_cancelled(step: object, undone: list[object]) -> None:
    async def scenario() -> None:
        task = asyncio.create_task(
            in_caller_netns(step, undo=undone.append, on_cancel=cancelled.set)  # type: ignore[arg-type]
        )
        assert await asyncio.to_thread(started.wait, WAIT)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    started.clear()
    cancelled.clear()
    asyncio.run(scenario())
    for thread in threading.enumerate():
        if thread.name == "corral-step":
            thread.join(WAIT)


def test_a_step_that_stops_on_the_cancel_is_neither_delivered_nor_undone() -> None:
    def step() -> str:
        started.set()
        assert cancelled.wait(WAIT)
        raise RuntimeError("stopped before claiming anything")

    undone: list[object] = []
    _run_cancelled(step, undone)
    assert undone == []


def test_a_step_that_finishes_after_the_cancel_is_undone() -> None:
    def step() -> str:
        started.set()
        assert cancelled.wait(WAIT)
        return "sandbox"

    undone: list[object] = []
    _run_cancelled(step, undone)
    assert undone == ["sandbox"]
