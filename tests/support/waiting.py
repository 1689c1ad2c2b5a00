"""Waiting on a condition with a deadline, never a fixed sleep (the machine is shared and
loaded: a sleep long enough today is too short tomorrow, and always wastes the rest)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

#: How often a condition is polled: cheap conditions (a file, /proc) cost nothing at 20 ms.
POLL_INTERVAL = 0.02


def wait_for(
    condition: Callable[[], T], *, timeout: float, what: str, interval: float = POLL_INTERVAL
) -> T:
    """The first truthy value of ``condition()``; AssertionError naming ``what`` (and the
    last value) when ``timeout`` seconds pass first. Checked once more at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {value!r})")
        time.sleep(interval)


async def async_wait_for(
    condition: Callable[[], Awaitable[T]], *, timeout: float, what: str,
    interval: float = POLL_INTERVAL,
) -> T:
    """:func:`wait_for` for a coroutine condition, without blocking the loop."""
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {value!r})")
        await asyncio.sleep(interval)
