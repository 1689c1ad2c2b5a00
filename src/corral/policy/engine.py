"""The first-match-wins policy engine: "may this flow pass, and by which rule?" (SPEC 4).

``Policy.compile(config, host_addresses=...)`` expands the preset, builds the compiled
matcher (``corral.policy.matcher``) and answers three questions, each with the deciding
rule's index in the expanded list (preset rules first) and a sentence saying why:

* ``decide(flow)``: an IP flow (connection, UDP flow, ICMP echo) in one direction;
* ``decide_query(name, transport)``: a DNS question from the sandbox;
* ``rebind_allowed(address)``: may a DNS answer carry this private/local address?

Pure and immutable: the data path compiles a policy once per sandbox (again when the host's
addresses change) and calls it from any task.
"""

from __future__ import annotations

import gc
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from corral.config import (
    NetworkConfig,
    PolicyAction,
    PolicyDirection,
    PolicyProtocol,
    PolicyRule,
)
from corral.config.network import DNS_PORT as DNS_PORT  # re-exported (the query's port)
from corral.config.values import DestinationKind, Group, IPAddress
from corral.policy.describe import describe_rule
from corral.policy.groups import HostAddresses, classify_int
from corral.policy.matcher import (
    NO_MATCH,
    AddressIndex,
    BucketCache,
    Ranges,
    Table,
    bucket_lookup,
    build_table,
    keyed,
)
from corral.policy.names import name_suffixes, normalize_name, suffix_matches
from corral.policy.presets import DNS_RULE, defaults, expand, preset_rules

_V4 = ipaddress.IPv4Address
_MAPPED_PREFIX = 0xFFFF
_V4_ALL_ONES = 0xFFFFFFFF

_DIRECTIONS = (PolicyDirection.EGRESS, PolicyDirection.INGRESS)
_NAME_KINDS = (DestinationKind.DOMAIN, DestinationKind.SUFFIX)


@dataclass(frozen=True, slots=True)
class Flow:
    """One flow as the data path sees it.

    ``address``: the destination (egress) or the peer (ingress); ``port``: the destination
    port (egress) or the guest port (ingress), None for ICMP; ``names``: the names this
    sandbox's resolver returned for ``address`` (its pin set); ``sni``: the name the
    connection revealed (TLS SNI, HTTP Host, :authority), None if it revealed none.
    """

    direction: PolicyDirection
    protocol: PolicyProtocol
    address: IPAddress
    port: int | None = None
    names: frozenset[str] = frozenset()
    sni: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer: what to do, which rule said so (index into ``Policy.rules``; None when
    a default or a deny list decided), and a sentence saying why."""

    action: PolicyAction
    rule: int | None
    reason: str

    @property
    def allowed(self) -> bool:
        return self.action is PolicyAction.ALLOW

    def to_dict(self) -> dict[str, object]:
        return {"action": str(self.action), "rule": self.rule, "reason": self.reason}


class Policy:
    """A compiled NetworkConfig policy (see the module docstring)."""

    __slots__ = (
        "_decisions",
        "_defaults",
        "_deny_domains",
        "_deny_names",
        "_deny_suffixes",
        "_names_rules",
        "_q_any",
        "_q_default",
        "_q_domains",
        "_q_suffixes",
        "_rebind",
        "_tables",
        "config",
        "default_egress",
        "default_ingress",
        "host",
        "rules",
    )

    def __init__(self, config: NetworkConfig, host: HostAddresses) -> None:
        self.config = config
        self.host = host
        self.rules: tuple[PolicyRule, ...] = expand(config)
        self.default_egress, self.default_ingress = defaults(config)
        self._decisions: list[Decision | None] = [None] * len(self.rules)
        # Built once: a decision per flow must not allocate (with 100,000 rules compiled,
        # every allocation-triggered garbage collection walks millions of objects).
        self._defaults = {
            d: Decision(a, None, f"no rule matched; default {d} {a}")
            for d, a in (
                (PolicyDirection.EGRESS, self.default_egress),
                (PolicyDirection.INGRESS, self.default_ingress),
            )
        }
        self._tables: dict[PolicyDirection, dict[PolicyProtocol, Table]] = {}
        per_direction = {
            d: [(i, r) for i, r in enumerate(self.rules) if r.applies_to(d)] for d in _DIRECTIONS
        }
        keys = [keyed(i, r) for i, r in enumerate(self.rules)]
        cache = BucketCache()
        for d in _DIRECTIONS:
            self._tables[d] = {
                p: build_table(
                    (
                        keys[i]
                        for i, r in per_direction[d]
                        if not r.protocol_set or p in r.protocol_set
                    ),
                    cache,
                )
                for p in PolicyProtocol
            }
        self._build_query_index(per_direction[PolicyDirection.EGRESS])
        # For the first-bytes stage: which rules can a revealed name change the outcome by?
        self._names_rules = frozenset(
            i for i, r in enumerate(self.rules) if r.target.kind in _NAME_KINDS
        )
        self._deny_names: dict[PolicyDirection, dict[PolicyProtocol, tuple[tuple[int, Ranges], ...]]] = {
            d: {
                p: tuple(
                    (i, r.port_ranges)
                    for i, r in per_direction[d]
                    if r.target.kind in _NAME_KINDS
                    and r.action is PolicyAction.DENY
                    and (not r.protocol_set or p in r.protocol_set)
                )
                for p in PolicyProtocol
            }
            for d in _DIRECTIONS
        }
        # Rebind: allow rules count whatever their protocols/ports (they explicitly allow
        # the address for something); deny rules only when they deny it for everything. The
        # presets' "allow host udp,tcp 53" is there to reach the sandbox's own resolver, not
        # to keep the host's addresses in DNS answers: it does not count.
        n_preset = len(preset_rules(config))
        self._rebind = AddressIndex.build(
            (i, r)
            for i, r in per_direction[PolicyDirection.EGRESS]
            if r.target.is_address
            and not (i < n_preset and r == DNS_RULE)
            and (r.action is PolicyAction.ALLOW or (not r.protocol_set and not r.port_ranges))
        )

    def _build_query_index(self, egress: list[tuple[int, PolicyRule]]) -> None:
        self._q_domains: dict[str, int] = {}
        self._q_suffixes: dict[str, int] = {}
        self._q_any: dict[PolicyProtocol, int] = {
            PolicyProtocol.UDP: NO_MATCH,
            PolicyProtocol.TCP: NO_MATCH,
        }
        for i, r in egress:
            t = r.target
            if t.kind is DestinationKind.DOMAIN:
                self._q_domains.setdefault(t.value, i)
            elif t.kind is DestinationKind.SUFFIX:
                self._q_suffixes.setdefault(t.value, i)
            elif t.kind is DestinationKind.ANY or t.group is Group.HOST:
                for transport in (PolicyProtocol.UDP, PolicyProtocol.TCP):
                    if self._q_any[transport] != NO_MATCH:
                        continue
                    if r.protocol_set and transport not in r.protocol_set:
                        continue
                    if r.port_ranges and not any(lo <= DNS_PORT <= hi for lo, hi in r.port_ranges):
                        continue
                    self._q_any[transport] = i
        self._deny_domains = {d: i for i, d in reversed(list(enumerate(self.config.deny_domains)))}
        self._deny_suffixes = {
            s: i for i, s in reversed(list(enumerate(self.config.deny_domain_suffixes)))
        }
        self._q_default = Decision(
            self.default_egress,
            None,
            f"no rule matched the query; default egress {self.default_egress}",
        )

    @classmethod
    def compile(cls, config: NetworkConfig, *, host_addresses: Iterable[IPAddress] = ()) -> Policy:
        """Compile ``config``; ``host_addresses``: the sandbox's gateway addresses and every
        address configured on the host (group ``host``)."""
        # Compiling 100,000 rules creates a few hundred thousand containers, and each
        # full collection the allocations trigger walks all of them: a third of the compile
        # time. Nothing built here forms a cycle, so collection can wait until we are done.
        collecting = gc.isenabled()
        gc.disable()
        try:
            return cls(config, HostAddresses.of(host_addresses))
        finally:
            if collecting:
                gc.enable()

    # -- answers -------------------------------------------------------------------------
    def _rule_decision(self, index: int) -> Decision:
        d = self._decisions[index]
        if d is None:
            rule = self.rules[index]
            d = Decision(
                PolicyAction(rule.action), index, f"rule {index} ({describe_rule(rule)}) matched"
            )
            self._decisions[index] = d
        return d

    def default_decision(self, direction: PolicyDirection) -> Decision:
        return self._defaults[direction]

    def classify(self, address: IPAddress) -> Group | None:
        """The address's group, with this policy's host addresses."""
        return classify_int(int(address), type(address) is _V4, self.host)

    def _classified(self, address: IPAddress) -> tuple[int, bool, Group | None]:
        """The address as the indexes key it (IPv4-mapped IPv6 as its IPv4), and its group."""
        ip = int(address)
        is_v4 = type(address) is _V4
        if not is_v4 and ip >> 32 == _MAPPED_PREFIX:
            ip &= _V4_ALL_ONES
            is_v4 = True
        return ip, is_v4, classify_int(ip, is_v4, self.host)

    def decide(self, flow: Flow) -> Decision:
        """First-match-wins over the rules of the flow's direction; else that direction's
        default. An address in no group is denied whatever the rules say."""
        try:
            table = self._tables[flow.direction][flow.protocol]
        except KeyError:
            raise ValueError(
                f"flow direction must be egress or ingress, not {flow.direction!r}"
            ) from None
        address = flow.address
        ip, is_v4, group = self._classified(address)
        if group is None:
            return Decision(
                PolicyAction.DENY,
                None,
                f"{address} is in no group (unspecified/broadcast/reserved) and is always denied",
            )
        port = flow.port
        best = NO_MATCH
        b = table.any
        if b is not None:
            best = bucket_lookup(b, port)
        b = table.groups.get(group)
        if b is not None:
            r = bucket_lookup(b, port)
            if r < best:
                best = r
        prefixes = table.v4 if is_v4 else table.v6
        if prefixes.maps:
            best = prefixes.lookup(ip, port, best)
        if (flow.names or flow.sni is not None) and table.has_names:
            best = self._names_lookup(table, flow, port, best)
        if best == NO_MATCH:
            return self.default_decision(flow.direction)
        return self._rule_decision(best)

    @staticmethod
    def _names_lookup(table: Table, flow: Flow, port: int | None, best: int) -> int:
        """Domain and suffix rules. Allow rules need a pinned name AND (when the connection
        revealed one) the revealed name to match; deny rules also match the revealed name
        alone (SPEC 4)."""
        names = {normalize_name(n) for n in flow.names}
        sni = normalize_name(flow.sni) if flow.sni is not None else None
        domains, suffixes = table.domains, table.suffixes
        if sni is not None:
            b = (domains if sni in names else table.deny_domains).get(sni)
            if b is not None:
                r = bucket_lookup(b, port)
                if r < best:
                    best = r
            if suffixes:
                for s in name_suffixes(sni):
                    pinned = any(suffix_matches(s, n) for n in names)
                    b = (suffixes if pinned else table.deny_suffixes).get(s)
                    if b is not None:
                        r = bucket_lookup(b, port)
                        if r < best:
                            best = r
            return best
        for n in names:
            b = domains.get(n)
            if b is not None:
                r = bucket_lookup(b, port)
                if r < best:
                    best = r
            if suffixes:
                for s in name_suffixes(n):
                    b = suffixes.get(s)
                    if b is not None:
                        r = bucket_lookup(b, port)
                        if r < best:
                            best = r
        return best

    def deny_listed(self, name: str) -> Decision | None:
        """The deny decision of ``deny_domains`` / ``deny_domain_suffixes`` for ``name``
        (exact name; a suffix's apex and every subdomain), or None. Used for DNS questions
        and for the names connections reveal (SPEC 4)."""
        if not self._deny_domains and not self._deny_suffixes:
            return None
        q = normalize_name(name)
        i = self._deny_domains.get(q)
        if i is not None:
            return Decision(PolicyAction.DENY, None, f"{q} is refused by deny_domains[{i}] ({q})")
        if self._deny_suffixes:
            for s in (f".{q}", *name_suffixes(q)):
                i = self._deny_suffixes.get(s)
                if i is not None:
                    return Decision(
                        PolicyAction.DENY,
                        None,
                        f"{q} is refused by deny_domain_suffixes[{i}] ({s})",
                    )
        return None

    @property
    def has_deny_lists(self) -> bool:
        return bool(self._deny_domains or self._deny_suffixes)

    def name_could_change(self, flow: Flow, decision: Decision) -> bool:
        """Whether a name the connection has not revealed yet (``flow.sni`` None) could
        change ``decision`` (what ``decide(flow)`` said with the pins alone).

        True when the deciding rule is a domain/suffix rule (a revealed name that does not
        match un-matches it), or when the flow is allowed and a deny domain/suffix rule that
        admits its port comes before the deciding rule, or deny lists exist (a revealed name
        alone can match those). A denial by any other rule or default cannot become an allow:
        allow domain rules that did not match need a pinned name, which no revealed name
        adds.
        """
        if decision.rule is not None and decision.rule in self._names_rules:
            return True
        if not decision.allowed:
            return False
        if self.has_deny_lists:
            return True
        bound = NO_MATCH if decision.rule is None else decision.rule
        port = flow.port
        for index, ranges in self._deny_names[flow.direction][flow.protocol]:
            if index >= bound:
                break
            if not ranges or (port is not None and any(lo <= port <= hi for lo, hi in ranges)):
                return True
        return False

    def decide_query(self, name: str, transport: PolicyProtocol = PolicyProtocol.UDP) -> Decision:
        """A DNS question for ``name`` over ``transport`` (UDP or TCP, port 53).

        deny_domains / deny_domain_suffixes first; then egress rules in order: domain and
        suffix rules match on the name whatever their protocols and ports, ``*`` and
        ``host`` rules when they admit the transport on port 53, address rules never.
        """
        denied = self.deny_listed(name)
        if denied is not None:
            return denied
        q = normalize_name(name)
        best = self._q_any.get(transport, NO_MATCH)
        r = self._q_domains.get(q, NO_MATCH)
        if r < best:
            best = r
        if self._q_suffixes:
            for s in name_suffixes(q):
                r = self._q_suffixes.get(s, NO_MATCH)
                if r < best:
                    best = r
        if best == NO_MATCH:
            return self._q_default
        return self._rule_decision(best)

    def rebind_allowed(self, address: IPAddress) -> bool:
        """Whether the first egress address rule (group, CIDR, IP) holding ``address``
        explicitly allows it, so rebind protection keeps it in a DNS answer.

        Reading of SPEC 4 (docs/policy.md): ``*`` and domain rules are not address rules
        and do not count, nor does the default; an allow rule counts whatever protocols
        and ports it names; a deny rule counts only when it names no protocol and no port
        (a deny of one port does not deny the address). An address in no group: never.
        """
        ip, is_v4, group = self._classified(address)
        if group is None:
            return False
        best = self._rebind.lookup(ip, is_v4, group)
        return best != NO_MATCH and self.rules[best].action is PolicyAction.ALLOW
