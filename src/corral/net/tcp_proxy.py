"""The transparent TCP proxy of one sandbox.

nftables TPROXYs every TCP connection the guest opens to a listener bound to the sandbox's
gateway address with ``IP_TRANSPARENT``; the accepted socket's local address *is* the
destination the guest dialled (no SO_ORIGINAL_DST needed). Per connection:

1. the peer must be the guest (the listener's address is a host address: any other local
   process could connect to it directly; it gets a reset);
2. a ``max_connections`` slot is taken and the flow decided by the :class:`FlowGate` with
   the names the sandbox's resolver pinned to the address; denied = the guest gets a reset;
3. **the first-bytes stage** (the byte seam), only when the verdict says a name the
   connection may reveal could change it (``wait_for_name``): the connection is *held*, its
   first flight read (at most :data:`~corral.net.sniff.MAX_FIRST_FLIGHT` bytes, for at most
   :data:`~corral.net.sniff.FIRST_FLIGHT_TIMEOUT` seconds) through the sans-I/O
   :class:`~corral.net.sniff.FirstFlightReader` (TLS SNI, HTTP/1 Host, h2 ``:authority``),
   and decided again with the revealed name. If the flow is already allowed by its pins the
   upstream is dialled meanwhile, and an upstream that speaks first (SSH, SMTP banners)
   ends the hold at once: server-first protocols never wait. A flow whose outcome no name
   can change is dialled at once and never held;
4. the upstream is dialled from the host netns, non-blocking, bounded by
   :data:`CONNECT_TIMEOUT`; failure or timeout = reset. Over the host's veths the upstream's
   SYN-ACK is usually processed before ``connect`` returns (``EINPROGRESS``; the kernel
   handles the backlog as the call releases the socket), so a second ``connect`` is asked
   at once: 0 means connected, and the pair is spliced in the same callback, without a
   writer registration, a timer and another turn of the loop for each connection;
5. the held bytes are written upstream, then bytes move both ways with splice
   (:mod:`corral.net.splice`).

:meth:`TcpProxy._classified` is the one place where a held connection's fate is chosen
(splice today; the TLS interceptor and the HTTP deny response plug in there).

Everything runs as event-loop callbacks rather than tasks: at thousands of connections per
second the cost of a task per connection is what decides the rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket

from corral.net.gate import FlowGate, FlowVerdict, IPAddress
from corral.net.sniff import FIRST_FLIGHT_TIMEOUT, MAX_FIRST_FLIGHT, FirstFlightReader
from corral.net.splice import PipePool, SplicedPair, reset
from corral.net.tls_interceptor import (
    CONNECT_PROXY_PORT,
    REASON_PREFIX,
    Accepted,
    TlsInterceptor,
)
from corral.policy.verdict import DOT_PORT, Revealed, unmap

_log = logging.getLogger(__name__)

IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75

#: Upstream connect timeout. Long enough for a slow server across the world (the Linux
#: default of ~2 min of SYN retries is too long for a guest to wait for a reset), short
#: enough that a black-holing destination cannot pin connection slots for minutes.
CONNECT_TIMEOUT = 15.0

#: Accept backlog of the transparent listener: the kernel clamps it to somaxconn (4096 on
#: current kernels). Past it, the kernel's SYN cookies take over under a SYN flood; a flood
#: costs the guest its own connection slots and nothing else.
LISTEN_BACKLOG = 4096

#: Connections accepted per readiness callback before yielding to the loop, so a burst of
#: new connections cannot starve the bytes of established ones.
ACCEPT_BATCH = 64

#: Parsed destination addresses kept (the accepted socket gives text; the gate wants
#: objects, and a sandbox talks to few addresses). Cleared when full.
ADDRESS_CACHE = 1024

_UPSTREAM_TYPE = socket.SOCK_STREAM | socket.SOCK_NONBLOCK


def transparent_listener(address: IPAddress, kind: int, port: int = 0) -> socket.socket:
    """A socket bound to ``address`` that TPROXY can hand foreign-addressed packets to."""
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((str(address), port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _Dial:
    """An accepted guest connection waiting for its upstream to connect. ``pending``: bytes
    of the guest's first flight to write upstream before splicing; ``held``: the hold this
    dial was started early for (it is spliced only once the hold is decided)."""

    __slots__ = ("connected", "guest", "held", "pending", "proxy", "timer", "upstream")

    def __init__(self, proxy: TcpProxy, guest: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.guest = guest
        self.upstream = upstream
        self.timer: asyncio.TimerHandle | None = None
        self.pending = b""
        self.held: _Held | None = None
        self.connected = False


class _Held:
    """A connection held for its first bytes (step 3 of the module docstring)."""

    __slots__ = ("buf", "dial", "dst", "guest", "port", "reader", "source", "timer", "verdict")

    def __init__(
        self,
        guest: socket.socket,
        source: str,
        dst: IPAddress,
        port: int,
        verdict: FlowVerdict,
    ) -> None:
        self.guest = guest
        self.source = source
        self.dst = dst
        self.port = port
        self.verdict = verdict
        self.reader = FirstFlightReader()
        self.buf = bytearray()
        self.timer: asyncio.TimerHandle | None = None
        self.dial: _Dial | None = None


class TcpProxy:
    """Accepts the sandbox's diverted TCP connections and joins each to its upstream."""

    def __init__(
        self,
        gate: FlowGate,
        guests: list[IPAddress],
        listen: list[IPAddress],
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        pipes: PipePool | None = None,
        first_flight_timeout: float = FIRST_FLIGHT_TIMEOUT,
        tls: TlsInterceptor | None = None,
    ) -> None:
        self.gate = gate
        #: TLS interception: every allowed connection to an intercepted port is held for its
        #: ClientHello and handed to it (see _intercepted); None when interception is off.
        self.tls = tls
        self.guests = frozenset(guests)
        #: The guests' addresses as accept() spells them (compressed text): compared as
        #: strings, no parse per connection.
        self._guest_texts = frozenset(str(g) for g in guests)
        self._addresses: dict[str, IPAddress] = {}
        self.connect_timeout = connect_timeout
        self.first_flight_timeout = first_flight_timeout
        self.pipes = pipes or PipePool()
        self.listeners = [transparent_listener(a, socket.SOCK_STREAM) for a in listen]
        for sock in self.listeners:
            # Inherited by every accepted socket: one setsockopt per listener, not per
            # connection (request/response traffic must not wait for Nagle).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.ports = {
            a.version: s.getsockname()[1] for a, s in zip(listen, self.listeners, strict=True)
        }
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pairs: set[SplicedPair] = set()
        self._dials: set[_Dial] = set()
        self._held: set[_Held] = set()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for sock in self.listeners:
            sock.listen(LISTEN_BACKLOG)
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        """Stop accepting and reset every connection (idempotent)."""
        loop = self._loop
        for sock in self.listeners:
            if loop is not None and sock.fileno() >= 0:
                loop.remove_reader(sock.fileno())
            sock.close()
        for held in list(self._held):
            self._drop_held(held)
        for dial in list(self._dials):
            self._fail(dial, count=True)
        for pair in list(self._pairs):
            pair.close()
        if self.tls is not None:
            self.tls.close()
        self.pipes.close()

    @property
    def connections(self) -> int:
        n = len(self._pairs) + len(self._held) + sum(1 for d in self._dials if d.held is None)
        return n + (self.tls.connections if self.tls is not None else 0)

    # -- accepting --------------------------------------------------------------------------
    def _accept(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                guest, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # ECONNABORTED and friends: that connection is gone, others wait
            try:
                self._admit(guest, peer)
            except Exception:  # a bug must cost this connection, not the proxy
                _log.exception("admitting a connection from %s failed", peer[0])
                reset(guest)

    def _admit(
        self, guest: socket.socket, peer: tuple[str, int] | tuple[str, int, int, int]
    ) -> None:
        source = peer[0]
        if source not in self._guest_texts:
            reset(guest)  # a host process dialled the listener itself
            return
        local = guest.getsockname()
        dst = self._address(local[0])
        port = int(local[1])
        if not self.gate.try_acquire("tcp", source, dst, port):
            reset(guest)
            return
        if self.tls is not None and port == CONNECT_PROXY_PORT and dst in self.gate.gateways:
            # corral's own CONNECT proxy (like port 53: served here, not a flow to decide);
            # each tunnel is decided on its authority (TlsInterceptor.take_connect).
            guest.setblocking(False)
            who = source
            self.tls.take_connect(
                guest, who,
                decide=lambda name, addr, p: self.gate.egress(
                    "tcp", who, addr, p, revealed=Revealed(name)
                ),
                names_for=lambda addr: self.gate.pins.names_for(unmap(addr)),
                splice=self.splice_to, done=self.gate.release,
            )  # fmt: skip
            return
        if self.tls is not None and port == DOT_PORT:
            # DNS over TLS: terminated and answered by the sandbox's DNS interceptor, like
            # port 53 (never a flow to another resolver).
            guest.setblocking(False)
            self.tls.take_dot(
                Accepted(
                    guest=guest, source=source, destination=dst, port=port, target=dst,
                    sni=None, alpn=(), first=b"", pinned=False, upstream=None,
                ),
                self.gate.release,
            )  # fmt: skip
            return
        try:
            verdict = self.gate.egress("tcp", source, dst, port)
        except BaseException:
            self.gate.release()
            raise
        guest.setblocking(False)
        if (
            verdict.wait_for_name
            or (
                verdict.allowed
                and self.tls is not None
                and (self.tls.settings.intercepts(port) or bool(self.tls.settings.secrets))
            )
            or self._answers_denial(verdict)
        ):
            self._hold(guest, source, dst, port, verdict)
            return
        if not verdict.allowed or verdict.target is None:
            self.gate.release()
            reset(guest)
            return
        self._dial(guest, verdict.target, port)

    def _address(self, text: str) -> IPAddress:
        addr = self._addresses.get(text)
        if addr is None:
            if len(self._addresses) >= ADDRESS_CACHE:
                self._addresses.clear()
            addr = self._addresses[text] = ipaddress.ip_address(text)
        return addr

    def _dial(
        self,
        guest: socket.socket,
        target: IPAddress,
        port: int,
        held: _Held | None = None,
        pending: bytes = b"",
    ) -> _Dial | None:
        """Start the upstream connection (``pending``: bytes to write first); None (the
        guest reset, the slot released) when it cannot even start or failed at once. An
        upstream that connected at once (step 4 of the module docstring) is spliced (or,
        for a hold, watched for a banner) before this returns."""
        family = socket.AF_INET if target.version == 4 else socket.AF_INET6
        try:
            upstream = socket.socket(family, _UPSTREAM_TYPE)
        except OSError:
            if held is None:
                self.gate.release()
                reset(guest)
            return None
        with contextlib.suppress(OSError):
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        dial = _Dial(self, guest, upstream)
        dial.held = held
        dial.pending = pending
        self._dials.add(dial)
        address = (str(target), port)
        err = upstream.connect_ex(address)
        if err == errno.EINPROGRESS:
            err = upstream.connect_ex(address)  # 0: connected meanwhile; EALREADY: not yet
        if err == 0:
            self._established(dial)
            return dial
        if err != errno.EALREADY:
            self._fail(dial, count=True)
            return None
        assert self._loop is not None
        self._loop.add_writer(upstream.fileno(), self._connected, dial)
        dial.timer = self._loop.call_later(self.connect_timeout, self._fail, dial, True)
        return dial

    def _connected(self, dial: _Dial) -> None:
        assert self._loop is not None
        self._loop.remove_writer(dial.upstream.fileno())
        if dial.timer is not None:
            dial.timer.cancel()
            dial.timer = None
        err = dial.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err != 0:
            self._fail(dial, count=True)
            return
        self._established(dial)

    def _established(self, dial: _Dial) -> None:
        assert self._loop is not None
        dial.connected = True
        if dial.held is not None:
            # Dialled early for a held connection: an upstream that speaks first (a banner)
            # ends the hold; otherwise the hold's decision splices it.
            self._loop.add_reader(dial.upstream.fileno(), self._server_spoke, dial.held)
            return
        self._flush(dial)

    def _flush(self, dial: _Dial) -> None:
        """Write the held first flight upstream, then splice."""
        assert self._loop is not None
        while dial.pending:
            try:
                n = dial.upstream.send(dial.pending)
            except (BlockingIOError, InterruptedError):
                self._loop.add_writer(dial.upstream.fileno(), self._flush_more, dial)
                return
            except OSError:
                self._fail(dial, count=True)
                return
            dial.pending = dial.pending[n:]
        self._dials.discard(dial)
        # TCP_NODELAY: the guest's from the listener, the upstream's set before its connect.
        try:
            pair = SplicedPair(self._loop, dial.guest, dial.upstream, self.pipes, self._pair_closed)
        except OSError:
            # No pipe left (descriptors exhausted by a flood): this connection is refused.
            reset(dial.upstream)
            reset(dial.guest)
            self.gate.release()
            return
        self._pairs.add(pair)
        pair.start()  # a pair that cannot start aborts itself (its slot comes back)

    def _flush_more(self, dial: _Dial) -> None:
        assert self._loop is not None
        self._loop.remove_writer(dial.upstream.fileno())
        self._flush(dial)

    def _fail(self, dial: _Dial, count: bool) -> None:
        """Upstream refused, unreachable or timed out: the guest gets a reset."""
        if dial not in self._dials:
            return
        self._dials.discard(dial)
        if dial.timer is not None:
            dial.timer.cancel()
        if self._loop is not None and dial.upstream.fileno() >= 0:
            self._loop.remove_writer(dial.upstream.fileno())
            self._loop.remove_reader(dial.upstream.fileno())
        dial.upstream.close()
        held = dial.held
        if held is not None:
            # The early dial of a held connection failed: the connection goes with it.
            held.dial = None
            self._drop_held(held, count=count)
            return
        reset(dial.guest)
        if count:
            self.gate.release()

    def _pair_closed(self, pair: SplicedPair) -> None:
        self._pairs.discard(pair)
        self.gate.release()

    # -- the first-bytes stage --------------------------------------------------------------
    def _hold(
        self, guest: socket.socket, source: str, dst: IPAddress, port: int, verdict: FlowVerdict
    ) -> None:
        assert self._loop is not None
        held = _Held(guest, source, dst, port, verdict)
        self._held.add(held)
        self._loop.add_reader(guest.fileno(), self._guest_spoke, held)
        held.timer = self._loop.call_later(self.first_flight_timeout, self._hold_timed_out, held)
        if verdict.allowed and verdict.target is not None:
            held.dial = self._dial(guest, verdict.target, port, held)

    def _guest_spoke(self, held: _Held) -> None:
        if held not in self._held:
            return
        try:
            data = held.guest.recv(MAX_FIRST_FLIGHT - len(held.buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop_held(held)  # reset by the guest: nothing to carry
            return
        if not data:
            self._decide_held(held, eof=True)
            return
        held.buf += data
        held.reader.feed(data)
        if held.reader.result() is not None or len(held.buf) >= MAX_FIRST_FLIGHT:
            self._decide_held(held)

    def _server_spoke(self, held: _Held) -> None:
        """The upstream sent bytes before the guest revealed anything: a server-first
        protocol, which reveals no name. Decide with what the guest sent so far."""
        if held in self._held:
            self._decide_held(held)

    def _hold_timed_out(self, held: _Held) -> None:
        held.timer = None
        if held in self._held:
            self._decide_held(held)

    def _decide_held(self, held: _Held, eof: bool = False) -> None:
        assert self._loop is not None
        self._end_hold(held)
        found = held.reader.result()
        if found is not None:
            revealed = Revealed(found.name, found.valid, found.raw_name)
        elif eof:
            # The guest half-closed before its first flight said everything: it can send
            # nothing more, so what it sent is all it will ever reveal, and an unfinished
            # head names no host (no later byte can name one either).
            revealed = Revealed(None)
        else:
            # Cut off by the time or byte bound: the rest could still name a host, so an
            # unfinished ClientHello or head is not "no name" (finish() says invalid).
            found = held.reader.finish()
            revealed = Revealed(found.name, found.valid, found.raw_name)
        verdict = self.gate.egress("tcp", held.source, held.dst, held.port, revealed=revealed)
        self._classified(held, verdict, bytes(held.buf))

    def _classified(self, held: _Held, verdict: FlowVerdict, first: bytes) -> None:
        """The one place a held connection's fate is chosen, with its first flight."""
        dial = held.dial
        if not verdict.allowed or verdict.target is None:
            if dial is not None:
                self._dials.discard(dial)
                self._close_dial_socket(dial)
            held.dial = None
            if self._answers_denial(verdict) and self._answer_denial(held, verdict, first):
                return
            reset(held.guest)
            self.gate.release()
            return
        if self.tls is not None:
            if self.tls.settings.intercepts(held.port) and self._intercepted(held, verdict, first):
                return
            if self.tls.settings.secrets and self._scanned(held, verdict, first):
                return
            dial = held.dial  # not TLS, or bypassed: spliced like any other connection
        if dial is None:
            self._dial(held.guest, verdict.target, held.port, pending=first)
            return  # flushed and spliced once connected
        dial.held = None
        dial.pending = first
        if dial.connected:
            assert self._loop is not None
            self._loop.remove_reader(dial.upstream.fileno())
            self._flush(dial)
        # else: still connecting; _connected will flush and splice

    def _intercepted(self, held: _Held, verdict: FlowVerdict, first: bytes) -> bool:
        """An allowed connection to an intercepted port: hand it to the TLS interceptor
        (True), or leave it to the splice (False: not TLS, or its SNI is bypassed). A TLS
        connection without a usable SNI is refused here (True): there is no name to mint a
        leaf for, and splicing it would carry it past interception unexamined."""
        assert self.tls is not None and verdict.target is not None
        found = held.reader.result() or held.reader.finish()
        if found.protocol != "tls":
            return False
        if found.name is None or not found.valid:
            what = "no SNI" if found.name is None and found.valid else "an unreadable ClientHello"
            self.gate.audit.record(
                direction="egress", protocol="tcp", source=held.source,
                destination=str(held.dst), port=held.port, action="deny",
                reason=f"{REASON_PREFIX}TLS with {what} on an intercepted port is refused "
                "(no name to intercept it for)",
            )  # fmt: skip
            self._drop_held(held)
            return True
        if self.tls.settings.bypassed(found.name):
            return False
        pinned = found.name in self.gate.pins.names_for(unmap(held.dst))
        self.tls.take(
            Accepted(
                guest=held.guest, source=held.source, destination=held.dst, port=held.port,
                target=verdict.target, sni=found.name, alpn=found.alpn, first=first,
                pinned=pinned, upstream=self._take_dial(held),
            ),
            self.gate.release,
        )  # fmt: skip
        return True

    def _scanned(self, held: _Held, verdict: FlowVerdict, first: bytes) -> bool:
        """Secrets exist and the connection is not intercepted TLS: plain HTTP/1 goes through
        the HTTP/1 rewriter in detect-only mode (True); anything else has its first flight
        searched for placeholders: found = not carried (True), else spliced (False)."""
        assert self.tls is not None and verdict.target is not None
        found = held.reader.result() or held.reader.finish()
        if found.protocol == "http1" and found.valid:
            self.tls.take_plain(
                Accepted(
                    guest=held.guest, source=held.source, destination=held.dst, port=held.port,
                    target=verdict.target, sni=None, alpn=(), first=first, pinned=False,
                    upstream=self._take_dial(held),
                ),
                self.gate.release,
            )  # fmt: skip
            return True
        probe = Accepted(
            guest=held.guest, source=held.source, destination=held.dst, port=held.port,
            target=verdict.target, sni=found.name, alpn=(), first=first, pinned=False,
            upstream=None,
        )  # fmt: skip
        if self.tls.scan_first_flight(probe):
            self._drop_held(held)
            return True
        return False

    def splice_to(self, guest: socket.socket, target: IPAddress, port: int, first: bytes) -> None:
        """Dial ``target`` and splice ``guest`` to it after writing ``first`` (a CONNECT
        tunnel that is not intercepted); the connection's slot goes with it."""
        self._dial(guest, target, port, pending=first)

    def _answers_denial(self, verdict: FlowVerdict) -> bool:
        """``deny_response`` is set (with interception on) and the flow was refused by the
        default egress: the guest gets a readable 403 instead of a reset (SPEC "Readable
        denials"; explicit deny rules and the data path's own denials still reset)."""
        return (
            self.tls is not None
            and self.tls.settings.deny_response is not None
            and not verdict.allowed
            and verdict.rule is None
            and verdict.reason.startswith("no rule matched")
        )

    def _answer_denial(self, held: _Held, verdict: FlowVerdict, first: bytes) -> bool:
        """Answer a denied HTTP request (plain, or TLS on an intercepted port with a
        usable SNI); False for anything else (it is reset)."""
        assert self.tls is not None
        found = held.reader.result() or held.reader.finish()
        if not found.valid:
            return False
        if (
            found.protocol == "tls"
            and found.name is not None
            and self.tls.settings.intercepts(held.port)
        ):
            sni: str | None = found.name
        elif found.protocol == "http1":
            sni = None
        else:
            return False
        self.tls.answer_denial(
            Accepted(
                guest=held.guest, source=held.source, destination=held.dst, port=held.port,
                target=held.dst, sni=sni, alpn=found.alpn, first=first, pinned=False,
                upstream=None, shown=found.name,
            ),
            verdict.reason,
            self.gate.release,
        )  # fmt: skip
        return True

    def _take_dial(self, held: _Held) -> socket.socket | None:
        """The early dial's socket, connected or still connecting (its callbacks removed),
        for a handler of its own, which finishes the connect itself: a ClientHello usually
        arrives before the upstream's SYN-ACK, and dialling again would cost a second
        connection (and the first one's reset) per intercepted connection."""
        dial = held.dial
        held.dial = None
        if dial is None:
            return None
        self._dials.discard(dial)
        assert self._loop is not None
        if dial.timer is not None:
            dial.timer.cancel()
            dial.timer = None
        if dial.upstream.fileno() >= 0:
            self._loop.remove_reader(dial.upstream.fileno())
            self._loop.remove_writer(dial.upstream.fileno())
        return dial.upstream

    def _end_hold(self, held: _Held) -> None:
        self._held.discard(held)
        if held.timer is not None:
            held.timer.cancel()
            held.timer = None
        if self._loop is not None and held.guest.fileno() >= 0:
            self._loop.remove_reader(held.guest.fileno())

    def _close_dial_socket(self, dial: _Dial) -> None:
        if dial.timer is not None:
            dial.timer.cancel()
        if self._loop is not None and dial.upstream.fileno() >= 0:
            self._loop.remove_writer(dial.upstream.fileno())
            self._loop.remove_reader(dial.upstream.fileno())
        reset(dial.upstream)

    def _drop_held(self, held: _Held, count: bool = True) -> None:
        """A held connection ends without being carried: the guest reset, the slot back."""
        if held in self._held:
            self._end_hold(held)
        dial = held.dial
        if dial is not None and dial in self._dials:
            self._dials.discard(dial)
            self._close_dial_socket(dial)
        held.dial = None
        reset(held.guest)
        if count:
            self.gate.release()
