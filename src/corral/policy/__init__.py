"""The policy engine (SPEC section 4): destination groups, preset expansion, the compiled
first-match-wins matcher, DNS-query and rebind decisions, lint. Pure: no I/O.

    policy = Policy.compile(config, host_addresses=[gateway, *host_ips])
    policy.decide(Flow(PolicyDirection.EGRESS, PolicyProtocol.TCP, ip, 443, names, sni))
    policy.decide_query("api.example.com")
    policy.rebind_allowed(ip)

docs/policy.md records the semantic decisions and the matcher's design.
"""

from corral.config import DNS_PORT
from corral.policy.describe import describe_rule, rule_shorthand
from corral.policy.engine import Decision, Flow, Policy
from corral.policy.groups import HostAddresses, classify, host_address_set
from corral.policy.names import normalize_name
from corral.policy.presets import DNS_RULE, defaults, expand, preset_rules

__all__ = [
    "DNS_PORT",
    "DNS_RULE",
    "Decision",
    "Flow",
    "HostAddresses",
    "Policy",
    "classify",
    "defaults",
    "describe_rule",
    "expand",
    "host_address_set",
    "normalize_name",
    "preset_rules",
    "rule_shorthand",
]
