"""HTTP/1 on one intercepted connection: secrets put in, placeholders stopped, echoes masked.

A sans-I/O object in h11's shape: the interceptor hands it the bytes each side sent and writes
out what each :class:`Step` says; it never touches a socket. Requests are parsed strictly,
rewritten (secret substitution per :mod:`corral.net.secrets`), checked for placeholders in
every encoding the detector knows, and re-serialised, so the upstream sees what corral parsed
and nothing else. Responses are parsed for framing and echo masking.

Why not h11 (docs/design.md): h11 is the reference for the shape, but as a security filter it
hides what must be refused. It unfolds obs-fold lines silently, merges duplicate identical
Content-Length headers (``Content-Length: 5`` twice, or ``5, 5``) into one, lets
Transfer-Encoding win over Content-Length when both are present, accepts bare LF line ends,
and reorders Host first on output. A rewriting proxy must refuse each of those (the classic
request-smuggling shapes: two parsers disagreeing about where a message ends), so this module
has its own small, strict parser. Being our own it also streams bodies as slices of the bytes
received (no copy into a parser buffer when a read holds whole body data).

Framing rules for requests (RFC 9112, strict): CRLF line ends only; no whitespace before a
field's colon; no obs-fold; at most one Content-Length, a plain decimal; Transfer-Encoding
only "chunked", once, never with Content-Length, never on HTTP/1.0; chunk sizes are 1-16 hex
digits with optional extensions (dropped when re-chunking); exactly one Host on HTTP/1.1.

Secrets (SPEC "Secrets and violations"): headers and Basic auth always considered; the query
when ``inject_query``; the body when ``inject_body`` (buffered up to
:data:`~corral.net.secrets.MAX_SUBSTITUTED_BODY_BYTES`, Content-Length recomputed, chunked
bodies re-chunked as one chunk). Bodies that need no substitution stream through: each piece
is scanned (C-speed searches) and forwarded as a slice. A request that still carries a
placeholder after substitution is never forwarded complete: the head is checked before it is
sent, each body piece before it is sent, the end of the body (and the trailers) before the
final piece is sent. Requests that carry a substituted value get ``Accept-Encoding: identity``
so an echo of the value comes back uncompressed and can be masked.

After ``101 Switching Protocols`` (WebSocket) or a 2xx to CONNECT the connection is a byte
stream: guest-to-upstream bytes are scanned (WebSocket frames unmasked first, so the
payload is what is scanned) and a placeholder closes the connection; WebSocket frames from an
allowed host are echo-masked frame by frame (frames up to :data:`MAX_WS_MASKED_FRAME`). With a
secret table, the guest's ``Sec-WebSocket-Extensions`` offer is removed, so no
permessage-deflate is negotiated and payloads stay scannable. Other tunnels are scanned toward
upstream only and not masked toward the guest.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from corral.config.enums import ViolationAction
from corral.net.secrets import (
    MAX_SUBSTITUTED_BODY_BYTES,
    Channel,
    EchoMasker,
    PlaceholderDetector,
    PlaceholderPassed,
    RequestScope,
    SecretTable,
    Violation,
    decode_basic,
    most_severe,
    normalize_host,
)

__all__ = [
    "MAX_CHUNK_LINE_BYTES",
    "MAX_HEADER_FIELDS",
    "MAX_HEAD_BYTES",
    "MAX_HELD_BYTES",
    "MAX_PIPELINED",
    "MAX_WS_MASKED_FRAME",
    "Http1Rewriter",
    "HttpError",
    "RequestHead",
    "ResponseHead",
    "Step",
    "deny_response",
    "find_head_end",
    "parse_request_head",
    "parse_response_head",
]

#: Longest request or response head (start line + fields). Precedents: h11 16 KiB, Node.js
#: 16 KiB (80 KiB before v13), nginx 4 x 8 KiB buffers, Tomcat 8 KiB, IIS 16 KiB; AWS ALB and
#: Cloudflare allow up to 64 KiB in total. Agents' requests carry large cookies and JWTs, and
#: corral must not be the reason a request fails that the server would take, so 64 KiB: the
#: upstream's own lower limit still applies behind it.
MAX_HEAD_BYTES = 64 * 1024

#: Most fields in one head. Apache's LimitRequestFields is 100, Go's net/http has no count but
#: a 1 MiB total; 256 leaves headroom over any real client while bounding per-request work.
MAX_HEADER_FIELDS = 256

#: Longest chunk-size line (size + extensions). Node.js limits chunk extensions to 16 KiB since
#: CVE-2024-22019 (unbounded extensions as a DoS); real clients send none. 4 KiB is ample.
MAX_CHUNK_LINE_BYTES = 4096

#: Guest bytes held while corral waits to learn whether an Upgrade or CONNECT was accepted
#: (they are either the next request or the first tunnel bytes). Clients wait for the 101
#: before sending; a guest that sends more than a head's worth is refused.
MAX_HELD_BYTES = MAX_HEAD_BYTES

#: Requests forwarded but not yet answered (pipelining). Browsers do not pipeline; curl and
#: Python clients do not either. 32 bounds the response-matching queue against a guest that
#: floods requests at a server that never answers.
MAX_PIPELINED = 32

#: Largest WebSocket frame from an allowed host that is buffered to mask an echoed value (its
#: length field must be rewritten, so it needs the whole payload). Chat and API frames are far
#: smaller; a bigger frame streams through unmasked (docs/network.md).
MAX_WS_MASKED_FRAME = 1 << 20

_TOKEN_RE = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_TARGET_RE = re.compile(rb"^[\x21-\x7e]+$")
_VALUE_BAD_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_CHUNK_SIZE_RE = re.compile(rb"^([0-9A-Fa-f]{1,16})[ \t]*(;[\x09\x20-\x7e\x80-\xff]*)?$")
_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")
_ABSOLUTE_RE = re.compile(rb"^[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)([/?#].*)?$")


class HttpError(Exception):
    """A message corral refuses to pass on; ``status`` is what the guest is told (4xx/5xx)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


Fields = list[tuple[bytes, bytes]]


def _get(fields: Fields, name: bytes) -> list[bytes]:
    return [v for n, v in fields if n.lower() == name]


def _serialize_fields(fields: Fields) -> bytes:
    return b"".join(n + b": " + v + b"\r\n" for n, v in fields)


@dataclass
class RequestHead:
    method: bytes
    target: bytes
    version: bytes
    fields: Fields

    def get(self, name: bytes) -> list[bytes]:
        return _get(self.fields, name)

    def serialize(self) -> bytes:
        return (
            self.method + b" " + self.target + b" " + self.version + b"\r\n"
            + _serialize_fields(self.fields) + b"\r\n"
        )  # fmt: skip


@dataclass
class ResponseHead:
    version: bytes
    status: int
    reason: bytes
    fields: Fields

    def get(self, name: bytes) -> list[bytes]:
        return _get(self.fields, name)

    def serialize(self) -> bytes:
        line = self.version + b" " + str(self.status).encode() + b" " + self.reason
        return line + b"\r\n" + _serialize_fields(self.fields) + b"\r\n"


def find_head_end(data: bytes, start: int = 0) -> int:
    """Offset just past the blank line ending a head in ``data[start:]``, or -1 if not yet.

    Raises HttpError 431 when no end is in sight within :data:`MAX_HEAD_BYTES`.
    """
    end = data.find(b"\r\n\r\n", start, start + MAX_HEAD_BYTES + 4)
    if end == -1:
        if len(data) - start > MAX_HEAD_BYTES:
            raise HttpError(431, f"the head is longer than {MAX_HEAD_BYTES} bytes")
        return -1
    return end + 4


def _parse_fields(lines: Sequence[bytes], what: str) -> Fields:
    if len(lines) > MAX_HEADER_FIELDS:
        raise HttpError(431, f"more than {MAX_HEADER_FIELDS} {what} fields")
    out: Fields = []
    for line in lines:
        if not line:
            raise HttpError(400, f"an empty {what} line")
        if line[0] in b" \t":
            raise HttpError(400, f"obs-fold (a {what} line starting with whitespace) is refused")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN_RE.match(name):
            raise HttpError(400, f"{what} field name {name[:40]!r} is not a token")
        value = value.strip(b" \t")
        if _VALUE_BAD_RE.search(value):
            raise HttpError(400, f"{what} field {name.decode()!r} has a control character")
        out.append((name, value))
    return out


def _lines(block: bytes) -> list[bytes]:
    """``block`` (a head without its final CRLFCRLF) split on CRLF; a bare CR or LF refused."""
    lines = block.split(b"\r\n")
    for line in lines:
        if b"\n" in line or b"\r" in line:
            raise HttpError(400, "a bare CR or LF inside the head (lines end with CRLF)")
    return lines


def parse_request_head(block: bytes) -> RequestHead:
    """A request head (``block`` without the final CRLFCRLF), strictly."""
    lines = _lines(block)
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "the request line is not METHOD SP TARGET SP VERSION")
    method, target, version = parts
    if not _TOKEN_RE.match(method):
        raise HttpError(400, f"method {method[:20]!r} is not a token")
    if not _TARGET_RE.match(target):
        raise HttpError(400, "the request target has a space, control or non-ASCII byte")
    if version not in _VERSIONS:
        raise HttpError(505, f"version {version[:20]!r} is not HTTP/1.1 or HTTP/1.0")
    return RequestHead(method, target, version, _parse_fields(lines[1:], "header"))


def parse_response_head(block: bytes) -> ResponseHead:
    lines = _lines(block)
    version, _, rest = lines[0].partition(b" ")
    code, _, reason = rest.partition(b" ")
    if version not in _VERSIONS or len(code) != 3 or not code.isdigit():
        raise HttpError(502, "the upstream's status line is not HTTP/1.x NNN")
    if _VALUE_BAD_RE.search(reason):
        raise HttpError(502, "the upstream's reason phrase has a control character")
    return ResponseHead(version, int(code), reason, _parse_fields(lines[1:], "response header"))


class Framing(Enum):
    NONE = "none"
    LENGTH = "length"
    CHUNKED = "chunked"
    CLOSE = "close"  # until the connection closes (responses only)


def _content_length(values: list[bytes], status: int) -> int:
    if len(values) > 1:
        raise HttpError(status, "two Content-Length fields (a request-smuggling shape)")
    v = values[0]
    if not v.isdigit() or len(v) > 18:
        raise HttpError(status, f"Content-Length {v[:20]!r} is not a decimal length")
    return int(v)


def _is_chunked(values: list[bytes], status: int) -> bool:
    if len(values) > 1:
        raise HttpError(status, "two Transfer-Encoding fields")
    if values[0].lower() != b"chunked":
        raise HttpError(
            501 if status == 400 else status, "only Transfer-Encoding: chunked is supported"
        )
    return True


def request_framing(head: RequestHead) -> tuple[Framing, int]:
    cl, te = head.get(b"content-length"), head.get(b"transfer-encoding")
    if cl and te:
        raise HttpError(
            400, "Content-Length together with Transfer-Encoding (a request-smuggling shape)"
        )
    if te:
        if head.version == b"HTTP/1.0":
            raise HttpError(400, "Transfer-Encoding on HTTP/1.0 (a request-smuggling shape)")
        _is_chunked(te, 400)
        return Framing.CHUNKED, 0
    if cl:
        n = _content_length(cl, 400)
        return (Framing.LENGTH, n) if n else (Framing.NONE, 0)
    return Framing.NONE, 0


def response_framing(head: ResponseHead, method: bytes) -> tuple[Framing, int]:
    if method == b"HEAD" or head.status in (204, 304) or 100 <= head.status < 200:
        return Framing.NONE, 0
    cl, te = head.get(b"content-length"), head.get(b"transfer-encoding")
    if cl and te:
        raise HttpError(502, "the upstream sent Content-Length with Transfer-Encoding")
    if te:
        _is_chunked(te, 502)
        return Framing.CHUNKED, 0
    if cl:
        n = _content_length(cl, 502)
        return (Framing.LENGTH, n) if n else (Framing.NONE, 0)
    return Framing.CLOSE, 0


class _BodyReader:
    """One message body from successive buffers: data slices, then trailers, then the end."""

    __slots__ = ("kind", "left", "state", "status", "trailer_lines")

    def __init__(self, kind: Framing, length: int, status: int) -> None:
        self.kind = kind
        self.left = length
        self.state = "size"  # chunked: size | data | crlf | trailer
        self.status = status  # 400 for requests, 502 for responses
        self.trailer_lines: Fields = []

    def read(self, data: bytes, pos: int) -> tuple[int, list[bytes], Fields | None, bool]:
        """Consume from ``data[pos:]``: (new pos, data pieces, trailers when done, done)."""
        pieces: list[bytes] = []
        n = len(data)
        if self.kind is Framing.LENGTH:
            take = min(self.left, n - pos)
            if take:
                pieces.append(data if pos == 0 and take == n else data[pos : pos + take])
                self.left -= take
            return pos + take, pieces, ([] if self.left == 0 else None), self.left == 0
        if self.kind is Framing.CLOSE:
            if pos < n:
                pieces.append(data if pos == 0 else data[pos:])
            return n, pieces, None, False
        while pos < n:
            if self.state == "size":
                eol = data.find(b"\r\n", pos, pos + MAX_CHUNK_LINE_BYTES + 2)
                if eol == -1:
                    if n - pos > MAX_CHUNK_LINE_BYTES:
                        raise HttpError(self.status, "a chunk-size line is too long")
                    if b"\n" in data[pos:] and b"\r\n" not in data[pos:]:
                        raise HttpError(self.status, "a chunk-size line ends with a bare LF")
                    break
                m = _CHUNK_SIZE_RE.match(data[pos:eol])
                if not m:
                    raise HttpError(self.status, f"bad chunk size {data[pos:eol][:20]!r}")
                self.left = int(m.group(1), 16)
                pos = eol + 2
                self.state = "data" if self.left else "trailer"
            elif self.state == "data":
                take = min(self.left, n - pos)
                pieces.append(data[pos : pos + take])
                self.left -= take
                pos += take
                if self.left == 0:
                    self.state = "crlf"
            elif self.state == "crlf":
                if n - pos < 2:
                    if data[pos:] not in (b"", b"\r"):
                        raise HttpError(self.status, "chunk data is not followed by CRLF")
                    break
                if data[pos : pos + 2] != b"\r\n":
                    raise HttpError(self.status, "chunk data is not followed by CRLF")
                pos += 2
                self.state = "size"
            else:  # trailer: field lines up to an empty line
                eol = data.find(b"\r\n", pos, pos + MAX_HEAD_BYTES + 2)
                if eol == -1:
                    if n - pos > MAX_HEAD_BYTES:
                        raise HttpError(self.status, "the trailer section is too long")
                    break
                line = data[pos:eol]
                pos = eol + 2
                if not line:
                    return pos, pieces, self.trailer_lines, True
                if b"\n" in line or b"\r" in line:
                    raise HttpError(self.status, "a bare CR or LF in a trailer")
                self.trailer_lines.extend(_parse_fields([line], "trailer"))
                if len(self.trailer_lines) > MAX_HEADER_FIELDS:
                    raise HttpError(self.status, "too many trailer fields")
        return pos, pieces, None, False


def _without_upgrade(fields: Fields) -> Fields:
    """``fields`` minus Upgrade, HTTP2-Settings and the ``upgrade`` token of Connection."""
    out: Fields = []
    for n, v in fields:
        low = n.lower()
        if low in (b"upgrade", b"http2-settings"):
            continue
        if low == b"connection":
            tokens = [
                t.strip()
                for t in v.split(b",")
                if t.strip().lower() not in (b"upgrade", b"http2-settings") and t.strip()
            ]
            if not tokens:
                continue
            v = b", ".join(tokens)
        out.append((n, v))
    return out


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_LAST_CHUNK = b"0\r\n"


# -- readable denials -----------------------------------------------------------------------
def deny_response(
    host: str,
    *,
    fmt: str = "text",
    reason: str,
    how_to_allow: str | None = None,
    version: bytes = b"HTTP/1.1",
) -> bytes:
    """A ``403`` an agent can read and repeat to its user (SPEC "Readable denials").

    ``fmt`` is ``NetworkConfig.deny_response`` ("text" or "json"). ``how_to_allow`` defaults
    to the rule that would let ``host`` through on 443, in the CLI's and the SDK's form. The
    response closes the connection: the request was not forwarded, nothing else follows.
    """
    hint = how_to_allow or (
        f"add the rule --rule allow@{host}:tcp:443 (CLI), or "
        f"PolicyRule(action='allow', destination='{host}', protocol='tcp', port='443') (SDK)"
    )
    if fmt == "json":
        body = (
            json.dumps(
                {
                    "error": "blocked by corral",
                    "host": host,
                    "reason": reason,
                    "how_to_allow": hint,
                },
                separators=(",", ":"),
            ).encode()
            + b"\n"
        )
        ctype = b"application/json"
    else:
        body = (
            f"corral blocked this request to {host}: {reason}.\n" f"To allow it: {hint}.\n"
        ).encode()
        ctype = b"text/plain; charset=utf-8"
    head = ResponseHead(
        version,
        403,
        b"Forbidden",
        [
            (b"Content-Type", ctype),
            (b"Content-Length", str(len(body)).encode()),
            (b"Cache-Control", b"no-store"),
            (b"Connection", b"close"),
            (b"X-Corral-Denied", b"1"),
        ],
    )
    return head.serialize() + body


def _error_response(status: int, message: str) -> bytes:
    reasons = {400: b"Bad Request", 431: b"Request Header Fields Too Large", 501: b"Not Implemented",
               502: b"Bad Gateway", 505: b"HTTP Version Not Supported"}  # fmt: skip
    body = f"corral: {message}\n".encode()
    head = ResponseHead(
        b"HTTP/1.1",
        status,
        reasons.get(status, b"Error"),
        [
            (b"Content-Type", b"text/plain; charset=utf-8"),
            (b"Content-Length", str(len(body)).encode()),
            (b"Connection", b"close"),
        ],
    )
    return head.serialize() + body


# -- WebSocket frames -----------------------------------------------------------------------
def _unmask(data: bytes, key: bytes, offset: int) -> bytes:
    """``data`` XOR the 4-byte ``key`` starting at payload offset ``offset`` (big ints: C speed)."""
    if not data:
        return data
    k = key[offset % 4 :] + key[: offset % 4]
    n = len(data)
    rep = (k * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(rep, "big")).to_bytes(n, "big")


class _WsFrames:
    """WebSocket frame boundaries of one direction (RFC 6455 section 5.2), for scanning/masking.

    ``feed`` returns (frame header bytes, fin/rsv/opcode byte, mask key or None, payload
    length, payload pieces of the current frame as received, whether the frame ended).
    """

    def __init__(self) -> None:
        self._buf = b""
        self._left = 0  # payload bytes still to come of the current frame
        self._offset = 0  # payload bytes of the current frame seen so far
        self._key: bytes | None = None
        self.first = 0
        self.length = 0
        self.header = b""

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        """Events: ("header", raw header), ("payload", unmasked bytes), ("end", b"")."""
        buf = self._buf + data if self._buf else data
        self._buf = b""
        out: list[tuple[str, bytes]] = []
        pos = 0
        while pos < len(buf):
            if self._left == 0 and not self.header:
                if len(buf) - pos < 2:
                    break
                b1 = buf[pos + 1]
                n = b1 & 0x7F
                need = 2 + (2 if n == 126 else 8 if n == 127 else 0) + (4 if b1 & 0x80 else 0)
                if len(buf) - pos < need:
                    break
                hdr = buf[pos : pos + need]
                if n == 126:
                    n = int.from_bytes(hdr[2:4], "big")
                elif n == 127:
                    n = int.from_bytes(hdr[2:10], "big") & ((1 << 63) - 1)
                self._key = hdr[-4:] if b1 & 0x80 else None
                self.first, self.length, self.header = buf[pos], n, hdr
                self._left, self._offset = n, 0
                out.append(("header", hdr))
                pos += need
                if n == 0:
                    out.append(("end", b""))
                    self.header = b""
                continue
            take = min(self._left, len(buf) - pos)
            piece = buf[pos : pos + take]
            if self._key is not None:
                piece = _unmask(piece, self._key, self._offset)
            out.append(("payload", piece))
            self._left -= take
            self._offset += take
            pos += take
            if self._left == 0:
                out.append(("end", b""))
                self.header = b""
        self._buf = buf[pos:]
        return out


def _ws_header(first: int, length: int) -> bytes:
    if length < 126:
        return bytes((first, length))
    if length < 1 << 16:
        return bytes((first, 126)) + length.to_bytes(2, "big")
    return bytes((first, 127)) + length.to_bytes(8, "big")


# -- the rewriter ---------------------------------------------------------------------------
@dataclass
class Step:
    """What to do after one input: bytes to write each way, then what was found.

    Write ``to_upstream`` and ``to_guest`` in order; then, when ``close`` is set, close both
    sides (a refused request, a protocol error, or the end of a close-delimited response).
    ``violations`` non-empty means the request was blocked; :attr:`action` says what else to
    do (log, terminate the sandbox). ``passed`` are placeholders forwarded to an
    ``allow_placeholder_for`` host (audit them). ``shutdown_upstream``: the guest half-closed
    between requests; shut down the upstream's write side.
    """

    to_upstream: list[bytes] = field(default_factory=list)
    to_guest: list[bytes] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    passed: list[PlaceholderPassed] = field(default_factory=list)
    error: str | None = None
    close: bool = False
    shutdown_upstream: bool = False

    @property
    def blocked(self) -> bool:
        return bool(self.violations)

    @property
    def action(self) -> ViolationAction | None:
        worst = most_severe(self.violations)
        return worst.action if worst is not None else None

    def merge(self, other: Step) -> Step:
        self.to_upstream += other.to_upstream
        self.to_guest += other.to_guest
        self.violations += other.violations
        self.passed += other.passed
        self.error = self.error or other.error
        self.close = self.close or other.close
        self.shutdown_upstream = self.shutdown_upstream or other.shutdown_upstream
        return self


@dataclass
class _Pending:
    """A request forwarded upstream, waiting for its response."""

    method: bytes
    version: bytes
    upgrade: bool  # asked to switch protocols (Upgrade header) or CONNECT
    websocket: bool
    authority: bytes | None


class _ReqState(Enum):
    HEAD = "head"
    BODY = "body"
    HOLD = "hold"  # waiting for the answer to an Upgrade/CONNECT
    OPAQUE = "opaque"
    CLOSED = "closed"


@dataclass
class _Request:
    """The request being received: its head, scope, body reader and what it has used."""

    head: RequestHead
    scope: RequestScope
    reader: _BodyReader
    framing: Framing
    detector: PlaceholderDetector
    buffering: bool
    head_sent: bool = False
    buffered: list[bytes] = field(default_factory=list)
    buffered_len: int = 0
    reported: set[str] = field(default_factory=set)


_HOP_UPGRADE = (b"upgrade",)


class Http1Rewriter:
    """One intercepted HTTP/1 connection (guest <-> corral <-> upstream).

    ``sni`` is the TLS name the guest asked for (None for plain HTTP, where nothing is ever
    substituted), ``pinned`` whether the connection's destination address is pinned to that
    name by the sandbox's DNS. ``deny_format`` is ``NetworkConfig.deny_response``: when set, a
    blocked request is answered with a readable 403 before the connection closes.
    """

    def __init__(
        self,
        table: SecretTable,
        *,
        sni: str | None,
        pinned: bool,
        deny_format: str | None = None,
    ) -> None:
        self.table = table
        self.sni = normalize_host(sni)
        self.pinned = pinned
        self.deny_format = deny_format
        self._masker = table.masker_for(self.sni) if self.sni and pinned else EchoMasker()
        self._req_state = _ReqState.HEAD
        self._gbuf = b""
        self._req: _Request | None = None
        self._pending: deque[_Pending] = deque()
        self._resp_state = "head"  # head | body | opaque | closed
        self._ubuf = b""
        self._resp_reader: _BodyReader | None = None
        self._resp_mask = False
        self._resp_rechunk = False
        self._resp_close_after = False
        self._resp_pending: _Pending | None = None
        self._resp_started = False
        self._websocket = False
        self._opaque_detector: PlaceholderDetector | None = None
        self._ws_guest: _WsFrames | None = None
        self._ws_upstream: _WsFrames | None = None
        self._ws_frame: list[bytes] = []
        self._ws_frame_len = 0
        self._ws_frame_buffering = False
        self._ws_reported: set[str] = set()
        self._tunnel_authority: bytes | None = None

    @property
    def closed(self) -> bool:
        return self._req_state is _ReqState.CLOSED

    @property
    def upgraded(self) -> bool:
        """True once the connection is a tunnel (after 101, or a 2xx to CONNECT)."""
        return self._req_state is _ReqState.OPAQUE

    # -- guest -> upstream ------------------------------------------------------------------
    def guest_data(self, data: bytes) -> Step:
        step = Step()
        if self._req_state is _ReqState.CLOSED or not data:
            return step
        if self._req_state is _ReqState.OPAQUE:
            return self._opaque_guest(bytes(data), step)
        if self._req_state is _ReqState.HOLD:
            self._gbuf += data
            if len(self._gbuf) > MAX_HELD_BYTES:
                return self._fail(step, 400, "too many bytes sent before the upgrade was answered")
            return step
        buf = self._gbuf + data if self._gbuf else bytes(data)
        self._gbuf = b""
        try:
            self._requests(buf, step)
        except HttpError as exc:
            return self._fail(step, exc.status, exc.message)
        return step

    def _fail(self, step: Step, status: int, message: str) -> Step:
        """A guest-side protocol error: tell the guest (if it can still be told) and close.

        A body error can come after the head went upstream; the upstream then never gets the
        end of that request (no final chunk, short Content-Length), so it never acts on it.
        """
        unanswered = len(self._pending) - (
            1 if self._req is not None and self._req.head_sent else 0
        )
        if unanswered == 0 and not self._resp_started:
            step.to_guest.append(_error_response(status, message))
        step.error = message
        step.close = True
        self._req_state = _ReqState.CLOSED
        return step

    def _requests(self, buf: bytes, step: Step) -> None:
        pos = 0
        while pos < len(buf) and self._req_state in (_ReqState.HEAD, _ReqState.BODY):
            if self._req_state is _ReqState.HEAD:
                while buf.startswith(b"\r\n", pos):  # RFC 9112 2.2: ignore CRLF before a request
                    pos += 2
                if pos >= len(buf):
                    break
                end = find_head_end(buf, pos)
                if end == -1:
                    if b"\n" in buf[pos:] and b"\r\n" not in buf[pos:]:
                        raise HttpError(400, "a bare LF in the request head (lines end with CRLF)")
                    break
                if len(self._pending) >= MAX_PIPELINED:
                    raise HttpError(400, f"more than {MAX_PIPELINED} requests without an answer")
                head = parse_request_head(buf[pos : end - 4])
                pos = end
                self._start_request(head, step)
            else:
                before = pos
                pos = self._body(buf, pos, step)
                if pos == before and self._req_state is _ReqState.BODY:
                    break  # an incomplete chunk line or trailer: wait for more
        if self._req_state is _ReqState.CLOSED:
            return
        self._gbuf = buf[pos:]
        if self._req_state is _ReqState.HEAD and len(self._gbuf) > MAX_HEAD_BYTES:
            raise HttpError(431, f"the head is longer than {MAX_HEAD_BYTES} bytes")

    def _authority(self, head: RequestHead) -> bytes | None:
        hosts = head.get(b"host")
        if len(hosts) > 1:
            raise HttpError(400, "two Host fields")
        if head.version == b"HTTP/1.1" and not hosts:  # RFC 9112 3.2, CONNECT included
            raise HttpError(400, "an HTTP/1.1 request without Host")
        host = hosts[0] if hosts else None
        if head.method == b"CONNECT":
            if host is not None and normalize_host(host) != normalize_host(head.target):
                raise HttpError(400, "the CONNECT target and Host differ")
            return head.target
        m = _ABSOLUTE_RE.match(head.target)
        if m:
            if host is not None and normalize_host(m.group(1)) != normalize_host(host):
                raise HttpError(400, "the absolute request target and Host differ")
            return m.group(1)
        if not (
            head.target.startswith(b"/") or (head.target == b"*" and head.method == b"OPTIONS")
        ):
            raise HttpError(400, "the request target is not /path, an absolute URL, or *")
        return host

    def _start_request(self, head: RequestHead, step: Step) -> None:
        framing, length = request_framing(head)
        authority = self._authority(head)
        scope = self.table.scope(sni=self.sni, pinned=self.pinned, authority=authority)
        if head.method == b"CONNECT":
            # Tunnel metadata is never a place for a value (SPEC lists it as a violation
            # channel): a placeholder in a CONNECT head is judged, never substituted.
            scope = dataclasses.replace(scope, injectable=())
        used: set[str] = set()
        if scope.injectable:
            if scope.wants_query:
                head.target, names = scope.substitute_target(head.target)
                used |= names
            new_fields: Fields = []
            for name, value in head.fields:
                new, names = scope.substitute_header(name, value)
                if names and name.lower() in (b"authorization", b"proxy-authorization"):
                    old_tok, new_tok = value.rsplit(b" ", 1)[-1], new.rsplit(b" ", 1)[-1]
                    if old_tok != new_tok:
                        self._masker.add_pair(new_tok, old_tok)
                new_fields.append((name, new))
                used |= names
            head.fields = new_fields
        upgrade = bool(head.get(b"upgrade")) and head.method != b"CONNECT"
        websocket = upgrade and all(v.strip().lower() == b"websocket" for v in head.get(b"upgrade"))
        if upgrade and not websocket and self.table:
            # Only WebSocket is followed into its protocol (scanned, masked). Any other
            # upgrade (h2c) is taken off the request, so the server answers in HTTP/1.1
            # (RFC 9110 7.8: a server may ignore Upgrade) and corral keeps reading it.
            head.fields = _without_upgrade(head.fields)
            upgrade = False
        if websocket and self.table:
            head.fields = [
                (n, v) for n, v in head.fields if n.lower() != b"sec-websocket-extensions"
            ]
        if used:
            head.fields = [(n, v) for n, v in head.fields if n.lower() != b"accept-encoding"]
            head.fields.append((b"Accept-Encoding", b"identity"))
        found = self._judge_head(head, scope)
        if self._block(found, scope, step):
            return
        buffering = (
            scope.wants_body
            and framing is not Framing.NONE
            and (framing is Framing.CHUNKED or length <= MAX_SUBSTITUTED_BODY_BYTES)
        )
        req = _Request(
            head,
            scope,
            _BodyReader(framing, length, 400),
            framing,
            self.table.detector(),
            buffering,
        )
        self._req = req
        self._pending.append(
            _Pending(
                head.method,
                head.version,
                upgrade or head.method == b"CONNECT",
                websocket,
                authority,
            )
        )
        if buffering and any(v.lower() == b"100-continue" for v in head.get(b"expect")):
            # The head is held until the body is in, so the upstream cannot say 100: corral
            # says it, or the client would wait (curl: one second) before sending the body.
            head.fields = [(n, v) for n, v in head.fields if n.lower() != b"expect"]
            step.to_guest.append(b"HTTP/1.1 100 Continue\r\n\r\n")
        if framing is Framing.NONE:
            step.to_upstream.append(head.serialize())
            req.head_sent = True
            self._end_request(step)
            return
        if not buffering:
            step.to_upstream.append(head.serialize())
            req.head_sent = True
        self._req_state = _ReqState.BODY

    def _judge_head(
        self, head: RequestHead, scope: RequestScope
    ) -> list[Violation | PlaceholderPassed]:
        """Every placeholder left in the (rewritten) head, judged per channel."""
        if not self.table or not self.table.find(head.serialize()):
            return []  # the common case: one pass over the whole head
        connect = head.method == b"CONNECT"
        out: list[Violation | PlaceholderPassed] = []
        line_found = self.table.find(head.method + b" " + head.target)
        if line_found:
            out += scope.judge(line_found, Channel.CONNECT if connect else Channel.TARGET)
        for name, value in head.fields:
            found = self.table.find(name + b": " + value)
            if not found:
                continue
            channel = Channel.CONNECT if connect else Channel.HEADER
            if not connect and name.lower() in (b"authorization", b"proxy-authorization"):
                token = value.strip().rsplit(b" ", 1)[-1]
                creds = decode_basic(token)
                if creds is not None and self.table.find(creds):
                    channel = Channel.BASIC_AUTH
            out += scope.judge(found, channel)
        return out

    def _block(
        self, found: Iterable[Violation | PlaceholderPassed], scope: RequestScope, step: Step
    ) -> bool:
        """Record what was found; on a violation, refuse: close, and a 403 if configured."""
        violations = [f for f in found if isinstance(f, Violation)]
        step.passed += [f for f in found if isinstance(f, PlaceholderPassed)]
        if not violations:
            return False
        step.violations += violations
        step.close = True
        worst = most_severe(violations)
        assert worst is not None
        step.error = worst.describe()
        if self.deny_format and not self._pending and not self._resp_started:
            step.to_guest.append(
                deny_response(
                    scope.host,
                    fmt=self.deny_format,
                    reason=f"it carries the placeholder of secret {worst.secret} ({worst.reason})",
                    how_to_allow=(
                        f"send {worst.secret} only to its allowed hosts, or add {scope.host} to "
                        "the secret's allowed_hosts (or allow_placeholder_for, to pass the "
                        "placeholder unchanged)"
                    ),
                )
            )
        self._req_state = _ReqState.CLOSED
        self._req = None
        return True

    def _body(self, buf: bytes, pos: int, step: Step) -> int:
        req = self._req
        assert req is not None
        pos, pieces, trailers, done = req.reader.read(buf, pos)
        if req.buffering:
            for p in pieces:
                req.buffered.append(p)
                req.buffered_len += len(p)
            if req.buffered_len > MAX_SUBSTITUTED_BODY_BYTES:
                self._stop_buffering(req, step)
                if self._req_state is _ReqState.CLOSED:
                    return len(buf)
            elif done:
                self._finish_buffered(req, trailers or [], step)
                return pos
            else:
                return pos
            pieces = []
        chunked = req.framing is Framing.CHUNKED
        for i, p in enumerate(pieces):
            if not p:
                continue
            if done and i == len(pieces) - 1 and req.framing is Framing.LENGTH:
                # The piece that completes the message: check the end of the stream first.
                req.detector.feed(p)
                if self._judge_stream(req, req.detector.finish(), Channel.BODY, step):
                    return len(buf)
            elif self._judge_stream(req, req.detector.feed(p), Channel.BODY, step):
                return len(buf)
            step.to_upstream.append(_chunk(p) if chunked else p)
        if done:
            final_checked = req.framing is Framing.LENGTH and pieces
            if not final_checked and self._judge_stream(
                req, req.detector.finish(), Channel.BODY, step
            ):
                return len(buf)
            if chunked:
                if self._trailers_blocked(req, trailers or [], step):
                    return len(buf)
                step.to_upstream.append(_LAST_CHUNK + _serialize_fields(trailers or []) + b"\r\n")
            self._end_request(step)
        return pos

    def _judge_stream(
        self, req: _Request, found: frozenset[str], channel: Channel, step: Step
    ) -> bool:
        new = found - req.reported
        if not new:
            return False
        req.reported |= new
        return self._block(req.scope.judge(new, channel), req.scope, step)

    def _trailers_blocked(self, req: _Request, trailers: Fields, step: Step) -> bool:
        found: set[str] = set()
        for name, value in trailers:
            found |= self.table.find(name + b": " + value)
        return bool(found) and self._block(req.scope.judge(found, Channel.TRAILER), req.scope, step)

    def _finish_buffered(self, req: _Request, trailers: Fields, step: Step) -> None:
        body = b"".join(req.buffered)
        types = req.head.get(b"content-type")
        ctype = types[0] if types else None
        body, used = req.scope.substitute_body(body, ctype)
        found = self.table.find(body)
        if self._block(req.scope.judge(found, Channel.BODY), req.scope, step):
            return
        if self._trailers_blocked(req, trailers, step):
            return
        head = req.head
        if used:
            head.fields = [(n, v) for n, v in head.fields if n.lower() != b"accept-encoding"]
            head.fields.append((b"Accept-Encoding", b"identity"))
        if req.framing is Framing.LENGTH:
            head.fields = [
                (n, str(len(body)).encode() if n.lower() == b"content-length" else v)
                for n, v in head.fields
            ]
            step.to_upstream.append(head.serialize() + body)
        else:
            out = head.serialize() + (_chunk(body) if body else b"")
            step.to_upstream.append(out + _LAST_CHUNK + _serialize_fields(trailers) + b"\r\n")
        req.head_sent = True
        self._end_request(step)

    def _stop_buffering(self, req: _Request, step: Step) -> None:
        """The body outgrew the bound: no substitution in it; stream what is held, scanned."""
        req.buffering = False
        held = b"".join(req.buffered)
        req.buffered = []
        if self._judge_stream(req, req.detector.feed(held), Channel.BODY, step):
            return
        step.to_upstream.append(req.head.serialize())
        req.head_sent = True
        step.to_upstream.append(_chunk(held) if req.framing is Framing.CHUNKED else held)

    def _end_request(self, step: Step) -> None:
        req = self._req
        self._req = None
        pending = self._pending[-1] if self._pending else None
        if pending is not None and pending.upgrade and req is not None:
            self._req_state = _ReqState.HOLD
        else:
            self._req_state = _ReqState.HEAD

    def guest_eof(self) -> Step:
        step = Step()
        if self._req_state in (_ReqState.CLOSED, _ReqState.OPAQUE):
            if self._req_state is _ReqState.OPAQUE:
                step.shutdown_upstream = True
            return step
        if self._req_state is _ReqState.HEAD and not self._gbuf:
            step.shutdown_upstream = True
            return step
        if self._req_state is _ReqState.HOLD:
            step.shutdown_upstream = True
            return step
        step.error = "the guest closed the connection in the middle of a request"
        step.close = True
        self._req_state = _ReqState.CLOSED
        return step

    # -- opaque (after 101 / CONNECT 2xx) ---------------------------------------------------
    def _opaque_guest(self, data: bytes, step: Step) -> Step:
        det = self._opaque_detector
        if det is not None and det.active:
            if self._ws_guest is not None:
                for kind, piece in self._ws_guest.feed(data):
                    if kind == "payload":
                        det.feed(piece)
                channel = Channel.WEBSOCKET
            else:
                det.feed(data)
                channel = Channel.STREAM
            new = det.found - self._ws_reported
            if new:
                self._ws_reported |= new
                scope = self.table.scope(
                    sni=self.sni, pinned=self.pinned, authority=self._tunnel_authority
                )
                found = scope.judge(new, channel)
                violations = [f for f in found if isinstance(f, Violation)]
                step.passed += [f for f in found if isinstance(f, PlaceholderPassed)]
                if violations:
                    step.violations += violations
                    step.close = True
                    step.error = violations[0].describe()
                    self._req_state = _ReqState.CLOSED
                    return step
        step.to_upstream.append(data)
        return step

    def _opaque_upstream(self, data: bytes, step: Step) -> Step:
        frames = self._ws_upstream
        if not self._masker.active:
            step.to_guest.append(data)
            return step
        if frames is None:
            # A CONNECT tunnel from a host that may have been sent a value on this connection:
            # its protocol is unknown, so the bytes are masked as a stream. Harmless unless a
            # value is in them, and then the guest must not have it either way.
            out = self._masker.feed(data)
            if out:
                step.to_guest.append(out)
            return step
        for kind, piece in frames.feed(data):
            if kind == "header":
                self._ws_frame_buffering = frames.length <= MAX_WS_MASKED_FRAME
                self._ws_frame, self._ws_frame_len = [], 0
                if not self._ws_frame_buffering:
                    step.to_guest.append(piece)
            elif kind == "payload":
                if self._ws_frame_buffering:
                    self._ws_frame.append(piece)
                else:
                    step.to_guest.append(piece)
            elif self._ws_frame_buffering:
                payload = self._masker.mask(b"".join(self._ws_frame))
                opcode = frames.first & 0x0F
                if opcode >= 0x8 and len(payload) > 125:
                    payload = payload[:125]  # a control frame's payload is at most 125 bytes
                step.to_guest.append(_ws_header(frames.first, len(payload)) + payload)
                self._ws_frame = []
        return step

    # -- upstream -> guest ------------------------------------------------------------------
    def upstream_data(self, data: bytes) -> Step:
        step = Step()
        if self._resp_state == "closed" or not data:
            return step
        if self._resp_state == "opaque":
            return self._opaque_upstream(bytes(data), step)
        buf = self._ubuf + data if self._ubuf else bytes(data)
        self._ubuf = b""
        try:
            self._responses(buf, step)
        except HttpError as exc:
            self._upstream_fail(step, exc.message)
        return step

    def _upstream_fail(self, step: Step, message: str) -> None:
        if not self._resp_started and self._pending:
            step.to_guest.append(_error_response(502, message))
        step.error = message
        step.close = True
        self._resp_state = "closed"
        self._req_state = _ReqState.CLOSED

    def _responses(self, buf: bytes, step: Step) -> None:
        pos = 0
        while pos < len(buf) and self._resp_state in ("head", "body"):
            if self._resp_state == "head":
                if not self._pending:
                    raise HttpError(502, "the upstream sent data without a request")
                end = find_head_end(buf, pos)
                if end == -1:
                    break
                head = parse_response_head(buf[pos : end - 4])
                pos = end
                self._start_response(head, step)
            else:
                before = pos
                pos = self._response_body(buf, pos, step)
                if pos == before and self._resp_state == "body":
                    break
        if self._resp_state == "opaque" and pos < len(buf):
            self._opaque_upstream(buf[pos:], step)
            pos = len(buf)
        self._ubuf = buf[pos:]

    def _start_response(self, head: ResponseHead, step: Step) -> None:
        pending = self._pending[0]
        masker = self._masker
        if masker.active:
            head.fields = [(n, masker.mask(v)) for n, v in head.fields]
            head.reason = masker.mask(head.reason)
        if head.status == 101:
            if not pending.upgrade:
                raise HttpError(502, "the upstream switched protocols without being asked")
            self._pending.popleft()
            step.to_guest.append(head.serialize())
            self._tunnel_authority = pending.authority
            self._go_opaque(pending.websocket, step)
            return
        if 100 <= head.status < 200:
            step.to_guest.append(head.serialize())  # interim; the real response follows
            return
        if pending.method == b"CONNECT" and 200 <= head.status < 300:
            self._pending.popleft()
            step.to_guest.append(head.serialize())
            self._tunnel_authority = pending.authority
            self._go_opaque(False, step)
            return
        framing, length = response_framing(head, pending.method)
        self._resp_pending = pending
        self._resp_started = True
        encoding = b",".join(head.get(b"content-encoding")).strip().lower()
        self._resp_mask = (
            masker.active and framing is not Framing.NONE and encoding in (b"", b"identity")
        )
        self._resp_rechunk = framing is Framing.CHUNKED and self._resp_mask
        self._resp_close_after = False
        if self._resp_mask and framing is Framing.LENGTH and masker.may_change_length:
            head.fields = [(n, v) for n, v in head.fields if n.lower() != b"content-length"]
            if pending.version == b"HTTP/1.1" and head.version == b"HTTP/1.1":
                head.fields.append((b"Transfer-Encoding", b"chunked"))
                self._resp_rechunk = True
            else:
                head.fields = [(n, v) for n, v in head.fields if n.lower() != b"connection"]
                head.fields.append((b"Connection", b"close"))
                self._resp_close_after = True
        step.to_guest.append(head.serialize())
        self._resp_reader = _BodyReader(framing, length, 502)
        if framing is Framing.NONE:
            self._end_response(step)
        else:
            self._resp_state = "body"

    def _response_body(self, buf: bytes, pos: int, step: Step) -> int:
        reader = self._resp_reader
        assert reader is not None
        pos, pieces, trailers, done = reader.read(buf, pos)
        rechunk = self._resp_rechunk
        raw_chunked = reader.kind is Framing.CHUNKED and not rechunk
        for p in pieces:
            if self._resp_mask:
                p = self._masker.feed(p)
            if not p:
                continue
            step.to_guest.append(_chunk(p) if (rechunk or raw_chunked) else p)
        if done:
            if self._resp_mask:
                tail = self._masker.flush()
                if tail:
                    step.to_guest.append(_chunk(tail) if (rechunk or raw_chunked) else tail)
            if rechunk or raw_chunked:
                fields = trailers or []
                if self._masker.active:
                    fields = [(n, self._masker.mask(v)) for n, v in fields]
                step.to_guest.append(_LAST_CHUNK + _serialize_fields(fields) + b"\r\n")
            self._end_response(step)
        return pos

    def _end_response(self, step: Step) -> None:
        self._pending.popleft()
        self._resp_reader = None
        self._resp_started = False
        self._resp_state = "head"
        if self._resp_close_after:
            step.close = True
            self._resp_state = "closed"
            self._req_state = _ReqState.CLOSED
            return
        if self._req_state is _ReqState.HOLD and not any(p.upgrade for p in self._pending):
            # The upgrade was declined: what the guest sent meanwhile is the next request.
            self._req_state = _ReqState.HEAD
            held, self._gbuf = self._gbuf, b""
            if held:
                step.merge(self.guest_data(held))

    def _go_opaque(self, websocket: bool, step: Step) -> None:
        self._resp_state = "opaque"
        self._req_state = _ReqState.OPAQUE
        self._websocket = websocket
        self._opaque_detector = self.table.detector()
        if websocket:
            self._ws_guest = _WsFrames()
            self._ws_upstream = _WsFrames()
        held, self._gbuf = self._gbuf, b""
        if held:
            step.merge(self._opaque_guest(held, Step()))

    def upstream_eof(self) -> Step:
        step = Step(close=True)
        if self._resp_state == "opaque" and self._ws_upstream is None and self._masker.active:
            tail = self._masker.flush()
            if tail:
                step.to_guest.append(tail)
        if self._resp_state == "body" and self._resp_reader is not None:
            if self._resp_reader.kind is Framing.CLOSE:
                if self._resp_mask:
                    tail = self._masker.flush()
                    if tail:
                        step.to_guest.append(_chunk(tail) if self._resp_rechunk else tail)
                if self._resp_rechunk:
                    step.to_guest.append(_LAST_CHUNK + b"\r\n")
                self._pending.popleft()
            else:
                step.error = "the upstream closed the connection in the middle of a response"
        elif self._resp_state == "head" and self._pending and not self._ubuf:
            if not self._resp_started:
                step.to_guest.append(_error_response(502, "the upstream closed without answering"))
            step.error = "the upstream closed without answering"
        elif self._ubuf:
            step.error = "the upstream closed in the middle of a response head"
        self._resp_state = "closed"
        self._req_state = _ReqState.CLOSED
        return step
