"""The kernel prefilter never rejects what the gate would allow, and (when it could decide the
whole list) rejects exactly what the gate denies; its group sets are ``classify``'s groups.

The property runs the compiler's output through :func:`corral.net.prefilter.evaluate` (what
the nft rules do, check by check) and compares with the real FlowGate over the real policy
engine, on hypothesis-generated policies (the policy property tests' strategies: colliding
CIDRs, groups, ports, presets, domain rules) and flows.
"""

from __future__ import annotations

import ipaddress
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.config import NetworkConfig, NetworkPolicy, PolicyAction, PolicyRule
from corral.net import firewall
from corral.net.audit import AuditLog
from corral.net.gate import FlowGate
from corral.net.prefilter import (
    MAX_CHECKS,
    PROTOCOLS,
    Prefilter,
    compile_prefilter,
    evaluate,
    group_intervals,
    match,
    reason_of,
    render_chain,
    render_sets,
)
from corral.policy import Policy
from corral.policy.groups import HostAddresses, classify_int
from corral.policy.pins import PinSet
from corral.policy.verdict import Revealed, unmap
from tests.unit.test_policy_property import ADDRESSES, NAMES, PORT_POINTS, configs, host_sets

#: Policies drawn; each is checked against FLOWS_PER_POLICY flows, so 400 x 12 = 4,800 cases
#: (the brief's floor is 2,000).
EXAMPLES = 400
FLOWS_PER_POLICY = 12

GW4 = ipaddress.ip_address("172.16.0.5")
GW6 = ipaddress.ip_address("fd42:6d73:62:1::1")
POOLS = [ipaddress.ip_network("172.16.0.0/12"), ipaddress.ip_network("fd42:6d73:62::/48")]
EXTRA = ["172.16.0.5", "172.16.0.6", "172.20.1.1", "fd42:6d73:62:1::1", "fd42:6d73:62::9"]
DELEGATED = [ipaddress.ip_network("::ffff:0:0/96"), ipaddress.ip_network("64:ff9b::/96")]

_Addr = ipaddress.IPv4Address | ipaddress.IPv6Address


def build(
    config: NetworkConfig, hosts: list[_Addr], tmp_path: Path, pins: PinSet | None = None
) -> tuple[Policy, FlowGate, Prefilter]:
    host_addresses = [*hosts, GW4, GW6]
    policy = Policy.compile(config, host_addresses=host_addresses)
    gate = FlowGate(
        pins=pins,
        sandbox="sb",
        policy=policy,
        gateways=[GW4, GW6],
        pools=POOLS,
        max_connections=8,
        audit=AuditLog("sb", tmp_path),
        host_addresses=host_addresses,
    )
    pf = compile_prefilter(
        policy.rules, policy.default_egress, policy.host, pools=POOLS, gateways=[GW4, GW6]
    )
    return policy, gate, pf


def delegated(address: _Addr) -> bool:
    return any(address in net for net in DELEGATED)


@pytest.fixture(scope="module")
def audit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("audit")


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    config=configs,
    hosts=host_sets,
    seed=st.integers(0, 2**32 - 1),
)
def test_prefilter_rejects_only_what_the_gate_denies(
    config: NetworkConfig, hosts: list[_Addr], seed: int, audit_dir: Path
) -> None:
    rnd = random.Random(seed)
    # Some addresses are pinned to names (as the DNS interceptor would): the kernel's
    # pinned sets hold exactly those addresses.
    pins = PinSet()
    pinned: set[_Addr] = set()
    for text in rnd.sample([*ADDRESSES, *EXTRA], 4):
        address = ipaddress.ip_address(text)
        pins.add(rnd.sample(NAMES, rnd.choice([1, 2])), [address], 300)
        pinned.add(unmap(address))  # as SandboxNetwork.pinned puts it in the kernel sets
    policy, gate, pf = build(config, hosts, audit_dir, pins)
    for _ in range(FLOWS_PER_POLICY):
        text = rnd.choice([*ADDRESSES, *EXTRA, "random4", "random6"])
        if text == "random4":
            address: _Addr = ipaddress.IPv4Address(rnd.getrandbits(32))
        elif text == "random6":
            address = ipaddress.IPv6Address(rnd.getrandbits(128))
        else:
            address = ipaddress.ip_address(text)
        protocol = rnd.choice(PROTOCOLS)
        port = rnd.choice([*PORT_POINTS, rnd.randint(1, 65535)])
        if port == 53:
            continue  # diverted to the DNS interceptor before the prefilter
        verdict = gate.egress(protocol, "guest", address, port, audit=False)
        rejected = evaluate(pf, protocol, address, port, pinned)
        if rejected:
            assert not verdict.allowed, (address, protocol, port, match(pf, protocol, address, port, pinned))
            # Nor can any name the connection reveals turn it into an allow.
            for name in (None, *NAMES):
                final = gate.egress(
                    protocol, "guest", address, port, audit=False, revealed=Revealed(name)
                )
                assert not final.allowed, (address, protocol, port, name, final)
        if pf.complete and not delegated(address) and address not in pinned:
            assert rejected == (not verdict.allowed), (address, protocol, port, verdict)
        if len(pf.checks) < MAX_CHECKS:
            assert pf.complete


def test_group_sets_are_classify_groups() -> None:
    host = HostAddresses.of(
        ipaddress.ip_address(a) for a in ["10.1.2.3", "2001:db8::5", "0.1.2.3", "::7"]
    )
    groups = group_intervals(host)
    rnd = random.Random(7)
    samples = [ipaddress.ip_address(a) for a in [*ADDRESSES, "10.1.2.3", "2001:db8::5", "::7"]]
    samples += [ipaddress.IPv4Address(rnd.getrandbits(32)) for _ in range(3000)]
    samples += [ipaddress.IPv6Address(rnd.getrandbits(128)) for _ in range(3000)]
    # every interval boundary, and one past it
    for (version, _), intervals in groups.items():
        cls = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
        top = (1 << (32 if version == 4 else 128)) - 1
        for lo, hi in intervals:
            samples += [cls(v) for v in (lo, hi, max(lo - 1, 0), min(hi + 1, top))]
    for address in samples:
        if delegated(address):
            assert not any(
                v == 6 and any(lo <= int(address) <= hi for lo, hi in iv)
                for (v, _), iv in groups.items()
            )
            continue
        expected = classify_int(int(address), address.version == 4, host)
        found = [
            g
            for (v, g), iv in groups.items()
            if v == address.version and any(lo <= int(address) <= hi for lo, hi in iv)
        ]
        assert found == [expected], (address, found, expected)


def test_domain_rules_pass_pinned_addresses_and_decide_the_rest(tmp_path: Path) -> None:
    config = NetworkConfig(
        policy="none",
        rules=[
            PolicyRule(action="deny", destination="10.0.0.0/8", protocol="tcp", port="22"),
            PolicyRule(action="allow", destination="example.com", protocol="tcp", port="443"),
            PolicyRule(action="deny", destination="203.0.113.0/24"),
        ],
        default_egress="deny",
    )
    pins = PinSet()
    api = ipaddress.ip_address("198.51.100.7")
    pins.add(["example.com"], [api], 60)
    _, gate, pf = build(config, [], tmp_path, pins)
    assert pf.complete and pf.default_reject and pf.uses_pins
    ten = ipaddress.ip_address("10.1.1.1")
    assert evaluate(pf, "tcp", ten, 22)
    # Never resolved: refused in the kernel, before the handshake.
    assert evaluate(pf, "tcp", ten, 443)
    assert evaluate(pf, "tcp", ipaddress.ip_address("198.51.100.8"), 443)
    # Pinned: the proxy decides with the names (and the revealed one).
    assert not evaluate(pf, "tcp", api, 443, {api})
    assert gate.egress("tcp", "g", api, 443).allowed
    assert evaluate(pf, "tcp", api, 80, {api})  # the rule's port does not admit 80
    assert evaluate(pf, "tcp", ipaddress.ip_address("203.0.113.5"), 80)
    assert not gate.egress("tcp", "g", ipaddress.ip_address("203.0.113.5"), 80).allowed
    sets = "\n".join(render_sets(pf))
    assert "set pf_pinned4 { type ipv4_addr; flags timeout;" in sets


def test_dns_over_tls_is_refused_in_the_kernel_unless_intercepted(tmp_path: Path) -> None:
    policy = Policy.compile(NetworkPolicy.allow_all())
    pf = compile_prefilter(policy.rules, policy.default_egress, policy.host, pools=[], gateways=[])
    assert evaluate(pf, "tcp", ipaddress.ip_address("203.0.113.10"), 853)
    assert not evaluate(pf, "udp", ipaddress.ip_address("203.0.113.10"), 853)
    pf = compile_prefilter(
        policy.rules, policy.default_egress, policy.host, pools=[], gateways=[],
        tls_interception=True,
    )  # fmt: skip
    assert not evaluate(pf, "tcp", ipaddress.ip_address("203.0.113.10"), 853)


def test_public_only_rejects_private_and_default(tmp_path: Path) -> None:
    _, _, pf = build(NetworkPolicy.public_only(), [], tmp_path)
    assert pf.complete and pf.default_reject
    assert evaluate(pf, "tcp", ipaddress.ip_address("10.77.0.1"), 80)
    assert evaluate(pf, "udp", ipaddress.ip_address("fc00::1"), 80)
    assert not evaluate(pf, "tcp", ipaddress.ip_address("203.0.113.10"), 80)
    assert not evaluate(pf, "tcp", ipaddress.ip_address("::ffff:10.77.0.1"), 80)  # proxy
    i = match(pf, "tcp", ipaddress.ip_address("172.16.0.9"), 80)
    assert i is not None and reason_of(pf, i)[1] == "another sandbox's address is never reachable"
    assert evaluate(pf, "tcp", GW4, 80)  # the gateway is host: default deny
    assert not evaluate(pf, "udp", GW4, 53)  # public-only allows host 53; the gate decides


def test_cap_stops_emitting(tmp_path: Path) -> None:
    rules = [
        PolicyRule(action="deny", destination=f"10.{i // 256}.{i % 256}.0/24") for i in range(3000)
    ]
    config = NetworkConfig(policy="none", rules=rules, default_egress="deny")
    policy = Policy.compile(config)
    pf = compile_prefilter(policy.rules, policy.default_egress, policy.host, pools=[], gateways=[])
    assert len(pf.checks) <= MAX_CHECKS and not pf.complete
    assert evaluate(pf, "tcp", ipaddress.ip_address("10.0.1.1"), 1)
    assert not evaluate(pf, "tcp", ipaddress.ip_address("10.11.255.1"), 1)  # past the cap


def test_rendered_chain_logs_and_rejects_each_protocol(tmp_path: Path) -> None:
    _, _, pf = build(NetworkPolicy.public_only(), [], tmp_path)
    lines = render_chain(pf, 25400)
    assert lines[-1] == "return"
    n = len(pf.checks)  # the default deny's index
    assert f'meta l4proto tcp log prefix "corral {n}" group 25400 reject with tcp reset' in lines
    assert reason_of(pf, n) == (None, "no rule matched; default egress deny")
    assert any("udp" in line and "icmpx port-unreachable" in line for line in lines)
    assert any("@pf_public6 return" in line for line in lines)
    sets = "\n".join(render_sets(pf))
    assert "set pf_public4" in sets and "10.0.0.0" not in sets.split("pf_public4")[1].split("\n")[0]
    spec = firewall.FirewallSpec(
        table="corral-x", link="cr-x", guest_ipv4=ipaddress.IPv4Address("172.16.0.6"),
        gateway_ipv4=ipaddress.IPv4Address("172.16.0.5"), guest_ipv6=None, gateway_ipv6=None,
        tcp_port_v4=1, udp_port_v4=2, prefilter=pf, log_group=25400,
    )  # fmt: skip
    text = firewall.ruleset(spec)
    jump = text.index("ct state new meta l4proto { tcp, udp } jump prefilter")
    assert jump < text.index("meta l4proto tcp tproxy")
    assert "chain prefilter {" in text


def test_default_allow_is_a_return(tmp_path: Path) -> None:
    config = NetworkConfig(
        policy="none",
        rules=[PolicyRule(action="deny", destination="private", protocol="udp")],
        default_egress=PolicyAction.ALLOW,
    )
    _, _, pf = build(config, [], tmp_path)
    assert pf.complete and not pf.default_reject
    assert evaluate(pf, "udp", ipaddress.ip_address("192.168.1.1"), 9)
    assert not evaluate(pf, "tcp", ipaddress.ip_address("192.168.1.1"), 9)
