"""Preset expansion: a NetworkConfig's preset becomes ordinary rules and defaults (SPEC 4).

=============  ===============  ================  ==========================================
preset         default egress   default ingress   rules (before the config's own rules)
=============  ===============  ================  ==========================================
(none given)   deny             allow             -
none           deny             deny              - (and the data path gives no interface)
public-only    deny             allow             DNS_RULE, allow egress public
non-local      deny             allow             DNS_RULE, allow egress public,
                                                  allow egress private
allow-all      allow            allow             -
=============  ===============  ================  ==========================================

"Allow DNS to the sandbox resolver" is the rule ``allow egress host udp,tcp 53``: the
sandbox's resolver is reached through its gateway, which is in group ``host``, and a DNS
query matches a ``host`` rule whose protocols and ports admit its transport (SPEC: DNS).
All port-53 traffic is diverted to the DNS interceptor, so the rule never opens the host's
own port 53 to the sandbox. An explicit ``default_egress``/``default_ingress`` in the
config wins over the preset's.
"""

from __future__ import annotations

from corral.config import DNS_PORT, NetworkConfig, NetworkPolicyPreset, PolicyAction, PolicyRule

#: The sandbox's own resolver, as a rule (see the module docstring).
DNS_RULE = PolicyRule(
    action=PolicyAction.ALLOW,
    direction="egress",
    destination="host",
    protocols=["udp", "tcp"],
    ports=[str(DNS_PORT)],
)
_PUBLIC = PolicyRule(action=PolicyAction.ALLOW, direction="egress", destination="public")
_PRIVATE = PolicyRule(action=PolicyAction.ALLOW, direction="egress", destination="private")

_A, _D = PolicyAction.ALLOW, PolicyAction.DENY

#: preset -> (its rules, its default egress, its default ingress)
PRESETS: dict[
    NetworkPolicyPreset | None, tuple[tuple[PolicyRule, ...], PolicyAction, PolicyAction]
] = {
    None: ((), _D, _A),
    NetworkPolicyPreset.NONE: ((), _D, _D),
    NetworkPolicyPreset.PUBLIC_ONLY: ((DNS_RULE, _PUBLIC), _D, _A),
    NetworkPolicyPreset.NON_LOCAL: ((DNS_RULE, _PUBLIC, _PRIVATE), _D, _A),
    NetworkPolicyPreset.ALLOW_ALL: ((), _A, _A),
}


def preset_rules(config: NetworkConfig) -> tuple[PolicyRule, ...]:
    """The rules the config's preset contributes (they come first in the expanded list)."""
    return PRESETS[config.policy][0]  # type: ignore[index]


def expand(config: NetworkConfig) -> tuple[PolicyRule, ...]:
    """The config's whole rule list: the preset's rules, then the config's own."""
    return preset_rules(config) + tuple(config.rules)


def defaults(config: NetworkConfig) -> tuple[PolicyAction, PolicyAction]:
    """(default egress, default ingress): the config's own when set, else its preset's."""
    _, egress, ingress = PRESETS[config.policy]  # type: ignore[index]
    if config.default_egress is not None:
        egress = PolicyAction(config.default_egress)
    if config.default_ingress is not None:
        ingress = PolicyAction(config.default_ingress)
    return egress, ingress
