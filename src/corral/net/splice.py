"""Moving a TCP byte stream between two sockets with ``splice(2)``: no byte enters Python.

A :class:`SplicedPair` joins two connected, non-blocking sockets with two :class:`_Pump`\\ s,
one per direction. A pump splices what the source has into a pipe and from the pipe into the
destination. No task, no coroutine per connection, and none of asyncio's per-fd bookkeeping:
every spliced socket is registered **once**, edge-triggered, in one epoll of the pair's
:class:`PipePool` (its :class:`_Poller`, itself one reader of the event loop), for input and
peer close; ``EPOLLOUT`` is added only the first time a destination is full. Closing a socket
removes it from the epoll, so a connection costs two ``epoll_ctl`` in all (asyncio's
``add_reader``/``remove_reader`` per direction and state cost six, each a selector round trip
in Python). Edge-triggered means a pump reads until ``EAGAIN`` or end of stream whenever it
is told to read (a short splice does not prove the socket drained: the pipe's slots can run
out first). When the destination cannot take more, the pump stops reading its source until
the destination drains (back-pressure); the bytes in flight are bounded by the pipe size.

End of stream in one direction is forwarded as ``shutdown(SHUT_WR)`` (half-close); the pair
closes when both directions ended (the second direction's FIN is the ``close`` itself, the
socket having nothing unread). An error on either side (reset, broken pipe) aborts the pair
and resets the other side (``SO_LINGER`` 0), so a guest sees an upstream reset as a reset; so
does a socket that reports an error while neither direction waits on it (a reset after its
peer's half-close).

Pipes are pooled (:class:`PipePool`): creating and resizing two pipes per connection would
cost as much as the rest of the connection setup.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import select
import socket
import struct
import threading
from collections.abc import Callable

#: Pipe capacity. 1 MiB is the default ``fs.pipe-max-size``; a bigger pipe lets one splice
#: move up to a whole TCP receive window and halves the syscalls of a bulk transfer compared
#: with the 64 KiB default (measured here: 14 -> ~16 Gbit/s).
PIPE_SIZE = 1 << 20

#: Pipe pairs kept for reuse. A pair costs four descriptors; 64 covers bursts of new
#: connections without holding many idle descriptors.
PIPE_POOL_SIZE = 64

#: Bytes one direction must have moved before the pair switches to bulk (thread) mode:
#: well past any request/response exchange, reached in about a millisecond by a bulk stream.
PROMOTE_AFTER = 4 << 20

#: Bytes one readiness callback moves before it yields to the loop (and reads on in a later
#: turn): edge-triggered readers read until EAGAIN, and a fast source into a fast destination
#: in loop mode (past :data:`MAX_BULK_PAIRS`) must not starve every other connection.
READ_BUDGET = 4 * PIPE_SIZE

#: Pairs in bulk mode at once, per supervisor (two threads each). Beyond it, connections stay
#: in loop mode, which is slower per byte but costs no thread.
MAX_BULK_PAIRS = 8

_bulk_pairs = 0

#: How long closing a bulk pair waits for its threads, which return as soon as their sockets
#: are shut down (a splice blocked on a shut-down socket returns at once).
BULK_JOIN_TIMEOUT = 2.0

F_SETPIPE_SZ = 1031  # fcntl.h; not exported by Python's fcntl module before 3.13

_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_LINGER_RESET = struct.pack("ii", 1, 0)

#: Errors that mean "this connection is over" (as opposed to a bug).
_CONNECTION_ERRORS = (ConnectionError, BrokenPipeError, TimeoutError, OSError)


_EPOLL_IN = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
_EPOLL_IN_OUT = _EPOLL_IN | select.EPOLLOUT
_EPOLL_ERR = select.EPOLLERR

#: Events taken from the pair epoll per readiness callback (more wait for the next one).
POLL_BATCH = 256


class _Poller:
    """One edge-triggered epoll for every spliced socket of a :class:`PipePool`, itself
    registered once with the event loop (see the module docstring)."""

    __slots__ = ("ep", "loop", "pairs")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ep = select.epoll()
        #: fd -> the pair that owns it; forgotten when the pair lets go of its sockets.
        self.pairs: dict[int, SplicedPair] = {}
        loop.add_reader(self.ep.fileno(), self._ready)

    def add(self, fd: int, pair: SplicedPair) -> None:
        self.ep.register(fd, _EPOLL_IN)
        self.pairs[fd] = pair

    def want_out(self, fd: int) -> None:
        self.ep.modify(fd, _EPOLL_IN_OUT)

    def remove(self, fd: int) -> None:
        """Unregister a socket that stays open (bulk mode); a closed one needs nothing."""
        self.pairs.pop(fd, None)
        with contextlib.suppress(OSError):
            self.ep.unregister(fd)

    def forget(self, fd: int) -> None:
        self.pairs.pop(fd, None)

    def _ready(self) -> None:
        pairs = self.pairs
        for fd, events in self.ep.poll(0, POLL_BATCH):
            pair = pairs.get(fd)
            if pair is not None:
                pair._event(fd, events)

    def close(self) -> None:
        if not self.loop.is_closed():
            self.loop.remove_reader(self.ep.fileno())
        self.ep.close()
        self.pairs.clear()


class PipePool:
    """Empty, non-blocking pipes of :data:`PIPE_SIZE`, reused across connections, and the
    epoll its pairs' sockets are registered in (one per owner and event loop)."""

    def __init__(self, keep: int = PIPE_POOL_SIZE) -> None:
        self._free: list[tuple[int, int]] = []
        self._keep = keep
        self._poller: _Poller | None = None

    def get(self) -> tuple[int, int]:
        if self._free:
            return self._free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # a smaller pipe still works, only slower
            fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
        return r, w

    def put(self, pipe: tuple[int, int], *, empty: bool) -> None:
        """Return a pipe; one that may still hold bytes is closed instead of reused."""
        if empty and len(self._free) < self._keep:
            self._free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def poller(self, loop: asyncio.AbstractEventLoop) -> _Poller:
        poller = self._poller
        if poller is None or poller.loop is not loop:
            if poller is not None:
                poller.close()
            poller = self._poller = _Poller(loop)
        return poller

    def close(self) -> None:
        for r, w in self._free:
            os.close(r)
            os.close(w)
        self._free.clear()
        if self._poller is not None:
            self._poller.close()
            self._poller = None


def reset(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP RST instead of a FIN (the peer sees ECONNRESET/ECONNREFUSED)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


class _Pump:
    """One direction: ``src`` -> pipe -> ``dst``. ``reading``: it wants its source's input
    events (False at end of stream, under back-pressure, in bulk mode); ``writing``: it waits
    for its destination to drain."""

    __slots__ = (
        "done", "dst", "dst_fd", "eof", "fill", "moved", "on_done", "on_error", "out_on",
        "owner", "pipe", "poller", "reading", "src", "src_fd", "writing",
    )  # fmt: skip

    def __init__(
        self,
        poller: _Poller,
        src: socket.socket,
        dst: socket.socket,
        pipe: tuple[int, int],
        on_done: Callable[[], None],
        on_error: Callable[[], None],
        owner: SplicedPair | None = None,
    ) -> None:
        self.owner = owner
        self.moved = 0
        self.poller = poller
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.pipe = pipe
        self.fill = 0
        self.eof = False
        self.done = False
        self.on_done = on_done
        self.on_error = on_error
        self.reading = True
        self.writing = False
        self.out_on = False  # EPOLLOUT is registered for dst

    def stop(self) -> None:
        self.reading = False
        self.writing = False

    def _write_on(self) -> None:
        self.writing = True
        if not self.out_on:
            # Registered once; the modify reports dst at once if it drained meanwhile.
            self.out_on = True
            self.poller.want_out(self.dst_fd)

    def readable(self) -> None:
        """Move what the source has, until it would block (edge-triggered: all of it), or
        :data:`READ_BUDGET` bytes and the rest in a later turn of the loop."""
        budget = READ_BUDGET
        try:
            while True:
                want = PIPE_SIZE - self.fill
                try:
                    n = os.splice(self.src_fd, self.pipe[1], want, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    return
                if n == 0:
                    self.eof = True
                    self.reading = False
                    self._finish_if_drained()
                    return
                self.fill += n
                self.moved += n
                if not self._flush():
                    # Destination full: stop reading until it drains (back-pressure).
                    self.reading = False
                    self._write_on()
                    return
                if self.moved >= PROMOTE_AFTER and self.owner is not None and self.owner.promote():
                    return
                budget -= n
                if budget <= 0:
                    self.poller.loop.call_soon(self._resume)
                    return
        except _CONNECTION_ERRORS:
            self.on_error()

    def _resume(self) -> None:
        if self.reading:
            self.readable()

    def _flush(self) -> bool:
        """Move the pipe into ``dst``; False if ``dst`` would block with bytes left."""
        while self.fill:
            try:
                m = os.splice(self.pipe[0], self.dst_fd, self.fill, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return False
            self.fill -= m
        return True

    def writable(self) -> None:
        try:
            if not self._flush():
                return
            self.writing = False
            if self.eof:
                self._finish_if_drained()
            else:
                # Input that came while it was not reading gave its edge already: read now.
                self.reading = True
                self.readable()
        except _CONNECTION_ERRORS:
            self.on_error()

    def _finish_if_drained(self) -> None:
        if self.fill:
            self._write_on()
            return
        self.done = True
        other = self.owner.other(self) if self.owner is not None else None
        if other is None or not other.done:
            # Half-close; when the other direction already ended, the pair's close is the FIN
            # (dst was read to its end, so nothing unread turns that close into a reset).
            with contextlib.suppress(OSError):
                self.dst.shutdown(socket.SHUT_WR)
        self.on_done()


class SplicedPair:
    """Two connected sockets joined both ways until both directions end or one side fails."""

    __slots__ = (
        "_bulk_failed",
        "_closed",
        "_closing",
        "_on_close",
        "_threads",
        "_threads_left",
        "a",
        "a_fd",
        "ab",
        "b",
        "b_fd",
        "ba",
        "loop",
        "pipes",
        "poller",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        a: socket.socket,
        b: socket.socket,
        pipes: PipePool,
        on_close: Callable[[SplicedPair], None],
    ) -> None:
        self.a = a
        self.b = b
        self.pipes = pipes
        self._on_close = on_close
        self._closed = False
        self._threads_left = 0  # > 0 while in bulk (thread) mode
        self._threads: list[threading.Thread] = []
        self._bulk_failed = False
        self._closing = False
        self.loop = loop
        self.a_fd = a.fileno()
        self.b_fd = b.fileno()
        self.poller = poller = pipes.poller(loop)
        first = pipes.get()
        try:
            second = pipes.get()
        except OSError:  # no descriptor left: the caller refuses this connection
            pipes.put(first, empty=True)
            raise
        self.ab = _Pump(poller, a, b, first, self._direction_done, self.abort, self)
        self.ba = _Pump(poller, b, a, second, self._direction_done, self.abort, self)

    def start(self) -> None:
        """Register both sockets, reading ``a`` (the side that dialled: it usually speaks
        first, and its first request is usually there already) before its registration: a
        turn of the loop less per connection; a registration reports whatever arrives
        after that read, and costs one ``EAGAIN`` splice when nothing was there."""
        try:
            self.poller.add(self.b_fd, self)
            self.ab.readable()
            if not self._closed and not self._threads_left:
                self.poller.add(self.a_fd, self)
        except OSError:  # the epoll cannot take them (ENOMEM, max_user_watches): reset both
            self.abort()

    def other(self, pump: _Pump) -> _Pump:
        return self.ba if pump is self.ab else self.ab

    def _event(self, fd: int, events: int) -> None:
        """Readiness of one of the two sockets (from the poller)."""
        if fd == self.a_fd:
            source, sink = self.ab, self.ba
        else:
            source, sink = self.ba, self.ab
        if source.reading:
            source.readable()
        if sink.writing and not self._closed:
            sink.writable()
        if events & _EPOLL_ERR and not self._closed and not self._threads_left:
            # An error neither direction consumed (a reset of a socket whose input already
            # ended and that nothing is waiting to write to): the pair is over.
            self.abort()

    def _direction_done(self) -> None:
        if self.ab.done and self.ba.done:
            self._release(reset_both=False)

    def abort(self) -> None:
        """One side failed: reset both (the peer of the failed side learns it from the RST)."""
        self._release(reset_both=True)

    def close(self) -> None:
        """Shut down (supervisor stopping): reset both sides, synchronously."""
        self._closing = True
        self._release(reset_both=True)

    # -- bulk mode --------------------------------------------------------------------------
    def promote(self) -> bool:
        """Move a connection that carries bulk data to two threads doing blocking splices.

        In loop mode every chunk costs an epoll round, a callback and an extra splice that
        ends in EAGAIN; a thread per direction blocked in splice costs two syscalls per chunk
        and no Python between them (the GIL is released inside splice). Threads are capped
        (:data:`MAX_BULK_PAIRS`) so thousands of connections never mean thousands of threads.
        """
        global _bulk_pairs
        if self._threads_left or self._closed or _bulk_pairs >= MAX_BULK_PAIRS:
            return False
        for pump in (self.ab, self.ba):
            if pump.fill or pump.eof or pump.done:
                return False
        _bulk_pairs += 1
        for pump in (self.ab, self.ba):
            pump.stop()
        # The threads own the sockets now: no readiness may reach the loop for them.
        self.poller.remove(self.a_fd)
        self.poller.remove(self.b_fd)
        self._threads_left = 2
        self.a.setblocking(True)
        self.b.setblocking(True)
        for pump in (self.ab, self.ba):
            thread = threading.Thread(
                target=self._bulk, args=(pump,), daemon=True, name="corral-splice"
            )
            self._threads.append(thread)
            thread.start()
        return True

    def _bulk(self, pump: _Pump) -> None:
        """One direction, blocking, until end of stream or an error (runs in a thread)."""
        failed = False
        src, r, w, dst = pump.src_fd, pump.pipe[0], pump.pipe[1], pump.dst_fd
        try:
            while True:
                n = os.splice(src, w, PIPE_SIZE, flags=os.SPLICE_F_MOVE)
                if n == 0:
                    break
                pump.fill = n
                while pump.fill:
                    pump.fill -= os.splice(r, dst, pump.fill, flags=os.SPLICE_F_MOVE)
            with contextlib.suppress(OSError):
                pump.dst.shutdown(socket.SHUT_WR)
        except OSError:
            failed = True
            # Wake the other direction's thread: its blocking splice returns.
            for sock in (self.a, self.b):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                    sock.shutdown(socket.SHUT_RDWR)
        pump.done = True
        with contextlib.suppress(RuntimeError):  # loop already closed: the process is exiting
            self.loop.call_soon_threadsafe(self._bulk_done, failed)

    def _bulk_done(self, failed: bool) -> None:
        """A bulk thread returned (on the loop); the last one releases the pair."""
        if self._closed:
            return  # close() already joined the threads and released everything
        self._bulk_failed |= failed
        self._threads_left -= 1
        if self._threads_left == 0:
            self._leave_bulk()
            self._release(reset_both=self._bulk_failed)

    def _leave_bulk(self) -> None:
        global _bulk_pairs
        self._threads_left = 0
        self._threads.clear()
        _bulk_pairs -= 1

    def _release(self, *, reset_both: bool) -> None:
        if self._closed:
            return
        if self._threads_left:
            # Bulk threads own the sockets until they return: wake them (their splices return
            # at once), then either let the last one release the pair or, when the supervisor
            # is closing and its loop may stop any moment, wait for them here.
            for sock in (self.a, self.b):
                with contextlib.suppress(OSError):
                    if reset_both:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                    sock.shutdown(socket.SHUT_RDWR)
            if not self._closing:
                return
            for thread in self._threads:
                thread.join(BULK_JOIN_TIMEOUT)
            self._leave_bulk()
        self._closed = True
        for pump in (self.ab, self.ba):
            pump.stop()
        self.poller.forget(self.a_fd)
        self.poller.forget(self.b_fd)
        for pump in (self.ab, self.ba):
            self.pipes.put(pump.pipe, empty=pump.fill == 0)
        for sock in (self.a, self.b):
            if reset_both:
                reset(sock)
            else:
                sock.close()
        self._on_close(self)
