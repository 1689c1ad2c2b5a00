"""The first-flight readers: TLS ClientHello, HTTP/1 head, HTTP/2 prior knowledge.

ClientHellos are real ones, made by this Python's OpenSSL through ``ssl.MemoryBIO``, and
hand-built ones where a shape is needed that OpenSSL does not send (GREASE, ECH, odd SNI,
broken lengths). HTTP/2 preambles come from the ``h2`` library, or are built frame by frame.
The builders here are shared with ``test_net_sniff_fuzz.py`` as its seeds.
"""

from __future__ import annotations

import ssl
import struct

import h2.config
import h2.connection
import hpack
import pytest

from corral.net.clienthello import (
    MAX_CLIENT_HELLO,
    MAX_HELLO_RECORDS,
    ClientHello,
    ClientHelloReader,
    HelloRejected,
    is_grease,
)
from corral.net.h2_head import MAX_HEADER_BLOCK, PREFACE, H2HeadReader
from corral.net.http_head import MAX_REQUEST_HEAD, Http1HeadReader
from corral.net.revealed import authority_from_wire, host_from_wire
from corral.net.sniff import (
    FIRST_FLIGHT_TIMEOUT,
    MAX_FIRST_FLIGHT,
    FirstFlightReader,
    Revealed,
)
from corral.policy.names import normalize_name

# --------------------------------------------------------------------------- builders


def python_hello(
    name: str | None,
    alpn: list[str] | None = None,
    maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
) -> bytes:
    """The ClientHello this Python's OpenSSL sends for ``server_hostname=name``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = maximum
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    return outgoing.read()


def vec(length_bytes: int, data: bytes) -> bytes:
    return len(data).to_bytes(length_bytes, "big") + data


def sni_ext(*names: tuple[int, bytes]) -> tuple[int, bytes]:
    return 0, vec(2, b"".join(bytes([t]) + vec(2, n) for t, n in names))


def alpn_ext(*protocols: bytes) -> tuple[int, bytes]:
    return 16, vec(2, b"".join(vec(1, p) for p in protocols))


def versions_ext(*versions: int) -> tuple[int, bytes]:
    return 43, vec(1, b"".join(struct.pack(">H", v) for v in versions))


def hello_body(
    extensions: list[tuple[int, bytes]] | None,
    *,
    session_id: bytes = b"\x11" * 32,
    suites: bytes = b"\x13\x01\x13\x02\xc0\x2f",
    compression: bytes = b"\x00",
    trailer: bytes = b"",
) -> bytes:
    body = b"\x03\x03" + b"\x42" * 32 + vec(1, session_id) + vec(2, suites) + vec(1, compression)
    if extensions is not None:
        body += vec(2, b"".join(struct.pack(">H", t) + vec(2, d) for t, d in extensions))
    return body + trailer


def handshake(body: bytes, msg_type: int = 1) -> bytes:
    return bytes([msg_type]) + len(body).to_bytes(3, "big") + body


def records(message: bytes, sizes: list[int] | None = None, version: bytes = b"\x03\x01") -> bytes:
    """``message`` in TLS handshake records of the given payload sizes (the last takes the rest)."""
    out, pos = b"", 0
    for size in [*(sizes or []), len(message)]:
        chunk = message[pos : pos + size]
        if not chunk:
            break
        out += b"\x16" + version + vec(2, chunk)
        pos += len(chunk)
    return out


def built_hello(extensions: list[tuple[int, bytes]] | None, **kw: bytes) -> bytes:
    return records(handshake(hello_body(extensions, **kw)))


def split_records(wire: bytes, sizes: list[int]) -> bytes:
    """Re-fragment the handshake message carried by the single record ``wire``."""
    return records(wire[5:], sizes)


def h2_preamble(headers: list[tuple[str, str]], end_stream: bool = True) -> bytes:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, headers, end_stream=end_stream)
    return conn.data_to_send()


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


SETTINGS = frame(4, 0, 0, b"\x00\x03\x00\x00\x00\x64")
GET_A = [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "a.example")]


def block(headers: list[tuple[str, str]]) -> bytes:
    return hpack.Encoder().encode(headers)


# --------------------------------------------------------------------------- helpers


def reveal(data: bytes) -> Revealed:
    reader = FirstFlightReader()
    reader.feed(data)
    return reader.result() or reader.finish()


def reveal_final(data: bytes) -> Revealed | None:
    reader = FirstFlightReader()
    reader.feed(data)
    return reader.result()


def hello_of(data: bytes) -> ClientHello | HelloRejected | None:
    reader = ClientHelloReader()
    reader.feed(data)
    return reader.result()


# --------------------------------------------------------------------------- constants


def test_bounds_fit_each_other() -> None:
    assert MAX_FIRST_FLIGHT >= MAX_CLIENT_HELLO + 5 * MAX_HELLO_RECORDS
    assert MAX_FIRST_FLIGHT >= MAX_REQUEST_HEAD
    assert len(PREFACE) + MAX_HEADER_BLOCK <= MAX_FIRST_FLIGHT
    assert MAX_FIRST_FLIGHT < 64 * 1024
    assert 0 < FIRST_FLIGHT_TIMEOUT <= 5


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("raw", "name", "valid"),
    [
        (b"example.com", "example.com", True),
        (b"Example.COM.", "example.com", True),
        ("bücher.example".encode(), "xn--bcher-kva.example", True),
        (b"xn--bcher-kva.example", "xn--bcher-kva.example", True),
        (b"_dmarc.example.com", "_dmarc.example.com", True),
        (b"localhost", "localhost", True),
        (b"1.2.3.4", "1.2.3.4", True),
        (b"::1", "::1", True),
        (b"2001:DB8:0:0::1", "2001:db8::1", True),
        (b"", None, False),
        (b".", None, False),
        (b"a..example", None, False),
        (b".a.example", None, False),
        (b"a.example..", None, False),
        (b"a\x00.example", None, False),
        (b"a b.example", None, False),
        (b"*.example", None, False),
        (b"a.example/x", None, False),
        (b"\xff\xfe.example", None, False),
        (b"a" * 64 + b".example", None, False),
        (b"a" * 63 + b".example", "a" * 63 + ".example", True),
        (b".".join([b"a" * 63] * 4), None, False),  # 255 characters
        (b".".join([b"a" * 63] * 3 + [b"a" * 61]), ".".join(["a" * 63] * 3 + ["a" * 61]), True),
        (b"1.2.3.256", None, False),
        (b"127.1", None, False),
        (b"0x7f.1", None, False),
        (b"1.2.3.4.", None, False),
        (b"x" * 70_000, None, False),
        (b"fe80::1%eth0", None, False),
    ],
)
def test_host_from_wire(raw: bytes, name: str | None, valid: bool) -> None:
    host = host_from_wire(raw)
    assert (host.name, host.valid) == (name, valid)
    if valid:
        assert host.name == normalize_name(host.name or "")
    else:
        assert host.raw is not None and len(host.raw) <= 90 and host.raw.isprintable()
        assert host.reason


@pytest.mark.parametrize(
    ("raw", "name", "valid", "port"),
    [
        ("a.example", "a.example", True, None),
        ("A.Example:8080", "a.example", True, 8080),
        ("a.example:", "a.example", True, None),
        ("[::1]:443", "::1", True, 443),
        ("[::1]", "::1", True, None),
        ("1.2.3.4:80", "1.2.3.4", True, 80),
        ("::1", None, False, None),
        ("[::1", None, False, None),
        ("[a.example]", None, False, None),
        ("[::1]x", None, False, None),
        ("a.example:99999", None, False, None),
        ("a.example:8o", None, False, None),
        ("a.example:+80", None, False, None),
        ("user@a.example", None, False, None),
        ("good.example@evil.example", None, False, None),
        (":80", None, False, 80),
        ("[fe80::1%25eth0]:80", None, False, None),
    ],
)
def test_authority_from_wire(raw: str, name: str | None, valid: bool, port: int | None) -> None:
    host = authority_from_wire(raw)
    assert (host.name, host.valid, host.port) == (name, valid, port)


# --------------------------------------------------------------------------- TLS


REAL_HELLOS = [
    ("example.com", None, ssl.TLSVersion.MAXIMUM_SUPPORTED, "example.com"),
    ("Example.COM", ["h2", "http/1.1"], ssl.TLSVersion.MAXIMUM_SUPPORTED, "example.com"),
    ("api.openai.com", ["http/1.1"], ssl.TLSVersion.TLSv1_2, "api.openai.com"),
    ("bücher.example", ["h2"], ssl.TLSVersion.MAXIMUM_SUPPORTED, "xn--bcher-kva.example"),
    ("a" * 63 + ".example", ["h2"], ssl.TLSVersion.MAXIMUM_SUPPORTED, "a" * 63 + ".example"),
    (None, ["h2"], ssl.TLSVersion.MAXIMUM_SUPPORTED, None),
    ("192.0.2.7", None, ssl.TLSVersion.MAXIMUM_SUPPORTED, None),  # OpenSSL sends no SNI for an IP
]


@pytest.mark.parametrize(("server_hostname", "alpn", "maximum", "name"), REAL_HELLOS)
def test_real_client_hello(
    server_hostname: str | None, alpn: list[str] | None, maximum: ssl.TLSVersion, name: str | None
) -> None:
    wire = python_hello(server_hostname, alpn, maximum)
    hello = hello_of(wire)
    assert isinstance(hello, ClientHello)
    assert hello.alpn == tuple(alpn or ())
    assert hello.size == len(wire) - 5
    revealed = reveal_final(wire)
    assert revealed == Revealed("tls", name, True, alpn=tuple(alpn or ()),
                                tls_versions=hello.versions)
    if maximum == ssl.TLSVersion.TLSv1_2:
        assert 0x0304 not in hello.versions
    else:
        assert hello.versions[0] == 0x0304


def test_every_split_of_a_real_hello_gives_the_same_answer_at_the_same_byte() -> None:
    wire = python_hello("split.example", ["h2", "http/1.1"])
    whole = reveal_final(wire)
    assert whole is not None and whole.name == "split.example"
    for cut in range(len(wire) + 1):
        reader = FirstFlightReader()
        reader.feed(wire[:cut])
        assert (reader.result() is None) == (cut < len(wire))
        reader.feed(wire[cut:])
        assert reader.result() == whole
    reader = FirstFlightReader()
    for i in range(len(wire)):
        assert reader.result() is None
        reader.feed(wire[i : i + 1])
    assert reader.result() == whole


@pytest.mark.parametrize(
    "sizes",
    [[1], [4], [5, 5, 5], [1] * 40, [100, 1, 200], [2] * (MAX_HELLO_RECORDS - 1)],
)
def test_hello_over_several_records(sizes: list[int]) -> None:
    wire = python_hello("records.example", ["h2"])
    fragmented = split_records(wire, sizes)
    assert fragmented.count(b"\x16\x03\x01") >= 2
    expected = reveal_final(wire)
    assert reveal_final(fragmented) == expected
    for cut in range(0, len(fragmented), 7):  # and across feeds at the same time
        reader = FirstFlightReader()
        reader.feed(fragmented[:cut])
        reader.feed(fragmented[cut:])
        assert reader.result() == expected


def test_hello_over_too_many_records_is_refused() -> None:
    wire = python_hello("records.example")
    fragmented = split_records(wire, [1] * MAX_HELLO_RECORDS)
    result = hello_of(fragmented)
    assert isinstance(result, HelloRejected) and result.kind == "too-large"
    assert reveal(fragmented).valid is False


def test_grease_everywhere_is_tolerated() -> None:
    exts = [
        (0x0A0A, b""),
        sni_ext((0, b"grease.example")),
        versions_ext(0x3A3A, 0x0304, 0x0303),
        alpn_ext(b"h2", b"http/1.1"),
        (0xFAFA, b"\x00"),
    ]
    wire = built_hello(exts, suites=b"\x5a\x5a\x13\x01")
    hello = hello_of(wire)
    assert isinstance(hello, ClientHello)
    assert hello.versions == (0x0304, 0x0303)
    assert hello.extensions == (0x0A0A, 0, 43, 16, 0xFAFA)
    assert reveal_final(wire) == Revealed(
        "tls", "grease.example", True, alpn=("h2", "http/1.1"), tls_versions=(0x0304, 0x0303)
    )
    assert [v for v in range(0x10000) if is_grease(v)] == [0x0A0A + 0x1010 * i for i in range(16)]


def test_ech_and_extension_order() -> None:
    wire = built_hello([sni_ext((0, b"public.example")), (0xFE0D, b"\x00\x01\x02"), (0x0A0A, b"")])
    assert reveal_final(wire) == Revealed("tls", "public.example", True, ech=True)


def test_sslv2_compatible_hello_is_tls_without_a_name() -> None:
    # SSLv2 record header (length 0x2e), CLIENT-HELLO, version 3.1, then cipher specs.
    v2 = b"\x80\x2e\x01\x03\x01\x00\x15\x00\x00\x00\x10" + b"\x00" * 0x25
    assert reveal_final(v2[:5]) == Revealed("tls", None, True)
    hello = hello_of(v2)
    assert isinstance(hello, ClientHello) and hello.sslv2 and hello.sni is None
    assert reveal_final(b"\x80\x2e\x01\x00\x02") == Revealed("tls", None, True)


@pytest.mark.parametrize(
    "wire",
    [
        b"\x80\x2e\x04",  # SSLv2 header, not a CLIENT-HELLO
        b"\x80\x2e\x01\x05",
        b"\x80\x2e\x01\x00\x03",
        b"\x16\x04",  # handshake type, record version 4.x
        b"\x16\x00",
        b"\xff",  # a binary byte: SSLv2 needs a CLIENT-HELLO at byte 2
    ],
)
def test_not_tls_is_decided_on_the_first_byte_that_says_so(wire: bytes) -> None:
    if wire == b"\xff":
        assert reveal_final(wire) is None
        wire += b"\x00\x00"
    assert reveal_final(wire) == Revealed("unknown", None, True, reason=reveal(wire).reason)
    assert reveal_final(wire[:-1]) is None


@pytest.mark.parametrize(
    ("sni", "name", "valid"),
    [
        ((0, b"odd\x00.example"), None, False),
        ((0, b"\xc3\x28.example"), None, False),  # not UTF-8
        ((0, b"a" * 300), None, False),
        ((0, b"under_score.example"), "under_score.example", True),
        ((0, b"10.0.0.1"), "10.0.0.1", True),
        ((0, b"EXAMPLE.org."), "example.org", True),
    ],
)
def test_sni_shapes(sni: tuple[int, bytes], name: str | None, valid: bool) -> None:
    revealed = reveal_final(built_hello([sni_ext(sni)]))
    assert revealed is not None
    assert (revealed.protocol, revealed.name, revealed.valid) == ("tls", name, valid)
    if not valid:
        assert revealed.raw_name and revealed.reason


def test_sni_other_name_types_are_skipped_and_no_sni_is_no_name() -> None:
    assert reveal_final(built_hello([sni_ext((1, b"x"), (0, b"b.example"))])) == Revealed(
        "tls", "b.example", True
    )
    assert reveal_final(built_hello([sni_ext((7, b"b.example"))])) == Revealed("tls", None, True)
    assert reveal_final(built_hello([alpn_ext(b"h2")])) == Revealed("tls", None, True, alpn=("h2",))
    assert reveal_final(built_hello(None)) == Revealed("tls", None, True)


MALFORMED_HELLOS = {
    "two host names": built_hello([sni_ext((0, b"a.example"), (0, b"b.example"))]),
    "empty server_name list": built_hello([(0, vec(2, b""))]),
    "empty server_name": built_hello([sni_ext((0, b""))]),
    "server_name past its list": built_hello([(0, vec(2, b"\x00\x00\x09abc"))]),
    "bytes after server_name list": built_hello([(0, vec(2, b"\x00" + vec(2, b"a")) + b"x")]),
    "extension past the block": built_hello(None, trailer=b"\x00\x0a\x00\x00\x00\x05ab"),
    "empty ALPN list": built_hello([alpn_ext()]),
    "empty ALPN name": built_hello([alpn_ext(b"")]),
    "ALPN name past the list": built_hello([(16, vec(2, b"\x05h2"))]),
    "odd supported_versions": built_hello([(43, b"\x03\x03\x04\x03")]),
    "empty supported_versions": built_hello([versions_ext()]),
    "duplicate extension": built_hello([alpn_ext(b"h2"), alpn_ext(b"h2")]),
    "session id over 32": built_hello([], session_id=b"\x00" * 33),
    "odd cipher suites": built_hello([], suites=b"\x13\x01\x13"),
    "no cipher suites": built_hello([], suites=b""),
    "no compression": built_hello([], compression=b""),
    "trailing bytes": built_hello([], trailer=b"\x00"),
    "not a ClientHello": records(handshake(hello_body([]), msg_type=2)),
    "hello shorter than its fields": records(handshake(b"\x03\x03" + b"\x00" * 10)),
    "record of length 0": b"\x16\x03\x01\x00\x00",
    "record over 16 KiB": b"\x16\x03\x01\x40\x01" + b"\x01" * 10,
    "alert inside the hello": records(handshake(hello_body([])), [10])[:15]
    + b"\x15\x03\x03\x00\x02\x02\x28",
    "second record version 2.x": records(handshake(hello_body([])), [10])[:15] + b"\x16\x02\x00",
}


@pytest.mark.parametrize("name", list(MALFORMED_HELLOS))
def test_malformed_hello_is_refused_never_raised(name: str) -> None:
    wire = MALFORMED_HELLOS[name]
    hello = hello_of(wire)
    assert isinstance(hello, HelloRejected), hello
    assert hello.kind == "malformed" and hello.reason
    revealed = reveal_final(wire)
    assert revealed is not None
    assert (revealed.protocol, revealed.name, revealed.valid) == ("tls", None, False)


def test_oversized_hello_is_refused_on_its_length_field() -> None:
    header = b"\x16\x03\x01\x40\x00\x01" + (MAX_CLIENT_HELLO).to_bytes(3, "big")
    result = hello_of(header + b"\x03\x03")
    assert result is None  # the record must complete first
    result = hello_of(header + b"\x00" * (0x4000 - 4))
    assert isinstance(result, HelloRejected) and result.kind == "too-large"
    padding = MAX_CLIENT_HELLO - len(handshake(hello_body([(0xABCD, b"")])))
    just_fits = handshake(hello_body([(0xABCD, b"\x00" * padding)]))
    assert len(just_fits) == MAX_CLIENT_HELLO
    assert isinstance(hello_of(records(just_fits, [0x4000])), ClientHello)
    assert reveal_final(records(just_fits, [0x4000])) == Revealed("tls", None, True)


def test_truncated_hello_is_refused_at_finish() -> None:
    wire = python_hello("cut.example")
    for cut in (1, 3, 5, 9, len(wire) // 2, len(wire) - 1):
        reader = FirstFlightReader()
        reader.feed(wire[:cut])
        assert reader.result() is None
        revealed = reader.finish()
        assert (revealed.protocol, revealed.name, revealed.valid) == ("tls", None, False)
        assert reader.finish() is revealed and reader.result() is revealed
        reader.feed(wire[cut:])
        assert reader.result() is revealed
    standalone = ClientHelloReader()
    assert isinstance(standalone.finish(), HelloRejected)


# --------------------------------------------------------------------------- HTTP/1


HTTP1 = [
    # (request head, protocol, name, valid, port, connect)
    (b"GET / HTTP/1.1\r\nHost: A.Example\r\n\r\n", "http1", "a.example", True, None, False),
    (b"GET / HTTP/1.1\r\nhost:a.example:8080 \r\nAccept: */*\r\n\r\n", "http1", "a.example", True, 8080, False),
    (b"GET / HTTP/1.1\nHost: bare-lf.example\n\n", "http1", "bare-lf.example", True, None, False),
    (b"\r\nGET / HTTP/1.1\r\nHost: a.example\r\n\r\n", "http1", "a.example", True, None, False),
    (b"BREW /pot HTTP/1.1\r\nHost: tea.example\r\n\r\n", "http1", "tea.example", True, None, False),
    (b"GET http://abs.example/x HTTP/1.1\r\nHost: abs.example\r\n\r\n", "http1", "abs.example", True, None, False),
    (b"GET http://abs.example:81/x HTTP/1.1\r\n\r\n", "http1", "abs.example", True, 81, False),
    (b"GET https://[2001:db8::1]:8443 HTTP/1.1\r\nHost: [2001:db8::1]:8443\r\n\r\n", "http1", "2001:db8::1", True, 8443, False),
    (b"GET http://abs.example/ HTTP/1.1\r\nHost: other.example\r\n\r\n", "http1", "abs.example", False, None, False),
    (b"GET http://good.example@evil.example/ HTTP/1.1\r\n\r\n", "http1", None, False, None, False),
    (b"GET http:///x HTTP/1.1\r\n\r\n", "http1", None, False, None, False),
    (b"GET mailto:x HTTP/1.1\r\n\r\n", "http1", None, False, None, False),
    (b"CONNECT tunnel.example:443 HTTP/1.1\r\nHost: tunnel.example:443\r\n\r\n", "http1", "tunnel.example", True, 443, True),
    (b"CONNECT [::1]:22 HTTP/1.1\r\n\r\n", "http1", "::1", True, 22, True),
    (b"CONNECT tunnel.example HTTP/1.1\r\n\r\n", "http1", None, False, None, True),
    (b"CONNECT / HTTP/1.1\r\nHost: a.example\r\n\r\n", "http1", None, False, None, True),
    (b"OPTIONS * HTTP/1.1\r\nHost: star.example\r\n\r\n", "http1", "star.example", True, None, False),
    (b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n", "http1", None, False, None, False),
    (b"GET / HTTP/1.1\r\nHost: a.example\r\nHOST: a.example\r\n\r\n", "http1", None, False, None, False),
    (b"GET / HTTP/1.1\r\nHost : a.example\r\n\r\n", "http1", None, False, None, False),
    (b"GET / HTTP/1.1\r\nX: y\r\n z\r\nHost: a.example\r\n\r\n", "http1", None, False, None, False),
    (b"GET / HTTP/1.1\r\nHost: a.example\rX: y\r\n\r\n", "http1", None, False, None, False),
    (b"GET / HTTP/1.1\r\nHost: a.example, b.example\r\n\r\n", "http1", None, False, None, False),
    (b"GET / HTTP/1.1\r\nHost: a\x00.example\r\n\r\n", "http1", None, False, None, False),
    (b"GET / HTTP/1.1\r\nHost: caf\xc3\xa9.example\r\n\r\n", "http1", "xn--caf-dma.example", True, None, False),
    (b"GET / HTTP/1.1\r\nHost: 10.1.2.3:8080\r\n\r\n", "http1", "10.1.2.3", True, 8080, False),
    (b"GET / HTTP/1.1\r\n\r\n", "http1", None, False, None, False),
    (b"GET / HTTP/1.0\r\n\r\n", "http1", None, True, None, False),
    (b"GET / HTTP/1.1\r\nHost:\r\n\r\n", "http1", None, True, None, False),
    (b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\nPOST-body garbage \x00\xff", "http1", "a.example", True, None, False),
    # not HTTP/1 at all
    (b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n", "unknown", None, True, None, False),
    (b"SSH-2.0-OpenSSH_9.2p1\r\n", "unknown", None, True, None, False),
    (b"EHLO client.example\r\n", "unknown", None, True, None, False),
    (b"*1\r\n$4\r\nPING\r\n", "unknown", None, True, None, False),
    (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", "unknown", None, True, None, False),
    (b"GET / HTTP/2.0\r\n\r\n", "unknown", None, True, None, False),
    (b"GET / HTTP/1.1 \r\n\r\n", "unknown", None, True, None, False),
    (b"GET  / HTTP/1.1\r\n\r\n", "unknown", None, True, None, False),
    (b"GET /\r\n\r\n", "unknown", None, True, None, False),
    (b"GET /caf\xc3\xa9 HTTP/1.1\r\n\r\n", "unknown", None, True, None, False),
    (b"\r\r\n", "unknown", None, True, None, False),
]


@pytest.mark.parametrize(("head", "protocol", "name", "valid", "port", "connect"), HTTP1)
def test_http1_heads(
    head: bytes, protocol: str, name: str | None, valid: bool, port: int | None, connect: bool
) -> None:
    revealed = reveal_final(head)
    assert revealed is not None, "decided on these bytes alone"
    assert (revealed.protocol, revealed.name, revealed.valid, revealed.port, revealed.connect) == (
        protocol, name, valid, port, connect
    )
    assert valid or revealed.reason
    for cut in range(len(head) + 1):  # any split, the same answer
        reader = FirstFlightReader()
        reader.feed(head[:cut])
        reader.feed(head[cut:])
        assert reader.result() == revealed


@pytest.mark.parametrize(
    ("head", "decided_at"),
    [
        (b"SSH-2.0-OpenSSH_9.2p1\r\n", len(b"SSH-2.0-OpenSSH_9.2p1\r")),  # CR where SP must be
        (b"\x00\x00\x00\x08", 1),
        (b"{\"jsonrpc\": 1}", 1),  # '{' is no token character
        (b"GET /a\tb HTTP/1.1", len(b"GET /a\t")),
        (b"GET / HTTP/2.0", len(b"GET / HTTP/2")),
        (b"GET / HTTP/1.1\r\n\r\n", len(b"GET / HTTP/1.1\r\n\r\n")),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SETTINGS, None),
        (b"PRI * HTTP/2.1", len(b"PRI * HTTP/2.1")),  # HTTP/1 is out at "2", h2 at "1"
    ],
)
def test_decided_on_the_byte_that_decides(head: bytes, decided_at: int | None) -> None:
    reader = FirstFlightReader()
    decided = None
    for i in range(len(head)):
        reader.feed(head[i : i + 1])
        if decided is None and reader.result() is not None:
            decided = i + 1
    assert decided == decided_at


@pytest.mark.parametrize(
    "partial",
    [b"G", b"GET", b"GET / HTTP/1.1", b"GET / HTTP/1.1\r\nHost: a.example\r\n", b"\r\n",
     b"CONNECT a.example:443 HTTP/1.1\r\n"],
)
def test_an_unfinished_http1_head_is_refused_not_waved_on(partial: bytes) -> None:
    reader = FirstFlightReader()
    reader.feed(partial)
    assert reader.result() is None
    revealed = reader.finish()
    assert (revealed.protocol, revealed.valid) == ("http1", False)
    if partial.startswith(b"CONNECT"):
        assert (revealed.name, revealed.port, revealed.connect) == ("a.example", 443, True)


def test_http1_head_over_the_bound_is_refused() -> None:
    head = b"GET / HTTP/1.1\r\nHost: a.example\r\nCookie: " + b"c" * MAX_REQUEST_HEAD
    revealed = reveal_final(head)
    assert revealed is not None and (revealed.protocol, revealed.valid) == ("http1", False)
    fits = b"GET / HTTP/1.1\r\nHost: a.example\r\nCookie: "
    fits += b"c" * (MAX_REQUEST_HEAD - len(fits) - 4) + b"\r\n\r\n"
    assert len(fits) == MAX_REQUEST_HEAD
    assert reveal_final(fits) == Revealed("http1", "a.example", True)
    reader = Http1HeadReader()
    reader.feed(head * 3)
    assert reader.result() == revealed


# --------------------------------------------------------------------------- HTTP/2


H2 = [
    (h2_preamble(GET_A), "a.example", True, None, False),
    (h2_preamble([(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "B.Example:8080")]),
     "b.example", True, 8080, False),
    (h2_preamble([(":method", "GET"), (":path", "/"), (":scheme", "http"), ("host", "h.example")]),
     "h.example", True, None, False),
    (h2_preamble([*GET_A, ("host", "a.example")]), "a.example", True, None, False),
    (PREFACE + SETTINGS + frame(1, 0x4, 1, block([*GET_A, ("host", "other.example")])),
     "a.example", False, None, False),
    (PREFACE + SETTINGS + frame(1, 0x4, 1, block(GET_A[:3])), None, False, None, False),
    (PREFACE + SETTINGS + frame(1, 0x4, 1, block([(":method", "CONNECT"), (":authority", "t.example:443")])),
     "t.example", True, 443, True),
    (PREFACE + SETTINGS + frame(1, 0x4, 1, block([*GET_A[:3], (":authority", "bad\x01.example")])),
     None, False, None, False),
    (PREFACE + SETTINGS + frame(1, 0x4, 1, block([*GET_A, (":authority", "b.example")])),
     None, False, None, False),
]


@pytest.mark.parametrize(("wire", "name", "valid", "port", "connect"), H2)
def test_h2_prior_knowledge(
    wire: bytes, name: str | None, valid: bool, port: int | None, connect: bool
) -> None:
    revealed = reveal_final(wire)
    assert revealed is not None
    assert (revealed.protocol, revealed.name, revealed.valid, revealed.port, revealed.connect) == (
        "h2", name, valid, port, connect
    )
    for cut in range(len(wire) + 1):
        reader = FirstFlightReader()
        reader.feed(wire[:cut])
        reader.feed(wire[cut:])
        assert reader.result() == revealed


def test_h2_header_block_over_continuation_frames_with_padding_and_priority() -> None:
    encoded = block(GET_A)
    a, b, c = encoded[:3], encoded[3:7], encoded[7:]
    headers = frame(1, 0x8 | 0x20, 1, b"\x02" + b"\x00\x00\x00\x00\x10" + a + b"\x00\x00")
    wire = (PREFACE + SETTINGS + frame(8, 0, 0, b"\x00\x00\xff\xff") + frame(0xBB, 0, 0, b"ext")
            + headers + frame(9, 0, 1, b) + frame(9, 0x4, 1, c))
    reader = FirstFlightReader()
    reader.feed(wire[:-1])
    assert reader.result() is None
    reader.feed(wire[-1:])
    assert reader.result() == Revealed("h2", "a.example", True)


H2_BROKEN = {
    "no SETTINGS first": PREFACE + frame(1, 0x4, 1, block(GET_A)),
    "SETTINGS ack first": PREFACE + frame(4, 1, 0, b"") + frame(1, 0x4, 1, block(GET_A)),
    "DATA before headers": PREFACE + SETTINGS + frame(0, 0, 1, b"x"),
    "HEADERS on stream 0": PREFACE + SETTINGS + frame(1, 0x4, 0, block(GET_A)),
    "HEADERS on stream 2": PREFACE + SETTINGS + frame(1, 0x4, 2, block(GET_A)),
    "CONTINUATION alone": PREFACE + SETTINGS + frame(9, 0x4, 1, block(GET_A)),
    "interrupted block": PREFACE + SETTINGS + frame(1, 0, 1, block(GET_A)[:3]) + SETTINGS,
    "CONTINUATION on another stream": PREFACE + SETTINGS + frame(1, 0, 1, block(GET_A)[:3])
    + frame(9, 0x4, 3, block(GET_A)[3:]),
    "frame over 16 KiB": PREFACE + SETTINGS + b"\x00\x40\x01\x01\x04\x00\x00\x00\x01",
    "padding past the payload": PREFACE + SETTINGS + frame(1, 0x8 | 0x4, 1, b"\x09abc"),
    "priority past the payload": PREFACE + SETTINGS + frame(1, 0x20 | 0x4, 1, b"\x00\x00"),
    "HPACK garbage": PREFACE + SETTINGS + frame(1, 0x4, 1, b"\xff\xff\xff\xff\xff\xff"),
    "HPACK table index out of range": PREFACE + SETTINGS + frame(1, 0x4, 1, b"\xfe"),
    "two :authority": PREFACE + SETTINGS + frame(
        1, 0x4, 1, hpack.Encoder().encode([*GET_A, (":authority", "a.example")])
    ),
    "CONTINUATION flood": PREFACE + SETTINGS + frame(1, 0, 1, block(GET_A)[:3])
    + frame(9, 0, 1, b"\x00" * 16000) + frame(9, 0, 1, b"\x00" * 1000),
    "GOAWAY first": PREFACE + SETTINGS + frame(7, 0, 0, b"\x00" * 8),
}


@pytest.mark.parametrize("name", list(H2_BROKEN))
def test_h2_broken_preambles_are_refused(name: str) -> None:
    revealed = reveal(H2_BROKEN[name])
    assert (revealed.protocol, revealed.name, revealed.valid) == ("h2", None, False), revealed
    assert revealed.reason


def test_hpack_bomb_is_bounded() -> None:
    # One 4 KiB literal added to the dynamic table, then referenced over and over.
    encoder = hpack.Encoder()
    first = encoder.encode([*GET_A, ("x-bomb", "b" * 4000)])
    again = encoder.encode([("x-bomb", "b" * 4000)]) * 200  # one byte each
    assert len(again) < 1000
    revealed = reveal(PREFACE + SETTINGS + frame(1, 0x4, 1, first + again))
    assert (revealed.protocol, revealed.valid) == ("h2", False)


def test_h2_preface_prefix_then_stop() -> None:
    for cut in range(1, len(PREFACE) + 1):
        reader = FirstFlightReader()
        reader.feed(PREFACE[:cut])
        assert reader.result() is None
        revealed = reader.finish()
        assert revealed.valid is False and revealed.protocol in ("http1", "h2")
    standalone = H2HeadReader()
    standalone.feed(PREFACE + SETTINGS)
    assert standalone.result() is None
    assert standalone.finish().valid is False


# --------------------------------------------------------------------------- the stage


def test_nothing_sent_is_unknown_and_valid() -> None:
    reader = FirstFlightReader()
    reader.feed(b"")
    assert reader.result() is None
    assert reader.finish() == Revealed("unknown", None, True, reason="the client sent nothing")


def test_first_flight_bound_decides_without_more_bytes() -> None:
    # Connection frames may precede the first request; they may not go on forever.
    ping = frame(6, 0, 0, b"\x00" * 8)
    wire = PREFACE + SETTINGS + ping * (MAX_FIRST_FLIGHT // len(ping) + 1)
    reader = FirstFlightReader()
    for i in range(0, MAX_FIRST_FLIGHT - 1, 1000):
        reader.feed(wire[i : min(i + 1000, MAX_FIRST_FLIGHT - 1)])
    assert reader.result() is None
    reader.feed(wire[MAX_FIRST_FLIGHT - 1 :] + b"\x00" * 100_000)
    final = reader.result()
    assert final is not None and (final.protocol, final.valid) == ("h2", False)
    reader.feed(b"more")
    assert reader.result() is final and reader.finish() is final
