"""The compiled matcher: first-match-wins over thousands of rules at near-constant cost.

First-match-wins means "the lowest-index rule that matches". The rules are split by what
their destination keys on, and every split is an index that returns, for a flow, the lowest
index among its rules that match:

* one table per (direction, protocol): a rule goes into the tables of every direction it
  applies to and every protocol it admits, so protocol never needs checking at decision time;
* in a table, per kind: ``*`` (one bucket), groups (dict group -> bucket), CIDRs and IPs
  (per prefix length present, dict network-number -> bucket, over unmapped addresses: at
  most 33 + 129 lookups, in practice the handful of prefix lengths the policy uses), exact
  domains (dict name -> bucket), suffixes (dict suffix -> bucket, probed with each label
  suffix of a name);
* a bucket holds every rule of one key and answers "lowest index admitting port P" with a
  precomputed interval map: the distinct port-range boundaries of the bucket, and for each
  elementary interval the lowest index of a rule covering it (rules without ports cover
  everything). So a port-restricted low rule never hides a higher rule that admits the port,
  and the cost is one bisect whatever the bucket's size.

The decision is the minimum over the kinds; an index that cannot beat the best so far is
skipped (each prefix-length map remembers its lowest index). ``corral.policy.reference``
is the obviously-correct evaluator the property tests hold this one to.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from corral.config import PolicyAction, PolicyRule
from corral.config.values import DestinationKind, Group

#: "No rule matched": larger than any rule index, so ``min`` needs no special case.
NO_MATCH = 1 << 62

Ranges = tuple[tuple[int, int], ...]
#: (lowest index of a rule without ports, interval starts or None, lowest index per interval)
Bucket = tuple[int, list[int] | None, list[int] | None]


def build_bucket(entries: Sequence[tuple[int, Ranges]]) -> Bucket:
    """The bucket of one key from its (rule index, port ranges) entries, in index order."""
    portless = NO_MATCH
    for index, ranges in entries:
        if not ranges:
            portless = index
            break
    restricted = [(i, r) for i, r in entries if r and i < portless]
    if not restricted:
        return (portless, None, None)
    points = sorted(
        {lo for _, r in restricted for lo, _ in r} | {hi + 1 for _, r in restricted for _, hi in r}
    )
    n = len(points)
    lowest = [portless] * n  # interval k is [points[k], points[k + 1])
    # "next interval not yet painted" with path halving, so painting k ranges over n
    # intervals costs about k + n, not k * n, whatever the overlaps.
    following = list(range(n + 1))

    def unpainted_from(k: int) -> int:
        while following[k] != k:
            following[k] = following[following[k]]
            k = following[k]
        return k

    for index, ranges in restricted:  # ascending index: the first to paint an interval wins
        for lo, hi in ranges:
            end = bisect_left(points, hi + 1)
            k = unpainted_from(bisect_left(points, lo))
            while k < end:
                lowest[k] = index
                following[k] = k + 1
                k = unpainted_from(k + 1)
    return (portless, points, lowest)


def bucket_lookup(bucket: Bucket, port: int | None) -> int:
    """Lowest index in ``bucket`` admitting ``port`` (None: ICMP, only rules without ports)."""
    portless, points, lowest = bucket
    if points is None or port is None:
        return portless
    i = bisect_right(points, port)
    return lowest[i - 1] if i else portless  # type: ignore[index]


@dataclass(slots=True)
class PrefixMaps:
    """CIDR and IP rules of one address family: one dict per prefix length present."""

    bits: int
    #: (host bits to shift away, network number -> bucket, lowest index in the map)
    maps: list[tuple[int, dict[int, Bucket], int]] = field(default_factory=list)

    def lookup(self, ip: int, port: int | None, best: int) -> int:
        for shift, by_net, lowest in self.maps:  # sorted by lowest index
            if lowest >= best:
                break
            b = by_net.get(ip >> shift)
            if b is not None:
                r = bucket_lookup(b, port)
                if r < best:
                    best = r
        return best


def _prefix_maps(
    bits: int,
    entries: dict[tuple[int, int], list[tuple[int, Ranges]]],
    cache: BucketCache | None = None,
) -> PrefixMaps:
    by_len: dict[int, dict[int, Bucket]] = defaultdict(dict)
    lows: dict[int, int] = {}
    for (plen, net), es in entries.items():
        by_len[plen][net] = cache.get(es) if cache is not None else build_bucket(es)
        lows[plen] = min(lows.get(plen, NO_MATCH), es[0][0])
    maps = sorted(((bits - plen, m, lows[plen]) for plen, m in by_len.items()), key=lambda t: t[2])
    return PrefixMaps(bits, maps)


@dataclass(slots=True)
class Table:
    """Every rule of one direction that admits one protocol, indexed by destination kind."""

    any: Bucket | None
    groups: dict[Group, Bucket]
    v4: PrefixMaps
    v6: PrefixMaps
    domains: dict[str, Bucket]
    deny_domains: dict[str, Bucket]
    suffixes: dict[str, Bucket]
    deny_suffixes: dict[str, Bucket]
    has_names: bool = False  # any domain or suffix rule: only then are names normalised

    def __post_init__(self) -> None:
        self.has_names = bool(self.domains or self.suffixes)


def network_key(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[int, int]:
    """(prefix length, network number) of an unmapped network, as the prefix maps key it."""
    host_bits = net.max_prefixlen - net.prefixlen
    return net.prefixlen, int(net.network_address) >> host_bits


# Where a rule goes in a table (computed once per rule, reused by every table it joins).
SLOT_ANY, SLOT_GROUP, SLOT_V4, SLOT_V6, SLOT_DOMAIN, SLOT_SUFFIX = range(6)


@dataclass(frozen=True, slots=True)
class KeyedRule:
    """A rule reduced to what the tables need: its index, slot, key and port ranges."""

    index: int
    slot: int
    key: object  # Group, (prefix length, network number), or a name
    ranges: Ranges
    deny: bool


def keyed(index: int, rule: PolicyRule) -> KeyedRule:
    target = rule.target
    kind = target.kind
    key: object = target.value
    if kind is DestinationKind.ANY:
        slot = SLOT_ANY
    elif kind is DestinationKind.GROUP:
        slot, key = SLOT_GROUP, target.group
    elif kind is DestinationKind.CIDR or kind is DestinationKind.IP:
        net = target.network
        assert net is not None
        slot, key = (SLOT_V4 if net.version == 4 else SLOT_V6), network_key(net)
    elif kind is DestinationKind.DOMAIN:
        slot = SLOT_DOMAIN
    else:
        slot = SLOT_SUFFIX
    return KeyedRule(index, slot, key, rule.port_ranges, rule.action is PolicyAction.DENY)


class BucketCache:
    """Buckets by their entries: a rule admitting every protocol lands in four tables with
    the same entries, and building each bucket once keeps a 100,000-rule compile short."""

    def __init__(self) -> None:
        self._built: dict[tuple[tuple[int, Ranges], ...], Bucket] = {}

    def get(self, entries: list[tuple[int, Ranges]]) -> Bucket:
        if len(entries) == 1:
            index, ranges = entries[0]
            if not ranges:
                return (index, None, None)
        k = tuple(entries)
        b = self._built.get(k)
        if b is None:
            b = self._built[k] = build_bucket(entries)
        return b


def build_table(rules: Iterable[KeyedRule], cache: BucketCache | None = None) -> Table:
    """The table of the given rules, which must come in index order."""
    cache = cache or BucketCache()
    by_slot: list[dict[object, list[tuple[int, Ranges]]]] = [defaultdict(list) for _ in range(6)]
    deny_domains: dict[object, list[tuple[int, Ranges]]] = defaultdict(list)
    deny_suffixes: dict[object, list[tuple[int, Ranges]]] = defaultdict(list)
    for r in rules:
        entry = (r.index, r.ranges)
        by_slot[r.slot][r.key].append(entry)
        if r.deny:
            if r.slot == SLOT_DOMAIN:
                deny_domains[r.key].append(entry)
            elif r.slot == SLOT_SUFFIX:
                deny_suffixes[r.key].append(entry)

    def buckets(d: dict[object, list[tuple[int, Ranges]]]) -> dict[Any, Bucket]:
        return {k: cache.get(es) for k, es in d.items()}

    any_entries = by_slot[SLOT_ANY].get("*")
    return Table(
        any=cache.get(any_entries) if any_entries else None,
        groups=buckets(by_slot[SLOT_GROUP]),
        v4=_prefix_maps(32, by_slot[SLOT_V4], cache),  # type: ignore[arg-type]
        v6=_prefix_maps(128, by_slot[SLOT_V6], cache),  # type: ignore[arg-type]
        domains=buckets(by_slot[SLOT_DOMAIN]),
        deny_domains=buckets(deny_domains),
        suffixes=buckets(by_slot[SLOT_SUFFIX]),
        deny_suffixes=buckets(deny_suffixes),
    )


@dataclass(slots=True)
class AddressIndex:
    """Lowest index of a rule whose address destination (group, CIDR, IP) holds an address.

    Protocol and port play no part: it answers the rebind question ("which address rule
    comes first for this address?").
    """

    groups: dict[Group, int]
    v4: PrefixMaps
    v6: PrefixMaps

    @classmethod
    def build(cls, rules: Iterable[tuple[int, PolicyRule]]) -> AddressIndex:
        groups: dict[Group, int] = {}
        v4: dict[tuple[int, int], list[tuple[int, Ranges]]] = defaultdict(list)
        v6: dict[tuple[int, int], list[tuple[int, Ranges]]] = defaultdict(list)
        for index, rule in rules:
            target = rule.target
            if target.kind is DestinationKind.GROUP:
                assert target.group is not None
                groups.setdefault(target.group, index)
            elif target.network is not None:
                net = target.network
                (v4 if net.version == 4 else v6)[network_key(net)].append((index, ()))
        return cls(groups, _prefix_maps(32, v4), _prefix_maps(128, v6))

    def lookup(self, ip: int, is_v4: bool, group: Group) -> int:
        best = self.groups.get(group, NO_MATCH)
        return (self.v4 if is_v4 else self.v6).lookup(ip, None, best)
