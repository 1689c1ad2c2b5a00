"""The asyncio shell of a sandbox's DNS interceptor: sockets, timers, nothing decided here.

nftables TPROXYs the guest's UDP and TCP port 53, whatever the destination address, to the
transparent listeners of :class:`DnsInterceptor` on the sandbox's gateway addresses (ports in
``ports``; ``net/firewall.py`` puts them in front of the general divert). Every decision is
:class:`corral.net.dns.resolver.SandboxResolver`'s; this module only moves bytes:

- UDP queries are read with ``IP_RECVORIGDSTADDR`` (the address the guest sent to), at most
  :data:`RECV_BATCH` per wake-up, and answered as raw IP/UDP packets *from that address and
  port* (``IPPROTO_RAW``, like the UDP relay's fallback): no socket per query has to be bound
  to a foreign address, so nothing can collide with another sandbox's socket or a host
  service on port 53, and the reply leaves as the reply of the guest's own conntrack entry;
- TCP queries are length-prefixed messages on accepted connections (RFC 7766: pipelined,
  answered in any order), at most :data:`MAX_TCP_CONNECTIONS` per sandbox,
  :data:`MAX_TCP_PIPELINE` outstanding per connection, idle ones closed after
  :data:`TCP_IDLE_TIMEOUT`;
- each upstream try is a fresh socket (a fresh source port: the kernel picks a random
  ephemeral port per socket) connected to the resolver, so the kernel drops datagrams from any
  other source; TCP tries run as a task with the try's deadline;
- the resolver's token bucket paces the guest: when it is empty the shell stops reading, so
  the kernel drops a UDP storm (or TCP pushes back) at no cost to the loop the data path shares.

``on_pinned`` runs synchronously with the pins an answer added, before its reply is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from corral.config import DNS_PORT
from corral.config.values import IPAddress
from corral.net.audit import AuditLog
from corral.net.dns import wire
from corral.net.dns.resolver import (
    MAX_QUERIES_PER_SECOND,
    Attempt,
    SandboxResolver,
    Step,
)
from corral.net.sweeper import Sweeper
from corral.net.tcp_proxy import transparent_listener
from corral.net.udp_relay import build_udp_packet, parse_origdst
from corral.policy import Policy
from corral.policy.pins import PinSet

_log = logging.getLogger(__name__)

IP_RECVORIGDSTADDR = 20
IPV6_RECVORIGDSTADDR = 74

#: Datagrams (or accepted connections) handled per wake-up before the loop serves others.
#: Same batch as the UDP relay and the TCP proxy's accept loop.
RECV_BATCH = 64

#: TCP connections from one sandbox to its interceptor at once. Unbound serves 10 incoming
#: TCP connections per thread (``incoming-num-tcp``), BIND 150 for a whole server
#: (``tcp-clients``); a stub uses one connection for its retry after TC. Past it a new
#: connection is closed at once.
MAX_TCP_CONNECTIONS = 32

#: Queries of one TCP connection being answered at once; past it the shell stops reading
#: that connection (RFC 7766 6.2.1.1 lets a server bound pipelining). Unbound's
#: ``stream-wait-size`` bounds the same thing in bytes.
MAX_TCP_PIPELINE = 16

#: A TCP connection with nothing outstanding is closed after this long. RFC 7766 6.2.3 asks
#: for timeouts "of the order of seconds"; Unbound and BIND default to 30 s. 10 s suffices for
#: a stub's retry and keeps idle slots from piling up.
TCP_IDLE_TIMEOUT = 10.0

#: Unsent reply bytes buffered per TCP connection: a guest that pipelines queries without
#: reading the answers is disconnected past this (four maximum-size messages).
MAX_TCP_OUTBUF = 4 * wire.MAX_TCP_MESSAGE

#: How often idle guest TCP connections are swept while there are any (the resolver's state
#: too, then; without connections the resolver says when: SandboxResolver.sweep_delay).
SWEEP_INTERVAL = 1.0

#: Bytes read from a TCP connection at once: one maximum-size query plus its prefix, so a
#: single read never holds more than ~300 minimal queries.
_TCP_READ = wire.MAX_QUERY_SIZE + 2


@dataclass(frozen=True, slots=True)
class _UdpClient:
    guest: IPAddress
    guest_port: int
    dst: IPAddress
    dst_port: int


class _GuestConnection:
    """One accepted TCP connection of the guest; hashable by identity (a Step's client)."""

    __slots__ = (
        "closed",
        "destination",
        "eof",
        "framer",
        "last",
        "messages",
        "outbuf",
        "outstanding",
        "reading",
        "sock",
        "source",
        "writing",
    )

    def __init__(self, sock: socket.socket, source: str, destination: str) -> None:
        self.sock = sock
        self.source = source
        self.destination = destination
        self.framer = wire.StreamFramer()
        self.messages: deque[bytes] = deque()
        self.outbuf = bytearray()
        self.outstanding = 0
        self.reading = False
        self.writing = False
        self.eof = False
        self.closed = False
        self.last = time.monotonic()


class DnsInterceptor:
    """One sandbox's DNS interceptor (see the module docstring)."""

    def __init__(
        self,
        *,
        sandbox: str,
        policy: Policy,
        pins: PinSet,
        gateways: list[IPAddress],
        guests: list[IPAddress],
        upstreams: list[tuple[str, int]],
        query_timeout: float,
        audit: AuditLog,
        ipv6: bool,
        on_pinned: Callable[[list[tuple[IPAddress, float]]], None] | None = None,
        max_queries_per_second: float = MAX_QUERIES_PER_SECOND,
    ) -> None:
        self.sandbox = sandbox
        self.audit = audit
        self.on_pinned = on_pinned
        self.guests = frozenset(guests)
        # The kernel's text of a guest's address -> the address: no parse per datagram.
        self._guest_text = {str(g): g for g in guests}
        self.upstreams = [(ipaddress.ip_address(a), int(p)) for a, p in upstreams]
        listen = [g for g in gateways if g.version == 4 or ipv6]
        self.core = SandboxResolver(
            policy=policy,
            pins=pins,
            gateways=listen,
            ipv6=ipv6 and any(g.version == 6 for g in listen),
            upstreams=len(self.upstreams),
            query_timeout=query_timeout,
            log_allowed=audit.log_allowed,
            clock=time.monotonic,
            max_queries_per_second=max_queries_per_second,
        )
        self._udp: list[socket.socket] = []
        self._tcp: list[socket.socket] = []
        self.ports: dict[int, dict[str, int]] = {}
        try:
            for gw in listen:
                u = transparent_listener(gw, socket.SOCK_DGRAM)
                self._udp.append(u)
                if gw.version == 4:
                    u.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
                else:
                    u.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
                t = transparent_listener(gw, socket.SOCK_STREAM)
                self._tcp.append(t)
                self.ports[gw.version] = {"udp": u.getsockname()[1], "tcp": t.getsockname()[1]}
        except BaseException:
            for s in (*self._udp, *self._tcp):
                s.close()
            raise
        self._raw: dict[int, socket.socket] = {}
        self._conns: set[_GuestConnection] = set()
        self._attempts: dict[Attempt, tuple[socket.socket | None, asyncio.Handle | None]] = {}
        self._tasks: dict[Attempt, asyncio.Task[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper = Sweeper(SWEEP_INTERVAL, self._sweep)
        self._resume: asyncio.TimerHandle | None = None
        self._closed = False

    # -- lifetime ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start serving; sync, called inside the running loop (like TcpProxy.start)."""
        self._loop = asyncio.get_running_loop()
        for s in self._udp:
            self._loop.add_reader(s.fileno(), self._from_udp, s)
        for s in self._tcp:
            s.listen(MAX_TCP_CONNECTIONS)
            self._loop.add_reader(s.fileno(), self._accept, s)
        self._sweeper.start(self._loop)

    def close(self) -> None:
        """Stop serving and drop every connection and upstream try (idempotent)."""
        if self._closed:
            return
        self._closed = True
        loop = self._loop
        self._sweeper.close()
        if self._resume is not None:
            self._resume.cancel()
        for s in (*self._udp, *self._tcp):
            if loop is not None and s.fileno() >= 0:
                loop.remove_reader(s.fileno())
            s.close()
        for conn in list(self._conns):
            self._close_conn(conn)
        for attempt in list(self._attempts):
            self._end_attempt(attempt)
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
        for s in self._raw.values():
            s.close()
        self._raw.clear()

    def set_policy(self, policy: Policy) -> None:
        """A live policy update (``corral policy set``)."""
        self.core.set_policy(policy)

    # -- applying the core's steps -----------------------------------------------------------
    def _apply(self, step: Step) -> None:
        self._sweeper.arm()  # the step may have cached, pinned or remembered a failure
        if step.pinned and self.on_pinned is not None:
            try:
                self.on_pinned(step.pinned)
            except Exception:  # the pins are in the PinSet; the kernel set is an optimisation
                _log.exception("on_pinned failed for %d addresses", len(step.pinned))
        for e in step.events:
            self.audit.record(
                direction="egress",
                protocol=e.transport,
                source=e.source,
                destination=e.destination,
                port=DNS_PORT,
                action=e.action,
                reason=f"DNS query for {e.name or '.'}: {e.reason}",
                rule=e.rule,
                names=[e.name],
            )
        for client, data in step.replies:
            if isinstance(client, _UdpClient):
                self._send_udp(client, data)
            elif isinstance(client, _GuestConnection):
                self._send_tcp(client, data)
        for attempt in step.attempts:
            self._start_attempt(attempt)

    def _step(self, fn: Callable[[], Step], what: str) -> None:
        try:
            step = fn()
        except Exception:  # a bug must cost this query, not the interceptor
            _log.exception("DNS: %s failed", what)
            return
        self._apply(step)

    # -- guest UDP ---------------------------------------------------------------------------
    def _from_udp(self, sock: socket.socket) -> None:
        bucket = self.core.bucket
        for _ in range(RECV_BATCH):
            try:
                data, ancdata, _flags, peer = sock.recvmsg(wire.MAX_QUERY_SIZE + 1, 64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if not bucket.take():
                self._pause_udp()
                return
            dst = None
            for level, kind, cdata in ancdata:
                dst = parse_origdst(level, kind, cdata) or dst
            if dst is None:
                continue
            source = self._guest_text.get(peer[0])
            if source is None:
                continue  # only the guest's packets are diverted here
            client = _UdpClient(source, int(peer[1]), dst[0], dst[1])
            try:
                step = self.core.query(data, "udp", client, peer[0], str(dst[0]))
            except Exception:  # a bug must cost this query, not the interceptor
                _log.exception("DNS: a UDP query from %s failed", source)
                continue
            self._apply(step)

    def _pause_udp(self) -> None:
        """The sandbox is over its query rate: stop reading until a token is back (the kernel
        drops what does not fit the socket buffer meanwhile)."""
        loop = self._loop
        if loop is None or self._resume is not None:
            return
        for s in self._udp:
            loop.remove_reader(s.fileno())
        self._resume = loop.call_later(self.core.bucket.wait(), self._resume_udp)

    def _resume_udp(self) -> None:
        self._resume = None
        if self._closed or self._loop is None:
            return
        for s in self._udp:
            self._loop.add_reader(s.fileno(), self._from_udp, s)

    def _raw_socket(self, version: int) -> socket.socket:
        sock = self._raw.get(version)
        if sock is None:
            family = socket.AF_INET if version == 4 else socket.AF_INET6
            sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
            sock.setblocking(False)
            self._raw[version] = sock
        return sock

    def _send_udp(self, client: _UdpClient, data: bytes) -> None:
        src = client.dst
        if src.version != client.guest.version:
            return
        packet = build_udp_packet(src, client.dst_port, client.guest, client.guest_port, data)
        with contextlib.suppress(OSError):  # a full buffer drops the reply, as UDP may
            self._raw_socket(src.version).sendto(packet, (str(client.guest), 0))

    # -- guest TCP ---------------------------------------------------------------------------
    def _accept(self, listener: socket.socket) -> None:
        for _ in range(RECV_BATCH):
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            try:
                source = ipaddress.ip_address(peer[0])
            except ValueError:
                sock.close()
                continue
            if source not in self.guests or len(self._conns) >= MAX_TCP_CONNECTIONS:
                sock.close()
                continue
            sock.setblocking(False)
            local = sock.getsockname()
            conn = _GuestConnection(sock, str(source), str(local[0]))
            self._conns.add(conn)
            self._sweeper.arm()
            self._read_on(conn)

    def _read_on(self, conn: _GuestConnection) -> None:
        if not conn.reading and not conn.closed and self._loop is not None:
            conn.reading = True
            self._loop.add_reader(conn.sock.fileno(), self._from_tcp, conn)

    def _read_off(self, conn: _GuestConnection) -> None:
        if conn.reading and self._loop is not None:
            conn.reading = False
            self._loop.remove_reader(conn.sock.fileno())

    def _from_tcp(self, conn: _GuestConnection) -> None:
        try:
            data = conn.sock.recv(_TCP_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close_conn(conn)
            return
        conn.last = time.monotonic()
        if not data:
            conn.eof = True
            self._read_off(conn)
            self._maybe_finish(conn)
            return
        try:
            conn.messages.extend(conn.framer.feed(data))
        except wire.FramingError:
            self._close_conn(conn)
            return
        self._serve_tcp(conn)

    def _serve_tcp(self, conn: _GuestConnection) -> None:
        """Answer queued messages while the pipeline, the write buffer and the rate allow;
        read more only when the queue is empty (back-pressure on the guest)."""
        bucket = self.core.bucket
        while conn.messages and not conn.closed:
            if conn.outstanding >= MAX_TCP_PIPELINE or conn.outbuf:
                break
            if not bucket.take():
                assert self._loop is not None
                self._loop.call_later(bucket.wait(), self._serve_tcp, conn)
                break
            message = conn.messages.popleft()
            conn.outstanding += 1
            try:
                step = self.core.query(message, "tcp", conn, conn.source, conn.destination)
            except Exception:
                _log.exception("DNS: a TCP query failed")
                self._close_conn(conn)
                return
            if step.silent:
                self._close_conn(conn)  # unanswerable bytes: a stream cannot skip them
                return
            self._apply(step)
        if conn.closed:
            return
        if conn.messages:
            self._read_off(conn)
        elif not conn.eof:
            self._read_on(conn)
        self._maybe_finish(conn)

    def _send_tcp(self, conn: _GuestConnection, data: bytes) -> None:
        if conn.closed:
            return
        conn.outstanding -= 1
        conn.last = time.monotonic()
        framed = wire.frame(data)
        if not conn.outbuf:
            try:
                sent = conn.sock.send(framed)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close_conn(conn)
                return
            framed = framed[sent:]
        if framed:
            conn.outbuf += framed
            if len(conn.outbuf) > MAX_TCP_OUTBUF:
                self._close_conn(conn)
                return
            if not conn.writing and self._loop is not None:
                conn.writing = True
                self._loop.add_writer(conn.sock.fileno(), self._flush, conn)
        elif conn.messages:
            self._serve_tcp(conn)
        else:
            self._maybe_finish(conn)

    def _flush(self, conn: _GuestConnection) -> None:
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close_conn(conn)
            return
        del conn.outbuf[:sent]
        if not conn.outbuf:
            assert self._loop is not None
            conn.writing = False
            self._loop.remove_writer(conn.sock.fileno())
            if conn.messages:
                self._serve_tcp(conn)
            else:
                self._maybe_finish(conn)

    def _maybe_finish(self, conn: _GuestConnection) -> None:
        if conn.eof and not conn.messages and conn.outstanding == 0 and not conn.outbuf:
            self._close_conn(conn)

    def _close_conn(self, conn: _GuestConnection) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.discard(conn)
        loop = self._loop
        if loop is not None and conn.sock.fileno() >= 0:
            if conn.reading:
                loop.remove_reader(conn.sock.fileno())
            if conn.writing:
                loop.remove_writer(conn.sock.fileno())
        conn.sock.close()

    # -- upstream ----------------------------------------------------------------------------
    def _start_attempt(self, attempt: Attempt) -> None:
        loop = self._loop
        if loop is None or self._closed:
            return
        addr, port = self.upstreams[attempt.upstream]
        delay = max(0.0, attempt.deadline - time.monotonic())
        if attempt.tcp:
            self._attempts[attempt] = (None, None)
            self._tasks[attempt] = loop.create_task(self._tcp_attempt(attempt, addr, port, delay))
            return
        family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
        sock: socket.socket | None = None
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.connect((str(addr), port))
            sock.send(attempt.wire)
        except OSError as exc:
            if sock is not None:
                sock.close()
            reason = f"sending to {addr}:{port} failed: {exc.strerror or exc}"
            loop.call_soon(self._failed, attempt, reason)
            return
        timer = loop.call_later(delay, self._failed, attempt, "timeout")
        self._attempts[attempt] = (sock, timer)
        loop.add_reader(sock.fileno(), self._from_upstream, attempt, sock)

    def _from_upstream(self, attempt: Attempt, sock: socket.socket) -> None:
        for _ in range(RECV_BATCH):
            try:
                data = sock.recv(wire.MAX_TCP_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ICMP unreachable on the connected socket
                self._failed(attempt, f"transport error: {exc.strerror or exc}")
                return
            try:
                step = self.core.upstream_reply(attempt, data)
            except Exception:
                _log.exception("DNS: an upstream answer failed")
                step = Step()
            if not self.core.is_current(attempt):
                self._end_attempt(attempt)
                self._apply(step)
                return
            self._apply(step)

    def _failed(self, attempt: Attempt, reason: str) -> None:
        self._end_attempt(attempt)
        self._step(lambda: self.core.upstream_failed(attempt, reason), "an upstream failure")

    def _end_attempt(self, attempt: Attempt) -> None:
        sock, timer = self._attempts.pop(attempt, (None, None))
        if timer is not None:
            timer.cancel()
        if sock is not None:
            if self._loop is not None and sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        task = self._tasks.pop(attempt, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _tcp_attempt(
        self, attempt: Attempt, addr: IPAddress, port: int, delay: float
    ) -> None:
        try:
            async with asyncio.timeout(delay):
                await self._tcp_exchange(attempt, addr, port)
        except TimeoutError:
            self._tasks.pop(attempt, None)
            self._failed(attempt, "timeout (TCP)")
        except (OSError, wire.FramingError) as exc:
            self._tasks.pop(attempt, None)
            self._failed(attempt, f"TCP to {addr}:{port} failed: {exc}")

    async def _tcp_exchange(self, attempt: Attempt, addr: IPAddress, port: int) -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (str(addr), port))
            await loop.sock_sendall(sock, wire.frame(attempt.wire))
            framer = wire.StreamFramer(wire.MAX_TCP_MESSAGE)
            while True:
                data = await loop.sock_recv(sock, 65536)
                if not data:
                    raise OSError("the resolver closed the connection")
                for message in framer.feed(data):
                    step = self.core.upstream_reply(attempt, message)
                    if not self.core.is_current(attempt):
                        self._tasks.pop(attempt, None)
                        self._attempts.pop(attempt, None)
                        self._apply(step)
                        return
                    self._apply(step)
        finally:
            sock.close()

    # -- housekeeping ------------------------------------------------------------------------
    def _sweep(self) -> float | None:
        now = time.monotonic()
        for conn in list(self._conns):
            if conn.outstanding == 0 and not conn.outbuf and now - conn.last >= TCP_IDLE_TIMEOUT:
                self._close_conn(conn)
        try:
            self.core.sweep()
        except Exception:
            _log.exception("DNS: the sweep failed")
        if self._conns:
            return SWEEP_INTERVAL  # idle guest TCP connections are closed on time
        return self.core.sweep_delay()

    @property
    def tcp_connections(self) -> int:
        return len(self._conns)
