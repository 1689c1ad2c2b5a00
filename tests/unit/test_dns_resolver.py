"""SandboxResolver, the DNS interceptor's decisions, with no sockets (corral.net.dns.resolver).

Guest queries are made with dnspython, upstream answers too (``answer_for``): the core sees the
same bytes it sees in production. A fake clock and a seeded RNG make every case deterministic.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections.abc import Hashable, Sequence

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdatatype
import dns.rrset
import pytest

from corral.config import DNSConfig, NetworkConfig, NetworkPolicy, PolicyRule
from corral.net.dns import resolver as resolver_mod
from corral.net.dns import wire
from corral.net.dns.resolver import Attempt, SandboxResolver, Step
from corral.policy import Policy
from corral.policy.pins import MIN_PIN_SECONDS, PinSet

GW4 = ipaddress.ip_address("172.16.0.1")
GW6 = ipaddress.ip_address("fd42:6d73:62::1")
PUBLIC = "203.0.113.7"
CLIENT = ("udp-client",)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(
    config: NetworkConfig | None = None,
    *,
    ipv6: bool = True,
    upstreams: int = 2,
    log_allowed: bool = False,
    rate: float = 1e9,
) -> tuple[SandboxResolver, Clock, PinSet]:
    clock = Clock()
    pins = PinSet(clock=clock)
    config = config or NetworkPolicy.public_only()
    policy = Policy.compile(config, host_addresses=[GW4, GW6])
    r = SandboxResolver(
        policy=policy,
        pins=pins,
        gateways=[GW4, GW6] if ipv6 else [GW4],
        ipv6=ipv6,
        upstreams=upstreams,
        query_timeout=2.0,
        log_allowed=log_allowed,
        clock=clock,
        rng=random.Random(1),
        max_queries_per_second=rate,
    )
    return r, clock, pins


def query(name: str, rdtype: str = "A", *, edns: int | None = None, qid: int = 4242) -> bytes:
    if edns is None:
        q = dns.message.make_query(name, rdtype, use_edns=False)
    else:
        q = dns.message.make_query(name, rdtype, use_edns=edns, payload=wire.UDP_PAYLOAD)
    q.id = qid
    return q.to_wire()


def ask(r: SandboxResolver, data: bytes, transport: str = "udp", client: Hashable = CLIENT) -> Step:
    return r.query(data, transport, client, "172.16.0.2", "8.8.8.8")  # type: ignore[arg-type]


def reply_of(step: Step, client: Hashable = CLIENT) -> dns.message.Message:
    (got,) = [d for c, d in step.replies if c == client]
    return dns.message.from_wire(got)


def answer_for(
    attempt: Attempt,
    records: Sequence[str] = (),
    *,
    rcode: int = 0,
    authority: Sequence[str] = (),
    tc: bool = False,
    qid: int | None = None,
) -> bytes:
    """An upstream's answer to ``attempt``; records as 'name ttl IN type rdata'."""
    q = dns.message.from_wire(attempt.wire)
    resp = dns.message.make_response(q)
    resp.set_rcode(rcode)
    for text in records:
        resp.answer.append(dns.rrset.from_text(*_split(text)))
    for text in authority:
        resp.authority.append(dns.rrset.from_text(*_split(text)))
    if tc:
        resp.flags |= dns.flags.TC
    if qid is not None:
        resp.id = qid
    return resp.to_wire(max_size=65535)


def _split(text: str) -> list[str | int]:
    name, ttl, cls, rtype, *rdata = text.split()
    return [name, int(ttl), cls, rtype, " ".join(rdata)]


def addresses(msg: dns.message.Message) -> list[str]:
    return [rd.address for rrset in msg.answer if rrset.rdtype in (1, 28) for rd in rrset]


def resolve(
    r: SandboxResolver, name: str, records: Sequence[str], rdtype: str = "A", **kw: object
) -> tuple[Step, Step]:
    s1 = ask(r, query(name, rdtype))
    (attempt,) = s1.attempts
    s2 = r.upstream_reply(attempt, answer_for(attempt, records, **kw))  # type: ignore[arg-type]
    return s1, s2


# -- parsing and shape ----------------------------------------------------------------------------


def test_garbage_without_header_gets_silence_with_header_formerr() -> None:
    r, _, _ = make()
    assert ask(r, b"").silent
    assert ask(r, b"\x00" * 11).silent
    step = ask(r, b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05abc")  # truncated qname
    msg = dns.message.from_wire(step.replies[0][1])
    assert msg.id == 0x1234 and msg.rcode() == dns.rcode.FORMERR


def test_several_questions_get_formerr() -> None:
    r, _, _ = make()
    q = dns.message.make_query("a.example", "A")
    q.question.append(dns.rrset.RRset(dns.name.from_text("b.example"), 1, 1))
    msg = reply_of(ask(r, q.to_wire()))
    assert msg.rcode() == dns.rcode.FORMERR
    assert not msg.question


def test_responses_are_never_answered() -> None:
    r, _, _ = make()
    resp = dns.message.make_response(dns.message.make_query("a.example", "A"))
    assert ask(r, resp.to_wire()).silent


def test_zone_transfer_and_other_classes_get_notimp() -> None:
    r, _, _ = make()
    assert reply_of(ask(r, query("example.com", "AXFR"))).rcode() == dns.rcode.NOTIMP
    q = dns.message.make_query("version.bind", "TXT", rdclass="CH")
    assert reply_of(ask(r, q.to_wire())).rcode() == dns.rcode.NOTIMP


def test_edns_version_one_gets_badvers() -> None:
    r, _, _ = make()
    q = dns.message.make_query("a.example", "A", use_edns=1)
    msg = reply_of(ask(r, q.to_wire()))
    assert msg.rcode() == dns.rcode.BADVERS


# -- policy ---------------------------------------------------------------------------------------


def name_config(**kw: object) -> NetworkConfig:
    return NetworkConfig(
        default_egress="deny",
        rules=[
            PolicyRule(action="allow", destination="api.example.com", protocol="tcp", port="443"),
            PolicyRule(action="allow", destination=".svc.example"),
            PolicyRule(action="deny", destination="bad.svc.example"),
        ],
        **kw,  # type: ignore[arg-type]
    )


def test_refused_names_get_nxdomain_and_never_reach_upstream() -> None:
    r, _, _ = make(name_config())
    for name in ("other.example", "svc.example", "bad.svc.example.x"):
        step = ask(r, query(name))
        assert step.attempts == []
        msg = reply_of(step)
        assert msg.rcode() == dns.rcode.NXDOMAIN
        assert not msg.answer and not msg.authority
        (event,) = step.events
        assert event.action == "deny" and event.name == name
        assert event.source == "172.16.0.2" and event.destination == "8.8.8.8"
    # a domain rule matches the query whatever its protocol and port; a suffix rule its subdomains
    assert ask(r, query("API.Example.COM.")).attempts
    assert ask(r, query("x.svc.example")).attempts
    # first match wins: the suffix allow (rule 1) comes before the exact deny (rule 2)
    assert ask(r, query("bad.svc.example")).attempts


def test_deny_lists_come_first_and_name_the_list() -> None:
    r, _, _ = make(
        name_config(deny_domains=["api.example.com"], deny_domain_suffixes=[".svc.example"])
    )
    step = ask(r, query("api.example.com"))
    assert reply_of(step).rcode() == dns.rcode.NXDOMAIN
    assert "deny_domains[0]" in step.events[0].reason and step.events[0].rule is None
    step = ask(r, query("svc.example"))  # a deny suffix covers its apex too
    assert "deny_domain_suffixes[0]" in step.events[0].reason
    assert reply_of(ask(r, query("a.b.svc.example"))).rcode() == dns.rcode.NXDOMAIN


def test_allowed_queries_are_audited_only_when_asked() -> None:
    r, _, _ = make(name_config())
    assert ask(r, query("api.example.com")).events == []
    r, _, _ = make(name_config(), log_allowed=True)
    (event,) = ask(r, query("api.example.com")).events
    assert event.action == "allow" and event.rule == 0


def test_tcp_transport_is_decided_as_tcp() -> None:
    cfg = NetworkConfig(
        default_egress="deny",
        rules=[PolicyRule(action="allow", destination="*", protocol="udp", port="53")],
    )
    r, _, _ = make(cfg)
    assert ask(r, query("a.example")).attempts
    assert reply_of(ask(r, query("a.example"), "tcp")).rcode() == dns.rcode.NXDOMAIN


def test_a_name_that_is_not_a_hostname_matches_no_domain_rule() -> None:
    r, _, _ = make(name_config())
    # one label "x.svc" under "example": its text is x\046svc.example, never x.svc.example
    data = (
        struct.pack("!6H", 7, 0x0100, 1, 0, 0, 0)
        + b"\x05x.svc\x07example\x00"
        + struct.pack("!HH", 1, 1)
    )
    step = ask(r, data)
    assert reply_of(step).rcode() == dns.rcode.NXDOMAIN
    assert step.events[0].name == "x\\046svc.example"


# -- upstream and answers -------------------------------------------------------------------------


def test_query_is_rebuilt_question_only_with_a_fresh_id() -> None:
    r, _, _ = make()
    q = dns.message.make_query("Www.Example.com", "A", use_edns=0, want_dnssec=True)
    q.use_edns(0, dns.flags.DO, 4096, options=[dns.edns.ECSOption("198.51.100.0", 24)])
    q.id = 777
    q.flags |= dns.flags.CD
    q.additional.append(dns.rrset.from_text("extra.example.", 60, "IN", "A", "1.2.3.4"))
    (attempt,) = ask(r, q.to_wire()).attempts
    up = dns.message.from_wire(attempt.wire)
    assert up.id != 777 and up.id == attempt.id
    assert up.flags == dns.flags.RD  # no CD, no AD
    assert [str(rr.name) for rr in up.question] == ["www.example.com."]
    assert up.edns == 0 and not up.options and up.payload == wire.UDP_PAYLOAD
    assert not up.ednsflags & dns.flags.DO
    assert up.answer == [] and up.authority == [] and up.additional == []


def test_answer_keeps_the_guest_spelling_and_id_and_pins_before_the_reply() -> None:
    r, _, pins = make()
    step = ask(r, query("WWW.example.COM", qid=9))
    (attempt,) = step.attempts
    done = r.upstream_reply(
        attempt,
        answer_for(
            attempt,
            ["www.example.com. 300 IN A 203.0.113.7", "www.example.com. 300 IN A 203.0.113.8"],
        ),
    )
    msg = reply_of(done)
    assert msg.id == 9 and str(msg.question[0].name) == "WWW.example.COM."
    assert sorted(addresses(msg)) == ["203.0.113.7", "203.0.113.8"]
    assert msg.flags & dns.flags.RA and msg.flags & dns.flags.RD and not msg.flags & dns.flags.AA
    assert sorted(str(a) for a, _ in done.pinned) == ["203.0.113.7", "203.0.113.8"]
    assert pins.names_for(ipaddress.ip_address("203.0.113.7")) == {"www.example.com"}


def test_cname_chain_is_pinned_and_unrelated_records_dropped() -> None:
    r, _, pins = make()
    _, done = resolve(
        r,
        "a.example",
        [
            "a.example. 60 IN CNAME b.example.",
            "b.example. 60 IN CNAME c.cdn.example.",
            "c.cdn.example. 30 IN A 203.0.113.9",
            "other.example. 60 IN A 203.0.113.99",  # not on the chain: smuggled
        ],
    )
    msg = reply_of(done)
    assert addresses(msg) == ["203.0.113.9"]
    assert len(msg.answer) == 3 and msg.additional == []
    assert pins.names_for(ipaddress.ip_address("203.0.113.9")) == {
        "a.example",
        "b.example",
        "c.cdn.example",
    }
    assert not pins.is_pinned(ipaddress.ip_address("203.0.113.99"))
    ((_, seconds),) = done.pinned
    assert seconds == 30  # the shortest TTL of the chain


def test_cname_loop_and_long_chain_are_servfail() -> None:
    r, _, pins = make()
    _, done = resolve(
        r,
        "loop.example",
        ["loop.example. 60 IN CNAME l2.example.", "l2.example. 60 IN CNAME loop.example."],
    )
    assert reply_of(done).rcode() == dns.rcode.SERVFAIL
    chain = [
        f"c{i}.example. 60 IN CNAME c{i + 1}.example."
        for i in range(resolver_mod.MAX_CNAME_CHAIN + 1)
    ]
    _, done = resolve(
        r,
        "c0.example",
        [*chain, f"c{resolver_mod.MAX_CNAME_CHAIN + 1}.example. 60 IN A 203.0.113.5"],
    )
    assert reply_of(done).rcode() == dns.rcode.SERVFAIL
    assert len(pins) == 0
    chain = [
        f"d{i}.example. 60 IN CNAME d{i + 1}.example." for i in range(resolver_mod.MAX_CNAME_CHAIN)
    ]
    _, done = resolve(
        r, "d0.example", [*chain, f"d{resolver_mod.MAX_CNAME_CHAIN}.example. 60 IN A 203.0.113.5"]
    )
    assert addresses(reply_of(done)) == ["203.0.113.5"]


def test_cname_to_a_denied_name_is_nxdomain() -> None:
    r, _, pins = make(
        NetworkConfig(policy="public-only", deny_domain_suffixes=[".tracker.example"])
    )
    _, done = resolve(
        r,
        "ads.site.example",
        [
            "ads.site.example. 60 IN CNAME x.tracker.example.",
            "x.tracker.example. 60 IN A 203.0.113.5",
        ],
    )
    assert reply_of(done).rcode() == dns.rcode.NXDOMAIN
    assert "x.tracker.example" in done.events[0].reason
    assert len(pins) == 0


def test_rebind_protection_removes_private_answers() -> None:
    r, _, pins = make()
    _, done = resolve(
        r,
        "mixed.example",
        [
            "mixed.example. 60 IN A 10.0.0.1",
            "mixed.example. 60 IN A 203.0.113.5",
            "mixed.example. 60 IN A 127.0.0.1",
        ],
    )
    assert addresses(reply_of(done)) == ["203.0.113.5"]
    assert "10.0.0.1" in done.events[0].reason and done.events[0].action == "deny"
    assert not pins.is_pinned(ipaddress.ip_address("10.0.0.1"))
    for bad in ("169.254.169.254", "192.168.1.1", "::ffff:10.1.2.3", "0.0.0.0"):
        rtype = "AAAA" if ":" in bad else "A"
        _, done = resolve(
            r,
            f"only-{rtype}-{bad.replace(':', '-')}.example",
            [f"only-{rtype}-{bad.replace(':', '-')}.example. 60 IN {rtype} {bad}"],
            rtype,
        )
        msg = reply_of(done)
        assert msg.rcode() == dns.rcode.NXDOMAIN and not msg.answer, bad
    _, done = resolve(
        r,
        "v6.example",
        ["v6.example. 60 IN AAAA fe80::1", "v6.example. 60 IN AAAA fd00:ec2::254"],
        "AAAA",
    )
    assert reply_of(done).rcode() == dns.rcode.NXDOMAIN


def test_rebind_protection_keeps_what_an_address_rule_allows_and_can_be_off() -> None:
    cfg = NetworkConfig(
        policy="public-only",
        rules=[PolicyRule(action="allow", destination="10.9.0.0/16", protocol="tcp", port="5432")],
    )
    r, _, _ = make(cfg)
    _, done = resolve(
        r, "db.example", ["db.example. 60 IN A 10.9.1.1", "db.example. 60 IN A 10.8.1.1"]
    )
    assert addresses(reply_of(done)) == ["10.9.1.1"]
    for off in (
        NetworkConfig(policy="public-only", dns=DNSConfig(rebind_protection=False)),
        NetworkConfig(policy="public-only", dns_rebind_protection=False),
        NetworkConfig(
            policy="public-only", dns_rebind_protection=True, dns=DNSConfig(rebind_protection=False)
        ),
    ):
        r, _, _ = make(off)
        _, done = resolve(r, "db.example", ["db.example. 60 IN A 10.8.1.1"])
        assert addresses(reply_of(done)) == ["10.8.1.1"]
    r, _, _ = make(
        NetworkConfig(
            policy="public-only", dns_rebind_protection=False, dns=DNSConfig(rebind_protection=True)
        )
    )
    _, done = resolve(r, "db.example", ["db.example. 60 IN A 10.8.1.1"])
    assert reply_of(done).rcode() == dns.rcode.NXDOMAIN


def test_huge_rrsets_are_capped_and_truncated_over_udp() -> None:
    r, _, pins = make()
    records = [f"big.example. 60 IN A 198.18.{i // 256}.{i % 256}" for i in range(3000)]
    s1 = ask(r, query("big.example"))
    (attempt,) = s1.attempts
    tcp_client = ("tcp-client",)
    pending_tcp = ask(r, query("big.example", qid=5), "tcp", tcp_client)  # joins the same question
    assert pending_tcp.attempts == [] and pending_tcp.replies == []
    done = r.upstream_reply(attempt, answer_for(attempt, records))
    udp = reply_of(done)
    assert udp.flags & dns.flags.TC and not udp.answer
    tcp = reply_of(done, tcp_client)
    assert len(addresses(tcp)) == resolver_mod.MAX_ADDRESSES_PER_ANSWER
    assert len(pins) == resolver_mod.MAX_ADDRESSES_PER_ANSWER
    # the retry over TCP comes from the cache, whole
    again = reply_of(ask(r, query("big.example"), "tcp"))
    assert len(addresses(again)) == resolver_mod.MAX_ADDRESSES_PER_ANSWER


def test_tc_without_edns_is_over_512_and_edns_size_is_honoured_up_to_1232() -> None:
    r, _, _ = make()
    records = [f"mid.example. 60 IN A 198.18.0.{i}" for i in range(40)]  # ~ 700 bytes
    s1, done = resolve(r, "mid.example", records)
    assert reply_of(done).flags & dns.flags.TC  # no EDNS: 512
    msg = reply_of(ask(r, query("mid.example", edns=0)))
    assert not msg.flags & dns.flags.TC and len(addresses(msg)) == 40
    assert msg.edns == 0 and msg.payload == wire.UDP_PAYLOAD


def test_upstream_tc_is_retried_over_tcp_with_a_new_id() -> None:
    r, _, _ = make()
    (attempt,) = ask(r, query("t.example")).attempts
    step = r.upstream_reply(attempt, answer_for(attempt, tc=True))
    (retry,) = step.attempts
    assert retry.tcp and retry.upstream == attempt.upstream and retry.deadline == attempt.deadline
    assert retry.id != attempt.id
    assert not r.is_current(attempt)
    done = r.upstream_reply(retry, answer_for(retry, ["t.example. 60 IN A 203.0.113.1"]))
    assert addresses(reply_of(done)) == ["203.0.113.1"]


def test_wrong_id_or_question_is_ignored_garbage_with_our_id_fails_over() -> None:
    r, _, _ = make()
    (attempt,) = ask(r, query("w.example")).attempts
    assert (
        r.upstream_reply(
            attempt,
            answer_for(attempt, ["w.example. 60 IN A 203.0.113.1"], qid=(attempt.id + 1) % 65536),
        )
        == Step()
    )
    other = dns.message.make_response(dns.message.make_query("x.example", "A"))
    other.id = attempt.id
    assert r.upstream_reply(attempt, other.to_wire()) == Step()
    assert r.upstream_reply(attempt, b"\x00") == Step()
    assert r.is_current(attempt)
    step = r.upstream_reply(attempt, struct.pack("!H", attempt.id) + b"\xff" * 40)
    (nxt,) = step.attempts
    assert nxt.upstream == 1 and not nxt.tcp and nxt.id != attempt.id


def test_all_upstreams_failing_is_servfail_and_remembered_a_second() -> None:
    r, clock, _ = make(upstreams=2)
    (a0,) = ask(r, query("dead.example")).attempts
    assert ask(r, query("dead.example", qid=2), client=("second",)).replies == []  # joined
    clock.now += 2
    (a1,) = r.upstream_failed(a0, "timeout").attempts
    assert a1.upstream == 1 and a1.deadline == clock.now + 2
    assert r.upstream_failed(a0, "timeout") == Step()  # stale
    clock.now += 2
    done = r.upstream_failed(a1, "timeout")
    assert {c for c, _ in done.replies} == {CLIENT, ("second",)}
    assert all(dns.message.from_wire(d).rcode() == dns.rcode.SERVFAIL for _, d in done.replies)
    assert r.inflight == 0
    step = ask(r, query("dead.example"))
    assert step.attempts == [] and reply_of(step).rcode() == dns.rcode.SERVFAIL
    clock.now += resolver_mod.FAILURE_CACHE_SECONDS
    assert ask(r, query("dead.example")).attempts


@pytest.mark.parametrize(
    "rcode", [dns.rcode.SERVFAIL, dns.rcode.REFUSED, dns.rcode.NOTIMP, dns.rcode.FORMERR]
)
def test_upstream_error_rcodes_try_the_next_resolver(rcode: int) -> None:
    r, _, _ = make(upstreams=2)
    (a0,) = ask(r, query("e.example")).attempts
    (a1,) = r.upstream_reply(a0, answer_for(a0, rcode=rcode)).attempts
    assert a1.upstream == 1
    done = r.upstream_reply(a1, answer_for(a1, rcode=rcode))
    assert reply_of(done).rcode() == dns.rcode.SERVFAIL


def test_no_upstream_at_all_is_servfail() -> None:
    r, _, _ = make(upstreams=0)
    assert reply_of(ask(r, query("a.example"))).rcode() == dns.rcode.SERVFAIL


# -- cache ----------------------------------------------------------------------------------------


def test_cache_honours_ttl_decrements_and_repins() -> None:
    r, clock, pins = make()
    resolve(r, "c.example", ["c.example. 100 IN A 203.0.113.3"])
    clock.now += 40
    step = ask(r, query("c.example", qid=99))
    assert step.attempts == []
    msg = reply_of(step)
    assert msg.id == 99 and msg.answer[0].ttl == 60
    assert pins.is_pinned(ipaddress.ip_address("203.0.113.3"))
    clock.now += 61
    assert ask(r, query("c.example")).attempts  # expired


def test_ttl_zero_is_not_cached_but_pinned_for_the_minimum() -> None:
    r, clock, pins = make()
    _, done = resolve(r, "z.example", ["z.example. 0 IN A 203.0.113.4"])
    assert done.pinned == [(ipaddress.ip_address("203.0.113.4"), MIN_PIN_SECONDS)]
    assert ask(r, query("z.example")).attempts
    clock.now += MIN_PIN_SECONDS + 0.1
    assert not pins.is_pinned(ipaddress.ip_address("203.0.113.4"))


def test_negative_answers_are_cached_by_soa_minimum() -> None:
    r, clock, _ = make()
    soa = "example. 3600 IN SOA ns.example. host.example. 1 7200 900 1209600 30"
    _, done = resolve(r, "nx.example", [], rcode=dns.rcode.NXDOMAIN, authority=[soa])
    msg = reply_of(done)
    assert msg.rcode() == dns.rcode.NXDOMAIN and msg.authority[0].ttl == 30
    clock.now += 29
    assert ask(r, query("nx.example")).attempts == []
    clock.now += 2
    assert ask(r, query("nx.example")).attempts
    # without an SOA a negative answer is not cached (RFC 2308 5)
    _, done = resolve(r, "nosoa.example", [], rcode=dns.rcode.NXDOMAIN)
    assert ask(r, query("nosoa.example")).attempts


def test_cache_is_bounded() -> None:
    r, _, _ = make()
    r.cache.max_entries = 3
    for i in range(5):
        resolve(r, f"n{i}.example", [f"n{i}.example. 300 IN A 203.0.113.{i}"])
    assert len(r.cache) == 3
    assert ask(r, query("n0.example")).attempts
    assert not ask(r, query("n4.example")).attempts


# -- special answers ------------------------------------------------------------------------------


def test_host_names_answer_the_gateway_without_upstream() -> None:
    r, _, pins = make()
    for name in ("host.corral.internal", "HOST.microsandbox.internal."):
        step = ask(r, query(name))
        assert step.attempts == [] and addresses(reply_of(step)) == [str(GW4)]
        step = ask(r, query(name, "AAAA"))
        assert addresses(reply_of(step)) == [str(GW6)]
        msg = reply_of(ask(r, query(name, "MX")))
        assert msg.rcode() == 0 and not msg.answer
    assert pins.names_for(GW4) == {"host.corral.internal", "host.microsandbox.internal"}
    r4, _, _ = make(ipv6=False)
    msg = reply_of(ask(r4, query("host.corral.internal", "AAAA")))
    assert msg.rcode() == 0 and not msg.answer


def test_aaaa_without_ipv6_is_an_empty_noerror() -> None:
    r, _, _ = make(ipv6=False)
    step = ask(r, query("a.example", "AAAA"))
    assert step.attempts == []
    msg = reply_of(step)
    assert msg.rcode() == dns.rcode.NOERROR and not msg.answer


def test_aaaa_of_a_refused_name_is_still_nxdomain() -> None:
    r, _, _ = make(name_config(), ipv6=False)
    assert reply_of(ask(r, query("nope.example", "AAAA"))).rcode() == dns.rcode.NXDOMAIN


# -- bounds ---------------------------------------------------------------------------------------


def test_inflight_and_waiters_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resolver_mod, "MAX_INFLIGHT", 3)
    monkeypatch.setattr(resolver_mod, "MAX_WAITERS", 2)
    r, _, _ = make()
    for i in range(3):
        assert ask(r, query(f"q{i}.example")).attempts
    assert reply_of(ask(r, query("q9.example"))).rcode() == dns.rcode.SERVFAIL
    assert ask(r, query("q0.example", qid=1), client=("b",)).replies == []
    assert (
        reply_of(ask(r, query("q0.example", qid=2), client=("c",)), ("c",)).rcode()
        == dns.rcode.SERVFAIL
    )


def test_token_bucket_paces_a_storm() -> None:
    r, clock, _ = make(rate=10)
    assert sum(r.bucket.take() for _ in range(50)) == 10
    assert r.bucket.wait() == pytest.approx(0.1)
    clock.now += 0.5
    assert sum(r.bucket.take() for _ in range(50)) == 5


def test_audit_events_are_rate_limited_with_a_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resolver_mod, "MAX_EVENTS_PER_SECOND", 3)
    r, clock, _ = make(name_config())
    events = [e for i in range(10) for e in ask(r, query(f"x{i}.example")).events]
    assert len(events) == 3
    clock.now += 1
    (event,) = ask(r, query("y.example")).events
    assert "(7 more DNS events not logged)" in event.reason


def test_policy_update_clears_the_cache() -> None:
    r, _, _ = make()
    resolve(r, "c.example", ["c.example. 100 IN A 203.0.113.3"])
    assert not ask(r, query("c.example")).attempts
    r.set_policy(Policy.compile(name_config()))
    assert reply_of(ask(r, query("c.example"))).rcode() == dns.rcode.NXDOMAIN


def test_sweep_expires_everything() -> None:
    r, clock, pins = make()
    resolve(r, "c.example", ["c.example. 10 IN A 203.0.113.3"])
    clock.now += 11
    r.sweep()
    assert len(r.cache) == 0 and len(pins) == 0


def test_sweep_delay_follows_what_is_held() -> None:
    """The interceptor's timer stops when the resolver holds nothing, comes back soon while
    failure memory is held, rarely for cache entries and pins alone."""
    r, clock, pins = make(upstreams=1)
    assert r.sweep_delay() is None
    resolve(r, "c.example", ["c.example. 100 IN A 203.0.113.3"])
    assert r.sweep_delay() == resolver_mod.STATE_SWEEP_SECONDS
    (attempt,) = ask(r, query("dead.example")).attempts
    clock.now += 2
    r.upstream_failed(attempt, "timeout")
    assert r.sweep_delay() == resolver_mod.FAILURE_SWEEP_SECONDS
    clock.now += 101
    r.sweep()
    assert len(r.cache) == 0 and len(pins) == 0
    assert r.sweep_delay() is None


def test_upstream_work_is_budgeted_in_records(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resolver_mod, "MAX_UPSTREAM_RECORDS_PER_SECOND", 100)
    r, clock, _ = make()
    records = [
        f"big.example. 0 IN A 198.18.0.{i}" for i in range(resolver_mod.MAX_ADDRESSES_PER_ANSWER)
    ]
    resolve(r, "big.example", records)  # TTL 0: not cached; costs 65 of the 100
    resolve(r, "big.example", records)  # still admitted (the bucket was not in debt): -30
    step = ask(r, query("small.example"))
    assert step.attempts == [] and reply_of(step).rcode() == dns.rcode.SERVFAIL
    assert data_of(ask(r, query("host.corral.internal"))) == [str(GW4)]  # no upstream needed
    clock.now += 0.5
    assert ask(r, query("small.example")).attempts


def data_of(step: Step) -> list[str]:
    return addresses(reply_of(step))


def test_huge_upstream_messages_are_trimmed_before_parsing() -> None:
    r, _, pins = make()
    (attempt,) = ask(r, query("huge.example", "TXT", edns=0), "tcp").attempts
    q = dns.message.from_wire(attempt.wire)
    resp = dns.message.make_response(q)
    rr = dns.rrset.RRset(dns.name.from_text("huge.example."), 1, dns.rdatatype.TXT)
    for i in range(2000):
        rr.add(dns.rdata.from_text("IN", "TXT", f'"{i}"'))
    resp.answer.append(rr)
    resp.additional.append(dns.rrset.from_text("glue.example.", 60, "IN", "A", "1.2.3.4"))
    wire_bytes = resp.to_wire(max_size=65535)
    trimmed, count = wire.trim_message(wire_bytes, resolver_mod.MAX_UPSTREAM_RECORDS)
    assert count == resolver_mod.MAX_UPSTREAM_RECORDS
    assert len(dns.message.from_wire(trimmed).answer[0]) == resolver_mod.MAX_UPSTREAM_RECORDS
    done = r.upstream_reply(attempt, wire_bytes)
    msg = reply_of(done)
    assert len(msg.answer[0]) == resolver_mod.MAX_UPSTREAM_RECORDS and not msg.additional
