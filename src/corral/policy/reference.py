"""The naive evaluator: SPEC section 4 read literally, one rule at a time, in order.

Used only by the tests (which prove the compiled matcher equal to it) and the benchmark
(which measures against it). Slow on purpose: obviously correct is its only job.
"""

from __future__ import annotations

from collections.abc import Iterable

from corral.config import DNS_PORT, NetworkConfig, PolicyAction, PolicyProtocol, PolicyRule
from corral.config.values import DestinationKind, IPAddress, unmap
from corral.policy.engine import Flow
from corral.policy.groups import classify
from corral.policy.names import deny_suffix_matches, normalize_name, suffix_matches
from corral.policy.presets import DNS_RULE, defaults, expand, preset_rules


def _port_ok(rule: PolicyRule, port: int | None) -> bool:
    if not rule.port_ranges:
        return True
    return port is not None and any(lo <= port <= hi for lo, hi in rule.port_ranges)


def _name_matches(rule: PolicyRule, name: str) -> bool:
    t = rule.target
    if t.kind is DestinationKind.DOMAIN:
        return name == t.value
    return suffix_matches(t.value, name)


def rule_matches(rule: PolicyRule, flow: Flow, host_addresses: Iterable[IPAddress] = ()) -> bool:
    """Does ``rule`` match ``flow`` (direction, protocol, port and destination)?"""
    if not rule.applies_to(flow.direction):
        return False
    if rule.protocol_set and flow.protocol not in rule.protocol_set:
        return False
    if not _port_ok(rule, flow.port):
        return False
    t = rule.target
    address = unmap(flow.address)
    if t.kind is DestinationKind.ANY:
        return True
    if t.kind is DestinationKind.GROUP:
        return classify(address, host_addresses) == t.group
    if t.kind in (DestinationKind.CIDR, DestinationKind.IP):
        assert t.network is not None
        return t.network.version == address.version and address in t.network
    names = [normalize_name(n) for n in flow.names]
    sni = normalize_name(flow.sni) if flow.sni is not None else None
    pinned = any(_name_matches(rule, n) for n in names)
    revealed = sni is not None and _name_matches(rule, sni)
    if pinned and (sni is None or revealed):
        return True
    return rule.action is PolicyAction.DENY and revealed


def decide(
    config: NetworkConfig, flow: Flow, host_addresses: Iterable[IPAddress] = ()
) -> tuple[PolicyAction, int | None]:
    """(action, index of the deciding rule or None) for an IP flow."""
    hosts = list(host_addresses)
    if classify(unmap(flow.address), hosts) is None:
        return PolicyAction.DENY, None
    for i, rule in enumerate(expand(config)):
        if rule_matches(rule, flow, hosts):
            return rule.action, i  # type: ignore[return-value]
    egress, ingress = defaults(config)
    return (egress if flow.direction == "egress" else ingress), None


def decide_query(
    config: NetworkConfig, name: str, transport: PolicyProtocol = PolicyProtocol.UDP
) -> tuple[PolicyAction, int | None]:
    """(action, rule index or None) for a DNS question."""
    q = normalize_name(name)
    if q in config.deny_domains:
        return PolicyAction.DENY, None
    if any(deny_suffix_matches(s, q) for s in config.deny_domain_suffixes):
        return PolicyAction.DENY, None
    for i, rule in enumerate(expand(config)):
        if not rule.applies_to("egress"):  # type: ignore[arg-type]
            continue
        t = rule.target
        if t.kind in (DestinationKind.DOMAIN, DestinationKind.SUFFIX):
            if _name_matches(rule, q):
                return rule.action, i  # type: ignore[return-value]
        elif t.kind is DestinationKind.ANY or (
            t.kind is DestinationKind.GROUP and t.value == "host"
        ):
            if rule.protocol_set and transport not in rule.protocol_set:
                continue
            if _port_ok(rule, DNS_PORT):
                return rule.action, i  # type: ignore[return-value]
    return defaults(config)[0], None


def rebind_allowed(
    config: NetworkConfig, address: IPAddress, host_addresses: Iterable[IPAddress] = ()
) -> bool:
    """The first egress address rule holding ``address`` that allows it (any protocol or
    port) or denies it outright (no protocol, no port) decides."""
    hosts = list(host_addresses)
    address = unmap(address)
    group = classify(address, hosts)
    if group is None:
        return False
    n_preset = len(preset_rules(config))
    for index, rule in enumerate(expand(config)):
        if not rule.applies_to("egress"):  # type: ignore[arg-type]
            continue
        if index < n_preset and rule == DNS_RULE:
            continue  # the presets' resolver rule keeps no address in an answer
        t = rule.target
        if t.kind is DestinationKind.GROUP:
            hit = t.group == group
        elif t.kind in (DestinationKind.CIDR, DestinationKind.IP):
            assert t.network is not None
            hit = t.network.version == address.version and address in t.network
        else:
            continue
        if not hit:
            continue
        if rule.action is PolicyAction.ALLOW:
            return True
        if not rule.protocol_set and not rule.port_ranges:
            return False
    return False
