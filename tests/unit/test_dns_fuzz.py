"""Fuzzing every DNS path that takes untrusted bytes: guest queries over UDP, guest TCP streams,
upstream answers, resolv.conf text. Seeded mutation loops (deterministic, CI-sized) plus a
hypothesis property for names; 100,000+ inputs in all, each checked for no exception and for
well-formed output (every reply parses, carries the query's ID; nothing but the question ever
goes upstream; nothing is pinned that the reply does not carry).
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections.abc import Hashable

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.config import Group, NetworkConfig, PolicyRule
from corral.net.dns import wire
from corral.net.dns.resolver import Attempt, SandboxResolver, Step, TokenBucket
from corral.net.dns.upstreams import parse_resolv_conf
from corral.policy import Policy, classify
from corral.policy.pins import PinSet

pytestmark = pytest.mark.timeout(120)

GW4 = ipaddress.ip_address("172.16.0.1")
GW6 = ipaddress.ip_address("fd42:6d73:62::1")

GUEST_QUERIES = 60_000
TCP_STREAMS = 15_000
UPSTREAM_ANSWERS = 20_000
RESOLV_TEXTS = 10_000


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 0.0001
        return self.now


def resolver(seed: int) -> SandboxResolver:
    clock = Clock()
    config = NetworkConfig(
        policy="public-only",
        deny_domains=["denied.example"],
        deny_domain_suffixes=[".blocked.example"],
        rules=[PolicyRule(action="allow", destination="10.9.0.0/16")],
    )
    r = SandboxResolver(
        policy=Policy.compile(config, host_addresses=[GW4, GW6]),
        pins=PinSet(clock=clock),
        gateways=[GW4, GW6],
        ipv6=True,
        upstreams=2,
        query_timeout=1.0,
        clock=clock,
        rng=random.Random(seed),
        max_queries_per_second=1e12,
    )
    r.upstream_budget = TokenBucket(1e12, clock)  # the budget has its own unit test
    return r


# -- corpora ----------------------------------------------------------------------------------------


def guest_corpus() -> list[bytes]:
    out = []
    for name, rtype in [
        ("www.example.com", "A"),
        ("WWW.Example.COM.", "AAAA"),
        ("a.b.c.d.e.f.example", "TXT"),
        (".", "NS"),
        ("host.corral.internal", "A"),
        ("x.blocked.example", "A"),
        ("denied.example", "MX"),
        ("_sip._tcp.example.com", "SRV"),
        ("a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 61, "A"),
        ("example.com", "ANY"),
        ("example.com", "AXFR"),
    ]:
        for edns in (-1, 0):
            q = dns.message.make_query(name, rtype, use_edns=edns)
            out.append(q.to_wire())
    q = dns.message.make_query("ecs.example.com", "A")
    q.use_edns(
        0,
        dns.flags.DO,
        4096,
        options=[dns.edns.ECSOption("198.51.100.0", 24), dns.edns.GenericOption(10, b"12345678")],
    )
    q.additional.append(dns.rrset.from_text("extra.example.", 60, "IN", "A", "1.2.3.4"))
    out.append(q.to_wire())
    q = dns.message.make_query("withanswer.example.com", "A")
    q.answer.append(dns.rrset.from_text("withanswer.example.com.", 60, "IN", "A", "1.2.3.4"))
    out.append(q.to_wire())
    return out


def mutate(rnd: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.randrange(9)
        if op == 0 and b:  # flip bits
            i = rnd.randrange(len(b))
            b[i] ^= 1 << rnd.randrange(8)
        elif op == 1 and b:  # replace a byte
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        elif op == 2:  # truncate
            del b[rnd.randrange(len(b) + 1) :]
        elif op == 3:  # insert random bytes
            i = rnd.randrange(len(b) + 1)
            b[i:i] = rnd.randbytes(rnd.randint(1, 8))
        elif op == 4 and len(b) >= 12:  # a header count
            struct.pack_into(
                "!H",
                b,
                rnd.choice((4, 6, 8, 10)),
                rnd.choice((0, 1, 2, 255, 65535, rnd.randrange(65536))),
            )
        elif op == 5 and len(b) >= 4:  # flags
            struct.pack_into("!H", b, 2, rnd.randrange(65536))
        elif op == 6 and len(b) > 13:  # a compression pointer somewhere, maybe a loop
            i = rnd.randrange(12, len(b) - 1)
            b[i : i + 2] = struct.pack("!H", 0xC000 | rnd.choice((12, i, rnd.randrange(len(b)))))
        elif op == 7 and b:  # duplicate a slice
            i = rnd.randrange(len(b))
            j = rnd.randrange(i, min(len(b), i + 40) + 1)
            b[j:j] = b[i:j]
        elif op == 8:  # a label length byte
            if len(b) > 12:
                b[rnd.randrange(12, len(b))] = rnd.choice((0, 63, 64, 127, 191, 192, 255))
    return bytes(b)


def check_reply(data: bytes, reply: bytes, limit: int | None) -> None:
    msg = dns.message.from_wire(reply)
    assert msg.flags & dns.flags.QR
    assert reply[:2] == data[:2]
    if limit is not None:
        assert len(reply) <= max(limit, wire.UDP_PAYLOAD)


def check_attempt(attempt: Attempt) -> None:
    up = dns.message.from_wire(attempt.wire)
    assert len(up.question) == 1 and not up.answer and not up.authority and not up.additional
    assert up.edns == 0 and not up.options and up.flags == dns.flags.RD
    assert up.id == attempt.id


def drain(r: SandboxResolver, attempts: list[Attempt]) -> None:
    """Fail every try until the questions are answered SERVFAIL (keeps in-flight low)."""
    while attempts:
        a = attempts.pop()
        step = r.upstream_failed(a, "fuzz")
        for nxt in step.attempts:
            check_attempt(nxt)
        attempts.extend(step.attempts)


# -- guest UDP ----------------------------------------------------------------------------------------


def test_fuzz_guest_udp_queries() -> None:
    rnd = random.Random(0xD45)
    r = resolver(1)
    corpus = guest_corpus()
    attempts: list[Attempt] = []
    for i in range(GUEST_QUERIES):
        data = rnd.randbytes(rnd.randint(0, 80)) if i % 10 == 0 else mutate(rnd, rnd.choice(corpus))
        step = r.query(data, "udp", ("c", i), "172.16.0.2", "8.8.8.8")
        if len(data) < 12 or data[2] & 0x80:
            assert step.silent and not step.replies and not step.attempts
            continue
        assert not step.silent
        assert len(step.replies) + len(step.attempts) <= 1 or not step.replies
        for _client, reply in step.replies:
            check_reply(data, reply, wire.UDP_PAYLOAD)
        for a in step.attempts:
            check_attempt(a)
        attempts.extend(step.attempts)
        if len(attempts) > 64:
            drain(r, attempts)
    drain(r, attempts)
    assert r.inflight == 0


# -- guest TCP ----------------------------------------------------------------------------------------


def test_fuzz_guest_tcp_streams() -> None:
    rnd = random.Random(0x7C9)
    r = resolver(2)
    corpus = guest_corpus()
    attempts: list[Attempt] = []
    for i in range(TCP_STREAMS):
        messages = [
            mutate(rnd, rnd.choice(corpus)) if rnd.random() < 0.5 else rnd.choice(corpus)
            for _ in range(rnd.randint(1, 4))
        ]
        stream = bytearray(b"".join(wire.frame(m) for m in messages))
        if rnd.random() < 0.3:
            stream = bytearray(mutate(rnd, bytes(stream)))
        whole: list[bytes] | str
        try:
            whole = wire.StreamFramer().feed(bytes(stream))
        except wire.FramingError:
            whole = "error"
        framer = wire.StreamFramer()
        got: list[bytes] = []
        pos = 0
        result: list[bytes] | str = got
        try:
            while pos < len(stream):
                n = rnd.randint(1, 64)
                got.extend(framer.feed(bytes(stream[pos : pos + n])))
                assert framer.pending <= wire.MAX_QUERY_SIZE + 2
                pos += n
        except wire.FramingError:
            result = "error"
        if result != "error" and whole != "error":
            assert got == whole  # splitting never changes what is read
        elif whole != "error":
            # an error while split means the whole stream errors too, after the same messages
            pytest.fail(f"split stream failed where the whole did not: {bytes(stream)!r}")
        for m in got:
            client: Hashable = ("t", i)
            step = r.query(m, "tcp", client, "172.16.0.2", "8.8.8.8")
            for _c, reply in step.replies:
                check_reply(m, reply, None)
            attempts.extend(step.attempts)
        if len(attempts) > 64:
            drain(r, attempts)
    drain(r, attempts)


# -- upstream answers -----------------------------------------------------------------------------------


def upstream_corpus(question: dns.message.Message) -> list[bytes]:
    name = question.question[0].name
    rdtype = question.question[0].rdtype
    out = []

    def resp(
        *answer: dns.rrset.RRset,
        rcode: int = 0,
        authority: tuple[dns.rrset.RRset, ...] = (),
        tc: bool = False,
    ) -> None:
        m = dns.message.make_response(question)
        m.set_rcode(rcode)
        m.answer.extend(answer)
        m.authority.extend(authority)
        if tc:
            m.flags |= dns.flags.TC
        out.append(m.to_wire(max_size=65535))

    a = dns.rrset.from_text(name, 60, "IN", "A", "203.0.113.1", "10.0.0.1", "10.9.1.1", "127.0.0.1")
    aaaa = dns.rrset.from_text(name, 60, "IN", "AAAA", "2001:db8::1", "fe80::1", "::ffff:10.0.0.1")
    target = dns.name.from_text("target.cdn.example")
    cname = dns.rrset.from_text(name, 30, "IN", "CNAME", str(target))
    loop = dns.rrset.from_text(target, 30, "IN", "CNAME", str(name))
    ta = dns.rrset.from_text(target, 0, "IN", "A", "203.0.113.2")
    soa = dns.rrset.from_text("example.", 300, "IN", "SOA", "ns.example. h.example. 1 2 3 4 30")
    txt = dns.rrset.from_text(name, 60, "IN", "TXT", '"hello"')
    denied = dns.rrset.from_text(target, 30, "IN", "CNAME", "x.blocked.example.")
    many = dns.rrset.RRset(name, 1, dns.rdatatype.A)
    for i in range(100):  # over MAX_UPSTREAM_RECORDS: trimmed
        many.add(dns.rdata.from_text("IN", "A", f"198.18.1.{i}"))
    resp(a if rdtype != dns.rdatatype.AAAA else aaaa)
    resp(cname, ta)
    resp(cname, loop)
    resp(cname, denied)
    resp(rcode=3, authority=(soa,))
    resp(authority=(soa,))
    resp(txt)
    resp(many)
    resp(tc=True)
    resp(rcode=2)
    return out


def test_fuzz_upstream_answers() -> None:
    rnd = random.Random(0x0A5)
    r = resolver(3)
    names = ["www.example.com", "a.b.example", "cdn.example.org"]
    types = ["A", "AAAA", "TXT", "CNAME", "MX"]
    corpora: dict[tuple[str, str], list[bytes]] = {}
    done = 0
    qid = 0
    while done < UPSTREAM_ANSWERS:
        name, rtype = rnd.choice(names), rnd.choice(types)
        qid = (qid + 1) % 65536
        guest = dns.message.make_query(f"g{qid}.{name}", rtype, use_edns=rnd.choice((-1, 0)))
        guest.id = qid
        gdata = guest.to_wire()
        step = r.query(gdata, rnd.choice(("udp", "tcp")), "g", "172.16.0.2", "8.8.8.8")  # type: ignore[arg-type]
        if not step.attempts:
            continue
        (attempt,) = step.attempts
        key = (name, rtype)
        if key not in corpora:
            corpora[key] = upstream_corpus(dns.message.from_wire(attempt.wire))
        for _ in range(8):  # several answers per try: ignored ones keep it open
            if not r.is_current(attempt):
                break
            base = rnd.choice(corpora[key])
            data = mutate(rnd, base) if rnd.random() < 0.8 else base
            if rnd.random() < 0.7 and len(data) >= 2:
                data = struct.pack("!H", attempt.id) + data[2:]  # past the ID check
            # the corpus was made for another question name of the same shape: patch nothing
            # else, so most answers are "another question" (ignored) unless the question is
            # rewritten to the try's own:
            if rnd.random() < 0.6:
                data = rewrite_question(data, attempt)
            out = r.upstream_reply(attempt, data)
            done += 1
            check_step(out, gdata)
            for nxt in out.attempts:
                check_attempt(nxt)
                attempt = nxt
        if r.is_current(attempt):
            drain(r, [attempt])
    assert r.inflight == 0


def rewrite_question(data: bytes, attempt: Attempt) -> bytes:
    """``data`` with its question replaced by the try's (when its header and question parse)."""
    try:
        start = 12
        end = start
        while data[end] != 0:
            end += data[end] + 1
        end += 5
    except IndexError:
        return data
    own = attempt.wire[12 : attempt.wire.index(b"\x00", 12) + 5]
    return data[:12] + own + data[end:]


def check_step(step: Step, guest: bytes) -> None:
    carried: set[str] = set()
    for _c, reply in step.replies:
        msg = dns.message.from_wire(reply)
        assert reply[:2] == guest[:2]
        for rrset in msg.answer:
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                carried |= {str(ipaddress.ip_address(rd.address)) for rd in rrset}
    pinned = {str(a) for a, _ in step.pinned}
    if step.replies:
        mapped = {str(ipaddress.ip_address(a).ipv4_mapped or a) if ":" in a else a for a in carried}
        assert pinned <= carried | mapped, (pinned, carried)
    for a, _ in step.pinned:  # rebind protection: only what the address rule allows
        group = classify(a)
        assert group in (Group.PUBLIC, Group.MULTICAST) or a in ipaddress.ip_network(
            "10.9.0.0/16"
        ), a


# -- resolv.conf ----------------------------------------------------------------------------------------


def test_fuzz_resolv_conf() -> None:
    rnd = random.Random(0x2E5)
    pieces = [
        "nameserver",
        " ",
        "\t",
        "\n",
        "1.1.1.1",
        "::1",
        "fe80::1%eth0",
        "#",
        "search",
        "x" * 300,
        "999.1.1.1",
        "\x00",
        "é",
    ]
    for _ in range(RESOLV_TEXTS):
        text = "".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 30)))
        if rnd.random() < 0.2:
            text = rnd.randbytes(rnd.randint(0, 200)).decode("latin-1")
        got = parse_resolv_conf(text)
        assert len(got) <= 3
        for addr, port in got:
            ipaddress.ip_address(addr)
            assert port == 53


# -- names -------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=63), min_size=1, max_size=4))
def test_name_text_keeps_labels_apart(labels: list[bytes]) -> None:
    """Whatever bytes a label holds, the text has exactly one dot per label boundary, so
    suffix rules (text) and the DNS tree (labels) agree."""
    qname = b"".join(bytes([len(x)]) + x for x in labels) + b"\0"
    if len(qname) > wire.MAX_NAME_WIRE:
        return
    data = struct.pack("!6H", 1, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)
    q = wire.parse_query(data)
    assert len(q.name.split(".")) == len(labels)
    assert q.name == q.name.lower()
    assert q.name.isascii()
