"""The one verdict (corral.policy.verdict): the data path's facts joined to the engine, and
when a revealed name could change a flow's outcome (the TCP proxy's first-bytes stage)."""

from __future__ import annotations

import ipaddress
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from corral.config import NetworkConfig, NetworkPolicy, PolicyProtocol, PolicyRule
from corral.policy import Policy
from corral.policy.verdict import (
    BY_DNS,
    DNS_ANSWERED,
    DOT_REFUSED,
    OTHER_SANDBOX,
    Revealed,
    SandboxView,
    egress,
    ingress,
)
from tests.unit.test_policy_property import NAMES, configs

TCP, UDP, ICMP = PolicyProtocol.TCP, PolicyProtocol.UDP, PolicyProtocol.ICMPV4
GW = ipaddress.ip_address("172.16.0.5")
VIEW = SandboxView(
    gateways=frozenset({GW}),
    others=(ipaddress.ip_network("172.16.0.0/12"), ipaddress.ip_network("10.98.0.0/30")),
)
PUB = ipaddress.ip_address("203.0.113.10")
DNS_RULE = PolicyRule(action="allow", destination="host", protocols=["udp", "tcp"], port="53")


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def compile_(config: NetworkConfig) -> Policy:
    return Policy.compile(config, host_addresses=[GW])


def test_data_path_facts_come_before_the_rules() -> None:
    p = compile_(NetworkPolicy.allow_all())
    for addr in (GW, PUB, ip("8.8.8.8"), ip("::ffff:8.8.8.8")):
        for proto in (TCP, UDP):
            v = egress(p, VIEW, proto, addr, 53)
            assert v.handled_by == BY_DNS and v.reason == DNS_ANSWERED and v.target is None
    assert egress(p, VIEW, TCP, PUB, 853).reason == DOT_REFUSED
    assert egress(p, SandboxView(tls_interception=True), TCP, PUB, 853).allowed
    assert egress(p, VIEW, UDP, PUB, 853).allowed  # QUIC-style DoQ is ordinary UDP here
    for other in ("172.16.0.6", "172.31.0.1", "10.98.0.2", "::ffff:172.16.0.9"):
        v = egress(p, VIEW, TCP, ip(other), 80)
        assert not v.allowed and v.reason == OTHER_SANDBOX
    v = egress(p, VIEW, TCP, GW, 8080)
    assert v.allowed and v.target == ip("127.0.0.1")  # the gateway is the host's loopback
    assert egress(p, VIEW, ICMP, PUB, None).target == PUB


def test_name_sensitivity_under_presets_and_address_rules_is_never() -> None:
    for cfg in (NetworkPolicy.public_only(), NetworkPolicy.allow_all(), NetworkPolicy.non_local()):
        p = compile_(cfg)
        for addr in (PUB, ip("10.1.1.1"), GW):
            assert not egress(p, VIEW, TCP, addr, 443).wait_for_name


def test_allow_by_name_needs_a_pin_then_waits_for_the_revealed_name() -> None:
    cfg = NetworkConfig(
        rules=[DNS_RULE, PolicyRule(action="allow", destination="api.example", port="443")],
        default_egress="deny",
    )
    p = compile_(cfg)
    cold = egress(p, VIEW, TCP, PUB, 443)
    assert not cold.allowed and not cold.wait_for_name  # no pin: no name can allow it
    warm = egress(p, VIEW, TCP, PUB, 443, names=frozenset({"api.example"}))
    assert warm.allowed and warm.wait_for_name and warm.rule == 1
    ok = egress(p, VIEW, TCP, PUB, 443, names=frozenset({"api.example"}), revealed=Revealed("API.example."))
    assert ok.allowed and not ok.wait_for_name
    spoof = egress(p, VIEW, TCP, PUB, 443, names=frozenset({"api.example"}), revealed=Revealed("evil.example"))
    assert not spoof.allowed and spoof.revealed == "evil.example"
    assert spoof.names == ("api.example",)
    none = egress(p, VIEW, TCP, PUB, 443, names=frozenset({"api.example"}), revealed=Revealed(None))
    assert none.allowed  # server-first, or no SNI: the pins decide
    bad = egress(p, VIEW, TCP, PUB, 443, names=frozenset({"api.example"}), revealed=Revealed(None, False, "a\\x00b"))
    assert not bad.allowed and "no valid host name" in bad.reason
    # The name's SNI toward an address it was never pinned to.
    assert not egress(p, VIEW, TCP, ip("203.0.113.11"), 443, revealed=Revealed("api.example")).allowed
    # UDP never waits (there is no first-bytes stage for datagrams).
    assert not egress(p, VIEW, UDP, PUB, 443, names=frozenset({"api.example"})).wait_for_name


def test_deny_rules_and_lists_match_the_revealed_name_alone() -> None:
    cfg = NetworkConfig(
        rules=[PolicyRule(action="deny", destination=".evil.example", port="443"),
               PolicyRule(action="allow", destination="public")],
        default_egress="deny", deny_domains=["listed.example"],
    )  # fmt: skip
    p = compile_(cfg)
    v = egress(p, VIEW, TCP, PUB, 443)
    assert v.allowed and v.wait_for_name
    assert not egress(p, VIEW, TCP, PUB, 443, revealed=Revealed("x.evil.example")).allowed
    assert egress(p, VIEW, TCP, PUB, 443, revealed=Revealed("evil.example")).allowed  # apex
    listed = egress(p, VIEW, TCP, PUB, 80, revealed=Revealed("listed.example"))
    assert not listed.allowed and "deny_domains[0]" in listed.reason
    # A denied flow cannot become an allow by a name: it is never held.
    assert not egress(p, VIEW, TCP, ip("10.0.0.1"), 443).wait_for_name


def test_a_deny_rule_on_another_port_does_not_hold() -> None:
    cfg = NetworkConfig(
        rules=[PolicyRule(action="deny", destination="evil.example", protocol="tcp", port="25"),
               PolicyRule(action="allow", destination="public")],
        default_egress="deny",
    )  # fmt: skip
    p = compile_(cfg)
    assert egress(p, VIEW, TCP, PUB, 25).wait_for_name
    assert not egress(p, VIEW, TCP, PUB, 443).wait_for_name
    assert not egress(p, VIEW, UDP, PUB, 25).wait_for_name


@settings(max_examples=300, deadline=None)
@given(config=configs, seed=st.integers(0, 2**32 - 1))
def test_waiting_is_exact_on_random_policies(config: NetworkConfig, seed: int) -> None:
    """``wait_for_name`` False means no revealed name changes the outcome (checked against
    every name the policies use); True means the verdict is provisional."""
    rnd = random.Random(seed)
    addresses = [PUB, ip("10.1.1.1"), ip("2001:db8::5"), GW, ip("198.51.100.9")]
    p = compile_(config)
    for _ in range(6):
        addr = rnd.choice(addresses)
        port = rnd.choice([22, 80, 443, 8080])
        names = frozenset(rnd.sample(NAMES, rnd.choice([0, 1, 2])))
        base = egress(p, VIEW, TCP, addr, port, names=names)
        if base.wait_for_name:
            continue
        for name in (None, *NAMES):
            final = egress(p, VIEW, TCP, addr, port, names=names, revealed=Revealed(name))
            assert final.allowed == base.allowed, (config, addr, port, names, name)


def test_ingress_is_the_engine() -> None:
    cfg = NetworkConfig(
        rules=[PolicyRule(action="deny", direction="ingress", destination="private", port="22")],
        default_ingress="allow",
    )
    p = compile_(cfg)
    assert not ingress(p, TCP, ip("10.0.0.1"), 22).allowed
    assert ingress(p, TCP, ip("10.0.0.1"), 80).allowed


def test_the_presets_resolver_rule_keeps_no_host_address_in_an_answer() -> None:
    host = ip("10.0.0.7")
    p = Policy.compile(NetworkPolicy.public_only(), host_addresses=[GW, host])
    assert not p.rebind_allowed(GW) and not p.rebind_allowed(host)
    mine = NetworkConfig(policy="public-only", rules=[PolicyRule(action="allow", destination="host")])
    assert Policy.compile(mine, host_addresses=[GW, host]).rebind_allowed(host)
