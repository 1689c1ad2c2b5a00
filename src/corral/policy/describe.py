"""Rules as people read them: in reasons ("allow egress public tcp 443") and in the CLI's
``--rule`` shorthand (``allow:egress@public:tcp:443``, which ``parse_rule`` reads back)."""

from __future__ import annotations

from corral.config import PolicyProtocol, PolicyRule
from corral.config.values import format_port_spec

_PROTOCOL_ORDER = {p: i for i, p in enumerate(PolicyProtocol)}


def _protocols(rule: PolicyRule) -> list[str]:
    return [str(p) for p in sorted(rule.protocol_set, key=_PROTOCOL_ORDER.__getitem__)]


def _ports(rule: PolicyRule) -> list[str]:
    return [format_port_spec(lo, hi) for lo, hi in rule.port_ranges]


def describe_rule(rule: PolicyRule) -> str:
    """``allow egress public tcp 443``: action, direction, destination, protocols, ports."""
    parts = [str(rule.action), str(rule.direction), rule.destination]
    protos = _protocols(rule)
    if protos:
        parts.append(",".join(protos))
    ports = _ports(rule)
    if ports:
        parts.append(",".join(ports))
    return " ".join(parts)


def rule_shorthand(rule: PolicyRule) -> str:
    """The rule as ``--rule`` takes it: ``ACTION:DIRECTION@DESTINATION[:PROTOCOLS[:PORTS]]``."""
    dest = rule.destination
    if ":" in dest:
        dest = f"[{dest}]"  # IPv6 address or CIDR: the fields are colon-separated
    text = f"{rule.action}:{rule.direction}@{dest}"
    protos = _protocols(rule)
    ports = _ports(rule)
    if protos or ports:
        text += ":" + (",".join(protos) if protos else "any")
    if ports:
        text += ":" + ",".join(ports)
    return text
