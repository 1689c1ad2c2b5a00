"""Http2Relay between a real h2 client (the guest) and a real h2 server (the upstream).

Both peers are h2 state machines of their own, so what crosses the relay is checked by a
second, independent decoder: HPACK and flow control are exercised for real, and what the
upstream "received" is what a server would have decoded, not the relay's own view.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from corral.config import SecretEntry, ViolationAction
from corral.net import http2_rewriter as hr
from corral.net.http2_rewriter import Http2DenialResponder, Http2Relay, RelayOutput
from corral.net.secrets import Channel, SecretTable
from tests.support import secret_cases as sc

E = h2.errors.ErrorCodes
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


# -- the two peers --------------------------------------------------------------------------
@dataclass
class Message:
    """One request (as the upstream saw it) or one response (as the guest saw it)."""

    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    informational: list[list[tuple[bytes, bytes]]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[bytes, bytes]] | None = None
    ended: bool = False
    reset: int | None = None
    data_events: int = 0

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return bytes(v)
        return None

    def rendered(self) -> bytes:
        """Every decoded byte, for searching: header lines, body, trailer lines."""
        lines = [n + b": " + v for n, v in self.headers]
        lines += [n + b": " + v for n, v in self.trailers or ()]
        return b"\r\n".join(lines) + b"\r\n\r\n" + bytes(self.body)


class Peer:
    """An h2 endpoint that sends bodies under flow control and records what it receives."""

    def __init__(self, client_side: bool, settings: dict[int, int] | None = None) -> None:
        config = h2.config.H2Configuration(client_side=client_side, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        if settings:
            self.conn.local_settings = h2.settings.Settings(
                client=client_side, initial_values=settings
            )
        self.conn.initiate_connection()
        self.messages: dict[int, Message] = {}
        self.outbox: dict[int, tuple[bytearray, bool, list[tuple[bytes, bytes]] | None]] = {}
        self.auto_ack = True
        self.unacked: list[tuple[int, int]] = []
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.pings: list[bytes] = []
        self.settings_acks = 0

    def msg(self, sid: int) -> Message:
        return self.messages.setdefault(sid, Message())

    def send_body(
        self,
        sid: int,
        body: bytes,
        end: bool = True,
        trailers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        buf, _, _ = self.outbox.get(sid, (bytearray(), False, None))
        buf += body
        self.outbox[sid] = (buf, end, trailers)
        self.flush()

    def flush(self) -> None:
        for sid, (buf, end, trailers) in list(self.outbox.items()):
            try:
                while buf:
                    n = min(
                        len(buf),
                        self.conn.local_flow_control_window(sid),
                        self.conn.max_outbound_frame_size,
                    )
                    if n <= 0:
                        break
                    self.conn.send_data(sid, bytes(buf[:n]))
                    del buf[:n]
                if not buf and end:
                    if trailers is not None:
                        self.conn.send_headers(sid, trailers, end_stream=True)
                    else:
                        self.conn.end_stream(sid)
                    del self.outbox[sid]
                elif not buf:
                    del self.outbox[sid]
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                del self.outbox[sid]

    def ack_all(self) -> None:
        for n, sid in self.unacked:
            self.conn.acknowledge_received_data(n, sid)
        self.unacked.clear()

    def receive(self, data: bytes) -> None:
        for e in self.conn.receive_data(data):
            self.on_event(e)
        self.flush()

    def on_event(self, e: object) -> None:
        ev = h2.events
        if isinstance(e, ev.RequestReceived | ev.ResponseReceived):
            self.msg(e.stream_id).headers = list(e.headers)
        elif isinstance(e, ev.InformationalResponseReceived):
            self.msg(e.stream_id).informational.append(list(e.headers))
        elif isinstance(e, ev.DataReceived):
            m = self.msg(e.stream_id)
            m.body += e.data
            m.data_events += 1
            if self.auto_ack:
                self.conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            else:
                self.unacked.append((e.flow_controlled_length, e.stream_id))
        elif isinstance(e, ev.TrailersReceived):
            self.msg(e.stream_id).trailers = list(e.headers)
        elif isinstance(e, ev.StreamEnded):
            self.msg(e.stream_id).ended = True
            self.on_end(e.stream_id)
        elif isinstance(e, ev.StreamReset):
            self.msg(e.stream_id).reset = e.error_code
        elif isinstance(e, ev.ConnectionTerminated):
            self.goaway = e
            if e.error_code == E.NO_ERROR:
                # h2 stops on any GOAWAY (python-hyper/h2#1181); real clients (curl, Go)
                # finish the streams a graceful GOAWAY kept, so this peer does too.
                self.conn.state_machine.state = (
                    h2.connection.ConnectionState.CLIENT_OPEN
                    if self.conn.config.client_side
                    else h2.connection.ConnectionState.SERVER_OPEN
                )
        elif isinstance(e, ev.PingAckReceived):
            self.pings.append(e.ping_data)
        elif isinstance(e, ev.SettingsAcknowledged):
            self.settings_acks += 1

    def on_end(self, sid: int) -> None:
        pass


Handler = Callable[["Upstream", int, Message], None]


def answer_ok(up: Upstream, sid: int, req: Message) -> None:
    up.conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"text/plain")])
    up.send_body(sid, b"ok")


def answer_echo(up: Upstream, sid: int, req: Message) -> None:
    """An echo endpoint: the request's headers and body come back in the response."""
    echoed = [(b"x-echo-" + n.lstrip(b":"), v) for n, v in req.headers]
    body = req.rendered()
    up.conn.send_headers(
        sid,
        [(b":status", b"200"), (b"content-length", str(len(body)).encode()), *echoed],
    )
    up.send_body(sid, body)


class Upstream(Peer):
    def __init__(self, handler: Handler | None = answer_ok, **kw: object) -> None:
        super().__init__(False, **kw)  # type: ignore[arg-type]
        self.handler = handler

    def on_end(self, sid: int) -> None:
        if self.handler is not None:
            self.handler(self, sid, self.messages[sid])


class Guest(Peer):
    def __init__(self, **kw: object) -> None:
        super().__init__(True, **kw)  # type: ignore[arg-type]

    def request(
        self,
        path: bytes = b"/",
        *,
        method: bytes = b"GET",
        authority: bytes = b"api.github.com",
        headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes | None = None,
        trailers: list[tuple[bytes, bytes]] | None = None,
        end: bool = True,
    ) -> int:
        sid = self.conn.get_next_available_stream_id()
        block = [
            (b":method", method),
            (b":scheme", b"https"),
            (b":authority", authority),
            (b":path", path),
            *(headers or []),
        ]
        no_body = body is None and trailers is None and end
        self.conn.send_headers(sid, block, end_stream=no_body)
        if not no_body:
            self.send_body(sid, body or b"", end=end, trailers=trailers)
        return sid


class World:
    """A guest, the relay, an upstream; :meth:`pump` moves bytes until nothing moves."""

    def __init__(
        self,
        table: SecretTable | None = None,
        *,
        sni: str | None = "api.github.com",
        pinned: bool = True,
        handler: Handler | None = answer_ok,
        upstream_settings: dict[int, int] | None = None,
        raw_guest: bool = False,
    ) -> None:
        self.relay = Http2Relay(table or SecretTable([]), sni=sni, pinned=pinned)
        self.guest = Guest()
        self.up = Upstream(handler, settings=upstream_settings)
        self.to_guest = bytearray()
        self.to_up = bytearray()
        self.violations: list[object] = []
        self.passed: list[object] = []
        self.close: str | None = None
        self.guest_raw = bytearray()  # every byte the relay sent the guest
        self.up_raw = bytearray()
        self.max_buffered = 0
        #: the test writes the guest's bytes itself: what the relay sends it is kept, undecoded
        self.raw_guest = raw_guest
        self.take(self.relay.start())

    def take(self, out: RelayOutput) -> None:
        self.to_guest += out.to_guest
        self.to_up += out.to_upstream
        self.guest_raw += out.to_guest
        self.up_raw += out.to_upstream
        self.violations += out.violations
        self.passed += out.passed
        if out.close is not None:
            self.close = out.close
        self.max_buffered = max(self.max_buffered, self.relay.buffered_bytes)

    def feed_guest(self, data: bytes) -> None:
        self.take(self.relay.receive_guest(data))

    def pump(self, rounds: int = 100_000) -> None:
        for _ in range(rounds):
            moved = False
            data = b"" if self.raw_guest else self.guest.conn.data_to_send()
            if data:
                moved = True
                self.take(self.relay.receive_guest(data))
            data = self.up.conn.data_to_send()
            if data:
                moved = True
                self.take(self.relay.receive_upstream(data))
            if self.to_guest and not self.raw_guest:
                moved = True
                data, self.to_guest = bytes(self.to_guest), bytearray()
                self.guest.receive(data)
            if self.to_up:
                moved = True
                data, self.to_up = bytes(self.to_up), bytearray()
                self.up.receive(data)
            if not moved:
                return
        raise AssertionError("the relay never went quiet")


@dataclass
class RawFrame:
    """A frame of any type, written by hand (an extension type h2 ignores)."""

    type: int
    stream_id: int
    payload: bytes
    flags: int = 0

    def serialize(self) -> bytes:
        return (
            len(self.payload).to_bytes(3, "big")
            + bytes((self.type, self.flags))
            + self.stream_id.to_bytes(4, "big")
            + self.payload
        )


def frames(*fs: object) -> bytes:
    return b"".join(f.serialize() for f in fs)  # type: ignore[attr-defined]


def client_bytes(*fs: object) -> bytes:
    """A guest's first flight: preface, empty SETTINGS, then the frames."""
    return PREFACE + frames(SettingsFrame(0), *fs)


def block(headers: list[tuple[bytes, bytes]], encoder: Encoder | None = None) -> bytes:
    return (encoder or Encoder()).encode(headers)


REQ = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":authority", b"api.github.com"),
    (b":path", b"/"),
]


def goaway_code(data: bytes) -> int | None:
    """The error code of the last GOAWAY in a byte stream from the relay (frames only)."""
    pos, code = 0, None
    if data.startswith(PREFACE):
        pos = len(PREFACE)
    while len(data) - pos >= 9:
        length = int.from_bytes(data[pos : pos + 3], "big")
        if data[pos + 3] == 0x7:
            code = int.from_bytes(data[pos + 13 : pos + 17], "big")
        pos += 9 + length
    return code


# -- plain relaying -------------------------------------------------------------------------
def test_request_and_response_cross_with_headers_body_and_trailers() -> None:
    def grpc_like(up: Upstream, sid: int, req: Message) -> None:
        up.conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        up.send_body(sid, b"\0\0\0\0\x05hello", trailers=[(b"grpc-status", b"0")])

    w = World(handler=grpc_like)
    sid = w.guest.request(
        b"/pkg.Svc/Call",
        method=b"POST",
        headers=[(b"content-type", b"application/grpc"), (b"te", b"trailers")],
        body=b"\0\0\0\0\x03abc",
        trailers=[(b"x-req-trailer", b"1")],
    )
    w.pump()
    (req,) = w.up.messages.values()
    assert req.header(b":path") == b"/pkg.Svc/Call" and req.header(b"te") == b"trailers"
    assert bytes(req.body) == b"\0\0\0\0\x03abc" and req.ended
    assert req.trailers == [(b"x-req-trailer", b"1")]
    resp = w.guest.messages[sid]
    assert resp.header(b":status") == b"200"
    assert bytes(resp.body) == b"\0\0\0\0\x05hello"
    assert resp.trailers == [(b"grpc-status", b"0")] and resp.ended
    assert w.relay.open_streams == 0 and w.close is None


def test_informational_responses_are_carried() -> None:
    def continue_first(up: Upstream, sid: int, req: Message) -> None:
        up.conn.send_headers(sid, [(b":status", b"103"), (b"link", b"</a.css>; rel=preload")])
        answer_ok(up, sid, req)

    w = World(handler=continue_first)
    sid = w.guest.request()
    w.pump()
    assert w.guest.messages[sid].informational == [
        [(b":status", b"103"), (b"link", b"</a.css>; rel=preload")]
    ]
    assert w.guest.messages[sid].header(b":status") == b"200"


def test_many_streams_interleave_and_all_finish() -> None:
    w = World(handler=answer_echo)
    sids = [w.guest.request(f"/{i}".encode()) for i in range(50)]
    w.pump()
    for i, sid in enumerate(sids):
        assert w.guest.messages[sid].header(b"x-echo-path") == f"/{i}".encode()
        assert w.guest.messages[sid].ended
    assert w.relay.open_streams == 0


def test_upstream_concurrency_below_the_guests_queues_streams() -> None:
    w = World(upstream_settings={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 2})
    w.pump()  # settings exchanged first
    sids = [w.guest.request(f"/{i}".encode()) for i in range(9)]
    w.pump()
    assert all(w.guest.messages[s].ended and w.guest.messages[s].reset is None for s in sids)
    assert len(w.up.messages) == 9


def test_large_upload_flows_through_bounded_buffers_when_the_upstream_is_slow() -> None:
    w = World()
    w.up.auto_ack = False
    body = bytes(range(256)) * (16 * 1024)  # 4 MiB
    sid = w.guest.request(b"/upload", method=b"POST", body=body)
    w.pump()
    # The upstream reads nothing: what the relay holds is bounded by its windows.
    assert w.relay.buffered_bytes <= hr.CONNECTION_WINDOW
    received_before = len(w.up.messages[1].body)
    assert received_before < len(body)
    for _ in range(1000):
        w.up.ack_all()
        w.pump()
        if w.up.messages[1].ended:
            break
    assert bytes(w.up.messages[1].body) == body
    assert w.guest.messages[sid].ended
    assert w.max_buffered <= hr.CONNECTION_WINDOW


def test_large_download_streams_to_a_slow_guest_within_the_windows() -> None:
    body = bytes(range(256)) * (24 * 1024)  # 6 MiB

    def big(up: Upstream, sid: int, req: Message) -> None:
        up.conn.send_headers(
            sid, [(b":status", b"200"), (b"content-length", str(len(body)).encode())]
        )
        up.send_body(sid, body)

    w = World(handler=big)
    w.guest.auto_ack = False
    sid = w.guest.request(b"/big")
    w.pump()
    assert w.relay.buffered_bytes <= hr.CONNECTION_WINDOW
    for _ in range(1000):
        w.guest.ack_all()
        w.pump()
        if w.guest.messages[sid].ended:
            break
    assert bytes(w.guest.messages[sid].body) == body
    assert w.guest.messages[sid].header(b"content-length") == str(len(body)).encode()
    assert w.max_buffered <= hr.CONNECTION_WINDOW


def test_a_streaming_response_reaches_the_guest_message_by_message() -> None:
    """gRPC server streaming: each message is relayed as it comes, not at the end."""
    w = World(handler=None)
    sid = w.guest.request(b"/pkg.Svc/Watch", method=b"POST", body=b"\0\0\0\0\0")
    w.pump()
    usid = next(iter(w.up.messages))
    w.up.conn.send_headers(usid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    for i in range(5):
        w.up.send_body(usid, b"\0\0\0\0\x01" + bytes([i]), end=False)
        w.pump()
        assert bytes(w.guest.messages[sid].body).endswith(b"\0\0\0\0\x01" + bytes([i]))
        assert not w.guest.messages[sid].ended
    w.up.send_body(usid, b"", trailers=[(b"grpc-status", b"0")])
    w.pump()
    assert w.guest.messages[sid].trailers == [(b"grpc-status", b"0")]


def test_a_streaming_upload_reaches_the_upstream_piece_by_piece() -> None:
    w = World(handler=None)
    sid = w.guest.request(b"/pkg.Svc/Upload", method=b"POST", body=b"first", end=False)
    w.pump()
    (usid,) = w.up.messages
    assert bytes(w.up.messages[usid].body) == b"first"
    w.guest.send_body(sid, b"second", end=False)
    w.pump()
    assert bytes(w.up.messages[usid].body) == b"firstsecond"
    assert not w.up.messages[usid].ended


def test_resets_cross_in_both_directions() -> None:
    w = World(handler=None)
    a = w.guest.request(b"/a", method=b"POST", body=b"x", end=False)
    b = w.guest.request(b"/b", method=b"POST", body=b"x", end=False)
    w.pump()
    ua, ub = sorted(w.up.messages)
    w.guest.conn.reset_stream(a, E.CANCEL)
    w.pump()
    assert w.up.messages[ua].reset == E.CANCEL
    w.up.conn.reset_stream(ub, E.REFUSED_STREAM)
    w.pump()
    assert w.guest.messages[b].reset == E.REFUSED_STREAM
    assert w.relay.open_streams == 0 and w.close is None


def test_ping_and_settings_are_answered_hop_by_hop() -> None:
    w = World()
    w.pump()
    w.guest.conn.ping(b"12345678")
    w.up.conn.ping(b"abcdefgh")
    w.pump()
    assert w.guest.pings == [b"12345678"] and w.up.pings == [b"abcdefgh"]
    assert w.guest.settings_acks >= 1 and w.up.settings_acks >= 1
    # Neither PING crossed to the other side.
    assert b"12345678" not in bytes(w.up_raw) and b"abcdefgh" not in bytes(w.guest_raw)


def test_upstream_goaway_finishes_streams_it_took_and_refuses_the_rest() -> None:
    w = World(handler=None)
    a = w.guest.request(b"/a")
    b = w.guest.request(b"/b")
    w.pump()
    ua, _ub = sorted(w.up.messages)
    w.up.conn.close_connection(E.NO_ERROR, last_stream_id=ua)
    # h2 closes its own state on GOAWAY; a real server keeps answering stream ``ua``.
    w.up.conn.state_machine.state = h2.connection.ConnectionState.SERVER_OPEN
    w.pump()
    assert w.guest.messages[b].reset == E.REFUSED_STREAM
    assert w.guest.goaway is not None and w.guest.goaway.last_stream_id == a
    assert w.close is None  # stream a is still in flight
    answer_ok(w.up, ua, w.up.messages[ua])
    w.pump()
    assert bytes(w.guest.messages[a].body) == b"ok" and w.guest.messages[a].ended
    assert w.close is not None and "went away" in w.close


def test_guest_goaway_ends_the_connection_when_streams_are_done() -> None:
    w = World()
    sid = w.guest.request()
    w.pump()
    assert w.guest.messages[sid].ended
    w.guest.conn.close_connection()
    w.pump()
    assert w.close == "the guest went away"


def test_eof_on_either_side() -> None:
    w = World(handler=None)
    w.guest.request(b"/a", method=b"POST", body=b"x", end=False)
    w.pump()
    w.take(w.relay.guest_closed())
    w.pump()
    assert w.up.messages[1].reset == E.CANCEL and w.close is not None

    w = World(handler=None)
    sid = w.guest.request()
    w.pump()
    w.take(w.relay.upstream_closed())
    w.pump()
    assert w.guest.messages[sid].reset == E.INTERNAL_ERROR
    assert w.guest.goaway is not None and w.close == "the upstream closed the connection"


def test_authority_other_than_sni_is_misdirected() -> None:
    w = World()
    sid = w.guest.request(authority=b"other.example")
    w.pump()
    assert w.guest.messages[sid].header(b":status") == b"421"
    assert not w.up.messages and w.close is None


def test_server_push_is_disabled_toward_the_upstream() -> None:
    w = World()
    w.pump()
    assert w.up.conn.remote_settings.enable_push == 0


# -- floods and bounds ----------------------------------------------------------------------
def flood_world() -> World:
    w = World(raw_guest=True)
    w.feed_guest(client_bytes())
    w.pump()
    return w


def assert_calmed(w: World, reason: str) -> None:
    assert w.close is not None and reason in w.close, w.close
    assert goaway_code(bytes(w.guest_raw)) == E.ENHANCE_YOUR_CALM


def test_settings_flood() -> None:
    w = flood_world()
    w.feed_guest(frames(*(SettingsFrame(0) for _ in range(hr.SETTINGS_ALLOWANCE + 5))))
    assert_calmed(w, "SETTINGS flood")


def test_ping_flood() -> None:
    w = flood_world()
    w.feed_guest(
        frames(*(PingFrame(0, opaque_data=b"x" * 8) for _ in range(hr.PING_ALLOWANCE + 5)))
    )
    assert_calmed(w, "PING flood")


def test_pings_beside_traffic_are_not_a_flood() -> None:
    w = World(handler=None)
    sid = w.guest.request()
    w.pump()
    w.up.conn.send_headers(sid, [(b":status", b"200")])
    for i in range(hr.PING_ALLOWANCE + 200):  # gRPC's BDP estimator pings with each burst
        w.up.send_body(sid, b"x" * 100, end=False)
        w.guest.conn.ping(i.to_bytes(8, "big"))
        w.pump()
    assert w.close is None


def test_rapid_reset_flood() -> None:
    w = flood_world()
    enc = Encoder()
    out = []
    for i in range(hr.PREMATURE_RESET_ALLOWANCE + 10):
        sid = 1 + 2 * i
        out.append(HeadersFrame(sid, data=block(REQ, enc), flags=["END_HEADERS", "END_STREAM"]))
        out.append(RstStreamFrame(sid, error_code=E.CANCEL))
    w.feed_guest(frames(*out))
    assert_calmed(w, "rapid reset")


def test_cancelling_streams_that_have_answers_is_not_rapid_reset() -> None:
    w = World(handler=None)
    for i in range(hr.PREMATURE_RESET_ALLOWANCE + 50):
        sid = w.guest.request(f"/{i}".encode())
        w.pump()
        usid = max(w.up.messages)
        w.up.conn.send_headers(usid, [(b":status", b"200")])
        w.pump()
        w.guest.conn.reset_stream(sid, E.CANCEL)
        w.pump()
    assert w.close is None


def test_continuation_without_end_headers() -> None:
    w = flood_world()
    head = block(REQ)
    fs = [HeadersFrame(1, data=head[:5])]
    fs += [ContinuationFrame(1, data=b"\x00") for _ in range(hr.MAX_CONTINUATION_FRAMES + 1)]
    w.feed_guest(frames(*fs))
    assert_calmed(w, "CONTINUATION")


def test_empty_continuation_frames() -> None:
    w = flood_world()
    fs = [HeadersFrame(1, data=block(REQ)[:5])]
    fs += [ContinuationFrame(1, data=b"") for _ in range(1000)]
    w.feed_guest(frames(*fs))
    assert w.close is not None and goaway_code(bytes(w.guest_raw)) == E.ENHANCE_YOUR_CALM


def test_continuation_frames_summing_to_a_huge_block() -> None:
    w = flood_world()
    filler = b"\x40\x01a\x7f" + b"z" * 16_000  # not decoded: the bound is hit first
    fs = [HeadersFrame(1, data=filler[:16_000])]
    fs += [ContinuationFrame(1, data=b"z" * 16_000) for _ in range(4)]
    w.feed_guest(frames(*fs))
    assert_calmed(w, "header block over")


def test_hpack_bomb_is_bounded_by_the_decoded_size() -> None:
    w = flood_world()
    enc = Encoder()
    big = [(b"x-big", b"v" * 4000)]
    first = enc.encode(REQ + big)  # puts the field in the dynamic table
    again = enc.encode(REQ + big * 40)  # 40 one-byte references: 160 KB decoded
    w.feed_guest(
        frames(
            HeadersFrame(1, data=first, flags=["END_HEADERS", "END_STREAM"]),
            HeadersFrame(3, data=again, flags=["END_HEADERS", "END_STREAM"]),
        )
    )
    assert w.close is not None and goaway_code(bytes(w.guest_raw)) == E.ENHANCE_YOUR_CALM


def test_oversized_frame_is_refused_from_its_header() -> None:
    w = flood_world()
    header = (1 << 20).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01"
    w.feed_guest(header)  # no payload: refused before anything is buffered
    assert w.close is not None and goaway_code(bytes(w.guest_raw)) == E.FRAME_SIZE_ERROR


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda i: PriorityFrame(1, depends_on=0, stream_weight=1), "PRIORITY flood"),
        (lambda i: WindowUpdateFrame(0, window_increment=1), "WINDOW_UPDATE flood"),
        (lambda i: RstStreamFrame(1 + 2 * i, error_code=E.CANCEL), "RST_STREAM flood"),
        (lambda i: RawFrame(0xEE, 0, b"x" * 16_000), "carry no request"),
    ],
)
def test_control_frame_floods(make: Callable[[int], object], reason: str) -> None:
    w = flood_world()
    n = 1000 if "carry" in reason else 20_000
    w.feed_guest(frames(*(make(i) for i in range(n))))
    assert_calmed(w, reason)


def test_empty_data_frames_flood() -> None:
    w = flood_world()
    out = [
        HeadersFrame(
            1, data=block(REQ[:0] + [(b":method", b"POST"), *REQ[1:]]), flags=["END_HEADERS"]
        )
    ]
    out += [DataFrame(1, data=b"") for _ in range(10)]
    w.feed_guest(frames(*out))
    assert_calmed(w, "empty frames")


def test_the_upstream_is_bounded_too() -> None:
    w = World(handler=None)
    w.guest.request()
    w.pump()
    w.take(
        w.relay.receive_upstream(
            frames(*(SettingsFrame(0) for _ in range(hr.SETTINGS_ALLOWANCE + 5)))
        )
    )
    assert w.close is not None and "upstream" in w.close and "SETTINGS" in w.close
    assert goaway_code(bytes(w.up_raw)) == E.ENHANCE_YOUR_CALM
    w.pump()
    assert w.guest.messages[1].reset == E.INTERNAL_ERROR


def test_protocol_errors_close_with_a_reason() -> None:
    w = World()
    w.feed_guest(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert w.close is not None and "HTTP/2" in w.close


# -- secrets: the shared case table ---------------------------------------------------------
SECRET_CASES = sc.cases_for("h2")


def case_flight(case: sc.SecretCase, body_split: int | None = None) -> tuple[Guest, bytes]:
    """The guest, and its bytes for one case: preface, SETTINGS, HEADERS, DATA, trailers."""
    client = Guest()
    headers = [(n.lower().encode(), v.encode()) for n, v in case.headers]
    if case.body:
        headers.append((b"content-length", str(len(case.body)).encode()))
    block_ = [
        (b":method", case.method.encode()),
        (b":scheme", b"https"),
        (b":authority", case.authority.encode()),
        (b":path", case.target.encode()),
        *headers,
    ]
    trailers = [(n.encode(), v.encode()) for n, v in case.trailers] or None
    no_body = not case.body and trailers is None
    client.conn.send_headers(1, block_, end_stream=no_body)
    if not no_body:
        pieces = [case.body]
        if body_split is not None:
            pieces = [case.body[:body_split], case.body[body_split:]]
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            client.conn.send_data(1, piece, end_stream=last and trailers is None)
        if trailers is not None:
            client.conn.send_headers(1, trailers, end_stream=True)
    return client, client.conn.data_to_send()


def run_case(case: sc.SecretCase, split: int | None = None, body_split: int | None = None) -> World:
    w = World(sc.table(), sni=case.sni, pinned=case.pinned, handler=answer_ok)
    w.guest, flight = case_flight(case, body_split)
    pieces = [flight] if split is None else [flight[:split], flight[split:]]
    for piece in pieces:  # the guest's own answers (SETTINGS ACK) wait for the flight
        w.feed_guest(piece)
    w.pump()
    return w


def check_case(case: sc.SecretCase, w: World) -> None:
    got = list(w.up.messages.values())
    if case.expect == "violation":
        assert [(v.secret, v.channel, v.action) for v in w.violations] == [
            (case.secret, case.channel, case.action)
        ], (case.id, w.violations)
        for m in got:  # never a complete request, and no placeholder in what went
            assert not m.ended, case.id
            assert not sc.table().find(m.rendered()), case.id
        if case.action is ViolationAction.BLOCK_AND_TERMINATE:
            assert w.close is not None and "violation" in w.close
        else:
            assert w.guest.messages[1].reset == hr.VIOLATION_RESET_CODE, case.id
            assert w.close is None
        return
    assert not w.violations, (case.id, w.violations)
    (m,) = got
    assert m.ended, case.id
    sc.check_upstream(case, m.rendered())
    if case.expect == "passed":
        assert [(p.secret, p.channel) for p in w.passed] == [(case.secret, case.channel)]
    else:
        assert not w.passed
    resp = w.guest.messages[1]
    assert resp.header(b":status") == b"200" and resp.ended


@pytest.mark.parametrize("case", SECRET_CASES, ids=[c.id for c in SECRET_CASES])
def test_secret_case_whole(case: sc.SecretCase) -> None:
    check_case(case, run_case(case))


@pytest.mark.parametrize("case", SECRET_CASES, ids=[c.id for c in SECRET_CASES])
def test_secret_case_split_at_every_byte(case: sc.SecretCase) -> None:
    for split in range(1, len(case_flight(case)[1])):
        check_case(case, run_case(case, split))


@pytest.mark.parametrize(
    "case", [c for c in SECRET_CASES if c.body], ids=[c.id for c in SECRET_CASES if c.body]
)
def test_secret_case_body_split_over_data_frames_at_every_offset(case: sc.SecretCase) -> None:
    for split in range(len(case.body) + 1):
        check_case(case, run_case(case, body_split=split))


# -- secrets: h2-specific -------------------------------------------------------------------
def test_placeholder_in_a_header_block_split_over_continuation_frames() -> None:
    head = block(
        [*REQ[:2], (b":authority", b"evil.test"), (b":path", b"/"), (b"x-k", sc.GH.encode())]
    )
    for cut in range(1, len(head)):
        fs = [HeadersFrame(1, data=head[:cut], flags=["END_STREAM"])]
        fs.append(ContinuationFrame(1, data=head[cut:], flags=["END_HEADERS"]))
        w = World(sc.table(), sni="evil.test", raw_guest=True)
        w.feed_guest(client_bytes(*fs))
        w.pump()
        assert [(v.secret, v.channel) for v in w.violations] == [("GH_TOKEN", Channel.HEADER)]
        assert not w.up.messages


def test_placeholder_split_over_continuation_frames_is_substituted_for_an_allowed_host() -> None:
    head = block([*REQ, (b"authorization", b"Bearer " + sc.GH.encode())])
    for cut in range(1, len(head)):
        fs = [HeadersFrame(1, data=head[:cut], flags=["END_STREAM"])]
        fs.append(ContinuationFrame(1, data=head[cut:], flags=["END_HEADERS"]))
        w = World(sc.table(), raw_guest=True)
        w.feed_guest(client_bytes(*fs))
        w.pump()
        assert w.up.messages[1].header(b"authorization") == b"Bearer " + sc.GH_VALUE.encode()


def test_a_violation_resets_only_its_own_stream() -> None:
    w = World(sc.table(), sni="evil.test")
    good = w.guest.request(authority=b"evil.test")
    bad = w.guest.request(authority=b"evil.test", headers=[(b"x-k", sc.GH.encode())])
    after = w.guest.request(authority=b"evil.test")
    w.pump()
    assert w.guest.messages[bad].reset == hr.VIOLATION_RESET_CODE
    assert w.guest.messages[good].ended and w.guest.messages[after].ended
    assert len(w.up.messages) == 2 and w.close is None


def test_block_and_terminate_closes_every_stream() -> None:
    w = World(sc.table(), sni="evil.test", handler=None)
    other = w.guest.request(authority=b"evil.test", method=b"POST", body=b"x", end=False)
    w.pump()
    w.guest.request(authority=b"evil.test", headers=[(b"x-k", sc.TERM.encode())])
    w.pump()
    assert w.close is not None and "TERM_KEY" in w.close and "stops the sandbox" in w.close
    assert w.guest.goaway is not None
    assert w.up.messages[1].reset == E.CANCEL and not w.up.messages[1].ended
    assert w.guest.messages[other].reset is not None or w.guest.goaway is not None


def test_body_placeholder_after_data_already_forwarded_cancels_the_upstream_stream() -> None:
    w = World(sc.table(), sni="evil.test", handler=None)
    sid = w.guest.request(
        b"/up", authority=b"evil.test", method=b"POST", body=b"a" * 1000, end=False
    )
    w.pump()
    assert bytes(w.up.messages[1].body) == b"a" * 1000
    w.guest.send_body(sid, b"..." + sc.GH.encode()[:10], end=False)
    w.pump()
    w.guest.send_body(sid, sc.GH.encode()[10:] + b"...")
    w.pump()
    assert [v.channel for v in w.violations] == [Channel.BODY]
    up = w.up.messages[1]
    assert up.reset == E.CANCEL and not up.ended
    assert sc.GH.encode() not in bytes(up.body)
    assert w.guest.messages[sid].reset == hr.VIOLATION_RESET_CODE


def test_substituted_request_asks_for_identity_encoding() -> None:
    w = World(sc.table())
    w.guest.request(
        headers=[(b"accept-encoding", b"gzip, br"), (b"authorization", b"Bearer " + sc.GH.encode())]
    )
    w.pump()
    assert w.up.messages[1].header(b"accept-encoding") == b"identity"
    w = World(sc.table())
    w.guest.request(headers=[(b"accept-encoding", b"gzip")])
    w.pump()
    assert w.up.messages[1].header(b"accept-encoding") == b"gzip"


def test_held_body_gets_an_exact_content_length() -> None:
    w = World(sc.table(), sni="a.query.test", handler=answer_echo)
    body = b"secret=" + sc.Q.encode() + b"&x=1"
    w.guest.request(
        b"/t",
        authority=b"a.query.test",
        method=b"POST",
        headers=[
            (b"content-type", b"application/x-www-form-urlencoded"),
            (b"content-length", str(len(body)).encode()),
        ],
        body=body,
    )
    w.pump()
    up = w.up.messages[1]
    assert int(up.header(b"content-length") or b"-1") == len(up.body)
    assert b"q-real%2Fvalue" in bytes(up.body)


def test_body_longer_than_the_hold_is_streamed_and_scanned() -> None:
    w = World(sc.table(), sni="a.query.test", handler=answer_ok)
    body = b"z" * (hr.MAX_SUBSTITUTED_BODY_BYTES + 100_000) + sc.Q.encode()
    w.guest.request(b"/t", authority=b"a.query.test", method=b"POST", body=body)
    w.pump()
    assert [(v.secret, v.channel) for v in w.violations] == [("QTOKEN", Channel.BODY)]
    up = w.up.messages[1]  # the head of the body went (the hold overflowed), not its end
    assert up.body and not up.ended
    assert up.reset == E.CANCEL
    assert (
        w.max_buffered <= hr.MAX_SUBSTITUTED_BODY_BYTES + hr.MAX_FRAME_SIZE + hr.CONNECTION_WINDOW
    )


def test_large_body_without_placeholders_passes_the_hold() -> None:
    w = World(sc.table(), sni="a.query.test", handler=answer_ok)
    body = bytes(range(256)) * 8192  # 2 MiB
    w.guest.request(b"/t", authority=b"a.query.test", method=b"POST", body=body)
    w.pump()
    assert bytes(w.up.messages[1].body) == body and w.up.messages[1].ended


# -- echo masking ---------------------------------------------------------------------------
def test_echoed_value_comes_back_as_the_placeholder() -> None:
    w = World(sc.table(), handler=answer_echo)
    sid = w.guest.request(headers=[(b"authorization", b"Bearer " + sc.GH.encode())])
    w.pump()
    assert sc.GH_VALUE.encode() in w.up.messages[1].rendered()
    resp = w.guest.messages[sid]
    assert resp.header(b"x-echo-authorization") == b"Bearer " + sc.GH.encode()
    assert sc.GH.encode() in bytes(resp.body)
    assert resp.header(b"content-length") is None  # masking may change the length
    assert sc.GH_VALUE.encode() not in resp.rendered()


def test_echoed_basic_credentials_come_back_as_sent() -> None:
    sent = b"Basic " + base64.b64encode(b"me:" + sc.GH.encode())
    w = World(sc.table(), handler=answer_echo)
    sid = w.guest.request(headers=[(b"authorization", sent)])
    w.pump()
    resp = w.guest.messages[sid]
    assert resp.header(b"x-echo-authorization") == sent
    assert base64.b64encode(b"me:" + sc.GH_VALUE.encode()) not in resp.rendered()


def test_value_split_over_data_frames_is_masked_at_every_offset() -> None:
    value = sc.GH_VALUE.encode()
    body = b"before " + value + b" after " + json.dumps(sc.GH_VALUE).encode()
    for cut in range(len(body) + 1):

        def split_echo(up: Upstream, sid: int, req: Message, cut: int = cut) -> None:
            up.conn.send_headers(sid, [(b":status", b"200")])
            up.conn.send_data(sid, body[:cut])
            up.conn.send_data(sid, body[cut:], end_stream=True)

        w = World(sc.table(), handler=split_echo)
        sid = w.guest.request()
        w.pump()
        got = bytes(w.guest.messages[sid].body)
        assert value not in got and got.count(sc.GH.encode()) == 2, cut


def test_compressed_bodies_are_not_masked_but_headers_and_trailers_are() -> None:
    def gz(up: Upstream, sid: int, req: Message) -> None:
        up.conn.send_headers(
            sid,
            [
                (b":status", b"200"),
                (b"content-encoding", b"gzip"),
                (b"x-key", sc.GH_VALUE.encode()),
            ],
        )
        up.send_body(
            sid, b"\x1f\x8b" + sc.GH_VALUE.encode(), trailers=[(b"x-t", sc.GH_VALUE.encode())]
        )

    w = World(sc.table(), handler=gz)
    sid = w.guest.request()
    w.pump()
    resp = w.guest.messages[sid]
    assert resp.header(b"x-key") == sc.GH.encode()
    assert resp.trailers == [(b"x-t", sc.GH.encode())]
    assert bytes(resp.body) == b"\x1f\x8b" + sc.GH_VALUE.encode()  # documented limit


def test_hosts_without_secrets_keep_content_length() -> None:
    w = World(sc.table(), sni="plain.example", handler=answer_echo)
    sid = w.guest.request(authority=b"plain.example")
    w.pump()
    assert w.guest.messages[sid].header(b"content-length") is not None


# -- readable denials -----------------------------------------------------------------------
def test_denial_responder_answers_every_stream() -> None:
    responder = Http2DenialResponder(b"blocked: evil.test is not allowed\n")
    guest = Guest()
    guest.receive(responder.start().to_guest)
    sids = [
        guest.request(authority=b"evil.test"),
        guest.request(b"/x", method=b"POST", body=b"data"),
    ]
    for _ in range(10):
        out = responder.receive_guest(guest.conn.data_to_send())
        if out.to_guest:
            guest.receive(out.to_guest)
    for sid in sids:
        assert guest.messages[sid].header(b":status") == b"403"
        assert bytes(guest.messages[sid].body) == b"blocked: evil.test is not allowed\n"
        assert guest.messages[sid].ended


def test_denial_responder_is_bounded() -> None:
    responder = Http2DenialResponder(b"no")
    responder.start()
    out = responder.receive_guest(
        client_bytes(*(SettingsFrame(0) for _ in range(hr.SETTINGS_ALLOWANCE + 5)))
    )
    assert out.close is not None and goaway_code(out.to_guest) == E.ENHANCE_YOUR_CALM


def test_placeholder_passes_inert_to_allow_placeholder_for_hosts() -> None:
    table = SecretTable.from_entries(
        [
            SecretEntry(
                env_var="K",
                value="real-value-1234",
                allowed_hosts=["a.test"],
                allow_placeholder_for=["llm.test"],
            )
        ],
        environ={},
    )
    w = World(table, sni="llm.test", handler=answer_ok)
    w.guest.request(authority=b"llm.test", headers=[(b"x-k", b"$CORRAL_SECRET_K")])
    w.pump()
    assert w.up.messages[1].header(b"x-k") == b"$CORRAL_SECRET_K"
    assert [(p.secret, p.host, p.channel) for p in w.passed] == [("K", "llm.test", Channel.HEADER)]


def test_violation_with_deny_response_gets_a_readable_403() -> None:
    w = World(sc.table(), sni="evil.test")
    w.relay = Http2Relay(sc.table(), sni="evil.test", pinned=True, deny_format="json")
    w.take(w.relay.start())
    sid = w.guest.request(authority=b"evil.test", headers=[(b"x-k", sc.GH.encode())])
    w.pump()
    resp = w.guest.messages[sid]
    assert resp.header(b":status") == b"403" and resp.ended and resp.reset is None
    doc = json.loads(bytes(resp.body))
    assert doc["host"] == "evil.test" and "GH_TOKEN" in doc["reason"]
    assert sc.GH_VALUE not in bytes(resp.body).decode()
    assert not w.up.messages and w.close is None


def test_terminate_with_deny_response_answers_then_goes_away() -> None:
    w = World(sc.table(), sni="evil.test")
    w.relay = Http2Relay(sc.table(), sni="evil.test", pinned=True, deny_format="text")
    w.take(w.relay.start())
    sid = w.guest.request(authority=b"evil.test", headers=[(b"x-k", sc.TERM.encode())])
    w.pump()
    assert w.guest.messages[sid].header(b":status") == b"403"
    assert b"TERM_KEY" in bytes(w.guest.messages[sid].body)
    assert w.close is not None and w.guest.goaway is not None


def test_readable_denial_matches_http1_word_for_word() -> None:
    from corral.net.http1_rewriter import deny_response

    for fmt in ("text", "json"):
        ctype, body = hr.readable_denial("evil.test", fmt=fmt, reason="not allowed")
        raw = deny_response("evil.test", fmt=fmt, reason="not allowed")
        assert raw.endswith(b"\r\n\r\n" + body) and b"Content-Type: " + ctype in raw
    responder = Http2DenialResponder.readable("evil.test", fmt="json", reason="not allowed")
    guest = Guest()
    guest.receive(responder.start().to_guest)
    sid = guest.request(authority=b"evil.test")
    guest.receive(responder.receive_guest(guest.conn.data_to_send()).to_guest)
    assert guest.messages[sid].header(b"content-type") == b"application/json"
    assert json.loads(bytes(guest.messages[sid].body))["host"] == "evil.test"


def test_a_huge_header_table_from_the_peer_is_not_used() -> None:
    """A guest announcing a 2 GiB HPACK table must not make corral keep every header."""
    from hpack import Decoder

    w = World(handler=None, raw_guest=True)
    settings = SettingsFrame(0, settings={SettingsFrame.HEADER_TABLE_SIZE: 1 << 31})
    enc = Encoder()
    fs = [settings]
    for i in range(20):
        fs.append(
            HeadersFrame(1 + 2 * i, data=block(REQ, enc), flags=["END_HEADERS", "END_STREAM"])
        )
    w.feed_guest(client_bytes(*fs))
    w.pump()
    for usid in w.up.messages:
        w.up.conn.send_headers(
            usid,
            [(b":status", b"200"), (b"x-unique", b"v" * 200 + str(usid).encode())],
            end_stream=True,
        )
    w.pump()
    assert w.relay._guest.encoder.header_table_size <= hr.MAX_ENCODER_TABLE_SIZE
    decoder = Decoder()  # allows only the default 4,096: decoding fails on a larger table
    raw = bytes(w.guest_raw)
    pos = 0
    while len(raw) - pos >= 9:
        length = int.from_bytes(raw[pos : pos + 3], "big")
        if raw[pos + 3] == 0x1:
            decoder.decode(raw[pos + 9 : pos + 9 + length])
        pos += 9 + length


def test_no_masking_where_no_value_can_have_gone() -> None:
    """Not pinned: nothing is substituted, so responses keep their Content-Length."""
    w = World(sc.table(), pinned=False, handler=answer_echo)
    sid = w.guest.request()
    w.pump()
    assert w.guest.messages[sid].header(b"content-length") is not None


# -- figures for docs/network.md (not a test) -----------------------------------------------
def measure(requests: int = 2000, mib: int = 64) -> None:
    """CPU time the relay itself spends (its calls only, not the peers'), printed.

    ``.venv/bin/python -c "from tests.unit.test_http2_rewriter import measure; measure()"``
    """
    import time

    def relay_cpu(w: World) -> list[float]:
        spent = [0.0]
        relay = w.relay
        guest_in, up_in = relay.receive_guest, relay.receive_upstream

        def timed_guest(data: bytes) -> RelayOutput:
            t = time.process_time()
            out = guest_in(data)
            spent[0] += time.process_time() - t
            return out

        def timed_up(data: bytes) -> RelayOutput:
            t = time.process_time()
            out = up_in(data)
            spent[0] += time.process_time() - t
            return out

        relay.receive_guest, relay.receive_upstream = timed_guest, timed_up  # type: ignore[method-assign]
        return spent

    auth = [(b"authorization", b"Bearer " + sc.GH.encode()), (b"user-agent", b"curl/8.5")]
    for label, table, sni, headers in (
        ("no secrets", SecretTable([]), "api.github.com", auth[1:]),
        ("3 secrets, another host", sc.table(), "other.example", auth[1:]),
        ("substituted + masked", sc.table(), "api.github.com", auth),
    ):
        w = World(table, sni=sni, handler=answer_ok)
        w.pump()
        spent = relay_cpu(w)
        for _ in range(requests):
            w.guest.request(b"/x", authority=sni.encode(), headers=headers)
            w.pump()
        print(f"request + response, {label}: {spent[0] / requests * 1e6:.0f} us")

    body = bytes(range(256)) * (4 * 1024)  # 1 MiB
    for label, table, sni in (
        ("download, no masking", SecretTable([]), "api.github.com"),
        ("download, masked (host receives secrets)", sc.table(), "api.github.com"),
    ):

        def big(up: Upstream, sid: int, req: Message) -> None:
            up.conn.send_headers(sid, [(b":status", b"200")])
            up.send_body(sid, body * mib)

        w = World(table, sni=sni, handler=big)
        w.pump()
        spent = relay_cpu(w)
        w.guest.request(b"/big", authority=sni.encode())
        w.pump()
        print(f"{label}: {mib / spent[0]:.0f} MiB/s")
    for label, table in (("upload, no secrets", SecretTable([])), ("upload, scanned", sc.table())):
        w = World(table, handler=answer_ok)
        w.pump()
        spent = relay_cpu(w)
        w.guest.request(b"/up", method=b"POST", body=body * mib)
        w.pump()
        print(f"{label}: {mib / spent[0]:.0f} MiB/s")
