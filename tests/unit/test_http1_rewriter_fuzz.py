"""Fuzz the HTTP/1 rewriter: a seeded mutation loop over the shared cases, and hypothesis.

Every input is a mutated request stream (byte edits, planted placeholders in random
encodings, duplicated lines, changed lengths and hosts, pipelining, truncation) on a random
connection (allowed host or not, pinned or not, plain), cut into random writes, followed by
a response that echoes the values. For every input:
- no exception escapes the rewriter and every call returns (pytest-timeout catches a hang);
- what goes upstream, read by h11 (an independent parser), never holds a secret's value
  unless the connection's SNI is an allowed host of that secret, the address is pinned and
  the request's Host equals the SNI;
- no request upstream holds a placeholder (in any encoding the detector knows), whole or
  cut off, unless its host may receive it (``allow_placeholder_for``);
- the guest never receives a value in a response from a host that was sent one.
FUZZ_INPUTS inputs from a fixed seed (CI-sized); CORRAL_FUZZ_SCALE runs more.
"""

from __future__ import annotations

import base64
import os
import random
import urllib.parse

import h11
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.net.http1_rewriter import Http1Rewriter, Step
from corral.net.secrets import SecretTable, normalize_host
from tests.support import secret_cases as sc
from tests.support.http1_oracle import read_requests
from tests.unit.test_http1_rewriter import SMUGGLING, render

SCALE = float(os.environ.get("CORRAL_FUZZ_SCALE", "1"))
FUZZ_INPUTS = int(100_000 * SCALE)

TABLE: SecretTable = sc.table()
VALUES = {name: v.encode() for name, v in sc.VALUES.items()}
SEEDS = (
    [render(c) for c in sc.cases_for("h1")]
    + list(SMUGGLING.values())
    + [
        b"GET /a HTTP/1.1\r\nHost: api.github.com\r\n\r\nGET /b HTTP/1.1\r\nHost: api.github.com\r\n\r\n",
        b"POST /f HTTP/1.1\r\nHost: a.query.test\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n4\r\nk=%2\r\n4\r\n4COR\r\n12\r\nRAL_SECRET_QTOKEN&\r\n0\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: api.github.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        b"\x81\x85\x01\x02\x03\x04ig\x6f\x68n",
    ]
)
SNIS = ["api.github.com", "a.query.test", "term.test", "api.llm.test", "evil.test", None]
HOSTS = [b"api.github.com", b"a.query.test", b"evil.test", b"API.GITHUB.COM:443", b"term.test"]
PLANTS = [
    sc.GH.encode(),
    sc.Q.encode(),
    sc.TERM.encode(),
    urllib.parse.quote(sc.GH, safe="").encode(),
    b"%24CORRAL_SECRET_QTOKEN",
    b"\\u0024CORRAL_SECRET_TERM_KEY",
    base64.b64encode(b"u:" + sc.GH.encode()),
    b"Basic " + base64.b64encode(b"x:" + sc.Q.encode()),
    b"&#36;CORRAL_SECRET_GH_TOKEN",
]
RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\n\r\n%s",
]


def mutate(rng: random.Random, data: bytes) -> bytes:
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(9)
        n = len(data)
        i = rng.randrange(n + 1)
        if op == 0 and n:  # flip a byte
            data = data[:i] + bytes((rng.randrange(256),)) + data[i + 1 :]
        elif op == 1:  # plant a placeholder
            data = data[:i] + rng.choice(PLANTS) + data[i:]
        elif op == 2 and n:  # delete a run
            data = data[:i] + data[i + rng.randrange(1, 8) :]
        elif op == 3:  # duplicate a line
            lines = data.split(b"\r\n")
            j = rng.randrange(len(lines))
            lines.insert(j, lines[j])
            data = b"\r\n".join(lines)
        elif op == 4:  # change a number
            digits = [k for k, c in enumerate(data) if 48 <= c <= 57]
            if digits:
                k = rng.choice(digits)
                data = data[:k] + str(rng.randrange(100)).encode() + data[k + 1 :]
        elif op == 5:  # another Host
            data = data.replace(b"Host: ", b"Host: " + rng.choice(HOSTS) + b"\r\nX-Old: ", 1)
        elif op == 6:  # pipelining: append another seed
            data = data + rng.choice(SEEDS)
        elif op == 7:  # truncate
            data = data[:i]
        else:  # CR/LF noise
            data = data[:i] + rng.choice([b"\r", b"\n", b"\r\n", b" ", b"\t", b":"]) + data[i:]
    return data


def cuts(rng: random.Random, data: bytes) -> list[bytes]:
    points = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(4)))
    out, prev = [], 0
    for p in [*points, len(data)]:
        out.append(data[prev:p])
        prev = p
    return [p for p in out if p]


def run(
    sni: str | None, pinned: bool, writes: list[bytes], response: bytes | None, rng: random.Random
) -> tuple[bytes, bytes, Step]:
    rw = Http1Rewriter(TABLE, sni=sni, pinned=pinned)
    total = Step()
    for w in writes:
        total.merge(rw.guest_data(w))
        if total.close:
            break
    if response is not None and not total.close:
        for w in cuts(rng, response):
            total.merge(rw.upstream_data(w))
            if total.close:
                break
        total.merge(rw.upstream_eof())
    upstream = b"".join(bytes(p) for p in total.to_upstream)
    guest = b"".join(bytes(p) for p in total.to_guest)
    return upstream, guest, total


def check(sni: str | None, pinned: bool, upstream: bytes, guest: bytes, echoed: bool) -> None:
    sni_n = normalize_host(sni)
    # The value goes only where the table allows it, whatever the request said.
    for name, value in VALUES.items():
        s = TABLE.secret(name)
        if value in upstream:
            assert sni_n is not None and s.is_allowed_host(sni_n) and pinned, (name, sni, upstream)
    if not upstream:
        return
    try:
        messages = read_requests(upstream)
    except h11.RemoteProtocolError as exc:  # corral emitted something no server would read
        raise AssertionError(f"h11 rejects corral's output: {exc}: {upstream!r}") from None
    for m in messages:
        host = normalize_host(
            dict((n.lower(), v) for n, v in m.head.headers.raw_items()).get(b"host")
        )
        if m.head.method == b"CONNECT":  # type: ignore[union-attr]
            host = normalize_host(m.head.target)  # type: ignore[union-attr]
        parts = [m.head_bytes(), m.body, b"".join(n + b": " + v + b"\r\n" for n, v in m.trailers)]
        for name, value in VALUES.items():
            if any(value in p for p in parts):
                assert host == sni_n, (name, host, sni, m)
        for part in parts:
            for name in TABLE.find(part):
                assert TABLE.secret(name).may_carry_placeholder(sni_n or host), (
                    name,
                    sni,
                    part,
                    upstream,
                )
    if echoed:
        for name, value in VALUES.items():
            if sni_n is not None and pinned and TABLE.secret(name).is_allowed_host(sni_n):
                assert value not in guest, (name, guest)


def one(rng: random.Random) -> None:
    data = mutate(rng, rng.choice(SEEDS)) if rng.random() < 0.9 else rng.choice(SEEDS)
    sni = rng.choice(SNIS)
    pinned = rng.random() < 0.8
    response = None
    if rng.random() < 0.5:
        value = rng.choice(list(VALUES.values()))
        body = b"echo " + value + b" end"
        tmpl = rng.choice(RESPONSES)
        response = tmpl % ((len(body), body) if b"%d" in tmpl or b"%x" in tmpl else (body,))
    upstream, guest, _ = run(sni, pinned, cuts(rng, data), response, rng)
    check(sni, pinned, upstream, guest, response is not None)


def test_rewriter_mutation_loop() -> None:
    rng = random.Random(0x4771)
    for _ in range(FUZZ_INPUTS):
        one(rng)


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, len(SEEDS) - 1),
    junk=st.binary(max_size=40),
    at=st.integers(0, 400),
    sni=st.sampled_from(SNIS),
    pinned=st.booleans(),
    split=st.lists(st.integers(0, 600), max_size=3),
)
def test_rewriter_property(
    seed: int, junk: bytes, at: int, sni: str | None, pinned: bool, split: list[int]
) -> None:
    base = SEEDS[seed]
    data = base[:at] + junk + base[at:]
    points = sorted(min(p, len(data)) for p in split)
    writes, prev = [], 0
    for p in [*points, len(data)]:
        writes.append(data[prev:p])
        prev = p
    upstream, guest, _ = run(sni, pinned, [w for w in writes if w], None, random.Random(0))
    check(sni, pinned, upstream, guest, False)
