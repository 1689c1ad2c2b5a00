"""The flow gate: what the data path adds to the policy (other sandboxes, the gateway's
loopback delivery, DNS to the host, exact connection counting, audit) — with the real engine."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from pathlib import Path

from corral.config import NetworkConfig, NetworkPolicy, PolicyProtocol, PolicyRule
from corral.net.audit import AuditEvent, AuditLog, follow, read_events
from corral.net.gate import LIMIT_EVENTS_PER_SECOND, FlowGate
from corral.policy import Policy

GW4 = ipaddress.ip_address("172.16.0.5")
GW6 = ipaddress.ip_address("fd42:6d73:62:1::1")
HOST = ipaddress.ip_address("198.51.100.2")
POOLS = [ipaddress.ip_network("172.16.0.0/12"), ipaddress.ip_network("fd42:6d73:62::/48")]


def gate(
    tmp_path: Path, config: NetworkConfig, max_connections: int = 256, log_allowed: bool = False
) -> FlowGate:
    policy = Policy.compile(config, host_addresses=[GW4, GW6, HOST])
    return FlowGate(
        sandbox="sb",
        policy=policy,
        gateways=[GW4, GW6],
        pools=POOLS,
        max_connections=max_connections,
        audit=AuditLog("sb", tmp_path, log_allowed=log_allowed),
        host_addresses=[HOST],
    )


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def test_other_sandboxes_are_denied_even_under_allow_all(tmp_path: Path) -> None:
    g = gate(tmp_path, NetworkPolicy.allow_all())
    for other in (
        "172.16.0.2",
        "172.16.0.6",
        "172.31.255.254",
        "fd42:6d73:62::2",
        "::ffff:172.16.0.9",
    ):
        v = g.egress("tcp", "172.16.0.6", ip(other), 80)
        assert not v.allowed and v.reason == "another sandbox's address is never reachable"
    assert g.egress("tcp", "172.16.0.6", ip("203.0.113.10"), 80).allowed


def test_allowed_gateway_is_delivered_to_loopback(tmp_path: Path) -> None:
    g = gate(tmp_path, NetworkPolicy.allow_all())
    assert g.egress("tcp", "x", GW4, 8080).target == ip("127.0.0.1")
    assert g.egress("udp", "x", GW6, 8080).target == ip("::1")
    assert g.egress("tcp", "x", HOST, 22).target == HOST  # other host addresses: as they are


def test_port_53_of_any_address_is_the_dns_interceptors_and_never_dialled(tmp_path: Path) -> None:
    g = gate(tmp_path, NetworkPolicy.public_only())
    assert not g.egress("tcp", "x", GW4, 22).allowed
    for addr in (GW4, GW6, HOST, ip("203.0.113.10"), ip("8.8.8.8"), ip("::ffff:1.1.1.1")):
        for proto in ("udp", "tcp"):
            v = g.egress(proto, "x", addr, 53)
            assert v.handled_by == "dns-interceptor" and "DNS interceptor" in v.reason
            assert v.target is None  # the host's own resolver is never reached


def test_dns_over_tls_is_refused_without_interception(tmp_path: Path) -> None:
    g = gate(tmp_path, NetworkPolicy.allow_all())
    v = g.egress("tcp", "x", ip("203.0.113.10"), 853)
    assert not v.allowed and "853" in v.reason
    assert g.egress("udp", "x", ip("203.0.113.10"), 853).allowed


def test_decisions_carry_the_rule_index(tmp_path: Path) -> None:
    cfg = NetworkConfig(
        default_egress="allow",
        rules=[
            PolicyRule(action="allow", destination="*", protocol="udp"),
            PolicyRule(action="deny", destination="203.0.113.0/24", port="25"),
        ],
    )
    g = gate(tmp_path, cfg)
    v = g.egress("tcp", "172.16.0.6", ip("203.0.113.7"), 25)
    assert not v.allowed and v.rule == 1
    ev = read_events(tmp_path / "net-audit.jsonl")[-1]
    assert (ev.action, ev.rule, ev.destination, ev.port) == ("deny", 1, "203.0.113.7", 25)


def test_max_connections_is_exact_and_its_audit_rate_limited(tmp_path: Path) -> None:
    g = gate(tmp_path, NetworkPolicy.public_only(), max_connections=3)
    assert all(g.try_acquire("tcp", "s", ip("203.0.113.1"), 80) for _ in range(3))
    assert not g.try_acquire("udp", "s", ip("203.0.113.1"), 53)
    g.release()
    assert g.try_acquire("tcp", "s", ip("203.0.113.1"), 80)
    for _ in range(100):
        assert not g.try_acquire("tcp", "s", ip("203.0.113.1"), 80)
    limit = [
        e for e in read_events(tmp_path / "net-audit.jsonl") if "max_connections (3)" in e.reason
    ]
    assert len(limit) == LIMIT_EVENTS_PER_SECOND
    assert g.active == 3


def test_allows_are_audited_only_when_asked(tmp_path: Path) -> None:
    quiet = gate(tmp_path / "a", NetworkPolicy.allow_all())
    quiet.egress("tcp", "s", ip("203.0.113.1"), 80)
    assert read_events(tmp_path / "a" / "net-audit.jsonl") == []
    loud = gate(tmp_path / "b", NetworkPolicy.allow_all(), log_allowed=True)
    loud.egress("tcp", "s", ip("203.0.113.1"), 80)
    assert [e.action for e in read_events(tmp_path / "b" / "net-audit.jsonl")] == ["allow"]


def test_ingress_uses_peer_and_guest_port(tmp_path: Path) -> None:
    cfg = NetworkConfig(
        rules=[
            PolicyRule(action="deny", direction="ingress", destination="10.0.0.0/8", port="8080")
        ]
    )
    g = gate(tmp_path, cfg)
    assert not g.ingress("tcp", ip("10.1.2.3"), "172.16.0.6", 8080).allowed
    assert g.ingress("tcp", ip("10.1.2.3"), "172.16.0.6", 8081).allowed
    assert g.ingress("udp", ip("::ffff:10.1.2.3"), "172.16.0.6", 8081).allowed


def test_audit_lines_are_json_with_every_field(tmp_path: Path) -> None:
    log = AuditLog("sb", tmp_path)
    log.record(
        direction="egress",
        protocol="udp",
        source="a",
        destination="b",
        port=1,
        action="deny",
        reason="r",
    )
    data = json.loads((tmp_path / "net-audit.jsonl").read_text())
    assert set(data) == {
        "time", "sandbox", "direction", "protocol", "source", "destination", "port", "names",
        "rule", "action", "reason", "revealed",
    }  # fmt: skip


def test_follow_yields_events_as_they_are_written(tmp_path: Path) -> None:
    log = AuditLog("sb", tmp_path)

    async def scenario() -> list[AuditEvent]:
        got: list[AuditEvent] = []

        async def reader() -> None:
            async for ev in follow(tmp_path / "net-audit.jsonl"):
                got.append(ev)
                if len(got) == 2:
                    return

        task = asyncio.create_task(reader())
        for i in range(2):
            await asyncio.sleep(0.05)
            log.record(
                direction="egress",
                protocol="tcp",
                source="s",
                destination=f"d{i}",
                port=i,
                action="deny",
                reason="r",
            )
        await asyncio.wait_for(task, 5)
        return got

    events = asyncio.run(scenario())
    assert [e.destination for e in events] == ["d0", "d1"]


def test_slots_leased_from_other_pools_are_other_sandboxes(tmp_path: Path) -> None:
    from corral.net.addressing import AddressPool

    pool = AddressPool(tmp_path / "pool")
    g = gate(tmp_path, NetworkPolicy.allow_all())
    g.leased = pool.leased_networks
    other = pool.lease("other", ipaddress.IPv4Network("10.98.0.0/24"), None, routes=[])
    assert not g.egress("tcp", "s", other.guest_ipv4, 80).allowed
    assert g.egress("tcp", "s", ipaddress.ip_address("10.98.1.2"), 80).allowed
    pool.release("other")
    g._leases_at -= 2  # the lease snapshot is refreshed at most once a second
    assert g.egress("tcp", "s", other.guest_ipv4, 80).allowed


def test_remembered_verdicts_follow_the_pins_and_each_flow_is_audited(tmp_path: Path) -> None:
    """The gate remembers verdicts made before a revealed name; the memory is keyed by the
    pinned names, so a pin (or its expiry) changes the answer at once, and a repeated denial
    is still one audit event per flow."""
    from corral.policy.pins import PinSet

    now = [1000.0]
    pins = PinSet(clock=lambda: now[0])
    cfg = NetworkConfig(
        default_egress="deny",
        rules=[PolicyRule(action="allow", destination="api.example.com", protocol="tcp")],
    )
    policy = Policy.compile(cfg, host_addresses=[GW4, GW6, HOST])
    g = FlowGate(
        sandbox="sb", policy=policy, gateways=[GW4, GW6], pools=POOLS, max_connections=8,
        audit=AuditLog("sb", tmp_path), host_addresses=[HOST], pins=pins,
    )  # fmt: skip
    dst = ip("203.0.113.20")
    assert not g.egress("tcp", "s", dst, 443).allowed
    assert not g.egress("tcp", "s", dst, 443).allowed
    pins.add(["api.example.com"], [dst], ttl=30)
    pinned = g.egress("tcp", "s", dst, 443)
    assert pinned.allowed and pinned.names == ("api.example.com",)
    now[0] += 3600  # the pin expired
    assert not g.egress("tcp", "s", dst, 443).allowed
    denials = [e for e in read_events(tmp_path / "net-audit.jsonl") if e.action == "deny"]
    assert len(denials) == 3
    # The remembered answer is the pure verdict's, for every flow asked twice.
    from corral.policy import verdict as verdicts

    for text, port, proto in [("203.0.113.20", 443, "tcp"), ("10.0.0.1", 80, "udp"),
                              ("172.16.0.9", 22, "tcp"), (str(GW4), 8080, "tcp")]:  # fmt: skip
        for _ in range(2):
            got = g.egress(proto, "s", ip(text), port)
            fresh = verdicts.egress(
                policy, g.view, PolicyProtocol(proto), ip(text), port,
                names=pins.names_for(ip(text)),
            )  # fmt: skip
            assert got == fresh
