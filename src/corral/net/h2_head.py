"""A sans-I/O reader of cleartext HTTP/2 with prior knowledge: the host of the first request.

RFC 9113 section 3.4: the client sends the 24-byte preface, a SETTINGS frame, perhaps a few
other connection frames (WINDOW_UPDATE, PING, PRIORITY, frames of unknown type), then the
first request's HEADERS frame and CONTINUATION frames up to END_HEADERS. The header block is
decoded with ``hpack`` and the host is ``:authority``, else ``host`` (section 8.3.1).

Bounds: frames over the default SETTINGS_MAX_FRAME_SIZE (16 KiB, which a client may not
exceed before the server raised it), a header block over :data:`MAX_HEADER_BLOCK` and a
decoded list over :data:`MAX_HEADER_LIST` are refused; these are the shapes of the
CONTINUATION flood (CVE-2024-27316, CVE-2023-45288) and of HPACK bombs.
"""

from __future__ import annotations

import hpack

from corral.net.revealed import Revealed, authority_from_wire

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

#: Longest compressed header block (HEADERS + CONTINUATION) read for the first request. The
#: first request of a connection carries no dynamic-table references, so its block is about
#: the size of an HTTP/1 head: the same 16 KiB (Node.js's limit; nginx's former
#: http2_max_header_size was 16 KiB).
MAX_HEADER_BLOCK = 16 * 1024
#: Longest decoded header list (RFC 7541 section 4.1 sizes: name + value + 32 per field).
#: A 16 KiB block can reference a 4 KiB table entry once per byte, inflating to 64 MiB
#: (an HPACK bomb); 64 KiB is hpack's own default and 4x the block bound.
MAX_HEADER_LIST = 64 * 1024
#: RFC 9113 section 4.2: SETTINGS_MAX_FRAME_SIZE starts at 2^14.
MAX_FRAME = 2**14
#: Bytes read before the first request's headers must be complete: the preface, a maximal
#: header block, and 1 KiB for the frame headers and the connection frames around it (a
#: real client sends one SETTINGS of a few dozen bytes and one WINDOW_UPDATE).
MAX_PREAMBLE = len(PREFACE) + MAX_HEADER_BLOCK + 1024

_DATA, _HEADERS, _PRIORITY, _RST, _SETTINGS, _PUSH, _PING, _GOAWAY, _WINDOW, _CONTINUATION = range(10)
_END_HEADERS = 0x4
_PADDED = 0x8
_PRIORITY_FLAG = 0x20
# Frames a client may send before its first request, besides unknown types (>= 10), which
# RFC 9113 section 4.1 tells receivers to ignore.
_CONNECTION_FRAMES = frozenset({_SETTINGS, _PING, _WINDOW, _PRIORITY})


def _fail(reason: str) -> Revealed:
    return Revealed("h2", None, False, reason=reason)


class H2HeadReader:
    """Feed the bytes after (and including) the preface; :meth:`result` is final once set."""

    __slots__ = ("_block", "_buf", "_first", "_pos", "_result", "_stream")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = len(PREFACE)  # next frame header
        self._block = bytearray()
        self._stream = 0  # stream of the HEADERS being continued, 0 while none
        self._first = True  # the next frame is the first after the preface
        self._result: Revealed | None = None

    def result(self) -> Revealed | None:
        return self._result

    def feed(self, data: bytes) -> None:
        if self._result is not None or not data:
            return
        self._buf += data[: max(MAX_PREAMBLE - len(self._buf), 0)]
        self._result = self._step()
        if self._result is None and len(self._buf) >= MAX_PREAMBLE:
            self._result = _fail(f"the HTTP/2 client sent {MAX_PREAMBLE} bytes without "
                                 "finishing its first request's headers")

    def finish(self) -> Revealed:
        if self._result is None:
            self._result = _fail("the HTTP/2 client stopped before its first request's headers")
        return self._result

    def _step(self) -> Revealed | None:
        buf = self._buf
        if buf[: len(PREFACE)] != PREFACE[: len(buf)]:
            return Revealed("unknown", None, True, reason="the bytes are not the HTTP/2 preface")
        while len(buf) - self._pos >= 9:
            p = self._pos
            length = int.from_bytes(buf[p : p + 3], "big")
            kind, flags = buf[p + 3], buf[p + 4]
            stream = int.from_bytes(buf[p + 5 : p + 9], "big") & 0x7FFFFFFF
            if length > MAX_FRAME:
                return _fail("an HTTP/2 frame is larger than 16 KiB before any SETTINGS ack")
            if self._first and (kind != _SETTINGS or flags & 1):
                return _fail("the HTTP/2 preface is not followed by a SETTINGS frame")
            if self._stream and (kind != _CONTINUATION or stream != self._stream):
                return _fail("the HTTP/2 header block is interrupted by another frame")
            if kind == _HEADERS:
                if stream == 0 or stream % 2 == 0:
                    return _fail("the first HTTP/2 HEADERS is not on a client stream")
            elif kind == _CONTINUATION:
                if not self._stream:
                    return _fail("an HTTP/2 CONTINUATION follows no HEADERS")
            elif kind not in _CONNECTION_FRAMES and kind <= _CONTINUATION:
                return _fail("an HTTP/2 frame other than a connection frame precedes the headers")
            if len(buf) - p - 9 < length:
                return None
            payload = bytes(buf[p + 9 : p + 9 + length])
            self._pos = p + 9 + length
            self._first = False
            if kind == _HEADERS:
                fragment = _headers_fragment(flags, payload)
                if fragment is None:
                    return _fail("the HTTP/2 HEADERS frame's padding or priority is malformed")
            elif kind == _CONTINUATION:
                fragment = payload
            else:
                continue
            self._block += fragment
            if len(self._block) > MAX_HEADER_BLOCK:
                return _fail(f"the HTTP/2 header block is over {MAX_HEADER_BLOCK} bytes")
            self._stream = stream
            if flags & _END_HEADERS:
                return _decide(bytes(self._block))
        return None


def _headers_fragment(flags: int, payload: bytes) -> bytes | None:
    """The header block fragment of a HEADERS payload, without padding and priority."""
    start, end = 0, len(payload)
    if flags & _PADDED:
        if not payload:
            return None
        start, end = 1, end - payload[0]
    if flags & _PRIORITY_FLAG:
        start += 5
    if start > end:
        return None
    return payload[start:end]


def _decide(block: bytes) -> Revealed:
    decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST)
    try:
        headers = decoder.decode(block, raw=True)
    except (hpack.HPACKError, ValueError, IndexError, UnicodeError) as exc:
        return _fail(f"the HTTP/2 header block does not decode ({type(exc).__name__})")
    authorities: list[bytes] = []
    hosts: list[bytes] = []
    method = b""
    for name, value in headers:
        assert isinstance(name, bytes) and isinstance(value, bytes)  # raw=True
        if name == b":authority":
            authorities.append(value)
        elif name == b"host":
            hosts.append(value)
        elif name == b":method":
            method = value
    if len(authorities) > 1 or len(hosts) > 1:
        return _fail("the first HTTP/2 request has more than one :authority or host")
    connect = method == b"CONNECT"
    given = authorities or hosts
    if not given:
        return Revealed("h2", None, False, connect=connect,
                        reason="the first HTTP/2 request has neither :authority nor host")
    host = authority_from_wire(given[0], port_required=connect)
    if not host.valid:
        return Revealed("h2", None, False, connect=connect, port=host.port,
                        raw_name=host.raw, reason=host.reason)
    if authorities and hosts and authority_from_wire(hosts[0]).name != host.name:
        return Revealed("h2", host.name, False, connect=connect, port=host.port,
                        reason="the HTTP/2 host header names another host than :authority")
    return Revealed("h2", host.name, True, connect=connect, port=host.port)
