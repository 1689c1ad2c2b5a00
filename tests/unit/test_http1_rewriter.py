"""The HTTP/1 rewriter: substitution, violations, smuggling shapes, echo masking, upgrades."""

from __future__ import annotations

import base64
import json

import pytest

from corral.config import SecretEntry, ViolationAction
from corral.net.http1_rewriter import (
    MAX_HEAD_BYTES,
    Http1Rewriter,
    HttpError,
    Step,
    deny_response,
    parse_request_head,
)
from corral.net.secrets import MAX_SUBSTITUTED_BODY_BYTES, Channel, SecretTable
from tests.support import secret_cases as sc
from tests.support.http1_oracle import read_requests, read_responses

GH, GH_VALUE = sc.GH.encode(), sc.GH_VALUE.encode()
Q, Q_VALUE = sc.Q.encode(), sc.Q_VALUE.encode()


@pytest.fixture(scope="module")
def table() -> SecretTable:
    return sc.table()


def rw(
    table: SecretTable, sni: str | None = "api.github.com", pinned: bool = True, **kw: object
) -> Http1Rewriter:
    return Http1Rewriter(table, sni=sni, pinned=pinned, **kw)  # type: ignore[arg-type]


def feed(r: Http1Rewriter, *parts: bytes) -> Step:
    step = Step()
    for p in parts:
        step.merge(r.guest_data(p))
        if step.close:
            break
    return step


def up(step: Step) -> bytes:
    return b"".join(bytes(p) for p in step.to_upstream)


def guest(step: Step) -> bytes:
    return b"".join(bytes(p) for p in step.to_guest)


def hdr(m: object, name: bytes) -> list[bytes]:
    return [v for n, v in m.head.headers.raw_items() if n.lower() == name]  # type: ignore[attr-defined]


# -- the shared violation matrix --------------------------------------------------------------
def render(case: sc.SecretCase) -> bytes:
    """The case as the bytes an HTTP/1.1 client sends."""
    lines = [f"{case.method} {case.target} HTTP/1.1", f"Host: {case.authority}"]
    lines += [f"{n}: {v}" for n, v in case.headers]
    body = case.body
    if case.trailers:
        lines.append("Transfer-Encoding: chunked")
        half = len(body) // 2
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:half], body[half:]) if c)
        trailer = "".join(f"{n}: {v}\r\n" for n, v in case.trailers).encode()
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + chunks + b"0\r\n" + trailer + b"\r\n"
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def check_case(case: sc.SecretCase, step: Step) -> None:
    upstream = up(step)
    if case.expect == "violation":
        assert step.blocked and step.close, (case.id, step)
        v = step.violations[0]
        assert (v.secret, v.channel, v.action) == (case.secret, case.channel, case.action), (
            case.id,
            v,
        )
        for value in sc.VALUES.values():
            assert value.encode() not in upstream + guest(step), case.id
        msgs = read_requests(upstream)
        assert not any(m.complete for m in msgs), (case.id, upstream)
        return
    assert not step.blocked and not step.error, (case.id, step)
    msgs = read_requests(upstream)
    assert len(msgs) == 1 and msgs[0].complete, (case.id, upstream)
    m = msgs[0]
    text = m.head_bytes() + m.body + b"".join(n + b": " + v for n, v in m.trailers)
    sc.check_upstream(case, text)
    if case.expect == "passed":
        assert [(p.secret, p.channel) for p in step.passed] == [(case.secret, case.channel)]


@pytest.mark.parametrize("case", sc.cases_for("h1"), ids=lambda c: c.id)
def test_violation_matrix_whole(table: SecretTable, case: sc.SecretCase) -> None:
    r = rw(table, case.sni, case.pinned)
    check_case(case, feed(r, render(case)))


@pytest.mark.parametrize("case", sc.cases_for("h1"), ids=lambda c: c.id)
def test_violation_matrix_split_at_every_offset(table: SecretTable, case: sc.SecretCase) -> None:
    data = render(case)
    for cut in range(1, len(data)):
        r = rw(table, case.sni, case.pinned)
        check_case(case, feed(r, data[:cut], data[cut:]))


@pytest.mark.parametrize("case", sc.cases_for("h1")[:6], ids=lambda c: c.id)
def test_violation_matrix_byte_at_a_time(table: SecretTable, case: sc.SecretCase) -> None:
    data = render(case)
    r = rw(table, case.sni, case.pinned)
    check_case(case, feed(r, *(data[i : i + 1] for i in range(len(data)))))


def test_placeholder_at_every_offset_of_a_chunk_boundary(table: SecretTable) -> None:
    """A placeholder straddling two chunks at each split point, each chunk its own write."""
    for cut in range(len(GH) + 1):
        body = b"x=1&k=" + GH + b"&y=2"
        a, b = body[: 6 + cut], body[6 + cut :]
        head = b"POST /c HTTP/1.1\r\nHost: evil.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunks = [b"%x\r\n%s\r\n" % (len(c), c) for c in (a, b) if c] + [b"0\r\n\r\n"]
        r = rw(table, "evil.test")
        step = feed(r, head, *chunks)
        assert step.blocked and step.violations[0].channel is Channel.BODY, cut
        msgs = read_requests(up(step))
        assert not any(m.complete for m in msgs), cut
        # Not even the de-chunked body that did go upstream holds the whole placeholder.
        assert all(GH not in m.body for m in msgs), cut


def test_substituted_chunks_at_every_boundary_reach_allowed_host(table: SecretTable) -> None:
    """inject_body on: the value goes in wherever the chunk boundary falls."""
    for cut in range(len(Q) + 1):
        body = b"key=" + Q + b"&z"
        a, b = body[: 4 + cut], body[4 + cut :]
        head = b"POST /t HTTP/1.1\r\nHost: a.query.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunks = [b"%x\r\n%s\r\n" % (len(c), c) for c in (a, b) if c] + [b"0\r\n\r\n"]
        step = feed(rw(table, "a.query.test"), head, *chunks)
        (m,) = read_requests(up(step))
        assert m.complete and m.body == b"key=" + Q_VALUE + b"&z", cut


# -- substitution details -----------------------------------------------------------------
def test_content_length_recomputed(table: SecretTable) -> None:
    body = json.dumps({"k": sc.Q}).encode()
    req = (
        b"POST /v HTTP/1.1\r\nHost: a.query.test\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body)
    )
    step = feed(rw(table, "a.query.test"), req)
    (m,) = read_requests(up(step))
    assert json.loads(m.body) == {"k": sc.Q_VALUE}
    assert dict(m.head.headers.raw_items())[b"Content-Length"] == str(len(m.body)).encode()


def test_substitution_asks_for_identity_encoding(table: SecretTable) -> None:
    req = (
        b"GET / HTTP/1.1\r\nHost: api.github.com\r\nAccept-Encoding: gzip, br\r\nAuthorization: Bearer "
        + GH
        + b"\r\n\r\n"
    )
    (m,) = read_requests(up(feed(rw(table), req)))
    assert hdr(m, b"accept-encoding") == [b"identity"]
    clean = b"GET / HTTP/1.1\r\nHost: api.github.com\r\nAccept-Encoding: gzip\r\n\r\n"
    (m,) = read_requests(up(feed(rw(table), clean)))
    assert dict(m.head.headers.raw_items())[b"Accept-Encoding"] == b"gzip"


def test_expect_continue_answered_when_buffering(table: SecretTable) -> None:
    head = b"POST /t HTTP/1.1\r\nHost: a.query.test\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
    r = rw(table, "a.query.test")
    s1 = r.guest_data(head)
    assert guest(s1) == b"HTTP/1.1 100 Continue\r\n\r\n" and up(s1) == b""
    (m,) = read_requests(up(r.guest_data(b"abcd")))
    assert b"expect" not in [n.lower() for n, _ in m.head.headers.raw_items()]


def test_large_body_streams_without_substitution(table: SecretTable) -> None:
    n = MAX_SUBSTITUTED_BODY_BYTES + 10
    head = b"POST /u HTTP/1.1\r\nHost: a.query.test\r\nContent-Length: %d\r\n\r\n" % n
    r = rw(table, "a.query.test")
    step = r.guest_data(head)
    assert up(step) == head  # not held: the body is too big to substitute in
    body = b"z" * n
    piece = r.guest_data(body)
    assert piece.to_upstream == [body] and piece.to_upstream[0] is body  # a slice, no copy
    # Past the bound, a placeholder in the body is refused, not substituted.
    r = rw(table, "a.query.test")
    r.guest_data(head)
    step = r.guest_data(b"z" * 1000 + Q + b"z" * (n - 1000 - len(Q)))
    assert step.blocked and step.violations[0].channel is Channel.BODY


def test_chunked_body_over_the_bound_falls_back_to_streaming(table: SecretTable) -> None:
    head = b"POST /u HTTP/1.1\r\nHost: a.query.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    r = rw(table, "a.query.test")
    assert up(r.guest_data(head)) == b""  # held: substitution might be needed
    big = b"y" * (MAX_SUBSTITUTED_BODY_BYTES + 1)
    step = r.guest_data(b"%x\r\n%s\r\n" % (len(big), big))
    step.merge(r.guest_data(b"5\r\nhello\r\n0\r\n\r\n"))
    (m,) = read_requests(up(step))
    assert m.complete and m.body == big + b"hello"


def test_clean_bodies_pass_as_slices(table: SecretTable) -> None:
    head = b"PUT /f HTTP/1.1\r\nHost: evil.test\r\nContent-Length: 20000\r\n\r\n"
    r = rw(table, "evil.test")
    r.guest_data(head)
    data = bytes(range(256)) * 40
    step = r.guest_data(data[:10000])
    assert step.to_upstream[0] is not None and len(up(step)) == 10000
    last = r.guest_data(data[10000:])
    assert up(last) == data[10000:]


def test_pipelined_requests_and_responses(table: SecretTable) -> None:
    r = rw(table)
    reqs = (
        b"GET /a HTTP/1.1\r\nHost: api.github.com\r\nAuthorization: Bearer " + GH + b"\r\n\r\n"
        b"HEAD /b HTTP/1.1\r\nHost: api.github.com\r\n\r\n"
    )
    msgs = read_requests(up(feed(r, reqs)))
    assert [m.head.target for m in msgs] == [b"/a", b"/b"]  # type: ignore[union-attr]
    resp = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
        b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"  # HEAD: no body follows
    )
    out = guest(r.upstream_data(resp))
    got = read_responses(out, [b"GET", b"HEAD"])
    assert [m.body for m in got] == [b"hello", b""] and all(m.complete for m in got)


# -- smuggling shapes and malformed requests ---------------------------------------------------
SMUGGLING = {
    "two-content-lengths": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "content-length-list": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello",
    "cl-and-te": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-on-http10": b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-gzip": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    "te-twice": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n  folded\r\n\r\n",
    "space-before-colon": b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length : 5\r\n\r\nhello",
    "bare-lf": b"GET / HTTP/1.1\nHost: a\n\n",
    "bare-lf-in-field": b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\nY: 2\r\n\r\n",
    "bare-cr": b"GET / HTTP/1.1\r\nHost: a\rX: y\r\n\r\n",
    "nul-in-value": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
    "chunk-size-0x": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
    "chunk-size-negative": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n",
    "chunk-size-space-first": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n",
    "chunk-size-empty": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\r\n",
    "chunk-size-17-digits": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"1" * 17
    + b"\r\n",
    "chunk-size-plus": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n",
    "chunk-data-no-crlf": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
    "chunk-size-bare-lf": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
    "content-length-plus": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello",
    "content-length-hex": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\nhello",
    "two-hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "no-host": b"GET / HTTP/1.1\r\nX: y\r\n\r\n",
    "absolute-form-host-mismatch": b"GET http://b.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
    "http2-preface-on-h1": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "two-spaces": b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
    "space-in-target": b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
    "relative-target": b"GET a/b HTTP/1.1\r\nHost: a\r\n\r\n",
    "header-line-without-colon": b"GET / HTTP/1.1\r\nHost: a\r\nnocolon\r\n\r\n",
}


@pytest.mark.parametrize("name", list(SMUGGLING))
def test_smuggling_shapes_are_refused(table: SecretTable, name: str) -> None:
    r = rw(table, "a")
    step = feed(r, SMUGGLING[name])
    assert step.error and step.close, (name, step)
    # Head errors: nothing goes upstream. Body errors: the head may have gone, but never a
    # complete request (read by h11, an independent parser).
    assert not any(m.complete for m in read_requests(up(step))), name
    if not name.startswith("chunk"):
        assert up(step) == b"", name
    (resp,) = read_responses(guest(step), [b"GET"])
    assert resp.head.status_code in (400, 431, 501, 505), name
    assert r.closed


def test_oversized_head_is_refused(table: SecretTable) -> None:
    r = rw(table, "a")
    step = feed(r, b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * (MAX_HEAD_BYTES + 10))
    assert step.close and b" 431 " in guest(step)


def test_parse_request_head_errors_are_sentences() -> None:
    with pytest.raises(HttpError, match="obs-fold"):
        parse_request_head(b"GET / HTTP/1.1\r\nA: 1\r\n b")


# -- responses: echo masking --------------------------------------------------------------------
def _request(r: Http1Rewriter, method: bytes = b"GET", version: bytes = b"HTTP/1.1") -> None:
    s = r.guest_data(
        method
        + b" / "
        + version
        + b"\r\nHost: api.github.com\r\nAuthorization: Bearer "
        + GH
        + b"\r\n\r\n"
    )
    assert not s.blocked


def test_echo_in_headers_and_body_is_masked(table: SecretTable) -> None:
    r = rw(table)
    _request(r)
    body = b'{"headers": {"Authorization": "Bearer ' + GH_VALUE + b'"}}'
    resp = (
        b"HTTP/1.1 200 OK\r\nX-Echo: "
        + GH_VALUE
        + b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    out = guest(r.upstream_data(resp))
    assert GH_VALUE not in out
    (m,) = read_responses(out, [b"GET"])
    assert m.body == body.replace(GH_VALUE, GH) and m.complete
    assert dict(m.head.headers.raw_items())[b"X-Echo"] == GH
    assert hdr(m, b"transfer-encoding") == [b"chunked"] and not hdr(m, b"content-length")


def test_echo_split_at_every_offset(table: SecretTable) -> None:
    body = b"<p>you sent " + GH_VALUE + b"</p>"
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    for cut in range(1, len(resp)):
        r = rw(table)
        _request(r)
        out = guest(r.upstream_data(resp[:cut])) + guest(r.upstream_data(resp[cut:]))
        assert GH_VALUE not in out, cut
        (m,) = read_responses(out, [b"GET"])
        assert m.complete and m.body == body.replace(GH_VALUE, GH), cut


def test_echo_in_chunked_response_across_chunks(table: SecretTable) -> None:
    r = rw(table)
    _request(r)
    v = GH_VALUE
    resp = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (b"a" + v[:5], v[5:], b"b"))
        + b"0\r\n\r\n"
    )
    out = guest(r.upstream_data(resp))
    (m,) = read_responses(out, [b"GET"])
    assert m.body == b"a" + GH + b"b" and v not in out


def test_echo_of_basic_credentials_is_masked(table: SecretTable) -> None:
    r = rw(table)
    token = base64.b64encode(b"me:" + GH)
    r.guest_data(
        b"GET / HTTP/1.1\r\nHost: api.github.com\r\nAuthorization: Basic " + token + b"\r\n\r\n"
    )
    real = base64.b64encode(b"me:" + GH_VALUE)
    body = b'{"authorization": "Basic ' + real + b'"}'
    out = guest(
        r.upstream_data(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    )
    assert real not in out and token in out


def test_http10_client_gets_a_close_delimited_masked_body(table: SecretTable) -> None:
    r = rw(table)
    _request(r, version=b"HTTP/1.0")
    body = b"v=" + GH_VALUE
    step = r.upstream_data(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    out = guest(step)
    assert step.close and GH_VALUE not in out and out.endswith(b"v=" + GH)
    assert b"Content-Length" not in out.split(b"\r\n\r\n")[0]


def test_compressed_bodies_are_not_touched(table: SecretTable) -> None:
    r = rw(table)
    _request(r)
    body = b"\x1f\x8b" + GH_VALUE  # stands for gzip data: corral cannot look inside
    resp = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )
    assert guest(r.upstream_data(resp)) == resp


def test_no_masking_toward_hosts_that_get_no_secret(table: SecretTable) -> None:
    r = rw(table, "evil.test")
    r.guest_data(b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n")
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    step = r.upstream_data(resp)
    assert guest(step) == resp


def test_close_delimited_response(table: SecretTable) -> None:
    r = rw(table)
    _request(r)
    out = guest(r.upstream_data(b"HTTP/1.1 200 OK\r\n\r\nstart " + GH_VALUE[:4]))
    end = r.upstream_eof()
    out += guest(end)
    assert end.close and out.endswith(b"start " + GH_VALUE[:4])


def test_upstream_errors(table: SecretTable) -> None:
    r = rw(table)
    _request(r)
    step = r.upstream_data(b"HTTP/9 banana\r\n\r\n")
    assert step.close and b" 502 " in guest(step)
    r = rw(table)
    _request(r)
    r.upstream_data(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    end = r.upstream_eof()
    assert end.close and "middle of a response" in (end.error or "")
    r = rw(table)
    step = r.upstream_data(b"HTTP/1.1 200 OK\r\n\r\n")
    assert step.close and "without a request" in (step.error or "")


def test_guest_half_close(table: SecretTable) -> None:
    r = rw(table)
    _request(r)
    assert r.guest_eof().shutdown_upstream
    r = rw(table)
    r.guest_data(b"POST / HTTP/1.1\r\nHost: api.github.com\r\nContent-Length: 5\r\n\r\nab")
    eof = r.guest_eof()
    assert eof.close and eof.error


# -- upgrades and tunnels -----------------------------------------------------------------------
WS_REQ = (
    b"GET /chat HTTP/1.1\r\nHost: api.github.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"
)
WS_101 = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"


def ws_frame(payload: bytes, *, mask: bytes | None = b"\x01\x02\x03\x04", opcode: int = 1) -> bytes:
    first = 0x80 | opcode
    n = len(payload)
    mbit = 0x80 if mask else 0
    if n < 126:
        hdr = bytes((first, mbit | n))
    elif n < 65536:
        hdr = bytes((first, mbit | 126)) + n.to_bytes(2, "big")
    else:
        hdr = bytes((first, mbit | 127)) + n.to_bytes(8, "big")
    if not mask:
        return hdr + payload
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return hdr + mask + masked


def test_websocket_upgrade_then_scanned_frames(table: SecretTable) -> None:
    r = rw(table)
    step = r.guest_data(WS_REQ)
    (m,) = read_requests(up(step))
    assert b"sec-websocket-extensions" not in [n.lower() for n, _ in m.head.headers.raw_items()]
    assert guest(r.upstream_data(WS_101)) == WS_101 and r.upgraded
    clean = ws_frame(b"hello there")
    assert up(r.guest_data(clean)) == clean  # forwarded unchanged
    frame = ws_frame(b'{"token": "' + GH + b'"}')
    for cut in range(1, len(frame)):
        r2 = rw(table)
        r2.guest_data(WS_REQ)
        r2.upstream_data(WS_101)
        s = r2.guest_data(frame[:cut]).merge(r2.guest_data(frame[cut:]))
        assert s.blocked and s.violations[0].channel is Channel.WEBSOCKET, cut
        assert up(s).find(frame) == -1


def test_websocket_echo_masked_and_reframed(table: SecretTable) -> None:
    r = rw(table)
    r.guest_data(WS_REQ)
    r.upstream_data(WS_101)
    for payload in (b"echo: " + GH_VALUE, b"x" * 200 + GH_VALUE, b"y" * 70000 + GH_VALUE):
        frame = ws_frame(payload, mask=None)
        out = b"".join(
            guest(r.upstream_data(frame[i : i + 997])) for i in range(0, len(frame), 997)
        )
        want = ws_frame(payload.replace(GH_VALUE, GH), mask=None)
        assert out == want


def test_bytes_sent_before_101_are_held_then_scanned(table: SecretTable) -> None:
    r = rw(table)
    r.guest_data(WS_REQ)
    early = ws_frame(GH)
    assert up(r.guest_data(early)) == b""
    s = r.upstream_data(WS_101)
    assert s.blocked and s.violations[0].channel is Channel.WEBSOCKET


def test_declined_upgrade_resumes_http(table: SecretTable) -> None:
    r = rw(table)
    r.guest_data(WS_REQ)
    r.guest_data(b"GET /next HTTP/1.1\r\nHost: api.github.com\r\n\r\n")
    s = r.upstream_data(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    (m,) = read_requests(up(s))
    assert m.head.target == b"/next" and not r.upgraded  # type: ignore[union-attr]


def test_connect_tunnel_is_scanned(table: SecretTable) -> None:
    r = rw(table, None)
    s = r.guest_data(b"CONNECT api.github.com:443 HTTP/1.1\r\nHost: api.github.com:443\r\n\r\n")
    assert up(s).startswith(b"CONNECT api.github.com:443 HTTP/1.1\r\n")
    r.upstream_data(b"HTTP/1.1 200 Connection established\r\n\r\n")
    assert r.upgraded
    s = r.guest_data(b"\x16\x03\x01 some tls bytes " + GH)
    assert s.blocked and s.violations[0].channel is Channel.STREAM


# -- readable denials ---------------------------------------------------------------------------
def test_deny_response_text_and_json() -> None:
    text = deny_response("evil.test", reason="default egress is deny")
    (m,) = read_responses(text, [b"GET"])
    assert (
        m.head.status_code == 403
        and b"evil.test" in m.body
        and b"--rule allow@evil.test:tcp:443" in m.body
    )
    j = deny_response("evil.test", fmt="json", reason="default egress is deny")
    (m,) = read_responses(j, [b"GET"])
    doc = json.loads(m.body)
    assert doc["host"] == "evil.test" and "PolicyRule" in doc["how_to_allow"]


def test_blocked_request_gets_a_readable_403_when_configured(table: SecretTable) -> None:
    r = rw(table, "evil.test", deny_format="json")
    step = feed(r, b"GET / HTTP/1.1\r\nHost: evil.test\r\nX-Key: " + GH + b"\r\n\r\n")
    assert step.blocked and up(step) == b""
    (m,) = read_responses(guest(step), [b"GET"])
    doc = json.loads(m.body)
    assert (
        m.head.status_code == 403
        and "GH_TOKEN" in doc["reason"]
        and sc.GH_VALUE not in m.body.decode()
    )
    # Without deny_response: the connection is just dropped.
    step = feed(
        rw(table, "evil.test"), b"GET / HTTP/1.1\r\nHost: evil.test\r\nX-Key: " + GH + b"\r\n\r\n"
    )
    assert step.blocked and guest(step) == b""


# -- tables and actions -------------------------------------------------------------------------
def test_empty_table_is_a_pass_through_parser() -> None:
    r = Http1Rewriter(SecretTable([]), sni="x.test", pinned=True)
    req = b"POST /p HTTP/1.1\r\nHost: x.test\r\nContent-Length: 3\r\n\r\nabc"
    assert up(feed(r, req)) == req


def test_step_action_is_the_most_severe(table: SecretTable) -> None:
    step = feed(
        rw(table, "evil.test"),
        b"GET / HTTP/1.1\r\nHost: evil.test\r\nA: "
        + GH
        + b"\r\nB: "
        + sc.TERM.encode()
        + b"\r\n\r\n",
    )
    assert {v.secret for v in step.violations} == {"GH_TOKEN", "TERM_KEY"}
    assert step.action is ViolationAction.BLOCK_AND_TERMINATE


def test_value_never_sent_where_not_allowed() -> None:
    """A secret allowed for a.test, a connection to a.test whose Host is b.test: no value."""
    t = SecretTable.from_entries(
        [SecretEntry(env_var="K", value="the-value", allowed_hosts=["a.test"])], environ={}
    )
    r = Http1Rewriter(t, sni="a.test", pinned=True)
    step = feed(r, b"GET / HTTP/1.1\r\nHost: b.test\r\nX: $CORRAL_SECRET_K\r\n\r\n")
    assert step.blocked and b"the-value" not in up(step)
