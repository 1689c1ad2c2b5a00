"""Policy lint: each check, and a property that its "never matches" claims are true."""

from __future__ import annotations

import ipaddress
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from corral.config import NetworkConfig, PolicyRule
from corral.policy import Policy
from corral.policy import lint as lint_mod
from corral.policy.lint import LintWarning, lint
from tests.unit.test_policy_property import (
    ADDRESSES,
    NAMES,
    TCP_UDP,
    _random_flow,
    _random_policy,
)


def R(action: str, destination: str = "*", **kw: object) -> PolicyRule:
    return PolicyRule(action=action, destination=destination, **kw)  # type: ignore[arg-type]


def _kinds(config: NetworkConfig) -> list[tuple[int | None, str]]:
    return [(w.rule, w.kind) for w in lint(config)]


def test_clean_config_has_no_warnings() -> None:
    cfg = NetworkConfig(
        policy="public-only",
        rules=[R("allow", "10.0.0.0/8", protocol="tcp", port="5432"), R("allow", "db.internal")],
    )
    assert lint(cfg) == []


def test_shadowed_by_broader_cidr_and_superset_ports() -> None:
    cfg = NetworkConfig(
        rules=[
            R("allow", "10.0.0.0/8", protocols=["tcp", "udp"], ports=["1-1000", "1001-2000"]),
            R("deny", "10.1.2.0/24", protocol="tcp", port="80-1500"),  # shadowed
            R("deny", "10.1.2.0/24", protocol="tcp", port="1500-2001"),  # 2001 escapes
            R("deny", "10.1.2.0/24"),  # any protocol: ICMP escapes
            R("deny", "::ffff:10.1.2.3", protocol="udp", port="53"),  # mapped: shadowed
            R("deny", "11.0.0.0/8", protocol="tcp", port="80"),  # elsewhere
        ]
    )
    ws = lint(cfg)
    assert [(w.rule, w.kind) for w in ws] == [(1, "shadowed"), (4, "shadowed")]
    assert ws[0].message == (
        "rule 1 (deny egress 10.1.2.0/24 tcp 80-1500) never matches: rule 0 (allow egress "
        "10.0.0.0/8 tcp,udp 1-1000,1001-2000) comes first and matches everything it would"
    )


def test_direction_coverage() -> None:
    cfg = NetworkConfig(
        rules=[
            R("deny", "203.0.113.0/24", direction="ingress"),
            R("deny", "203.0.113.5", direction="any"),  # egress half escapes
            R("deny", "203.0.113.6", direction="ingress"),  # shadowed
            R("allow", "203.0.113.0/24", direction="any"),
            R("allow", "203.0.113.7", direction="egress"),  # shadowed by the any rule
        ]
    )
    assert _kinds(cfg) == [(2, "shadowed"), (4, "shadowed")]


def test_star_and_groups_shadow() -> None:
    cfg = NetworkConfig(
        rules=[
            R("deny", "private", protocol="tcp"),
            R("allow", "10.9.0.0/16", protocol="tcp", port="22"),  # group holds it
            R("allow", "169.254.0.0/16"),  # mixes link-local and metadata: not claimed
            R("allow", "*", protocol="udp"),
            R("deny", "example.com", protocol="udp"),  # still refuses DNS over TCP
            R("deny", "public", protocol="udp", port="53"),
            R("deny", "public", protocols=["udp", "tcp"], port="53"),
        ]
    )
    ws = lint(cfg)
    # rule 1 is an allow: it would still be the first address rule rebind protection reads
    assert [(w.rule, w.kind) for w in ws] == [(1, "shadowed-flows"), (5, "shadowed")]
    assert "host's" in ws[0].message  # a group shadow assumes no host address inside


def test_a_shadowed_address_rule_may_still_decide_rebind() -> None:
    cfg = NetworkConfig(rules=[R("allow", "*"), R("allow", "10.0.0.0/8"), R("allow", "private")])
    ws = lint(cfg)
    assert [(w.rule, w.kind) for w in ws] == [(1, "shadowed-flows"), (2, "shadowed-flows")]
    assert "rebind" in ws[0].message
    # and indeed the rule decides rebind even though it never matches a flow
    assert Policy.compile(cfg).rebind_allowed(ipaddress.ip_address("10.0.0.1"))


def test_name_rules_and_dns() -> None:
    cfg = NetworkConfig(
        rules=[
            R("allow", ".example.com"),
            R("allow", "api.example.com"),  # shadowed: the suffix holds it, flows and queries
            R("deny", "evil.example.com"),  # deny reaches SNI-alone flows: not shadowed...
            R("deny", ".b.example.com", protocol="tcp"),  # same
            R("deny", ".example.org"),
            R("deny", "x.example.org"),  # deny contains deny: shadowed
            R("allow", "y.example.org"),  # allow within deny: shadowed
        ]
    )
    assert _kinds(cfg) == [
        (1, "shadowed"),
        (2, "dns-shadowed"),  # ...but its queries are answered by rule 0
        (3, "dns-shadowed"),
        (5, "shadowed"),
        (6, "shadowed"),
    ]


def test_star_before_names_still_leaves_their_queries_when_it_admits_no_dns() -> None:
    cfg = NetworkConfig(
        rules=[
            R("allow", "*", protocol="tcp", port="443"),
            R("deny", "evil.test", protocol="tcp", port="443"),
        ]
    )
    assert lint(cfg) == []  # rule 1 still refuses the name over DNS


def test_preset_shadowing_is_named() -> None:
    cfg = NetworkConfig(
        policy="public-only", rules=[R("deny", "203.0.113.9"), R("deny", ".evil.test")]
    )
    ws = lint(cfg)
    assert [(w.rule, w.kind) for w in ws] == [(2, "shadowed"), (3, "dns-shadowed")]
    assert "the preset's rule 1 (allow egress public)" in ws[0].message
    assert "deny_domain_suffixes" in ws[1].message


def test_icmp_checks() -> None:
    cfg = NetworkConfig(
        rules=[
            R("allow", "203.0.113.1", protocols=["icmpv4", "icmpv6"], port="7"),
            R("allow", "203.0.113.2", protocols=["icmpv4", "tcp"], port="7"),
            R("allow", "203.0.113.3", direction="any", protocol="icmpv6"),
            R("allow", "203.0.113.4", port="7"),  # implicit any: no warning
        ]
    )
    assert _kinds(cfg) == [(0, "icmp-ports"), (1, "icmp-ports-partial"), (2, "icmp-any")]


def test_ingress_names_no_group_and_policy_none() -> None:
    cfg = NetworkConfig(
        rules=[
            R("allow", "api.example.com", direction="ingress"),
            R("allow", "255.255.255.255"),
            R("allow", "240.0.0.0/4"),
            R("allow", "::/128"),
        ]
    )
    assert _kinds(cfg) == [
        (0, "ingress-names"),
        (1, "no-group"),
        (2, "no-group"),
        (3, "no-group"),
    ]
    none = NetworkConfig(policy="none", rules=[R("allow"), R("deny", "10.0.0.1")])
    assert _kinds(none) == [(0, "no-interface"), (1, "no-interface")]


def test_candidate_bound_keeps_big_policies_fast() -> None:
    rules = [R("allow", f"10.{i // 256}.{i % 256}.0/24", protocol="tcp") for i in range(5000)]
    rules += [R("deny", "10.0.3.4", protocol="tcp", port="22")]
    ws = lint(NetworkConfig(rules=rules))
    assert [(w.rule, w.kind) for w in ws] == [(5000, "shadowed")]
    assert isinstance(ws[0], LintWarning) and str(ws[0]) == ws[0].message


@settings(max_examples=1500, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**64))
def test_never_matches_claims_hold(seed: int) -> None:
    """A rule lint says never matches is never the deciding rule of a flow or a query;
    a DNS-shadowed rule never decides a query. (No host addresses: lint assumes none.)"""
    rng = random.Random(seed)
    config = _random_policy(rng)
    if config.policy == "none":
        return
    warnings = lint(config)
    never = {w.rule for w in warnings if w.kind in lint_mod.NEVER_MATCHES}
    no_flows = never | {
        w.rule for w in warnings if w.kind in (lint_mod.SHADOWED_FLOWS, lint_mod.ICMP_PORTS_FLOWS)
    }
    no_queries = never | {w.rule for w in warnings if w.kind == lint_mod.DNS_SHADOWED}
    if not (no_flows or no_queries):
        return
    policy = Policy.compile(config)
    for _ in range(40):
        flow = _random_flow(rng)
        if flow.direction == "ingress" and flow.protocol.is_icmp:
            continue  # the data path never asks: no inbound ICMP path
        assert policy.decide(flow).rule not in no_flows, (config, flow, warnings)
    for name in NAMES:
        for transport in TCP_UDP:
            assert policy.decide_query(name, transport).rule not in no_queries, (config, name)
    assert ADDRESSES  # the flows draw from the shared pools
