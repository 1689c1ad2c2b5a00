"""Fuzzing Http2Relay: seeded mutation of valid HTTP/2 byte streams, and hypothesis.

Two seeded loops, :data:`MUTATION_INPUTS` inputs (100,000) between them:

- requests on live connections (95%): each input is one request of the shared secret cases
  (``tests/support/secret_cases.py``) as frames on the next stream, its header block maybe
  split over CONTINUATION and its body over DATA frames, mutated half the time (bits flipped,
  ranges cut, duplicated, spliced from another request, placeholders and their encodings and
  frame headers dropped in, tails repeated as floods) and fed in random pieces to a relay
  kept while it lives; a scripted upstream answers some streams, echoing every value;
- whole connections from scratch (5%): preface, SETTINGS, requests and the upstream's
  answers all mutated.

For every input, with independent HPACK decoders reading what the relay wrote:

- the relay never raises and every call returns (nothing in it loops on input);
- toward the upstream, per stream: a secret's value only where the connection's SNI, its pin
  and the stream's ``:authority`` allow it, and no placeholder (in any encoding the detector
  knows) except toward an ``allow_placeholder_for`` host;
- toward the guest: never the value of a secret that can have gone to this host (echo
  masking), unless the response said its body is compressed (the documented limit);
- what the relay holds stays within :data:`CONNECTION_WINDOW` plus one held body.

Then hypothesis builds requests with a placeholder in every place and encoding.
``CORRAL_FUZZ_INPUTS`` scales the loops for a longer local run.
"""

from __future__ import annotations

import os
import pickle
import random
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.net import http2_rewriter as hr
from corral.net.http2_rewriter import Http2Relay
from corral.net.secrets import normalize_host
from tests.support import secret_cases as sc

MUTATION_INPUTS = int(os.environ.get("CORRAL_FUZZ_INPUTS", "100000"))
#: Of those, whole connections from scratch (preface, SETTINGS and the upstream's answers
#: mutated too): each costs about four requests on a live connection.
CONNECTION_INPUTS = max(MUTATION_INPUTS // 20, 100)
LIVE_INPUTS = MUTATION_INPUTS - CONNECTION_INPUTS
TABLE = sc.table()
SECRETS = TABLE.secrets
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


# -- an independent view of what the relay sent ---------------------------------------------
@dataclass
class StreamView:
    fields: list[tuple[bytes, bytes]]
    data: bytearray
    encoded: bool  # content-encoding other than identity was announced


def decode(raw: bytes, *, preface: bool) -> dict[int, StreamView] | None:
    """Frames and HPACK blocks of one direction, per stream; None if they do not decode.

    The relay's own h2 encoders wrote these bytes, so anything undecodable is a finding too:
    the caller treats None as a failure.
    """
    pos = len(PREFACE) if preface and raw.startswith(PREFACE) else 0
    decoder = hpack.Decoder()
    decoder.max_header_list_size = 1 << 24
    decoder.max_allowed_table_size = hr.MAX_ENCODER_TABLE_SIZE  # the relay's own bound
    streams: dict[int, StreamView] = {}
    pending: tuple[int, bytearray] | None = None
    while len(raw) - pos >= 9:
        length = int.from_bytes(raw[pos : pos + 3], "big")
        ftype, flags = raw[pos + 3], raw[pos + 4]
        sid = int.from_bytes(raw[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        payload = raw[pos + 9 : pos + 9 + length]
        if len(payload) < length:
            return None
        pos += 9 + length
        view = streams.setdefault(sid, StreamView([], bytearray(), False)) if sid else None
        if ftype == 0x0 and view is not None:  # DATA
            if flags & 0x8:
                payload = payload[1 : len(payload) - payload[0]]
            view.data += payload
        elif ftype in (0x1, 0x9):  # HEADERS, CONTINUATION
            if ftype == 0x1:
                if flags & 0x8:
                    payload = payload[1 : len(payload) - payload[0]]
                if flags & 0x20:
                    payload = payload[5:]
                pending = (sid, bytearray(payload))
            elif pending is not None:
                pending[1].extend(payload)
            if flags & 0x4 and pending is not None:
                got = decoder.decode(bytes(pending[1]), raw=True)
                target = streams.setdefault(pending[0], StreamView([], bytearray(), False))
                target.fields += [(bytes(n), bytes(v)) for n, v in got]
                for n, v in got:
                    if n == b"content-encoding" and v.strip().lower() != b"identity":
                        target.encoded = True
                pending = None
    return streams


def authority_of(view: StreamView) -> str | None:
    for n, v in view.fields:
        if n in (b":authority", b"host"):
            return normalize_host(v)
    return None


def check_upstream(raw: bytes, sni: str | None, pinned: bool) -> None:
    streams = decode(raw, preface=True)
    assert streams is not None, "the relay sent upstream bytes that do not decode"
    sni_n = normalize_host(sni)
    for sid, view in streams.items():
        authority = authority_of(view)
        host = sni_n or authority
        pieces = [n + b"\n" + v for n, v in view.fields] + [bytes(view.data)]
        for s in SECRETS:
            injectable = (
                sni_n is not None and pinned and authority == sni_n and s.is_allowed_host(sni_n)
            )
            if not injectable:
                assert all(s.value not in p for p in pieces), (sid, s.name, sni, authority)
        for piece in pieces:
            for name in TABLE.find(piece):
                assert TABLE.secret(name).may_carry_placeholder(host), (sid, name, sni, piece[:200])


def check_guest(raw: bytes, sni: str | None, pinned: bool) -> None:
    streams = decode(raw, preface=False)
    assert streams is not None, "the relay sent the guest bytes that do not decode"
    sni_n = normalize_host(sni)
    for view in streams.values():
        for s in SECRETS:
            if sni_n is None or not pinned or not s.is_allowed_host(sni_n):
                continue  # the value never went there, so no honest upstream can echo it
            for n, v in view.fields:
                assert s.value not in v, (s.name, n)
            if not view.encoded:
                assert s.value not in view.data, s.name


# -- seeds ----------------------------------------------------------------------------------
def _client() -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    c.initiate_connection()
    return c


def case_flight(case: sc.SecretCase) -> bytes:
    c = _client()
    headers = [(n.lower().encode(), v.encode()) for n, v in case.headers]
    if case.body:
        headers.append((b"content-length", str(len(case.body)).encode()))
    head = [
        (b":method", case.method.encode()),
        (b":scheme", b"https"),
        (b":authority", case.authority.encode()),
        (b":path", case.target.encode()),
        *headers,
    ]
    trailers = [(n.encode(), v.encode()) for n, v in case.trailers] or None
    no_body = not case.body and trailers is None
    c.send_headers(1, head, end_stream=no_body)
    if not no_body:
        half = len(case.body) // 2
        c.send_data(1, case.body[:half])
        c.send_data(1, case.body[half:], end_stream=trailers is None)
        if trailers is not None:
            c.send_headers(1, trailers, end_stream=True)
    return c.data_to_send()


def multi_flight(authority: str) -> bytes:
    """Three streams on one connection: one clean, one with a placeholder, one reset."""
    c = _client()
    base = [(b":scheme", b"https"), (b":authority", authority.encode())]
    c.send_headers(1, [(b":method", b"GET"), *base, (b":path", b"/a")], end_stream=True)
    c.send_headers(3, [(b":method", b"POST"), *base, (b":path", b"/b"), (b"x-k", sc.GH.encode())])
    c.send_data(3, b"body " + sc.Q.encode(), end_stream=True)
    c.send_headers(5, [(b":method", b"POST"), *base, (b":path", b"/c")])
    c.send_data(5, b"partial")
    c.reset_stream(5)
    c.ping(b"pingpong")
    return c.data_to_send()


def upstream_flight(streams: tuple[int, ...] = (1, 3, 5)) -> bytes:
    """A server's answer to each stream, echoing every secret's value in headers and body."""
    s = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    s.initiate_connection()
    c = _client()
    for sid in streams:  # the requests it answers (the relay opens upstream streams 1, 3, 5)
        c.send_headers(
            sid,
            [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"x"), (b":path", b"/")],
            end_stream=True,
        )
    s.receive_data(c.data_to_send())
    s.data_to_send()
    s.initiate_connection()  # its preface again, now at the start of what the relay reads
    values = [sec.value for sec in SECRETS]
    for sid in streams:
        headers = [(b":status", b"200"), *((b"x-echo", v) for v in values)]
        s.send_headers(sid, headers)
        body = b" | ".join(values)
        s.send_data(sid, body[:7])
        s.send_data(sid, body[7:])
        s.send_headers(sid, [(b"grpc-status", b"0"), (b"x-t", values[0])], end_stream=True)
    return s.data_to_send()


@dataclass(frozen=True)
class Seed:
    sni: str | None
    pinned: bool
    guest: bytes
    upstream: bytes


def seeds() -> list[Seed]:
    out = [Seed(c.sni, c.pinned, case_flight(c), upstream_flight((1,))) for c in sc.cases_for("h2")]
    for sni in ("api.github.com", "a.query.test", "evil.test", "api.llm.test"):
        out.append(Seed(sni, True, multi_flight(sni), upstream_flight()))
    return out


#: Dropped into guest bytes: placeholders, their encodings, frame headers. Never a value: the
#: guest cannot know one, and the oracle's "value only toward allowed hosts" is about values
#: corral put in.
GUEST_TOKENS = [
    *(s.placeholder for s in SECRETS),
    b"%24CORRAL_SECRET_GH_TOKEN",
    b"\\u0024CORRAL_SECRET_QTOKEN",
    b"&#36;CORRAL_SECRET_TERM_KEY",
    b"JENPUlJBTF9TRUNSRVRfR0hfVE9LRU4=",
    b"\x00\x00\x00\x00\x00\x00\x00\x00\x00",  # an empty DATA frame header
    b"\x00\x00\x00\x09\x00\x00\x00\x00\x01",  # CONTINUATION on stream 1
    b"\x00\x00\x00\x04\x00\x00\x00\x00\x00",  # SETTINGS
    b"\x00\x00\x08\x07\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00",  # GOAWAY
]
#: Dropped into upstream bytes: the same, and the values an upstream may echo.
UPSTREAM_TOKENS = [*GUEST_TOKENS, *(s.value for s in SECRETS)]


def mutate(
    rng: random.Random, data: bytes, other: bytes, tokens: list[bytes] = GUEST_TOKENS
) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 5))):
        op = rng.randrange(9)
        i = rng.randrange(len(buf) + 1) if buf else 0
        if op == 0 and buf:  # flip bits
            buf[min(i, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:  # random bytes
            buf[i:i] = rng.randbytes(rng.randrange(1, 9))
        elif op == 2 and buf:  # delete a range
            del buf[i : i + rng.randrange(1, 32)]
        elif op == 3 and buf:  # duplicate a range
            j = min(len(buf), i + rng.randrange(1, 64))
            buf[j:j] = buf[i:j]
        elif op == 4 and other:  # splice in part of another flight
            k = rng.randrange(len(other))
            buf[i:i] = other[k : k + rng.randrange(1, 128)]
        elif op == 5:  # a token: a placeholder, an encoding of it, a value, a frame header
            buf[i:i] = rng.choice(tokens)
        elif op == 6 and buf:  # overwrite a byte with a boundary value
            buf[min(i, len(buf) - 1)] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, 0x04, 0x09))
        elif op == 7:  # truncate
            del buf[i:]
        elif op == 8 and len(buf) > 9:  # repeat the tail (a flood of its last frames)
            tail = buf[-rng.randrange(9, min(len(buf), 200)) :]
            buf += tail * rng.randrange(1, 20)
    return bytes(buf)


def pieces(rng: random.Random, data: bytes) -> list[bytes]:
    if len(data) < 2 or rng.random() < 0.5:
        return [data]
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(1, 5))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def run_one(rng: random.Random, seed: Seed, guest: bytes, upstream: bytes) -> None:
    deny = rng.choice((None, None, "text", "json"))
    relay = Http2Relay(TABLE, sni=seed.sni, pinned=seed.pinned, deny_format=deny)
    out = relay.start()
    to_up, to_guest = bytearray(out.to_upstream), bytearray(out.to_guest)
    for piece in pieces(rng, guest):
        out = relay.receive_guest(piece)
        to_up += out.to_upstream
        to_guest += out.to_guest
    for piece in pieces(rng, upstream):
        out = relay.receive_upstream(piece)
        to_up += out.to_upstream
        to_guest += out.to_guest
    if rng.random() < 0.3:
        out = relay.guest_closed() if rng.random() < 0.5 else relay.upstream_closed()
        to_up += out.to_upstream
        to_guest += out.to_guest
    assert relay.buffered_bytes <= hr.CONNECTION_WINDOW + hr.MAX_SUBSTITUTED_BODY_BYTES
    check_upstream(bytes(to_up), seed.sni, seed.pinned)
    check_guest(bytes(to_guest), seed.sni, seed.pinned)


def test_seeds_pass_the_oracles_unmutated() -> None:
    rng = random.Random(0)
    for seed in seeds():
        run_one(rng, seed, seed.guest, seed.upstream)


def test_seeded_mutation_of_whole_connections() -> None:
    """Preface, SETTINGS, requests and the upstream's answers all mutated, from scratch."""
    rng = random.Random(20241202)
    pool = seeds()
    for n in range(CONNECTION_INPUTS):
        seed = pool[n % len(pool)]
        other = pool[rng.randrange(len(pool))]
        guest = mutate(rng, seed.guest, other.guest) if rng.random() < 0.8 else seed.guest
        upstream = (
            mutate(rng, seed.upstream, other.upstream, UPSTREAM_TOKENS)
            if rng.random() < 0.5
            else seed.upstream
        )
        try:
            run_one(rng, seed, guest, upstream)
        except Exception as e:  # name the input that failed, so it can be replayed
            raise AssertionError(f"input {n}: guest={guest!r} upstream={upstream!r}") from e


def raw_frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes((ftype, flags)) + sid.to_bytes(4, "big") + payload
    )


# -- many inputs on live connections --------------------------------------------------------
class OracleView:
    """Decodes one direction of a live connection, frame by frame, with its HPACK state.

    Lighter than an h2 peer (no state machine), which keeps each input cheap; the relay's
    own h2 connections check the protocol, this checks content.
    """

    def __init__(self, preface: bool) -> None:
        self.buf = bytearray()
        self.skip = len(PREFACE) if preface else 0
        self.decoder = hpack.Decoder()
        self.decoder.max_header_list_size = 1 << 24
        self.decoder.max_allowed_table_size = hr.MAX_ENCODER_TABLE_SIZE
        self.block: tuple[int, bytearray, bool] | None = None
        self.streams: dict[int, StreamView] = {}

    def feed(self, data: bytes) -> tuple[list[int], list[int]]:
        """Take bytes; return the streams that got fields or data, and those that ended."""
        self.buf += data
        if self.skip:
            n = min(self.skip, len(self.buf))
            del self.buf[:n]
            self.skip -= n
        touched: list[int] = []
        ended: list[int] = []
        buf = self.buf
        while len(buf) >= 9:
            length = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + length:
                break
            ftype, flags = buf[3], buf[4]
            sid = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            payload = bytes(buf[9 : 9 + length])
            del buf[: 9 + length]
            if ftype == 0x0 and sid:
                if flags & 0x8:
                    payload = payload[1 : len(payload) - payload[0]]
                self.view(sid).data += payload
                touched.append(sid)
                if flags & 0x1:
                    ended.append(sid)
            elif ftype in (0x1, 0x9):
                if ftype == 0x1:
                    if flags & 0x8:
                        payload = payload[1 : len(payload) - payload[0]]
                    if flags & 0x20:
                        payload = payload[5:]
                    self.block = (sid, bytearray(payload), bool(flags & 0x1))
                elif self.block is not None:
                    self.block[1].extend(payload)
                if flags & 0x4 and self.block is not None:
                    bsid, raw, end = self.block
                    self.block = None
                    view = self.view(bsid)
                    for n, v in self.decoder.decode(bytes(raw), raw=True):
                        view.fields.append((bytes(n), bytes(v)))
                        if n == b"content-encoding" and v.strip().lower() != b"identity":
                            view.encoded = True
                    touched.append(bsid)
                    if end:
                        ended.append(bsid)
            elif ftype == 0x3:
                self.streams.pop(sid, None)
        return touched, ended

    def view(self, sid: int) -> StreamView:
        return self.streams.setdefault(sid, StreamView([], bytearray(), False))


_TEMPLATES: dict[tuple[str | None, bool, str | None], bytes] = {}
#: The upstream's first flight: SETTINGS (big windows), ACK of the relay's, a window update.
UPSTREAM_PREFACE = (
    raw_frame(0x4, 0, 0, b"\x00\x04" + (1 << 24).to_bytes(4, "big"))
    + raw_frame(0x4, 0x1, 0, b"")
    + raw_frame(0x8, 0, 0, (1 << 30).to_bytes(4, "big"))
)


class LiveConnection:
    """A relay kept across many inputs, with a scripted upstream that answers some streams."""

    def __init__(
        self, rng: random.Random, sni: str | None, pinned: bool, deny: str | None = None
    ) -> None:
        self.rng = rng
        self.sni, self.pinned = sni, pinned
        self.relay = Http2Relay(TABLE, sni=sni, pinned=pinned, deny_format=deny)
        self.up_view = OracleView(preface=True)
        self.guest_view = OracleView(preface=False)
        self.encoder = hpack.Encoder()  # the upstream's, for its answers
        self.next_sid = 1
        self.closed = False
        self.answered: set[int] = set()
        self.route(self.relay.start())
        self.route(self.relay.receive_guest(GUEST_PREFACE))
        self.route(self.relay.receive_upstream(UPSTREAM_PREFACE))

    @classmethod
    def fresh(
        cls, rng: random.Random, sni: str | None, pinned: bool, deny: str | None
    ) -> LiveConnection:
        """A new connection past its prefaces: unpickled from a template (cheaper than
        building one, and many mutated inputs end their connection)."""
        key = (sni, pinned, deny)
        if key not in _TEMPLATES:
            template = cls(random.Random(0), sni, pinned, deny)
            template.rng = None  # type: ignore[assignment]
            _TEMPLATES[key] = pickle.dumps(template)
        conn: LiveConnection = pickle.loads(_TEMPLATES[key])
        conn.rng = rng
        return conn

    def route(self, out: hr.RelayOutput) -> None:
        self.closed = out.close is not None
        reply = b""
        if out.to_upstream:
            touched, ended = self.up_view.feed(out.to_upstream)
            for sid in touched:
                if sid in self.up_view.streams:
                    check_stream(self.up_view.streams[sid], self.sni, self.pinned)
            for sid in ended:
                self.up_view.streams.pop(sid, None)
                if sid % 2 and sid not in self.answered and self.rng.random() < 0.4:
                    self.answered.add(sid)
                    reply += self.answer(sid)
        if out.to_guest:
            touched, ended = self.guest_view.feed(out.to_guest)
            for sid in touched:
                if sid in self.guest_view.streams:
                    check_guest_stream(self.guest_view.streams[sid], self.sni, self.pinned)
            for sid in ended:
                self.guest_view.streams.pop(sid, None)
        if reply and not self.closed:
            self.route(self.relay.receive_upstream(reply))

    def answer(self, sid: int) -> bytes:
        """The upstream's response, sometimes echoing every value, split over two DATA."""
        values = [s.value for s in SECRETS] if self.rng.random() < 0.5 else [b"ok"]
        head = self.encoder.encode([(b":status", b"200"), *((b"x-echo", v) for v in values)])
        body = b" | ".join(values)
        cut = self.rng.randrange(len(body) + 1)
        return (
            raw_frame(0x1, 0x4, sid, head)
            + raw_frame(0x0, 0, sid, body[:cut])
            + raw_frame(0x0, 0x1, sid, body[cut:])
        )


def check_stream(view: StreamView, sni: str | None, pinned: bool) -> None:
    sni_n = normalize_host(sni)
    authority = authority_of(view)
    host = sni_n or authority
    pieces = [n + b"\n" + v for n, v in view.fields] + [bytes(view.data)]
    for s in SECRETS:
        if not (sni_n is not None and pinned and authority == sni_n and s.is_allowed_host(sni_n)):
            assert all(s.value not in p for p in pieces), (s.name, sni, authority)
    for piece in pieces:
        for name in TABLE.find(piece):
            assert TABLE.secret(name).may_carry_placeholder(host), (name, sni, piece[:200])


def check_guest_stream(view: StreamView, sni: str | None, pinned: bool) -> None:
    sni_n = normalize_host(sni)
    if sni_n is None or not pinned:
        return  # no value went there (see check_guest)
    for s in SECRETS:
        if s.is_allowed_host(sni_n):
            assert all(s.value not in v for _, v in view.fields), s.name
            assert view.encoded or s.value not in view.data, s.name


def _guest_preface() -> bytes:
    c = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    c.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 24}
    )
    c.initiate_connection()
    c.increment_flow_control_window(1 << 30)
    return c.data_to_send()


GUEST_PREFACE = _guest_preface()
CASES = sc.cases_for("h2")


@dataclass(frozen=True)
class RequestParts:
    """A case's request, HPACK-encoded once (without indexing, so each block is stateless)."""

    blocks: tuple[bytes, bytes]  # without and with Huffman coding, content-length present
    bare_blocks: tuple[bytes, bytes]  # the same without content-length
    body: bytes
    trailers: bytes | None

    @classmethod
    def of(cls, case: sc.SecretCase) -> RequestParts:
        headers = [(n.lower().encode(), v.encode()) for n, v in case.headers]
        head = [
            (b":method", case.method.encode()),
            (b":scheme", b"https"),
            (b":authority", case.authority.encode()),
            (b":path", case.target.encode()),
            *headers,
        ]
        with_length = [*head, (b"content-length", str(len(case.body)).encode())]

        def enc(fields: list[tuple[bytes, bytes]], huffman: bool) -> bytes:
            return hpack.Encoder().encode(
                [hpack.NeverIndexedHeaderTuple(n, v) for n, v in fields], huffman=huffman
            )

        trailers = [(n.encode(), v.encode()) for n, v in case.trailers]
        return cls(
            (
                enc(with_length if case.body else head, False),
                enc(with_length if case.body else head, True),
            ),
            (enc(head, False), enc(head, True)),
            case.body,
            enc(trailers, True) if trailers else None,
        )


def request_frames(rng: random.Random, parts: RequestParts, sid: int) -> bytes:
    """One request as frames on stream ``sid``: header block maybe split over CONTINUATION,
    body over 1-3 DATA frames, sometimes followed by a reset or a PING."""
    block_ = (parts.blocks if rng.random() < 0.7 else parts.bare_blocks)[rng.randrange(2)]
    no_body = not parts.body and parts.trailers is None
    out = bytearray()
    cut = rng.randrange(len(block_) + 1) if rng.random() < 0.3 else len(block_)
    flags = (0x1 if no_body else 0) | (0x4 if cut == len(block_) else 0)
    out += raw_frame(0x1, flags, sid, block_[:cut])
    if cut < len(block_):
        out += raw_frame(0x9, 0x4, sid, block_[cut:])
    if not no_body:
        body = parts.body
        cuts = sorted(rng.sample(range(len(body) + 1), min(len(body) + 1, rng.randrange(3))))
        pieces_ = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        for i, piece in enumerate(pieces_):
            last = i == len(pieces_) - 1 and parts.trailers is None
            out += raw_frame(0x0, 0x1 if last else 0, sid, piece)
        if parts.trailers is not None:
            out += raw_frame(0x1, 0x5, sid, parts.trailers)
    extra = rng.random()
    if extra < 0.05:
        out += raw_frame(0x3, 0, sid, b"\0\0\0\x08")  # the guest cancels it
    elif extra < 0.1:
        out += raw_frame(0x6, 0, 0, rng.randbytes(8))
    return bytes(out)


PARTS = [RequestParts.of(c) for c in CASES]
SAMPLES = [request_frames(random.Random(i), p, 1) for i, p in enumerate(PARTS)]


CONFIGS = sorted({(c.sni, c.pinned) for c in CASES} | {("api.llm.test", True)}, key=str)


def test_seeded_mutation_of_requests_on_live_connections() -> None:
    """LIVE_INPUTS requests, each mutated or not, on connections kept while they live."""
    rng = random.Random(8)
    conn: LiveConnection | None = None
    used = 0
    for n in range(LIVE_INPUTS):
        if conn is None or conn.closed or used >= 300:
            sni, pinned = CONFIGS[rng.randrange(len(CONFIGS))]
            conn = LiveConnection.fresh(rng, sni, pinned, rng.choice((None, None, "text")))
            used = 0
        used += 1
        data = request_frames(rng, PARTS[rng.randrange(len(PARTS))], conn.next_sid)
        conn.next_sid += 2
        if rng.random() < 0.5:
            data = mutate(rng, data, SAMPLES[rng.randrange(len(SAMPLES))])
        try:
            for piece in pieces(rng, data):
                conn.route(conn.relay.receive_guest(piece))
                if conn.closed:
                    break
            assert conn.relay.buffered_bytes <= hr.CONNECTION_WINDOW + hr.MAX_SUBSTITUTED_BODY_BYTES
        except Exception as e:
            raise AssertionError(f"input {n} on {conn.sni}/{conn.pinned}: {data!r}") from e


# -- hypothesis: requests built from parts --------------------------------------------------
ENCODINGS = [
    lambda p: p,
    lambda p: p.replace(b"$", b"%24"),
    lambda p: b"".join(b"%%%02x" % b for b in p),
    lambda p: p.replace(b"$", b"\\u0024"),
    lambda p: p.replace(b"_", b"&#95;"),
]
names = st.sampled_from(
    ["api.github.com", "a.query.test", "evil.test", "api.llm.test", "term.test"]
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sni=names,
    authority=names,
    pinned=st.booleans(),
    secret=st.sampled_from(SECRETS),
    encoding=st.sampled_from(ENCODINGS),
    where=st.sampled_from(["header", "basic", "query", "path", "body", "trailer", "name"]),
    body_cut=st.integers(min_value=0, max_value=80),
    extra=st.binary(max_size=40),
)
def test_placeholder_anywhere(
    sni: str,
    authority: str,
    pinned: bool,
    secret: object,
    encoding: object,
    where: str,
    body_cut: int,
    extra: bytes,
) -> None:
    import base64

    ph = encoding(secret.placeholder)  # type: ignore[attr-defined,operator]
    c = _client()
    path = b"/p"
    headers: list[tuple[bytes, bytes]] = []
    body = b"pre" + extra.replace(b"$", b"") + b"post"
    trailers = None
    if where == "header":
        headers.append((b"x-key", ph))
    elif where == "basic":
        headers.append((b"authorization", b"Basic " + base64.b64encode(b"u:" + ph)))
    elif where == "query":
        path = b"/p?k=" + ph
    elif where == "path":
        path = b"/p/" + ph
    elif where == "body":
        body = body[:3] + ph + body[3:]
    elif where == "trailer":
        trailers = [(b"x-t", ph)]
    else:
        headers.append((b"x-" + ph.lower().replace(b"$", b"d").replace(b"%", b"p"), b"1"))
    head = [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":authority", authority.encode()),
        (b":path", path),
        *headers,
    ]
    try:
        c.send_headers(1, head)
    except Exception:
        return  # a header h2 itself will not send (odd bytes in a name)
    cut = min(body_cut, len(body))
    c.send_data(1, body[:cut])
    c.send_data(1, body[cut:], end_stream=trailers is None)
    if trailers is not None:
        c.send_headers(1, trailers, end_stream=True)
    seed = Seed(sni, pinned, c.data_to_send(), upstream_flight((1,)))
    run_one(random.Random(body_cut), seed, seed.guest, seed.upstream)
