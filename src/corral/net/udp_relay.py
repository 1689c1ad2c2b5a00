"""The per-flow UDP relay of one sandbox.

nftables TPROXYs the guest's UDP to a transparent socket on the gateway address that reports
each datagram's original destination (``IP_RECVORIGDSTADDR``). A *flow* is (guest port,
destination address, destination port). Its first datagram takes a ``max_connections`` slot
and is decided by the :class:`FlowGate`; an allowed flow gets:

- an upstream socket in the host netns, connected to the destination (the gateway becomes the
  host's loopback), which receives the server's replies;
- a *reply* socket bound with ``IP_TRANSPARENT`` to the destination address and port and
  connected to the guest, so replies reach the guest from the address it sent to. Because it
  is connected, TPROXY's established-socket lookup also hands it the flow's later datagrams.

Queues are bounded by construction: nothing is queued in Python. A datagram that cannot be
sent at once (socket buffer full) is dropped, as UDP allows. A flow idle for
:data:`UDP_IDLE_TIMEOUT` is closed and its slot returned. Denied flows are remembered for a
while so that a guest retrying a denied destination produces one audit event, not thousands.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import struct
import time
from collections import OrderedDict

from corral.net.gate import FlowGate, IPAddress
from corral.net.icmp import checksum
from corral.net.sweeper import Sweeper
from corral.net.tcp_proxy import IP_TRANSPARENT, IPV6_TRANSPARENT, transparent_listener
from corral.net.tls_interceptor import REASON_PREFIX as QUIC_REASON_PREFIX

_log = logging.getLogger(__name__)

IP_RECVORIGDSTADDR = 20
IPV6_RECVORIGDSTADDR = 74
IP_ORIGDSTADDR = IP_RECVORIGDSTADDR
IPV6_ORIGDSTADDR = IPV6_RECVORIGDSTADDR

#: Largest UDP payload (65535 - 8 byte header); a smaller buffer would truncate jumbo datagrams.
MAX_DATAGRAM = 65535

#: Idle time after which a flow is forgotten. Linux conntrack uses 30 s for unreplied and
#: 120 s for replied UDP; 60 s keeps DNS/QUIC/NTP-style exchanges alive without pinning slots.
UDP_IDLE_TIMEOUT = 60.0

#: How often idle flows are swept: a flow lives at most this much past its idle timeout.
SWEEP_INTERVAL = 5.0

#: Denied flows remembered (key -> expiry), so retries are dropped without a new audit event.
DENIED_MEMORY = 1024
DENIED_MEMORY_SECONDS = 10.0

#: Datagrams read per readiness callback before yielding to the loop (fairness across flows).
RECV_BATCH = 64

_CMSG_SPACE = socket.CMSG_SPACE(28)  # sockaddr_in6 is the larger of the two

FlowKey = tuple[int, IPAddress, int]  # guest port, destination, destination port


def parse_origdst(level: int, kind: int, data: bytes) -> tuple[IPAddress, int] | None:
    """The original destination from an ``IP(V6)_ORIGDSTADDR`` control message (a sockaddr)."""
    if level == socket.SOL_IP and kind == IP_ORIGDSTADDR and len(data) >= 8:
        port = struct.unpack_from("!H", data, 2)[0]
        return ipaddress.IPv4Address(data[4:8]), port
    if level == socket.IPPROTO_IPV6 and kind == IPV6_ORIGDSTADDR and len(data) >= 24:
        port = struct.unpack_from("!H", data, 2)[0]
        return ipaddress.IPv6Address(data[8:24]), port
    return None


def build_udp_packet(
    src: IPAddress, sport: int, dst: IPAddress, dport: int, payload: bytes
) -> bytes:
    """An IP packet carrying one UDP datagram (for the raw-socket reply path)."""
    length = 8 + len(payload)
    if src.version == 4:
        pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, socket.IPPROTO_UDP, length)
    else:
        pseudo = src.packed + dst.packed + struct.pack("!I3xB", length, socket.IPPROTO_UDP)
    udp = struct.pack("!HHHH", sport, dport, length, 0) + payload
    csum = checksum(pseudo + udp) or 0xFFFF  # 0 means "no checksum" in UDP
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    if src.version == 4:
        header = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + length, 0, 0x4000, 64, socket.IPPROTO_UDP, 0,
            src.packed, dst.packed,
        )  # fmt: skip
        header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
        return header + udp
    header = struct.pack(
        "!IHBB16s16s", 6 << 28, length, socket.IPPROTO_UDP, 64, src.packed, dst.packed
    )
    return header + udp


class _Flow:
    __slots__ = ("guest", "key", "last", "reply", "upstream")

    def __init__(
        self,
        key: FlowKey,
        guest: tuple[str, int],
        upstream: socket.socket,
        reply: socket.socket | None,
    ) -> None:
        self.key = key
        self.guest = guest
        self.upstream = upstream
        self.reply = reply
        self.last = time.monotonic()


class UdpRelay:
    """Relays the sandbox's UDP flows; see the module docstring."""

    def __init__(
        self,
        gate: FlowGate,
        guests: list[IPAddress],
        listen: list[IPAddress],
        *,
        idle_timeout: float = UDP_IDLE_TIMEOUT,
        blocked_ports: frozenset[int] = frozenset(),
    ) -> None:
        self.gate = gate
        #: ``tls.block_quic``: UDP to these (the intercepted) ports is dropped after the
        #: verdict allowed it, so QUIC clients fall back to TLS over TCP, which is intercepted.
        self.blocked_ports = blocked_ports
        self.guests = frozenset(guests)
        self.idle_timeout = idle_timeout
        self.listeners = [transparent_listener(a, socket.SOCK_DGRAM) for a in listen]
        for a, s in zip(listen, self.listeners, strict=True):
            if a.version == 4:
                s.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
            else:
                s.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
        self.ports = {
            a.version: s.getsockname()[1] for a, s in zip(listen, self.listeners, strict=True)
        }
        self.flows: dict[FlowKey, _Flow] = {}
        self._denied: OrderedDict[FlowKey, float] = OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper = Sweeper(SWEEP_INTERVAL, self._sweep)
        self._raw: dict[int, socket.socket] = {}

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for sock in self.listeners:
            self._loop.add_reader(sock.fileno(), self._from_listener, sock)
        self._sweeper.start(self._loop)

    def close(self) -> None:
        loop = self._loop
        self._sweeper.close()
        for sock in self.listeners:
            if loop is not None and sock.fileno() >= 0:
                loop.remove_reader(sock.fileno())
            sock.close()
        for flow in list(self.flows.values()):
            self._end(flow)
        for sock in self._raw.values():
            sock.close()
        self._raw.clear()

    # -- guest -> upstream ------------------------------------------------------------------
    def _from_listener(self, sock: socket.socket) -> None:
        for _ in range(RECV_BATCH):
            try:
                data, ancdata, _flags, peer = sock.recvmsg(MAX_DATAGRAM, _CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            dst = None
            for level, kind, cdata in ancdata:
                dst = parse_origdst(level, kind, cdata) or dst
            if dst is None:
                continue
            try:
                self._datagram(peer, dst[0], dst[1], data)
            except Exception:  # a bug must cost this datagram, not the relay
                _log.exception("relaying a datagram from %s failed", peer[0])

    def _datagram(
        self,
        peer: tuple[str, int] | tuple[str, int, int, int],
        dst: IPAddress,
        dport: int,
        data: bytes,
    ) -> None:
        source = ipaddress.ip_address(peer[0])
        if source not in self.guests:
            return  # only the guest's packets are diverted here; anything else is not ours
        key: FlowKey = (int(peer[1]), dst, dport)
        flow = self.flows.get(key)
        if flow is None:
            flow = self._open(key, (str(source), int(peer[1])))
            if flow is None:
                return
        flow.last = time.monotonic()
        with contextlib.suppress(OSError):  # full buffer or ICMP error: UDP may drop
            flow.upstream.send(data)

    def _open(self, key: FlowKey, guest: tuple[str, int]) -> _Flow | None:
        now = time.monotonic()
        expiry = self._denied.get(key)
        if expiry is not None:
            if expiry > now:
                return None
            del self._denied[key]
        _, dst, dport = key
        if not self.gate.try_acquire("udp", guest[0], dst, dport):
            return None
        try:
            verdict = self.gate.egress("udp", guest[0], dst, dport)
        except BaseException:
            self.gate.release()
            raise
        if not verdict.allowed or verdict.target is None:
            self.gate.release()
            self._denied[key] = now + DENIED_MEMORY_SECONDS
            while len(self._denied) > DENIED_MEMORY:
                self._denied.popitem(last=False)
            return None
        if dport in self.blocked_ports:
            self.gate.release()
            self.gate.audit.record(
                direction="egress", protocol="udp", source=guest[0], destination=str(dst),
                port=dport, action="deny",
                reason=f"{QUIC_REASON_PREFIX}UDP to intercepted port {dport} is dropped "
                "(block_quic: QUIC falls back to TLS over TCP, which is intercepted)",
            )  # fmt: skip
            self._denied[key] = now + DENIED_MEMORY_SECONDS
            while len(self._denied) > DENIED_MEMORY:
                self._denied.popitem(last=False)
            return None
        target = verdict.target
        upstream: socket.socket | None = None
        reply: socket.socket | None = None
        try:
            upstream = socket.socket(
                socket.AF_INET if target.version == 4 else socket.AF_INET6, socket.SOCK_DGRAM
            )
            upstream.setblocking(False)
            upstream.connect((str(target), dport))
            try:
                reply = self._reply_socket(dst, dport, guest)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                # A host socket owns dst:dport (the destination is a host address): replies
                # are written as raw packets instead; later datagrams reach the listener.
                self._raw_socket(dst.version)
        except OSError as exc:
            for s in (upstream, reply):
                if s is not None:
                    s.close()
            self.gate.release()
            self.gate.audit.record(
                direction="egress",
                protocol="udp",
                source=guest[0],
                destination=str(dst),
                port=dport,
                action="deny",
                reason=f"the UDP relay could not open the flow: {exc.strerror or exc}",
            )
            return None
        flow = _Flow(key, guest, upstream, reply)
        self.flows[key] = flow
        self._sweeper.arm()
        assert self._loop is not None
        self._loop.add_reader(upstream.fileno(), self._from_upstream, flow)
        if reply is not None:
            self._loop.add_reader(reply.fileno(), self._from_guest, flow)
        return flow

    def _raw_socket(self, version: int) -> socket.socket:
        sock = self._raw.get(version)
        if sock is None:
            family = socket.AF_INET if version == 4 else socket.AF_INET6
            sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
            sock.setblocking(False)
            self._raw[version] = sock
        return sock

    def _send_raw(self, flow: _Flow, data: bytes) -> None:
        _, src, sport = flow.key
        guest = ipaddress.ip_address(flow.guest[0])
        packet = build_udp_packet(src, sport, guest, flow.guest[1], data)
        self._raw_socket(src.version).sendto(packet, (flow.guest[0], 0))

    def _reply_socket(self, dst: IPAddress, dport: int, guest: tuple[str, int]) -> socket.socket:
        family = socket.AF_INET if dst.version == 4 else socket.AF_INET6
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            sock.setblocking(False)
            sock.bind((str(dst), dport))
            sock.connect(guest)
        except BaseException:
            sock.close()
            raise
        return sock

    def _from_guest(self, flow: _Flow) -> None:
        """Later datagrams of the flow, delivered to its connected reply socket."""
        assert flow.reply is not None
        for _ in range(RECV_BATCH):
            try:
                data = flow.reply.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            flow.last = time.monotonic()
            with contextlib.suppress(OSError):
                flow.upstream.send(data)

    # -- upstream -> guest ------------------------------------------------------------------
    def _from_upstream(self, flow: _Flow) -> None:
        for _ in range(RECV_BATCH):
            try:
                data = flow.upstream.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # ICMP unreachable reported on the connected socket: nothing to relay
            flow.last = time.monotonic()
            with contextlib.suppress(OSError):
                if flow.reply is not None:
                    flow.reply.send(data)
                else:
                    self._send_raw(flow, data)

    # -- lifetime ---------------------------------------------------------------------------
    def _sweep(self) -> float | None:
        now = time.monotonic()
        for flow in [f for f in self.flows.values() if now - f.last >= self.idle_timeout]:
            self._end(flow)
        return self._sweeper.interval if self.flows else None

    def _end(self, flow: _Flow) -> None:
        if self.flows.pop(flow.key, None) is None:
            return
        loop = self._loop
        for s in (flow.upstream, flow.reply):
            if s is None:
                continue
            if loop is not None:
                loop.remove_reader(s.fileno())
            s.close()
        self.gate.release()
