"""Certain denials decided by nftables, before the handshake: the guest's connect() fails with
ECONNREFUSED instead of succeeding and then being reset by the proxy.

Without this, every guest TCP SYN is TPROXYed to the proxy, the kernel completes the
handshake, and only then does the proxy ask the policy: a denied flow looks open (``nc -z``
says every port is open, a happy-eyeballs client that "connected" over a denied IPv6 path
never falls back to IPv4, clients see ECONNRESET on the first read).

:func:`compile_prefilter` walks the expanded egress rules in first-match-wins order and turns
them into :class:`Check` s while they decide by address alone (``*``, groups, CIDRs, IPs):

- a deny rule becomes a reject (TCP: ``reject with tcp reset``, the guest's connect() gets
  ECONNREFUSED; UDP: ICMP port-unreachable, which Linux reports as ECONNREFUSED on a
  connected UDP socket, where admin-prohibited would be EHOSTUNREACH / EACCES);
- an allow rule becomes "pass": stop prefiltering and divert to the proxy, which decides
  again, fully. The prefilter only ever short-circuits denials, so it can never allow
  anything the gate would deny;
- a rule whose match can depend on names (domain and suffix rules) becomes "pass when the
  address is pinned": the sandbox's DNS interceptor adds every address it answered with to
  the nft sets ``pf_pinned4``/``pf_pinned6`` (with the pin's lifetime as the element's
  timeout) before the answer leaves, so a flow to a pinned address goes to the proxy, which
  decides with the names. An address no name pinned cannot match an allow domain rule (it
  needs a pin), and a deny domain rule can only deny it (by a revealed name), so for it the
  prefilter goes on with the next rules: under a name-allow policy a connection to an
  address never resolved is refused before the handshake. The default egress action closes
  the list (deny: reject). ``complete`` is False only when :data:`MAX_CHECKS` cut it short.

Before the rules come the data path's own certain denials (:mod:`corral.policy.verdict`):
DNS over TLS (TCP 853) while TLS interception is off, another sandbox's address (the pools,
less this sandbox's gateway) and the addresses in no group. (Port 53 never reaches the
prefilter: the firewall diverts it to the DNS interceptor first.) IPv6 destinations whose group
depends on an embedded IPv4 address (``::ffff:0:0/96``, NAT64) are passed to the proxy.

Groups become nft interval sets derived from the policy module's one table of address
classes (:data:`corral.policy.groups.TABLE`, through its ``group_intervals``) with the
policy's host addresses, so there is one place that classifies.

:func:`evaluate` is the reference reading of a :class:`Prefilter` (what the nft rules do);
the property tests hold it to the gate's decisions. :func:`render` turns it into nft text
for :mod:`corral.net.firewall`. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Container, Sequence
from dataclasses import dataclass

from corral.config import PolicyAction, PolicyDirection, PolicyProtocol, PolicyRule
from corral.config.values import DestinationKind, Group
from corral.policy import groups as policy_groups
from corral.policy import verdict
from corral.policy.describe import describe_rule
from corral.policy.groups import EMBEDDING_V4, HostAddresses, merge_intervals, subtract_interval
from corral.policy.pins import MAX_PINS

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Intervals = tuple[tuple[int, int], ...]

#: At most this many checks are emitted; past it the prefilter stops and the proxy decides
#: the rest. nft evaluates a chain linearly per new packet, so a policy of 100,000 CIDR rules
#: would cost every SYN (allowed ones too) far more than the proxy's indexed matcher does;
#: 2,000 keeps the worst case of a SYN in the tens of microseconds and the table load fast.
MAX_CHECKS = 2000

#: The L4 protocols the prefilter decides (ICMP echo has its own relay).
PROTOCOLS = ("tcp", "udp")
_PROTOCOL_OF = {"tcp": PolicyProtocol.TCP, "udp": PolicyProtocol.UDP}

#: Elements per pinned set at most: twice the PinSet's own bound, so the kernel set never
#: refuses an address the PinSet holds (an element outlives its pin only by the set's GC lag).
PINNED_SET_SIZE = 2 * MAX_PINS

_V6_DELEGATED = EMBEDDING_V4  # ::ffff:0:0/96 and NAT64

OTHER_SANDBOX = verdict.OTHER_SANDBOX
#: Names of the dynamic sets of pinned addresses, per family.
PINNED_SETS = {4: "pinned4", 6: "pinned6"}
PINNED_REASON = "pinned by the sandbox's DNS: the proxy decides with the names"
NO_GROUP = "the address is in no group (unspecified/broadcast/reserved) and is always denied"


@dataclass(frozen=True, slots=True)
class Check:
    """One nft rule of the prefilter chain.

    ``version``: 4 or 6, None for both; ``addresses``: a set name (key of
    :attr:`Prefilter.sets`), None for any address of the family; ``ports``: destination port
    ranges, empty for any; ``reject``: reject (else pass to the proxy); ``rule`` and
    ``reason``: what the audit event says when the kernel rejects.
    """

    version: int | None
    addresses: str | None
    protocols: tuple[str, ...]
    ports: tuple[tuple[int, int], ...]
    reject: bool
    rule: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class Prefilter:
    """The compiled prefilter: checks in order (first match wins), the address sets they
    name as (version, intervals), and whether the checks decide every flow (else the flows
    no check matched are passed to the proxy)."""

    checks: tuple[Check, ...]
    sets: dict[str, tuple[int, Intervals]]
    complete: bool
    default_reject: bool

    @property
    def uses_pins(self) -> bool:
        """Whether the checks consult the pinned sets (the DNS path must feed them)."""
        return any(c.addresses in PINNED_SETS.values() for c in self.checks)


# -- groups as intervals --------------------------------------------------------------------


def _span(text: str) -> tuple[int, int, int]:
    net = ipaddress.ip_network(text)
    return net.version, int(net.network_address), int(net.broadcast_address)


def group_intervals(host: HostAddresses) -> dict[tuple[int, Group | None], Intervals]:
    """Every address of each family by group, as disjoint sorted intervals, with the host's
    addresses at their place in ``classify``'s order; the IPv6 prefixes classified by an
    embedded IPv4 address are in no entry (the prefilter passes them to the proxy). Derived
    from the policy's own table (:func:`corral.policy.groups.group_intervals`)."""
    return policy_groups.group_intervals(host)


def _set_name(version: int, group: Group | None) -> str:
    return f"{'none' if group is None else group.value.replace('-', '_')}{version}"


# -- compiling --------------------------------------------------------------------------------


def compile_prefilter(
    rules: Sequence[PolicyRule],
    default_egress: PolicyAction,
    host: HostAddresses,
    *,
    pools: Sequence[IPNetwork],
    gateways: Sequence[IPAddress],
    ipv6: bool = True,
    max_checks: int = MAX_CHECKS,
    tls_interception: bool = False,
    connect_port: int | None = None,
) -> Prefilter:
    """The prefilter of an expanded rule list (``Policy.rules``, ``Policy.default_egress``,
    ``Policy.host``); ``pools`` and ``gateways`` as the gate has them."""
    versions = (4, 6) if ipv6 else (4,)
    sets: dict[str, tuple[int, Intervals]] = {}
    groups = group_intervals(host)
    for (version, group), intervals in groups.items():
        sets[_set_name(version, group)] = (version, intervals)
    for version in (4, 6):
        for group in (*Group, None):
            sets.setdefault(_set_name(version, group), (version, ()))
    sets["delegated6"] = (6, merge_intervals((lo, hi) for _, lo, hi in map(_span, _V6_DELEGATED)))
    gateway_ints = {(a.version, int(a)) for a in gateways}
    for version in (4, 6):
        spans: list[tuple[int, int]] = []
        for pool in pools:
            if pool.version != version:
                continue
            lo, hi = int(pool.network_address), int(pool.broadcast_address)
            gws = sorted((g, g) for v, g in gateway_ints if v == version and lo <= g <= hi)
            spans += subtract_interval(lo, hi, gws)
        sets[f"pools{version}"] = (version, merge_intervals(spans))

    both = tuple(PROTOCOLS)
    checks: list[Check] = [
        Check(6, "delegated6", both, (), False, None, "embedded IPv4: the proxy decides")
    ]
    if connect_port is not None:
        # corral's own CONNECT proxy on the gateway (TLS interception): the proxy decides
        # (it serves the gateway's port itself; any other host address there is decided as
        # usual, by the proxy instead of the kernel).
        for version in versions:
            checks.append(
                Check(version, _set_name(version, Group.HOST), ("tcp",),
                      ((connect_port, connect_port),), False, None, "the CONNECT proxy decides")
            )  # fmt: skip
    if not tls_interception:
        port = verdict.DOT_PORT
        checks.append(Check(None, None, ("tcp",), ((port, port),), True, None, verdict.DOT_REFUSED))
    for version in versions:
        sets[PINNED_SETS[version]] = (version, ())
    for version in versions:
        checks.append(Check(version, f"pools{version}", both, (), True, None, OTHER_SANDBOX))
        checks.append(Check(version, _set_name(version, None), both, (), True, None, NO_GROUP))
    complete = True
    for index, rule in enumerate(rules):
        if not rule.applies_to(PolicyDirection.EGRESS):
            continue
        protocols = tuple(
            p for p in PROTOCOLS if not rule.protocol_set or _PROTOCOL_OF[p] in rule.protocol_set
        )
        if not protocols:
            continue  # an ICMP-only rule never matches a TCP or UDP flow
        target = rule.target
        reject = rule.action is PolicyAction.DENY
        reason = f"rule {index} ({describe_rule(rule)}) matched"
        new: list[Check] = []
        if target.kind in (DestinationKind.DOMAIN, DestinationKind.SUFFIX):
            for version in versions:
                new.append(
                    Check(
                        version, PINNED_SETS[version], protocols, rule.port_ranges, False,
                        index, PINNED_REASON,
                    )  # fmt: skip
                )
        elif target.kind is DestinationKind.ANY:
            new.append(Check(None, None, protocols, rule.port_ranges, reject, index, reason))
        elif target.kind is DestinationKind.GROUP:
            for version in versions:
                name = _set_name(version, target.group)
                if sets[name][1]:
                    new.append(
                        Check(version, name, protocols, rule.port_ranges, reject, index, reason)
                    )
        else:
            net = target.network
            assert net is not None
            if net.version in versions:
                name = f"r{index}"
                sets[name] = (
                    net.version,
                    ((int(net.network_address), int(net.broadcast_address)),),
                )
                new.append(
                    Check(net.version, name, protocols, rule.port_ranges, reject, index, reason)
                )
        if len(checks) + len(new) > max_checks:
            complete = False
            break
        checks += new
    default_reject = complete and default_egress is PolicyAction.DENY
    used = {c.addresses for c in checks}
    sets = {k: v for k, v in sets.items() if k in used}
    return Prefilter(tuple(checks), sets, complete, default_reject)


# -- the reference reading ----------------------------------------------------------------------


_PINNED = frozenset(PINNED_SETS.values())


def _in(intervals: Intervals, value: int) -> bool:
    return any(lo <= value <= hi for lo, hi in intervals)


def match(
    prefilter: Prefilter,
    protocol: str,
    address: IPAddress,
    port: int,
    pinned: Container[IPAddress] = frozenset(),
) -> int | None:
    """Index of the check that decides a packet (as nft would), None when none does;
    ``pinned``: the addresses in the pinned sets."""
    version, value = address.version, int(address)
    for i, check in enumerate(prefilter.checks):
        if check.version is not None and check.version != version:
            continue
        if protocol not in check.protocols:
            continue
        if check.ports and not any(lo <= port <= hi for lo, hi in check.ports):
            continue
        if check.addresses in _PINNED:
            if address not in pinned:
                continue
        elif check.addresses is not None:
            set_version, intervals = prefilter.sets[check.addresses]
            if set_version != version or not _in(intervals, value):
                continue
        return i
    return None


def evaluate(
    prefilter: Prefilter,
    protocol: str,
    address: IPAddress,
    port: int,
    pinned: Container[IPAddress] = frozenset(),
) -> bool:
    """True when the kernel rejects this flow (address as on the wire), False when it passes
    it to the proxy; ``pinned``: the addresses in the pinned sets."""
    i = match(prefilter, protocol, address, port, pinned)
    if i is None:
        return prefilter.default_reject
    return prefilter.checks[i].reject


# -- nft text -------------------------------------------------------------------------------------


def _element(version: int, lo: int, hi: int) -> str:
    cls = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    return str(cls(lo)) if lo == hi else f"{cls(lo)}-{cls(hi)}"


def render_sets(prefilter: Prefilter) -> list[str]:
    """``set`` declarations (inside the table) for the sets the checks name."""
    out = []
    for name, (version, intervals) in prefilter.sets.items():
        if name.startswith("r"):
            continue  # a rule's own CIDR: matched inline
        kind = "ipv4_addr" if version == 4 else "ipv6_addr"
        if name in _PINNED:
            # Fed by the DNS interceptor; elements expire with their pins. The size bounds
            # the kernel's memory whatever the guest resolves (the PinSet evicts first).
            out.append(f"  set pf_{name} {{ type {kind}; flags timeout; size {PINNED_SET_SIZE}; }}")
            continue
        elements = ""
        if intervals:
            elements = (
                " elements = { "
                + ", ".join(_element(version, lo, hi) for lo, hi in intervals)
                + " };"
            )
        out.append(f"  set pf_{name} {{ type {kind}; flags interval;{elements} }}")
    return out


def _ports(ports: tuple[tuple[int, int], ...]) -> str:
    if not ports:
        return ""
    items = [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ports]
    return f" th dport {{ {', '.join(items)} }}"


def render_chain(prefilter: Prefilter, log_group: int | None) -> list[str]:
    """Rules of the ``prefilter`` chain (jumped to for new TCP/UDP packets of the guest):
    ``return`` passes to the divert, a reject is final. With ``log_group``, each rejected
    packet is first copied to that NFLOG group, prefix ``corral <check index>`` (the audit)."""
    lines: list[str] = []

    def verdict(reject: bool, index: int, protocol: str) -> str:
        if not reject:
            return "return"
        log = f'log prefix "corral {index}" group {log_group} ' if log_group is not None else ""
        how = "reject with tcp reset" if protocol == "tcp" else "reject with icmpx port-unreachable"
        return log + how

    for i, c in enumerate(prefilter.checks):
        family = ""
        if c.version is not None:
            family = (
                f"{'ip' if c.version == 4 else 'ip6'} daddr @pf_{c.addresses} "
                if c.addresses
                else f"meta nfproto ipv{c.version} "
            )
        if c.addresses is not None and c.addresses.startswith("r"):
            version, ((lo, hi),) = prefilter.sets[c.addresses]
            family = f"{'ip' if version == 4 else 'ip6'} daddr {_element(version, lo, hi)} "
        for protocol in c.protocols:
            lines.append(
                f"meta l4proto {protocol} {family}{_ports(c.ports).strip()} {verdict(c.reject, i, protocol)}".replace(
                    "  ", " "
                )
            )
    if prefilter.default_reject:
        n = len(prefilter.checks)
        for protocol in PROTOCOLS:
            lines.append(f"meta l4proto {protocol} {verdict(True, n, protocol)}")
    lines.append("return")
    return lines


def reason_of(prefilter: Prefilter, index: int) -> tuple[int | None, str]:
    """(rule, reason) of check ``index`` (``len(checks)``: the default deny)."""
    if index == len(prefilter.checks):
        return None, "no rule matched; default egress deny"
    c = prefilter.checks[index]
    return c.rule, c.reason
