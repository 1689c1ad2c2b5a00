"""The packets the kernel's prefilter rejected, read from an NFLOG group: their audit events.

A flow nftables rejects before the handshake (:mod:`corral.net.prefilter`) never reaches the
proxy, so the proxy cannot write its audit event (SPEC: every denied decision is an event).
Each reject rule first copies the packet's headers to the sandbox's NFLOG group with the
prefix ``corral <check index>``; the supervisor reads the group from a netlink socket
(``NETLINK_NETFILTER``, subsystem ``NFNL_SUBSYS_ULOG``) and asks the gate for the event.

:func:`parse` and :func:`packet_flow` are pure (property-tested: the bytes come from the
kernel but describe packets the guest crafted); :class:`NflogSocket` is the thin shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any

from corral.errors import NetworkError
from corral.net.prefilter import Prefilter, reason_of

NETLINK_NETFILTER = 12
_NFNL_SUBSYS_ULOG = 4
_NFULNL_MSG_PACKET = 0
_NFULNL_MSG_CONFIG = 1
_NFULA_CFG_CMD = 1
_NFULA_CFG_MODE = 2
_NFULA_CFG_QTHRESH = 5
_NFULNL_CFG_CMD_BIND = 1
_NFULNL_COPY_PACKET = 2
_NFULA_PAYLOAD = 9
_NFULA_PREFIX = 10
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 1
_NLM_F_ACK = 4
_NLA_TYPE_MASK = 0x3FFF

#: Bytes of each packet copied to us: an IPv6 header (40) and the L4 ports (4) fit; IPv4
#: with options (at most 60) too. Nothing of the payload is needed for the audit.
COPY_RANGE = 80

#: Receive buffer of the socket. A guest flooding SYNs to denied addresses fills it and the
#: kernel drops log messages (ENOBUFS on our side): the audit of a flood is then sampled,
#: the guest's packets are still rejected. 1 MiB holds several thousand messages.
RCVBUF = 1 << 20

#: First NFLOG group of corral's sandboxes; a sandbox uses base + its slot number (groups
#: are 16-bit and per network namespace). 0x6300: "c" in the high byte, like the fw marks.
GROUP_BASE = 0x6300

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("!BBH")
_NLATTR = struct.Struct("=HH")


#: Groups a sandbox tries, its own first (:func:`candidate_groups`).
GROUP_TRIES = 8

#: Distance between a sandbox's candidate groups: a prime larger than any realistic count of
#: live leases, so a fallback lands far from the groups of the other low slot numbers.
GROUP_STRIDE = 4099


def group_for(slot_number: int) -> int:
    return GROUP_BASE + slot_number % (0x10000 - GROUP_BASE)


def candidate_groups(slot_number: int) -> list[int]:
    """The NFLOG groups a sandbox tries to bind, in order: its slot's own, then others.

    A group is per network namespace, and lease numbers are unique only within one corral
    home and among live leases: another home's sandbox in the same namespace, or a removed
    sandbox whose process has not exited yet, can hold the slot's own group. Without a group
    there is no prefilter (the proxy then decides every flow: still enforced, but a refused
    connect becomes a reset after the handshake), so a busy group is not the end of it."""
    out: list[int] = []
    for k in range(GROUP_TRIES):
        group = group_for(slot_number + k * GROUP_STRIDE)
        if group not in out:
            out.append(group)
    return out


@dataclass(frozen=True, slots=True)
class LoggedPacket:
    prefix: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class PacketFlow:
    protocol: str  # "tcp" or "udp"
    source: ipaddress.IPv4Address | ipaddress.IPv6Address
    destination: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int


def _align(n: int) -> int:
    return (n + 3) & ~3


def parse(data: bytes) -> list[LoggedPacket]:
    """The NFLOG packet messages in one netlink datagram; anything malformed is skipped."""
    out: list[LoggedPacket] = []
    pos = 0
    while pos + _NLMSGHDR.size <= len(data):
        length, msg_type, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, pos)
        if length < _NLMSGHDR.size or pos + length > len(data):
            break
        if msg_type == (_NFNL_SUBSYS_ULOG << 8) | _NFULNL_MSG_PACKET:
            body = data[pos + _NLMSGHDR.size : pos + length]
            packet = _parse_packet(body)
            if packet is not None:
                out.append(packet)
        pos += _align(length)
    return out


def _parse_packet(body: bytes) -> LoggedPacket | None:
    if len(body) < _NFGENMSG.size:
        return None
    pos = _NFGENMSG.size
    prefix: str | None = None
    payload: bytes | None = None
    while pos + _NLATTR.size <= len(body):
        alen, atype = _NLATTR.unpack_from(body, pos)
        if alen < _NLATTR.size or pos + alen > len(body):
            return None
        value = body[pos + _NLATTR.size : pos + alen]
        atype &= _NLA_TYPE_MASK
        if atype == _NFULA_PREFIX:
            prefix = value.split(b"\0", 1)[0].decode("ascii", "replace")
        elif atype == _NFULA_PAYLOAD:
            payload = value
        pos += _align(alen)
    if prefix is None or payload is None:
        return None
    return LoggedPacket(prefix, payload)


def packet_flow(payload: bytes) -> PacketFlow | None:
    """Protocol, addresses and destination port of an IP packet's headers; None when they
    are not a TCP or UDP packet we can read (truncated, extension headers, fragments)."""
    if not payload:
        return None
    version = payload[0] >> 4
    if version == 4:
        if len(payload) < 20:
            return None
        ihl = (payload[0] & 0x0F) * 4
        proto = payload[9]
        if ihl < 20 or struct.unpack_from("!H", payload, 6)[0] & 0x1FFF:
            return None  # a non-first fragment carries no ports
        src: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(payload[12:16])
        dst: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(payload[16:20])
        l4 = ihl
    elif version == 6:
        if len(payload) < 40:
            return None
        proto = payload[6]
        src = ipaddress.IPv6Address(payload[8:24])
        dst = ipaddress.IPv6Address(payload[24:40])
        l4 = 40
    else:
        return None
    name = {6: "tcp", 17: "udp"}.get(proto)
    if name is None or len(payload) < l4 + 4:
        return None
    return PacketFlow(name, src, dst, struct.unpack_from("!H", payload, l4 + 2)[0])


def check_index(prefix: str) -> int | None:
    """The check index of a ``corral <index>`` prefix; None for anything else."""
    parts = prefix.split()
    if len(parts) != 2 or parts[0] != "corral" or not parts[1].isdigit():
        return None
    return int(parts[1])


def _config(group: int, attrs: bytes, seq: int) -> bytes:
    body = _NFGENMSG.pack(socket.AF_UNSPEC, 0, group) + attrs
    msg_type = (_NFNL_SUBSYS_ULOG << 8) | _NFULNL_MSG_CONFIG
    return (
        _NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, _NLM_F_REQUEST | _NLM_F_ACK, seq, 0)
        + body
    )


def _attr(atype: int, value: bytes) -> bytes:
    raw = _NLATTR.pack(_NLATTR.size + len(value), atype) + value
    return raw + b"\0" * (_align(len(raw)) - len(raw))


class NflogSocket:
    """A non-blocking netlink socket bound to one NFLOG group (in the caller's netns)."""

    def __init__(self, group: int) -> None:
        self.group = group
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            self.sock.bind((0, 0))
            self._request(_attr(_NFULA_CFG_CMD, bytes([_NFULNL_CFG_CMD_BIND])), 1, "bind")
            mode = struct.pack("!IBB", COPY_RANGE, _NFULNL_COPY_PACKET, 0)
            self._request(_attr(_NFULA_CFG_MODE, mode), 2, "copy mode")
            # The kernel batches 100 messages (or 1 s) by default: the audit must not lag.
            self._request(_attr(_NFULA_CFG_QTHRESH, struct.pack("!I", 1)), 3, "queue threshold")
        except BaseException:
            self.sock.close()
            raise
        self.sock.setblocking(False)

    def _request(self, attrs: bytes, seq: int, what: str) -> None:
        self.sock.send(_config(self.group, attrs, seq))
        self.sock.settimeout(2.0)
        reply = self.sock.recv(4096)
        length, msg_type, _f, _s, _p = _NLMSGHDR.unpack_from(reply, 0)
        if msg_type == _NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", reply, _NLMSGHDR.size)
            if err != 0:
                raise NetworkError(f"NFLOG group {self.group}: {what} failed: {os.strerror(-err)}")

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> list[LoggedPacket]:
        """Every message waiting; [] when none (or when the kernel dropped some: ENOBUFS)."""
        out: list[LoggedPacket] = []
        while True:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return out
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # messages were dropped: go on with the next
                    continue
                return out
            out += parse(data)

    def close(self) -> None:
        self.sock.close()


class RejectAudit:
    """Reads the sandbox's NFLOG group on the event loop and writes the audit event of
    every flow the prefilter rejected, as the gate decides it (so the event names the same
    rule and reason the proxy's would have)."""

    def __init__(self, gate: Any, prefilter: Prefilter, group: int) -> None:
        self.gate = gate
        self.prefilter = prefilter
        self.socket = NflogSocket(group)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.socket.fileno(), self._readable)

    def _readable(self) -> None:
        for packet in self.socket.read():
            self.handle(packet)

    def handle(self, packet: LoggedPacket) -> None:
        index = check_index(packet.prefix)
        flow = packet_flow(packet.payload)
        if index is None or flow is None:
            return
        verdict = self.gate.egress(
            flow.protocol, str(flow.source), flow.destination, flow.port, audit=False
        )
        if verdict.allowed:
            # The kernel rejected what the gate would allow: a prefilter bug. Say so.
            rule, reason = reason_of(self.prefilter, index)
            reason = f"rejected by the kernel prefilter ({reason}) although the gate allows it"
            verdict = type(verdict)(False, None, rule, reason)
        self.gate.record_egress(
            flow.protocol, str(flow.source), str(flow.destination), flow.port, verdict
        )

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self.socket.fileno())
        self.socket.close()
