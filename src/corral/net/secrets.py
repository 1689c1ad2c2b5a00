"""Secrets on intercepted traffic: the table, the placeholder detector, the echo masker (sans-I/O).

A secret's real value never enters the sandbox: the guest holds a placeholder, and corral puts
the value in only on its way to a host the user allowed, inside TLS corral terminates (SPEC
"Secrets and violations"). This module is the part both HTTP rewriters share, so HTTP/1 and
HTTP/2 decide the same way (a peer's h2 path once forwarded the raw placeholder while its h1
path substituted). It does no I/O; the rewriters and the asyncio shells call it.

API (stable; ``http1_rewriter`` and the HTTP/2 rewriter are built on it)::

    table = SecretTable.from_entries(entries, on_secret_violation=cfg.on_secret_violation,
                                     environ=os.environ)          # from_env resolved here
    table.names, len(table), bool(table), table.secret("GITHUB_TOKEN")

    scope = table.scope(sni="api.github.com", pinned=True, authority="api.github.com")
    scope.host                      # the name audits use (SNI, else the authority)
    scope.injectable                # secrets whose value may go into this request
    scope.substitute_header(name, value)   -> (new_value, frozenset[secret names used])
    scope.substitute_target(target)        -> (new_target, names)   # the query only
    scope.wants_body, scope.wants_query     # some injectable secret has inject_body/_query
    scope.substitute_body(body, content_type) -> (new_body, names)
    scope.judge(found_names, channel)      -> list[Violation | PlaceholderPassed]

    table.find(data)                -> frozenset[str]   # one piece, every encoding
    det = table.detector()          # streaming: det.feed(chunk) -> names completed so far
    det.finish()                    -> names            # flush the decoders' hold-back

    masker = table.masker_for(host)    # values -> placeholders in responses from `host`
    masker.mask(header_value)       -> bytes            # one piece
    masker.feed(chunk) -> bytes; masker.flush() -> bytes   # a body, across chunk edges
    masker.active, masker.may_change_length, masker.add_pair(real, shown)

    decode_basic(token) -> bytes | None     # Basic credentials, for labelling basic-auth finds
    most_severe(violations) -> Violation | None   # the one whose action applies
    normalize_host(name) -> str | None      # how SNI/Host/:authority are compared
    MAX_SUBSTITUTED_BODY_BYTES              # the body-buffering bound both rewriters use

The rule every caller keeps: after substitution, anything :meth:`SecretTable.find` (or a
detector) still finds is judged; a :class:`Violation` means the request is not forwarded and
``violation.action`` applies; a :class:`PlaceholderPassed` is forwarded and audited. So no
placeholder, in any encoding the detector knows, leaves corral unsubstituted except toward an
``allow_placeholder_for`` host, and the value goes only where :meth:`SecretTable.scope` allows.

What the detector decodes (each alone, and nested up to :data:`DECODE_DEPTH` deep, in any mix,
across write boundaries): raw bytes; percent-encoding (``%24``, ``%2f``/``%2F``, partial);
JSON/JavaScript escapes (``\\u0024``, ``\\/``, ``\\\\``, ``\\xHH``, surrogate pairs); HTML
numeric character references (``&#36;``, ``&#x24;``); and base64 (standard and URL-safe, at
any alignment, so inside ``Authorization: Basic`` and anywhere else). It does not undo
compression, other transforms (rot13, reversal, splitting across unrelated fields), or ``+``
as space. Detection is a tripwire for a confused or prompt-injected agent; the guarantee that
the value goes nowhere else rests on substitution happening only in an allowed scope.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from urllib.parse import quote, quote_plus

from corral.config.enums import ViolationAction, coerce_enum
from corral.config.network import SecretEntry, validate_secrets
from corral.config.values import host_pattern_matches
from corral.errors import ConfigError

__all__ = [
    "DECODE_DEPTH",
    "MAX_SUBSTITUTED_BODY_BYTES",
    "Channel",
    "EchoMasker",
    "PlaceholderDetector",
    "PlaceholderPassed",
    "RequestScope",
    "Secret",
    "SecretTable",
    "Violation",
    "decode_basic",
    "decode_escapes",
    "most_severe",
    "normalize_host",
]

#: Largest request body corral buffers to put a secret into it (``inject_body``). Bodies that
#: carry credentials are small forms and JSON documents (an OAuth token request is < 1 KiB);
#: uploads are large and carry none. Precedents: nginx buffers 16 KiB in memory before it
#: spills to disk, Envoy's buffer filter makes the user pick, AWS API Gateway caps payloads at
#: 10 MiB. 1 MiB bounds memory per connection while covering any credential-bearing body; a
#: longer body is streamed and only scanned, so a placeholder in it is a violation.
MAX_SUBSTITUTED_BODY_BYTES = 1 << 20

#: How many layers of encoding the detector peels (``%255Cu0024`` is percent over percent over
#: JSON: three). Two layers catch every double encoding seen in practice (a URL library
#: re-encoding an already encoded value; JSON inside a form field); each layer costs one more
#: regex pass over bytes that contain an escape character, nothing over bytes that do not.
DECODE_DEPTH = 2

#: Longest escape the decoder understands (a surrogate pair ``\\uD83D\\uDE00``: 12 bytes). A
#: stream decoder holds back at most this many bytes at a write boundary.
_MAX_ESCAPE = 12


class Channel(StrEnum):
    """Where in the traffic a placeholder was found (audit events name it)."""

    HEADER = "header"  # a request header's name or value (HTTP/2: also pseudo-headers)
    BASIC_AUTH = "basic-auth"  # inside the base64 credentials of Authorization: Basic
    TARGET = "target"  # the request target (path and query)
    BODY = "body"
    TRAILER = "trailer"
    WEBSOCKET = "websocket"  # payload of a WebSocket message after the 101
    STREAM = "stream"  # opaque bytes: a port that is not intercepted, plain TCP
    CONNECT = "connect"  # the request line or headers of a CONNECT tunnel
    SNI = "sni"
    DNS = "dns"


def normalize_host(name: str | bytes | None) -> str | None:
    """A host name or authority as config patterns are written: lower case, no port, no dot.

    ``API.Example.com.:443`` -> ``api.example.com``; ``[::1]:8443`` -> ``::1``. None and empty
    stay None. Names are compared as ASCII: IDNA names arrive in punycode on the wire.
    """
    if name is None:
        return None
    text = name.decode("latin-1") if isinstance(name, bytes) else name
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    text = text.rstrip(".").lower()
    return text or None


@dataclass(frozen=True)
class Secret:
    """One secret as the data path uses it: bytes, effective action, compiled host patterns."""

    name: str  # the guest's environment variable
    placeholder: bytes
    value: bytes = field(repr=False)
    allowed_hosts: tuple[str, ...]
    allow_placeholder_for: tuple[str, ...]
    on_violation: ViolationAction
    inject_headers: bool = True
    inject_basic_auth: bool = True
    inject_query: bool = False
    inject_body: bool = False

    def __repr__(self) -> str:  # the dataclass repr already hides value; say so explicitly
        return (
            f"Secret(name={self.name!r}, placeholder={self.placeholder!r}, value=<redacted>, "
            f"allowed_hosts={self.allowed_hosts!r})"
        )

    def is_allowed_host(self, host: str | None) -> bool:
        return host is not None and any(host_pattern_matches(p, host) for p in self.allowed_hosts)

    def may_carry_placeholder(self, host: str | None) -> bool:
        return host is not None and any(
            host_pattern_matches(p, host) for p in self.allow_placeholder_for
        )

    def injects(self, channel: Channel) -> bool:
        """Whether the user enabled substitution on ``channel`` for this secret."""
        if channel is Channel.HEADER:
            return self.inject_headers
        if channel is Channel.BASIC_AUTH:
            return self.inject_basic_auth
        if channel is Channel.TARGET:
            return self.inject_query
        if channel is Channel.BODY:
            return self.inject_body
        return False


@dataclass(frozen=True)
class Violation:
    """A placeholder headed where it may not go. Names the secret, never its value."""

    secret: str
    host: str
    channel: Channel
    action: ViolationAction
    reason: str

    def describe(self) -> str:
        return f"secret {self.secret} headed to {self.host} in the {self.channel}: {self.reason}"


@dataclass(frozen=True)
class PlaceholderPassed:
    """A placeholder forwarded unchanged to an ``allow_placeholder_for`` host (audited)."""

    secret: str
    host: str
    channel: Channel


_SEVERITY = {
    ViolationAction.BLOCK: 0,
    ViolationAction.BLOCK_AND_LOG: 1,
    ViolationAction.BLOCK_AND_TERMINATE: 2,
}


def most_severe(violations: Iterable[Violation]) -> Violation | None:
    """The violation whose action goes furthest (terminate > log > block); None if none."""
    best: Violation | None = None
    for v in violations:
        if best is None or _SEVERITY[v.action] > _SEVERITY[best.action]:
            best = v
    return best


# -- encodings ------------------------------------------------------------------------------
def _b64_fragments(data: bytes) -> set[bytes]:
    """The base64 characters that ``data`` fixes at each of the three alignments.

    Encoding ``pad`` unknown bytes, then ``data``, then unknown bytes, output character ``i``
    covers bits [6i, 6i+6); it depends on ``data`` alone when those bits lie inside
    [8*pad, 8*(pad+len)). Those middle characters appear verbatim in any base64 text that
    encodes ``data`` at that offset, whatever surrounds it.
    """
    out: set[bytes] = set()
    for pad in range(3):
        enc = base64.b64encode(b"\0" * pad + data)
        start = -(-8 * pad // 6)
        end = 8 * (pad + len(data)) // 6
        frag = enc[start:end]
        out.add(frag)
        out.add(frag.translate(_URLSAFE))
    return out


_URLSAFE = bytes.maketrans(b"+/", b"-_")

# The escapes, in three families by first character. No escape contains the first character
# of another family (hex digits, ``u``/``x``/simple escape letters and decimal digits are none of
# ``%``, ``\\``, ``&``), so matches of different families never overlap, and the union of three
# left-to-right scans is exactly what one combined left-to-right scan would find. Each family
# starts with a literal, which ``re`` searches for in C: a chunk without escapes costs three
# memchr-speed passes and no Python per byte.
_PCT_RE = re.compile(rb"%([0-9A-Fa-f]{2})")
_BSL_RE = re.compile(
    rb"\\(?:[uU]([dD][89abAB][0-9A-Fa-f]{2})\\[uU]([dD][c-fC-F][0-9A-Fa-f]{2})"
    rb"|[uU]([0-9A-Fa-f]{4})"
    rb"|x([0-9A-Fa-f]{2})"
    rb"|([\\/\"'bfnrt]))"
)
_AMP_RE = re.compile(rb"&#(?:([0-9]{1,7})|[xX]([0-9A-Fa-f]{1,6}));")
_ESCAPE_START = (b"%", b"\\", b"&")
_SIMPLE_ESCAPES = {
    b"\\": b"\\",
    b"/": b"/",
    b'"': b'"',
    b"'": b"'",
    b"b": b"\b",
    b"f": b"\f",
    b"n": b"\n",
    b"r": b"\r",
    b"t": b"\t",
}


def _codepoint(cp: int) -> bytes:
    if cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
        return b"\xef\xbf\xbd"  # U+FFFD: a lone surrogate or out of range matches nothing
    return chr(cp).encode("utf-8")


def _pct(m: re.Match[bytes]) -> bytes:
    return bytes((int(m.group(1), 16),))


def _bsl(m: re.Match[bytes]) -> bytes:
    hi, lo, u, x, simple = m.groups()
    if hi is not None:
        return _codepoint(0x10000 + ((int(hi, 16) - 0xD800) << 10) + (int(lo, 16) - 0xDC00))
    if u is not None:
        return _codepoint(int(u, 16))
    if x is not None:
        return bytes((int(x, 16),))
    return _SIMPLE_ESCAPES[simple]


def _amp(m: re.Match[bytes]) -> bytes:
    dec, hex_ = m.groups()
    return _codepoint(int(dec) if dec is not None else int(hex_, 16))


_FAMILIES = ((b"%", _PCT_RE, _pct), (b"\\", _BSL_RE, _bsl), (b"&", _AMP_RE, _amp))


def _escapes(buf: bytes, end: int) -> list[tuple[int, int, bytes]]:
    """(start, stop, decoded) of every escape in ``buf`` that starts before ``end``, in order."""
    found: list[tuple[int, int, bytes]] = []
    for first, rx, dec in _FAMILIES:
        if first not in buf:
            continue
        for m in rx.finditer(buf, 0, len(buf)):
            if m.start() >= end:
                break
            found.append((m.start(), m.end(), dec(m)))
    if len(found) > 1:
        found.sort()
    return found


def _has_escape_start(data: bytes | bytearray) -> bool:
    return b"%" in data or b"\\" in data or b"&" in data


def _apply(buf: bytes, escapes: list[tuple[int, int, bytes]], stop: int) -> tuple[bytes, list[int]]:
    """``buf[:stop]`` with ``escapes`` decoded, and where in the output each decoded one sits."""
    out: list[bytes] = []
    where: list[int] = []
    pos = n = 0
    for start, end, text in escapes:
        out.append(buf[pos:start])
        n += start - pos
        where.append(n)
        out.append(text)
        n += len(text)
        pos = end
    out.append(buf[pos:stop])
    return b"".join(out), where


def decode_escapes(data: bytes) -> bytes:
    """One layer of percent, JSON/JS and HTML escapes undone (unknown sequences kept)."""
    if not _has_escape_start(data):
        return data
    return _apply(data, _escapes(data, len(data)), len(data))[0]


class _DecodeStage:
    """One layer of :func:`decode_escapes` over a stream, identical to decoding it whole.

    An escape that starts at least ``_MAX_ESCAPE`` bytes before the end of what has arrived is
    complete (none is longer), so it is decoded now. From there on, the first escape character
    not inside an earlier escape and everything after it wait for the next write; a tail
    without one cannot begin an escape and is passed through.
    """

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held = b""

    @property
    def holding(self) -> bool:
        return bool(self._held)

    def feed(self, data: bytes) -> tuple[bytes, list[int]]:
        """The decoded bytes now final, and the output offsets where an escape was decoded."""
        buf = self._held + data if self._held else data
        if not _has_escape_start(buf):
            self._held = b""
            return buf, []
        safe_end = len(buf) - _MAX_ESCAPE
        escapes = _escapes(buf, safe_end)
        pos = escapes[-1][1] if escapes else 0
        cut = len(buf)
        start = max(pos, safe_end)
        for ch in _ESCAPE_START:
            i = buf.find(ch, start)
            if i != -1 and i < cut:
                cut = i
        self._held = buf[cut:]
        return _apply(buf, escapes, cut)

    def peek(self, extra: bytes = b"") -> bytes:
        """What the held tail (plus ``extra``) decodes to if the stream ended now."""
        tail = self._held + extra
        return decode_escapes(tail) if tail else b""

    def flush(self) -> bytes:
        tail, self._held = self._held, b""
        return decode_escapes(tail) if tail else b""


# -- the detector ---------------------------------------------------------------------------
#: Bytes of a needle searched for first. Needles of one alignment share their first bytes when
#: placeholders share a prefix (``$CORRAL_SECRET_``), so ten secrets cost about as much to look
#: for as one; 8 is the shortest placeholder, so every needle has an anchor this long.
_ANCHOR = 8


@dataclass(frozen=True)
class _Patterns:
    """Every byte string whose presence means a placeholder; ``owner`` maps each to its secret."""

    anchors: Mapping[bytes, tuple[bytes, ...]]
    owner: Mapping[bytes, str]
    longest: int

    @classmethod
    def of(cls, secrets: Sequence[Secret]) -> _Patterns:
        owner: dict[bytes, str] = {}
        for s in secrets:
            for needle in sorted({s.placeholder, *_b64_fragments(s.placeholder)}):
                owner.setdefault(needle, s.name)
        anchors: dict[bytes, list[bytes]] = {}
        for needle in owner:
            anchors.setdefault(needle[:_ANCHOR], []).append(needle)
        return cls(
            {a: tuple(n) for a, n in anchors.items()},
            owner,
            max((len(n) for n in owner), default=0),
        )

    def search(self, data: bytes | bytearray, into: set[str]) -> None:
        if len(data) < _ANCHOR:  # shorter than any placeholder, so than any needle
            return
        for anchor, needles in self.anchors.items():
            if anchor in data:
                for needle in needles:
                    if needle in data:
                        into.add(self.owner[needle])


class PlaceholderDetector:
    """Finds placeholders in a byte stream written in pieces; bounded memory.

    ``feed`` returns the names of every secret whose placeholder has appeared, in any encoding
    the module docstring lists, in the bytes fed so far, including one that completes in this
    very chunk: a caller checks a chunk before forwarding it. (A decoder's held tail is decoded
    tentatively at each ``feed`` for this.)

    Views: the raw bytes, then each decoding layer of the one before. The raw view is searched
    whole. A decoded view is searched only around the places its layer changed and across the
    seam with the previous write: an occurrence touching no decoded escape is a verbatim copy
    of the view below and was found there. Memory per view: the longest needle plus one escape.
    """

    def __init__(self, patterns: _Patterns) -> None:
        self._p = patterns
        self._keep = max(patterns.longest - 1, 0)
        self._raw_tail = b""
        self._stages = [_DecodeStage() for _ in range(DECODE_DEPTH)]
        self._tails = [b""] * DECODE_DEPTH
        self.found: set[str] = set()

    @property
    def active(self) -> bool:
        return bool(self._p.owner)

    def _search_view(self, k: int, out: bytes, where: list[int]) -> None:
        """Search view ``k`` (tail + ``out``) at the seam and around each decoded escape."""
        keep, tail = self._keep, self._tails[k]
        p, found = self._p, self.found
        if not where:
            # Only the seam can hold something the view below did not: no copy of ``out``.
            if tail:
                p.search(tail + out[:keep], found)
            if len(out) >= keep:
                self._tails[k] = out[len(out) - keep :] if keep else b""
            else:
                self._tails[k] = (tail + out)[-keep:]
            return
        view = tail + out if tail else out
        off = len(tail)
        if off:
            p.search(view[: off + keep], found)
        lo_prev = -1
        hi_prev = -1
        for w in where:
            lo, hi = max(off + w - keep, 0), off + w + keep + _MAX_ESCAPE
            if lo <= hi_prev:
                hi_prev = hi
                continue
            if hi_prev >= 0:
                p.search(view[lo_prev:hi_prev], found)
            lo_prev, hi_prev = lo, hi
        if hi_prev >= 0:
            p.search(view[lo_prev:hi_prev], found)
        self._tails[k] = view[-keep:] if keep else b""

    def feed(self, data: bytes | bytearray | memoryview) -> frozenset[str]:
        if not self._p.owner or not data:
            return frozenset(self.found)
        chunk = data if type(data) is bytes else bytes(data)
        p, keep = self._p, self._keep
        tail = self._raw_tail
        if tail and len(chunk) > 4 * keep:  # search the seam apart: no copy of a big chunk
            p.search(tail + chunk[:keep], self.found)
            p.search(chunk, self.found)
            self._raw_tail = chunk[len(chunk) - keep :]
        else:
            raw = tail + chunk if tail else chunk
            p.search(raw, self.found)
            self._raw_tail = raw[-keep:] if keep else b""
        incoming = chunk
        pending = b""  # the view below's tentative tail, for this view's peek
        for k, stage in enumerate(self._stages):
            if not stage.holding and not _has_escape_start(incoming) and not pending:
                # Nothing to decode: this view is a copy of the one below (searched there).
                self._search_view(k, incoming, [])
                continue
            out, where = stage.feed(incoming)
            self._search_view(k, out, where)
            spec = stage.peek(pending)
            if spec:
                tail = self._tails[k]
                p.search(tail + spec, self.found)
            incoming, pending = out, spec
        return frozenset(self.found)

    def finish(self) -> frozenset[str]:
        """End of the stream: decode what the stages held back, search it, reset."""
        if not self._p.owner:
            return frozenset(self.found)
        incoming = b""
        for k, stage in enumerate(self._stages):
            out, where = stage.feed(incoming)
            rest = stage.flush()
            out = out + rest
            view = self._tails[k] + out
            self._p.search(view, self.found)
            self._tails[k] = b""
            incoming = out
        self._raw_tail = b""
        return frozenset(self.found)


# -- the echo masker ------------------------------------------------------------------------
class EchoMasker:
    """Replaces real values with placeholders in what an allowed host sends back.

    An echo endpoint or an error page quoting the request would otherwise hand the guest the
    value corral put in. Each pair is (what the host may send, what the guest gets): the raw
    value, its JSON-escaped and percent-encoded forms, its base64 at offset 0, and every exact
    Basic credential the request side produced (``add_pair``). Between chunks only a tail
    that is a proper prefix of some real form is held back (usually nothing), so streamed
    responses (server-sent events) are not delayed. Compressed bodies cannot be masked; the
    request side asks for identity encoding when it substitutes (docs/network.md).
    """

    def __init__(self, pairs: Iterable[tuple[bytes, bytes]] = ()) -> None:
        self._pairs: dict[bytes, bytes] = {}
        self._held = b""
        for real, shown in pairs:
            self.add_pair(real, shown)

    def add_pair(self, real: bytes, shown: bytes) -> None:
        if real and real != shown and real not in self._pairs:
            self._pairs[real] = shown
            self._order = sorted(self._pairs, key=len, reverse=True)

    @property
    def active(self) -> bool:
        return bool(self._pairs)

    @property
    def may_change_length(self) -> bool:
        """True when masking can change a body's length (so Content-Length must go)."""
        return any(len(r) != len(s) for r, s in self._pairs.items())

    def mask(self, data: bytes) -> bytes:
        """One complete piece (a header value), no state kept."""
        if not self._pairs:
            return data
        for real in self._order:
            if real in data:
                data = data.replace(real, self._pairs[real])
        return data

    def feed(self, data: bytes | bytearray | memoryview) -> bytes:
        if not self._pairs:
            return bytes(data)
        buf = self._held + bytes(data) if self._held else bytes(data)
        buf = self.mask(buf)
        hold = self._partial_tail(buf)
        self._held = buf[len(buf) - hold :] if hold else b""
        return buf[: len(buf) - hold] if hold else buf

    def flush(self) -> bytes:
        tail, self._held = self._held, b""
        return self.mask(tail)

    def _partial_tail(self, buf: bytes) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a real form."""
        best = 0
        for real in self._order:
            first = real[:1]
            lo = max(len(buf) - len(real) + 1, 0)
            i = buf.find(first, lo)
            while i != -1:
                k = len(buf) - i
                if k <= best:
                    break
                if real.startswith(buf[i:]):
                    best = k
                    break
                i = buf.find(first, i + 1)
        return best


def _masking_pairs(s: Secret) -> list[tuple[bytes, bytes]]:
    v, p = s.value, s.placeholder
    pairs = [(v, p)]
    vt, pt = v.decode("utf-8", "surrogateescape"), p.decode("utf-8", "surrogateescape")
    try:
        pairs.append((json.dumps(vt)[1:-1].encode(), json.dumps(pt)[1:-1].encode()))
        pairs.append(
            (json.dumps(vt, ensure_ascii=False)[1:-1].encode(), json.dumps(pt)[1:-1].encode())
        )
    except UnicodeEncodeError:
        pass
    for safe in ("", "/"):
        qv, qp = quote(v, safe=safe).encode(), quote(p, safe=safe).encode()
        pairs.append((qv, qp))
        pairs.append((_lower_hex(qv), _lower_hex(qp)))
    pairs.append((quote_plus(v).encode(), quote_plus(p).encode()))
    pairs.append((base64.b64encode(v), base64.b64encode(p)))
    return pairs


_HEX_ESCAPE = re.compile(rb"%[0-9A-F]{2}")


def _lower_hex(data: bytes) -> bytes:
    return _HEX_ESCAPE.sub(lambda m: m.group(0).lower(), data)


# -- substitution ---------------------------------------------------------------------------
def _percent_mixed(placeholder: bytes) -> re.Pattern[bytes]:
    """The placeholder with any of its bytes percent-encoded, hex in either case."""
    parts = []
    for b in placeholder:
        hex_ = f"{b:02X}"
        hi, lo = hex_[0], hex_[1]
        alt = f"%[{hi}{hi.lower()}][{lo}{lo.lower()}]".encode()
        parts.append(b"(?:" + re.escape(bytes((b,))) + b"|" + alt + b")")
    return re.compile(b"".join(parts))


_BASIC_RE = re.compile(rb"^([ \t]*[Bb][Aa][Ss][Ii][Cc][ \t]+)([A-Za-z0-9+/=]+)([ \t]*)$")
_AUTH_HEADERS = (b"authorization", b"proxy-authorization")


@dataclass(frozen=True)
class RequestScope:
    """One request's place: which secrets may be put in it, and how a find is judged.

    A secret is injectable when the connection's SNI matches one of its ``allowed_hosts``, the
    destination address is pinned to that SNI by the sandbox's own DNS, and the request's
    authority (Host, ``:authority``) equals the SNI. All three are needed: SNI alone can be
    chosen freely by the guest, a pin alone says nothing about the name in the request, and an
    authority that differs from SNI is a request for another virtual host on the same server.
    """

    table: SecretTable
    host: str
    sni: str | None
    pinned: bool
    authority: str | None
    injectable: tuple[Secret, ...]

    @property
    def wants_body(self) -> bool:
        return any(s.inject_body for s in self.injectable)

    @property
    def wants_query(self) -> bool:
        return any(s.inject_query for s in self.injectable)

    def substitute_header(self, name: bytes, value: bytes) -> tuple[bytes, frozenset[str]]:
        """``value`` with placeholders replaced (raw, and inside Basic credentials)."""
        used: set[str] = set()
        if not self.injectable:
            return value, frozenset()
        if name.lower() in _AUTH_HEADERS:
            value = self._substitute_basic(value, used)
        for s in self.injectable:
            if s.inject_headers and s.placeholder in value:
                value = value.replace(s.placeholder, s.value)
                used.add(s.name)
        return value, frozenset(used)

    def _substitute_basic(self, value: bytes, used: set[str]) -> bytes:
        m = _BASIC_RE.match(value)
        if not m:
            return value
        creds = decode_basic(m.group(2))
        if creds is None:
            return value
        new = creds
        for s in self.injectable:
            if s.inject_basic_auth and s.placeholder in new:
                new = new.replace(s.placeholder, s.value)
                used.add(s.name)
        if new == creds:
            return value
        return m.group(1) + base64.b64encode(new) + m.group(3)

    def substitute_target(self, target: bytes) -> tuple[bytes, frozenset[str]]:
        """The request target with placeholders in its query replaced (``inject_query``).

        Any mix of raw and percent-encoded placeholder bytes is recognised (``requests``
        sends ``$`` as ``%24``); the value goes in percent-encoded, as a client would have
        sent it. The path is never rewritten: a placeholder there is a violation.
        """
        path, q, query = target.partition(b"?")
        if not q or not self.injectable:
            return target, frozenset()
        used: set[str] = set()
        for s in self.injectable:
            if not s.inject_query:
                continue
            new = self.table._percent_re(s).sub(_literal(_quote_value(s.value)), query)
            if new != query:
                used.add(s.name)
                query = new
        return path + b"?" + query, frozenset(used)

    def substitute_body(
        self, body: bytes, content_type: bytes | None
    ) -> tuple[bytes, frozenset[str]]:
        """A whole body (at most :data:`MAX_SUBSTITUTED_BODY_BYTES`) with placeholders replaced.

        Form bodies: any raw/percent mix -> the value percent-encoded (``+`` for space, as
        forms do). JSON bodies: the raw placeholder -> the value JSON-escaped (it sits in a
        string). Anything else: raw -> raw.
        """
        used: set[str] = set()
        kind = (content_type or b"").split(b";")[0].strip().lower()
        for s in self.injectable:
            if not s.inject_body:
                continue
            if kind == b"application/x-www-form-urlencoded":
                new = self.table._percent_re(s).sub(_literal(quote_plus(s.value).encode()), body)
            elif kind == b"application/json" or kind.endswith(b"+json"):
                if s.placeholder not in body:
                    continue
                escaped = json.dumps(s.value.decode("utf-8", "replace"))[1:-1].encode()
                new = body.replace(s.placeholder, escaped)
            else:
                if s.placeholder not in body:
                    continue
                new = body.replace(s.placeholder, s.value)
            if new != body:
                used.add(s.name)
                body = new
        return body, frozenset(used)

    def judge(self, found: Iterable[str], channel: Channel) -> list[Violation | PlaceholderPassed]:
        """What each placeholder still present after substitution means here."""
        out: list[Violation | PlaceholderPassed] = []
        for name in sorted(found):
            s = self.table.secret(name)
            if s.may_carry_placeholder(self.host):
                out.append(PlaceholderPassed(name, self.host, channel))
            else:
                out.append(
                    Violation(name, self.host, channel, s.on_violation, self._reason(s, channel))
                )
        return out

    def _reason(self, s: Secret, channel: Channel) -> str:
        if self.sni is None:
            return "the connection is not intercepted TLS, so no value can be put in"
        if not s.is_allowed_host(self.sni):
            return f"{self.sni} is not one of the secret's allowed hosts"
        if not self.pinned:
            return f"the destination address was not returned by the sandbox's DNS for {self.sni}"
        if self.authority != self.sni:
            return f"the request's host {self.authority or '(none)'} differs from the TLS name {self.sni}"
        if not s.injects(channel):
            flag = {
                Channel.HEADER: "inject_headers",
                Channel.BASIC_AUTH: "inject_basic_auth",
                Channel.TARGET: "inject_query",
                Channel.BODY: "inject_body",
            }.get(channel)
            if flag is not None:
                return f"{flag} is off for this secret"
            return f"placeholders are not substituted in the {channel}"
        return "the placeholder is in a form corral does not substitute there"


def decode_basic(token: bytes) -> bytes | None:
    """The credentials of a Basic token, or None when it is not valid base64."""
    try:
        return base64.b64decode(token, validate=True)
    except (binascii.Error, ValueError):
        return None


def _literal(replacement: bytes) -> bytes:
    """``replacement`` escaped for ``re.sub`` (a percent-encoded value has no ``\\``; be sure)."""
    return replacement.replace(b"\\", b"\\\\")


def _quote_value(value: bytes) -> bytes:
    return quote(value, safe="-._~").encode()


# -- the table ------------------------------------------------------------------------------
class SecretTable:
    """The secrets of one sandbox, with their values, as the supervisor holds them in memory.

    Built once when the sandbox is created; immutable after. It is the only object that holds
    values, and nothing in it writes them anywhere: its repr and its secrets' reprs redact.
    """

    def __init__(self, secrets: Sequence[Secret]) -> None:
        self._secrets = tuple(secrets)
        self._by_name = {s.name: s for s in self._secrets}
        self._patterns = _Patterns.of(self._secrets)
        self._percent: dict[str, re.Pattern[bytes]] = {}

    @classmethod
    def from_entries(
        cls,
        entries: Iterable[SecretEntry | Mapping[str, object]],
        *,
        on_secret_violation: ViolationAction | str | None = None,
        environ: Mapping[str, str],
    ) -> SecretTable:
        """Resolve values (``from_env`` read from ``environ``) and effective actions.

        ``on_secret_violation`` is the config's field (None: block-and-log). A ``from_env``
        variable that is not set is a ConfigError naming ``secrets[i].from_env``.
        """
        checked = validate_secrets(entries)
        default = (
            coerce_enum(ViolationAction, on_secret_violation, "on_secret_violation")
            if on_secret_violation not in (None, "")
            else ViolationAction.BLOCK_AND_LOG
        )
        out: list[Secret] = []
        for i, e in enumerate(checked):
            if e.value is not None:
                value = e.value
            else:
                env = str(e.from_env)
                got = environ.get(env)
                if not got:
                    raise ConfigError(
                        f"secrets[{i}].from_env",
                        f"the host's environment variable {env} is not set (or is empty)",
                    )
                value = got
                if str(e.placeholder) in value or value in str(e.placeholder):
                    raise ConfigError(
                        f"secrets[{i}].placeholder",
                        "must not contain, or be contained in, the secret's value",
                    )
            on_violation = (
                e.on_violation if isinstance(e.on_violation, ViolationAction) else default
            )
            out.append(
                Secret(
                    name=e.env_var,
                    placeholder=str(e.placeholder).encode("utf-8"),
                    value=value.encode("utf-8"),
                    allowed_hosts=tuple(e.allowed_hosts),
                    allow_placeholder_for=tuple(e.allow_placeholder_for),
                    on_violation=on_violation,
                    inject_headers=e.inject_headers,
                    inject_basic_auth=e.inject_basic_auth,
                    inject_query=e.inject_query,
                    inject_body=e.inject_body,
                )
            )
        return cls(out)

    def __repr__(self) -> str:
        return f"SecretTable(names={list(self.names)!r})"

    def __len__(self) -> int:
        return len(self._secrets)

    def __bool__(self) -> bool:
        return bool(self._secrets)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self._secrets)

    @property
    def secrets(self) -> tuple[Secret, ...]:
        return self._secrets

    def secret(self, name: str) -> Secret:
        return self._by_name[name]

    def guest_environment(self) -> dict[str, str]:
        """What the guest's environment gets: each variable set to its placeholder."""
        return {s.name: s.placeholder.decode("utf-8") for s in self._secrets}

    def scope(
        self, *, sni: str | bytes | None, pinned: bool, authority: str | bytes | None
    ) -> RequestScope:
        """The scope of one request on a connection (see :class:`RequestScope`).

        ``sni`` is None for traffic that is not intercepted TLS (plain HTTP): nothing is ever
        injectable there. ``authority`` is the Host header or ``:authority``.
        """
        sni_n, auth_n = normalize_host(sni), normalize_host(authority)
        host = sni_n or auth_n or "(unknown)"
        if sni_n is None or not pinned or auth_n != sni_n:
            injectable: tuple[Secret, ...] = ()
        else:
            injectable = tuple(s for s in self._secrets if s.is_allowed_host(sni_n))
        return RequestScope(self, host, sni_n, pinned, auth_n, injectable)

    def find(self, data: bytes | bytearray | memoryview) -> frozenset[str]:
        """Names of secrets whose placeholder is in ``data`` (one complete piece)."""
        det = PlaceholderDetector(self._patterns)
        det.feed(data)
        return det.finish()

    def detector(self) -> PlaceholderDetector:
        return PlaceholderDetector(self._patterns)

    def masker_for(self, host: str | bytes | None) -> EchoMasker:
        """Masking of every secret that may be sent to ``host`` (the connection's SNI).

        Only values corral can have sent there are looked for: a download from a host that
        receives no secret costs no per-byte work.
        """
        name = normalize_host(host)
        pairs: list[tuple[bytes, bytes]] = []
        for s in self._secrets:
            if s.is_allowed_host(name):
                pairs.extend(_masking_pairs(s))
        return EchoMasker(pairs)

    def _percent_re(self, s: Secret) -> re.Pattern[bytes]:
        pat = self._percent.get(s.name)
        if pat is None:
            pat = self._percent[s.name] = _percent_mixed(s.placeholder)
        return pat
