"""The splice pair (net/splice.py) between real TCP sockets on loopback: what the edge-triggered
epoll must not lose (bytes already queued when the pair starts, many small segments, end of
stream arriving with the last bytes), half-close, back-pressure and bulk mode, resets both ways
(also one arriving after a half-close, when neither direction waits on the socket), and the
pipes and registrations a closed pair leaves behind (none but the pooled pipes)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import resource
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from corral.net import splice
from corral.net.splice import PipePool, SplicedPair

RESET = struct.pack("ii", 1, 0)


def tcp_pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    """(dialled, accepted), both blocking."""
    dialled = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    return dialled, accepted


class Rig:
    """client <-> [guest side | pair | upstream side] <-> server, all on 127.0.0.1."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.client, guest = tcp_pair(self.listener)
        upstream, self.server = tcp_pair(self.listener)
        guest.setblocking(False)
        upstream.setblocking(False)
        self.guest, self.upstream = guest, upstream
        self.pool = PipePool()
        self.closed = threading.Event()

    def run(self, endpoints: Callable[[], None], timeout: float = 20.0) -> None:
        """Start the pair on a loop, run ``endpoints`` on a thread, wait for the pair's close."""

        async def main() -> None:
            loop = asyncio.get_running_loop()
            done = asyncio.Event()
            pair = SplicedPair(loop, self.guest, self.upstream, self.pool, lambda _: done.set())
            pair.start()
            worker = loop.run_in_executor(None, endpoints)
            await asyncio.wait_for(asyncio.gather(worker, done.wait()), timeout)
            assert pair.poller.pairs == {}
            self.pool.close()

        asyncio.run(main())
        assert self.guest.fileno() == -1 and self.upstream.fileno() == -1

    def close(self) -> None:
        for s in (self.client, self.server, self.listener):
            s.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def read_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while chunk := sock.recv(1 << 16):
        out += chunk
    return bytes(out)


def test_request_answer_half_close(rig: Rig) -> None:
    def endpoints() -> None:
        rig.client.sendall(b"GET / HTTP/1.0\r\n\r\n")
        rig.client.shutdown(socket.SHUT_WR)
        assert read_all(rig.server) == b"GET / HTTP/1.0\r\n\r\n"  # the FIN was forwarded
        rig.server.sendall(b"HTTP/1.0 200 OK\r\n\r\nok")
        rig.server.close()
        assert read_all(rig.client) == b"HTTP/1.0 200 OK\r\n\r\nok"

    rig.run(endpoints)


def test_bytes_and_end_of_stream_queued_before_the_start_are_carried(rig: Rig) -> None:
    """Edge-triggered: what is there when the sockets are registered, in many small segments
    and with the FIN behind them, must be read without any later event."""
    rig.client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sent = b"".join(bytes([i % 251]) * (1 + i % 7) for i in range(3000))
    for i in range(0, len(sent), 5):
        rig.client.send(sent[i : i + 5])
    rig.client.shutdown(socket.SHUT_WR)
    rig.server.sendall(b"banner")
    rig.server.shutdown(socket.SHUT_WR)

    def endpoints() -> None:
        assert read_all(rig.server) == sent
        assert read_all(rig.client) == b"banner"

    rig.run(endpoints)


def test_back_pressure_and_bulk_mode_carry_every_byte_both_ways(rig: Rig) -> None:
    size = splice.PROMOTE_AFTER * 3 + 12345
    data = os.urandom(size)
    digests: dict[str, str] = {}

    def endpoints() -> None:
        def slow_reader() -> None:
            got = hashlib.sha256()
            rig.server.settimeout(10)
            while chunk := rig.server.recv(1 << 12):  # small reads: the pair must wait
                got.update(chunk)
            digests["up"] = got.hexdigest()
            rig.server.sendall(data[::-1])
            rig.server.close()

        t = threading.Thread(target=slow_reader)
        t.start()
        rig.client.sendall(data)
        rig.client.shutdown(socket.SHUT_WR)
        digests["down"] = hashlib.sha256(read_all(rig.client)).hexdigest()
        t.join()

    rig.run(endpoints)
    assert digests["up"] == hashlib.sha256(data).hexdigest()
    assert digests["down"] == hashlib.sha256(data[::-1]).hexdigest()


def test_an_upstream_reset_resets_the_guest(rig: Rig) -> None:
    def endpoints() -> None:
        rig.client.sendall(b"hello")
        assert rig.server.recv(5) == b"hello"
        rig.server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
        rig.server.close()
        with pytest.raises(ConnectionResetError):
            read_all(rig.client)

    rig.run(endpoints)


def test_a_reset_after_half_close_ends_the_pair_and_resets_the_other_side(rig: Rig) -> None:
    """The guest half-closes (its direction is over, nothing reads it), then resets: no
    direction waits on that socket, the error itself ends the pair."""

    def endpoints() -> None:
        rig.client.shutdown(socket.SHUT_WR)
        assert read_all(rig.server) == b""
        rig.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
        rig.client.close()
        # After a FIN reads say end of stream whatever comes; the reset is the socket's error
        # (EPIPE: it arrived in CLOSE_WAIT).
        deadline = time.monotonic() + 10
        error = 0
        while not error and time.monotonic() < deadline:
            time.sleep(0.01)
            error = rig.server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        assert error in (errno.EPIPE, errno.ECONNRESET)

    rig.run(endpoints)


def test_a_callback_moves_at_most_its_budget_and_reads_on_later(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Edge-triggered pumps read until EAGAIN; a source that always has more must still let
    the loop turn (each callback moves READ_BUDGET, then yields and reads on)."""
    chunk = 1 << 14
    monkeypatch.setattr(splice, "PIPE_SIZE", chunk)
    monkeypatch.setattr(splice, "READ_BUDGET", 1)
    monkeypatch.setattr(splice, "MAX_BULK_PAIRS", 0)  # stay in loop mode
    total = 1 << 20
    data = os.urandom(total)
    writer = threading.Thread(target=rig.client.sendall, args=(data,))
    writer.start()
    deadline = time.monotonic() + 10
    while queued(rig.guest) < 4 * chunk and time.monotonic() < deadline:
        time.sleep(0.01)
    assert queued(rig.guest) >= 4 * chunk
    got = bytearray()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        pair = SplicedPair(loop, rig.guest, rig.upstream, rig.pool, lambda _: done.set())
        pair.start()
        assert pair.ab.moved == chunk  # one chunk, the rest in later turns

        def server() -> None:
            while len(got) < total:
                got.extend(rig.server.recv(1 << 16))
            rig.server.close()
            rig.client.close()

        await asyncio.wait_for(asyncio.gather(loop.run_in_executor(None, server), done.wait()), 20)
        rig.pool.close()

    asyncio.run(main())
    writer.join()
    assert bytes(got) == data


def queued(sock: socket.socket) -> int:
    """Bytes waiting in a socket's receive queue (SIOCINQ)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


def test_a_pair_that_finds_no_descriptor_for_its_pipes_leaves_nothing(rig: Rig) -> None:
    """Descriptors exhausted (a flood): the pair is refused at construction and the pipe it
    did get goes back to the pool (the proxy then resets the connection, its slot back)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fill: list[int] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        rig.pool.poller(loop)  # the epoll exists before the descriptors run out
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 16, hard))
        try:
            with contextlib.suppress(OSError):
                while True:
                    fill.append(os.open("/dev/null", os.O_RDONLY))
            os.close(fill.pop())
            os.close(fill.pop())  # room for exactly one pipe
            with pytest.raises(OSError):
                SplicedPair(loop, rig.guest, rig.upstream, rig.pool, lambda _: None)
        finally:
            for fd in fill:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert len(rig.pool._free) == 1
        rig.pool.close()

    asyncio.run(main())
