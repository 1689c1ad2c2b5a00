"""Destination groups: the one place that says which group an address is in (SPEC section 4).

:data:`TABLE` is the address policy as data, an ordered list in the manner of smokescreen's
``classifyAddr``: an address is in the group of the first entry that holds it. Everything
that asks about groups derives from it: :func:`classify` / :func:`classify_int` (the policy
engine's flow and rebind decisions, the DNS resolver, ``corral policy explain``),
:func:`network_group` (the lint's "is this whole CIDR in group G?") and
:func:`group_intervals` (the kernel prefilter's nft interval sets). Nothing re-derives groups elsewhere; the unit tests check the table against the
SPEC's addresses, not against a second copy of it.

Order (an address lands in the first that holds it):

1. no group (always denied): the unspecified addresses (0.0.0.0, ::), the IPv4 limited
   broadcast 255.255.255.255, the rest of IPv4 "this network" 0.0.0.0/8 and the reserved
   240.0.0.0/4 (neither can be a destination of a real connection), and IPv6 ``::/96`` (the
   deprecated IPv4-compatible form, never routed) apart from ``::1``;
2. ``loopback``: 127.0.0.0/8, ::1 (the guest's own loopback: even when the caller lists the
   host's 127.0.0.1 among its addresses, a sandbox's 127.0.0.1 is not the host);
3. ``host``: the sandbox's gateway addresses and every address configured on the host;
4. ``metadata``: 169.254.169.254, fd00:ec2::254;
5. ``private``: 10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7, and the deprecated IPv6
   site-local fec0::/10 (it names the local site, so a sandbox must not treat it as public);
6. ``link-local``: 169.254/16, fe80::/10;
7. ``multicast``: 224/4, ff00::/8;
8. ``public``: every other address. Documentation and benchmarking ranges (192.0.2/24,
   198.51.100/24, 203.0.113/24, 198.18/15, 2001:db8::/32) are public: they are ordinary
   unicast addresses, and the hermetic test world serves from them.

IPv4-mapped IPv6 addresses (::ffff:a.b.c.d) are their IPv4 address everywhere. NAT64
addresses (64:ff9b::/96, RFC 6052) are classified by the IPv4 address they embed, because a
NAT64 gateway on the host's network turns them into exactly that address: without this,
``64:ff9b::a9fe:a9fe`` would be a "public" way to the metadata service. CIDR and IP rules
still see the NAT64 address as the IPv6 address it is.

How it runs: at import the table (less the host entry, whose addresses are known only per
policy) is resolved into a partition of each family's address space, sorted intervals that
each remember their group, whether the host's addresses come before it in the order, and
whether it embeds an IPv4 address. Classifying is then one ``bisect`` and at most one set
lookup (this runs per connection).
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from corral.config.values import Group, IPAddress, IPNetwork, unmap

_V4 = ipaddress.IPv4Address
_V4_ALL_ONES = 0xFFFFFFFF

#: Sorted, disjoint (first, last) integer intervals of one family.
Intervals = tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class Range:
    """One entry of :data:`TABLE`.

    ``cidr``: the addresses, or None for "the host's addresses" (known only per policy, see
    :class:`HostAddresses`); ``group``: their group (None: in no group, always denied);
    ``embeds_v4``: an IPv6 prefix whose addresses are classified as the IPv4 address in
    their low 32 bits (``group`` unused).
    """

    cidr: str | None
    group: Group | None
    embeds_v4: bool = False


#: The host's addresses, at their place in the order.
HOST_RANGE = Range(None, Group.HOST)

#: The address policy, in classification order (see the module docstring). What no entry
#: holds is ``public``.
TABLE: tuple[Range, ...] = (
    Range("::ffff:0:0/96", None, embeds_v4=True),  # IPv4-mapped
    Range("64:ff9b::/96", None, embeds_v4=True),  # NAT64 (RFC 6052)
    Range("0.0.0.0/8", None),
    Range("240.0.0.0/4", None),  # includes 255.255.255.255
    Range("::/128", None),
    Range("127.0.0.0/8", Group.LOOPBACK),
    Range("::1/128", Group.LOOPBACK),
    Range("::/96", None),  # IPv4-compatible, deprecated (RFC 4291 2.5.5.1)
    HOST_RANGE,
    Range("169.254.169.254/32", Group.METADATA),
    Range("fd00:ec2::254/128", Group.METADATA),
    Range("10.0.0.0/8", Group.PRIVATE),
    Range("172.16.0.0/12", Group.PRIVATE),
    Range("192.168.0.0/16", Group.PRIVATE),
    Range("100.64.0.0/10", Group.PRIVATE),
    Range("fc00::/7", Group.PRIVATE),
    Range("fec0::/10", Group.PRIVATE),
    Range("169.254.0.0/16", Group.LINK_LOCAL),
    Range("fe80::/10", Group.LINK_LOCAL),
    Range("224.0.0.0/4", Group.MULTICAST),
    Range("ff00::/8", Group.MULTICAST),
)

#: IPv6 prefixes whose addresses are classified by the IPv4 address they embed.
EMBEDDING_V4: tuple[str, ...] = tuple(r.cidr for r in TABLE if r.embeds_v4 and r.cidr)


def host_address_set(addresses: Iterable[IPAddress]) -> frozenset[IPAddress]:
    """The host's addresses, unmapped.

    Loopback addresses are dropped: "every address configured on the host" includes
    127.0.0.1 and ::1, but those, seen from a sandbox, are the guest's own loopback.
    """
    out = set()
    for a in addresses:
        a = unmap(a)
        if not a.is_loopback:
            out.add(a)
    return frozenset(out)


@dataclass(frozen=True, slots=True)
class HostAddresses:
    """The host's addresses as integers per family, for ``classify_int`` (hashing an int
    costs a tenth of hashing an ``ipaddress`` object, and this runs per connection)."""

    v4: frozenset[int] = frozenset()
    v6: frozenset[int] = frozenset()

    @classmethod
    def of(cls, addresses: Iterable[IPAddress]) -> HostAddresses:
        clean = host_address_set(addresses)
        return cls(
            frozenset(int(a) for a in clean if a.version == 4),
            frozenset(int(a) for a in clean if a.version == 6),
        )


NO_HOST = HostAddresses()


# -- the table, resolved -----------------------------------------------------------------------

_MAX = {4: (1 << 32) - 1, 6: (1 << 128) - 1}


@dataclass(frozen=True, slots=True)
class _Piece:
    """One interval of the resolved table: its addresses are in ``group`` unless the host
    has them and ``host_first`` (the host entry precedes this piece's entry)."""

    first: int
    last: int
    group: Group | None
    host_first: bool
    embeds_v4: bool


def subtract_interval(lo: int, hi: int, taken: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[lo, hi] less the sorted, disjoint ``taken`` intervals."""
    out: list[tuple[int, int]] = []
    cur = lo
    for t_lo, t_hi in taken:
        if t_hi < cur or t_lo > hi:
            continue
        if t_lo > cur:
            out.append((cur, t_lo - 1))
        cur = max(cur, t_hi + 1)
        if cur > hi:
            break
    if cur <= hi:
        out.append((cur, hi))
    return out


def merge_intervals(intervals: Iterable[tuple[int, int]]) -> Intervals:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


def _resolve(version: int) -> tuple[_Piece, ...]:
    """The family's whole address space cut into pieces, each in the first entry holding it."""
    pieces: list[_Piece] = []
    taken: list[tuple[int, int]] = []
    host_seen = False
    entries = [*TABLE, Range(f"{'0.0.0.0/0' if version == 4 else '::/0'}", Group.PUBLIC)]
    for entry in entries:
        if entry.cidr is None:
            host_seen = True
            continue
        net = ipaddress.ip_network(entry.cidr)
        if net.version != version:
            continue
        free = subtract_interval(int(net.network_address), int(net.broadcast_address), taken)
        pieces += [_Piece(lo, hi, entry.group, host_seen, entry.embeds_v4) for lo, hi in free]
        taken = list(merge_intervals([*taken, *free]))
    pieces.sort(key=lambda p: p.first)
    assert taken == [(0, _MAX[version])] and pieces[0].first == 0
    return tuple(pieces)


_PIECES = {4: _resolve(4), 6: _resolve(6)}
# Parallel tuples for the per-connection path (attribute access costs more than indexing).
_V4_STARTS = tuple(p.first for p in _PIECES[4])
_V4_GROUPS = tuple(p.group for p in _PIECES[4])
_V4_HOST_FIRST = tuple(p.host_first for p in _PIECES[4])
_V6_STARTS = tuple(p.first for p in _PIECES[6])
_V6_GROUPS = tuple(p.group for p in _PIECES[6])
_V6_HOST_FIRST = tuple(p.host_first for p in _PIECES[6])
_V6_EMBEDS = tuple(p.embeds_v4 for p in _PIECES[6])
_HOST = Group.HOST
_bisect = bisect.bisect_right


def classify_int(ip: int, is_v4: bool, host: HostAddresses = NO_HOST) -> Group | None:
    """``classify`` on an address as an integer (IPv4 when ``is_v4``, else IPv6)."""
    if not is_v4:
        i = _bisect(_V6_STARTS, ip) - 1
        if not _V6_EMBEDS[i]:
            if _V6_HOST_FIRST[i] and ip in host.v6:
                return _HOST
            return _V6_GROUPS[i]
        ip &= _V4_ALL_ONES
    i = _bisect(_V4_STARTS, ip) - 1
    if _V4_HOST_FIRST[i] and ip in host.v4:
        return _HOST
    return _V4_GROUPS[i]


def classify(
    address: IPAddress, host_addresses: Iterable[IPAddress] | HostAddresses = ()
) -> Group | None:
    """The group ``address`` is in, or None for an address in no group (always denied).

    ``host_addresses``: the host's addresses (any iterable, or a prepared HostAddresses;
    a compiled ``Policy`` has one and its ``classify`` method is the cheap way to ask).
    """
    host = (
        host_addresses
        if isinstance(host_addresses, HostAddresses)
        else HostAddresses.of(host_addresses)
    )
    return classify_int(int(address), type(address) is _V4, host)


def network_group(network: IPNetwork) -> Group | None | bool:
    """The group every address of ``network`` is in, when that is one group.

    Returns the group, None when every address is in no group, or False when the network
    mixes groups or touches a prefix whose group depends on an embedded IPv4 address.
    ``host`` is never returned: the host's addresses are not known here, so callers say
    what they assume.
    """
    lo, hi = int(network.network_address), int(network.broadcast_address)
    pieces = _PIECES[network.version]
    starts = _V4_STARTS if network.version == 4 else _V6_STARTS
    i = _bisect(starts, lo) - 1
    groups: set[Group | None] = set()
    while i < len(pieces) and pieces[i].first <= hi:
        if pieces[i].embeds_v4:
            return False
        groups.add(pieces[i].group)
        i += 1
    return groups.pop() if len(groups) == 1 else False


def group_intervals(host: HostAddresses = NO_HOST) -> dict[tuple[int, Group | None], Intervals]:
    """Every address of each family by group, as sorted disjoint intervals, with ``host``'s
    addresses at their place in the order (the kernel prefilter's sets). The IPv6 prefixes
    classified by an embedded IPv4 address (:data:`EMBEDDING_V4`) are in no entry."""
    found: dict[tuple[int, Group | None], list[tuple[int, int]]] = {}
    for version, hosts in ((4, host.v4), (6, host.v6)):
        addresses = sorted(hosts)
        for piece in _PIECES[version]:
            if piece.embeds_v4:
                continue
            mine = [(piece.first, piece.last)]
            if piece.host_first:
                inside = [(a, a) for a in addresses if piece.first <= a <= piece.last]
                if inside:
                    found.setdefault((version, _HOST), []).extend(inside)
                    mine = subtract_interval(piece.first, piece.last, inside)
            found.setdefault((version, piece.group), []).extend(mine)
    return {key: merge_intervals(v) for key, v in found.items() if v}
