"""A periodic clean-up timer that is armed only while there is something to clean up.

The data path's parts forget idle state on a timer: UDP flows and published-port peers after
their idle timeout, ICMP echoes after their deadline, the DNS interceptor's idle TCP clients,
cache entries, failure memory and pins. A timer re-armed forever wakes every idle sandbox's
supervisor about once a second (1.2 wake-ups/s measured for a public-only sandbox that did
nothing; 120/s beside 100 idle sandboxes) to find nothing to do. A :class:`Sweeper` runs
while its part holds state and stops when a sweep leaves none; the part calls :meth:`arm`
whenever it adds state, which is one attribute test while the timer runs. A sweep may also
ask for its next run later than the interval (the DNS interceptor's cache and pins are only
memory to reclaim, its idle TCP clients are connections to close on time).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Sweeper:
    """Calls ``sweep`` ``interval`` seconds after state was added, and again while it asks.

    ``sweep`` removes what has expired and returns the seconds until it wants to run again
    (``interval`` usually), or None when nothing is left to sweep.
    """

    def __init__(self, interval: float, sweep: Callable[[], float | None]) -> None:
        self.interval = interval
        self._sweep = sweep
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def armed(self) -> bool:
        return self._handle is not None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind to the part's loop; the first :meth:`arm` starts the timer."""
        self._loop = loop

    def arm(self, delay: float | None = None) -> None:
        """State was added: make sure a sweep comes (no-op while one is due)."""
        if self._handle is None and self._loop is not None and not self._closed:
            self._handle = self._loop.call_later(
                self.interval if delay is None else delay, self._fire
            )

    def close(self) -> None:
        self._closed = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        delay = self._sweep()
        if delay is not None:
            self.arm(delay)
