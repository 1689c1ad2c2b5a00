"""Destination groups: the one place that says which group an address is in (SPEC section 4).

``classify`` is a short ordered function in the manner of smokescreen's ``classifyAddr``:
read it once and you know the whole address policy. The policy engine, the DNS rebind filter
and the audit log all call it; nothing re-derives groups elsewhere.

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
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from corral.config.values import Group, IPAddress, IPNetwork, unmap

_V4 = ipaddress.IPv4Address

_MAPPED_PREFIX = 0xFFFF  # ::ffff:0:0/96, shifted right by 32
_NAT64_PREFIX = int(ipaddress.IPv6Address("64:ff9b::")) >> 32
_V4_ALL_ONES = 0xFFFFFFFF

_META4 = int(ipaddress.IPv4Address("169.254.169.254"))
_META6 = int(ipaddress.IPv6Address("fd00:ec2::254"))
_LOOP6 = 1


def _net(text: str) -> tuple[int, int]:
    """(network int >> host bits, host bits) of a CIDR, for shift-and-compare membership."""
    net = ipaddress.ip_network(text)
    host_bits = net.max_prefixlen - net.prefixlen
    return int(net.network_address) >> host_bits, host_bits


# The ranges each group is made of, in classification order. The table is the source of
# truth for the lint (which asks "is this whole CIDR in group G?"); ``classify`` below is the
# same order written out for speed, and a unit test checks the two agree on every boundary.
# ``None`` is "in no group" (always denied).
RANGES: tuple[tuple[str, Group | None], ...] = (
    ("0.0.0.0/8", None),
    ("240.0.0.0/4", None),  # includes 255.255.255.255
    ("::/128", None),
    ("127.0.0.0/8", Group.LOOPBACK),
    ("::1/128", Group.LOOPBACK),
    ("169.254.169.254/32", Group.METADATA),
    ("fd00:ec2::254/128", Group.METADATA),
    ("::/96", None),
    ("10.0.0.0/8", Group.PRIVATE),
    ("172.16.0.0/12", Group.PRIVATE),
    ("192.168.0.0/16", Group.PRIVATE),
    ("100.64.0.0/10", Group.PRIVATE),
    ("fc00::/7", Group.PRIVATE),
    ("fec0::/10", Group.PRIVATE),
    ("169.254.0.0/16", Group.LINK_LOCAL),
    ("fe80::/10", Group.LINK_LOCAL),
    ("224.0.0.0/4", Group.MULTICAST),
    ("ff00::/8", Group.MULTICAST),
)

#: IPv6 prefixes whose addresses are classified by the IPv4 address they embed (low 32 bits).
EMBEDDING_V4: tuple[str, ...] = ("64:ff9b::/96",)

_P10 = _net("10.0.0.0/8")
_P172 = _net("172.16.0.0/12")
_P192 = _net("192.168.0.0/16")
_P100 = _net("100.64.0.0/10")
_P169 = _net("169.254.0.0/16")
_PFC = _net("fc00::/7")
_PFEC0 = _net("fec0::/10")
_PFE80 = _net("fe80::/10")


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


def _classify_v4(ip: int, host: frozenset[int]) -> Group | None:
    top = ip >> 24
    if top == 0 or top >= 240:
        return None  # "this network", reserved, limited broadcast
    if top == 127:
        return Group.LOOPBACK  # before host: the guest's loopback is never the host's
    if ip in host:
        return Group.HOST
    if ip == _META4:
        return Group.METADATA
    if (
        top == 10
        or ip >> _P172[1] == _P172[0]
        or ip >> _P192[1] == _P192[0]
        or ip >> _P100[1] == _P100[0]
    ):
        return Group.PRIVATE
    if ip >> _P169[1] == _P169[0]:
        return Group.LINK_LOCAL
    if top >= 224:
        return Group.MULTICAST
    return Group.PUBLIC


def classify_int(ip: int, is_v4: bool, host: HostAddresses = NO_HOST) -> Group | None:
    """``classify`` on an address as an integer (IPv4 when ``is_v4``, else IPv6)."""
    if is_v4:
        return _classify_v4(ip, host.v4)
    high = ip >> 32
    if high in (_MAPPED_PREFIX, _NAT64_PREFIX):
        return _classify_v4(ip & _V4_ALL_ONES, host.v4)
    if ip == _LOOP6:
        return Group.LOOPBACK
    if high == 0:
        return None  # :: and the deprecated IPv4-compatible ::a.b.c.d
    if ip in host.v6:
        return Group.HOST
    if ip == _META6:
        return Group.METADATA
    if ip >> _PFC[1] == _PFC[0] or ip >> _PFEC0[1] == _PFEC0[0]:
        return Group.PRIVATE
    if ip >> _PFE80[1] == _PFE80[0]:
        return Group.LINK_LOCAL
    if ip >> 120 == 0xFF:
        return Group.MULTICAST
    return Group.PUBLIC


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


def _span(text: str) -> tuple[int, int, int]:
    net = ipaddress.ip_network(text)
    return net.version, int(net.network_address), int(net.broadcast_address)


# (family, first, last, group) in classification order; integers because lint asks this of
# every CIDR rule of a policy that may hold 100,000 of them.
_SPANS = tuple((*_span(t), g) for t, g in RANGES)
_SPECIAL_V6 = tuple(_span(t) for t in (*EMBEDDING_V4, "::ffff:0:0/96"))


def network_group(network: IPNetwork) -> Group | None | bool:
    """The group every address of ``network`` is in, when that is one group.

    Returns the group, None when every address is in no group, or False when the network
    mixes groups or touches a prefix whose group depends on an embedded IPv4 address.
    ``host`` is never returned: the host's addresses are not known here, so callers say
    what they assume.
    """
    version = network.version
    lo, hi = int(network.network_address), int(network.broadcast_address)
    if version == 6:
        for _, s_lo, s_hi in _SPECIAL_V6:
            if lo <= s_hi and s_lo <= hi:
                return False
    for r_version, r_lo, r_hi, group in _SPANS:
        if r_version != version:
            continue
        if r_lo <= lo and hi <= r_hi:
            return group
        if lo <= r_hi and r_lo <= hi:
            return False
    return Group.PUBLIC
