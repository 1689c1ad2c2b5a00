"""Fuzzing the first-flight readers: hostile bytes never raise, hang, or depend on the split.

Two engines per reader family (TLS ClientHello, HTTP/1 head, HTTP/2 prior knowledge):

- a seeded mutation loop over valid seeds (bit flips, byte writes, truncation, insertion,
  deletion, duplicated slices, and corrupted length fields found by walking the seed's own
  structure, so the lengths that guard every parse get hit directly), and
- hypothesis, building structurally valid-ish inputs (random extensions, header lines,
  frames) that mutation alone rarely reaches.

Every input is fed to the family's own reader and to :class:`FirstFlightReader`, once whole
and once in random pieces; the properties: no exception, the result never changes once it
is set, ``finish`` returns it, and it is the same whatever the split. Counts: at least
100,000 inputs per family across both engines (``MUTATIONS_PER_FAMILY`` + hypothesis'
examples); the whole file runs in about 20 s on the 2-core CI machine.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from typing import Any

import hpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.net.clienthello import ClientHelloReader, HelloRejected
from corral.net.h2_head import PREFACE, H2HeadReader
from corral.net.http_head import Http1HeadReader
from corral.net.sniff import FirstFlightReader, Revealed
from tests.unit.test_net_sniff import (
    GET_A,
    SETTINGS,
    alpn_ext,
    block,
    built_hello,
    frame,
    h2_preamble,
    python_hello,
    sni_ext,
    split_records,
    versions_ext,
)

#: Mutated inputs per family (hypothesis adds HYPOTHESIS_EXAMPLES more each).
MUTATIONS_PER_FAMILY = 100_000
HYPOTHESIS_EXAMPLES = 400
#: Mutated inputs whose split-invariance is checked too (feeding in pieces costs more):
#: every SPLIT_EVERY-th one.
SPLIT_EVERY = 4
SEED = 20240607

Reader = Any  # ClientHelloReader | Http1HeadReader | H2HeadReader | FirstFlightReader


# --------------------------------------------------------------------------- seeds


def tls_seeds() -> list[bytes]:
    real = [
        python_hello("fuzz.example", ["h2", "http/1.1"]),
        python_hello("xn--bcher-kva.example"),
        python_hello(None, ["http/1.1"]),
    ]
    built = [
        built_hello([(0x0A0A, b""), sni_ext((0, b"grease.example")),
                     versions_ext(0x3A3A, 0x0304), alpn_ext(b"h2"), (0xFE0D, b"\x00" * 8)]),
        built_hello([sni_ext((1, b"x"), (0, b"two.example")), alpn_ext(b"a", b"bb", b"ccc")]),
        built_hello(None),
        b"\x80\x2e\x01\x03\x01\x00\x15\x00\x00\x00\x10" + b"\x00" * 0x25,
    ]
    fragmented = [split_records(real[0], [7, 100]), split_records(real[1], [1] * 12)]
    return real + built + fragmented


def http1_seeds() -> list[bytes]:
    return [
        b"GET / HTTP/1.1\r\nHost: a.example\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n",
        b"GET http://abs.example:8080/p?q HTTP/1.1\r\nHost: abs.example:8080\r\n\r\n",
        b"CONNECT tunnel.example:443 HTTP/1.1\r\nHost: tunnel.example:443\r\n\r\n",
        b"POST /x HTTP/1.0\nHost: [::1]:80\nContent-Length: 3\n\nabc",
        b"\r\nOPTIONS * HTTP/1.1\r\nHost: star.example\r\nX:  y \r\n\r\n",
        b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",
    ]


def h2_seeds() -> list[bytes]:
    encoded = block(GET_A)
    return [
        h2_preamble(GET_A),
        h2_preamble([(":method", "POST"), (":path", "/"), (":scheme", "https"),
                     (":authority", "b.example:8443"), ("content-type", "application/grpc")]),
        PREFACE + SETTINGS + frame(8, 0, 0, b"\x00\x00\xff\xff")
        + frame(1, 0x8 | 0x20, 1, b"\x02" + b"\x00" * 5 + encoded[:4] + b"\x00\x00")
        + frame(9, 0, 1, encoded[4:8]) + frame(9, 0x4, 1, encoded[8:]),
        PREFACE + SETTINGS + frame(1, 0x4, 1, block([(":method", "CONNECT"), ("host", "c.example:1")])),
    ]


# --------------------------------------------------------------------------- structure walks


def tls_length_fields(wire: bytes) -> list[tuple[int, int]]:
    """(offset, width) of every length field in a well-formed one-hello flight."""
    fields: list[tuple[int, int]] = []
    hs = b""
    pos = 0
    offsets = []  # wire offset of each handshake byte
    while pos + 5 <= len(wire) and wire[0] == 0x16:
        fields.append((pos + 3, 2))
        n = int.from_bytes(wire[pos + 3 : pos + 5], "big")
        hs += wire[pos + 5 : pos + 5 + n]
        offsets += range(pos + 5, pos + 5 + n)
        pos += 5 + n
    if len(hs) < 4:
        return fields

    def at(i: int, width: int) -> None:
        if i + width <= len(offsets):
            fields.append((offsets[i], 1))
            if width > 1:
                fields.append((offsets[i + width - 1], 1))

    at(1, 3)
    c = 4 + 2 + 32
    try:
        at(c, 1)
        c += 1 + hs[c]
        at(c, 2)
        c += 2 + int.from_bytes(hs[c : c + 2], "big")
        at(c, 1)
        c += 1 + hs[c]
        at(c, 2)
        end = c + 2 + int.from_bytes(hs[c : c + 2], "big")
        c += 2
        while c + 4 <= end:
            at(c + 2, 2)
            n = int.from_bytes(hs[c + 2 : c + 4], "big")
            if int.from_bytes(hs[c : c + 2], "big") in (0, 16):
                at(c + 4, 2)
                if hs[c : c + 2] == b"\x00\x00":
                    at(c + 7, 2)
                else:
                    at(c + 6, 1)
            elif hs[c : c + 2] == b"\x00\x2b":
                at(c + 4, 1)
            c += 4 + n
    except IndexError:
        pass
    return fields


def h2_length_fields(wire: bytes) -> list[tuple[int, int]]:
    fields = []
    pos = len(PREFACE)
    while pos + 9 <= len(wire):
        fields += [(pos, 1), (pos + 2, 1), (pos + 3, 1), (pos + 4, 1), (pos + 8, 1)]
        n = int.from_bytes(wire[pos : pos + 3], "big")
        if wire[pos + 3] == 1 and wire[pos + 4] & 0x8:
            fields.append((pos + 9, 1))
        pos += 9 + n
    return fields


HTTP_TOKENS = [b"\r\n", b"\n", b"\r", b" ", b"\t", b":", b"Host: ", b"Host: b.example\r\n",
               b"\r\n\r\n", b"http://", b"@", b"[", b"]", b"\x00", b"\xff", b"%", b".",
               b"HTTP/1.1", b" HTTP/1.0\r\n", b"CONNECT "]
INTERESTING = [0, 1, 2, 0x7F, 0x80, 0xFF]


def mutate(rng: random.Random, data: bytes, fields: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        op = rng.randrange(9)
        n = len(out)
        if op == 0 and n:  # bit flip
            i = rng.randrange(n)
            out[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # byte write
            out[rng.randrange(n)] = rng.choice((*INTERESTING, rng.randrange(256)))
        elif op == 2 and n:  # truncation
            del out[rng.randrange(n) :]
        elif op == 3:  # insertion
            i = rng.randrange(n + 1)
            out[i:i] = rng.randbytes(rng.randrange(1, 9))
        elif op == 4 and n:  # deletion
            i = rng.randrange(n)
            del out[i : i + rng.randrange(1, 9)]
        elif op == 5 and n:  # a slice duplicated elsewhere
            i = rng.randrange(n)
            piece = out[i : i + rng.randrange(1, 33)]
            j = rng.randrange(n + 1)
            out[j:j] = piece
        elif op == 6:  # a protocol token inserted
            i = rng.randrange(n + 1)
            out[i:i] = rng.choice(HTTP_TOKENS)
        elif fields:  # 7, 8: a length field corrupted
            i, width = rng.choice(fields)
            if i < len(out):
                value = rng.choice((0, 1, 0xFF, out[i] ^ 1, (out[i] + 1) & 0xFF,
                                    (out[i] - 1) & 0xFF, rng.randrange(256)))
                out[i] = value
                if width > 1 and i + 1 < len(out):
                    out[i + 1] = rng.randrange(256)
    return bytes(out)


# --------------------------------------------------------------------------- properties


def final_of(factory: Callable[[], Reader], pieces: Iterator[bytes] | list[bytes]) -> object:
    """Feed ``pieces``; check that the result, once set, never changes; return the final one."""
    reader = factory()
    seen = None
    for piece in pieces:
        reader.feed(piece)
        now = reader.result()
        if seen is not None:
            assert now is seen, "the result changed after it was final"
        seen = now
    final = reader.finish()
    if seen is not None:
        assert final is seen
    assert reader.finish() is final and reader.result() is final
    return final


def pieces_of(rng: random.Random, data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        step = rng.choice((1, 1, 2, 3, 5, 17, 64, 300))
        out.append(data[pos : pos + step])
        pos += step
    return out


def check(factory: Callable[[], Reader], data: bytes, rng: random.Random | None) -> object:
    whole = final_of(factory, [data])
    if isinstance(whole, Revealed):
        assert whole.protocol in ("tls", "http1", "h2", "unknown")
        assert whole.valid or whole.reason
        assert whole.name is None or (whole.name.isascii() and len(whole.name) <= 253)
        assert whole.port is None or 0 <= whole.port <= 65535
    else:
        assert whole is not None
    if rng is not None:
        assert final_of(factory, pieces_of(rng, data)) == whole, "the split changed the answer"
    return whole


FAMILIES: dict[str, tuple[Callable[[], list[bytes]], Callable[[bytes], list[tuple[int, int]]], Callable[[], Reader]]] = {
    "tls": (tls_seeds, tls_length_fields, ClientHelloReader),
    "http1": (http1_seeds, lambda _: [], Http1HeadReader),
    "h2": (h2_seeds, h2_length_fields, H2HeadReader),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_mutation_fuzz(family: str) -> None:
    seeds_of, fields_of, family_reader = FAMILIES[family]
    seeds = seeds_of()
    fields = [fields_of(s) for s in seeds]
    rng = random.Random(f"{SEED}-{family}")
    kinds: dict[str, int] = {}
    for n in range(MUTATIONS_PER_FAMILY):
        k = rng.randrange(len(seeds))
        data = mutate(rng, seeds[k], fields[k])
        split_rng = rng if n % SPLIT_EVERY == 0 else None
        try:
            check(family_reader, data, split_rng)
            revealed = check(FirstFlightReader, data, split_rng)
        except AssertionError as exc:
            raise AssertionError(f"input {n} ({data!r}): {exc}") from exc
        assert isinstance(revealed, Revealed)
        key = f"{revealed.protocol}/{'valid' if revealed.valid else 'invalid'}"
        kinds[key] = kinds.get(key, 0) + 1
    # The mutations must reach both sides of the parser, not only its first rejection.
    own = {"tls": "tls", "http1": "http1", "h2": "h2"}[family]
    assert kinds.get(f"{own}/valid", 0) > MUTATIONS_PER_FAMILY // 50, kinds
    assert kinds.get(f"{own}/invalid", 0) > MUTATIONS_PER_FAMILY // 50, kinds


def test_length_fields_are_found_in_the_seeds() -> None:
    for seed in tls_seeds()[:5]:  # the real and built hellos with extensions
        assert len(tls_length_fields(seed)) >= 8
    for seed in h2_seeds():
        assert len(h2_length_fields(seed)) >= 10


# --------------------------------------------------------------------------- hypothesis

FUZZ_SETTINGS = settings(
    max_examples=HYPOTHESIS_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)

_NAME_BYTES = st.binary(max_size=70) | st.sampled_from(
    [b"a.example", b"A.EXAMPLE.", b"10.0.0.1", b"::1", b"a..b", b"x" * 64, "é.example".encode()]
)
_EXT = st.one_of(
    st.tuples(st.sampled_from([0, 16, 43, 0xFE0D, 0x0A0A, 0xFAFA, 21, 41]), st.binary(max_size=40)),
    st.lists(st.tuples(st.sampled_from([0, 0, 1, 2]), _NAME_BYTES), min_size=0, max_size=3).map(
        lambda names: sni_ext(*names)
    ),
    st.lists(st.binary(max_size=12), max_size=4).map(lambda ps: alpn_ext(*ps)),
    st.lists(st.integers(0, 0xFFFF), max_size=5).map(lambda vs: versions_ext(*vs)),
)


@st.composite
def tls_flights(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    exts = draw(st.lists(_EXT, max_size=8))
    wire = built_hello(
        exts if draw(st.booleans()) or exts else None,
        session_id=draw(st.binary(max_size=34)),
        suites=draw(st.binary(max_size=8)),
        compression=draw(st.sampled_from([b"\x00", b"", b"\x00\x01"])),
        trailer=draw(st.sampled_from([b"", b"", b"\x00"])),
    )
    sizes = draw(st.lists(st.integers(1, 300), max_size=6))
    wire = split_records(wire, sizes) if sizes else wire
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(wire)))
        wire = wire[:cut]
    return wire, draw(st.lists(st.integers(0, len(wire)), max_size=6))


def feeds(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *cuts})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@FUZZ_SETTINGS
@given(tls_flights())
def test_hypothesis_tls(flight: tuple[bytes, list[int]]) -> None:
    data, cuts = flight
    for factory in (ClientHelloReader, FirstFlightReader):
        whole = check(factory, data, None)
        assert final_of(factory, feeds(data, cuts)) == whole
    hello = final_of(ClientHelloReader, [data])
    revealed = final_of(FirstFlightReader, [data])
    assert isinstance(revealed, Revealed)
    if isinstance(hello, HelloRejected):
        assert revealed.protocol == ("unknown" if hello.kind == "not-tls" else "tls")
        assert revealed.name is None
    else:
        assert revealed.protocol == "tls"


_FIELD_NAME = st.sampled_from([b"Host", b"host", b"HOST", b"X-A", b"Host ", b" Host", b""]) | st.binary(
    max_size=8
)
_FIELD_VALUE = _NAME_BYTES | st.sampled_from([b"a.example:80", b"[::1]:1", b"a.example:x", b" b.example "])


@st.composite
def http1_heads(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    method = draw(st.sampled_from([b"GET", b"CONNECT", b"POST", b"M-SEARCH", b"G\x00T", b""]))
    target = draw(st.sampled_from([b"/", b"*", b"http://t.example/x", b"t.example:443",
                                   b"http://u@t.example/", b"https://[::1]:8/"]) | st.binary(max_size=20))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 ", b"http/1.1"]))
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    lines = [method + b" " + target + b" " + version]
    for _ in range(draw(st.integers(0, 4))):
        lines.append(draw(_FIELD_NAME) + b":" + draw(st.sampled_from([b"", b" ", b"\t"])) + draw(_FIELD_VALUE))
    data = draw(st.sampled_from([b"", b"\r\n"])) + eol.join(lines) + eol + eol
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return data, draw(st.lists(st.integers(0, len(data)), max_size=6))


@FUZZ_SETTINGS
@given(http1_heads())
def test_hypothesis_http1(head: tuple[bytes, list[int]]) -> None:
    data, cuts = head
    for factory in (Http1HeadReader, FirstFlightReader):
        whole = check(factory, data, None)
        assert final_of(factory, feeds(data, cuts)) == whole


_HEADER = st.tuples(
    st.sampled_from([":authority", "host", ":method", ":path", "x"]),
    st.sampled_from(["a.example", "b.example:1", "CONNECT", "GET", "", "[::1]", "é"]),
)


@st.composite
def h2_flights(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    data = PREFACE
    if draw(st.booleans()):
        data += SETTINGS
    for _ in range(draw(st.integers(0, 3))):
        data += frame(draw(st.integers(0, 12)), draw(st.integers(0, 255)), draw(st.integers(0, 3)),
                      draw(st.binary(max_size=16)))
    encoded = hpack.Encoder().encode(draw(st.lists(_HEADER, max_size=6)))
    if draw(st.booleans()):
        encoded = draw(st.binary(max_size=30))
    parts = draw(st.integers(1, 3))
    step = max(1, len(encoded) // parts + 1)
    chunks = [encoded[i : i + step] for i in range(0, len(encoded), step)] or [b""]
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        flags = draw(st.sampled_from([0x4, 0x4, 0x0, 0x8 | 0x4, 0x20 | 0x4])) if last else 0
        if flags & 0x8:
            chunk = b"\x01" + chunk + b"\x00"
        if flags & 0x20:
            chunk = b"\x00" * 5 + chunk
        data += frame(1 if i == 0 else 9, flags, draw(st.sampled_from([1, 1, 3, 2])), chunk)
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return data, draw(st.lists(st.integers(0, len(data)), max_size=6))


@FUZZ_SETTINGS
@given(h2_flights())
def test_hypothesis_h2(flight: tuple[bytes, list[int]]) -> None:
    data, cuts = flight
    for factory in (H2HeadReader, FirstFlightReader):
        whole = check(factory, data, None)
        assert final_of(factory, feeds(data, cuts)) == whole


def test_seeded_random_bytes_reach_every_protocol_guess() -> None:
    """Plain random bytes after each protocol's first byte: the cheapest hostile input."""
    rng = random.Random(SEED)
    prefixes = [b"\x16\x03\x01", b"\x80", b"G", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b""]
    for n in range(20_000):
        data = rng.choice(prefixes) + rng.randbytes(rng.randrange(0, 64))
        check(FirstFlightReader, data, rng if n % 8 == 0 else None)

