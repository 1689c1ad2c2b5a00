"""The compiled matcher equals the naive reference evaluator, on random policies and flows.

The strategies draw from small pools on purpose, so rules collide: shared and nested CIDRs,
exact IPs inside them, mapped IPv6 rules and flows, names that several suffix rules match,
SNI that agrees or disagrees with the pinned names, ports on the edges of ranges, every
protocol with and without ports, host addresses overlapping the other groups.
"""

from __future__ import annotations

import ipaddress
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.config import (
    NetworkConfig,
    NetworkPolicyPreset,
    PolicyDirection,
    PolicyProtocol,
    PolicyRule,
)
from corral.policy import Flow, Policy
from corral.policy import reference as ref

#: Examples of the structured properties (hypothesis draws and shrinks every field; drawing
#: is what costs, so these stay in the low thousands).
EXAMPLES = 600
#: Examples of the seeded property: each seed builds a random policy and several flows with
#: random.Random, so 10,000 cases (the issue's floor) stay well under a minute.
SEEDED_EXAMPLES = 10_000

DESTINATIONS = [
    "*",
    "public",
    "private",
    "host",
    "loopback",
    "link-local",
    "metadata",
    "multicast",
    "0.0.0.0/0",
    "::/0",
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.0/24",
    "10.1.2.3",
    "10.1.2.4/31",
    "172.16.0.0/12",
    "172.16.0.1",
    "203.0.113.0/24",
    "203.0.113.5",
    "203.0.113.128/25",
    "169.254.0.0/16",
    "169.254.169.254",
    "::ffff:10.1.0.0/112",
    "::ffff:203.0.113.5",
    "2001:db8::/32",
    "2001:db8:f::/64",
    "2001:db8:f::5",
    "fd00::/8",
    "fd00:ec2::254",
    "64:ff9b::/96",
    "example.com",
    "api.example.com",
    "a.b.example.com",
    "evil.test",
    ".example.com",
    ".b.example.com",
    ".com",
    ".test",
]

NAMES = [
    "example.com",
    "api.example.com",
    "API.Example.COM.",
    "a.b.example.com",
    "x.a.b.example.com",
    "b.example.com",
    "evil.test",
    "www.evil.test",
    "other.org",
    "com",
]

ADDRESSES = [
    "0.0.0.0",
    "0.1.2.3",
    "1.0.0.0",
    "9.255.255.255",
    "10.0.0.0",
    "10.1.2.3",
    "10.1.2.4",
    "10.1.2.5",
    "10.255.255.255",
    "11.0.0.0",
    "100.63.255.255",
    "100.64.0.0",
    "127.0.0.1",
    "169.254.0.1",
    "169.254.169.254",
    "172.15.255.255",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "203.0.113.5",
    "203.0.113.127",
    "203.0.113.128",
    "224.0.0.1",
    "239.255.255.255",
    "240.0.0.1",
    "255.255.255.255",
    "::",
    "::1",
    "::ffff:10.1.2.3",
    "::ffff:203.0.113.5",
    "::ffff:0.0.0.0",
    "::10.1.2.3",
    "64:ff9b::a01:203",
    "64:ff9b::cb00:7105",
    "2001:db8::1",
    "2001:db8:f::5",
    "2001:db8:f::6",
    "fc00::1",
    "fd00::1",
    "fd00:ec2::254",
    "fe80::1",
    "fec0::1",
    "ff02::1",
    "2606:4700::1111",
]

HOSTS = ["172.16.0.1", "10.1.2.3", "203.0.113.5", "2001:db8:f::5", "fd00::1", "127.0.0.1"]

PORT_POINTS = [1, 52, 53, 54, 442, 443, 444, 1000, 8000, 9000, 65535]
TCP_UDP = [PolicyProtocol.TCP, PolicyProtocol.UDP]


@st.composite
def port_specs(draw: st.DrawFn) -> str:
    a, b = sorted((draw(st.sampled_from(PORT_POINTS)), draw(st.sampled_from(PORT_POINTS))))
    return str(a) if a == b or draw(st.booleans()) else f"{a}-{b}"


@st.composite
def rules(draw: st.DrawFn) -> PolicyRule:
    direction = draw(st.sampled_from(list(PolicyDirection)))
    allowed_protos = TCP_UDP if direction is PolicyDirection.INGRESS else list(PolicyProtocol)
    protocol = draw(st.none() | st.sampled_from(allowed_protos))
    protocols = draw(st.lists(st.sampled_from(allowed_protos), max_size=2))
    port = draw(st.none() | port_specs())
    ports = draw(st.lists(port_specs(), max_size=2))
    return PolicyRule(
        action=draw(st.sampled_from(["allow", "deny"])),
        direction=direction,
        destination=draw(st.sampled_from(DESTINATIONS)),
        protocol=protocol,
        protocols=protocols,
        port=port,
        ports=ports,
    )


configs = st.builds(
    NetworkConfig,
    policy=st.none() | st.sampled_from([p for p in NetworkPolicyPreset]),
    rules=st.lists(rules(), max_size=12),
    default_egress=st.none() | st.sampled_from(["allow", "deny"]),
    default_ingress=st.none() | st.sampled_from(["allow", "deny"]),
    deny_domains=st.lists(st.sampled_from(["evil.test", "api.example.com"]), max_size=1),
    deny_domain_suffixes=st.lists(st.sampled_from([".evil.test", ".b.example.com"]), max_size=1),
)


@st.composite
def flows(draw: st.DrawFn) -> Flow:
    protocol = draw(st.sampled_from(list(PolicyProtocol)))
    direction = draw(st.sampled_from([PolicyDirection.EGRESS, PolicyDirection.INGRESS]))
    port = None if protocol.is_icmp else draw(st.sampled_from(PORT_POINTS))
    return Flow(
        direction=direction,
        protocol=protocol,
        address=ipaddress.ip_address(draw(st.sampled_from(ADDRESSES))),
        port=port,
        names=frozenset(draw(st.lists(st.sampled_from(NAMES), max_size=3))),
        sni=draw(st.none() | st.sampled_from(NAMES)),
    )


host_sets = st.lists(st.sampled_from(HOSTS), max_size=3).map(
    lambda xs: [ipaddress.ip_address(x) for x in xs]
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs, hosts=host_sets, cases=st.lists(flows(), min_size=1, max_size=6))
def test_compiled_decide_equals_reference(
    config: NetworkConfig, hosts: list[ipaddress.IPv4Address], cases: list[Flow]
) -> None:
    policy = Policy.compile(config, host_addresses=hosts)
    for flow in cases:
        got = policy.decide(flow)
        assert (got.action, got.rule) == ref.decide(config, flow, hosts), flow


def _random_policy(rng: random.Random) -> NetworkConfig:
    rule_list = []
    for _ in range(rng.randrange(0, 25)):
        direction = rng.choice(list(PolicyDirection))
        protos = TCP_UDP if direction is PolicyDirection.INGRESS else list(PolicyProtocol)
        ports = []
        for _ in range(rng.choice([0, 0, 1, 2])):
            a, b = sorted((rng.choice(PORT_POINTS), rng.choice(PORT_POINTS)))
            ports.append(str(a) if a == b else f"{a}-{b}")
        rule_list.append(
            PolicyRule(
                action=rng.choice(["allow", "deny"]),
                direction=direction,
                destination=rng.choice(DESTINATIONS),
                protocols=rng.sample(protos, rng.choice([0, 0, 1, 2])),
                ports=ports,
            )
        )
    return NetworkConfig(
        policy=rng.choice([None, *NetworkPolicyPreset]),
        rules=rule_list,
        default_egress=rng.choice([None, "allow", "deny"]),
        default_ingress=rng.choice([None, "allow", "deny"]),
    )


def _random_flow(rng: random.Random) -> Flow:
    protocol = rng.choice(list(PolicyProtocol))
    return Flow(
        direction=rng.choice([PolicyDirection.EGRESS, PolicyDirection.INGRESS]),
        protocol=protocol,
        address=ipaddress.ip_address(rng.choice(ADDRESSES)),
        port=None if protocol.is_icmp else rng.choice(PORT_POINTS),
        names=frozenset(rng.sample(NAMES, rng.choice([0, 1, 1, 2, 3]))),
        sni=rng.choice([None, None, *NAMES]),
    )


@settings(max_examples=SEEDED_EXAMPLES, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**64))
def test_compiled_decide_equals_reference_seeded(seed: int) -> None:
    """10,000 random policies, 8 flows each; a failure prints the seed to replay."""
    rng = random.Random(seed)
    config = _random_policy(rng)
    hosts = [ipaddress.ip_address(h) for h in rng.sample(HOSTS, rng.randrange(0, 3))]
    policy = Policy.compile(config, host_addresses=hosts)
    for _ in range(8):
        flow = _random_flow(rng)
        got = policy.decide(flow)
        assert (got.action, got.rule) == ref.decide(config, flow, hosts), (config, flow)
    name = rng.choice(NAMES)
    transport = rng.choice(TCP_UDP)
    q = policy.decide_query(name, transport)
    assert (q.action, q.rule) == ref.decide_query(config, name, transport), (config, name)
    address = ipaddress.ip_address(rng.choice(ADDRESSES))
    assert policy.rebind_allowed(address) == ref.rebind_allowed(config, address, hosts)


@settings(max_examples=EXAMPLES // 4, deadline=None)
@given(
    config=configs,
    hosts=host_sets,
    names=st.lists(st.sampled_from([*NAMES, "sub.evil.test", "q.b.example.com"]), min_size=1),
    transport=st.sampled_from(TCP_UDP),
)
def test_compiled_query_equals_reference(
    config: NetworkConfig,
    hosts: list[ipaddress.IPv4Address],
    names: list[str],
    transport: PolicyProtocol,
) -> None:
    policy = Policy.compile(config, host_addresses=hosts)
    for name in names:
        got = policy.decide_query(name, transport)
        assert (got.action, got.rule) == ref.decide_query(config, name, transport), name


@settings(max_examples=EXAMPLES // 4, deadline=None)
@given(
    config=configs,
    hosts=host_sets,
    addresses=st.lists(st.sampled_from(ADDRESSES), min_size=1),
)
def test_compiled_rebind_equals_reference(
    config: NetworkConfig, hosts: list[ipaddress.IPv4Address], addresses: list[str]
) -> None:
    policy = Policy.compile(config, host_addresses=hosts)
    for text in addresses:
        address = ipaddress.ip_address(text)
        assert policy.rebind_allowed(address) == ref.rebind_allowed(config, address, hosts), text


@settings(max_examples=EXAMPLES // 4, deadline=None)
@given(
    entries=st.lists(
        st.tuples(st.booleans(), st.lists(port_specs(), max_size=3)), min_size=1, max_size=30
    ),
    port=st.sampled_from([None, *PORT_POINTS, 2, 600, 8999, 9001]),
)
def test_bucket_returns_lowest_index_admitting_the_port(
    entries: list[tuple[bool, list[str]]], port: int | None
) -> None:
    """Many rules on one key with different ports: the interval map must stay exact."""
    from corral.config.values import parse_port_spec
    from corral.policy.matcher import NO_MATCH, bucket_lookup, build_bucket

    parsed = [
        (i, () if portless else tuple(parse_port_spec(p, "p") for p in specs))
        for i, (portless, specs) in enumerate(entries)
    ]
    expected = NO_MATCH
    for i, ranges in parsed:
        if not ranges or (port is not None and any(lo <= port <= hi for lo, hi in ranges)):
            expected = i
            break
    assert bucket_lookup(build_bucket(parsed), port) == expected
