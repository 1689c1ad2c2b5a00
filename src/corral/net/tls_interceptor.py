"""TLS interception for one sandbox: the asyncio shell around the CA, the rewriters and TLS.

The TCP proxy holds every connection to an intercepted port (``tls.intercepted_ports``,
default 443) for its first flight while interception is on (``tls`` set or any secret
configured), decides it with the revealed SNI, and hands what it allowed to
:meth:`TlsInterceptor.take` (from ``TcpProxy._classified``). Then, per connection:

1. the upstream is reached (the proxy's early dial when it had one, else a dial here) and a
   TLS connection is opened to it *first*, with the guest's SNI and the guest's offered ALPN
   list, verified against the host's roots plus ``upstream_ca_certs``
   (:class:`~corral.net.tls_ca.UpstreamContexts`). A failed verification is a fatal
   ``handshake_failure`` alert toward the guest (its ClientHello is still unanswered, so a
   plaintext alert is what a real server would send) and an audit event; never a downgrade;
2. the guest's handshake is finished with a leaf for its SNI (:class:`~corral.net.tls_ca.
   LeafCache`) offering exactly the protocol the upstream selected, so the guest and the
   upstream always agree on HTTP/2 or HTTP/1.1 (interceptors that offer their own list break
   gRPC by downgrading it);
3. plaintext moves between the two TLS connections: through the HTTP/2 relay
   (:mod:`corral.net.http2_rewriter`) or the HTTP/1 rewriter when secrets are configured,
   else opaquely: one ``SSLObject.read`` and one ``SSLObject.write`` per chunk of up to
   :data:`READ_SIZE`, no parsing (WebSocket upgrades, gRPC streams and large bodies are just
   bytes here).

Both TLS connections are ``ssl.SSLObject`` over ``ssl.MemoryBIO`` pairs: the ClientHello was
already read off the guest's socket by the proxy's first-bytes stage, and a memory BIO is the
one way to hand it to OpenSSL (``loop.start_tls`` cannot take bytes already read). The
handshakes run in one task per connection; the relay runs as event-loop callbacks (no task),
like the proxy's splices.

Why the upstream first: the guest must be offered the ALPN protocol the upstream chose, and
a guest that finished its handshake before the upstream failed verification would have
been told "connected" by a connection that cannot be carried.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from corral.config import NetworkConfig
from corral.config.enums import ViolationAction
from corral.config.network import DNS_PORT
from corral.config.values import host_pattern_matches
from corral.net.audit import AuditLog
from corral.net.gate import FlowVerdict, IPAddress
from corral.net.secrets import Channel, PlaceholderPassed, SecretTable, Violation
from corral.net.splice import reset
from corral.net.tls_ca import (
    InterceptionCA,
    LeafCache,
    UpstreamContexts,
    read_ca_files,
    read_upstream_cas,
)

if TYPE_CHECKING:
    from corral.net.http1_rewriter import Http1Rewriter, Step

_log = logging.getLogger(__name__)

#: Every audit event the interception writes begins with this: they are what happened to a
#: flow *after* its verdict allowed it (a failed upstream verification, a secret violation),
#: so ``corral policy explain``, which replays verdicts, knows them from its own.
REASON_PREFIX = "interception: "

#: The ports intercepted when ``tls.intercepted_ports`` is empty (SPEC: default [443]).
DEFAULT_PORTS = (443,)

#: Bound on both handshakes of one connection (upstream dial excluded: CONNECT_TIMEOUT).
#: A TLS handshake over any real path takes a few round trips (< 1 s across the world); curl
#: and Go allow 10 s for the TLS handshake (TLSHandshakeTimeout), nginx 60 s. A guest that
#: never finishes its handshake holds a connection slot for at most this long.
HANDSHAKE_TIMEOUT = 10.0

#: Ciphertext read from a socket per call. One TLS record is at most 16 KiB + overhead; 256
#: KiB lets one read take a burst of records (a large download) and amortises the Python
#: work per call, which is what bounds the throughput of the opaque relay.
RECV_SIZE = 256 * 1024

#: Plaintext taken out of an SSLObject per call (up to this many bytes of decrypted records).
READ_SIZE = 256 * 1024

#: Ciphertext queued toward a socket that does not take it, past which reading from the other
#: side stops until it drains (backpressure: a slow reader makes the fast writer wait instead
#: of filling corral's memory). 1 MiB, like a splice pipe of the TCP proxy.
HIGH_WATER = 1 << 20

#: The TLS alert record sent to a guest whose connection cannot be carried (upstream
#: verification failed, no SNI): a fatal handshake_failure (RFC 8446 6: level 2, code 40) as
#: the plaintext record a server sends in answer to a ClientHello.
HANDSHAKE_FAILURE_ALERT = b"\x15\x03\x03\x00\x02\x02\x28"

#: corral's HTTP CONNECT proxy on the sandbox's gateway, for guests that insist on a proxy
#: (``HTTPS_PROXY=http://host.corral.internal:3128``): squid's default port, the one most
#: proxy documentation and tools assume. Served only while interception is on.
CONNECT_PROXY_PORT = 3128

#: Largest CONNECT request head (request line and headers) read. A CONNECT head is one line
#: and a few headers (Host, User-Agent, Proxy-Authorization): well under 1 KiB; 16 KiB is the
#: first-flight reader's request-head bound (Node.js's limit).
MAX_CONNECT_HEAD = 16 * 1024

#: Bound on resolving a CONNECT authority through the sandbox's DNS (its own query timeout
#: is 5 s by default; one retry's worth more).
CONNECT_RESOLVE_TIMEOUT = 6.0

#: Request head read before a readable denial is sent (the request is only read to be answered
#: in order; nothing of it goes anywhere). 64 KiB, the HTTP/1 rewriter's own head bound.
MAX_DENIED_HEAD = 64 * 1024

#: Upstream TLS sessions kept for resumption, one per (name, address, port, offered ALPN).
#: A resumed upstream handshake skips the certificate chain and its verification (the
#: session was verified when it was made) and the server's signature. Browsers keep
#: thousands of sessions; 1024 is far above the upstreams an agent talks to and bounds
#: memory (~1-2 KiB each).
UPSTREAM_SESSIONS = 1024

#: A kept session is used for new connections until it is this far into its lifetime (the
#: server's ticket lifetime hint), then replaced by the session of the next connection. Why
#: not a fresh session from every connection: CPython copies a session through DER on every
#: read of ``SSLObject.session`` and on every ``session=`` (i2d + d2i, which reparses the
#: server's certificate): ~130 µs each here (OpenSSL 3.0), a quarter of a resumed upstream
#: handshake. Reusing one ticket for many connections is what Go's and OpenSSL's own client
#: caches do; the servers that refuse a second use (single-use tickets) just make the next
#: connection a full handshake, whose new session then replaces the kept one.
SESSION_REFRESH = 0.5


class PlaintextRelay(Protocol):
    """What the HTTP rewriters offer the shell (see ``http2_rewriter.Http2Relay``)."""

    def start(self) -> _Output: ...
    def receive_guest(self, data: bytes) -> _Output: ...
    def receive_upstream(self, data: bytes) -> _Output: ...
    def guest_closed(self) -> _Output: ...
    def upstream_closed(self) -> _Output: ...


class _Output(Protocol):
    @property
    def to_guest(self) -> bytes: ...
    @property
    def to_upstream(self) -> bytes: ...
    @property
    def violations(self) -> tuple[Violation, ...]: ...
    @property
    def passed(self) -> tuple[PlaceholderPassed, ...]: ...
    @property
    def close(self) -> str | None: ...


def _bypassed(patterns: tuple[str, ...], name: str) -> bool:
    return any(host_pattern_matches(p, name) for p in patterns)


@dataclass
class TlsSettings:
    """What interception needs, resolved when the sandbox is created (files read, CA made).

    ``secrets`` holds the values (in memory only; its repr redacts them).
    """

    ca: InterceptionCA
    ports: frozenset[int]
    bypass: tuple[str, ...] = ()
    verify_upstream: bool = True
    upstream_cas: tuple[bytes, ...] = ()
    secrets: SecretTable = field(default_factory=lambda: SecretTable(()))
    block_quic: bool = False
    deny_response: str | None = None
    leaves: LeafCache = field(init=False)
    upstream: UpstreamContexts = field(init=False)

    def __post_init__(self) -> None:
        self.leaves = LeafCache(self.ca)
        self.upstream = UpstreamContexts(verify=self.verify_upstream, extra_cas=self.upstream_cas)

    @classmethod
    def from_config(
        cls, sandbox: str, config: NetworkConfig, secrets: SecretTable | None = None
    ) -> TlsSettings | None:
        """None when interception is off (no ``tls`` and no secret)."""
        table = secrets if secrets is not None else SecretTable(())
        tls = config.tls
        if tls is None and not table:
            return None
        if tls is not None and tls.ca_cert is not None and tls.ca_key is not None:
            ca = read_ca_files(tls.ca_cert, tls.ca_key)
        else:
            ca = InterceptionCA.generate(sandbox)
        ports = tuple(tls.intercepted_ports) if tls is not None else ()
        return cls(
            ca=ca,
            ports=frozenset(ports or DEFAULT_PORTS),
            bypass=tuple(tls.bypass) if tls is not None else (),
            verify_upstream=tls.effective_verify_upstream if tls is not None else True,
            upstream_cas=tuple(read_upstream_cas(tls.upstream_ca_certs)) if tls else (),
            secrets=table,
            block_quic=bool(tls.block_quic) if tls is not None else False,
            deny_response=config.deny_response,
        )

    def intercepts(self, port: int) -> bool:
        return port in self.ports

    def bypassed(self, name: str) -> bool:
        return _bypassed(self.bypass, name)


@dataclass(frozen=True)
class Accepted:
    """A connection the proxy's verdict allowed, as it is handed over."""

    guest: socket.socket
    source: str
    destination: IPAddress
    port: int
    target: IPAddress
    sni: str | None  # None: plain HTTP (take_plain)
    alpn: tuple[str, ...]
    first: bytes
    pinned: bool  # the sandbox's DNS returned the destination for the SNI
    upstream: socket.socket | None  # connected early by the proxy, or None
    shown: str | None = None  # the name the connection revealed (plain HTTP's Host), for texts


class TlsInterceptor:
    """Terminates and re-originates the intercepted TLS connections of one sandbox."""

    def __init__(
        self,
        settings: TlsSettings,
        audit: AuditLog,
        *,
        connect_timeout: float = 15.0,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        on_terminate: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.audit = audit
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.on_terminate = on_terminate
        self._conns: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.handshakes = 0  # completed pairs (tests, bench)
        self.verify_failures = 0
        self.resumed = 0  # upstream handshakes that resumed a session
        #: (netns path, guest IPv4, gateway IPv4): where CONNECT names are resolved.
        self.resolver_at: tuple[str, IPAddress, IPAddress] | None = None
        self._sessions: OrderedDict[tuple[object, ...], ssl.SSLSession] = OrderedDict()

    @property
    def connections(self) -> int:
        return len(self._conns)

    def take(self, accepted: Accepted, done: Callable[[], None]) -> None:
        """Carry ``accepted`` from here on; ``done`` is called once when it has ended."""
        loop = asyncio.get_running_loop()
        conn = _Connection(self, loop, accepted, done)
        self._conns.add(conn)
        task = loop.create_task(conn.handshake())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def take_dot(self, accepted: Accepted, done: Callable[[], None]) -> None:
        """DNS over TLS (TCP 853, any address): terminated here and answered by the
        sandbox's DNS interceptor (SPEC "DNS"); nothing reaches another resolver."""
        loop = asyncio.get_running_loop()
        conn = _Connection(self, loop, accepted, done)
        self._conns.add(conn)
        task = loop.create_task(conn.dot())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def take_plain(self, accepted: Accepted, done: Callable[[], None]) -> None:
        """Carry a plain-HTTP connection of a sandbox with secrets through the HTTP/1
        rewriter in detect-only mode (``sni`` None: nothing is ever substituted there, and a
        placeholder in any request is a violation). No TLS on either side."""
        loop = asyncio.get_running_loop()
        conn = _Connection(self, loop, accepted, done)
        self._conns.add(conn)
        task = loop.create_task(conn.plain())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def answer_denial(self, a: Accepted, reason: str, done: Callable[[], None]) -> None:
        """``deny_response``: answer a connection the verdict refused by default egress with
        a readable 403 instead of a reset (SPEC "Readable denials"). ``a.sni`` set: TLS on
        an intercepted port, terminated with a leaf for the SNI (nothing is dialled);
        None: plain HTTP, whose request head is ``a.first``. Nothing goes upstream."""
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._answer_denial(a, reason, done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer_denial(self, a: Accepted, reason: str, done: Callable[[], None]) -> None:
        from corral.net.http1_rewriter import deny_response
        from corral.net.http2_rewriter import Http2DenialResponder

        loop = asyncio.get_running_loop()
        host = a.sni or a.shown or str(a.destination)
        hint = (
            f"add the rule --rule allow@{host}:tcp:{a.port} (CLI), or PolicyRule(action="
            f"'allow', destination='{host}', protocol='tcp', port='{a.port}') (SDK)"
        )
        fmt = self.settings.deny_response or "text"
        response = deny_response(host, fmt=fmt, reason=reason, how_to_allow=hint)
        graceful = False
        try:
            async with asyncio.timeout(self.handshake_timeout):
                if a.sni is None:
                    await loop.sock_sendall(a.guest, response)
                    graceful = True
                    return
                alpn = "h2" if "h2" in a.alpn else ("http/1.1" if "http/1.1" in a.alpn else None)
                inb, outb = ssl.MemoryBIO(), ssl.MemoryBIO()
                tls = self.settings.leaves.server_context(a.sni, alpn).wrap_bio(
                    inb, outb, server_side=True
                )
                inb.write(a.first)
                end = _End("guest", a.guest, tls, inb, outb)
                await _handshake(loop, end)
                head, _, body = response.partition(b"\r\n\r\n")
                if alpn == "h2":
                    ctype = next(
                        (line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                         if line.lower().startswith(b"content-type:")),
                        b"text/plain; charset=utf-8",
                    )  # fmt: skip
                    responder = Http2DenialResponder(body, content_type=ctype)
                    await _tls_send(loop, end, responder.start().to_guest)
                    while True:
                        data = await _tls_recv(loop, end)
                        if not data:
                            break
                        out = responder.receive_guest(data)
                        await _tls_send(loop, end, out.to_guest)
                        if out.close is not None:
                            break
                else:
                    seen = b""
                    while b"\r\n\r\n" not in seen and len(seen) < MAX_DENIED_HEAD:
                        data = await _tls_recv(loop, end)
                        if not data:
                            break
                        seen += data
                    await _tls_send(loop, end, response)
                with contextlib.suppress(ssl.SSLError, ValueError):
                    end.tls.unwrap()  # type: ignore[union-attr]
                with contextlib.suppress(OSError):
                    await loop.sock_sendall(a.guest, outb.read())
                graceful = True
        except (TimeoutError, OSError, ssl.SSLError):
            pass
        finally:
            if a.guest.fileno() >= 0:
                if graceful:
                    a.guest.close()
                else:
                    reset(a.guest)
            done()

    # -- HTTP CONNECT to the gateway -------------------------------------------------------
    def take_connect(
        self,
        guest: socket.socket,
        source: str,
        *,
        decide: Callable[[str, IPAddress, int], FlowVerdict],
        names_for: Callable[[IPAddress], frozenset[str]],
        splice: Callable[[socket.socket, IPAddress, int, bytes], None],
        done: Callable[[], None],
    ) -> None:
        """A guest's connection to corral's CONNECT proxy (:data:`CONNECT_PROXY_PORT` on the
        gateway). The tunnel is decided like a direct connection: the authority's name is
        resolved through the sandbox's own DNS (so the address is pinned to it), then the
        verdict runs with that name as the revealed one. Inside an allowed tunnel to an
        intercepted port, TLS whose SNI equals the authority is intercepted as direct TLS
        is; another SNI, or none, is refused. ``splice`` carries a tunnel that is not
        intercepted (and takes over the connection slot); ``done`` gives the slot back."""
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._connect(guest, source, decide, names_for, splice, done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(
        self,
        guest: socket.socket,
        source: str,
        decide: Callable[[str, IPAddress, int], FlowVerdict],
        names_for: Callable[[IPAddress], frozenset[str]],
        splice: Callable[[socket.socket, IPAddress, int, bytes], None],
        done: Callable[[], None],
    ) -> None:
        from corral.net.revealed import authority_from_wire
        from corral.net.sniff import FIRST_FLIGHT_TIMEOUT, MAX_FIRST_FLIGHT, FirstFlightReader

        loop = asyncio.get_running_loop()
        handed = False

        async def answer(status: bytes, text: str) -> None:
            body = text.encode() + b"\n"
            with contextlib.suppress(OSError):
                await loop.sock_sendall(
                    guest,
                    b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain; charset=utf-8\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\nX-Corral-Denied: 1\r\n\r\n"
                    % len(body) + body,
                )  # fmt: skip

        def audit(destination: str, port: int, reason: str, name: str | None) -> None:
            self.audit.record(
                direction="egress", protocol="tcp", source=source, destination=destination,
                port=port, action="deny", reason=REASON_PREFIX + reason, revealed=name,
            )  # fmt: skip

        try:
            async with asyncio.timeout(self.handshake_timeout + CONNECT_RESOLVE_TIMEOUT):
                buf = b""
                while b"\r\n\r\n" not in buf:
                    if len(buf) > MAX_CONNECT_HEAD:
                        await answer(b"431 Request Header Fields Too Large", "head too large")
                        return
                    data = await loop.sock_recv(guest, 4096)
                    if not data:
                        return
                    buf += data
                head, _, rest = buf.partition(b"\r\n\r\n")
                parts = head.split(b"\r\n", 1)[0].split(b" ")
                if len(parts) != 3 or parts[0] != b"CONNECT" or parts[2] not in (
                    b"HTTP/1.1", b"HTTP/1.0"
                ):  # fmt: skip
                    await answer(b"405 Method Not Allowed", "corral's proxy serves CONNECT only")
                    return
                auth = authority_from_wire(parts[1], port_required=True)
                if not auth.valid or auth.name is None or auth.port is None:
                    await answer(b"400 Bad Request", f"not a host:port ({auth.reason})")
                    return
                host, port = auth.name, auth.port
                table = self.settings.secrets
                found = table.find(head) if table else frozenset()
                if found:
                    vs = tuple(
                        Violation(n, host, Channel.CONNECT, table.secret(n).on_violation,
                                  "a placeholder in a CONNECT request's metadata")
                        for n in sorted(found)
                    )  # fmt: skip
                    self.violated(
                        Accepted(guest, source, ipaddress.ip_address("0.0.0.0"), port,
                                 ipaddress.ip_address("0.0.0.0"), host, (), b"", False, None),
                        vs,
                    )  # fmt: skip
                    await answer(b"403 Forbidden", "corral blocked a secret's placeholder")
                    return
                try:
                    address: IPAddress = ipaddress.ip_address(host)
                except ValueError:
                    resolved = await self._resolve(host)
                    if resolved is None:
                        await answer(b"502 Bad Gateway", f"{host} did not resolve")
                        return
                    address = resolved
                verdict = decide(host, address, port)
                if not verdict.allowed or verdict.target is None:
                    await answer(b"403 Forbidden", f"corral's policy refused {host}:{port}: "
                                 f"{verdict.reason}")  # fmt: skip
                    return
                await loop.sock_sendall(guest, b"HTTP/1.1 200 Connection established\r\n\r\n")
                reader = FirstFlightReader()
                first = rest
                reader.feed(rest)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(FIRST_FLIGHT_TIMEOUT):
                        while reader.result() is None and len(first) < MAX_FIRST_FLIGHT:
                            data = await loop.sock_recv(guest, MAX_FIRST_FLIGHT - len(first))
                            if not data:
                                break
                            first += data
                            reader.feed(data)
                revealed = reader.result() or reader.finish()
            a = Accepted(
                guest=guest, source=source, destination=address, port=port,
                target=verdict.target, sni=host, alpn=revealed.alpn, first=first,
                pinned=host in names_for(address), upstream=None, shown=host,
            )  # fmt: skip
            if revealed.protocol == "tls" and self.settings.intercepts(port):
                if revealed.name != host or not revealed.valid:
                    audit(str(address), port, f"the TLS name in a CONNECT tunnel "
                          f"({revealed.name or 'none'}) is not its authority ({host})", host)  # fmt: skip
                    return
                if self.settings.bypassed(host):
                    splice(guest, verdict.target, port, first)
                else:
                    self.take(a, done)
                handed = True
                return
            if self.scan_first_flight(a):
                return
            splice(guest, verdict.target, port, first)
            handed = True
        except (TimeoutError, OSError):
            return
        finally:
            if not handed:
                if guest.fileno() >= 0:
                    reset(guest)
                done()

    async def _resolve(self, name: str) -> IPAddress | None:
        """``name``'s first A (else AAAA) record, asked the way the guest would ask: a UDP
        query from the guest's address, inside its netns, to the gateway's port 53, which the
        firewall diverts to the sandbox's DNS interceptor (policy per query, pins before the
        answer). So a CONNECT reaches exactly what the guest could reach itself."""
        import dns.exception
        import dns.message
        import dns.rdatatype

        from corral.kernel import netns

        if self.resolver_at is None:
            return None
        path, guest, gateway = self.resolver_at
        loop = asyncio.get_running_loop()

        def make() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((str(guest), 0))
            sock.connect((str(gateway), DNS_PORT))
            sock.setblocking(False)
            return sock

        sock = await loop.run_in_executor(None, netns.call_in_thread, path, make)
        try:
            for rtype in ("A", "AAAA"):
                query = dns.message.make_query(name, rtype)
                await loop.sock_sendall(sock, query.to_wire())
                try:
                    async with asyncio.timeout(CONNECT_RESOLVE_TIMEOUT):
                        while True:
                            reply = dns.message.from_wire(await loop.sock_recv(sock, 65535))
                            if reply.id == query.id:
                                break
                except (TimeoutError, dns.exception.DNSException):
                    return None
                for rrset in reply.answer:
                    if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                        for rr in rrset:
                            return ipaddress.ip_address(rr.address)
            return None
        finally:
            sock.close()

    def scan_first_flight(self, a: Accepted) -> bool:
        """A connection that is spliced (not HTTP, not intercepted) while secrets exist:
        its first flight is searched for placeholders (every encoding the detector knows).
        True when one was found: the connection is not carried and the violation is acted
        on. Only the first flight is searched; what follows it is spliced unread."""
        table = self.settings.secrets
        found = table.find(a.first) if table else frozenset()
        if not found:
            return False
        host = a.sni or str(a.destination)
        violations = tuple(
            Violation(name, host, Channel.STREAM, table.secret(name).on_violation,
                      "a connection corral does not intercept carried the placeholder")
            for name in sorted(found)
        )  # fmt: skip
        self.violated(a, violations)
        return True

    def session_for(self, key: tuple[object, ...]) -> ssl.SSLSession | None:
        """The session to offer toward ``key``'s upstream (None: a full handshake)."""
        sess = self._sessions.get(key)
        if sess is not None:
            self._sessions.move_to_end(key)
        return sess

    def keep_session(self, key: tuple[object, ...], session: ssl.SSLSession) -> None:
        self._sessions[key] = session
        self._sessions.move_to_end(key)
        while len(self._sessions) > UPSTREAM_SESSIONS:
            self._sessions.popitem(last=False)

    def forget_session(self, key: tuple[object, ...]) -> None:
        """An upstream handshake toward ``key`` failed: the next one is a full handshake
        (and verifies the certificate again)."""
        self._sessions.pop(key, None)

    @staticmethod
    def session_fresh(session: ssl.SSLSession, now: float) -> bool:
        """True while ``session`` is younger than :data:`SESSION_REFRESH` of its lifetime."""
        return now - session.time < session.timeout * SESSION_REFRESH

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for conn in list(self._conns):
            conn.abort()

    # -- audit -----------------------------------------------------------------------------
    def record(self, a: Accepted, action: str, reason: str) -> None:
        reason = REASON_PREFIX + reason
        self.audit.record(
            direction="egress",
            protocol="tcp",
            source=a.source,
            destination=str(a.destination),
            port=a.port,
            action=action,
            reason=reason,
            revealed=a.sni,
        )

    def violated(self, a: Accepted, violations: tuple[Violation, ...]) -> bool:
        """Audit and act on violations; True when the sandbox is to be terminated."""
        terminate = False
        for v in violations:
            if v.action is not ViolationAction.BLOCK:
                self.record(a, "deny", v.describe())
            if v.action is ViolationAction.BLOCK_AND_TERMINATE:
                terminate = True
        if terminate and self.on_terminate is not None:
            self.on_terminate(
                f"secret {violations[0].secret} headed to {violations[0].host}: "
                "the sandbox is stopped (block-and-terminate)"
            )
        return terminate

    def passed(self, a: Accepted, passed: tuple[PlaceholderPassed, ...]) -> None:
        for p in passed:
            self.audit.record(
                direction="egress", protocol="tcp", source=a.source,
                destination=str(a.destination), port=a.port, action="allow",
                reason=f"{REASON_PREFIX}placeholder of secret {p.secret} passed unchanged to {p.host} "
                f"in the {p.channel} (allow_placeholder_for)",
                revealed=a.sni,
            )  # fmt: skip

    def make_relay(self, a: Accepted, alpn: str | None) -> PlaintextRelay | None:
        """The rewriter for this connection, or None for the opaque relay."""
        table = self.settings.secrets
        if not table:
            return None
        # Imported here: the rewriters pull in h2/hpack, which a sandbox without secrets
        # never needs.
        from corral.net.http1_rewriter import Http1Rewriter
        from corral.net.http2_rewriter import Http2Relay

        if alpn == "h2":
            return Http2Relay(table, sni=a.sni, pinned=a.pinned)
        if alpn not in (None, "http/1.1", "http/1.0"):
            # Not HTTP (an ALPN such as "dot", "imap", "acme-tls/1"): no rewriter can read
            # it, so it is carried as bytes, scanned toward the upstream.
            return StreamScan(table, a.sni or str(a.destination))
        return Http1Relay(
            Http1Rewriter(
                table, sni=a.sni, pinned=a.pinned, deny_format=self.settings.deny_response
            )
        )


class StreamScan:
    """Opaque bytes of a connection with secrets that no rewriter reads: the guest's bytes are
    searched as a stream (every encoding the detector knows, across writes) and the chunk
    completing a placeholder is not forwarded (a violation; the connection is closed);
    nothing is ever substituted, and nothing toward the guest is read. Half-closes are
    carried as in the opaque relay (``opaque_close``)."""

    opaque_close = True

    def __init__(self, table: SecretTable, host: str) -> None:
        self._table = table
        self._detector = table.detector()
        self._host = host

    def start(self) -> _Out:
        return _Out()

    def receive_guest(self, data: bytes) -> _Out:
        found = self._detector.feed(data)
        if not found:
            return _Out(to_upstream=data)
        vs = tuple(
            Violation(n, self._host, Channel.STREAM, self._table.secret(n).on_violation,
                      "a protocol corral does not rewrite carried the placeholder")
            for n in sorted(found)
        )  # fmt: skip
        return _Out(violations=vs, close="a placeholder in an opaque stream")

    def receive_upstream(self, data: bytes) -> _Out:
        return _Out(to_guest=data)

    def guest_closed(self) -> _Out:
        return _Out()

    def upstream_closed(self) -> _Out:
        return _Out()


class Http1Relay:
    """The HTTP/1 rewriter (``http1_rewriter.Http1Rewriter``) in the relay's shape. Also used
    for plain HTTP (``sni`` None: detect-only, nothing is ever substituted)."""

    def __init__(self, rewriter: Http1Rewriter) -> None:
        self.rewriter = rewriter

    @staticmethod
    def _out(step: Step) -> _Out:
        close = (step.error or "closed") if step.close else None
        return _Out(
            to_guest=b"".join(step.to_guest), to_upstream=b"".join(step.to_upstream),
            violations=tuple(step.violations), passed=tuple(step.passed), close=close,
            shutdown_upstream=step.shutdown_upstream,
        )  # fmt: skip

    def start(self) -> _Out:
        return _Out()

    def receive_guest(self, data: bytes) -> _Out:
        return self._out(self.rewriter.guest_data(data))

    def receive_upstream(self, data: bytes) -> _Out:
        return self._out(self.rewriter.upstream_data(data))

    def guest_closed(self) -> _Out:
        return self._out(self.rewriter.guest_eof())

    def upstream_closed(self) -> _Out:
        return self._out(self.rewriter.upstream_eof())


@dataclass(frozen=True)
class _Out:
    to_guest: bytes = b""
    to_upstream: bytes = b""
    violations: tuple[Violation, ...] = ()
    passed: tuple[PlaceholderPassed, ...] = ()
    close: str | None = None
    shutdown_upstream: bool = False


async def _handshake(loop: asyncio.AbstractEventLoop, end: _End) -> None:
    """Run ``end``'s TLS handshake over its socket (bytes already read are in its BIO)."""
    assert end.tls is not None
    while True:
        try:
            end.tls.do_handshake()
            await _send_out(loop, end)
            return
        except ssl.SSLWantReadError:
            await _send_out(loop, end)
            data = await loop.sock_recv(end.sock, RECV_SIZE)
            if data:
                end.incoming.write(data)
            else:
                end.incoming.write_eof()
        except ssl.SSLError:
            with contextlib.suppress(OSError):
                await _send_out(loop, end)  # our alert, if OpenSSL made one
            raise


async def _send_out(loop: asyncio.AbstractEventLoop, end: _End) -> None:
    data = end.outgoing.read()
    if data:
        await loop.sock_sendall(end.sock, data)


async def _tls_send(loop: asyncio.AbstractEventLoop, end: _End, data: bytes) -> None:
    assert end.tls is not None
    if data:
        end.tls.write(data)
    await _send_out(loop, end)


async def _tls_recv(loop: asyncio.AbstractEventLoop, end: _End) -> bytes:
    """Plaintext from ``end`` (b"" at its end), for the short-lived denial answers."""
    assert end.tls is not None
    while True:
        try:
            return end.tls.read(READ_SIZE)
        except ssl.SSLWantReadError:
            await _send_out(loop, end)
            data = await loop.sock_recv(end.sock, RECV_SIZE)
            if data:
                end.incoming.write(data)
            else:
                end.incoming.write_eof()
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return b""


class _HandshakeRefused(Exception):
    """The connection cannot be carried; the message is the audit reason."""


class _End:
    """One TLS connection of the pair: its socket, SSLObject and memory BIOs."""

    __slots__ = (
        "at_eof", "eof", "error", "incoming", "name", "outgoing", "reading", "shut", "sock",
        "tls", "waiter", "wbuf", "writing",
    )  # fmt: skip

    def __init__(self, name: str, sock: socket.socket, tls: ssl.SSLObject | None,
                 incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:  # fmt: skip
        self.name = name
        self.sock = sock
        self.tls = tls
        self.incoming = incoming
        self.outgoing = outgoing
        self.wbuf = bytearray()
        self.reading = False
        self.writing = False
        self.eof = False  # no more plaintext will come from this side
        self.shut = False  # we sent close_notify + FIN toward this side
        self.waiter: asyncio.Future[None] | None = None  # a handshake waiting for bytes
        self.error: OSError | None = None  # the socket failed during the handshakes
        self.at_eof = False  # the socket's end was read into ``incoming`` (handshakes)


class _Connection:
    """One intercepted connection: handshakes (a task), then relay callbacks."""

    def __init__(
        self,
        owner: TlsInterceptor,
        loop: asyncio.AbstractEventLoop,
        a: Accepted,
        done: Callable[[], None],
    ) -> None:
        self.owner = owner
        self.loop = loop
        self.a = a
        self._done: Callable[[], None] | None = done
        self.upstream_sock: socket.socket | None = a.upstream
        self.guest: _End | None = None
        self.up: _End | None = None
        self.relay: PlaintextRelay | None = None
        self.closing = False  # write what is queued, then close both
        self.finished = False
        self.session_key = (a.sni, str(a.target), a.port, a.alpn)
        self.session_kept = False

    # -- DNS over TLS ------------------------------------------------------------------------
    async def dot(self) -> None:
        """Terminate the guest's DoT and carry its DNS messages (already 2-byte framed, as
        over TCP) to the sandbox's DNS interceptor: a TCP connection from the guest's own
        address in its netns to the gateway's port 53, which the firewall diverts there. So
        every DoT query is decided, rebuilt and pinned exactly as a port-53 query is."""
        from corral.kernel import netns
        from corral.net.sniff import FIRST_FLIGHT_TIMEOUT, MAX_FIRST_FLIGHT, FirstFlightReader

        a = self.a
        owner = self.owner
        try:
            async with asyncio.timeout(owner.handshake_timeout + FIRST_FLIGHT_TIMEOUT):
                reader = FirstFlightReader()
                first = b""
                while reader.result() is None and len(first) < MAX_FIRST_FLIGHT:
                    data = await self.loop.sock_recv(a.guest, MAX_FIRST_FLIGHT - len(first))
                    if not data:
                        break
                    first += data
                    reader.feed(data)
                found = reader.result() or reader.finish()
                if found.protocol != "tls" or not found.valid:
                    raise _HandshakeRefused("DNS over TLS that is not a readable TLS hello")
                # No SNI (DoT clients often dial an address): a leaf for the address.
                name = found.name or str(a.destination)
                alpn = "dot" if "dot" in found.alpn else None
                g_in, g_out = ssl.MemoryBIO(), ssl.MemoryBIO()
                g_tls = owner.settings.leaves.server_context(name, alpn).wrap_bio(
                    g_in, g_out, server_side=True
                )
                g_in.write(first)
                self.guest = _End("guest", a.guest, g_tls, g_in, g_out)
                await self._do_handshake(self.guest)
                if owner.resolver_at is None:
                    raise _HandshakeRefused("no DNS interceptor to answer DNS over TLS")
                path, guest_v4, gateway_v4 = owner.resolver_at

                def make() -> socket.socket:
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    sock.bind((str(guest_v4), 0))
                    sock.setblocking(False)
                    return sock

                sock = await self.loop.run_in_executor(None, netns.call_in_thread, path, make)
                self.upstream_sock = sock
                await self.loop.sock_connect(sock, (str(gateway_v4), DNS_PORT))
        except (_HandshakeRefused, ssl.SSLError, TimeoutError, OSError) as exc:
            owner.record(a, "deny", f"DNS over TLS not carried ({exc})")
            self.abort()
            return
        except asyncio.CancelledError:
            self.abort()
            raise
        dummy = ssl.MemoryBIO()
        self.up = _End("dns", sock, None, dummy, dummy)
        owner.record(a, "allow", "DNS over TLS terminated; its queries go to the DNS interceptor")
        self._start_relay(None, opaque=True)

    # -- plain HTTP --------------------------------------------------------------------------
    async def plain(self) -> None:
        a = self.a
        try:
            if self.upstream_sock is None:
                self.upstream_sock = await self._dial()
            else:
                await self._finish_connect(self.upstream_sock)
        except (TimeoutError, OSError) as exc:
            why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            self.owner.record(a, "deny", f"the upstream could not be reached ({why})")
            self.abort()
            return
        except asyncio.CancelledError:
            self.abort()
            raise
        from corral.net.http1_rewriter import Http1Rewriter

        dummy = ssl.MemoryBIO()
        self.guest = _End("guest", a.guest, None, dummy, dummy)
        self.up = _End("upstream", self.upstream_sock, None, dummy, dummy)
        rewriter = Http1Rewriter(
            self.owner.settings.secrets, sni=None, pinned=False,
            deny_format=self.owner.settings.deny_response,
        )  # fmt: skip
        self.relay = Http1Relay(rewriter)
        self._start_relay(None, relay=self.relay)
        self._deliver(self.guest, a.first)

    # -- handshakes ------------------------------------------------------------------------
    async def handshake(self) -> None:
        a = self.a
        s = self.owner.settings
        assert a.sni is not None
        try:
            if self.upstream_sock is None:
                self.upstream_sock = await self._dial()  # bounded by connect_timeout
            else:
                await self._finish_connect(self.upstream_sock)
            async with asyncio.timeout(self.owner.handshake_timeout):
                up_in, up_out = ssl.MemoryBIO(), ssl.MemoryBIO()
                up_ctx = s.upstream.context(a.alpn)
                offered = self.owner.session_for(self.session_key)
                try:
                    up_tls = up_ctx.wrap_bio(
                        up_in, up_out, server_side=False, server_hostname=a.sni,
                        session=offered,
                    )  # fmt: skip
                except ValueError:  # a session of a context the cache has since replaced
                    offered = None
                    up_tls = up_ctx.wrap_bio(
                        up_in, up_out, server_side=False, server_hostname=a.sni
                    )
                up = _End("upstream", self.upstream_sock, up_tls, up_in, up_out)
                self.up = up
                try:
                    # Our Finished stays in the BIO: the relay sends it with the guest's
                    # first request (one send, and the upstream answers both at once), or
                    # alone when the relay starts and the guest has sent nothing yet.
                    await self._do_handshake(up, send_last=False)
                except ssl.SSLCertVerificationError as exc:
                    self.owner.forget_session(self.session_key)
                    self.owner.verify_failures += 1
                    raise _HandshakeRefused(
                        f"the upstream's certificate for {a.sni} failed verification "
                        f"({exc.verify_message or exc.reason}); the guest got a TLS alert"
                    ) from None
                except ssl.SSLError as exc:
                    self.owner.forget_session(self.session_key)
                    raise _HandshakeRefused(
                        f"TLS toward the upstream {a.sni} failed ({exc.reason or exc}); "
                        "the guest got a TLS alert"
                    ) from None
                except BaseException:  # timed out, reset, cancelled: not offered again
                    self.owner.forget_session(self.session_key)
                    raise
                if (
                    offered is not None
                    and up_tls.session_reused
                    and self.owner.session_fresh(offered, time.time())
                ):
                    self.session_kept = True  # the kept one stays (SESSION_REFRESH)
                selected = up_tls.selected_alpn_protocol()
                g_in, g_out = ssl.MemoryBIO(), ssl.MemoryBIO()
                g_tls = s.leaves.server_context(a.sni, selected).wrap_bio(
                    g_in, g_out, server_side=True
                )
                g_in.write(a.first)
                guest = _End("guest", a.guest, g_tls, g_in, g_out)
                self.guest = guest
                try:
                    # Its session ticket (sent after the guest's Finished) stays in the BIO
                    # and goes with our first write toward the guest (see _pump).
                    await self._do_handshake(guest, send_last=False)
                except ssl.SSLError as exc:
                    # The guest refused our leaf (it does not trust the CA) or broke TLS:
                    # its own alert (in g_out, flushed by _do_handshake) says so to it.
                    raise _HandshakeRefused(
                        f"the guest's TLS handshake for {a.sni} failed ({exc.reason or exc})"
                    ) from None
        except _HandshakeRefused as exc:
            self.owner.record(a, "deny", str(exc))
            self._refuse()
            return
        except (TimeoutError, OSError) as exc:
            if isinstance(exc, TimeoutError) and self.up is None:
                why = "the upstream did not answer in time"
            elif isinstance(exc, TimeoutError):
                why = "the TLS handshakes did not finish in time"
            else:
                why = f"the upstream could not be reached ({exc.strerror or exc})"
            self.owner.record(a, "deny", f"{why}; the guest's connection is reset")
            self.abort()
            return
        except asyncio.CancelledError:
            self.abort()
            raise
        self.owner.handshakes += 1
        if up_tls.session_reused:
            self.owner.resumed += 1
        self._start_relay(selected)

    async def _finish_connect(self, sock: socket.socket) -> None:
        """Wait for the proxy's early dial (handed over connected or still connecting)."""
        try:
            sock.getpeername()
            return  # connected
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise
        fut: asyncio.Future[None] = self.loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        fd = sock.fileno()
        self.loop.add_writer(fd, ready)
        try:
            async with asyncio.timeout(self.owner.connect_timeout):
                await fut
        finally:
            self.loop.remove_writer(fd)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))

    async def _dial(self) -> socket.socket:
        target = self.a.target
        family = socket.AF_INET if target.version == 4 else socket.AF_INET6
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(self.owner.connect_timeout):
                await self.loop.sock_connect(sock, (str(target), self.a.port))
        except BaseException:
            sock.close()
            raise
        return sock

    async def _do_handshake(self, end: _End, *, send_last: bool = True) -> None:
        """``end``'s handshake over its socket (bytes already read are in its BIO).
        ``send_last`` False leaves the last flight (a client's Finished) in the BIO for the
        caller to send with what follows it.

        Unlike :func:`_handshake` (``loop.sock_recv`` per flight: a ``recv`` that can only
        say EAGAIN, then a reader added and removed, two epoll_ctl, per flight), the socket's
        reader is registered once, at the first wait, and stays: the relay takes it over by
        swapping the callback (no syscall)."""
        tls = end.tls
        assert tls is not None
        while True:
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                await _send_out(self.loop, end)
                await self._readable_in_handshake(end)
                continue
            except ssl.SSLError:
                with contextlib.suppress(OSError):
                    await _send_out(self.loop, end)  # our alert, if OpenSSL made one
                raise
            if send_last:
                await _send_out(self.loop, end)
            return

    async def _readable_in_handshake(self, end: _End) -> None:
        """Wait until bytes (or the end) from ``end``'s socket are in its BIO."""
        if end.error is not None:
            raise end.error
        if end.at_eof:  # the peer's FIN is in the BIO already: OpenSSL says what it means
            return
        waiter = end.waiter = self.loop.create_future()
        if not end.reading:
            end.reading = True
            self.loop.add_reader(end.sock.fileno(), self._handshake_readable, end)
        await waiter

    def _handshake_readable(self, end: _End) -> None:
        """The reader during (and between) the handshakes: into the BIO, then wake the wait.
        Bytes that come while nothing waits (a ticket, a server's greeting, a guest's first
        request) stay in the BIO for the relay, at most HIGH_WATER of them."""
        try:
            data = end.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            end.error = exc
            data = None
        if data:
            end.incoming.write(data)
        elif data is not None:
            end.incoming.write_eof()
            end.at_eof = True
        waiter, end.waiter = end.waiter, None
        if end.error is not None or end.at_eof or (
            waiter is None and end.incoming.pending > HIGH_WATER
        ):  # fmt: skip
            self._pause(end)
        if waiter is not None and not waiter.done():
            if end.error is not None:
                waiter.set_exception(end.error)
            else:
                waiter.set_result(None)

    def _refuse(self) -> None:
        """Answer the guest's ClientHello with a fatal alert, then close everything."""
        with contextlib.suppress(OSError):
            self.a.guest.send(HANDSHAKE_FAILURE_ALERT)
        self._close_socket(self.a.guest, graceful=True)
        if self.upstream_sock is not None:
            self._close_socket(self.upstream_sock, graceful=False)
        self._finish()

    # -- the relay ---------------------------------------------------------------------------
    def _start_relay(
        self, alpn: str | None, relay: PlaintextRelay | None = None, *, opaque: bool = False
    ) -> None:
        assert self.guest is not None and self.up is not None
        if self.guest.error is not None or self.up.error is not None:
            self.abort()  # reset while the other handshake ran: reset the other side too
            return
        for end in (self.guest, self.up):
            with contextlib.suppress(OSError):
                end.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if opaque:
            self.relay = None
        else:
            self.relay = relay if relay is not None else self.owner.make_relay(self.a, alpn)
        if self.relay is not None:
            self._apply(self.relay.start())
        # Bytes that arrived with the handshake's last flight are already in the BIOs.
        for end in (self.guest, self.up):
            if end.reading:  # the handshake's reader: the relay's callback instead
                self.loop.add_reader(end.sock.fileno(), self._readable, end)
            else:
                self._resume(end)
        self._pump(self.guest)
        self._pump(self.up)

    def _other(self, end: _End) -> _End:
        assert self.guest is not None and self.up is not None
        return self.up if end is self.guest else self.guest

    def _resume(self, end: _End) -> None:
        if not end.reading and not end.eof and not end.at_eof and not self.finished:
            end.reading = True
            self.loop.add_reader(end.sock.fileno(), self._readable, end)

    def _pause(self, end: _End) -> None:
        if end.reading:
            end.reading = False
            self.loop.remove_reader(end.sock.fileno())

    def _readable(self, end: _End) -> None:
        try:
            data = end.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort()  # reset by the peer: reset the other side too
            return
        if end.tls is None:  # plain HTTP: the bytes are the plaintext
            if data:
                self._deliver(end, data)
            elif not end.eof:
                end.eof = True
                self._pause(end)
                self._ended(end)
            return
        if data:
            end.incoming.write(data)
        else:
            end.incoming.write_eof()
        self._pump(end)

    def _pump(self, end: _End) -> None:
        """Take every plaintext byte ``end``'s TLS can give and hand it on."""
        if self.finished or end.tls is None:
            return
        held = end.outgoing.pending
        chunks: list[bytes] = []
        ended = False
        try:
            while True:
                chunk = end.tls.read(READ_SIZE)
                if not chunk:
                    ended = True
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            ended = True
        except ssl.SSLError:
            self.abort()
            return
        # Post-handshake messages (a key update, a renegotiation) may have produced bytes
        # to send: flushed. What was already waiting toward the guest (its session ticket,
        # held since the handshake) is not urgent: it goes with the next write toward it,
        # usually the first response, one send instead of two. Toward the upstream all is
        # flushed (our Finished, held for the guest's first request, goes now at the latest).
        if end is self.up or end.outgoing.pending > held:
            self._flush(end)
        if end is self.up and not self.session_kept:
            # TLS 1.3 tickets arrive after the handshake, with the upstream's first bytes.
            session = end.tls.session
            if session is not None and session.has_ticket:
                self.session_kept = True
                self.owner.keep_session(self.session_key, session)
        if self.finished:
            return
        if chunks:
            # The opaque relay's last bytes from a side that has ended go out with the
            # close_notify that _ended then makes toward the other side: one send, not two.
            last = ended and not end.eof and self.relay is None
            self._deliver(end, b"".join(chunks) if len(chunks) > 1 else chunks[0], flush=not last)
        if ended and not end.eof and not self.finished:
            end.eof = True
            self._pause(end)
            self._ended(end)

    def _deliver(self, src: _End, data: bytes, *, flush: bool = True) -> None:
        if self.finished:
            return
        relay = self.relay
        if relay is None:
            self._write(self._other(src), data, flush=flush)
            return
        out = relay.receive_guest(data) if src is self.guest else relay.receive_upstream(data)
        self._apply(out)

    def _apply(self, out: _Output) -> None:
        if out.violations and self.owner.violated(self.a, out.violations):
            self.abort()
            return
        if out.passed:
            self.owner.passed(self.a, out.passed)
        assert self.guest is not None and self.up is not None
        if out.to_upstream:
            self._write(self.up, out.to_upstream)
        if out.to_guest:
            self._write(self.guest, out.to_guest)
        if getattr(out, "shutdown_upstream", False):
            self._shutdown(self.up)
        if out.close is not None:
            self._close_gracefully()

    def _ended(self, end: _End) -> None:
        """No more plaintext from ``end``: half-close toward the other side."""
        if self.relay is not None and not getattr(self.relay, "opaque_close", False):
            out = self.relay.guest_closed() if end is self.guest else self.relay.upstream_closed()
            self._apply(out)
            if end.eof and self._other(end).eof:
                self._close_gracefully()
            return
        other = self._other(end)
        self._shutdown(other)
        if other.eof:
            self._close_gracefully()

    def _write(self, end: _End, data: bytes, *, flush: bool = True) -> None:
        """``data`` toward ``end``; ``flush`` False leaves the records in its BIO for the
        caller's next send (the close_notify that follows them)."""
        if end.shut:
            return
        if end.tls is None:
            self._send(end, data)
            return
        try:
            end.tls.write(data)
        except ssl.SSLError:
            self.abort()
            return
        if flush:
            self._flush(end)

    def _flush(self, end: _End) -> None:
        if self.finished or end.tls is None:
            return
        self._send(end, end.outgoing.read())

    def _send(self, end: _End, data: bytes) -> None:
        if self.finished:
            return
        if data:
            if end.wbuf:
                end.wbuf += data
            else:
                try:
                    n = end.sock.send(data)
                except (BlockingIOError, InterruptedError):
                    n = 0
                except OSError:
                    self.abort()
                    return
                if n < len(data):
                    end.wbuf += data[n:]
        if end.wbuf and not end.writing:
            end.writing = True
            self.loop.add_writer(end.sock.fileno(), self._writable, end)
        if len(end.wbuf) > HIGH_WATER:
            self._pause(self._other(end))

    def _writable(self, end: _End) -> None:
        try:
            n = end.sock.send(end.wbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort()
            return
        del end.wbuf[:n]
        if end.wbuf:
            return
        end.writing = False
        self.loop.remove_writer(end.sock.fileno())
        if self.closing:
            self._maybe_close()
            return
        if end.shut:
            with contextlib.suppress(OSError):
                end.sock.shutdown(socket.SHUT_WR)
        self._resume(self._other(end))

    def _shutdown(self, end: _End) -> None:
        """close_notify and FIN toward ``end`` (its peer said all it will say)."""
        if end.shut or self.finished:
            return
        end.shut = True
        if end.tls is not None:
            with contextlib.suppress(ssl.SSLError, ValueError):
                end.tls.unwrap()
            # Sent now when nothing is queued (no writer to register and wait for); else
            # queued behind what is, and _writable shuts down once it has all gone.
            self._send(end, end.outgoing.read())
            if self.finished:
                return
        if end.wbuf:
            if not end.writing:
                end.writing = True
                self.loop.add_writer(end.sock.fileno(), self._writable, end)
            return
        with contextlib.suppress(OSError):
            end.sock.shutdown(socket.SHUT_WR)

    def _close_gracefully(self) -> None:
        if self.finished:
            return
        self.closing = True
        for end in (self.guest, self.up):
            if end is not None:
                self._pause(end)
        self._maybe_close()

    def _maybe_close(self) -> None:
        ends = [e for e in (self.guest, self.up) if e is not None]
        if any(e.wbuf for e in ends):
            return
        for end in ends:
            if end.tls is not None:
                with contextlib.suppress(ssl.SSLError, ValueError):
                    end.tls.unwrap()
                data = end.outgoing.read()
                if data:
                    with contextlib.suppress(OSError):
                        end.sock.send(data)
            self._close_socket(end.sock, graceful=True)
        self._finish()

    # -- ending ------------------------------------------------------------------------------
    def abort(self) -> None:
        """Reset both sockets at once (a reset, a TLS error, a violation, shutdown)."""
        if self.finished:
            return
        self._close_socket(self.a.guest, graceful=False)
        if self.upstream_sock is not None:
            self._close_socket(self.upstream_sock, graceful=False)
        self._finish()

    def _close_socket(self, sock: socket.socket, *, graceful: bool) -> None:
        fd = sock.fileno()
        if fd < 0:
            return
        self.loop.remove_reader(fd)
        self.loop.remove_writer(fd)
        if graceful:
            sock.close()
        else:
            reset(sock)

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        for end in (self.guest, self.up):
            if end is not None:
                end.reading = end.writing = False
        self.owner._conns.discard(self)
        done, self._done = self._done, None
        if done is not None:
            done()
