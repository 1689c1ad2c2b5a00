"""A sans-I/O HTTP/2 relay for one intercepted connection, with secrets put in on the way.

corral terminates the guest's TLS and opens its own TLS connection upstream; when both sides
negotiated ``h2``, this object sits between the two byte streams. It holds two h2 state
machines, a server toward the guest and a client toward the upstream, maps each guest stream
to one upstream stream, and moves headers, data and trailers between them. HPACK, SETTINGS
and PING are hop-by-hop: each side keeps its own (h2 answers PING and acknowledges SETTINGS
itself). It does no I/O, so every edge case is a plain unit test; the asyncio shell only
moves bytes and obeys :attr:`RelayOutput.close`.

API::

    relay = Http2Relay(table, sni="api.github.com", pinned=True,
                       deny_format=config.deny_response)   # None, "text" or "json"
    out = relay.start()                    # our preface and SETTINGS for both sides
    out = relay.receive_guest(data)        # bytes from the guest's TLS
    out = relay.receive_upstream(data)     # bytes from the upstream's TLS
    out = relay.guest_closed() / relay.upstream_closed()   # EOF or a reset socket
    out.to_guest, out.to_upstream          # bytes to write, in order, before reading more
    out.violations                         # secrets.Violation: audit / act on .action
    out.passed                             # secrets.PlaceholderPassed: audit
    out.close                              # None, or why: write the bytes, then close both
    relay.open_streams, relay.buffered_bytes   # for metrics and tests

    responder = Http2DenialResponder.readable(host, fmt="text", reason="...")  # or (body, ...)
    out = responder.start(); out = responder.receive_guest(data)   # a 403 on every stream
    out = responder.guest_closed()
    readable_denial(host, fmt=..., reason=...) -> (content_type, body)  # http1's words

The shell writes ``to_guest`` and ``to_upstream`` and waits for them to drain before it reads
more from either side. That, with HTTP/2 flow control, is what bounds memory: data read from
one side is acknowledged to it (WINDOW_UPDATE) only once it has been handed to the other
side's h2 connection, so a slow reader makes the fast writer wait instead of filling corral.
What one connection holds unforwarded is at most the receive windows we advertise
(:data:`CONNECTION_WINDOW` per direction), plus a body held for substitution
(:data:`~corral.net.secrets.MAX_SUBSTITUTED_BODY_BYTES`).

Secrets (SPEC "Secrets and violations", the same rules as ``http1_rewriter``: both follow
``tests/support/secret_cases.py``):

- A request's headers are substituted through :meth:`SecretTable.scope` (SNI, pinned
  destination, ``:authority`` equal to SNI), then everything the detector still finds in the
  header block (names, values, pseudo-headers; ``:path`` is the TARGET channel) is judged. A
  header block split over CONTINUATION frames is judged as one, after h2 joins it.
- Bodies stream. When the scope wants a body substituted (``inject_body``), the request is
  held until its body is complete or exceeds the bound; a held body is substituted whole and
  its ``content-length`` recomputed. Every other body is scanned as it passes, across DATA
  frame edges, and a placeholder in it is a violation.
- A violation means the request is not forwarded: headers never go upstream, or, when the
  placeholder arrives in the body, the chunk completing it is not forwarded and the upstream
  stream is reset, so the upstream never receives a complete request. ``block`` and
  ``block-and-log`` reset the guest's stream (:data:`VIOLATION_RESET_CODE`), or answer it
  with the readable 403 when ``deny_format`` is set; other streams carry on (HTTP/1 closes
  its connection: here the connection's other streams are other requests).
  ``block-and-terminate`` closes the whole connection (the sandbox is stopped).
- A request with a substituted secret asks for ``accept-encoding: identity``, and responses
  from a host a value can have gone to (SNI allowed, destination pinned) are echo-masked
  (headers, trailers, 1xx, identity-encoded DATA across frame edges); masking that may change
  a body's length drops its ``content-length`` (HTTP/2 ends a body by END_STREAM).
- A request whose ``:authority`` is not the connection's SNI is answered ``421 Misdirected
  Request`` (RFC 9110 15.5.20: clients retry on a connection of its own, where the policy
  decides on that name) unless it carries a placeholder, which makes it a violation.

Bounds on what either peer sends are named constants below (with their precedents); a peer
that exceeds one gets GOAWAY (ENHANCE_YOUR_CALM for floods) and :attr:`RelayOutput.close`
names the bound. The upstream is guarded like the guest: a sandbox may reach a hostile server.

Known limits: no server push (disabled toward the upstream, never offered to the guest), no
extended CONNECT (RFC 8441 WebSockets over HTTP/2: not advertised, so clients use HTTP/1.1
for WebSockets), PRIORITY is not relayed, compressed bodies are not masked.
"""

from __future__ import annotations

import contextlib
import struct
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import h2.config  # type: ignore[import-untyped]
import h2.connection  # type: ignore[import-untyped]
import h2.events  # type: ignore[import-untyped]
import h2.exceptions  # type: ignore[import-untyped]
import h2.settings  # type: ignore[import-untyped]
from h2.errors import ErrorCodes  # type: ignore[import-untyped]
from hpack import NeverIndexedHeaderTuple

from corral.config.enums import ViolationAction
from corral.net.http1_rewriter import deny_response
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
    "CONNECTION_WINDOW",
    "FLOOD_OVERHEAD_RATIO",
    "FLOOD_OVERHEAD_SLACK",
    "MAX_CONCURRENT_STREAMS",
    "MAX_CONSECUTIVE_EMPTY_FRAMES",
    "MAX_CONTINUATION_FRAMES",
    "MAX_ENCODER_TABLE_SIZE",
    "MAX_FRAME_SIZE",
    "MAX_REQUEST_HEADER_BLOCK",
    "MAX_REQUEST_HEADER_LIST",
    "MAX_RESPONSE_HEADER_BLOCK",
    "MAX_RESPONSE_HEADER_LIST",
    "PING_ALLOWANCE",
    "PREMATURE_RESET_ALLOWANCE",
    "PRIORITY_FRAMES_PER_STREAM",
    "RESET_ALLOWANCE",
    "SETTINGS_ALLOWANCE",
    "STREAM_WINDOW",
    "VIOLATION_RESET_CODE",
    "WINDOW_UPDATES_PER_DATA_FRAME",
    "FrameGuard",
    "GoAway",
    "Http2DenialResponder",
    "Http2Relay",
    "PeerError",
    "RelayOutput",
    "readable_denial",
]

# -- bounds ---------------------------------------------------------------------------------
#: Largest frame payload accepted from either peer. We never raise SETTINGS_MAX_FRAME_SIZE
#: above the protocol's initial value (RFC 9113 section 4.2: 16,384), as nginx and h2o do not;
#: Go advertises 1 MiB. A larger frame is refused from its 9-byte header, before its payload
#: is buffered, so no frame costs more than 16 KiB of memory; the 9-byte header per 16 KiB
#: costs nothing measurable in throughput.
MAX_FRAME_SIZE = 16_384

#: Largest HPACK dynamic table our encoders keep, whatever SETTINGS_HEADER_TABLE_SIZE the
#: peer advertises (it is an upper bound the encoder may stay under, RFC 7541 section 4.2).
#: A peer announcing 4 GiB would otherwise make corral remember every distinct header it
#: ever sent there. Go caps its encoder at 4,096 (maxEncoderHeaderTableSize), nghttp2 too
#: (max_deflate_dynamic_table_size); 4,096 is also the protocol's default.
MAX_ENCODER_TABLE_SIZE = 4096

#: Receive window per stream we advertise to each peer (SETTINGS_INITIAL_WINDOW_SIZE). The
#: protocol default (65,535) caps a stream at 64 KiB per round trip (0.6 MiB/s at 100 ms).
#: Go's server allows 1 MiB per stream (MaxUploadBufferPerStream), curl asks for 10 MiB,
#: nginx 64 KiB (http2_body_preread_size). 1 MiB keeps a single download or upload fast on a
#: long path and matches the largest body held for substitution.
STREAM_WINDOW = 1 << 20

#: Receive window per connection (WINDOW_UPDATE on stream 0 at start). It bounds what one
#: connection can hold unforwarded in each direction when the other side reads slowly. Go's
#: server: 1 MiB (MaxUploadBufferPerConnection); its client 1 GiB. 2 MiB lets two streams
#: run at full window at once while a stalled connection costs at most 4 MiB (both ways).
CONNECTION_WINDOW = 2 << 20

#: Streams the guest may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS). RFC 9113
#: section 5.1.2 recommends no less than 100; h2 and Apache default to 100, nginx 128, Go 250.
#: Each open stream can hold a stream window, so this times :data:`STREAM_WINDOW` is capped
#: by :data:`CONNECTION_WINDOW` anyway; 100 is what the common servers we relay to allow.
MAX_CONCURRENT_STREAMS = 100

#: Largest HPACK-encoded request header block (HEADERS plus CONTINUATIONs) from the guest.
#: Envoy: 60 KiB (max_request_headers_kb), nginx: 4 x 8 KiB (large_client_header_buffers),
#: Node.js: 16 KiB, Go: 1 MiB. 64 KiB fits every real request (big cookies reach 8-16 KiB)
#: and, counted before h2 buffers it, stops a header block that never ends.
MAX_REQUEST_HEADER_BLOCK = 64 * 1024

#: Largest decoded request header list (RFC 7541 section 4.1 sizes: name + value + 32 per
#: field), the guard against HPACK bombs (a 1-byte reference to a 4 KiB table entry). h2's
#: default SETTINGS_MAX_HEADER_LIST_SIZE is 64 KiB; Envoy 60 KiB; nghttp2 64 KiB.
MAX_REQUEST_HEADER_LIST = 64 * 1024

#: Largest encoded response header block from the upstream. Responses carry more cookies
#: than requests: curl accepts 300 KiB of response headers, but nghttp2 (curl's HTTP/2)
#: takes at most 8 CONTINUATIONs, about 144 KiB at the default frame size. 128 KiB.
MAX_RESPONSE_HEADER_BLOCK = 128 * 1024

#: Largest decoded response header list: twice the block, for HPACK's indexing gains.
MAX_RESPONSE_HEADER_LIST = 256 * 1024

#: CONTINUATION frames after one HEADERS (the CVE-2024-27316 / CVE-2023-45288 class: a
#: header block that never sets END_HEADERS). nghttp2 1.61 accepts 8 by default
#: (nghttp2_option_set_max_continuations), h2 itself 64, Go stops at its header-size limit.
#: 8 also bounds a stream of empty CONTINUATIONs, which no byte limit can catch.
MAX_CONTINUATION_FRAMES = 8

#: SETTINGS frames (not ACKs) a peer may send, plus one per stream. Each must be answered.
#: A peer sends one at start and a few more when it resizes windows (gRPC's BDP estimator: a
#: handful per connection). Go and Netty bound the queue of unsent answers (10,000); a relay
#: cannot see its socket's queue, so it bounds the cause, well above any real peer.
SETTINGS_ALLOWANCE = 100

#: PING frames (not ACKs) a peer may send, plus one for every HEADERS or DATA frame we send
#: it. grpc-go's server lets pings through while it is sending data and otherwise allows one
#: per 5 minutes (keepalive.EnforcementPolicy); Envoy and Netty bound queued PING answers
#: (1,000 / 10,000). 1,000 idle pings is hours of the most eager keepalive (every 10 s).
PING_ALLOWANCE = 1000

#: PRIORITY frames per stream the peer opened, plus one stream's worth: Envoy's
#: max_inbound_priority_frames_per_stream (100). PRIORITY is not relayed, only parsed.
PRIORITY_FRAMES_PER_STREAM = 100

#: WINDOW_UPDATE frames allowed: 5 + 2 x (streams + this x DATA frames sent to the peer), the
#: formula and default (10) of Envoy's max_inbound_window_update_frames_per_data_frame_sent.
WINDOW_UPDATES_PER_DATA_FRAME = 10

#: RST_STREAM frames beyond one per stream: resets of streams already closed (a race a real
#: peer loses a few times per connection) cost work and answer nothing.
RESET_ALLOWANCE = 100

#: Guest resets of streams that had no response headers yet ("rapid reset",
#: CVE-2023-44487: open and cancel at once, so the upstream works and the client never
#: waits), less one for each stream that completed normally. Netty allows 200 RST_STREAM per
#: 30 s (Http2MaxRstFrameDecoder), nginx caps new streams per read at 2 x
#: concurrent_streams. A client that cancels half its requests forever stays within it; a
#: flood of open-and-cancel exhausts it after 200.
PREMATURE_RESET_ALLOWANCE = 200

#: Consecutive DATA, HEADERS or CONTINUATION frames with an empty payload and no END_STREAM:
#: each costs a frame's work and carries nothing. Envoy's
#: max_consecutive_inbound_frames_with_empty_payload defaults to 1.
MAX_CONSECUTIVE_EMPTY_FRAMES = 1

#: nginx's HTTP/2 flood rule (ngx_http_v2_read_handler): the connection is closed when all
#: bytes received / 8 exceed payload bytes (DATA and header blocks) + 1 MiB. It bounds every
#: frame kind the counters above do not name (unknown extension frames, ACKs nobody asked
#: for, padding) by the useful traffic beside them.
FLOOD_OVERHEAD_RATIO = 8
FLOOD_OVERHEAD_SLACK = 1 << 20

#: RST_STREAM code for a stream refused because of a secret violation. Not REFUSED_STREAM:
#: curl, Go and nghttp2 retry that one automatically (RFC 9113 section 8.7 says it is safe),
#: which would send the same placeholder again. INTERNAL_ERROR is final for every client.
VIOLATION_RESET_CODE = ErrorCodes.INTERNAL_ERROR

# Frame types and flags (RFC 9113 section 6).
_DATA, _HEADERS, _PRIORITY, _RST_STREAM, _SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
_PUSH_PROMISE, _PING, _GOAWAY, _WINDOW_UPDATE, _CONTINUATION = 0x5, 0x6, 0x7, 0x8, 0x9
_END_STREAM, _ACK, _END_HEADERS = 0x1, 0x1, 0x4
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_GOAWAY_BODY = struct.Struct(">LL")
#: Debug data kept from a peer's GOAWAY for the close reason (printable, bounded).
_GOAWAY_DEBUG_SHOWN = 120


# -- the frame guard ------------------------------------------------------------------------
class PeerError(Exception):
    """A peer broke a bound or the protocol; the connection ends with GOAWAY ``error_code``."""

    def __init__(self, error_code: int, reason: str) -> None:
        super().__init__(reason)
        self.error_code = int(error_code)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class GoAway:
    """A GOAWAY frame a peer sent, taken out of the byte stream before h2 sees it.

    h2 closes its whole state machine on GOAWAY (python-hyper/h2 issue 1181), which would
    cut off the streams the peer promised to finish; the relay handles GOAWAY itself.
    """

    last_stream_id: int
    error_code: int
    debug: str


@dataclass(frozen=True, slots=True)
class _Limits:
    header_block: int
    count_streams: bool  # the peer opens streams (the guest); else the relay credits them


class FrameGuard:
    """Reads one peer's frames ahead of h2 and enforces the bounds above.

    ``feed`` returns the bytes to give h2 (whole frames only) and the GOAWAYs it took out,
    in order. It raises :class:`PeerError` at the first frame that breaks a bound, having
    buffered no more than one frame. It checks framing only; h2 checks the rest.
    """

    __slots__ = (
        "_block_bytes",
        "_block_frames",
        "_block_stream",
        "_buf",
        "_empty_run",
        "_highest_stream",
        "_limits",
        "_pings",
        "_preface_left",
        "_priorities",
        "_resets",
        "_settings",
        "_window_updates",
        "data_frames_sent",
        "frames_sent",
        "payload_bytes",
        "streams",
        "total_bytes",
    )

    def __init__(self, *, header_block: int, expect_preface: bool, count_streams: bool) -> None:
        self._limits = _Limits(header_block, count_streams)
        self._buf = bytearray()
        self._preface_left = len(_PREFACE) if expect_preface else 0
        self._block_stream = 0  # the stream of a header block still waiting for END_HEADERS
        self._block_bytes = 0
        self._block_frames = 0
        self._empty_run = 0
        self._highest_stream = 0
        self._settings = self._pings = self._priorities = self._window_updates = 0
        self._resets = 0
        #: streams opened on this connection (by the peer, or credited by the relay)
        self.streams = 0
        #: HEADERS and DATA frames sent to this peer (credited by the relay)
        self.frames_sent = 0
        self.data_frames_sent = 0
        self.total_bytes = 0
        self.payload_bytes = 0

    def feed(self, data: bytes) -> list[bytes | GoAway]:
        self._buf += data
        buf = self._buf
        out: list[bytes | GoAway] = []
        pos = keep = 0
        if self._preface_left:
            n = min(self._preface_left, len(buf))
            self._preface_left -= n
            pos = n  # h2 checks the preface's bytes
        while len(buf) - pos >= 9:
            length = int.from_bytes(buf[pos : pos + 3], "big")
            ftype, flags = buf[pos + 3], buf[pos + 4]
            stream_id = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            if length > MAX_FRAME_SIZE:
                raise PeerError(
                    ErrorCodes.FRAME_SIZE_ERROR,
                    f"a frame of {length} bytes, over the {MAX_FRAME_SIZE} we allow",
                )
            self._check_block(ftype, flags, stream_id, length)
            end = pos + 9 + length
            if len(buf) < end:
                break
            self._count(ftype, flags, stream_id, length)
            if ftype == _GOAWAY:
                if keep < pos:
                    out.append(bytes(buf[keep:pos]))
                out.append(self._goaway(stream_id, bytes(buf[pos + 9 : end])))
                keep = end
            pos = end
        if keep < pos:
            out.append(bytes(buf[keep:pos]))
        del buf[:pos]
        return out

    def _check_block(self, ftype: int, flags: int, stream_id: int, length: int) -> None:
        """Header-block bounds, decided from the frame header alone (before its payload)."""
        if self._block_stream:
            if ftype != _CONTINUATION or stream_id != self._block_stream:
                raise PeerError(
                    ErrorCodes.PROTOCOL_ERROR,
                    "a frame other than CONTINUATION inside a header block",
                )
            frames, size = self._block_frames + 1, self._block_bytes + length
        elif ftype in (_HEADERS, _PUSH_PROMISE):
            frames, size = 0, length
        else:
            return
        if frames > MAX_CONTINUATION_FRAMES:
            raise PeerError(
                ErrorCodes.ENHANCE_YOUR_CALM,
                f"more than {MAX_CONTINUATION_FRAMES} CONTINUATION frames in one header block",
            )
        if size > self._limits.header_block:
            raise PeerError(
                ErrorCodes.ENHANCE_YOUR_CALM,
                f"a header block over {self._limits.header_block} bytes",
            )

    def _count(self, ftype: int, flags: int, stream_id: int, length: int) -> None:
        self.total_bytes += 9 + length
        if ftype in (_DATA, _HEADERS, _CONTINUATION):
            self.payload_bytes += length
            if length == 0 and not (ftype != _CONTINUATION and flags & _END_STREAM):
                self._empty_run += 1
                if self._empty_run > MAX_CONSECUTIVE_EMPTY_FRAMES:
                    raise PeerError(ErrorCodes.ENHANCE_YOUR_CALM, "a run of empty frames")
            else:
                self._empty_run = 0
        if ftype in (_HEADERS, _PUSH_PROMISE):
            if not flags & _END_HEADERS:
                self._block_stream, self._block_frames, self._block_bytes = stream_id, 0, length
            if (
                ftype == _HEADERS
                and self._limits.count_streams
                and stream_id > self._highest_stream
            ):
                self._highest_stream = stream_id
                self.streams += 1
        elif ftype == _CONTINUATION and self._block_stream:
            self._block_frames += 1
            self._block_bytes += length
            if flags & _END_HEADERS:
                self._block_stream = 0
        elif ftype == _SETTINGS and not flags & _ACK:
            self._settings += 1
            if self._settings > SETTINGS_ALLOWANCE + self.streams:
                raise PeerError(ErrorCodes.ENHANCE_YOUR_CALM, "a SETTINGS flood")
        elif ftype == _PING and not flags & _ACK:
            self._pings += 1
            if self._pings > PING_ALLOWANCE + self.frames_sent:
                raise PeerError(ErrorCodes.ENHANCE_YOUR_CALM, "a PING flood")
        elif ftype == _PRIORITY:
            self._priorities += 1
            if self._priorities > PRIORITY_FRAMES_PER_STREAM * (1 + self.streams):
                raise PeerError(ErrorCodes.ENHANCE_YOUR_CALM, "a PRIORITY flood")
        elif ftype == _WINDOW_UPDATE:
            self._window_updates += 1
            allowed = 5 + 2 * (self.streams + WINDOW_UPDATES_PER_DATA_FRAME * self.data_frames_sent)
            if self._window_updates > allowed:
                raise PeerError(ErrorCodes.ENHANCE_YOUR_CALM, "a WINDOW_UPDATE flood")
        elif ftype == _RST_STREAM:
            self._resets += 1
            if self._resets > RESET_ALLOWANCE + self.streams:
                raise PeerError(ErrorCodes.ENHANCE_YOUR_CALM, "an RST_STREAM flood")
        if self.total_bytes // FLOOD_OVERHEAD_RATIO > self.payload_bytes + FLOOD_OVERHEAD_SLACK:
            raise PeerError(
                ErrorCodes.ENHANCE_YOUR_CALM, "a flood of frames that carry no request or data"
            )

    @staticmethod
    def _goaway(stream_id: int, payload: bytes) -> GoAway:
        if stream_id != 0:
            raise PeerError(ErrorCodes.PROTOCOL_ERROR, "a GOAWAY on a stream")
        if len(payload) < 8:
            raise PeerError(ErrorCodes.FRAME_SIZE_ERROR, "a GOAWAY shorter than 8 bytes")
        last, code = _GOAWAY_BODY.unpack_from(payload)
        debug = payload[8 : 8 + _GOAWAY_DEBUG_SHOWN].decode("ascii", "replace")
        debug = "".join(c if c.isprintable() else "?" for c in debug)
        return GoAway(last & 0x7FFFFFFF, code, debug)


def _goaway_frame(last_stream_id: int, error_code: int, debug: bytes = b"") -> bytes:
    payload = _GOAWAY_BODY.pack(last_stream_id, int(error_code)) + debug
    return len(payload).to_bytes(3, "big") + bytes((_GOAWAY, 0)) + b"\0\0\0\0" + payload


# -- output ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RelayOutput:
    """What one call produced. Write both byte strings before reading more from either peer."""

    to_guest: bytes = b""
    to_upstream: bytes = b""
    violations: tuple[Violation, ...] = ()
    passed: tuple[PlaceholderPassed, ...] = ()
    #: None while the connection lives; else one sentence why it ended (write, then close).
    close: str | None = None


Headers = list[tuple[bytes, bytes]]


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for n, v in headers:
        if n == name:
            return bytes(v)
    return None


def _without(headers: Iterable[tuple[bytes, bytes]], *names: bytes) -> Headers:
    return [h for h in headers if h[0] not in names]


def _h2(client_side: bool, header_list: int) -> h2.connection.H2Connection:
    """An h2 connection with our settings in force from the first byte (no second SETTINGS)."""
    config = h2.config.H2Configuration(
        client_side=client_side, header_encoding=None, validate_inbound_headers=True
    )
    conn = h2.connection.H2Connection(config=config)
    codes = h2.settings.SettingCodes
    values = {
        codes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        codes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
        codes.MAX_HEADER_LIST_SIZE: header_list,
        codes.ENABLE_PUSH: 0,
    }
    if not client_side:
        values[codes.MAX_CONCURRENT_STREAMS] = MAX_CONCURRENT_STREAMS
    conn.local_settings = h2.settings.Settings(client=client_side, initial_values=values)
    conn.decoder.max_header_list_size = header_list
    conn.initiate_connection()
    conn.increment_flow_control_window(CONNECTION_WINDOW - 65_535)
    return conn


def _pairs_of(masker: EchoMasker) -> tuple[tuple[bytes, bytes], ...]:
    """The (real, shown) pairs of a masker, to build one per stream without recomputing them
    (``SecretTable.masker_for`` derives every encoding of every value: ~10 us per call)."""
    return tuple(masker._pairs.items())


def _cap_encoder_table(conn: h2.connection.H2Connection) -> None:
    """Keep the encoder's dynamic table within :data:`MAX_ENCODER_TABLE_SIZE` (h2 takes the
    peer's SETTINGS_HEADER_TABLE_SIZE as it comes); the next block tells the peer."""
    encoder = conn.encoder
    if encoder.header_table_size > MAX_ENCODER_TABLE_SIZE:
        encoder.header_table_size = MAX_ENCODER_TABLE_SIZE
        # Never signal the peer's huge size: only sizes we will really use.
        encoder.table_size_changes = [
            v for v in encoder.table_size_changes if v <= MAX_ENCODER_TABLE_SIZE
        ]


# -- per-stream state -----------------------------------------------------------------------
class _Chunk:
    """Bytes waiting for the other side's flow-control window; ``ack`` is returned once sent."""

    __slots__ = ("ack", "data")

    def __init__(self, data: bytes, ack: int) -> None:
        self.data = data
        self.ack = ack


class _Stream:
    """One guest stream and the upstream stream it maps to."""

    __slots__ = (
        "gid",
        "head_request",
        "hold",
        "mask_body",
        "masker",
        "req_detector",
        "req_done",
        "req_ended",
        "req_headers",
        "req_queue",
        "req_trailers",
        "resp_done",
        "resp_ended",
        "resp_queue",
        "resp_started",
        "resp_trailers",
        "scope",
        "uid",
        "used",
    )

    def __init__(self, gid: int, scope: RequestScope | None, masker: EchoMasker) -> None:
        self.gid = gid
        self.uid: int | None = None
        self.scope = scope
        self.head_request = False
        self.used: frozenset[str] = frozenset()  # secrets substituted into this request
        self.req_headers: Headers | None = None  # held until the upstream stream opens
        self.req_queue: deque[_Chunk] = deque()
        self.req_ended = False  # the guest ended its side
        self.req_trailers: Headers | None = None
        self.req_done = False  # END_STREAM sent upstream
        self.req_detector: PlaceholderDetector | None = None
        self.hold: bytearray | None = None  # a body held for substitution
        self.masker = masker
        self.mask_body = False
        self.resp_started = False  # final response headers sent to the guest
        self.resp_queue: deque[_Chunk] = deque()
        self.resp_ended = False
        self.resp_trailers: Headers | None = None
        self.resp_done = False


@dataclass
class _Step:
    violations: list[Violation]
    passed: list[PlaceholderPassed]


# -- the relay ------------------------------------------------------------------------------
class Http2Relay:
    """One intercepted HTTP/2 connection: guest bytes in, upstream bytes out, and back.

    ``sni`` is the name the guest's ClientHello carried (None for cleartext h2: then no
    secret is ever injectable and ``:authority`` is not compared); ``pinned`` says whether
    the upstream address was returned for that name by the sandbox's own DNS.
    """

    def __init__(
        self,
        table: SecretTable,
        *,
        sni: str | None,
        pinned: bool,
        deny_format: str | None = None,
    ) -> None:
        self._table = table
        self._sni = sni
        self._sni_host = normalize_host(sni)
        self._pinned = pinned
        self._deny_format = deny_format
        # The value/placeholder pairs responses from here are masked with, worked out once
        # (values go only where SNI and pin agree, as in http1_rewriter); each stream gets a
        # masker of its own, since a masker holds a body's partial tail.
        self._mask_pairs = (
            _pairs_of(table.masker_for(self._sni_host))
            if table and self._sni_host and pinned
            else ()
        )
        self._guest = _h2(False, MAX_REQUEST_HEADER_LIST)
        self._up = _h2(True, MAX_RESPONSE_HEADER_LIST)
        self._guest_guard = FrameGuard(
            header_block=MAX_REQUEST_HEADER_BLOCK, expect_preface=True, count_streams=True
        )
        self._up_guard = FrameGuard(
            header_block=MAX_RESPONSE_HEADER_BLOCK, expect_preface=False, count_streams=False
        )
        self._streams: dict[int, _Stream] = {}
        self._by_uid: dict[int, _Stream] = {}
        self._waiting: deque[_Stream] = deque()  # streams waiting for upstream capacity
        self._to_guest = bytearray()
        self._to_up = bytearray()
        self._close: str | None = None
        self._premature_budget = PREMATURE_RESET_ALLOWANCE
        self._guest_last_id = 0  # highest guest stream seen
        self._goaway_sent_last: int | None = None  # our GOAWAY toward the guest, if sent
        self._up_goaway: GoAway | None = None
        self._guest_goaway: GoAway | None = None
        self._started = False

    # -- public ---------------------------------------------------------------------------
    def start(self) -> RelayOutput:
        """Our connection preface toward both peers (call once, first)."""
        self._started = True
        return self._output(_Step([], []))

    def receive_guest(self, data: bytes) -> RelayOutput:
        step = _Step([], [])
        if self._close is None and data:
            try:
                for part in self._guest_guard.feed(data):
                    if isinstance(part, GoAway):
                        self._on_guest_goaway(part)
                    else:
                        events = self._guest.receive_data(part)
                        _cap_encoder_table(self._guest)
                        self._guest_events(events, step)
                    if self._close is not None:
                        break
            except PeerError as e:
                self._fail_guest(e.error_code, f"the guest sent {e.reason}")
            except h2.exceptions.ProtocolError as e:
                # h2 has queued its own GOAWAY toward the guest.
                self._fail_guest(None, f"the guest broke HTTP/2: {e}")
            self._pump_all()
        return self._output(step)

    def receive_upstream(self, data: bytes) -> RelayOutput:
        step = _Step([], [])
        if self._close is None and data:
            try:
                for part in self._up_guard.feed(data):
                    if isinstance(part, GoAway):
                        self._on_upstream_goaway(part)
                    else:
                        events = self._up.receive_data(part)
                        _cap_encoder_table(self._up)
                        self._upstream_events(events)
                    if self._close is not None:
                        break
            except PeerError as e:
                self._fail_upstream(e.error_code, f"the upstream sent {e.reason}")
            except h2.exceptions.ProtocolError as e:
                self._fail_upstream(None, f"the upstream broke HTTP/2: {e}")
            self._pump_all()
        return self._output(step)

    def guest_closed(self) -> RelayOutput:
        """The guest's socket ended: cancel what is in flight upstream."""
        if self._close is None:
            for st in list(self._streams.values()):
                self._reset_upstream(st, ErrorCodes.CANCEL)
            self._up.close_connection(ErrorCodes.NO_ERROR)
            self._finish("the guest closed the connection")
        return self._output(_Step([], []))

    def upstream_closed(self) -> RelayOutput:
        """The upstream's socket ended: streams still open fail, the guest is told GOAWAY."""
        if self._close is None:
            for st in list(self._streams.values()):
                self._reset_guest(st, ErrorCodes.INTERNAL_ERROR)
            self._flush()
            self._to_guest += _goaway_frame(self._guest_last_id, ErrorCodes.NO_ERROR)
            self._finish("the upstream closed the connection")
        return self._output(_Step([], []))

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def buffered_bytes(self) -> int:
        """Body bytes read from one peer and not yet handed to the other (the memory bound)."""
        total = 0
        for st in self._streams.values():
            total += sum(len(c.data) for c in st.req_queue) + sum(
                len(c.data) for c in st.resp_queue
            )
            total += len(st.hold) if st.hold is not None else 0
        return total

    # -- guest side -----------------------------------------------------------------------
    def _guest_events(self, events: Sequence[object], step: _Step) -> None:
        ev = h2.events
        for event in events:
            if self._close is not None:
                return
            if isinstance(event, ev.RequestReceived):
                self._on_request(event, step)
            elif isinstance(event, ev.DataReceived):
                self._on_request_data(event, step)
            elif isinstance(event, ev.TrailersReceived):
                self._on_request_trailers(event, step)
            elif isinstance(event, ev.StreamEnded):
                self._on_request_end(int(event.stream_id), step)
            elif isinstance(event, ev.StreamReset):
                self._on_guest_reset(int(event.stream_id), int(event.error_code))
            elif isinstance(event, ev.WindowUpdated | ev.RemoteSettingsChanged):
                self._pump_all()

    def _on_request(self, event: object, step: _Step) -> None:
        gid = int(event.stream_id)  # type: ignore[attr-defined]
        headers: Headers = list(event.headers)  # type: ignore[attr-defined]
        ended = event.stream_ended is not None  # type: ignore[attr-defined]
        self._guest_last_id = max(self._guest_last_id, gid)
        if self._goaway_sent_last is not None or self._up_goaway is not None:
            # Past our GOAWAY (or the upstream's): not processed, so the client may retry.
            self._guest_reset_id(gid, ErrorCodes.REFUSED_STREAM)
            return
        authority = _header(headers, b":authority") or _header(headers, b"host")
        scope = (
            self._table.scope(sni=self._sni, pinned=self._pinned, authority=authority)
            if self._table
            else None
        )
        st = _Stream(gid, scope, EchoMasker(self._mask_pairs))
        self._streams[gid] = st
        st.head_request = _header(headers, b":method") == b"HEAD"
        if scope is not None:
            headers, found = self._rewrite_request_headers(st, scope, headers)
            if not self._judge(st, scope, found, step):
                return
        if self._sni_host is not None and normalize_host(authority) != self._sni_host:
            text = f"this connection serves only {self._sni_host}\n".encode()
            self._answer(st, b"421", text, b"text/plain; charset=utf-8")
            return
        if scope is not None and st.used:
            headers = [*_without(headers, b"accept-encoding"), (b"accept-encoding", b"identity")]
        if scope is not None and not ended:
            if scope.wants_body and _fits_hold(headers):
                st.hold = bytearray()
            else:
                st.req_detector = self._table.detector()
        st.req_headers = headers
        st.req_ended = ended
        if st.hold is None:
            self._open_upstream(st)

    def _rewrite_request_headers(
        self, st: _Stream, scope: RequestScope, headers: Headers
    ) -> tuple[Headers, dict[Channel, set[str]]]:
        """Substitute what the scope allows; return the headers and what is still found."""
        out: Headers = []
        used: set[str] = set()
        for field in headers:
            name, value = field
            if name == b":path":
                new, names = scope.substitute_target(value)
            elif name[:1] == b":":
                new, names = value, frozenset()
            else:
                new, names = scope.substitute_header(name, value)
            if names:
                # The value is a credential now: never indexed, so no HPACK table keeps it.
                used |= names
                out.append(NeverIndexedHeaderTuple(name, new))
                if name in _AUTH_HEADERS:
                    _mask_credentials(st.masker, value, new)
            else:
                out.append(field)  # as it came, with its never-indexed flag if it had one
        st.used = frozenset(used)
        found: dict[Channel, set[str]] = {}
        # One search over the whole block (no encoding the detector knows spans a newline);
        # only a hit, rare in real traffic, is attributed field by field.
        joined = [n + b"\n" + v for n, v in out]
        if self._table.find(b"\n".join(joined)):
            for (name, value), text in zip(out, joined, strict=True):
                for secret in self._table.find(text):
                    found.setdefault(_channel(name, value, secret, self._table), set()).add(secret)
        return out, found

    def _judge(
        self, st: _Stream, scope: RequestScope, found: dict[Channel, set[str]], step: _Step
    ) -> bool:
        """Act on placeholders still present; False when the stream was refused."""
        violations: list[Violation] = []
        for channel, names in found.items():
            for verdict in scope.judge(names, channel):
                if isinstance(verdict, Violation):
                    violations.append(verdict)
                else:
                    step.passed.append(verdict)
        if not violations:
            return True
        step.violations.extend(violations)
        worst = most_severe(violations)
        assert worst is not None
        self._reset_upstream(st, ErrorCodes.CANCEL)
        if self._deny_format and not st.resp_started:
            # The readable 403 http1_rewriter gives, on this stream (RST_STREAM otherwise).
            content_type, body = readable_denial(
                scope.host,
                fmt=self._deny_format,
                reason=f"it carries the placeholder of secret {worst.secret} ({worst.reason})",
                how_to_allow=(
                    f"send {worst.secret} only to its allowed hosts, or add {scope.host} to "
                    "the secret's allowed_hosts (or allow_placeholder_for, to pass the "
                    "placeholder unchanged)"
                ),
            )
            self._answer(st, b"403", body, content_type)
        else:
            self._reset_guest(st, VIOLATION_RESET_CODE)
        if worst.action is ViolationAction.BLOCK_AND_TERMINATE:
            # Nothing more leaves: the sandbox is being stopped.
            self._close = f"a secret violation ({worst.describe()}) stops the sandbox"
            for other in list(self._streams.values()):
                if other is not st:
                    self._reset_guest(other, VIOLATION_RESET_CODE)
            self._up.close_connection(ErrorCodes.NO_ERROR)
            self._flush()
            self._to_guest += _goaway_frame(self._guest_last_id, VIOLATION_RESET_CODE)
        return False

    def _on_request_data(self, event: object, step: _Step) -> None:
        gid = int(event.stream_id)  # type: ignore[attr-defined]
        data = bytes(event.data)  # type: ignore[attr-defined]
        flow = int(event.flow_controlled_length)  # type: ignore[attr-defined]
        st = self._streams.get(gid)
        if st is None or st.req_ended:
            self._ack_guest(gid, flow)
            return
        if flow > len(data):
            self._ack_guest(gid, flow - len(data))  # padding: nothing to forward
        if st.hold is not None:
            st.hold += data
            self._ack_guest(gid, len(data))
            if len(st.hold) > MAX_SUBSTITUTED_BODY_BYTES:
                # Too long to substitute in: stream it, scanned like any other body.
                held, st.hold = bytes(st.hold), None
                st.req_detector = self._table.detector()
                if self._scan_body(st, held, step):
                    st.req_queue.append(_Chunk(held, 0))
                    self._open_upstream(st)
            return
        if st.req_detector is not None and not self._scan_body(st, data, step):
            self._ack_guest(gid, len(data))  # refused: its window is returned, not its bytes
            return
        st.req_queue.append(_Chunk(data, len(data)))
        self._pump_request(st)

    def _scan_body(self, st: _Stream, data: bytes, step: _Step) -> bool:
        """Scan body bytes before they are forwarded; False when the stream was refused."""
        assert st.req_detector is not None and st.scope is not None
        before = set(st.req_detector.found)
        found = st.req_detector.feed(data) - before
        if not found:
            return True
        return self._judge(st, st.scope, {Channel.BODY: set(found)}, step)

    def _on_request_trailers(self, event: object, step: _Step) -> None:
        gid = int(event.stream_id)  # type: ignore[attr-defined]
        st = self._streams.get(gid)
        if st is None:
            return
        trailers: Headers = list(event.headers)  # type: ignore[attr-defined]
        if st.scope is not None:
            names = self._table.find(b"\n".join(n + b"\n" + v for n, v in trailers))
            if names and not self._judge(st, st.scope, {Channel.TRAILER: set(names)}, step):
                return
        st.req_trailers = trailers

    def _on_request_end(self, gid: int, step: _Step) -> None:
        st = self._streams.get(gid)
        if st is None or (st.req_ended and st.req_done):
            return
        st.req_ended = True
        if st.req_detector is not None:
            before = set(st.req_detector.found)
            found = st.req_detector.finish() - before
            if found and not self._judge(st, st.scope, {Channel.BODY: set(found)}, step):  # type: ignore[arg-type]
                return
        if st.hold is not None and not self._substitute_held(st, step):
            return
        self._pump_request(st)

    def _substitute_held(self, st: _Stream, step: _Step) -> bool:
        assert st.hold is not None and st.scope is not None and st.req_headers is not None
        body, st.hold = bytes(st.hold), None
        new, names = st.scope.substitute_body(body, _header(st.req_headers, b"content-type"))
        found = self._table.find(new)
        if found and not self._judge(st, st.scope, {Channel.BODY: set(found)}, step):
            return False
        headers = _without(st.req_headers, b"content-length")
        if names:
            st.used |= names
            headers = [*_without(headers, b"accept-encoding"), (b"accept-encoding", b"identity")]
        headers.append((b"content-length", str(len(new)).encode()))
        st.req_headers = headers
        if new:
            st.req_queue.append(_Chunk(new, 0))
        self._open_upstream(st)
        return True

    def _on_guest_reset(self, gid: int, code: int) -> None:
        st = self._streams.get(gid)
        if st is None:
            return
        if not st.resp_started:
            self._premature_budget -= 1
            if self._premature_budget < 0:
                self._fail_guest(
                    ErrorCodes.ENHANCE_YOUR_CALM,
                    "the guest reset too many streams before their responses (rapid reset)",
                )
                return
        self._reset_upstream(st, code)
        self._drop(st)

    def _on_guest_goaway(self, goaway: GoAway) -> None:
        self._guest_goaway = goaway
        if goaway.error_code != ErrorCodes.NO_ERROR:
            for st in list(self._streams.values()):
                self._reset_upstream(st, ErrorCodes.CANCEL)
            self._up.close_connection(ErrorCodes.NO_ERROR)
            self._finish(f"the guest ended the connection with error {goaway.error_code}")
        elif not self._streams:
            self._up.close_connection(ErrorCodes.NO_ERROR)
            self._finish("the guest went away")

    # -- upstream side --------------------------------------------------------------------
    def _open_upstream(self, st: _Stream) -> None:
        if st.uid is not None or st.req_headers is None:
            return
        if self._up_goaway is not None:
            self._reset_guest(st, ErrorCodes.REFUSED_STREAM)
            return
        if self._up.open_outbound_streams >= self._up.remote_settings.max_concurrent_streams:
            if st not in self._waiting:
                self._waiting.append(st)
            return
        uid = int(self._up.get_next_available_stream_id())
        end = st.req_ended and not st.req_queue and st.req_trailers is None
        try:
            self._up.send_headers(uid, st.req_headers, end_stream=end)
        except (h2.exceptions.ProtocolError, ValueError):
            # Headers h2 will not send (validated inbound already, so this is rare).
            self._reset_guest(st, ErrorCodes.INTERNAL_ERROR)
            return
        self._up_guard.streams += 1
        self._up_guard.frames_sent += 1
        st.uid = uid
        st.req_headers = None
        st.req_done = end
        self._by_uid[uid] = st
        self._pump_request(st)

    def _upstream_events(self, events: Sequence[object]) -> None:
        ev = h2.events
        for event in events:
            if self._close is not None:
                return
            uid = getattr(event, "stream_id", 0)
            st = self._by_uid.get(int(uid)) if uid else None
            if isinstance(event, ev.WindowUpdated | ev.RemoteSettingsChanged):
                self._pump_all()
                self._open_waiting()
            elif isinstance(event, ev.InformationalResponseReceived):
                if st is not None:
                    self._send_guest_headers(st, self._mask_headers(st, event.headers), False)
            elif isinstance(event, ev.ResponseReceived):
                if st is not None:
                    self._on_response(st, list(event.headers), event.stream_ended is not None)
            elif isinstance(event, ev.DataReceived):
                self._on_response_data(
                    st, int(uid), bytes(event.data), int(event.flow_controlled_length)
                )
            elif isinstance(event, ev.TrailersReceived):
                if st is not None:
                    st.resp_trailers = self._mask_headers(st, event.headers)
            elif isinstance(event, ev.StreamEnded):
                if st is not None:
                    self._on_response_end(st)
            elif isinstance(event, ev.StreamReset):
                if st is not None:
                    self._reset_guest(st, int(event.error_code))
                self._open_waiting()

    def _on_response(self, st: _Stream, headers: Headers, ended: bool) -> None:
        headers = self._mask_headers(st, headers)
        encoding = (_header(headers, b"content-encoding") or b"identity").strip().lower()
        length = _header(headers, b"content-length")
        has_body = not ended and not st.head_request and length != b"0"
        if st.masker.active and has_body and encoding == b"identity":
            st.mask_body = True
            if st.masker.may_change_length:
                headers = _without(headers, b"content-length")
        st.resp_started = True
        if ended:
            st.resp_ended = st.resp_done = True
        self._send_guest_headers(st, headers, ended)
        if ended and st.gid in self._streams:
            self._premature_budget = min(self._premature_budget + 1, PREMATURE_RESET_ALLOWANCE)
            self._maybe_done(st)

    def _on_response_data(self, st: _Stream | None, uid: int, data: bytes, flow: int) -> None:
        if st is None or st.resp_ended:
            self._ack_upstream(uid, flow)
            return
        if flow > len(data):
            self._ack_upstream(uid, flow - len(data))
        out = st.masker.feed(data) if st.mask_body else data
        st.resp_queue.append(_Chunk(out, len(data)))
        self._pump_response(st)

    def _on_response_end(self, st: _Stream) -> None:
        if st.resp_ended:
            return
        st.resp_ended = True
        if st.mask_body:
            tail = st.masker.flush()
            if tail:
                st.resp_queue.append(_Chunk(tail, 0))
        self._pump_response(st)

    def _mask_headers(self, st: _Stream, headers: Iterable[tuple[bytes, bytes]]) -> Headers:
        if not st.masker.active:
            return list(headers)
        out: Headers = []
        for name, value in headers:
            masked = st.masker.mask(bytes(value))
            out.append(NeverIndexedHeaderTuple(name, masked) if masked != value else (name, value))
        return out

    def _on_upstream_goaway(self, goaway: GoAway) -> None:
        """The upstream will take no new streams; those above ``last_stream_id`` were not seen."""
        self._up_goaway = goaway
        for st in list(self._streams.values()):
            unsent = st.uid is None and not st.resp_started  # held, waiting: never sent
            if unsent or (st.uid is not None and st.uid > goaway.last_stream_id):
                if st.uid is not None:
                    self._by_uid.pop(st.uid, None)
                    st.uid = None
                self._reset_guest(st, ErrorCodes.REFUSED_STREAM)
        self._waiting.clear()
        if self._goaway_sent_last is None:
            self._flush()
            last = max(self._streams, default=self._guest_last_id)
            self._goaway_sent_last = last
            self._to_guest += _goaway_frame(last, ErrorCodes.NO_ERROR)
        self._maybe_finish_draining()

    # -- moving data ----------------------------------------------------------------------
    def _pump_all(self) -> None:
        if self._close is not None:
            return
        for st in list(self._streams.values()):
            if st.req_queue or (st.req_ended and not st.req_done):
                self._pump_request(st)
            if st.resp_queue or (st.resp_ended and not st.resp_done):
                self._pump_response(st)

    def _pump_request(self, st: _Stream) -> None:
        if st.uid is None or st.req_done or self._close is not None:
            return
        up, uid = self._up, st.uid
        try:
            while st.req_queue:
                chunk = st.req_queue[0]
                if chunk.data:
                    window = min(
                        int(up.local_flow_control_window(uid)), int(up.max_outbound_frame_size)
                    )
                    if window <= 0:
                        return
                    n = min(len(chunk.data), window)
                    up.send_data(uid, chunk.data[:n])
                    self._up_guard.frames_sent += 1
                    self._up_guard.data_frames_sent += 1
                    if n < len(chunk.data):
                        chunk.data = chunk.data[n:]
                        continue
                st.req_queue.popleft()
                if chunk.ack:
                    self._ack_guest(st.gid, chunk.ack)
            if st.req_ended and st.hold is None:
                if st.req_trailers is not None:
                    up.send_headers(uid, st.req_trailers, end_stream=True)
                else:
                    up.end_stream(uid)
                st.req_done = True
                self._maybe_done(st)
        except h2.exceptions.NoSuchStreamError:
            # The upstream reset it meanwhile; its StreamReset event resets the guest's.
            st.req_done = True
            self._drain_acks(st.req_queue, st.gid, guest=True)

    def _pump_response(self, st: _Stream) -> None:
        if st.resp_done or self._close is not None or not st.resp_started:
            return
        g, gid = self._guest, st.gid
        try:
            while st.resp_queue:
                chunk = st.resp_queue[0]
                if chunk.data:
                    window = min(
                        int(g.local_flow_control_window(gid)), int(g.max_outbound_frame_size)
                    )
                    if window <= 0:
                        return
                    n = min(len(chunk.data), window)
                    g.send_data(gid, chunk.data[:n])
                    self._guest_guard.frames_sent += 1
                    self._guest_guard.data_frames_sent += 1
                    if n < len(chunk.data):
                        chunk.data = chunk.data[n:]
                        continue
                st.resp_queue.popleft()
                if chunk.ack and st.uid is not None:
                    self._ack_upstream(st.uid, chunk.ack)
            if st.resp_ended:
                if st.resp_trailers is not None:
                    g.send_headers(gid, st.resp_trailers, end_stream=True)
                else:
                    g.end_stream(gid)
                st.resp_done = True
                self._premature_budget = min(self._premature_budget + 1, PREMATURE_RESET_ALLOWANCE)
                self._maybe_done(st)
        except h2.exceptions.NoSuchStreamError:
            self._reset_upstream(st, ErrorCodes.CANCEL)
            self._drop(st)

    def _send_guest_headers(self, st: _Stream, headers: Headers, end: bool) -> None:
        try:
            self._guest.send_headers(st.gid, headers, end_stream=end)
        except h2.exceptions.NoSuchStreamError:
            self._reset_upstream(st, ErrorCodes.CANCEL)
            self._drop(st)
            return
        except (h2.exceptions.ProtocolError, ValueError):
            # A response h2 will not send to the guest (it validated it inbound already).
            self._reset_guest(st, ErrorCodes.INTERNAL_ERROR)
            return
        self._guest_guard.frames_sent += 1

    def _answer(self, st: _Stream, status: bytes, body: bytes, content_type: bytes) -> None:
        """A response of our own on the guest's stream (the request is not forwarded)."""
        headers = [
            (b":status", status),
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        st.resp_started = True
        st.req_done = True
        self._send_guest_headers(st, headers, False)
        st.resp_queue.append(_Chunk(body, 0))
        st.resp_ended = True
        self._pump_response(st)

    def _open_waiting(self) -> None:
        while self._waiting and self._close is None:
            if self._up.open_outbound_streams >= self._up.remote_settings.max_concurrent_streams:
                return
            st = self._waiting.popleft()
            if st.gid in self._streams:
                self._open_upstream(st)

    def _ack_guest(self, gid: int, n: int) -> None:
        if n > 0:
            self._guest.acknowledge_received_data(n, gid)

    def _ack_upstream(self, uid: int, n: int) -> None:
        if n > 0:
            self._up.acknowledge_received_data(n, uid)

    def _drain_acks(self, queue: deque[_Chunk], stream_id: int, *, guest: bool) -> None:
        """Return the window of bytes that will never be forwarded (the stream is gone)."""
        total = sum(c.ack for c in queue)
        queue.clear()
        if guest:
            self._ack_guest(stream_id, total)
        else:
            self._ack_upstream(stream_id, total)

    # -- ending streams and the connection ------------------------------------------------
    def _reset_guest(self, st: _Stream, code: int) -> None:
        self._guest_reset_id(st.gid, code)
        self._reset_upstream(st, ErrorCodes.CANCEL)
        self._drop(st)

    def _guest_reset_id(self, gid: int, code: int) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):  # already closed there
            self._guest.reset_stream(gid, code)

    def _reset_upstream(self, st: _Stream, code: int) -> None:
        if st.uid is not None and not (st.req_done and st.resp_ended):
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._up.reset_stream(st.uid, code)
        st.req_done = True

    def _drop(self, st: _Stream) -> None:
        """Forget a stream, returning the flow-control credit of what it still held."""
        if self._streams.pop(st.gid, None) is None:
            return
        self._drain_acks(st.req_queue, st.gid, guest=True)
        if st.hold:
            st.hold = None
        if st.uid is not None:
            self._by_uid.pop(st.uid, None)
            self._drain_acks(st.resp_queue, st.uid, guest=False)
        st.resp_queue.clear()
        if st in self._waiting:
            self._waiting.remove(st)
        self._open_waiting()
        self._maybe_finish_draining()

    def _maybe_done(self, st: _Stream) -> None:
        if st.req_done and st.resp_done:
            self._drop(st)

    def _maybe_finish_draining(self) -> None:
        if self._close is not None or self._streams:
            return
        if self._up_goaway is not None:
            self._up.close_connection(ErrorCodes.NO_ERROR)
            self._finish(
                f"the upstream went away (GOAWAY {self._up_goaway.error_code}"
                + (f": {self._up_goaway.debug}" if self._up_goaway.debug else "")
                + ")"
            )
        elif self._guest_goaway is not None:
            self._up.close_connection(ErrorCodes.NO_ERROR)
            self._finish("the guest went away")

    def _fail_guest(self, code: int | None, reason: str) -> None:
        for st in list(self._streams.values()):
            self._reset_upstream(st, ErrorCodes.CANCEL)
        if code is not None:
            self._guest.close_connection(code, additional_data=reason.encode()[:200])
        self._up.close_connection(ErrorCodes.NO_ERROR)
        self._finish(reason)

    def _fail_upstream(self, code: int | None, reason: str) -> None:
        if code is not None:
            self._up.close_connection(code, additional_data=reason.encode()[:200])
        for st in list(self._streams.values()):
            self._guest_reset_id(st.gid, ErrorCodes.INTERNAL_ERROR)
        self._streams.clear()
        self._flush()
        self._to_guest += _goaway_frame(self._guest_last_id, ErrorCodes.NO_ERROR)
        self._finish(reason)

    def _finish(self, reason: str) -> None:
        if self._close is None:
            self._flush()
            self._close = reason

    def _flush(self) -> None:
        self._to_guest += self._guest.data_to_send()
        self._to_up += self._up.data_to_send()

    def _output(self, step: _Step) -> RelayOutput:
        if not self._started:
            raise RuntimeError("Http2Relay.start() must be called first")
        self._flush()
        out = RelayOutput(
            bytes(self._to_guest),
            bytes(self._to_up),
            tuple(step.violations),
            tuple(step.passed),
            self._close,
        )
        self._to_guest.clear()
        self._to_up.clear()
        return out


def _fits_hold(headers: Headers) -> bool:
    """Whether a body may be held for substitution: no length given, or a small one."""
    length = _header(headers, b"content-length")
    if length is None:
        return True
    return length.isdigit() and int(length) <= MAX_SUBSTITUTED_BODY_BYTES


_AUTH_HEADERS = (b"authorization", b"proxy-authorization")


def _channel(name: bytes, value: bytes, secret: str, table: SecretTable) -> Channel:
    """Where in a request field a placeholder sits, for the audit event."""
    if name == b":path":
        return Channel.TARGET
    if name in _AUTH_HEADERS:
        parts = value.split()
        if len(parts) == 2 and parts[0].lower() == b"basic":
            creds = decode_basic(parts[1])
            if creds is not None and secret in table.find(creds):
                return Channel.BASIC_AUTH
    return Channel.HEADER


def _mask_credentials(masker: EchoMasker, old: bytes, new: bytes) -> None:
    """An echo of the exact credentials corral produced is shown to the guest as it sent them."""
    masker.add_pair(new, old)
    old_parts, new_parts = old.split(), new.split()
    if len(old_parts) == len(new_parts) == 2 and old_parts[1] != new_parts[1]:
        masker.add_pair(new_parts[1], old_parts[1])


# -- readable denials -----------------------------------------------------------------------
def readable_denial(
    host: str, *, fmt: str = "text", reason: str, how_to_allow: str | None = None
) -> tuple[bytes, bytes]:
    """(content type, body) of the readable 403 (SPEC "Readable denials"), word for word the
    one ``http1_rewriter.deny_response`` writes, so an agent reads the same over both."""
    raw = deny_response(host, fmt=fmt, reason=reason, how_to_allow=how_to_allow)
    head, _, body = raw.partition(b"\r\n\r\n")
    content_type = b"text/plain; charset=utf-8"
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-type":
            content_type = value.strip()
    return content_type, body


class Http2DenialResponder:
    """Answers every request on an HTTP/2 connection with one response (``deny_response``).

    For an intercepted connection that policy refused: the guest's TLS was terminated so that
    an agent reads why (SPEC "Readable denials") instead of a reset. Request bodies are read
    and dropped; nothing goes anywhere. Bounded like the relay's guest side.
    """

    def __init__(
        self,
        body: bytes,
        *,
        content_type: bytes = b"text/plain; charset=utf-8",
        status: bytes = b"403",
    ) -> None:
        self._body = body
        self._headers = [
            (b":status", status),
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
        ]
        self._conn = _h2(False, MAX_REQUEST_HEADER_LIST)
        self._guard = FrameGuard(
            header_block=MAX_REQUEST_HEADER_BLOCK, expect_preface=True, count_streams=True
        )
        self._pending: dict[int, int] = {}  # stream -> offset of the body still to send
        self._close: str | None = None

    @classmethod
    def readable(
        cls, host: str, *, fmt: str = "text", reason: str, how_to_allow: str | None = None
    ) -> Http2DenialResponder:
        """The 403 of ``NetworkConfig.deny_response`` (``fmt`` "text" or "json") for ``host``."""
        content_type, body = readable_denial(
            host, fmt=fmt, reason=reason, how_to_allow=how_to_allow
        )
        return cls(body, content_type=content_type)

    def start(self) -> RelayOutput:
        return RelayOutput(to_guest=self._conn.data_to_send())

    def receive_guest(self, data: bytes) -> RelayOutput:
        if self._close is None and data:
            try:
                for part in self._guard.feed(data):
                    if isinstance(part, GoAway):
                        self._close = "the guest went away"
                        break
                    events = self._conn.receive_data(part)
                    _cap_encoder_table(self._conn)
                    for event in events:
                        self._on_event(event)
            except PeerError as e:
                self._conn.close_connection(e.error_code, additional_data=e.reason.encode()[:200])
                self._close = f"the guest sent {e.reason}"
            except h2.exceptions.ProtocolError as e:
                self._close = f"the guest broke HTTP/2: {e}"
            self._pump()
        return RelayOutput(to_guest=self._conn.data_to_send(), close=self._close)

    def guest_closed(self) -> RelayOutput:
        self._close = self._close or "the guest closed the connection"
        return RelayOutput(close=self._close)

    def _on_event(self, event: object) -> None:
        ev = h2.events
        if isinstance(event, ev.RequestReceived):
            sid = int(event.stream_id)
            self._conn.send_headers(sid, self._headers, end_stream=not self._body)
            self._guard.frames_sent += 1
            if self._body:
                self._pending[sid] = 0
        elif isinstance(event, ev.DataReceived):
            self._conn.acknowledge_received_data(
                int(event.flow_controlled_length), int(event.stream_id)
            )
        elif isinstance(event, ev.StreamReset):
            self._pending.pop(int(event.stream_id), None)

    def _pump(self) -> None:
        if self._close is not None:
            return
        for sid, offset in list(self._pending.items()):
            try:
                while offset < len(self._body):
                    window = min(
                        int(self._conn.local_flow_control_window(sid)),
                        int(self._conn.max_outbound_frame_size),
                    )
                    if window <= 0:
                        break
                    piece = self._body[offset : offset + window]
                    offset += len(piece)
                    self._conn.send_data(sid, piece, end_stream=offset >= len(self._body))
                    self._guard.frames_sent += 1
            except h2.exceptions.ProtocolError:
                offset = len(self._body)
            if offset >= len(self._body):
                del self._pending[sid]
            else:
                self._pending[sid] = offset
