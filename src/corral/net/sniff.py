"""The first flight of a TCP connection: which protocol it speaks and which host it names.

:class:`FirstFlightReader` is what the proxy's first-bytes stage runs when a verdict can
depend on a revealed name: it picks the protocol from the first bytes (a TLS handshake
record or an SSLv2 hello; the HTTP/2 preface; else an HTTP/1 request line) and hands the
bytes to that protocol's reader (:mod:`corral.net.clienthello`, :mod:`corral.net.h2_head`,
:mod:`corral.net.http_head`). ``unknown`` is decided on the first byte that rules out all
three (``SSH-2.0-...`` at its ``-``, a binary length prefix at once), so nothing waits on a
protocol that is not coming. It does no I/O and keeps no clock: the shell peeks at most
:data:`MAX_FIRST_FLIGHT` bytes for at most :data:`FIRST_FLIGHT_TIMEOUT` seconds, then calls
:meth:`FirstFlightReader.finish`.

The answer is a :class:`~corral.net.revealed.Revealed`, a function of the bytes alone (never
of how they were split into reads), final once it is not ``None``. A connection that begins
like HTTP/1, TLS or HTTP/2 and then stops (or grows past the bounds) is answered
``valid=False``, never ``unknown``: stalling must not be a way around a name check. Only a
client that sends nothing, or bytes that are none of the three, is ``unknown``.
"""

from __future__ import annotations

from corral.net.clienthello import (
    MAX_HELLO_WIRE,
    ClientHello,
    ClientHelloReader,
    HelloRejected,
    HelloResult,
)
from corral.net.h2_head import MAX_PREAMBLE, PREFACE, H2HeadReader
from corral.net.http_head import MAX_REQUEST_HEAD, NOT_HTTP, Http1HeadReader
from corral.net.revealed import Revealed, host_from_wire

__all__ = [
    "FIRST_FLIGHT_TIMEOUT",
    "MAX_FIRST_FLIGHT",
    "ClientHello",
    "ClientHelloReader",
    "FirstFlightReader",
    "HelloRejected",
    "Revealed",
    "revealed_from_hello",
]

#: Bytes of the first flight peeked at most: the largest bound of the three readers, so each
#: reader decides by its own bound (a ClientHello of 16 KiB in up to 64 records, 16 KiB + 5 x
#: 64 bytes; an HTTP/1 head of 16 KiB, Node.js's limit; an HTTP/2 preface, connection frames
#: and a 16 KiB header block). A TLS record alone may be 16 KiB + 5, so nothing smaller could
#: read every legal one-record hello; nothing larger is needed by any real client (hellos are
#: 0.25-2 KiB, with post-quantum key shares about 1.8 KiB, heads mostly under 2 KiB).
MAX_FIRST_FLIGHT = max(MAX_HELLO_WIRE, MAX_REQUEST_HEAD, MAX_PREAMBLE)

#: Seconds to wait for a client's first bytes when the verdict depends on them. The guest is
#: one veth hop away, so a client-first protocol (TLS, HTTP) writes within milliseconds of the
#: connect; 3 s covers a busy guest and a lost first segment retransmitted twice (the initial
#: RTO is 1 s, RFC 6298: 1 + 2 s). It is also the delay a server-first protocol (SSH, SMTP)
#: pays when a name could change its verdict, so it stays far below Envoy's
#: listener_filters_timeout (15 s) and nginx's preread_timeout (30 s), whose users complain of
#: exactly that stall; HAProxy's documentation suggests inspect-delay 5 s. After it the
#: connection is decided with what was seen (``finish``).
FIRST_FLIGHT_TIMEOUT = 3.0

_SubReader = ClientHelloReader | Http1HeadReader | H2HeadReader


def revealed_from_hello(hello: HelloResult) -> Revealed:
    """What a ClientHello (or the reason it is none) reveals, judged like every other name."""
    if isinstance(hello, HelloRejected):
        if hello.kind == "not-tls":
            return Revealed("unknown", None, True, reason=NOT_HTTP)
        return Revealed("tls", None, False, reason=hello.reason)
    if hello.sni is None:
        return Revealed("tls", None, True, alpn=hello.alpn, tls_versions=hello.versions,
                        ech=hello.ech)
    host = host_from_wire(hello.sni)
    return Revealed("tls", host.name, host.valid, alpn=hello.alpn, tls_versions=hello.versions,
                    ech=hello.ech, raw_name=host.raw, reason=host.reason)


class FirstFlightReader:
    """Feed bytes as they arrive; :meth:`result` is ``None`` while more bytes are needed.

    Once not ``None`` the result is final, and :meth:`finish` returns it. The reader stops
    taking bytes at :data:`MAX_FIRST_FLIGHT` and then decides on what it holds.
    """

    __slots__ = ("_pending", "_reader", "_result", "_seen")

    def __init__(self) -> None:
        self._seen = 0
        self._pending = bytearray()  # bytes held while the protocol is still open (< 24)
        self._reader: _SubReader | None = None
        self._result: Revealed | None = None

    def result(self) -> Revealed | None:
        return self._result

    def feed(self, data: bytes) -> None:
        if self._result is not None or not data:
            return
        data = data[: MAX_FIRST_FLIGHT - self._seen]
        self._seen += len(data)
        if self._reader is None:
            self._pending += data
            self._reader = _choose(self._pending)
            if self._reader is None:
                return
            data = bytes(self._pending)
            self._pending.clear()
        self._reader.feed(data)
        self._result = self._answer(self._reader.result())
        if self._result is None and self._seen >= MAX_FIRST_FLIGHT:
            self.finish()

    def finish(self) -> Revealed:
        """The best answer with what was seen, on timeout, EOF or the byte bound."""
        if self._result is not None:
            return self._result
        if self._reader is None:
            if not self._pending:
                self._result = Revealed("unknown", None, True, reason="the client sent nothing")
                return self._result
            # A prefix of the HTTP/2 preface: it is HTTP/1 too as far as "PRI * HTTP/" goes.
            http1 = Http1HeadReader()
            http1.feed(bytes(self._pending))
            if http1.result() is None:
                self._result = http1.finish()
            else:
                self._result = H2HeadReader().finish()
            return self._result
        answer = self._reader.finish()
        self._result = self._answer(answer)
        assert self._result is not None
        return self._result

    @staticmethod
    def _answer(answer: Revealed | HelloResult | None) -> Revealed | None:
        if answer is None or isinstance(answer, Revealed):
            return answer
        return revealed_from_hello(answer)


def _choose(head: bytearray) -> _SubReader | None:
    """The reader for a connection that begins with ``head``, or None while it is open."""
    if head[0] == 0x16 or head[0] & 0x80:
        return ClientHelloReader()
    if len(head) < len(PREFACE) and PREFACE.startswith(head):
        return None
    if head.startswith(PREFACE):
        return H2HeadReader()
    return Http1HeadReader()
