"""Published ports: listeners on the host that forward to a port of the guest.

Each :class:`~corral.config.PortBinding` (``ports``, ``ports_udp`` and ``port_bindings`` of
the config, merged) becomes a socket bound on ``bind:host_port`` in the host netns. The
sockets are bound when the sandbox's network is *reserved*, before its init exists, so a host
port already in use is a clear error at create time and not a half-started sandbox.

Every inbound TCP connection, and every new UDP peer, is decided by the ingress policy (peer
address, guest port). Allowed TCP is joined to a connection from the host to
``guest_ip:guest_port`` with splice; denied gets a reset. UDP peers get a socket connected to
the guest port each; the guest's replies go back to the peer from the published socket.

Inbound connections are not counted in ``max_connections`` (that limit is about what the
sandbox opens); they are bounded by :data:`MAX_INBOUND` so that a flood at a published port
cannot exhaust the supervisor's descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import socket
import time
from dataclasses import dataclass

from corral.errors import NetworkError
from corral.net.firewall import PUBLISHED_MARK
from corral.net.gate import FlowGate, IPAddress
from corral.net.splice import PipePool, SplicedPair, reset
from corral.net.sweeper import Sweeper

#: Inbound TCP connections plus UDP peers per sandbox at once (each costs 2-6 descriptors).
MAX_INBOUND = 1024

#: Connect timeout toward the guest: it is on the same machine, so anything slower than this
#: is a guest that does not answer at all.
GUEST_CONNECT_TIMEOUT = 5.0

#: Idle time after which a UDP peer's session is dropped (as in the UDP relay).
UDP_PEER_IDLE_TIMEOUT = 60.0

#: Backlog of a published TCP port (the kernel clamps to somaxconn).
LISTEN_BACKLOG = 1024

MAX_DATAGRAM = 65535


@dataclass(frozen=True, slots=True)
class Published:
    """One bound published port."""

    bind: IPAddress
    host_port: int
    guest_port: int
    protocol: str  # tcp | udp
    sock: socket.socket


def bind_published(bind: IPAddress, host_port: int, guest_port: int, protocol: str) -> Published:
    """Bind the host side of a published port; NetworkError naming the port if it is taken."""
    family = socket.AF_INET if bind.version == 4 else socket.AF_INET6
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((str(bind), host_port))
        host_port = sock.getsockname()[1]  # port 0 asks the kernel for a free one
        if kind == socket.SOCK_STREAM:
            sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        where = f"[{bind}]:{host_port}" if bind.version == 6 else f"{bind}:{host_port}"
        if exc.errno == errno.EADDRINUSE:
            raise NetworkError(
                f"published {protocol} port {where} is already in use on the host"
            ) from None
        raise NetworkError(f"publishing {protocol} port {where} failed: {exc.strerror}") from None
    return Published(bind, host_port, guest_port, protocol, sock)


class _UdpPeer:
    __slots__ = ("last", "peer", "published", "sock")

    def __init__(self, published: Published, peer: tuple[str, int], sock: socket.socket) -> None:
        self.published = published
        self.peer = peer
        self.sock = sock
        self.last = time.monotonic()


class PublishedPorts:
    """Serves every published port of one sandbox."""

    def __init__(
        self,
        gate: FlowGate,
        guest: IPAddress,
        published: list[Published],
        pipes: PipePool | None = None,
    ) -> None:
        self.gate = gate
        self.guest = guest
        self.published = published
        self.pipes = pipes or PipePool()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pairs: set[SplicedPair] = set()
        self._pending: set[asyncio.Task[None]] = set()
        self._udp: dict[tuple[int, tuple[str, int]], _UdpPeer] = {}
        self._sweeper = Sweeper(5.0, self._sweep)

    @property
    def inbound(self) -> int:
        return len(self._pairs) + len(self._pending) + len(self._udp)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for p in self.published:
            if p.protocol == "tcp":
                self._loop.add_reader(p.sock.fileno(), self._accept, p)
            else:
                self._loop.add_reader(p.sock.fileno(), self._datagram, p)
        self._sweeper.start(self._loop)

    def close(self) -> None:
        self._sweeper.close()
        for p in self.published:
            if self._loop is not None and p.sock.fileno() >= 0:
                self._loop.remove_reader(p.sock.fileno())
            p.sock.close()
        for task in list(self._pending):
            task.cancel()
        for pair in list(self._pairs):
            pair.close()
        for session in list(self._udp.values()):
            self._end_udp(session)
        self.pipes.close()

    # -- TCP --------------------------------------------------------------------------------
    def _accept(self, p: Published) -> None:
        for _ in range(64):
            try:
                conn, peer = p.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            address = ipaddress.ip_address(peer[0].split("%")[0])
            if self.inbound >= MAX_INBOUND:
                reset(conn)
                continue
            verdict = self.gate.ingress("tcp", address, str(self.guest), p.guest_port)
            if not verdict.allowed:
                reset(conn)
                continue
            conn.setblocking(False)
            task = asyncio.ensure_future(self._dial(conn, p))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _dial(self, conn: socket.socket, p: Published) -> None:
        assert self._loop is not None
        family = socket.AF_INET if self.guest.version == 4 else socket.AF_INET6
        up = socket.socket(family, socket.SOCK_STREAM)
        up.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, PUBLISHED_MARK)
        up.setblocking(False)
        try:
            await asyncio.wait_for(
                self._loop.sock_connect(up, (str(self.guest), p.guest_port)), GUEST_CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError, asyncio.CancelledError):
            up.close()
            reset(conn)
            return
        pair = SplicedPair(self._loop, conn, up, self.pipes, self._pairs.discard)
        self._pairs.add(pair)
        pair.start()

    # -- UDP --------------------------------------------------------------------------------
    def _datagram(self, p: Published) -> None:
        for _ in range(64):
            try:
                data, peer = p.sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            key = (id(p), (peer[0], peer[1]))
            session = self._udp.get(key)
            if session is None:
                session = self._open_udp(p, (peer[0], peer[1]))
                if session is None:
                    continue
                self._udp[key] = session
                self._sweeper.arm()
            session.last = time.monotonic()
            with contextlib.suppress(OSError):
                session.sock.send(data)

    def _open_udp(self, p: Published, peer: tuple[str, int]) -> _UdpPeer | None:
        if self.inbound >= MAX_INBOUND:
            return None
        address = ipaddress.ip_address(peer[0].split("%")[0])
        if not self.gate.ingress("udp", address, str(self.guest), p.guest_port).allowed:
            return None
        family = socket.AF_INET if self.guest.version == 4 else socket.AF_INET6
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, PUBLISHED_MARK)
            sock.setblocking(False)
            sock.connect((str(self.guest), p.guest_port))
        except OSError:
            sock.close()
            return None
        session = _UdpPeer(p, peer, sock)
        assert self._loop is not None
        self._loop.add_reader(sock.fileno(), self._from_guest, session)
        return session

    def _from_guest(self, session: _UdpPeer) -> None:
        for _ in range(64):
            try:
                data = session.sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            session.last = time.monotonic()
            with contextlib.suppress(OSError):
                session.published.sock.sendto(data, session.peer)

    def _end_udp(self, session: _UdpPeer) -> None:
        self._udp.pop((id(session.published), session.peer), None)
        if self._loop is not None and session.sock.fileno() >= 0:
            self._loop.remove_reader(session.sock.fileno())
        session.sock.close()

    def _sweep(self) -> float | None:
        now = time.monotonic()
        for s in [s for s in self._udp.values() if now - s.last >= UDP_PEER_IDLE_TIMEOUT]:
            self._end_udp(s)
        return self._sweeper.interval if self._udp else None
