"""Upstream answers, reduced to a neutral form the resolver decides on (sans-I/O, fuzzed).

An upstream's message is read by hand for A, AAAA and CNAME questions (:data:`FAST_TYPES`)
and by dnspython for every other type. Both give
an :class:`UpstreamAnswer`: each RRset by (owner, type), owners and CNAME targets as
lower-case uncompressed wire names, record data ready to be written into another message
(no compression pointers). Why by hand: dnspython spends 0.3 ms or more parsing one answer
and building the reply here, most of an uncached query's added latency.

Compression pointers are followed only backwards and a name is at most 255 bytes, so no
pointer loop can make a read run forever.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype

from corral.net.dns import wire

TYPE_A = wire.TYPE_A
TYPE_AAAA = wire.TYPE_AAAA
TYPE_CNAME = wire.TYPE_CNAME
TYPE_SOA = wire.TYPE_SOA

#: Query types read by hand: addresses and aliases, the traffic pins depend on and nearly
#: all a sandbox asks. Every other type's answer goes through dnspython, which knows each
#: type's layout: it decompresses names inside record data (MX, NS, SRV..., RFC 3597 4) and
#: rejects malformed data (a TXT string longer than its record) that would otherwise be
#: passed on to the guest verbatim.
FAST_TYPES = frozenset({TYPE_A, TYPE_AAAA, TYPE_CNAME})

_HEADER = struct.Struct("!6H")
_RR_FIXED = struct.Struct("!HHIH")
_QR = 0x8000
_OPCODE_MASK = 0x7800


class Mismatch(Exception):
    """An answer to another question: ignored (spoofed, or a late answer confused)."""


class NeedsDnspython(Exception):
    """A well-formed header and question whose records the hand reader does not take."""


@dataclass(slots=True)
class RRset:
    owner: bytes  # lower-case uncompressed wire name
    rtype: int
    ttl: int
    rdatas: list[bytes] = field(default_factory=list)  # no compression pointers inside


@dataclass(slots=True)
class UpstreamAnswer:
    flags: int
    rcode: int  # extended rcodes included
    answer: dict[tuple[bytes, int], RRset]
    soas: list[tuple[RRset, int]]  # authority SOAs with their MINIMUM field

    @property
    def truncated(self) -> bool:
        return bool(self.flags & 0x0200)


def read_name(data: bytes, pos: int) -> tuple[bytes, int]:
    """The lower-case uncompressed name at ``pos`` and the position after it (after the first
    pointer, if any). ValueError for anything malformed: a pointer that does not point
    backwards, a name over 255 bytes, an extended label type, a read past the end."""
    parts: list[bytes] = []
    size = 1
    after = -1
    end = len(data)
    while True:
        if pos >= end:
            raise ValueError("name runs past the message")
        length = data[pos]
        if length == 0:
            pos += 1
            break
        if length & 0xC0 == 0xC0:
            if pos + 1 >= end:
                raise ValueError("pointer runs past the message")
            target = ((length & 0x3F) << 8) | data[pos + 1]
            if target >= pos:
                raise ValueError("a compression pointer that does not point backwards")
            if after < 0:
                after = pos + 2
            pos = target
            continue
        if length & 0xC0:
            raise ValueError("extended label type")
        if pos + 1 + length > end:
            raise ValueError("label runs past the message")
        parts.append(data[pos : pos + 1 + length])
        size += 1 + length
        if size > wire.MAX_NAME_WIRE:
            raise ValueError("name longer than 255 bytes")
        pos += 1 + length
    return b"".join(parts).translate(wire.LOWER) + b"\0", (after if after >= 0 else pos)


def labels_of(name: bytes) -> list[bytes]:
    """The labels of an uncompressed wire name, root excluded."""
    out = []
    pos = 0
    while name[pos]:
        out.append(name[pos + 1 : pos + 1 + name[pos]])
        pos += 1 + name[pos]
    return out


def is_subdomain(name: bytes, parent: bytes) -> bool:
    """Whether wire name ``name`` is ``parent`` or below it (both lower-case, uncompressed)."""
    if not name.endswith(parent):
        return False
    cut = len(name) - len(parent)
    if cut == 0 or parent == b"\0":
        return True
    pos = 0  # the cut must fall on a label boundary of ``name``
    while pos < cut:
        pos += 1 + name[pos]
    return pos == cut


def _add(
    answer: dict[tuple[bytes, int], RRset], owner: bytes, rtype: int, ttl: int, rdata: bytes
) -> None:
    rrset = answer.get((owner, rtype))
    if rrset is None:
        answer[(owner, rtype)] = RRset(owner, rtype, ttl, [rdata])
        return
    rrset.ttl = min(rrset.ttl, ttl)  # an RRset has one TTL (RFC 2181 5.2): the lowest
    if rdata not in rrset.rdatas:
        rrset.rdatas.append(rdata)


def parse_upstream(data: bytes, key_name: bytes, qtype: int, max_answer: int) -> UpstreamAnswer:
    """Read an upstream message for question (``key_name``, ``qtype``, IN). :class:`Mismatch`:
    not an answer to it; :class:`NeedsDnspython`: use :func:`from_dnspython`; ValueError:
    unreadable. At most ``max_answer`` answer and :data:`wire.MAX_UPSTREAM_SECTION`
    authority/additional records are read; the rest is never looked at."""
    _id, flags, qd, an, ns, ar = _HEADER.unpack_from(data)
    if not flags & _QR or flags & _OPCODE_MASK or qd != 1:
        # Our ID from the resolver's own address and port (the socket is connected): the
        # resolver itself is broken, not a spoofer. The next one is tried.
        raise ValueError("not an answer to a standard query with one question")
    name, pos = read_name(data, 12)
    if pos + 4 > len(data):
        raise ValueError("question runs past the message")
    rtype, rclass = struct.unpack_from("!HH", data, pos)
    if name != key_name or rtype != qtype or rclass != wire.CLASS_IN:
        raise Mismatch("another question")
    pos += 4
    if flags & 0x0200:
        return UpstreamAnswer(flags, flags & 0xF, {}, [])  # truncated: nothing else is used
    if qtype not in FAST_TYPES:
        raise NeedsDnspython(f"records of type {qtype}")
    answer: dict[tuple[bytes, int], RRset] = {}
    soas: list[tuple[RRset, int]] = []
    rcode = flags & 0xF
    end = len(data)
    for section, count in enumerate(
        (
            min(an, max_answer),
            min(ns, wire.MAX_UPSTREAM_SECTION),
            min(ar, wire.MAX_UPSTREAM_SECTION),
        )
    ):
        for _ in range(count):
            owner, pos = read_name(data, pos)
            if pos + 10 > end:
                raise ValueError("record runs past the message")
            rtype, rclass, ttl, rdlen = _RR_FIXED.unpack_from(data, pos)
            start = pos + 10
            pos = start + rdlen
            if pos > end:
                raise ValueError("record data runs past the message")
            if section == 2:
                if rtype == wire.TYPE_OPT:
                    rcode |= (ttl >> 24) << 4  # the extended rcode's upper bits
                continue
            if rclass != wire.CLASS_IN:
                continue
            ttl &= 0x7FFFFFFF  # RFC 2181 8: a TTL with the top bit set is zero; near enough
            if rtype == TYPE_CNAME:
                target, after = read_name(data, start)
                if after != pos:
                    raise ValueError("CNAME data is not one name")
                rdata = target
            elif rtype == TYPE_SOA:
                mname, after = read_name(data, start)
                rname, after = read_name(data, after)
                if after + 20 != pos:
                    raise ValueError("SOA data has the wrong length")
                rdata = mname + rname + data[after:pos]
            elif (rtype == TYPE_A and rdlen != 4) or (rtype == TYPE_AAAA and rdlen != 16):
                raise ValueError("an address record of the wrong length")
            else:
                rdata = data[start:pos]  # never written out: not on a chain of these types
            if section == 0:
                _add(answer, owner, rtype, ttl, rdata)
            elif rtype == TYPE_SOA:
                soas.append(
                    (
                        RRset(owner, rtype, ttl, [rdata]),
                        struct.unpack_from("!I", rdata, len(rdata) - 4)[0],
                    )
                )
        if section == 0 and an > max_answer:
            break  # the answer was cut: what follows is not read (wire.trim_message's rule)
    return UpstreamAnswer(flags, rcode, answer, soas)


def _wire_name(name: dns.name.Name) -> bytes:
    wire_name = name.canonicalize().to_wire()
    assert wire_name is not None  # to_wire without a file returns the bytes
    return wire_name


def from_dnspython(msg: dns.message.Message) -> UpstreamAnswer:
    """The same neutral form from a message dnspython parsed (every record type)."""
    answer: dict[tuple[bytes, int], RRset] = {}
    for rrset in msg.answer:
        if rrset.rdclass != dns.rdataclass.IN:
            continue
        owner = _wire_name(rrset.name)
        for rd in rrset:
            if rrset.rdtype == dns.rdatatype.CNAME:
                rdata = _wire_name(rd.target)
            else:
                rdata = rd.to_digestable()  # uncompressed, names in canonical (lower) case
            _add(answer, owner, int(rrset.rdtype), rrset.ttl, rdata)
    soas = [
        (
            RRset(_wire_name(r.name), TYPE_SOA, r.ttl, [rd.to_digestable()]),
            int(rd.minimum),
        )
        for r in msg.authority
        if r.rdtype == dns.rdatatype.SOA and r.rdclass == dns.rdataclass.IN
        for rd in list(r)[:1]
    ]
    return UpstreamAnswer(int(msg.flags), int(msg.rcode()), answer, soas)
