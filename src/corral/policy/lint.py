"""Policy lint: rules that can never do anything, and why (``corral policy check``).

Every warning names a rule of the expanded list (preset rules first) and says in one
sentence what is wrong. The checks:

* shadowed: an earlier rule matches every flow (and every DNS query) this one would, so
  this one never decides anything. An address rule that would still be the first to count
  for DNS rebind protection is reported as shadowed for flows only. Claimed only when provably true: same-or-wider
  direction, a superset of (protocol, port) pairs, and a destination that contains this
  one's (``*`` contains everything; a group contains a CIDR lying wholly in it; a CIDR
  contains its subnets; a domain or suffix contains the names it matches, with the deny
  rule's extra SNI-alone reach taken into account). A group containing a CIDR assumes the
  CIDR holds none of the host's addresses (they are known only when a sandbox runs), and
  the warning says so. Anything less certain is not reported.
* shadowed by the preset: the same, when the earlier rule is one of the preset's.
* DNS-shadowed: a domain or suffix rule whose queries an earlier rule of the opposite
  action always answers (the presets' DNS rule answers every query, so ``deny .evil.com``
  under ``public-only`` never refuses a name: use ``deny_domain_suffixes``).
* ports on ICMP: ICMP has no ports, so an ICMP-only rule with ports never matches, and the
  ICMP half of a mixed rule never does.
* ICMP with direction ``any``: the ingress half never matches (no inbound ICMP path).
* name rules for ingress: they match only peers whose address the sandbox itself resolved
  (its pin set), which is rarely what was meant.
* destinations in no group (0.0.0.0/8, 240.0.0.0/4, ...): always denied before any rule.
* rules under policy ``none``: the sandbox has no network interface.

Shadow checks look at a bounded number of earlier candidates per rule (``MAX_CANDIDATES``)
so a 100,000-rule policy lints in seconds; past that bound a shadow may go unreported.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from corral.config import (
    DNS_PORT,
    NetworkConfig,
    NetworkPolicyPreset,
    PolicyAction,
    PolicyDirection,
    PolicyProtocol,
    PolicyRule,
)
from corral.config.values import DestinationKind, Group
from corral.policy.describe import describe_rule
from corral.policy.groups import network_group
from corral.policy.names import name_suffixes, suffix_matches
from corral.policy.presets import expand, preset_rules

#: Earlier rules examined as possible shadows of one rule. Candidates come from indexes
#: (same key, containing CIDRs, "*"), so this bounds only pathological policies (thousands
#: of "*" rules), keeping a lint of 100,000 rules to seconds.
MAX_CANDIDATES = 256

_ALL_PROTOCOLS: frozenset[PolicyProtocol] = frozenset(PolicyProtocol)
_FULL_PORTS = ((1, 65535),)


#: What a warning is about (``corral policy check --json`` carries it).
NO_INTERFACE = "no-interface"  # the rule never applies: policy 'none'
SHADOWED = "shadowed"  # never matches a flow or a query: an earlier rule always wins
SHADOWED_FLOWS = "shadowed-flows"  # never matches a flow, still decides rebind protection
DNS_SHADOWED = "dns-shadowed"  # never decides a DNS query (still decides some flows)
ICMP_PORTS = "icmp-ports"  # never matches (ICMP-only with ports)
ICMP_PORTS_FLOWS = "icmp-ports-flows"  # never matches a flow, still decides DNS queries
ICMP_PORTS_PARTIAL = "icmp-ports-partial"  # its ICMP half never matches
ICMP_ANY = "icmp-any"  # its ingress ICMP half never matches
INGRESS_NAMES = "ingress-names"  # a name rule for inbound traffic: rarely what is meant
NO_GROUP = "no-group"  # never matches: its addresses are always denied

#: Kinds that mean "this rule never decides anything the data path asks".
NEVER_MATCHES = frozenset({NO_INTERFACE, SHADOWED, ICMP_PORTS, NO_GROUP})


@dataclass(frozen=True, slots=True)
class LintWarning:
    """One finding: the rule's index in the expanded list (None: the whole config), one
    sentence, and its kind (one of the constants above)."""

    rule: int | None
    message: str
    kind: str

    def __str__(self) -> str:
        return self.message


def _protocols(rule: PolicyRule) -> frozenset[PolicyProtocol]:
    return rule.protocol_set or _ALL_PROTOCOLS


def _covers_ranges(outer: Iterable[tuple[int, int]], inner: Iterable[tuple[int, int]]) -> bool:
    """Every port of ``inner`` is in the union of ``outer``."""
    merged: list[list[int]] = []
    for lo, hi in sorted(outer):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return all(any(m[0] <= lo and hi <= m[1] for m in merged) for lo, hi in inner)


def _traffic_covered(earlier: PolicyRule, later: PolicyRule) -> bool:
    """Every (protocol, port) pair ``later`` can match, ``earlier`` matches too."""
    earlier_protos = _protocols(earlier)
    for p in _protocols(later):
        if p.is_icmp:
            if later.port_ranges:
                continue  # ICMP has no port: this half of ``later`` matches nothing
            if p not in earlier_protos or earlier.port_ranges:
                return False
        else:
            if p not in earlier_protos:
                return False
            if earlier.port_ranges and not _covers_ranges(
                earlier.port_ranges, later.port_ranges or _FULL_PORTS
            ):
                return False
    return True


def _directions_covered(earlier: PolicyRule, later: PolicyRule) -> bool:
    return earlier.direction is PolicyDirection.ANY or earlier.direction == later.direction


def _name_contains(earlier: PolicyRule, later: PolicyRule) -> bool:
    """The names ``earlier``'s destination matches include all of ``later``'s."""
    e, l_ = earlier.target, later.target
    if e.kind is DestinationKind.DOMAIN:
        return l_.kind is DestinationKind.DOMAIN and l_.value == e.value
    if l_.kind is DestinationKind.DOMAIN:
        return suffix_matches(e.value, l_.value)
    return l_.value == e.value or l_.value.endswith(e.value)


def _destination_contains(earlier: PolicyRule, later: PolicyRule) -> tuple[bool, bool]:
    """(contains, assumes the host holds none of ``later``'s addresses)."""
    e, l_ = earlier.target, later.target
    if e.kind is DestinationKind.ANY:
        return True, False
    if l_.kind is DestinationKind.ANY:
        return False, False
    if e.is_name or l_.is_name:
        if not (e.is_name and l_.is_name) or not _name_contains(earlier, later):
            return False, False
        # A deny name rule also matches on the revealed name alone; an allow rule doesn't.
        return earlier.action is PolicyAction.DENY or later.action is PolicyAction.ALLOW, False
    if e.kind is DestinationKind.GROUP:
        if l_.kind is DestinationKind.GROUP:
            return e.group == l_.group, False
        assert l_.network is not None
        if e.group is Group.HOST:
            return False, False
        return network_group(l_.network) == e.group, True
    if l_.kind is DestinationKind.GROUP:
        return False, False  # a group spans both families: no single CIDR rule holds it
    assert e.network is not None and l_.network is not None
    if e.network.version != l_.network.version:
        return False, False
    return l_.network.subnet_of(e.network), False  # type: ignore[arg-type]


def _counts_for_rebind(rule: PolicyRule) -> bool:
    """Rebind protection asks the first egress address rule that allows an address (any
    protocol/port) or denies it outright (see Policy.rebind_allowed)."""
    return (
        rule.applies_to(PolicyDirection.EGRESS)
        and rule.target.is_address
        and (rule.action is PolicyAction.ALLOW or (not rule.protocol_set and not rule.port_ranges))
    )


def _query_shadowed(earlier: PolicyRule, later: PolicyRule) -> bool:
    """``earlier`` answers every DNS query ``later`` (a name rule) would."""
    if earlier.direction is PolicyDirection.INGRESS:
        return False
    e = earlier.target
    if e.is_name:
        return _name_contains(earlier, later)
    if e.kind is DestinationKind.ANY or e.group is Group.HOST:
        for transport in (PolicyProtocol.UDP, PolicyProtocol.TCP):
            if earlier.protocol_set and transport not in earlier.protocol_set:
                return False
        return not earlier.port_ranges or any(
            lo <= DNS_PORT <= hi for lo, hi in earlier.port_ranges
        )
    return False


class _Candidates:
    """Earlier rules indexed by what their destination keys on, to find possible shadows."""

    def __init__(self) -> None:
        self.any: list[int] = []
        self.groups: dict[Group, list[int]] = defaultdict(list)
        self.networks: dict[tuple[int, int, int], list[int]] = defaultdict(list)
        self.prefix_lengths: dict[int, set[int]] = {4: set(), 6: set()}
        self.names: dict[str, list[int]] = defaultdict(list)
        self.query_any: list[int] = []

    def add(self, index: int, rule: PolicyRule) -> None:
        t = rule.target
        if t.kind is DestinationKind.ANY:
            self.any.append(index)
        elif t.kind is DestinationKind.GROUP:
            assert t.group is not None
            self.groups[t.group].append(index)
        elif t.network is not None:
            net = t.network
            self.networks[(net.version, net.prefixlen, int(net.network_address))].append(index)
            self.prefix_lengths[net.version].add(net.prefixlen)
        else:
            self.names[t.value].append(index)
        if t.kind is DestinationKind.ANY or t.group is Group.HOST:
            self.query_any.append(index)

    def for_flows(self, rule: PolicyRule) -> list[int]:
        t = rule.target
        out = list(self.any)
        if t.kind is DestinationKind.GROUP:
            assert t.group is not None
            out += self.groups.get(t.group, [])
        elif t.network is not None:
            net = t.network
            group = network_group(net)
            if isinstance(group, Group):
                out += self.groups.get(group, [])
            base = int(net.network_address)
            for plen in self.prefix_lengths[net.version]:
                if plen <= net.prefixlen:
                    host_bits = net.max_prefixlen - plen
                    key = (net.version, plen, base >> host_bits << host_bits)
                    out += self.networks.get(key, [])
        elif t.is_name:
            out += self._name_keys(t.value)
        return sorted(set(out))[:MAX_CANDIDATES]

    def _name_keys(self, value: str) -> list[int]:
        out = list(self.names.get(value, []))
        name = value[1:] if value.startswith(".") else value
        for s in name_suffixes(name):
            out += self.names.get(s, [])
        return out

    def for_queries(self, rule: PolicyRule) -> list[int]:
        return sorted({*self.query_any, *self._name_keys(rule.target.value)})[:MAX_CANDIDATES]


def lint(config: NetworkConfig) -> list[LintWarning]:
    """Every finding about ``config``'s expanded rules, in rule order."""
    rules = expand(config)
    n_preset = len(preset_rules(config))
    out: list[LintWarning] = []
    if config.policy is NetworkPolicyPreset.NONE and config.rules:
        for i in range(n_preset, len(rules)):
            out.append(
                LintWarning(
                    i,
                    f"rule {i} ({describe_rule(rules[i])}) never applies: policy 'none' gives "
                    "the sandbox no network interface",
                    NO_INTERFACE,
                )
            )
        return out
    seen = _Candidates()
    for i, rule in enumerate(rules):
        out.extend(_lint_rule(i, rule, rules, n_preset, seen))
        seen.add(i, rule)
    return out


def _who(j: int, rule: PolicyRule, n_preset: int) -> str:
    owner = "the preset's rule" if j < n_preset else "rule"
    return f"{owner} {j} ({describe_rule(rule)})"


def _lint_rule(
    i: int, rule: PolicyRule, rules: tuple[PolicyRule, ...], n_preset: int, seen: _Candidates
) -> list[LintWarning]:
    out: list[LintWarning] = []
    this = f"rule {i} ({describe_rule(rule)})"
    protos = _protocols(rule)
    icmp = {p for p in protos if p.is_icmp}
    if rule.port_ranges and icmp:
        if icmp == protos and rule.target.is_name and rule.applies_to(PolicyDirection.EGRESS):
            out.append(
                LintWarning(
                    i,
                    f"{this} never matches a flow: ICMP has no ports, so drop the ports (it "
                    "still decides DNS queries for its names, whatever its protocols)",
                    ICMP_PORTS_FLOWS,
                )
            )
        elif icmp == protos:
            out.append(
                LintWarning(
                    i, f"{this} never matches: ICMP has no ports, so drop the ports", ICMP_PORTS
                )
            )
            return out
        if rule.protocol_set:
            out.append(
                LintWarning(
                    i,
                    f"{this}: its ICMP half never matches, because ICMP has no ports",
                    ICMP_PORTS_PARTIAL,
                )
            )
    if rule.direction is PolicyDirection.ANY and rule.protocol_set and icmp:
        out.append(
            LintWarning(
                i,
                f"{this}: its ingress half never matches ICMP (the host has no inbound ICMP "
                "path); use direction 'egress'",
                ICMP_ANY,
            )
        )
    t = rule.target
    if t.is_name and rule.direction is not PolicyDirection.EGRESS:
        out.append(
            LintWarning(
                i,
                f"{this}: for inbound traffic a name matches only a peer whose address this "
                "sandbox itself resolved for it (and, if the connection reveals a name, that "
                "name); allow inbound peers by address instead",
                INGRESS_NAMES,
            )
        )
    if t.network is not None and network_group(t.network) is None:
        out.append(
            LintWarning(
                i,
                f"{this} never matches: {t.value} is in no group (unspecified, broadcast or "
                "reserved) and is always denied",
                NO_GROUP,
            )
        )
        return out
    for j in seen.for_flows(rule):
        earlier = rules[j]
        if not (_directions_covered(earlier, rule) and _traffic_covered(earlier, rule)):
            continue
        contains, assumes_no_host = _destination_contains(earlier, rule)
        if not contains:
            continue
        if (
            t.is_name
            and rule.applies_to(PolicyDirection.EGRESS)
            and not any(_query_shadowed(rules[k], rule) for k in seen.for_queries(rule))
        ):
            continue  # still decides DNS queries for its names
        caveat = (
            " (assuming none of its addresses is the host's, which would be group 'host')"
            if assumes_no_host
            else ""
        )
        if _counts_for_rebind(rule) and not _counts_for_rebind(earlier):
            out.append(
                LintWarning(
                    i,
                    f"{this} never matches a flow: {_who(j, earlier, n_preset)} comes first and "
                    f"matches every flow it would{caveat}; it still decides DNS rebind "
                    "protection for its addresses",
                    SHADOWED_FLOWS,
                )
            )
            return out
        out.append(
            LintWarning(
                i,
                f"{this} never matches: {_who(j, earlier, n_preset)} comes first and matches "
                f"everything it would{caveat}",
                SHADOWED,
            )
        )
        return out
    if t.is_name and rule.applies_to(PolicyDirection.EGRESS):
        for j in seen.for_queries(rule):
            if _query_shadowed(rules[j], rule):
                if rules[j].action == rule.action:
                    break  # the same answer either way: nothing a user would want to hear
                hint = (
                    "; to refuse names use deny_domains / deny_domain_suffixes"
                    if rule.action is PolicyAction.DENY
                    else ""
                )
                out.append(
                    LintWarning(
                        i,
                        f"{this} never decides a DNS query: {_who(j, rules[j], n_preset)} "
                        f"answers every query for its names first{hint}",
                        DNS_SHADOWED,
                    )
                )
                break
    return out
