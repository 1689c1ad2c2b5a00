"""DNS wire format on the guest's side: the query parser, the TCP framer and the responses.

Everything here takes bytes a sandbox sent (untrusted, fuzzed: ``tests/unit/test_dns_fuzz.py``)
or builds bytes corral sends back. Sans-I/O. Guest queries are parsed by hand rather than with
dnspython because (a) the reply to a malformed query depends on *how far* it parsed (FORMERR
needs a header, silence otherwise), and (b) a cached answer is served in a few microseconds:
dnspython's ``from_wire`` alone costs more than the whole cached path's budget.

A response is rendered from a :class:`Template`: the wire form of one answer with ID 0, the
question name in canonical lower case and no OPT record, plus where its TTLs sit. Serving it
to a query patches the ID, the RD bit, the question name (the guest's own spelling of it: same
length, so every compression pointer stays valid), the TTLs (minus the time spent in the
cache) and appends an OPT record when the query had one. If the result is larger than the
guest can take over UDP, it gets the header and question with TC set instead (RFC 1035 4.2.1,
RFC 6891 7), and retries over TCP.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

# -- numbers of the protocol -----------------------------------------------------------------

NOERROR = 0
FORMERR = 1
SERVFAIL = 2
NXDOMAIN = 3
NOTIMP = 4
#: Extended RCODE 16 (RFC 6891 6.1.3): "the EDNS version of the query is not supported".
BADVERS = 16

CLASS_IN = 1
TYPE_A = 1
TYPE_CNAME = 5
TYPE_SOA = 6
TYPE_AAAA = 28
TYPE_OPT = 41

#: Query types that are not questions a stub resolver asks: zone transfers (IXFR 251, AXFR
#: 252), obsolete MAILB/MAILA (253, 254), and the transaction pseudo-types TKEY/TSIG (249,
#: 250). Answered NOTIMP: a sandbox gets names resolved, not zones copied.
REFUSED_QTYPES = frozenset({249, 250, 251, 252, 253, 254})

_QR = 0x8000
_TC = 0x0200
_RD = 0x0100
_RA = 0x0080
_OPCODE_MASK = 0x7800

#: Largest query accepted. A query is a header, a name of at most 255 bytes and an OPT record;
#: cookies (RFC 7873, 40 bytes) and padding (RFC 8467 pads queries to a multiple of 128) stay
#: far below 1 KiB. 4096 leaves room for any sane client; larger is an attack or a bug.
MAX_QUERY_SIZE = 4096

#: Largest name on the wire (RFC 1035 2.3.4) and largest label (RFC 1035 2.3.1).
MAX_NAME_WIRE = 255
MAX_LABEL = 63

#: The UDP payload size corral advertises and the most it sends to a guest over UDP, whatever
#: larger size the guest advertises. DNS Flag Day 2020 settled on 1232 bytes (no IP
#: fragmentation on any path); BIND and Unbound default to it since. Larger answers go TC and
#: the guest retries over TCP; it also bounds how much a spoofed-source storm could reflect.
UDP_PAYLOAD = 1232

#: What a query without EDNS can receive over UDP (RFC 1035 4.2.1).
CLASSIC_UDP_SIZE = 512

#: Largest message over TCP (the two-byte length prefix, RFC 1035 4.2.2).
MAX_TCP_MESSAGE = 65535

_HEADER = struct.Struct("!6H")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength
OPT_RR = b"\x00" + _RR_FIXED.pack(TYPE_OPT, UDP_PAYLOAD, 0, 0)
_POINTER_TO_QNAME = b"\xc0\x0c"

#: Bytes kept as they are in a name's text form; everything else is written ``\DDD``. A label
#: holding a dot therefore never reads as two labels, so the text's suffixes are exactly the
#: name's ancestors in the DNS tree: a suffix or deny rule cannot be dodged by spelling.
_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_*")
_PLAIN_BYTES_AND_DOT = bytes(sorted(_PLAIN)) + b"."
LOWER = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")


class Unanswerable(Exception):
    """Bytes that get no reply at all: shorter than a header, or a response (QR set) rather
    than a query (answering responses would let two resolvers loop)."""


class QueryError(Exception):
    """A query with a readable header that is answered with ``rcode`` and no records."""

    def __init__(self, header: bytes, rcode: int, reason: str, edns: bool = False) -> None:
        super().__init__(reason)
        self.header = header
        self.rcode = rcode
        self.reason = reason
        self.edns = edns

    def response(self) -> bytes:
        return error_response(self.header, self.rcode, edns=self.edns)


@dataclass(frozen=True, slots=True)
class Query:
    """One parsed guest query (question only; what else it carried is never used)."""

    id: int
    flags: int
    qname_wire: bytes  # as the guest spelled it (case kept), root label included
    key_name: bytes  # the same in lower case: the cache key
    name: str  # text, lower case, no trailing dot ("" for the root); see _PLAIN
    qtype: int
    qclass: int
    edns: bool
    udp_size: int  # what the guest can receive over UDP (before corral's own cap)

    @property
    def question(self) -> bytes:
        return self.qname_wire + struct.pack("!HH", self.qtype, self.qclass)


def name_text(labels: Sequence[bytes]) -> str:
    """The text form of a name's labels (root excluded): lower case, see _PLAIN."""
    wire_name = b".".join(labels).translate(LOWER)
    if (
        not wire_name.translate(None, _PLAIN_BYTES_AND_DOT)
        and wire_name.count(b".") == len(labels) - 1  # no label holds a dot itself
    ):
        return wire_name.decode("ascii")  # the common case, at C speed
    return ".".join(
        "".join(chr(b) if b in _PLAIN else f"\\{b:03d}" for b in label.translate(LOWER))
        for label in labels
    )


def _skip_name(data: bytes, pos: int) -> int:
    """Position after a (possibly compressed) name; pointers are not followed (only skipped)."""
    end = len(data)
    while True:
        if pos >= end:
            raise ValueError("name runs past the message")
        length = data[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            if pos + 2 > end:
                raise ValueError("pointer runs past the message")
            return pos + 2
        if length & 0xC0:
            raise ValueError("extended label type")
        pos += 1 + length


def parse_query(data: bytes) -> Query:
    """Parse a guest query. :class:`Unanswerable`: no reply; :class:`QueryError`: the reply's
    RCODE (FORMERR, NOTIMP, BADVERS); otherwise the question and the guest's EDNS size."""
    if len(data) < 12:
        raise Unanswerable("shorter than a DNS header")
    header = data[:12]
    _id, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack(header)
    if flags & _QR:
        raise Unanswerable("a response, not a query")
    if len(data) > MAX_QUERY_SIZE:
        raise QueryError(header, FORMERR, f"query larger than {MAX_QUERY_SIZE} bytes")
    if flags & _OPCODE_MASK:
        raise QueryError(header, NOTIMP, "only standard queries (opcode 0) are answered")
    if qdcount != 1:
        raise QueryError(header, FORMERR, f"{qdcount} questions (exactly one is answered)")
    pos = 12
    end = len(data)
    labels: list[bytes] = []
    while True:
        if pos >= end:
            raise QueryError(header, FORMERR, "question name runs past the message")
        length = data[pos]
        if length == 0:
            pos += 1
            break
        if length > MAX_LABEL:  # compression pointers and extended label types included
            raise QueryError(header, FORMERR, "question name has a pointer or a label over 63")
        if pos + 1 + length > end:
            raise QueryError(header, FORMERR, "question label runs past the message")
        labels.append(data[pos + 1 : pos + 1 + length])
        pos += 1 + length
        if pos - 12 + 1 > MAX_NAME_WIRE:
            raise QueryError(header, FORMERR, "question name longer than 255 bytes")
    qname_wire = data[12:pos]
    if pos + 4 > end:
        raise QueryError(header, FORMERR, "question type and class missing")
    qtype, qclass = struct.unpack_from("!HH", data, pos)
    pos += 4
    edns = False
    udp_size = CLASSIC_UDP_SIZE
    version = 0
    try:
        for _ in range(ancount + nscount):
            pos = _skip_name(data, pos)
            if pos + 10 > end:
                raise ValueError("record runs past the message")
            rdlen = struct.unpack_from("!H", data, pos + 8)[0]
            pos += 10 + rdlen
            if pos > end:
                raise ValueError("record data runs past the message")
        for _ in range(arcount):
            start = pos
            pos = _skip_name(data, pos)
            if pos + 10 > end:
                raise ValueError("record runs past the message")
            rtype, rclass, ttl, rdlen = _RR_FIXED.unpack_from(data, pos)
            pos += 10 + rdlen
            if pos > end:
                raise ValueError("record data runs past the message")
            if rtype == TYPE_OPT:
                if edns:
                    raise ValueError("two OPT records")
                if pos - rdlen - 10 - start != 1:
                    raise ValueError("OPT record not owned by the root")
                edns = True
                udp_size = max(CLASSIC_UDP_SIZE, rclass)
                version = (ttl >> 16) & 0xFF
    except ValueError as exc:
        raise QueryError(header, FORMERR, str(exc), edns=edns) from None
    if version != 0:
        raise QueryError(header, BADVERS, f"EDNS version {version}", edns=True)
    if qtype == TYPE_OPT:
        raise QueryError(header, FORMERR, "OPT is not a query type", edns=edns)
    if qclass != CLASS_IN:
        raise QueryError(header, NOTIMP, f"class {qclass} (only IN is answered)", edns=edns)
    if qtype in REFUSED_QTYPES:
        raise QueryError(header, NOTIMP, f"query type {qtype} is not answered", edns=edns)
    return Query(
        id=_id,
        flags=flags,
        qname_wire=qname_wire,
        key_name=qname_wire.translate(LOWER),
        name=name_text(labels),
        qtype=qtype,
        qclass=qclass,
        edns=edns,
        udp_size=udp_size,
    )


# -- responses ----------------------------------------------------------------------------------


def _response_flags(query_flags: int, rcode: int) -> int:
    """QR, the query's opcode and RD, RA (corral recurses), the low four bits of the RCODE.
    AA, AD and CD are never set: corral is not authoritative and does not validate."""
    return _QR | (query_flags & (_OPCODE_MASK | _RD)) | _RA | (rcode & 0xF)


def _opt(rcode: int) -> bytes:
    if rcode <= 0xF:
        return OPT_RR
    return b"\x00" + _RR_FIXED.pack(TYPE_OPT, UDP_PAYLOAD, (rcode >> 4) << 24, 0)


def error_response(header: bytes, rcode: int, *, edns: bool = False) -> bytes:
    """The reply to a query whose question could not be used: header only (no question)."""
    _id, flags = struct.unpack_from("!HH", header)
    out = _HEADER.pack(_id, _response_flags(flags, rcode), 0, 0, 0, 1 if edns else 0)
    return out + _opt(rcode) if edns else out


def question_response(query: Query, rcode: int) -> bytes:
    """The reply with the question and no records (refusals, failures, empty answers)."""
    ar = 1 if query.edns else 0
    out = _HEADER.pack(query.id, _response_flags(query.flags, rcode), 1, 0, 0, ar) + query.question
    return out + _opt(rcode) if query.edns else out


@dataclass(frozen=True, slots=True)
class Template:
    """One answer in wire form, ready to be served to any query for the same question."""

    wire: bytes  # ID 0, RD clear, canonical question, no OPT
    ttl_offsets: tuple[int, ...]
    ttls: tuple[int, ...]
    created: float
    rcode: int


def build_template(
    key_name: bytes,
    qtype: int,
    rcode: int,
    answer: Sequence[tuple[bytes, int, int, bytes]],
    authority: Sequence[tuple[bytes, int, int, bytes]] = (),
    *,
    created: float,
) -> Template:
    """A template from records (owner, type, ttl, data) with uncompressed names: an owner
    equal to the question's name is written as a pointer to it, everything else in full.
    ValueError when the message would exceed 65535 bytes."""
    parts = [
        _HEADER.pack(0, _QR | _RA | (rcode & 0xF), 1, len(answer), len(authority), 0),
        key_name,
        struct.pack("!HH", qtype, CLASS_IN),
    ]
    pos = 12 + len(key_name) + 4
    offsets: list[int] = []
    ttls: list[int] = []
    for owner, rtype, ttl, rdata in (*answer, *authority):
        head = _POINTER_TO_QNAME if owner == key_name else owner
        parts.append(head + _RR_FIXED.pack(rtype, CLASS_IN, ttl, len(rdata)) + rdata)
        offsets.append(pos + len(head) + 4)
        ttls.append(ttl)
        pos += len(head) + 10 + len(rdata)
    if pos > MAX_TCP_MESSAGE:
        raise ValueError(f"the answer would take {pos} bytes (at most {MAX_TCP_MESSAGE})")
    return Template(b"".join(parts), tuple(offsets), tuple(ttls), created, rcode & 0xF)


def synthetic_template(
    key_name: bytes,
    qtype: int,
    rcode: int,
    records: Sequence[tuple[int, int, bytes]],
    created: float,
) -> Template:
    """A template corral makes itself: ``records`` are (type, ttl, rdata) owned by the
    question's name (host names, refusals, empty answers)."""
    return build_template(
        key_name, qtype, rcode, [(key_name, t, ttl, d) for t, ttl, d in records], created=created
    )


def render(template: Template, query: Query, now: float, limit: int | None) -> tuple[bytes, bool]:
    """``template`` served to ``query``: (wire, truncated). ``limit``: the most the guest
    can receive (UDP), None over TCP."""
    out = bytearray(template.wire)
    struct.pack_into(
        "!HH", out, 0, query.id, struct.unpack_from("!H", out, 2)[0] | (query.flags & _RD)
    )
    qlen = len(query.qname_wire)
    out[12 : 12 + qlen] = query.qname_wire
    if template.ttls:
        elapsed = int(now - template.created)
        if elapsed > 0:
            for off, ttl in zip(template.ttl_offsets, template.ttls, strict=True):
                struct.pack_into("!I", out, off, ttl - elapsed if ttl > elapsed else 0)
    if query.edns:
        out += _opt(template.rcode)
        struct.pack_into("!H", out, 10, struct.unpack_from("!H", out, 10)[0] + 1)
    if limit is not None and len(out) > limit:
        flags = struct.unpack_from("!H", out, 2)[0] | _TC
        ar = 1 if query.edns else 0
        head = _HEADER.pack(query.id, flags, 1, 0, 0, ar) + query.question
        return (head + _opt(template.rcode) if query.edns else head), True
    return bytes(out), False


def udp_limit(query: Query) -> int:
    """The largest UDP reply ``query`` gets: its advertised size, capped at UDP_PAYLOAD."""
    return min(query.udp_size, UDP_PAYLOAD)


def response_rcode(message: bytes) -> int:
    return int(struct.unpack_from("!H", message, 2)[0]) & 0xF


#: Authority and additional records of an upstream message that are parsed at most, each.
#: A negative answer needs one SOA; a referral-style authority section carries a few NS
#: records; the additional section carries the OPT record and glue. Eight each.
MAX_UPSTREAM_SECTION = 8


def record_count(data: bytes, max_answer: int) -> int:
    """How many records of an upstream message are read at most (what :func:`trim_message`
    keeps): the work the upstream budget is charged for."""
    if len(data) < 12:
        return 0
    _id, _flags, _qd, an, ns, ar = _HEADER.unpack_from(data)
    if an > max_answer:
        return max_answer
    return int(an + min(ns, MAX_UPSTREAM_SECTION) + min(ar, MAX_UPSTREAM_SECTION))


def trim_message(data: bytes, max_answer: int) -> tuple[bytes, int]:
    """An upstream message cut after its first ``max_answer`` answer records and
    :data:`MAX_UPSTREAM_SECTION` authority and additional records (all later sections go
    with the first cut), and the number of records it still holds.

    Why: dnspython parses a record in tens of microseconds, so an answer of thousands of
    records (a hostile zone, or a TTL-0 name queried in a loop) would cost the loop the
    sandbox's data path shares tens of milliseconds each time. Only the tail is cut, so every
    compression pointer (they point backwards) stays valid, and at most the kept records are
    walked. Bytes that do not walk cleanly are returned unchanged, for dnspython to reject."""
    try:
        _id, _flags, qd, an, ns, ar = _HEADER.unpack_from(data)
        if an <= max_answer and ns <= MAX_UPSTREAM_SECTION and ar <= MAX_UPSTREAM_SECTION:
            return data, an + ns + ar
        pos = 12
        for _ in range(qd):
            pos = _skip_name(data, pos) + 4
        counts = [an, ns, ar]
        for section, limit in enumerate((max_answer, MAX_UPSTREAM_SECTION, MAX_UPSTREAM_SECTION)):
            keep = min(counts[section], limit)
            for _ in range(keep):
                pos = _skip_name(data, pos)
                pos += 10 + struct.unpack_from("!H", data, pos + 8)[0]
            if pos > len(data):
                return data, an + ns + ar
            if counts[section] > limit:
                counts[section] = limit
                for later in range(section + 1, 3):
                    counts[later] = 0
                break
    except (ValueError, struct.error):
        return data, 0
    return data[:6] + struct.pack("!3H", *counts) + data[12:pos], sum(counts)


# -- TCP framing ---------------------------------------------------------------------------------


class FramingError(Exception):
    """A TCP stream that cannot carry DNS messages (zero or oversized length)."""


class StreamFramer:
    """Splits a TCP byte stream into length-prefixed DNS messages (RFC 1035 4.2.2, RFC 7766).

    The buffer never holds more than one message plus its prefix: a length over ``max_size``
    is an error at once, before its bytes arrive.
    """

    __slots__ = ("_buf", "max_size")

    def __init__(self, max_size: int = MAX_QUERY_SIZE) -> None:
        self._buf = bytearray()
        self.max_size = max_size

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        buf = self._buf
        while len(buf) >= 2:
            length = (buf[0] << 8) | buf[1]
            if length == 0 or length > self.max_size:
                raise FramingError(f"a message of {length} bytes (1-{self.max_size} accepted)")
            if len(buf) < 2 + length:
                break
            out.append(bytes(buf[2 : 2 + length]))
            del buf[: 2 + length]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)


def frame(message: bytes) -> bytes:
    return struct.pack("!H", len(message)) + message
