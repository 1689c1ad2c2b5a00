"""The DNS decisions of one sandbox, with no I/O: :class:`SandboxResolver`.

The asyncio shell (:mod:`corral.net.dns.interceptor`) hands it every guest query and every
upstream datagram and does what the returned :class:`Step` says: call ``on_pinned`` with
``pinned`` (the pins are already in the PinSet), write ``events`` to the audit log, send
``replies`` to the guest, start ``attempts`` toward upstream resolvers (and call
:meth:`SandboxResolver.upstream_failed` when one times out). Clock and randomness are
injected, so every case is a unit test (``tests/unit/test_dns_resolver.py``).

Per query, in order (SPEC 4 "DNS"):

1. parse (:func:`corral.net.dns.wire.parse_query`): garbage gets FORMERR when it has a
   header, nothing otherwise; several questions FORMERR; zone transfers NOTIMP;
2. ``host.corral.internal`` / ``host.microsandbox.internal``: the gateway addresses;
3. the policy: ``Policy.decide_query(name, transport)``; refused = NXDOMAIN with no records,
   never asked upstream, audited;
4. AAAA in a sandbox without IPv6: an empty NOERROR;
5. the sandbox's cache; a failure seen in the last second (RFC 9520); a query for the same
   question already in flight (the guest's retry joins it);
6. upstream: the question alone, rebuilt (fresh random ID, corral's own EDNS0 OPT with no
   options, a fresh socket per try), each resolver in order, each try bounded by
   ``query_timeout``; TC from upstream = the same resolver again over TCP within the same
   try; SERVFAIL/REFUSED/NOTIMP/FORMERR or garbage with our ID = the next resolver; answers
   with another ID or question are ignored (spoofing); all failed = SERVFAIL;
7. the answer: only the CNAME chain from the question (at most :data:`MAX_CNAME_CHAIN`,
   loops = SERVFAIL), the final RRset and, for negative answers, the zone's SOA (RFC 2308);
   additional and other authority records are dropped. A chain through a name on a deny
   list or a deny domain rule is NXDOMAIN. Rebind protection removes A/AAAA records in
   private, loopback, link-local and metadata ranges (and the unspecified address) unless
   ``Policy.rebind_allowed`` says the policy allows that address; nothing left = NXDOMAIN;
8. every A/AAAA answer given to the guest is pinned (every name of the chain -> every
   address) *before* its reply is returned, then cached by its TTL.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from corral.config import DestinationKind, Group, PolicyAction, PolicyProtocol
from corral.config.values import IPAddress
from corral.net.dns import answer, wire
from corral.net.dns.cache import (
    MAX_CACHE_TTL,
    MAX_NEGATIVE_TTL,
    AnswerCache,
    CachedAnswer,
    CacheKey,
)
from corral.net.dns.wire import Query, QueryError, Template, Unanswerable
from corral.policy import Policy, classify
from corral.policy.pins import PinSet

Transport = Literal["udp", "tcp"]

#: Names that resolve to the gateway inside the sandbox (SPEC: reaching the host).
HOST_NAMES = ("host.corral.internal", "host.microsandbox.internal")

#: TTL of the host names' answers. The gateway never changes while the sandbox lives; a
#: minute keeps a guest's own cache from asking every time without pinning anything for long.
HOST_NAME_TTL = 60

#: Longest CNAME chain followed in an answer. Unbound gives up after 11 restarts
#: (``MAX_RESTART_COUNT``), BIND after 11 too (``max-query-restarts`` default, 9.18); a
#: legitimate chain has two or three links (CDNs). Longer = SERVFAIL, like theirs.
MAX_CNAME_CHAIN = 11

#: Addresses given to the guest (and pinned) per answer at most; the rest of a huge RRset is
#: dropped. glibc's resolver keeps at most 35 addresses per answer (MAXADDRS), musl 48; 64
#: leaves every real client its full choice and bounds the pin churn of one query.
MAX_ADDRESSES_PER_ANSWER = 64

#: Answer records of an upstream message that are parsed at all (wire.trim_message cuts the
#: rest): the addresses kept, a full CNAME chain, and one more.
MAX_UPSTREAM_RECORDS = MAX_ADDRESSES_PER_ANSWER + MAX_CNAME_CHAIN + 1

#: Upstream records a sandbox may make corral parse per second (a token bucket charged one
#: per answer plus one per record). dnspython costs 10-50 microseconds a record here, so this
#: keeps a hostile zone's huge TTL-0 answers, asked in a loop, to about a tenth of a core;
#: ordinary answers (1-10 records) leave room for hundreds of uncached names a second. Past
#: it, new uncached questions get SERVFAIL at once until the budget refills (cache hits and
#: host names still answer). Unbound's ``ratelimit`` (1000 queries/s per zone when enabled)
#: is the nearest precedent; it counts queries, this counts the work they cause.
MAX_UPSTREAM_RECORDS_PER_SECOND = 4096

#: Distinct questions waiting for upstream at once, per sandbox. dnsmasq forwards at most
#: 150 concurrently (``dns-forward-max``), Unbound serves 1024 per thread
#: (``num-queries-per-thread``) for a whole network; one sandbox waiting on 128 different
#: names has a bug or is scanning. Past it a new question gets SERVFAIL at once.
MAX_INFLIGHT = 128

#: Guest queries joined to one in-flight question (retries, parallel lookups of one name).
#: Past it, SERVFAIL: a guest cannot make one slow name hold unbounded state.
MAX_WAITERS = 32

#: Queries per second a sandbox may send (token bucket; the burst is one second's worth).
#: AWS's VPC resolver allows 1024 packets per second per network interface, Huawei Cloud
#: 2000 per second per ECS; 2048 covers a parallel build resolving its dependencies, and keeps
#: a storm's cost to a few percent of one core. Beyond it the shell stops reading, so the
#: kernel drops the excess for free (UDP) or TCP applies back-pressure.
MAX_QUERIES_PER_SECOND = 2048

#: Audit events the interceptor writes per second at most; the next event after a quiet
#: second says how many were not written. A guest trying 10,000 refused names a second for
#: exfiltration is visible at this rate without the audit file becoming a denial of service.
MAX_EVENTS_PER_SECOND = 100

#: How long the failure of a question is remembered. RFC 9520 3.2: resolvers MUST cache
#: resolution failures for at least one second (and at most five minutes). One second absorbs
#: a guest's retries of a dead name without making a fixed upstream look broken for long.
FAILURE_CACHE_SECONDS = 1.0
#: How soon after a sweep that left failure memory the next one comes (sweep_delay).
FAILURE_SWEEP_SECONDS = 1.0
#: How soon after a sweep that left only cache entries or pins the next one comes.
STATE_SWEEP_SECONDS = 30.0

#: Upstream rcodes that are an answer; any other (SERVFAIL, REFUSED, NOTIMP, FORMERR, or an
#: extended or update rcode that makes no sense for a query) means the next resolver is tried,
#: as glibc's stub does for SERVFAIL, NOTIMP and REFUSED.
_ANSWER_RCODES = frozenset({wire.NOERROR, wire.NXDOMAIN})

_REBIND_GROUPS = frozenset({Group.METADATA, Group.LOOPBACK, Group.PRIVATE, Group.LINK_LOCAL})
_PROTOCOL = {"udp": PolicyProtocol.UDP, "tcp": PolicyProtocol.TCP}
_HEADER = struct.Struct("!6H")


@dataclass(frozen=True, slots=True)
class QueryEvent:
    """An audit event about one query (the shell turns it into an AuditEvent)."""

    action: str  # allow | deny
    rule: int | None
    reason: str
    name: str
    transport: Transport
    source: str
    destination: str


@dataclass(eq=False, slots=True)
class Attempt:
    """One message to one upstream resolver; compared by identity."""

    key: CacheKey
    upstream: int  # index into the resolver list
    id: int
    wire: bytes
    tcp: bool
    deadline: float


@dataclass(slots=True)
class Step:
    """What the shell does next, in this order: on_pinned(pinned), audit events, replies,
    attempts. ``silent``: the query this step answers gets no reply, ever."""

    replies: list[tuple[Hashable, bytes]] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    pinned: list[tuple[IPAddress, float]] = field(default_factory=list)
    events: list[QueryEvent] = field(default_factory=list)
    silent: bool = False


@dataclass(slots=True)
class _Waiter:
    query: Query
    client: Hashable
    transport: Transport
    source: str
    destination: str


@dataclass(slots=True)
class _Pending:
    key: CacheKey
    name: str
    waiters: list[_Waiter]
    upstream: int = 0
    attempt: Attempt | None = None


@dataclass(frozen=True, slots=True)
class _Digest:
    """An upstream answer reduced to what the guest gets."""

    template: Template
    cache_ttl: int
    names: tuple[str, ...] = ()
    addresses: tuple[IPAddress, ...] = ()
    pin_ttl: float = 0.0
    events: tuple[tuple[str, str], ...] = ()  # (name, reason) denials to audit


class _Failure(Exception):
    """The upstream's answer cannot be used: SERVFAIL to the guest."""


class TokenBucket:
    """Queries per second of one sandbox (:data:`MAX_QUERIES_PER_SECOND`)."""

    __slots__ = ("_at", "_clock", "_tokens", "rate")

    def __init__(self, rate: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self._clock = clock
        self._tokens = rate
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.rate, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self) -> bool:
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def ready(self) -> bool:
        """Whether the bucket is out of debt (see :meth:`charge`)."""
        self._refill()
        return self._tokens >= 1.0

    def charge(self, amount: float) -> None:
        """Work already done: may put the bucket in debt, which :meth:`ready` then reports."""
        self._refill()
        self._tokens -= amount

    def wait(self) -> float:
        """Seconds until one token is there again."""
        return max(0.0, (1.0 - self._tokens) / self.rate)


def name_text(name: dns.name.Name) -> str:
    """A dnspython name in the text form guest questions get (:func:`wire.name_text`)."""
    return wire.name_text(
        name.labels[:-1] if name.labels and name.labels[-1] == b"" else name.labels
    )


class SandboxResolver:
    """See the module docstring."""

    def __init__(
        self,
        *,
        policy: Policy,
        pins: PinSet,
        gateways: Sequence[IPAddress],
        ipv6: bool,
        upstreams: int,
        query_timeout: float,
        rebind_protection: bool | None = None,
        log_allowed: bool = False,
        clock: Callable[[], float],
        rng: random.Random | None = None,
        max_queries_per_second: float = MAX_QUERIES_PER_SECOND,
    ) -> None:
        self.policy = policy
        self.pins = pins
        self.ipv6 = ipv6
        self.upstreams = upstreams
        self.query_timeout = query_timeout
        self.rebind_protection = (
            policy.config.effective_rebind_protection
            if rebind_protection is None
            else rebind_protection
        )
        self.log_allowed = log_allowed
        self._clock = clock
        self._rng = rng or random.SystemRandom()
        self.cache = AnswerCache()
        self.bucket = TokenBucket(max_queries_per_second, clock)
        self.upstream_budget = TokenBucket(MAX_UPSTREAM_RECORDS_PER_SECOND, clock)
        self._pending: dict[CacheKey, _Pending] = {}
        self._failures: dict[CacheKey, float] = {}
        self._events_window = 0.0
        self._events_written = 0
        self._events_suppressed = 0
        self._host: dict[
            bytes, tuple[list[tuple[int, int, bytes]], list[tuple[int, int, bytes]]]
        ] = {}
        v4 = [(wire.TYPE_A, HOST_NAME_TTL, g.packed) for g in gateways if g.version == 4]
        v6 = [(wire.TYPE_AAAA, HOST_NAME_TTL, g.packed) for g in gateways if g.version == 6]
        self._gateways = tuple(gateways)
        for host_name in HOST_NAMES:
            key = b"".join(bytes([len(p)]) + p.encode() for p in host_name.split(".")) + b"\0"
            self._host[key] = (v4, v6 if ipv6 else [])

    @property
    def inflight(self) -> int:
        return len(self._pending)

    def set_policy(self, policy: Policy) -> None:
        """A live policy update: answers cached under the old policy's rebind view go."""
        self.policy = policy
        self.rebind_protection = policy.config.effective_rebind_protection
        self.cache.clear()
        self._failures.clear()

    def sweep_delay(self) -> float | None:
        """Seconds until :meth:`sweep` is worth running again, None when it has nothing to
        forget (the interceptor's timer then stops: net/sweeper.py). Every entry is checked
        for expiry where it is used, so a sweep only reclaims memory: soon for failure memory
        (short-lived, and its size follows the upstream's failures), rarely for the cache and
        the pins (bounded by their limits)."""
        if self._failures:
            return FAILURE_SWEEP_SECONDS
        if self.cache or self.pins:
            return STATE_SWEEP_SECONDS
        return None

    def sweep(self) -> None:
        """Periodic: expired cache entries, failure memory and pins."""
        now = self._clock()
        self.cache.expire(now)
        for key in [k for k, t in self._failures.items() if t <= now]:
            del self._failures[key]
        self.pins.expire()

    # -- guest queries -----------------------------------------------------------------------
    def query(
        self, data: bytes, transport: Transport, client: Hashable, source: str, destination: str
    ) -> Step:
        """One query from the guest (a UDP datagram or one TCP message)."""
        try:
            q = wire.parse_query(data)
        except Unanswerable:
            return Step(silent=True)
        except QueryError as exc:
            return Step(replies=[(client, exc.response())])
        now = self._clock()
        host = self._host.get(q.key_name)
        if host is not None:
            return self._host_answer(q, host, transport, client, now)
        decision = self.policy.decide_query(q.name, _PROTOCOL[transport])
        step = Step()
        if not decision.allowed:
            self._event(
                step, "deny", decision.rule, decision.reason, q.name, transport, source, destination
            )
            step.replies.append((client, wire.question_response(q, wire.NXDOMAIN)))
            return step
        if self.log_allowed:
            self._event(
                step,
                "allow",
                decision.rule,
                decision.reason,
                q.name,
                transport,
                source,
                destination,
            )
        if q.qtype == wire.TYPE_AAAA and not self.ipv6:
            step.replies.append((client, wire.question_response(q, wire.NOERROR)))
            return step
        key: CacheKey = (q.key_name, q.qtype)
        cached = self.cache.get(key, now)
        if cached is not None:
            reply, truncated = self._render(cached.template, q, transport, now)
            if cached.addresses and not truncated:
                left = cached.pin_ttl - (now - cached.template.created)
                step.pinned = self.pins.add(cached.names, cached.addresses, left)
            step.replies.append((client, reply))
            return step
        failed = self._failures.get(key)
        if failed is not None:
            if failed > now:
                step.replies.append((client, wire.question_response(q, wire.SERVFAIL)))
                return step
            del self._failures[key]
        waiter = _Waiter(q, client, transport, source, destination)
        pending = self._pending.get(key)
        if pending is not None:
            if len(pending.waiters) >= MAX_WAITERS:
                step.replies.append((client, wire.question_response(q, wire.SERVFAIL)))
            else:
                pending.waiters.append(waiter)
            return step
        if (
            len(self._pending) >= MAX_INFLIGHT
            or self.upstreams == 0
            or not self.upstream_budget.ready()
        ):
            step.replies.append((client, wire.question_response(q, wire.SERVFAIL)))
            return step
        pending = _Pending(key, q.name, [waiter])
        self._pending[key] = pending
        step.attempts.append(
            self._attempt(pending, 0, tcp=False, deadline=now + self.query_timeout)
        )
        return step

    def _render(
        self, template: Template, q: Query, transport: Transport, now: float
    ) -> tuple[bytes, bool]:
        """(reply, truncated): a truncated reply carries no records, so it pins nothing."""
        limit = wire.udp_limit(q) if transport == "udp" else None
        return wire.render(template, q, now, limit)

    def _host_answer(
        self,
        q: Query,
        host: tuple[list[tuple[int, int, bytes]], list[tuple[int, int, bytes]]],
        transport: Transport,
        client: Hashable,
        now: float,
    ) -> Step:
        v4, v6 = host
        records = v4 if q.qtype == wire.TYPE_A else v6 if q.qtype == wire.TYPE_AAAA else []
        template = wire.synthetic_template(q.key_name, q.qtype, wire.NOERROR, records, now)
        step = Step()
        if records:
            addresses = [
                g for g in self._gateways if g.version == (4 if q.qtype == wire.TYPE_A else 6)
            ]
            step.pinned = self.pins.add([q.name], addresses, HOST_NAME_TTL)
        step.replies.append((client, self._render(template, q, transport, now)[0]))
        return step

    # -- upstream ----------------------------------------------------------------------------
    def _attempt(self, pending: _Pending, upstream: int, *, tcp: bool, deadline: float) -> Attempt:
        qid = self._rng.getrandbits(16)
        qname_wire, qtype = pending.key
        message = (
            _HEADER.pack(qid, 0x0100, 1, 0, 0, 1)  # RD; one question; our OPT
            + qname_wire
            + struct.pack("!HH", qtype, wire.CLASS_IN)
            + wire.OPT_RR
        )
        attempt = Attempt(pending.key, upstream, qid, message, tcp, deadline)
        pending.upstream = upstream
        pending.attempt = attempt
        return attempt

    def is_current(self, attempt: Attempt) -> bool:
        """Whether ``attempt`` is still the try its question waits for (else the shell
        closes its socket)."""
        return self._current(attempt) is not None

    def _current(self, attempt: Attempt) -> _Pending | None:
        pending = self._pending.get(attempt.key)
        if pending is None or pending.attempt is not attempt:
            return None  # an answer or a timeout of a try that is over
        return pending

    def upstream_reply(self, attempt: Attempt, data: bytes) -> Step:
        """A message that arrived on ``attempt``'s socket (the kernel already matched the
        source: the socket is connected to the resolver)."""
        pending = self._current(attempt)
        if pending is None or len(data) < 12:
            return Step()
        if struct.unpack_from("!H", data)[0] != attempt.id:
            return Step()  # not the answer to this try: ignored, the try goes on
        key_name, qtype = attempt.key
        self.upstream_budget.charge(1 + wire.record_count(data, MAX_UPSTREAM_RECORDS))
        try:
            up = answer.parse_upstream(data, key_name, qtype, MAX_UPSTREAM_RECORDS)
        except answer.Mismatch:
            return Step()  # another question: spoofed or confused, ignored
        except answer.NeedsDnspython:
            try:
                trimmed, _ = wire.trim_message(data, MAX_UPSTREAM_RECORDS)
                up = answer.from_dnspython(dns.message.from_wire(trimmed))
            except Exception:  # any garbage under our ID: this resolver failed
                return self.upstream_failed(attempt, "an unreadable answer")
        except (ValueError, struct.error):
            return self.upstream_failed(attempt, "an unreadable answer")
        if up.truncated:
            if attempt.tcp:
                return self.upstream_failed(attempt, "a truncated answer over TCP")
            retry = self._attempt(pending, attempt.upstream, tcp=True, deadline=attempt.deadline)
            return Step(attempts=[retry])
        if up.rcode not in _ANSWER_RCODES:
            return self.upstream_failed(attempt, f"rcode {up.rcode}")
        now = self._clock()
        try:
            digest = self._digest(pending, up, now)
        except _Failure:
            return self._finish_failure(pending, now)
        return self._finish(pending, digest, now)

    def upstream_failed(self, attempt: Attempt, reason: str) -> Step:
        """``attempt`` timed out or its transport failed: the next resolver, or SERVFAIL."""
        pending = self._current(attempt)
        if pending is None:
            return Step()
        now = self._clock()
        nxt = attempt.upstream + 1
        if nxt < self.upstreams:
            return Step(
                attempts=[self._attempt(pending, nxt, tcp=False, deadline=now + self.query_timeout)]
            )
        return self._finish_failure(pending, now)

    def _finish_failure(self, pending: _Pending, now: float) -> Step:
        del self._pending[pending.key]
        self._failures[pending.key] = now + FAILURE_CACHE_SECONDS
        return Step(
            replies=[
                (w.client, wire.question_response(w.query, wire.SERVFAIL)) for w in pending.waiters
            ]
        )

    def _finish(self, pending: _Pending, digest: _Digest, now: float) -> Step:
        del self._pending[pending.key]
        step = Step()
        for name, reason in digest.events:
            w = pending.waiters[0]
            self._event(step, "deny", None, reason, name, w.transport, w.source, w.destination)
        rendered = [
            (w.client, *self._render(digest.template, w.query, w.transport, now))
            for w in pending.waiters
        ]
        if digest.addresses and not all(truncated for _, _, truncated in rendered):
            step.pinned = self.pins.add(digest.names, digest.addresses, digest.pin_ttl)
        if digest.cache_ttl > 0:
            self.cache.put(
                pending.key,
                CachedAnswer(
                    digest.template,
                    now + digest.cache_ttl,
                    digest.names,
                    digest.addresses,
                    digest.pin_ttl,
                ),
            )
        step.replies.extend((client, reply) for client, reply, _ in rendered)
        return step

    # -- answers -----------------------------------------------------------------------------
    def _digest(self, pending: _Pending, up: answer.UpstreamAnswer, now: float) -> _Digest:
        key, qtype = pending.key
        index = up.answer
        chain: list[answer.RRset] = []
        names = [key]
        current = key
        final: answer.RRset | None = None
        while True:
            final = index.get((current, qtype))
            if final is not None or qtype == wire.TYPE_CNAME:
                break
            cname = index.get((current, wire.TYPE_CNAME))
            if cname is None:
                break
            target = cname.rdatas[0]  # a CNAME RRset has one record (RFC 2181 10.1)
            if target in names:
                raise _Failure("CNAME loop")
            if len(names) > MAX_CNAME_CHAIN:
                raise _Failure(f"CNAME chain longer than {MAX_CNAME_CHAIN}")
            chain.append(cname)
            names.append(target)
            current = target
        texts = [wire.name_text(answer.labels_of(n)) for n in names]
        events: list[tuple[str, str]] = []
        for text in texts[1:]:
            why = self._denied_alias(text)
            if why is not None:
                events.append((texts[0], f"the answer's CNAME chain reaches {text}: {why}"))
                return self._refused(pending, now, tuple(events))
        records = [
            (c.owner, wire.TYPE_CNAME, min(c.ttl, MAX_CACHE_TTL), c.rdatas[0]) for c in chain
        ]
        addresses: list[IPAddress] = []
        if final is not None:
            ttl = min(final.ttl, MAX_CACHE_TTL)
            kept = final.rdatas
            if qtype in (wire.TYPE_A, wire.TYPE_AAAA):
                kept = []
                removed: list[IPAddress] = []
                make = ipaddress.IPv4Address if qtype == wire.TYPE_A else ipaddress.IPv6Address
                for rdata in final.rdatas:
                    addr = make(rdata)
                    if self.rebind_protection and self._rebinds(addr):
                        removed.append(addr)
                    elif len(kept) < MAX_ADDRESSES_PER_ANSWER:
                        kept.append(rdata)
                        addresses.append(addr)
                if removed:
                    events.append(
                        (
                            texts[0],
                            "rebind protection removed "
                            + ", ".join(str(a) for a in removed[:8])
                            + (f" and {len(removed) - 8} more" if len(removed) > 8 else "")
                            + f" from the answer for {texts[-1]}",
                        )
                    )
                    if not kept:
                        return self._refused(pending, now, tuple(events))
            records += [(final.owner, qtype, ttl, rdata) for rdata in kept]
        authority: list[tuple[bytes, int, int, bytes]] = []
        if final is None:
            for soa, minimum in up.soas:
                if answer.is_subdomain(current, soa.owner):
                    ttl = min(soa.ttl, minimum, MAX_NEGATIVE_TTL)
                    authority.append((soa.owner, wire.TYPE_SOA, ttl, soa.rdatas[0]))
                    break
        try:
            template = wire.build_template(key, qtype, up.rcode, records, authority, created=now)
        except ValueError as exc:
            raise _Failure(str(exc)) from None
        ttls = [r[2] for r in records] + [r[2] for r in authority]
        cache_ttl = min(ttls) if ttls else 0
        pin_ttl = float(min(r[2] for r in records)) if addresses else 0.0
        return _Digest(
            template,
            cache_ttl,
            tuple(texts) if addresses else (),
            tuple(addresses),
            pin_ttl,
            tuple(events),
        )

    def _refused(
        self, pending: _Pending, now: float, events: tuple[tuple[str, str], ...]
    ) -> _Digest:
        template = wire.synthetic_template(pending.key[0], pending.key[1], wire.NXDOMAIN, [], now)
        return _Digest(template, 0, events=events)

    def _rebinds(self, addr: IPAddress) -> bool:
        group = classify(addr)
        if group is not None and group not in _REBIND_GROUPS:
            return False
        return not self.policy.rebind_allowed(addr)

    def _denied_alias(self, name: str) -> str | None:
        """Why a CNAME target is refused: a deny list, or a deny *domain or suffix* rule that
        decides it (a ``*`` rule or the default does not: they say nothing about this name)."""
        d = self.policy.decide_query(name)
        if d.action is not PolicyAction.DENY:
            return None
        if d.rule is None:
            return d.reason if "deny_domain" in d.reason else None
        kind = self.policy.rules[d.rule].target.kind
        if kind in (DestinationKind.DOMAIN, DestinationKind.SUFFIX):
            return d.reason
        return None

    # -- audit -------------------------------------------------------------------------------
    def _event(
        self,
        step: Step,
        action: str,
        rule: int | None,
        reason: str,
        name: str,
        transport: Transport,
        source: str,
        destination: str,
    ) -> None:
        now = self._clock()
        if now - self._events_window >= 1.0:
            self._events_window = now
            self._events_written = 0
        if self._events_written >= MAX_EVENTS_PER_SECOND:
            self._events_suppressed += 1
            return
        self._events_written += 1
        if self._events_suppressed:
            reason += f" ({self._events_suppressed} more DNS events not logged)"
            self._events_suppressed = 0
        step.events.append(QueryEvent(action, rule, reason, name, transport, source, destination))
