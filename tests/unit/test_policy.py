"""The policy engine: groups, presets, first-match-wins, names, DNS queries, rebind."""

from __future__ import annotations

import ipaddress

import pytest

from corral.config import (
    Group,
    NetworkConfig,
    NetworkPolicy,
    PolicyAction,
    PolicyDirection,
    PolicyProtocol,
    PolicyRule,
)
from corral.policy import (
    DNS_RULE,
    Flow,
    Policy,
    classify,
    defaults,
    describe_rule,
    expand,
    normalize_name,
    rule_shorthand,
)
from corral.policy.groups import TABLE, network_group

ip = ipaddress.ip_address
E, IN = PolicyDirection.EGRESS, PolicyDirection.INGRESS
TCP, UDP = PolicyProtocol.TCP, PolicyProtocol.UDP
ICMP4, ICMP6 = PolicyProtocol.ICMPV4, PolicyProtocol.ICMPV6
ALLOW, DENY = PolicyAction.ALLOW, PolicyAction.DENY

# -- groups ---------------------------------------------------------------------------------

V4_BOUNDARIES = [
    # no group: "this network", reserved, broadcast
    ("0.0.0.0", None),
    ("0.255.255.255", None),
    ("240.0.0.0", None),
    ("255.255.255.254", None),
    ("255.255.255.255", None),
    ("1.0.0.0", Group.PUBLIC),
    ("9.255.255.255", Group.PUBLIC),
    ("10.0.0.0", Group.PRIVATE),
    ("10.255.255.255", Group.PRIVATE),
    ("11.0.0.0", Group.PUBLIC),
    ("100.63.255.255", Group.PUBLIC),
    ("100.64.0.0", Group.PRIVATE),
    ("100.127.255.255", Group.PRIVATE),
    ("100.128.0.0", Group.PUBLIC),
    ("126.255.255.255", Group.PUBLIC),
    ("127.0.0.0", Group.LOOPBACK),
    ("127.255.255.255", Group.LOOPBACK),
    ("128.0.0.0", Group.PUBLIC),
    ("169.253.255.255", Group.PUBLIC),
    ("169.254.0.0", Group.LINK_LOCAL),
    ("169.254.169.253", Group.LINK_LOCAL),
    ("169.254.169.254", Group.METADATA),
    ("169.254.169.255", Group.LINK_LOCAL),
    ("169.254.255.255", Group.LINK_LOCAL),
    ("169.255.0.0", Group.PUBLIC),
    ("172.15.255.255", Group.PUBLIC),
    ("172.16.0.0", Group.PRIVATE),
    ("172.31.255.255", Group.PRIVATE),
    ("172.32.0.0", Group.PUBLIC),
    ("192.0.2.1", Group.PUBLIC),  # documentation ranges are ordinary unicast
    ("198.18.0.1", Group.PUBLIC),
    ("198.51.100.1", Group.PUBLIC),
    ("203.0.113.0", Group.PUBLIC),
    ("203.0.113.255", Group.PUBLIC),
    ("192.167.255.255", Group.PUBLIC),
    ("192.168.0.0", Group.PRIVATE),
    ("192.168.255.255", Group.PRIVATE),
    ("192.169.0.0", Group.PUBLIC),
    ("223.255.255.255", Group.PUBLIC),
    ("224.0.0.0", Group.MULTICAST),
    ("239.255.255.255", Group.MULTICAST),
]

V6_BOUNDARIES = [
    ("::", None),
    ("::1", Group.LOOPBACK),
    ("::2", None),  # deprecated IPv4-compatible ::/96
    ("::ffff:ffff", None),
    ("::1:0:0", Group.PUBLIC),
    ("2001:db8::", Group.PUBLIC),
    ("2001:db8:f::5", Group.PUBLIC),
    ("2606:4700::1111", Group.PUBLIC),
    ("fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Group.PUBLIC),
    ("fc00::", Group.PRIVATE),
    ("fd00:ec2::253", Group.PRIVATE),
    ("fd00:ec2::254", Group.METADATA),
    ("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Group.PRIVATE),
    ("fe00::", Group.PUBLIC),
    ("fe7f:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Group.PUBLIC),
    ("fe80::", Group.LINK_LOCAL),
    ("febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Group.LINK_LOCAL),
    ("fec0::", Group.PRIVATE),  # deprecated site-local
    ("feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Group.PRIVATE),
    ("ff00::", Group.MULTICAST),
    ("ff02::1", Group.MULTICAST),
    ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Group.MULTICAST),
]


@pytest.mark.parametrize(("text", "group"), V4_BOUNDARIES + V6_BOUNDARIES)
def test_classify_boundaries(text: str, group: Group | None) -> None:
    assert classify(ip(text)) == group


@pytest.mark.parametrize(("text", "group"), V4_BOUNDARIES)
def test_mapped_and_nat64_addresses_are_their_ipv4_address(text: str, group: Group | None) -> None:
    v4 = int(ip(text))
    assert classify(ipaddress.IPv6Address((0xFFFF << 32) | v4)) == group
    assert classify(ipaddress.IPv6Address((0x64FF9B << 96) | v4)) == group


def test_host_group_comes_before_the_others_but_not_before_loopback() -> None:
    hosts = [ip("10.0.0.1"), ip("203.0.113.7"), ip("::ffff:172.16.0.1"), ip("2001:db8::9")]
    hosts += [ip("127.0.0.1"), ip("::1"), ip("169.254.169.254")]
    assert classify(ip("10.0.0.1"), hosts) == Group.HOST
    assert classify(ip("10.0.0.2"), hosts) == Group.PRIVATE
    assert classify(ip("203.0.113.7"), hosts) == Group.HOST
    assert classify(ip("172.16.0.1"), hosts) == Group.HOST  # mapped host address, v4 flow
    assert classify(ip("::ffff:203.0.113.7"), hosts) == Group.HOST  # v4 host, mapped flow
    assert classify(ip("2001:db8::9"), hosts) == Group.HOST
    assert classify(ip("169.254.169.254"), hosts) == Group.HOST
    # the guest's loopback is its own, whatever the host's addresses include
    assert classify(ip("127.0.0.1"), hosts) == Group.LOOPBACK
    assert classify(ip("::1"), hosts) == Group.LOOPBACK
    # no-group addresses stay in no group
    assert classify(ip("0.0.0.0"), [ip("0.0.0.0")]) is None


def test_classify_and_network_group_read_the_table_in_order() -> None:
    """Each entry's edges are in its group unless an earlier entry holds them (first wins);
    the boundary lists above check the table itself against the SPEC."""
    for index, entry in enumerate(TABLE):
        if entry.cidr is None:
            continue  # the host's addresses: test_host_group_comes_before_...
        net = ipaddress.ip_network(entry.cidr)
        earlier = [ipaddress.ip_network(e.cidr) for e in TABLE[:index] if e.cidr]
        for addr in (net.network_address, net.broadcast_address):
            if any(addr.version == e.version and addr in e for e in earlier):
                continue
            if entry.embeds_v4:
                embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
                assert classify(addr) == classify(embedded), (entry, addr)
            else:
                assert classify(addr) == entry.group, (entry, addr)
        if not entry.embeds_v4 and not any(net.overlaps(e) for e in earlier if e.version == net.version):
            assert network_group(net) in (entry.group, False), entry  # False: later entries inside
    assert network_group(ipaddress.ip_network("10.1.0.0/16")) == Group.PRIVATE
    assert network_group(ipaddress.ip_network("169.254.0.0/16")) is False  # metadata inside
    assert network_group(ipaddress.ip_network("169.254.0.0/17")) == Group.LINK_LOCAL
    assert network_group(ipaddress.ip_network("203.0.113.0/24")) == Group.PUBLIC
    assert network_group(ipaddress.ip_network("0.0.0.0/0")) is False
    assert network_group(ipaddress.ip_network("240.0.0.0/8")) is None
    assert network_group(ipaddress.ip_network("64:ff9b::/96")) is False


# -- presets --------------------------------------------------------------------------------


def _f(
    address: str,
    port: int | None = 443,
    protocol: PolicyProtocol = TCP,
    direction: PolicyDirection = E,
    names: tuple[str, ...] = (),
    sni: str | None = None,
) -> Flow:
    return Flow(direction, protocol, ip(address), port, frozenset(names), sni)


def test_preset_expansion_and_defaults() -> None:
    assert expand(NetworkPolicy.none()) == ()
    assert defaults(NetworkPolicy.none()) == (DENY, DENY)
    public = expand(NetworkPolicy.public_only())
    assert [rule_shorthand(r) for r in public] == [
        "allow:egress@host:tcp,udp:53",
        "allow:egress@public",
    ]
    assert public[0] == DNS_RULE
    assert defaults(NetworkPolicy.public_only()) == (DENY, ALLOW)
    assert [rule_shorthand(r) for r in expand(NetworkPolicy.non_local())] == [
        "allow:egress@host:tcp,udp:53",
        "allow:egress@public",
        "allow:egress@private",
    ]
    assert defaults(NetworkPolicy.non_local()) == (DENY, ALLOW)
    assert expand(NetworkPolicy.allow_all()) == ()
    assert defaults(NetworkPolicy.allow_all()) == (ALLOW, ALLOW)
    assert defaults(NetworkConfig()) == (DENY, ALLOW)


def test_preset_rules_come_first_and_explicit_defaults_win() -> None:
    custom = PolicyRule(action="deny", destination="203.0.113.9")
    cfg = NetworkConfig(
        policy="public-only", rules=[custom], default_egress="allow", default_ingress="deny"
    )
    p = Policy.compile(cfg)
    assert p.rules[2] is custom and len(p.rules) == 3
    assert (p.default_egress, p.default_ingress) == (ALLOW, DENY)
    # the preset's "allow public" wins over the later custom deny: first match wins
    assert (p.decide(_f("203.0.113.9")).rule) == 1
    assert p.decide(_f("10.0.0.1")).action is ALLOW  # explicit default egress allow
    assert p.decide(_f("10.0.0.1", direction=IN)).action is DENY
    allow_all = Policy.compile(NetworkConfig(policy="allow-all", default_egress="deny"))
    assert allow_all.decide(_f("203.0.113.9")).action is DENY


@pytest.mark.parametrize(
    ("preset", "address", "action", "rule"),
    [
        ("public-only", "203.0.113.5", ALLOW, 1),
        ("public-only", "2001:db8:f::5", ALLOW, 1),
        ("public-only", "10.0.0.1", DENY, None),
        ("public-only", "169.254.169.254", DENY, None),
        ("public-only", "127.0.0.1", DENY, None),
        ("public-only", "172.16.0.1", DENY, None),  # the gateway (host) but not port 53
        ("non-local", "10.0.0.1", ALLOW, 2),
        ("non-local", "fd12::1", ALLOW, 2),
        ("non-local", "203.0.113.5", ALLOW, 1),
        ("non-local", "169.254.169.254", DENY, None),
        ("non-local", "fe80::1", DENY, None),
        ("non-local", "224.0.0.251", DENY, None),
        ("allow-all", "10.0.0.1", ALLOW, None),
        ("allow-all", "169.254.169.254", ALLOW, None),
        ("allow-all", "255.255.255.255", DENY, None),
        ("allow-all", "0.0.0.0", DENY, None),
        ("none", "203.0.113.5", DENY, None),
    ],
)
def test_preset_decisions(
    preset: str, address: str, action: PolicyAction, rule: int | None
) -> None:
    p = Policy.compile(NetworkConfig(policy=preset), host_addresses=[ip("172.16.0.1")])
    d = p.decide(_f(address))
    assert (d.action, d.rule) == (action, rule), d.reason


def test_public_only_allows_dns_to_the_gateway_and_ingress_by_default() -> None:
    p = Policy.compile(NetworkPolicy.public_only(), host_addresses=[ip("172.16.0.1")])
    assert p.decide(_f("172.16.0.1", 53, UDP)).rule == 0
    assert p.decide(_f("172.16.0.1", 53, TCP)).rule == 0
    assert p.decide(_f("172.16.0.1", 54, UDP)).action is DENY
    d = p.decide(_f("10.0.0.1", 8080, direction=IN))
    assert (d.action, d.rule, d.reason) == (ALLOW, None, "no rule matched; default ingress allow")


# -- first match wins, directions, protocols, ports -------------------------------------------


def test_first_match_wins_specific_before_broad() -> None:
    cfg = NetworkConfig(
        rules=[
            PolicyRule(action="deny", destination="10.0.0.5"),
            PolicyRule(action="allow", destination="10.0.0.0/8"),
        ]
    )
    p = Policy.compile(cfg)
    d = p.decide(_f("10.0.0.5"))
    assert (d.action, d.rule) == (DENY, 0)
    assert d.reason == "rule 0 (deny egress 10.0.0.5) matched"
    assert p.decide(_f("10.0.0.6")).rule == 1
    assert p.decide(_f("::ffff:10.0.0.5")).rule == 0  # mapped flow, v4 rule
    assert p.decide(_f("11.0.0.1")).reason == "no rule matched; default egress deny"


def test_mapped_rules_match_v4_flows() -> None:
    p = Policy.compile(
        NetworkConfig(
            rules=[
                PolicyRule(action="allow", destination="::ffff:10.0.0.0/104"),
                PolicyRule(action="allow", destination="::ffff:203.0.113.5"),
            ]
        )
    )
    assert p.decide(_f("10.9.9.9")).rule == 0
    assert p.decide(_f("203.0.113.5")).rule == 1
    assert p.decide(_f("::ffff:203.0.113.5")).rule == 1


def test_direction_any_and_ingress_semantics() -> None:
    cfg = NetworkConfig(
        default_ingress="deny",
        rules=[
            PolicyRule(action="allow", direction="ingress", destination="10.0.0.0/8", port="8080"),
            PolicyRule(action="deny", direction="any", destination="10.0.0.9"),
            PolicyRule(action="allow", direction="any", destination="private"),
        ],
    )
    p = Policy.compile(cfg)
    # ingress: address is the peer, port the guest port
    assert p.decide(_f("10.0.0.9", 8080, direction=IN)).rule == 0
    assert p.decide(_f("10.0.0.9", 8081, direction=IN)).rule == 1
    assert p.decide(_f("10.0.0.8", 8081, direction=IN)).rule == 2
    assert p.decide(_f("203.0.113.1", 8080, direction=IN)).reason == (
        "no rule matched; default ingress deny"
    )
    # egress skips the ingress rule
    assert p.decide(_f("10.0.0.9", 8080)).rule == 1
    with pytest.raises(ValueError, match="egress or ingress"):
        p.decide(_f("10.0.0.9", direction=PolicyDirection.ANY))


def test_protocol_and_port_fields_merge() -> None:
    rule = PolicyRule(
        action="allow",
        destination="203.0.113.0/24",
        protocol="udp",
        protocols=["tcp"],
        port="53",
        ports=["8000-9000", "443"],
    )
    assert describe_rule(rule) == "allow egress 203.0.113.0/24 tcp,udp 53,443,8000-9000"
    p = Policy.compile(NetworkConfig(rules=[rule]))
    for proto in (TCP, UDP):
        for port in (53, 443, 8000, 8500, 9000):
            assert p.decide(_f("203.0.113.1", port, proto)).rule == 0
        for port in (52, 54, 442, 444, 7999, 9001):
            assert p.decide(_f("203.0.113.1", port, proto)).rule is None
    assert p.decide(_f("203.0.113.1", None, ICMP4)).rule is None


def test_icmp_has_no_port_so_port_rules_never_match_it() -> None:
    p = Policy.compile(
        NetworkConfig(
            rules=[
                PolicyRule(action="deny", destination="*", port="443"),
                PolicyRule(action="allow", destination="public", protocols=["icmpv4", "icmpv6"]),
            ]
        )
    )
    assert p.decide(_f("203.0.113.1", None, ICMP4)).rule == 1
    assert p.decide(_f("2001:db8::1", None, ICMP6)).rule == 1
    assert p.decide(_f("203.0.113.1", 443)).rule == 0
    assert p.decide(_f("203.0.113.1", 80, UDP)).rule is None


def test_lowest_rule_with_the_wrong_port_does_not_hide_a_later_one() -> None:
    rules = [
        PolicyRule(action="deny", destination="203.0.113.5", port=str(p)) for p in range(1, 50)
    ]
    rules.append(PolicyRule(action="allow", destination="203.0.113.5", protocol="tcp"))
    rules.append(PolicyRule(action="deny", destination="203.0.113.5"))
    p = Policy.compile(NetworkConfig(rules=rules))
    assert p.decide(_f("203.0.113.5", 7)).rule == 6
    assert p.decide(_f("203.0.113.5", 443)).rule == 49
    assert p.decide(_f("203.0.113.5", 443, UDP)).rule == 50
    assert p.decide(_f("203.0.113.5", None, ICMP4)).rule == 50


def test_no_group_addresses_are_always_denied() -> None:
    p = Policy.compile(NetworkConfig(policy="allow-all", rules=[PolicyRule(action="allow")]))
    for text in ("0.0.0.0", "255.255.255.255", "::", "::ffff:0.0.0.0", "240.1.2.3"):
        d = p.decide(_f(text))
        assert (d.action, d.rule) == (DENY, None)
        assert "is in no group" in d.reason and "always denied" in d.reason


def test_groups_as_destinations_with_host_addresses() -> None:
    cfg = NetworkConfig(
        rules=[
            PolicyRule(action="allow", destination="host", port="8000"),
            PolicyRule(action="deny", destination="metadata"),
            PolicyRule(action="allow", destination="link-local"),
            PolicyRule(action="allow", destination="multicast", protocol="udp"),
            PolicyRule(action="allow", destination="loopback"),
        ]
    )
    p = Policy.compile(cfg, host_addresses=[ip("172.16.0.1"), ip("192.168.1.10")])
    assert p.decide(_f("192.168.1.10", 8000)).rule == 0  # the host's own LAN address
    assert p.decide(_f("192.168.1.11", 8000)).rule is None
    assert p.decide(_f("169.254.169.254", 80)).rule == 1
    assert p.decide(_f("fd00:ec2::254", 80)).rule == 1
    assert p.decide(_f("169.254.1.1", 80)).rule == 2
    assert p.decide(_f("ff02::fb", 5353, UDP)).rule == 3
    assert p.decide(_f("::1", 80)).rule == 4
    assert p.classify(ip("::ffff:172.16.0.1")) == Group.HOST


# -- names ----------------------------------------------------------------------------------


def test_normalize_name() -> None:
    assert normalize_name("API.Example.COM.") == "api.example.com"
    assert normalize_name("bücher.example") == "xn--bcher-kva.example"
    assert normalize_name("\x00bad..name") == "\x00bad..name"  # garbage never raises


NAME_RULES = NetworkConfig(
    rules=[
        PolicyRule(action="deny", destination="evil.example.com"),
        PolicyRule(action="allow", destination="api.example.com", protocol="tcp", port="443"),
        PolicyRule(action="deny", destination=".bad.example.com"),
        PolicyRule(action="allow", destination=".example.com"),
        PolicyRule(action="allow", destination="xn--bcher-kva.example"),
    ]
)


@pytest.mark.parametrize(
    ("names", "sni", "port", "rule"),
    [
        (("api.example.com",), None, 443, 1),
        (("API.example.com.",), "api.EXAMPLE.com", 443, 1),
        (("api.example.com",), None, 80, 3),  # the suffix rule still holds it
        (("api.example.com",), "other.org", 443, None),  # revealed name must match too
        (("api.example.com",), "www.example.com", 443, 3),  # suffix: both names match it
        ((), "api.example.com", 443, None),  # allow rules need a pinned name
        ((), "evil.example.com", 443, 0),  # deny rules match the revealed name alone
        (("api.example.com",), "evil.example.com", 443, 0),
        ((), "x.bad.example.com", 443, 2),  # deny suffix on the revealed name alone
        (("x.bad.example.com",), None, 443, 2),
        (("bad.example.com",), None, 443, 3),  # a suffix never matches its apex
        (("example.com",), None, 443, None),
        (("other.org", "a.example.com"), None, 443, 3),  # any pinned name may match
        (("bücher.example",), None, 443, 4),
    ],
)
def test_domain_and_suffix_semantics(
    names: tuple[str, ...], sni: str | None, port: int, rule: int | None
) -> None:
    p = Policy.compile(NAME_RULES)
    assert p.decide(_f("203.0.113.5", port, names=names, sni=sni)).rule == rule


# -- DNS queries ----------------------------------------------------------------------------


def test_query_deny_lists_come_first() -> None:
    cfg = NetworkConfig(
        policy="allow-all",
        rules=[PolicyRule(action="allow", destination="ads.example")],
        deny_domains=["tracker.example"],
        deny_domain_suffixes=[".ads.example"],
    )
    p = Policy.compile(cfg)
    d = p.decide_query("Tracker.Example.")
    assert (d.action, d.rule) == (DENY, None)
    assert d.reason == "tracker.example is refused by deny_domains[0] (tracker.example)"
    d = p.decide_query("ads.example")  # the apex of a deny suffix, before the allow rule
    assert (d.action, d.rule) == (DENY, None) and "deny_domain_suffixes[0]" in d.reason
    assert p.decide_query("x.y.ads.example").action is DENY
    assert p.decide_query("notads.example").action is ALLOW
    assert p.decide_query("sub.tracker.example").action is ALLOW  # exact entries are exact


def test_query_rule_kinds() -> None:
    cfg = NetworkConfig(
        rules=[
            PolicyRule(action="allow", destination="10.0.0.0/8"),  # address rules: never
            PolicyRule(action="allow", destination="public"),
            PolicyRule(action="deny", destination="api.example.com", protocol="icmpv4"),
            PolicyRule(action="allow", destination=".example.com", protocol="tcp", port="443"),
            PolicyRule(action="allow", destination="*", protocol="tcp", port="53"),
            PolicyRule(action="allow", destination="host", protocol="udp", port="1-100"),
            PolicyRule(action="deny", direction="ingress", destination="*"),
        ]
    )
    p = Policy.compile(cfg)
    # name rules match whatever their protocol and port
    assert p.decide_query("api.example.com").rule == 2
    assert p.decide_query("www.example.com").rule == 3
    # "*" and host rules when they admit the transport on port 53
    assert p.decide_query("other.org", TCP).rule == 4
    assert p.decide_query("other.org", UDP).rule == 5
    only_addresses = Policy.compile(
        NetworkConfig(rules=[PolicyRule(action="allow", destination="public")])
    )
    d = only_addresses.decide_query("example.org")
    assert (d.action, d.rule) == (DENY, None)
    assert d.reason == "no rule matched the query; default egress deny"
    assert Policy.compile(NetworkPolicy.public_only()).decide_query("example.org").rule == 0
    assert Policy.compile(NetworkPolicy.allow_all()).decide_query("x.org").action is ALLOW


# -- rebind ---------------------------------------------------------------------------------


def test_rebind_exception_reads_the_first_address_rule() -> None:
    cfg = NetworkConfig(
        rules=[
            PolicyRule(action="allow", destination="*"),  # not an address rule
            PolicyRule(action="allow", destination="db.internal"),  # not an address rule
            PolicyRule(action="deny", destination="10.0.0.5", protocol="tcp", port="22"),
            PolicyRule(action="deny", destination="10.0.0.6"),
            PolicyRule(action="allow", destination="10.0.0.0/8", protocol="tcp", port="5432"),
            PolicyRule(action="allow", direction="ingress", destination="192.168.0.0/16"),
            PolicyRule(action="allow", destination="host"),
        ]
    )
    p = Policy.compile(cfg, host_addresses=[ip("172.16.0.1")])
    assert p.rebind_allowed(ip("10.0.0.5"))  # a port-limited deny does not deny the address
    assert not p.rebind_allowed(ip("10.0.0.6"))  # an outright deny does
    assert p.rebind_allowed(ip("10.9.9.9"))  # allow of one port: explicitly allowed
    assert p.rebind_allowed(ip("::ffff:10.9.9.9"))
    assert not p.rebind_allowed(ip("192.168.1.1"))  # ingress rules don't count
    assert p.rebind_allowed(ip("172.16.0.1"))  # group host
    assert not p.rebind_allowed(ip("172.16.0.2"))
    assert not p.rebind_allowed(ip("127.0.0.1"))  # "*" and the default don't count
    assert not p.rebind_allowed(ip("0.0.0.0"))
    assert not Policy.compile(NetworkPolicy.allow_all()).rebind_allowed(ip("10.0.0.1"))
    assert Policy.compile(NetworkPolicy.non_local()).rebind_allowed(ip("10.0.0.1"))
    assert not Policy.compile(NetworkPolicy.non_local()).rebind_allowed(ip("169.254.169.254"))


def test_decision_to_dict_and_policy_is_reusable() -> None:
    p = Policy.compile(NetworkPolicy.public_only())
    d = p.decide(_f("203.0.113.5"))
    assert d.to_dict() == {
        "action": "allow",
        "rule": 1,
        "reason": "rule 1 (allow egress public) matched",
    }
    assert p.decide(_f("203.0.113.5")) is d  # rule decisions are built once
    assert d.allowed


def test_rule_shorthand_round_trips_through_parse_rule() -> None:
    from corral.config import parse_rule

    for rule in [
        PolicyRule(action="allow", destination="2001:db8::/32", ports=["443"]),
        PolicyRule(action="deny", direction="any", destination="::1", protocols=["udp", "tcp"]),
        PolicyRule(action="allow", direction="ingress", destination="*", port="8000-9000"),
        PolicyRule(action="allow", destination=".example.com"),
    ]:
        back = parse_rule(rule_shorthand(rule))
        assert (back.action, back.direction, back.target) == (
            rule.action,
            rule.direction,
            rule.target,
        )
        assert (back.protocol_set, back.port_ranges) == (rule.protocol_set, rule.port_ranges)
