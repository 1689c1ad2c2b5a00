"""rtnetlink in-process: the few link, address, route and rule requests a sandbox's link needs.

Each ``ip`` invocation is a process start, a PATH search and a fresh netlink socket (~2-3 ms
here; a networked create ran 18 of them). The requests themselves take microseconds, so this
module builds them directly: :mod:`struct` packing of the kernel's own messages
(linux/rtnetlink.h, linux/if_link.h, linux/fib_rules.h), sent several at a time on one
``NETLINK_ROUTE`` socket, each acknowledged. pyroute2 (pinned, and measured: see
docs/design.md) does the same with a general-purpose message layer that costs more per request
than the requests and ~120 ms to import.

The message builders and dump parsers are pure (unit-tested byte for byte against what
iproute2 sends); :class:`RouteSocket` is the thin I/O shell. A socket talks to the network
namespace it was opened in, for its whole life, whichever thread uses it later.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: A network as integers: (IP version, first address, last address). What the dumps read on
#: every create hand out instead of ``ipaddress`` objects (~1 us each instead of ~10, and a
#: running sandbox adds ~10 routes, 2 rules and 3 addresses to every dump).
Span = tuple[int, int, int]

# -- constants of the kernel ABI (linux/netlink.h, rtnetlink.h, if_link.h, fib_rules.h) -----
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400

RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_NEWADDR = 20
RTM_GETADDR = 22
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_GETROUTE = 26
RTM_NEWRULE = 32
RTM_DELRULE = 33
RTM_GETRULE = 34

IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_LINKINFO = 18
IFLA_NET_NS_FD = 28
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
VETH_INFO_PEER = 1
IFF_UP = 0x1

IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_F_NODAD = 0x02

RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_TABLE = 15
RTN_UNICAST = 1
RTN_LOCAL = 2
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_HOST = 254
RTPROT_BOOT = 3
RT_TABLE_UNSPEC = 0
RT_TABLE_MAIN = 254

FRA_IIFNAME = 3
FRA_PRIORITY = 6
FRA_FWMARK = 10
FRA_TABLE = 15
FRA_FWMASK = 16
FR_ACT_TO_TBL = 1

#: ifindex of ``lo``: the loopback device is the first one every network namespace gets.
LOOPBACK_INDEX = 1

#: Bytes read per recv: a dump arrives in messages of up to one page each, several per read.
RECV_SIZE = 1 << 16

#: Seconds to wait for the kernel's answer (microseconds normally; only bounds a kernel bug).
TIMEOUT = 10.0


# -- pure: building requests ---------------------------------------------------------------
def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes (the length field excludes the padding)."""
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _strz(text: str) -> bytes:
    return text.encode() + b"\0"


def _family(address: IPAddress) -> int:
    return socket.AF_INET if address.version == 4 else socket.AF_INET6


def message(kind: int, flags: int, body: bytes, seq: int = 0) -> bytes:
    """One netlink message; the kernel fills in nothing, so the port id is 0."""
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def _ifinfo(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, flags, change)


def new_veth(host: str, peer: str, mtu: int, peer_netns_fd: int, peer_index: int) -> bytes:
    """``ip link add HOST mtu M type veth peer name PEER mtu M netns FD`` (the peer with a
    fixed ifindex, so its address and routes need no lookup)."""
    peer_info = (
        _ifinfo(peer_index)
        + attr(IFLA_IFNAME, _strz(peer))
        + attr(IFLA_MTU, struct.pack("=I", mtu))
        + attr(IFLA_NET_NS_FD, struct.pack("=I", peer_netns_fd))
    )
    linkinfo = attr(IFLA_INFO_KIND, b"veth") + attr(IFLA_INFO_DATA, attr(VETH_INFO_PEER, peer_info))
    body = (
        _ifinfo()
        + attr(IFLA_IFNAME, _strz(host))
        + attr(IFLA_MTU, struct.pack("=I", mtu))
        + attr(IFLA_LINKINFO, linkinfo)
    )
    return message(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body)


def set_up(index: int) -> bytes:
    """``ip link set DEV up``."""
    return message(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, _ifinfo(index, IFF_UP, IFF_UP))


def delete_link(name: str) -> bytes:
    """``ip link del NAME`` (a veth takes its peer with it)."""
    return message(
        RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, _ifinfo() + attr(IFLA_IFNAME, _strz(name))
    )


def new_address(index: int, address: IPAddress, prefixlen: int, *, nodad: bool = False) -> bytes:
    """``ip addr add ADDRESS/PREFIXLEN dev INDEX [nodad]``."""
    flags = IFA_F_NODAD if nodad else 0
    body = struct.pack("=BBBBI", _family(address), prefixlen, flags, RT_SCOPE_UNIVERSE, index)
    body += attr(IFA_LOCAL, address.packed) + attr(IFA_ADDRESS, address.packed)
    return message(RTM_NEWADDR, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body)


def _rtmsg(family: int, table: int, scope: int, kind: int) -> bytes:
    small = table if table < 256 else RT_TABLE_UNSPEC
    return struct.pack("=BBBBBBBBI", family, 0, 0, 0, small, RTPROT_BOOT, scope, kind, 0)


def local_default_route(version: int, table: int, *, delete: bool = False) -> bytes:
    """``ip [-6] route add local default dev lo table TABLE`` (the TPROXY delivery route)."""
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    body = _rtmsg(family, table, RT_SCOPE_HOST, RTN_LOCAL)
    body += attr(RTA_TABLE, struct.pack("=I", table)) + attr(
        RTA_OIF, struct.pack("=i", LOOPBACK_INDEX)
    )
    if delete:
        return message(RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK, body)
    return message(RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body)


def default_route_via(gateway: IPAddress, oif: int) -> bytes:
    """``ip route add default via GATEWAY dev OIF`` (main table)."""
    body = _rtmsg(_family(gateway), RT_TABLE_MAIN, RT_SCOPE_UNIVERSE, RTN_UNICAST)
    body += attr(RTA_GATEWAY, gateway.packed) + attr(RTA_OIF, struct.pack("=i", oif))
    return message(RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body)


def rule(
    version: int, iif: str, mark: int, mask: int, table: int, priority: int, *, delete: bool = False
) -> bytes:
    """``ip [-6] rule add|del iif IIF fwmark MARK/MASK lookup TABLE priority PRIORITY``."""
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    small = table if table < 256 else RT_TABLE_UNSPEC
    body = struct.pack("=BBBBBBBBI", family, 0, 0, 0, small, 0, 0, FR_ACT_TO_TBL, 0)
    body += (
        attr(FRA_IIFNAME, _strz(iif))
        + attr(FRA_FWMARK, struct.pack("=I", mark))
        + attr(FRA_FWMASK, struct.pack("=I", mask))
        + attr(FRA_TABLE, struct.pack("=I", table))
        + attr(FRA_PRIORITY, struct.pack("=I", priority))
    )
    if delete:
        return message(RTM_DELRULE, NLM_F_REQUEST | NLM_F_ACK, body)
    return message(RTM_NEWRULE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE, body)


def dump_request(kind: int, family: int) -> bytes:
    """A dump of every rule/address/route of ``family`` (AF_UNSPEC: all)."""
    if kind == RTM_GETADDR:
        body = struct.pack("=BBBBI", family, 0, 0, 0, 0)
    else:  # rtmsg and fib_rule_hdr have the same size and family offset
        body = struct.pack("=BBBBBBBBI", family, 0, 0, 0, 0, 0, 0, 0, 0)
    return message(kind, NLM_F_REQUEST | NLM_F_DUMP, body)


# -- pure: reading answers -----------------------------------------------------------------
def messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, seq, body) of each netlink message in ``data``."""
    offset = 0
    while offset + 16 <= len(data):
        length, kind, flags, seq, _pid = struct.unpack_from("=IHHII", data, offset)
        if length < 16 or offset + length > len(data):
            return  # truncated: nothing sensible follows
        yield kind, flags, seq, data[offset + 16 : offset + length]
        offset += (length + 3) & ~3


def attributes(data: bytes, offset: int) -> dict[int, bytes]:
    """Top-level attributes from ``offset`` on (type -> payload; nested flag stripped)."""
    out: dict[int, bytes] = {}
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        out[kind & 0x3FFF] = data[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return out


def find_attribute(data: bytes, offset: int, wanted: int) -> bytes | None:
    """The payload of the first top-level attribute of type ``wanted`` (None if absent):
    :func:`attributes` without the dict, for dumps read for one field."""
    unpack = struct.unpack_from
    while offset + 4 <= len(data):
        length, kind = unpack("=HH", data, offset)
        if length < 4:
            break
        if kind & 0x3FFF == wanted:
            return data[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return None


def _u32(value: bytes | None, default: int = 0) -> int:
    return default if value is None or len(value) < 4 else int(struct.unpack_from("=I", value)[0])


@dataclass(frozen=True, slots=True)
class RuleEntry:
    """One policy routing rule, as much of it as corral compares."""

    family: int
    iif: str | None
    table: int
    priority: int
    mark: int
    mask: int


def parse_rule(body: bytes) -> RuleEntry:
    family, _dst, _src, _tos, table = struct.unpack_from("=BBBBB", body)
    attrs = attributes(body, 12)
    iif = attrs.get(FRA_IIFNAME)
    return RuleEntry(
        family=family,
        iif=None if iif is None else iif.rstrip(b"\0").decode(errors="replace"),
        table=_u32(attrs.get(FRA_TABLE), table),
        priority=_u32(attrs.get(FRA_PRIORITY)),
        mark=_u32(attrs.get(FRA_FWMARK)),
        mask=_u32(attrs.get(FRA_FWMASK), 0xFFFFFFFF),
    )


def parse_address(body: bytes) -> IPAddress | None:
    family = body[0]
    attrs = attributes(body, 8)
    raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
    if raw is None:
        return None
    if family == socket.AF_INET and len(raw) == 4:
        return ipaddress.IPv4Address(raw)
    if family == socket.AF_INET6 and len(raw) == 16:
        return ipaddress.IPv6Address(raw)
    return None


def span_of(family: int, raw: bytes, prefixlen: int) -> Span | None:
    """The span of the ``prefixlen`` network around the address ``raw`` of ``family``; None
    for another family, a wrong length or a prefix longer than the address."""
    if family == socket.AF_INET and len(raw) == 4:
        version, bits = 4, 32
    elif family == socket.AF_INET6 and len(raw) == 16:
        version, bits = 6, 128
    else:
        return None
    if not 0 <= prefixlen <= bits:
        return None
    host = (1 << (bits - prefixlen)) - 1
    first = int.from_bytes(raw, "big") & ~host
    return version, first, first | host


def network_span(text: str) -> Span:
    """The span of a network written ``address/prefixlen`` (or a bare address); ValueError
    when it is not one. For the lease file, read whole on every create."""
    address, slash, length = text.partition("/")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        raw = socket.inet_pton(family, address)
    except OSError:
        raise ValueError(f"{text!r} is not a network") from None
    if slash and not length.isdigit():
        raise ValueError(f"{text!r} is not a network")
    span = span_of(family, raw, int(length) if slash else len(raw) * 8)
    if span is None:
        raise ValueError(f"{text!r} is not a network")
    return span


def parse_route_destination(
    body: bytes,
) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """The destination of a route; None for a default route (no RTA_DST)."""
    family, dst_len = body[0], body[1]
    raw = find_attribute(body, 12, RTA_DST)
    if raw is None:
        return None
    if family == socket.AF_INET and len(raw) == 4:
        return ipaddress.IPv4Network((raw, dst_len), strict=False)
    if family == socket.AF_INET6 and len(raw) == 16:
        return ipaddress.IPv6Network((raw, dst_len), strict=False)
    return None


# -- I/O ------------------------------------------------------------------------------------
class NetlinkError(OSError):
    """The kernel refused request number ``index`` of a batch (errno set)."""

    def __init__(self, err: int, index: int) -> None:
        super().__init__(err, os.strerror(err))
        self.index = index


class RouteSocket:
    """A ``NETLINK_ROUTE`` socket of the network namespace it was opened in."""

    def __init__(self) -> None:
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
        )
        self._sock.settimeout(TIMEOUT)
        self._sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> RouteSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _numbered(self, requests: Iterable[bytes]) -> tuple[bytes, list[int]]:
        out: list[bytes] = []
        seqs: list[int] = []
        for request in requests:
            self._seq += 1
            seqs.append(self._seq)
            out.append(request[:8] + struct.pack("=I", self._seq) + request[12:])
        return b"".join(out), seqs

    def results(self, requests: Iterable[bytes]) -> list[int]:
        """Send every request in one write (the kernel handles them in order) and return each
        one's errno (0: done). Requests do not depend on each other's success: a failed one
        does not stop the next."""
        data, seqs = self._numbered(requests)
        if not seqs:
            return []
        self._sock.sendall(data)
        errors: dict[int, int] = {}
        while len(errors) < len(seqs):
            for kind, _flags, seq, body in messages(self._sock.recv(RECV_SIZE)):
                if kind == NLMSG_ERROR and seqs[0] <= seq <= seqs[-1] and len(body) >= 4:
                    errors[seq] = -int(struct.unpack_from("=i", body)[0])
        return [errors[s] for s in seqs]

    def run(self, requests: Iterable[bytes], *, ok: frozenset[int] = frozenset()) -> None:
        """Like :meth:`results`, raising :class:`NetlinkError` for the first errno not in ``ok``."""
        for index, err in enumerate(self.results(requests)):
            if err and err not in ok:
                raise NetlinkError(err, index)

    def dump(self, request: bytes) -> list[tuple[int, bytes]]:
        """(type, body) of every message of a dump."""
        data, (seq,) = self._numbered([request])
        self._sock.sendall(data)
        out: list[tuple[int, bytes]] = []
        while True:
            for kind, _flags, got, body in messages(self._sock.recv(RECV_SIZE)):
                if got != seq:
                    continue
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    err = -int(struct.unpack_from("=i", body)[0]) if len(body) >= 4 else errno.EIO
                    if err:
                        raise NetlinkError(err, 0)
                    return out
                out.append((kind, body))

    # -- the dumps corral reads -------------------------------------------------------------
    def rules(self) -> list[RuleEntry]:
        return [parse_rule(b) for k, b in self.dump(dump_request(RTM_GETRULE, socket.AF_UNSPEC))
                if k == RTM_NEWRULE]  # fmt: skip

    def rule_tables(self) -> list[tuple[str, int]]:
        """(input interface, table) of every rule that has an input interface: the two fields
        the create path reads, without :func:`parse_rule`'s whole entry per rule."""
        out: list[tuple[str, int]] = []
        for kind, body in self.dump(dump_request(RTM_GETRULE, socket.AF_UNSPEC)):
            if kind != RTM_NEWRULE or len(body) < 12:
                continue
            iif = find_attribute(body, 12, FRA_IIFNAME)
            if iif is None:
                continue
            name = iif.rstrip(b"\0").decode(errors="replace")
            if name:
                out.append((name, _u32(find_attribute(body, 12, FRA_TABLE), body[4])))
        return out

    def addresses(self, skip: Iterable[Span] = ()) -> list[IPAddress]:
        """Every address of the namespace but those inside a span of ``skip`` (left out before
        an ``ipaddress`` object is made for them)."""
        skipped = list(skip)
        out: list[IPAddress] = []
        for kind, body in self.dump(dump_request(RTM_GETADDR, socket.AF_UNSPEC)):
            if kind != RTM_NEWADDR or len(body) < 8:
                continue
            raw = find_attribute(body, 8, IFA_LOCAL) or find_attribute(body, 8, IFA_ADDRESS)
            if raw is None:
                continue
            span = span_of(body[0], raw, len(raw) * 8)
            if span is None:
                continue
            version, value, _ = span
            if any(v == version and lo <= value <= hi for v, lo, hi in skipped):
                continue
            out.append(ipaddress.ip_address(raw))
        return out

    def route_spans(self) -> set[Span]:
        """Destinations of every route of every table (default routes left out), each once.

        Read on every networked create, where each running sandbox adds ~10 routes (its
        /30 and /64, local and broadcast entries, its divert table's defaults): only the
        header and RTA_DST are read, defaults are skipped before any attribute, and no
        ``ipaddress`` object is made (with 100 sandboxes running, ~1,000 routes)."""
        seen: set[Span] = set()
        for kind, body in self.dump(dump_request(RTM_GETROUTE, socket.AF_UNSPEC)):
            if kind != RTM_NEWROUTE or len(body) < 12 or body[1] == 0:
                continue  # dst_len 0: a default route (no RTA_DST)
            raw = find_attribute(body, 12, RTA_DST)
            span = None if raw is None else span_of(body[0], raw, body[1])
            if span is not None:
                seen.add(span)
        return seen

