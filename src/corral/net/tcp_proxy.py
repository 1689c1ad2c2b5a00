"""The transparent TCP proxy of one sandbox.

nftables TPROXYs every TCP connection the guest opens to a listener bound to the sandbox's
gateway address with ``IP_TRANSPARENT``; the accepted socket's local address *is* the
destination the guest dialled (no SO_ORIGINAL_DST needed). Per connection:

1. the peer must be the guest (the listener's address is a host address: any other local
   process could connect to it directly; it gets a reset);
2. a ``max_connections`` slot is taken and the flow decided by the :class:`FlowGate`;
   denied = the guest gets a reset (``ECONNREFUSED``);
3. the upstream is dialled from the host netns, non-blocking, bounded by
   :data:`CONNECT_TIMEOUT`; failure or timeout = reset;
4. bytes move both ways with splice (:mod:`corral.net.splice`).

Everything runs as event-loop callbacks rather than tasks: at thousands of connections per
second the cost of a task per connection is what decides the rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket

from corral.net.gate import FlowGate, IPAddress
from corral.net.splice import PipePool, SplicedPair, reset

_log = logging.getLogger(__name__)

IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75

#: Upstream connect timeout. Long enough for a slow server across the world (the Linux
#: default of ~2 min of SYN retries is too long for a guest to wait for a reset), short
#: enough that a black-holing destination cannot pin connection slots for minutes.
CONNECT_TIMEOUT = 15.0

#: Accept backlog of the transparent listener: the kernel clamps it to somaxconn (4096 on
#: current kernels). Past it, the kernel's SYN cookies take over under a SYN flood; a flood
#: costs the guest its own connection slots and nothing else.
LISTEN_BACKLOG = 4096

#: Connections accepted per readiness callback before yielding to the loop, so a burst of
#: new connections cannot starve the bytes of established ones.
ACCEPT_BATCH = 64


def transparent_listener(address: IPAddress, kind: int, port: int = 0) -> socket.socket:
    """A socket bound to ``address`` that TPROXY can hand foreign-addressed packets to."""
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((str(address), port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _Dial:
    """An accepted guest connection waiting for its upstream to connect."""

    __slots__ = ("guest", "proxy", "timer", "upstream")

    def __init__(self, proxy: TcpProxy, guest: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.guest = guest
        self.upstream = upstream
        self.timer: asyncio.TimerHandle | None = None


class TcpProxy:
    """Accepts the sandbox's diverted TCP connections and joins each to its upstream."""

    def __init__(
        self,
        gate: FlowGate,
        guests: list[IPAddress],
        listen: list[IPAddress],
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        pipes: PipePool | None = None,
    ) -> None:
        self.gate = gate
        self.guests = frozenset(guests)
        self.connect_timeout = connect_timeout
        self.pipes = pipes or PipePool()
        self.listeners = [transparent_listener(a, socket.SOCK_STREAM) for a in listen]
        self.ports = {
            a.version: s.getsockname()[1] for a, s in zip(listen, self.listeners, strict=True)
        }
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pairs: set[SplicedPair] = set()
        self._dials: set[_Dial] = set()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for sock in self.listeners:
            sock.listen(LISTEN_BACKLOG)
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        """Stop accepting and reset every connection (idempotent)."""
        loop = self._loop
        for sock in self.listeners:
            if loop is not None and sock.fileno() >= 0:
                loop.remove_reader(sock.fileno())
            sock.close()
        for dial in list(self._dials):
            self._fail(dial, count=True)
        for pair in list(self._pairs):
            pair.close()
        self.pipes.close()

    @property
    def connections(self) -> int:
        return len(self._pairs) + len(self._dials)

    # -- accepting --------------------------------------------------------------------------
    def _accept(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                guest, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # ECONNABORTED and friends: that connection is gone, others wait
            try:
                self._admit(guest, peer)
            except Exception:  # a bug must cost this connection, not the proxy
                _log.exception("admitting a connection from %s failed", peer[0])
                reset(guest)

    def _admit(
        self, guest: socket.socket, peer: tuple[str, int] | tuple[str, int, int, int]
    ) -> None:
        source = ipaddress.ip_address(peer[0])
        if source not in self.guests:
            reset(guest)  # a host process dialled the listener itself
            return
        local = guest.getsockname()
        dst = ipaddress.ip_address(local[0])
        port = int(local[1])
        if not self.gate.try_acquire("tcp", str(source), dst, port):
            reset(guest)
            return
        try:
            verdict = self.gate.egress("tcp", str(source), dst, port)
        except BaseException:
            self.gate.release()
            raise
        if not verdict.allowed or verdict.target is None:
            self.gate.release()
            reset(guest)
            return
        guest.setblocking(False)
        target = verdict.target
        family = socket.AF_INET if target.version == 4 else socket.AF_INET6
        try:
            upstream = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            self.gate.release()
            reset(guest)
            return
        upstream.setblocking(False)
        dial = _Dial(self, guest, upstream)
        self._dials.add(dial)
        err = upstream.connect_ex((str(target), port))
        if err not in (0, errno.EINPROGRESS):
            self._fail(dial, count=True)
            return
        assert self._loop is not None
        self._loop.add_writer(upstream.fileno(), self._connected, dial)
        dial.timer = self._loop.call_later(self.connect_timeout, self._fail, dial, True)

    def _connected(self, dial: _Dial) -> None:
        assert self._loop is not None
        self._loop.remove_writer(dial.upstream.fileno())
        if dial.timer is not None:
            dial.timer.cancel()
        err = dial.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err != 0:
            self._fail(dial, count=True)
            return
        self._dials.discard(dial)
        for s in (dial.guest, dial.upstream):
            with contextlib.suppress(OSError):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = SplicedPair(self._loop, dial.guest, dial.upstream, self.pipes, self._pair_closed)
        self._pairs.add(pair)
        pair.start()

    def _fail(self, dial: _Dial, count: bool) -> None:
        """Upstream refused, unreachable or timed out: the guest gets a reset."""
        if dial not in self._dials:
            return
        self._dials.discard(dial)
        if dial.timer is not None:
            dial.timer.cancel()
        if self._loop is not None and dial.upstream.fileno() >= 0:
            self._loop.remove_writer(dial.upstream.fileno())
        dial.upstream.close()
        reset(dial.guest)
        if count:
            self.gate.release()

    def _pair_closed(self, pair: SplicedPair) -> None:
        self._pairs.discard(pair)
        self.gate.release()
