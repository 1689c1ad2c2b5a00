"""What ``corral run`` and ``corral exec`` do with signals and with the user's terminal.

Signals (docker's sig-proxy, decided in docs/cli.md): SIGINT, SIGTERM and SIGHUP that reach
corral while the command runs are forwarded to the command (its process group, or with a
terminal the terminal's foreground process group); a second one kills the command outright.
Whatever ends the command, ``run`` then removes its sandbox and exits with the command's
code, or 128+N when corral itself was ended by signal N (a signal during start-up, or the
second one). :class:`SignalRelay` is that policy as a pure state machine; :class:`SignalHub`
wires it to the event loop.

Terminal (``-t``): the command gets a pty in the sandbox; here the user's terminal goes into
raw mode while it runs (so Ctrl-C, Ctrl-Z and every other key travel as bytes to the
sandbox's pty, whose line discipline turns them into signals for its foreground group), its
window size is sent at start and on every SIGWINCH, and the terminal's mode is restored
however corral ends (short of SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import sys
import termios
import tty
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

#: Signals corral forwards to the command (SIGINT: Ctrl-C on a non-raw terminal; SIGTERM:
#: ``timeout``, ``kill``, a CI runner cancelling a job; SIGHUP: the terminal closed).
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

#: Bytes read from the host's stdin at once when it is streamed into a command (-i).
STDIN_CHUNK = 64 * 1024

#: Phases of a command's life, as far as signals are concerned.
STARTING = "starting"
RUNNING = "running"
CLEANING = "cleaning"

#: What to do with a signal (SignalRelay.on_signal).
CANCEL = "cancel"  # abort the start-up (nothing runs yet)
FORWARD = "forward"  # deliver it to the command
KILL = "kill"  # kill the command and everything it started
IGNORE = "ignore"  # the sandbox is being removed: let that finish


class SignalRelay:
    """The signal policy of one ``run``/``exec`` (pure; see the module docstring)."""

    def __init__(self) -> None:
        self.phase = STARTING
        self.forwarded = 0
        #: The signal that ends corral (its exit code is 128 + this), if one does.
        self.fatal_signal: int | None = None

    def running(self) -> None:
        self.phase = RUNNING

    def cleaning(self) -> None:
        self.phase = CLEANING

    def on_signal(self, signum: int) -> str:
        if self.phase == STARTING:
            if self.fatal_signal is None:
                self.fatal_signal = signum
            return CANCEL
        if self.phase == RUNNING:
            self.forwarded += 1
            if self.forwarded == 1:
                return FORWARD
            self.fatal_signal = signum
            return KILL
        return IGNORE

    def exit_code(self, command_code: int | None) -> int:
        """corral's exit code: 128+N if signal N ended it, else the command's code."""
        if self.fatal_signal is not None:
            return 128 + self.fatal_signal
        return command_code if command_code is not None else 128 + signal.SIGTERM


class SignalHub:
    """Installs loop handlers for FORWARDED_SIGNALS and acts on SignalRelay's decisions.

    ``task`` is cancelled on CANCEL; once :meth:`attach` gave it the running command's
    stream, FORWARD calls ``stream.send_signal`` and KILL ``stream.kill``.
    """

    def __init__(self, relay: SignalRelay, task: asyncio.Task[Any]) -> None:
        self.relay = relay
        self._task = task
        self._stream: Any = None
        self._loop = asyncio.get_running_loop()
        self._pending: set[asyncio.Future[Any]] = set()

    def __enter__(self) -> SignalHub:
        for signum in FORWARDED_SIGNALS:
            self._loop.add_signal_handler(signum, self._on_signal, signum)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum in FORWARDED_SIGNALS:
            self._loop.remove_signal_handler(signum)

    def attach(self, stream: Any) -> None:
        self._stream = stream
        self.relay.running()

    def _on_signal(self, signum: int) -> None:
        action = self.relay.on_signal(signum)
        if action == CANCEL:
            self._task.cancel()
        elif action in (FORWARD, KILL) and self._stream is not None:
            call = self._stream.send_signal(signum) if action == FORWARD else self._stream.kill()
            # kill() may already be a task (it works without await); a coroutine is not.
            task = self._loop.create_task(call) if asyncio.iscoroutine(call) else call
            self._pending.add(task)
            task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Future[Any]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            with contextlib.suppress(OSError):
                sys.stderr.write(f"corral: could not pass the signal on: {task.exception()}\n")


# -- the user's terminal ----------------------------------------------------------------------


def terminal_size(fds: tuple[int, ...] = (1, 0, 2)) -> tuple[int, int] | None:
    """(rows, cols) of the first of ``fds`` that is a terminal, None if none is."""
    for fd in fds:
        try:
            rows, cols = termios.tcgetwinsize(fd)
        except (OSError, termios.error):
            continue
        if rows > 0 and cols > 0:
            return rows, cols
    return None


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """The terminal ``fd`` in raw mode for the duration (restored even on errors)."""
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        with contextlib.suppress(termios.error, OSError):
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def window_changes(on_change: Callable[[int, int], object]) -> Iterator[None]:
    """Call ``on_change(rows, cols)`` on the loop whenever SIGWINCH says the window changed."""
    loop = asyncio.get_running_loop()

    def changed() -> None:
        size = terminal_size()
        if size is not None:
            on_change(*size)

    loop.add_signal_handler(signal.SIGWINCH, changed)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGWINCH)


async def host_stdin(fd: int | None = None) -> AsyncIterator[bytes]:
    """The host's stdin as chunks until EOF, readable from the event loop.

    Terminals, pipes and sockets are read when the loop says they are readable, so nothing
    is left blocked in a read when the command exits first (the generator is just closed).
    Files that epoll cannot watch (regular files, /dev/null) never block: they are read in a
    worker thread.
    """
    fd = sys.stdin.fileno() if fd is None else fd
    loop = asyncio.get_running_loop()
    readable: asyncio.Event = asyncio.Event()
    try:
        loop.add_reader(fd, readable.set)
    except (OSError, ValueError):  # EPERM: regular file; not pollable
        while True:
            chunk = await asyncio.to_thread(os.read, fd, STDIN_CHUNK)
            if not chunk:
                return
            yield chunk
    try:
        while True:
            await readable.wait()
            readable.clear()
            # The loop's reader callback is level-triggered and may have fired again for
            # data already read: check that a read will not block (the fd is not ours to
            # make non-blocking: the user's shell shares it).
            if not select.select([fd], [], [], 0)[0]:
                continue
            try:
                chunk = os.read(fd, STDIN_CHUNK)
            except BlockingIOError:
                continue
            except OSError:  # EIO: the terminal went away
                return
            if not chunk:
                return
            yield chunk
    finally:
        loop.remove_reader(fd)
