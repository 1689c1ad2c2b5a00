"""Fuzz the placeholder detector and the echo masker: a seeded mutation loop and hypothesis.

Properties, for every input:
- a placeholder inserted in any supported encoding (nested two deep) is found, by the write
  that completes it, wherever the writes are cut;
- streaming over any cuts finds exactly what one pass over the whole input finds;
- nothing is found in inputs that hold no placeholder (no false alarms on noise);
- the masker's output never holds a real value and equals masking the whole input at once.
The loop runs FUZZ_INPUTS inputs from a fixed seed (CI-sized, a few seconds); set
CORRAL_FUZZ_SCALE to run more.
"""

from __future__ import annotations

import base64
import json
import os
import random
import urllib.parse
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import secret_cases as sc

SCALE = float(os.environ.get("CORRAL_FUZZ_SCALE", "1"))
FUZZ_INPUTS = int(100_000 * SCALE)
MASKER_INPUTS = int(20_000 * SCALE)

TABLE = sc.table()
PLACEHOLDERS = {name: p.encode() for name, p in sc.PLACEHOLDERS.items()}


def _pct(b: bytes, rng: random.Random) -> bytes:
    """Percent-encode a random subset of bytes, hex in random case."""
    out = bytearray()
    for c in b:
        if rng.random() < 0.5:
            h = f"%{c:02X}"
            out += (h.lower() if rng.random() < 0.5 else h).encode()
        else:
            out.append(c)
    return bytes(out)


def _json_u(b: bytes, rng: random.Random) -> bytes:
    return b"".join(
        f"\\u{c:04x}".encode() if rng.random() < 0.5 or c == ord("$") else bytes((c,)) for c in b
    )


def _html(b: bytes, rng: random.Random) -> bytes:
    return b"".join(
        (f"&#{c};" if rng.random() < 0.5 else f"&#x{c:x};").encode()
        if rng.random() < 0.4
        else bytes((c,))
        for c in b
    )


def _b64(b: bytes, rng: random.Random) -> bytes:
    pad = bytes(rng.randrange(256) for _ in range(rng.randrange(3)))
    tail = bytes(rng.randrange(256) for _ in range(rng.randrange(3)))
    enc = base64.b64encode if rng.random() < 0.5 else base64.urlsafe_b64encode
    return enc(pad + b + tail)


def _basic(b: bytes, rng: random.Random) -> bytes:
    return b"Authorization: Basic " + base64.b64encode(b"user" * rng.randrange(3) + b":" + b)


def _json_dump(b: bytes, rng: random.Random) -> bytes:
    return json.dumps(b.decode()).encode().replace(b"$", b"\\u0024")


def _x(b: bytes, rng: random.Random) -> bytes:
    return b"".join(b"\\x%02x" % c if rng.random() < 0.3 else bytes((c,)) for c in b)


ENCODERS: list[Callable[[bytes, random.Random], bytes]] = [
    lambda b, r: b,
    _pct,
    _json_u,
    _html,
    _b64,
    _basic,
    _json_dump,
    _x,
]
# Second layers that the detector peels: percent over anything, JSON-escaping over percent.
OUTER: list[Callable[[bytes, random.Random], bytes]] = [
    lambda b, r: b,
    lambda b, r: urllib.parse.quote(b, safe="").encode(),
    lambda b, r: b.replace(b"\\", b"\\\\") if b"\\" not in b else b,
]

NOISE_KINDS = ("random", "text", "escapes")


def _alphabet_table(alphabet: bytes) -> bytes:
    """A bytes.translate table sending each byte value to a byte of ``alphabet``."""
    return bytes(alphabet[i % len(alphabet)] for i in range(256))


_TEXT = _alphabet_table(b'abcdefghij klmnop=&?/_-.:\r\n{}"CORRAL_SECRET')
_ESCAPY = _alphabet_table(b'%\\&#;u0x24abcdef{}:"')


def _noise(rng: random.Random, n: int) -> bytes:
    kind = rng.choice(NOISE_KINDS)
    raw = rng.randbytes(n)
    if kind == "random":
        return raw
    return raw.translate(_TEXT if kind == "text" else _ESCAPY)


def _encode(p: bytes, rng: random.Random) -> bytes:
    inner = rng.choice(ENCODERS)(p, rng)
    if inner is p or rng.random() < 0.5:
        return inner
    outer = rng.choice(OUTER)
    if outer is OUTER[2] and b"\\" not in inner:
        return inner
    return outer(inner, rng)


def _pool(seed: int, size: int) -> list[tuple[str, bytes]]:
    """Encoded placeholders, drawn once: the loop picks from them (generating each input's
    encoding byte by byte would cost more than the detector it tests)."""
    rng = random.Random(seed)
    names = sorted(PLACEHOLDERS)
    out = []
    for _ in range(size):
        name = rng.choice(names)
        out.append((name, _encode(PLACEHOLDERS[name], rng)))
    return out


POOL = _pool(0xC0DE, 4000)


def _cuts(rng: random.Random, n: int) -> list[int]:
    return sorted(rng.randrange(n + 1) for _ in range(rng.randrange(4)))


def test_detector_mutation_loop() -> None:
    rng = random.Random(0x5EC2E7)
    hits = misses = 0
    for i in range(FUZZ_INPUTS):
        before = _noise(rng, rng.randrange(0, 40))
        after = _noise(rng, rng.randrange(0, 40))
        planted: str | None = None
        if rng.random() < 0.6:
            planted, enc = rng.choice(POOL)
        else:
            enc = b""
        # A space on each side: noise ending in a backslash would otherwise escape the
        # encoding's first byte, which makes it another string (``\\%5Cx24`` is ``\x24``).
        data = before + b" " + enc + b" " + after
        end = len(before) + 1 + len(enc)
        cuts = _cuts(rng, len(data))
        det = TABLE.detector()
        prev = 0
        seen_at_end = False
        for c in [*cuts, len(data)]:
            got = det.feed(data[prev:c])
            if planted and c >= end and prev < end:
                seen_at_end = planted in got
            prev = c
        final = det.finish()
        whole = TABLE.find(data)
        assert final == whole, (i, data, cuts, final, whole)
        if planted:
            assert planted in whole, (i, enc, data)
            assert seen_at_end, (i, data, cuts)  # reported by the write that completes it
            hits += 1
        else:
            misses += 1
    assert hits > FUZZ_INPUTS // 2 and misses > FUZZ_INPUTS // 4


def test_noise_alone_raises_no_alarm() -> None:
    rng = random.Random(7)
    for _ in range(int(5_000 * SCALE)):
        data = _noise(rng, rng.randrange(0, 400))
        assert not TABLE.find(data), data


def test_masker_mutation_loop() -> None:
    rng = random.Random(0xEC40)
    values = [sc.GH_VALUE.encode()]
    forms = [
        values[0],
        json.dumps(sc.GH_VALUE)[1:-1].encode(),
        urllib.parse.quote(sc.GH_VALUE, safe="").encode(),
    ]
    for i in range(MASKER_INPUTS):
        parts = []
        for _ in range(rng.randrange(1, 4)):
            parts.append(_noise(rng, rng.randrange(0, 30)))
            if rng.random() < 0.7:
                parts.append(rng.choice(forms))
        data = b"".join(parts)
        m = TABLE.masker_for("api.github.com")
        out = b""
        prev = 0
        for c in [*_cuts(rng, len(data)), len(data)]:
            out += m.feed(data[prev:c])
            prev = c
        out += m.flush()
        assert values[0] not in out, (i, data)
        assert out == TABLE.masker_for("api.github.com").mask(data), (i, data)


@settings(max_examples=300, deadline=None)
@given(
    before=st.binary(max_size=64),
    after=st.binary(max_size=64),
    which=st.sampled_from(sorted(PLACEHOLDERS)),
    encoder=st.integers(0, len(ENCODERS) - 1),
    seed=st.integers(0, 2**32 - 1),
    cuts=st.lists(st.integers(0, 400), max_size=4),
)
def test_detector_property(
    before: bytes, after: bytes, which: str, encoder: int, seed: int, cuts: list[int]
) -> None:
    rng = random.Random(seed)
    enc = ENCODERS[encoder](PLACEHOLDERS[which], rng)
    data = before + b" " + enc + b" " + after
    det = TABLE.detector()
    prev = 0
    for c in [*sorted(min(c, len(data)) for c in cuts), len(data)]:
        det.feed(data[prev:c])
        prev = c
    assert which in det.finish()
    assert det.finish() >= TABLE.find(data) >= {which}
