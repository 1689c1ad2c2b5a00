"""A sans-I/O reader of the TLS ClientHello: the name, ALPN and versions a client offers.

Bytes go in with :meth:`ClientHelloReader.feed` as they arrive; :meth:`result` is ``None``
while more are needed, then one final answer: a :class:`ClientHello`, or a
:class:`HelloRejected` saying why the bytes are not one (``not-tls``, ``malformed``,
``too-large``). Malformed input never raises: every length is checked against what
contains it, so a hostile guest can only ever get a rejection.

The hello is reassembled across TLS records (RFC 8446 section 5.1 lets a handshake message
span several; splitting it into many small records is a known trick to slip a name past
middleboxes that read one record only) and across feeds. The answer depends on the bytes
alone, never on how they were split into feeds.

An SSLv2-compatible hello (RFC 5246 appendix E.2; still sent by a few old clients) is
recognised as TLS but carries no extensions, hence no name.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal

#: Longest ClientHello handshake message accepted, header included. Real ones: about 250
#: bytes (curl, no extensions to speak of) to 700 (browsers), about 1.8 KiB with a
#: post-quantum key share (X25519MLKEM768: 1216 bytes of key share alone), some 2-8 KiB
#: with several PQ shares or large session tickets. One TLS record carries at most 16 KiB of
#: plaintext (RFC 8446 section 5.1), so 16 KiB keeps every real hello in one record of
#: headroom, while bounding what a guest can make corral buffer before any decision (Go's
#: crypto/tls accepts handshake messages up to 64 KiB, OpenSSL a ClientHello up to 128 KiB;
#: corral has no reason to hold that much for a sandbox).
MAX_CLIENT_HELLO = 16 * 1024
#: Most TLS records the hello may be split into. Libraries send it in one record (two when
#: it exceeds 16 KiB); DPI-evasion tools split it into two or a handful. Each record costs 5
#: bytes of header, so this bound also fixes the wire size of a maximal hello.
MAX_HELLO_RECORDS = 64
#: Wire bytes of the largest hello this reader accepts: the message plus its record headers.
MAX_HELLO_WIRE = MAX_CLIENT_HELLO + 5 * MAX_HELLO_RECORDS
#: RFC 8446 section 5.1: a record's plaintext is at most 2^14 bytes.
MAX_RECORD = 2**14

_HANDSHAKE = 0x16
_CLIENT_HELLO = 1
_SNI = 0
_ALPN = 16
_SUPPORTED_VERSIONS = 43
_ECH = 0xFE0D
_HOST_NAME = 0


def is_grease(value: int) -> bool:
    """RFC 8701: 0x0A0A, 0x1A1A, ... 0xFAFA are reserved values clients send to keep servers honest."""
    return value & 0x0F0F == 0x0A0A and value >> 8 == value & 0xFF


@dataclass(frozen=True, slots=True)
class ClientHello:
    """A parsed ClientHello. ``sni`` is the raw host_name (judge it with
    :func:`corral.net.revealed.host_from_wire`); ``None`` when the client sent no SNI.
    ``versions`` are supported_versions without GREASE; ``alpn`` is decoded as latin-1 so it
    round-trips byte for byte; ``extensions`` are the extension types in the client's order.
    """

    legacy_version: int
    sni: bytes | None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = ()
    ech: bool = False
    cipher_suites: tuple[int, ...] = ()
    extensions: tuple[int, ...] = ()
    sslv2: bool = False
    size: int = 0  # the handshake message's length in bytes, header included


@dataclass(frozen=True, slots=True)
class HelloRejected:
    """The bytes are not a ClientHello corral accepts; ``reason`` is one sentence."""

    kind: Literal["not-tls", "malformed", "too-large"]
    reason: str


HelloResult = ClientHello | HelloRejected


class _Malformed(Exception):
    pass


class _Cursor:
    """Reads length-prefixed fields of a byte string, raising _Malformed on any overrun."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def take(self, n: int, what: str) -> bytes:
        if self.end - self.pos < n:
            raise _Malformed(f"the ClientHello's {what} runs past its end")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "big")

    def vector(self, length_bytes: int, what: str) -> _Cursor:
        n = int.from_bytes(self.take(length_bytes, f"{what} length"), "big")
        if self.end - self.pos < n:
            raise _Malformed(f"the ClientHello's {what} length runs past its end")
        sub = _Cursor(self.data, self.pos, self.pos + n)
        self.pos += n
        return sub

    def done(self) -> bool:
        return self.pos >= self.end


def parse_client_hello_body(body: bytes) -> ClientHello:
    """Parse a complete ClientHello body (after the 4-byte handshake header)."""
    c = _Cursor(body)
    legacy_version = c.u16("legacy_version")
    c.take(32, "random")
    session_id = c.vector(1, "legacy_session_id")
    if session_id.end - session_id.pos > 32:
        raise _Malformed("the ClientHello's session id is longer than 32 bytes")
    suites = c.vector(2, "cipher_suites")
    n_suites = suites.end - suites.pos
    if n_suites < 2 or n_suites % 2:
        raise _Malformed("the ClientHello's cipher_suites length is empty or odd")
    cipher_suites = struct.unpack_from(f">{n_suites // 2}H", body, suites.pos)
    compression = c.vector(1, "compression_methods")
    if compression.done():
        raise _Malformed("the ClientHello offers no compression method")
    sni: bytes | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = ()
    types: list[int] = []
    if not c.done():  # extensions may be absent altogether (TLS 1.2 and older)
        exts = c.vector(2, "extensions")
        if not c.done():
            raise _Malformed("the ClientHello has bytes after its extensions")
        seen: set[int] = set()
        while not exts.done():
            ext_type = exts.u16("extension type")
            data = exts.vector(2, "extension")
            if ext_type in seen:
                raise _Malformed(f"the ClientHello repeats extension {ext_type}")
            seen.add(ext_type)
            types.append(ext_type)
            if ext_type == _SNI:
                sni = _server_name(data)
            elif ext_type == _ALPN:
                alpn = _alpn(data)
            elif ext_type == _SUPPORTED_VERSIONS:
                versions = _versions(data)
    return ClientHello(
        legacy_version=legacy_version,
        sni=sni,
        alpn=alpn,
        versions=versions,
        ech=_ECH in types,
        cipher_suites=cipher_suites,
        extensions=tuple(types),
        size=len(body) + 4,
    )


def _server_name(ext: _Cursor) -> bytes | None:
    """RFC 6066 section 3: a list holding at most one host_name; other name types skipped."""
    names = ext.vector(2, "server_name list")
    if not ext.done():
        raise _Malformed("the server_name extension has bytes after its list")
    if names.done():
        raise _Malformed("the server_name list is empty")
    found: bytes | None = None
    while not names.done():
        name_type = names.u8("server_name type")
        name = names.vector(2, "server_name")
        if name_type != _HOST_NAME:
            continue
        if found is not None:
            raise _Malformed("the server_name list holds two host names")
        found = name.take(name.end - name.pos, "server_name")
        if not found:
            raise _Malformed("the server_name is empty")
    return found


def _alpn(ext: _Cursor) -> tuple[str, ...]:
    """RFC 7301 section 3.1: a non-empty list of non-empty protocol names."""
    protocols = ext.vector(2, "ALPN list")
    if not ext.done():
        raise _Malformed("the ALPN extension has bytes after its list")
    if protocols.done():
        raise _Malformed("the ALPN list is empty")
    out = []
    while not protocols.done():
        proto = protocols.vector(1, "ALPN protocol")
        if proto.done():
            raise _Malformed("the ALPN list holds an empty protocol name")
        out.append(proto.take(proto.end - proto.pos, "ALPN protocol").decode("latin-1"))
    return tuple(out)


def _versions(ext: _Cursor) -> tuple[int, ...]:
    """RFC 8446 section 4.2.1: a list of 2-byte versions, 2 to 254 bytes long."""
    listed = ext.vector(1, "supported_versions list")
    if not ext.done():
        raise _Malformed("the supported_versions extension has bytes after its list")
    n = listed.end - listed.pos
    if n < 2 or n % 2:
        raise _Malformed("the supported_versions list is empty or odd")
    values = struct.unpack_from(f">{n // 2}H", listed.data, listed.pos)
    return tuple(v for v in values if not is_grease(v))


class ClientHelloReader:
    """Feed bytes as they arrive; :meth:`result` is ``None`` until the answer is final.

    Records are consumed whole (at most :data:`MAX_RECORD` bytes each), so the decision is
    taken at the same byte whatever the split of the input into feeds.
    """

    __slots__ = ("_buf", "_hello", "_pos", "_records", "_result")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # wire bytes consumed (whole records)
        self._hello = bytearray()  # handshake bytes gathered from the records so far
        self._records = 0
        self._result: HelloResult | None = None

    def result(self) -> HelloResult | None:
        return self._result

    def feed(self, data: bytes) -> None:
        if self._result is not None or not data:
            return
        room = MAX_HELLO_WIRE - len(self._buf)  # never hold more than can matter
        self._buf += data[: max(room, 0)]
        self._result = self._step()

    def finish(self) -> HelloResult:
        """The answer at end of input (EOF, timeout, or the caller's byte bound)."""
        if self._result is None:
            if not self._buf:
                self._result = HelloRejected("not-tls", "the client sent nothing")
            else:
                self._result = HelloRejected(
                    "malformed", "the client stopped before its ClientHello was complete"
                )
        return self._result

    def _step(self) -> HelloResult | None:
        buf = self._buf
        if self._pos == 0 and buf and buf[0] & 0x80:
            return _sslv2(bytes(buf[:5]))
        while True:
            head = buf[self._pos : self._pos + 5]
            if head and head[0] != _HANDSHAKE:
                if self._pos == 0:
                    return HelloRejected("not-tls", "the first byte is not a TLS handshake record")
                return HelloRejected("malformed", "a non-handshake record interrupts the ClientHello")
            if len(head) >= 2 and head[1] != 3:
                if self._pos == 0:
                    return HelloRejected("not-tls", "the record version is not 3.x")
                return HelloRejected("malformed", "a record of the ClientHello has a version other than 3.x")
            if len(head) < 5:
                return None
            length = int.from_bytes(head[3:5], "big")
            if length == 0 or length > MAX_RECORD:
                return HelloRejected("malformed", "a TLS record length is 0 or over 16 KiB")
            if self._records >= MAX_HELLO_RECORDS:
                return HelloRejected(
                    "too-large", f"the ClientHello spans more than {MAX_HELLO_RECORDS} records"
                )
            end = self._pos + 5 + length
            if end > MAX_HELLO_WIRE:  # decided by the header alone, so split-independent
                return HelloRejected(
                    "too-large", f"the ClientHello's records run past {MAX_HELLO_WIRE} bytes"
                )
            if len(buf) < end:
                return None
            self._hello += buf[self._pos + 5 : end]
            self._pos = end
            self._records += 1
            done = self._handshake()
            if done is not None:
                return done

    def _handshake(self) -> HelloResult | None:
        hs = self._hello
        if hs[0] != _CLIENT_HELLO:
            return HelloRejected("malformed", "the first handshake message is not a ClientHello")
        if len(hs) < 4:
            return None
        size = 4 + int.from_bytes(hs[1:4], "big")
        if size > MAX_CLIENT_HELLO:
            return HelloRejected(
                "too-large", f"the ClientHello is {size} bytes, over {MAX_CLIENT_HELLO}"
            )
        if len(hs) < size:
            return None
        try:
            return parse_client_hello_body(bytes(hs[4:size]))
        except _Malformed as exc:
            return HelloRejected("malformed", str(exc))


def _sslv2(head: bytes) -> HelloResult | None:
    """SSLv2 record header (2 bytes, high bit set), then CLIENT-HELLO (1) and a version."""
    if len(head) >= 3 and head[2] != 1:
        return HelloRejected("not-tls", "the first bytes are neither TLS nor an SSLv2 hello")
    if len(head) >= 4 and head[3] not in (0, 3):
        return HelloRejected("not-tls", "the SSLv2 hello's version is neither 2 nor 3.x")
    if len(head) < 5:
        return None
    version = int.from_bytes(head[3:5], "big")
    if version != 0x0002 and head[3] != 3:
        return HelloRejected("not-tls", "the SSLv2 hello's version is neither 2 nor 3.x")
    if head[3] == 0 and head[4] != 2:
        return HelloRejected("not-tls", "the SSLv2 hello's version is neither 2 nor 3.x")
    return ClientHello(legacy_version=version, sni=None, sslv2=True)
