"""ICMP echo (ping) for a sandbox: relayed, decided by the policy, answered from the address
the guest pinged.

Decision (see docs/network.md): corral *relays* echo requests rather than answering them
itself, so a reply means the destination really answered, with its real round-trip time.

- The guest's echo requests are read from a packet socket on the host side of the veth. A
  classic BPF filter lets only ICMP echo requests in (a packet socket that copied every frame
  would cost the bulk TCP path dearly). Packet sockets see frames before netfilter, and the
  sandbox's nftables table drops the request, so the host kernel never answers it.
- Each request is decided by the :class:`FlowGate` (protocol ``icmpv4``/``icmpv6``, no port;
  ICMP rules are egress-only). Allowed: the host sends its own echo request to the destination
  (the gateway: to loopback) from a raw socket, with an identifier of its own, and remembers
  it for :data:`ECHO_TIMEOUT`. When the answer comes, an echo reply with the guest's
  identifier, sequence and payload is built and written to the veth as an Ethernet frame,
  from the pinged address to the guest.
- Everything else ICMP from the guest is dropped by the firewall; errors for the guest's
  TCP/UDP come from corral's proxies as resets, not as ICMP.

Parsing the guest's frames and building replies is pure (:func:`parse_echo_request`,
:func:`build_echo_reply`); frames come from untrusted code and are fuzzed in the unit tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass

from corral.net.gate import FlowGate, IPAddress
from corral.net.sweeper import Sweeper

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_HEADER = 14
IPV4_MIN_HEADER = 20
IPV6_HEADER = 40
ICMP_HEADER = 8

ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129
PROTO_ICMP = 1
PROTO_ICMPV6 = 58

#: How long a relayed echo request waits for its answer (ping's default -W is 10 s; most
#: tools give up after 1-5 s). Expired entries free their place in :data:`MAX_PENDING`.
ECHO_TIMEOUT = 10.0

#: Echo requests of one sandbox in flight at once. ``ping -f`` keeps few in flight; a guest
#: spraying requests at many hosts is bounded here instead of growing a table without end.
MAX_PENDING = 256

#: Hop limit of the replies written to the guest (Linux default).
REPLY_TTL = 64

#: Audit events about ICMP per second at most (a ``ping -f`` at a denied host is one event
#: per second, not ten thousand).
AUDIT_PER_SECOND = 5

SO_ATTACH_FILTER = 26
PACKET_OUTGOING = 4
ICMP_FILTER = 1  # SOL_RAW option of IPv4 raw ICMP sockets
SOL_RAW = 255
ICMP6_FILTER = 1

_BPF_LD_B_ABS = 0x30
_BPF_LD_H_ABS = 0x28
_BPF_LDX_B_MSH = 0xB1
_BPF_LD_B_IND = 0x50
_BPF_JEQ_K = 0x15
_BPF_JSET_K = 0x45
_BPF_RET_K = 0x06

#: Accept unfragmented IPv4 ICMP echo requests (offsets from the Ethernet header).
BPF_ECHO_V4 = [
    (_BPF_LD_B_ABS, 0, 0, ETH_HEADER + 9),  # protocol
    (_BPF_JEQ_K, 0, 6, PROTO_ICMP),
    (_BPF_LD_H_ABS, 0, 0, ETH_HEADER + 6),  # flags + fragment offset
    (_BPF_JSET_K, 4, 0, 0x3FFF),  # MF or offset set: a fragment
    (_BPF_LDX_B_MSH, 0, 0, ETH_HEADER),  # X = IPv4 header length
    (_BPF_LD_B_IND, 0, 0, ETH_HEADER),  # ICMP type
    (_BPF_JEQ_K, 0, 1, ICMP_ECHO_REQUEST),
    (_BPF_RET_K, 0, 0, 0xFFFF),
    (_BPF_RET_K, 0, 0, 0),
]
#: Accept IPv6 ICMPv6 echo requests without extension headers.
BPF_ECHO_V6 = [
    (_BPF_LD_B_ABS, 0, 0, ETH_HEADER + 6),  # next header
    (_BPF_JEQ_K, 0, 3, PROTO_ICMPV6),
    (_BPF_LD_B_ABS, 0, 0, ETH_HEADER + IPV6_HEADER),  # ICMPv6 type
    (_BPF_JEQ_K, 0, 1, ICMPV6_ECHO_REQUEST),
    (_BPF_RET_K, 0, 0, 0xFFFF),
    (_BPF_RET_K, 0, 0, 0),
]


@dataclass(frozen=True, slots=True)
class EchoRequest:
    """An echo request the guest sent, with what is needed to answer it on the link."""

    src_mac: bytes
    dst_mac: bytes
    source: IPAddress
    destination: IPAddress
    ident: int
    sequence: int
    payload: bytes


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def _icmpv6_checksum(src: bytes, dst: bytes, message: bytes) -> int:
    pseudo = src + dst + struct.pack("!I3xB", len(message), PROTO_ICMPV6)
    return checksum(pseudo + message)


def parse_echo_request(frame: bytes) -> EchoRequest | None:
    """An Ethernet frame carrying an ICMP(v6) echo request, or None for anything else."""
    if len(frame) < ETH_HEADER + IPV4_MIN_HEADER:
        return None
    dst_mac, src_mac, ethertype = frame[0:6], frame[6:12], struct.unpack_from("!H", frame, 12)[0]
    ip = frame[ETH_HEADER:]
    if ethertype == ETH_P_IP:
        version_ihl = ip[0]
        ihl = (version_ihl & 0x0F) * 4
        if version_ihl >> 4 != 4 or ihl < IPV4_MIN_HEADER or len(ip) < ihl + ICMP_HEADER:
            return None
        total = struct.unpack_from("!H", ip, 2)[0]
        frag = struct.unpack_from("!H", ip, 6)[0]
        if frag & 0x3FFF or ip[9] != PROTO_ICMP or total < ihl + ICMP_HEADER or total > len(ip):
            return None
        icmp = ip[ihl:total]
        if icmp[0] != ICMP_ECHO_REQUEST or icmp[1] != 0 or checksum(icmp) != 0:
            return None
        ident, seq = struct.unpack_from("!HH", icmp, 4)
        return EchoRequest(
            src_mac,
            dst_mac,
            ipaddress.IPv4Address(ip[12:16]),
            ipaddress.IPv4Address(ip[16:20]),
            ident,
            seq,
            bytes(icmp[ICMP_HEADER:]),
        )
    if ethertype == ETH_P_IPV6:
        if len(ip) < IPV6_HEADER + ICMP_HEADER or ip[0] >> 4 != 6 or ip[6] != PROTO_ICMPV6:
            return None
        plen = struct.unpack_from("!H", ip, 4)[0]
        if plen < ICMP_HEADER or IPV6_HEADER + plen > len(ip):
            return None
        icmp = ip[IPV6_HEADER : IPV6_HEADER + plen]
        src, dst = bytes(ip[8:24]), bytes(ip[24:40])
        if icmp[0] != ICMPV6_ECHO_REQUEST or icmp[1] != 0 or _icmpv6_checksum(src, dst, icmp) != 0:
            return None
        ident, seq = struct.unpack_from("!HH", icmp, 4)
        return EchoRequest(
            src_mac,
            dst_mac,
            ipaddress.IPv6Address(src),
            ipaddress.IPv6Address(dst),
            ident,
            seq,
            bytes(icmp[ICMP_HEADER:]),
        )
    return None


def build_echo_reply(req: EchoRequest, payload: bytes | None = None) -> bytes:
    """The Ethernet frame answering ``req``: from the pinged address to the guest."""
    data = req.payload if payload is None else payload
    eth = req.src_mac + req.dst_mac
    if req.source.version == 4:
        icmp = struct.pack("!BBHHH", ICMP_ECHO_REPLY, 0, 0, req.ident, req.sequence) + data
        icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
        header = struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            IPV4_MIN_HEADER + len(icmp),
            0,
            0x4000,  # DF
            REPLY_TTL,
            PROTO_ICMP,
            0,
            req.destination.packed,
            req.source.packed,
        )
        header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
        return eth + struct.pack("!H", ETH_P_IP) + header + icmp
    icmp = struct.pack("!BBHHH", ICMPV6_ECHO_REPLY, 0, 0, req.ident, req.sequence) + data
    csum = _icmpv6_checksum(req.destination.packed, req.source.packed, icmp)
    icmp = icmp[:2] + struct.pack("!H", csum) + icmp[4:]
    header = struct.pack(
        "!IHBB16s16s",
        6 << 28,
        len(icmp),
        PROTO_ICMPV6,
        REPLY_TTL,
        req.destination.packed,
        req.source.packed,
    )
    return eth + struct.pack("!H", ETH_P_IPV6) + header + icmp


def parse_echo_reply_v4(packet: bytes) -> tuple[IPAddress, int, int, bytes] | None:
    """(source, ident, sequence, payload) of an IPv4 echo reply as a raw socket returns it."""
    if len(packet) < IPV4_MIN_HEADER + ICMP_HEADER:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if ihl < IPV4_MIN_HEADER or len(packet) < ihl + ICMP_HEADER or packet[ihl] != ICMP_ECHO_REPLY:
        return None
    ident, seq = struct.unpack_from("!HH", packet, ihl + 4)
    return ipaddress.IPv4Address(packet[12:16]), ident, seq, bytes(packet[ihl + ICMP_HEADER :])


def parse_echo_reply_v6(message: bytes, source: str) -> tuple[IPAddress, int, int, bytes] | None:
    """The same for an ICMPv6 raw socket (no IP header; the source comes from recvfrom)."""
    if len(message) < ICMP_HEADER or message[0] != ICMPV6_ECHO_REPLY:
        return None
    ident, seq = struct.unpack_from("!HH", message, 4)
    return ipaddress.IPv6Address(source.split("%")[0]), ident, seq, bytes(message[ICMP_HEADER:])


def _attach_filter(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    raw = b"".join(struct.pack("HBBI", *ins) for ins in program)
    buf = ctypes.create_string_buffer(raw)
    fprog = struct.pack("HL", len(program), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


@dataclass(slots=True)
class _Pending:
    request: EchoRequest
    target: IPAddress
    deadline: float


class IcmpRelay:
    """Echo relay for one sandbox's link; see the module docstring."""

    def __init__(self, gate: FlowGate, link: str, guests: list[IPAddress], *, ipv6: bool) -> None:
        self.gate = gate
        self.guests = frozenset(guests)
        self.link = link
        self.link_sockets: list[socket.socket] = []
        self.upstream: dict[int, socket.socket] = {}
        self.pending: dict[tuple[int, int, int], _Pending] = {}  # (version, ident, seq)
        self._next_ident = random.randrange(1 << 16)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper = Sweeper(1.0, self._sweep)
        self._audit_window = 0.0
        self._audit_count = 0
        try:
            self._open(ETH_P_IP, BPF_ECHO_V4)
            self.upstream[4] = self._raw(socket.AF_INET, socket.IPPROTO_ICMP)
            with contextlib.suppress(OSError):  # only echo replies wake us up
                self.upstream[4].setsockopt(
                    SOL_RAW, ICMP_FILTER, struct.pack("I", ~(1 << ICMP_ECHO_REPLY) & 0xFFFFFFFF)
                )
            if ipv6:
                self._open(ETH_P_IPV6, BPF_ECHO_V6)
                self.upstream[6] = self._raw(socket.AF_INET6, socket.IPPROTO_ICMPV6)
                blocked = [0xFFFFFFFF] * 8
                blocked[ICMPV6_ECHO_REPLY >> 5] &= ~(1 << (ICMPV6_ECHO_REPLY & 31)) & 0xFFFFFFFF
                with contextlib.suppress(OSError):
                    self.upstream[6].setsockopt(
                        socket.IPPROTO_ICMPV6, ICMP6_FILTER, struct.pack("8I", *blocked)
                    )
        except BaseException:
            self.close()
            raise

    def _open(self, ethertype: int, program: list[tuple[int, int, int, int]]) -> None:
        # Protocol 0 receives nothing until bound: attach the filter first, so no unfiltered
        # frame is ever queued.
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        self.link_sockets.append(sock)
        _attach_filter(sock, program)
        sock.bind((self.link, ethertype))
        sock.setblocking(False)

    def _raw(self, family: int, proto: int) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_RAW, proto)
        sock.setblocking(False)
        return sock

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for sock in self.link_sockets:
            self._loop.add_reader(sock.fileno(), self._from_guest, sock)
        for version, sock in self.upstream.items():
            self._loop.add_reader(sock.fileno(), self._from_upstream, version, sock)
        self._sweeper.start(self._loop)

    def close(self) -> None:
        self._sweeper.close()
        for sock in [*self.link_sockets, *self.upstream.values()]:
            if self._loop is not None and sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
        for sock in self.upstream.values():
            sock.close()
        # Closing a packet socket waits for an RCU grace period (packet_release calls
        # synchronize_net: 8-15 ms here); closed one after the other, the v4 and v6 sockets
        # cost two on every sandbox's remove. From two threads they share one.
        closers = [threading.Thread(target=sock.close, name="corral-icmp-close")
                   for sock in self.link_sockets[1:]]  # fmt: skip
        for thread in closers:
            thread.start()
        if self.link_sockets:
            self.link_sockets[0].close()
        for thread in closers:
            thread.join()
        self.pending.clear()

    def _from_guest(self, sock: socket.socket) -> None:
        for _ in range(64):
            try:
                frame, addr = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if len(addr) > 2 and addr[2] == PACKET_OUTGOING:
                continue
            req = parse_echo_request(frame)
            if req is not None:
                self._request(req)

    def _request(self, req: EchoRequest) -> None:
        protocol = "icmpv4" if req.source.version == 4 else "icmpv6"
        if req.source not in self.guests:
            return  # spoofed: the firewall drops it too; never relay it
        now = time.monotonic()
        audit = self._may_audit(now)
        verdict = self.gate.egress(protocol, str(req.source), req.destination, None, audit=audit)
        if not verdict.allowed or verdict.target is None or len(self.pending) >= MAX_PENDING:
            return
        sock = self.upstream.get(verdict.target.version)
        if sock is None:
            return
        ident = self._next_ident
        self._next_ident = (self._next_ident + 1) & 0xFFFF
        if verdict.target.version == 4:
            msg = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, req.sequence) + req.payload
            msg = msg[:2] + struct.pack("!H", checksum(msg)) + msg[4:]
        else:  # the kernel fills in ICMPv6 checksums of raw sockets
            msg = (
                struct.pack("!BBHHH", ICMPV6_ECHO_REQUEST, 0, 0, ident, req.sequence) + req.payload
            )
        self.pending[(verdict.target.version, ident, req.sequence)] = _Pending(
            req, verdict.target, now + ECHO_TIMEOUT
        )
        self._sweeper.arm()
        with contextlib.suppress(OSError):
            sock.sendto(msg, (str(verdict.target), 0))

    def _may_audit(self, now: float) -> bool:
        if now - self._audit_window >= 1.0:
            self._audit_window = now
            self._audit_count = 0
        self._audit_count += 1
        return self._audit_count <= AUDIT_PER_SECOND

    def _from_upstream(self, version: int, sock: socket.socket) -> None:
        for _ in range(64):
            try:
                data, addr = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            parsed = (
                parse_echo_reply_v4(data) if version == 4 else parse_echo_reply_v6(data, addr[0])
            )
            if parsed is None:
                continue
            source, ident, seq, payload = parsed
            entry = self.pending.get((version, ident, seq))
            if entry is None or entry.target != source:
                continue  # another sandbox's (or ping's) echo
            del self.pending[(version, ident, seq)]
            frame = build_echo_reply(entry.request, payload)
            with contextlib.suppress(OSError):
                self.link_sockets[0 if entry.request.source.version == 4 else 1].send(frame)

    def _sweep(self) -> float | None:
        now = time.monotonic()
        for key in [k for k, p in self.pending.items() if p.deadline <= now]:
            del self.pending[key]
        return self._sweeper.interval if self.pending else None
