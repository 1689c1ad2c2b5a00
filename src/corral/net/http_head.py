"""A sans-I/O reader of an HTTP/1 request head: which host a plain-HTTP request names.

RFC 9112: a request line (``method SP request-target SP HTTP-version``), header lines, an
empty line. The host is the request target's authority when the target has one
(absolute-form ``GET http://a.example/ HTTP/1.1``, which takes precedence over Host, section
3.2.2; CONNECT's authority-form ``CONNECT a.example:443 HTTP/1.1``), else the Host header.

The reader says "not HTTP/1" as soon as a prefix rules it out (``SSH-2.0-...``, a binary
byte), so callers never wait on a protocol that will not turn into HTTP. It is strict
where two parsers could disagree about the host, because that is how requests are smuggled
past a name check: more than one Host header, a Host that differs from the target's
authority, obs-fold, bare CR, whitespace before a colon, userinfo in an authority, a missing
Host in HTTP/1.1 (section 3.2: a server answers 400) all make the answer ``valid=False``.
Line ends may be CRLF or a bare LF (section 2.2 lets a recipient accept a bare LF, and
nginx and Node do: refusing it here would let such a request go unread).
"""

from __future__ import annotations

import re

from corral.net.revealed import Host, Revealed, authority_from_wire

#: Longest request head (request line + headers + the empty line) read for a name. Node.js
#: refuses heads over 16 KiB (``--max-http-header-size``), nginx by default allows a request
#: line or header of 8 KiB each (``large_client_header_buffers 4 8k``), Apache 8190 bytes
#: per line, Tomcat 8 KiB in all. Real heads are a few hundred bytes to 2 KiB; big cookies
#: push some to 8 KiB. 16 KiB fits every server's default but Go's (1 MB), and a head that is
#: longer is denied rather than read further.
MAX_REQUEST_HEAD = 16 * 1024

_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_VCHAR = rb"[\x21-\x7e]"
_LEADING_EMPTY = re.compile(rb"(?:\r?\n)*")
_REQUEST_LINE = re.compile(rb"(" + _TCHAR + rb"+) (" + _VCHAR + rb"+) HTTP/1\.([0-9])\r?")
# Every prefix of a request line and nothing else: so "not HTTP" is decided on the first
# byte that rules it out, and exactly where the whole line would be refused.
_REQUEST_LINE_PREFIX = re.compile(
    rb"\r|" + _TCHAR + rb"*|" + _TCHAR + rb"+ " + _VCHAR + rb"*|"
    + _TCHAR + rb"+ " + _VCHAR + rb"+ (?:H(?:T(?:T(?:P(?:/(?:1(?:\.(?:[0-9]\r?)?)?)?)?)?)?)?)?"
)
_HEAD_END = re.compile(rb"\n\r?\n")
_FIELD_VALUE = rb"[\x21-\x7e\x80-\xff]+(?:[ \t]+[\x21-\x7e\x80-\xff]+)*"
_FIELD_LINE = re.compile(rb"(" + _TCHAR + rb"+):[ \t]*(" + _FIELD_VALUE + rb")?[ \t]*\r?")
_ABSOLUTE = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*://([^/?#]*)(?:[/?#].*)?")

NOT_HTTP = "the first bytes are not HTTP/1, TLS or HTTP/2"


class Http1HeadReader:
    """Feed bytes as they arrive; :meth:`result` is ``None`` until the answer is final.

    The answer is a :class:`Revealed` with protocol ``http1``, or protocol ``unknown`` when
    the bytes cannot be an HTTP/1 request.
    """

    __slots__ = ("_buf", "_line_end", "_result")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._line_end = -1  # index of the request line's LF once it is known to be valid
        self._result: Revealed | None = None

    def result(self) -> Revealed | None:
        return self._result

    def feed(self, data: bytes) -> None:
        if self._result is not None or not data:
            return
        self._buf += data[: max(MAX_REQUEST_HEAD - len(self._buf), 0)]
        self._result = self._step()
        if self._result is None and len(self._buf) >= MAX_REQUEST_HEAD:
            self._result = self._cut(f"the request head is longer than {MAX_REQUEST_HEAD} bytes")

    def finish(self) -> Revealed:
        """The answer at end of input: an unfinished HTTP/1 head is refused, never waved on."""
        if self._result is None:
            if not self._buf:
                self._result = Revealed("unknown", None, True, reason="the client sent nothing")
            else:
                self._result = self._cut("the request head stopped before its end")
        return self._result

    def _step(self) -> Revealed | None:
        buf = self._buf
        if self._line_end < 0:
            start = _LEADING_EMPTY.match(buf).end()  # type: ignore[union-attr]  # * always matches
            lf = buf.find(b"\n", start)
            if lf < 0:
                if _REQUEST_LINE_PREFIX.fullmatch(buf, start):
                    return None
                return Revealed("unknown", None, True, reason=NOT_HTTP)
            if not _REQUEST_LINE.fullmatch(buf, start, lf):
                return Revealed("unknown", None, True, reason=NOT_HTTP)
            self._line_end = lf
        end = _HEAD_END.search(buf, self._line_end)
        if end is None:
            return None
        return self._decide(bytes(buf[self._line_end + 1 : end.start() + 1]))

    def _request_line(self) -> tuple[bytes, bytes, int]:
        start = _LEADING_EMPTY.match(self._buf).end()  # type: ignore[union-attr]
        m = _REQUEST_LINE.fullmatch(self._buf, start, self._line_end)
        assert m is not None  # _line_end is set only for a valid line
        return m.group(1), m.group(2), int(m.group(3))

    def _target_host(self, method: bytes, target: bytes) -> Host | None:
        """The authority the request target names, or None when it names none."""
        if method == b"CONNECT":
            return authority_from_wire(target, port_required=True)
        if target.startswith(b"/") or target == b"*":
            return None
        m = _ABSOLUTE.fullmatch(target)
        if m is None:
            return Host(None, False, reason="the request target is in no form RFC 9112 allows")
        return authority_from_wire(m.group(1))

    def _cut(self, reason: str) -> Revealed:
        """A head that ended (or grew too long) before it said everything."""
        if self._line_end < 0:
            return Revealed("http1", None, False, reason=reason)
        method, target, _ = self._request_line()
        host = self._target_host(method, target)
        return Revealed(
            "http1",
            host.name if host else None,
            False,
            connect=method == b"CONNECT",
            port=host.port if host else None,
            reason=reason,
        )

    def _decide(self, block: bytes) -> Revealed:
        method, target, minor = self._request_line()
        connect = method == b"CONNECT"
        hosts: list[bytes] = []
        for line in block.split(b"\n")[:-1]:
            m = _FIELD_LINE.fullmatch(line)
            if m is None:
                return self._refuse(method, target, "a header line is malformed (obs-fold, "
                                    "bare CR, or space before the colon)")
            if m.group(1).lower() == b"host":
                hosts.append(m.group(2) or b"")
        if len(hosts) > 1:
            return self._refuse(method, target, "the request has more than one Host header")
        named = self._target_host(method, target)
        if named is not None:
            if not named.valid:
                return Revealed("http1", None, False, connect=connect, port=named.port,
                                raw_name=named.raw, reason=named.reason)
            if hosts:
                given = authority_from_wire(hosts[0])
                if given.name != named.name:
                    return Revealed("http1", named.name, False, connect=connect, port=named.port,
                                    reason="the Host header names another host than the "
                                    "request target")
            return Revealed("http1", named.name, True, connect=connect, port=named.port)
        if not hosts:
            if minor >= 1:
                return Revealed("http1", None, False, reason="an HTTP/1.1 request has no Host header")
            return Revealed("http1", None, True)
        if not hosts[0]:
            return Revealed("http1", None, True)  # RFC 9112 3.2: empty Host, no authority
        given = authority_from_wire(hosts[0])
        return Revealed("http1", given.name, given.valid, port=given.port,
                        raw_name=given.raw, reason=given.reason)

    def _refuse(self, method: bytes, target: bytes, reason: str) -> Revealed:
        host = self._target_host(method, target)
        return Revealed("http1", host.name if host else None, False,
                        connect=method == b"CONNECT", port=host.port if host else None,
                        reason=reason)
