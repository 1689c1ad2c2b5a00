"""The string enums of the network configuration.

Each member's value is its wire string (SPEC section 3), so ``PolicyAction("allow")`` parses
the wire format and ``str(member)`` writes it. Enum-typed fields of the config types accept the
member or its wire string; anything else is a ConfigError naming the field.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

from corral.errors import ConfigError


class PolicyAction(StrEnum):
    """What a matching rule (or a direction's default) does with the traffic."""

    ALLOW = "allow"
    DENY = "deny"


class PolicyDirection(StrEnum):
    """Which traffic a rule considers; ``ANY`` matches in either direction."""

    EGRESS = "egress"
    INGRESS = "ingress"
    ANY = "any"


class PolicyProtocol(StrEnum):
    """The protocol half of a rule. ICMP is egress-only: the host has no inbound ICMP path."""

    TCP = "tcp"
    UDP = "udp"
    ICMPV4 = "icmpv4"
    ICMPV6 = "icmpv6"

    @property
    def is_icmp(self) -> bool:
        return self in (PolicyProtocol.ICMPV4, PolicyProtocol.ICMPV6)


class PortProtocol(StrEnum):
    """Transport of a published port."""

    TCP = "tcp"
    UDP = "udp"


class NetworkPolicyPreset(StrEnum):
    """Canned policies; they expand into ordinary rules (see corral.policy.presets)."""

    NONE = "none"
    PUBLIC_ONLY = "public-only"
    ALLOW_ALL = "allow-all"
    NON_LOCAL = "non-local"


class ViolationAction(StrEnum):
    """What happens when a secret's placeholder heads somewhere it may not go."""

    BLOCK = "block"
    BLOCK_AND_LOG = "block-and-log"
    BLOCK_AND_TERMINATE = "block-and-terminate"


E = TypeVar("E", bound=StrEnum)


def coerce_enum(kind: type[E], value: object, path: str) -> E:
    """``value`` as a member of ``kind``; a ConfigError listing the accepted strings if not."""
    if isinstance(value, kind):
        return value
    if isinstance(value, str):
        member = kind._value2member_map_.get(value)  # the wire spelling itself: no parse
        if member is not None:
            return member  # type: ignore[return-value]
        try:
            return kind(value.strip().lower())
        except ValueError:
            pass
    accepted = ", ".join(repr(m.value) for m in kind)
    raise ConfigError(path, f"{value!r} is not one of {accepted}")
