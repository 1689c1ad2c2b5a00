"""rtnetlink requests and dump parsers (pure): layouts the kernel's headers define."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.net import rtnetlink as rt


def header(msg: bytes) -> tuple[int, int, int, int, int]:
    return struct.unpack_from("=IHHII", msg)


def attrs_of(msg: bytes, fixed: int) -> dict[int, bytes]:
    return rt.attributes(msg[16:], fixed)


def test_every_request_is_acknowledged_and_its_length_is_exact() -> None:
    requests = [
        rt.new_veth("cr-a", "eth0", 65000, 7, 2),
        rt.set_up(5),
        rt.delete_link("cr-a"),
        rt.new_address(5, ipaddress.ip_address("10.0.0.1"), 30),
        rt.local_default_route(6, 0x63720001),
        rt.default_route_via(ipaddress.ip_address("fd00::1"), 2),
        rt.rule(4, "cr-a", 0x6372, 0xFFFF, 0x63720001, 10000),
    ]
    for msg in requests:
        length, _kind, flags, _seq, _pid = header(msg)
        assert length == len(msg) and length % 4 == 0
        assert flags & (rt.NLM_F_REQUEST | rt.NLM_F_ACK) == rt.NLM_F_REQUEST | rt.NLM_F_ACK


def test_a_veth_carries_its_peer_with_name_mtu_netns_and_index() -> None:
    msg = rt.new_veth("cr-a", "eth0", 65000, 7, 2)
    assert header(msg)[1] == rt.RTM_NEWLINK
    assert header(msg)[2] & (rt.NLM_F_CREATE | rt.NLM_F_EXCL) == rt.NLM_F_CREATE | rt.NLM_F_EXCL
    top = attrs_of(msg, 16)
    assert top[rt.IFLA_IFNAME] == b"cr-a\0"
    assert struct.unpack("=I", top[rt.IFLA_MTU]) == (65000,)
    info = rt.attributes(top[rt.IFLA_LINKINFO], 0)
    assert info[rt.IFLA_INFO_KIND] == b"veth"
    peer = rt.attributes(info[rt.IFLA_INFO_DATA], 0)[rt.VETH_INFO_PEER]
    assert struct.unpack_from("=i", peer, 4) == (2,)  # ifi_index of the peer
    peer_attrs = rt.attributes(peer, 16)
    assert peer_attrs[rt.IFLA_IFNAME] == b"eth0\0"
    assert struct.unpack("=I", peer_attrs[rt.IFLA_NET_NS_FD]) == (7,)


def test_an_ipv6_address_without_dad_and_an_ipv4_one() -> None:
    v6 = rt.new_address(3, ipaddress.ip_address("fd42::1"), 64, nodad=True)
    family, plen, flags, _scope, index = struct.unpack_from("=BBBBI", v6, 16)
    assert (family, plen, flags, index) == (socket.AF_INET6, 64, rt.IFA_F_NODAD, 3)
    assert rt.parse_address(v6[16:]) == ipaddress.ip_address("fd42::1")
    v4 = rt.new_address(3, ipaddress.ip_address("10.1.2.1"), 30)
    assert struct.unpack_from("=BBB", v4, 16) == (socket.AF_INET, 30, 0)
    assert rt.parse_address(v4[16:]) == ipaddress.ip_address("10.1.2.1")


def test_a_table_above_255_goes_in_an_attribute_and_the_header_says_unspec() -> None:
    msg = rt.local_default_route(4, 0x63720009)
    family, dst_len, _src, _tos, table, proto, scope, kind = struct.unpack_from("=8B", msg, 16)
    assert (family, dst_len, table, proto, scope, kind) == (
        socket.AF_INET,
        0,
        rt.RT_TABLE_UNSPEC,
        rt.RTPROT_BOOT,
        rt.RT_SCOPE_HOST,
        rt.RTN_LOCAL,
    )
    a = attrs_of(msg, 12)
    assert struct.unpack("=I", a[rt.RTA_TABLE]) == (0x63720009,)
    assert struct.unpack("=i", a[rt.RTA_OIF]) == (rt.LOOPBACK_INDEX,)
    assert header(rt.local_default_route(4, 0x63720009, delete=True))[1] == rt.RTM_DELROUTE


def test_a_rule_round_trips_through_the_dump_parser() -> None:
    msg = rt.rule(6, "cr-abc", 0x6372, 0xFFFF, 0x63720004, 10000)
    entry = rt.parse_rule(msg[16:])
    assert entry == rt.RuleEntry(socket.AF_INET6, "cr-abc", 0x63720004, 10000, 0x6372, 0xFFFF)
    assert header(rt.rule(6, "cr-abc", 1, 2, 3, 4, delete=True))[1] == rt.RTM_DELRULE


def test_route_destinations_and_the_default_route() -> None:
    body = struct.pack("=8BI", socket.AF_INET, 24, 0, 0, 254, 3, 0, 1, 0) + rt.attr(
        rt.RTA_DST, bytes([10, 9, 8, 0])
    )
    assert rt.parse_route_destination(body) == ipaddress.ip_network("10.9.8.0/24")
    default = struct.pack("=8BI", socket.AF_INET6, 0, 0, 0, 254, 3, 0, 1, 0)
    assert rt.parse_route_destination(default) is None


def test_find_attribute_is_the_first_of_its_type() -> None:
    data = b"\0" * 12 + rt.attr(rt.RTA_DST, b"\x01\x02\x03\x04") + rt.attr(7, b"abcd")
    assert rt.find_attribute(data, 12, 7) == b"abcd"
    assert rt.find_attribute(data, 12, rt.RTA_DST) == b"\x01\x02\x03\x04"
    assert rt.find_attribute(data, 12, 99) is None
    assert rt.find_attribute(data[:14], 12, 7) is None  # truncated: nothing read past it
    assert rt.find_attribute(data, 12, 7) == rt.attributes(data, 12)[7]


def _span(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> rt.Span:
    return net.version, int(net.network_address), int(net.broadcast_address)


def test_route_spans_are_those_of_the_full_parse() -> None:
    """The fast read of a real dump (this namespace's routes) gives exactly the networks the
    full per-route parse gives."""
    with rt.RouteSocket() as sock:
        dump = sock.dump(rt.dump_request(rt.RTM_GETROUTE, socket.AF_UNSPEC))
        fast = sock.route_spans()
    full = {rt.parse_route_destination(b) for k, b in dump if k == rt.RTM_NEWROUTE} - {None}
    assert fast == {_span(n) for n in full if n is not None}
    assert full  # this namespace has routes (lo's local ones at least)


def test_rule_tables_are_those_of_the_full_parse() -> None:
    with rt.RouteSocket() as sock:
        dump = sock.dump(rt.dump_request(rt.RTM_GETRULE, socket.AF_UNSPEC))
        fast = sock.rule_tables()
    full = [rt.parse_rule(b) for k, b in dump if k == rt.RTM_NEWRULE]
    assert fast == [(r.iif, r.table) for r in full if r.iif]


def test_addresses_skip_those_inside_a_span() -> None:
    with rt.RouteSocket() as sock:
        every = sock.addresses()
        loopback = rt.network_span("127.0.0.0/8")
        kept = sock.addresses(skip=[loopback])
    assert ipaddress.ip_address("127.0.0.1") in every
    assert kept == [a for a in every if not (a.version == 4 and a.is_loopback)]


@pytest.mark.parametrize(
    "text",
    ["10.1.2.0/30", "10.1.2.3/30", "0.0.0.0/0", "192.0.2.7", "fd42::/64", "fd42::1/127", "::/0",
     "2001:db8::5"],
)
def test_network_span_is_the_ipaddress_network(text: str) -> None:
    net = ipaddress.ip_network(text, strict=False)
    assert rt.network_span(text) == _span(net)


@pytest.mark.parametrize("text", ["", "10.1.2/30", "10.1.2.0/33", "10.1.2.0/", "fd42::/129",
                                  "x/1", "10.0.0.0/-1", "10.0.0.0/ 8"])
def test_network_span_refuses_what_is_not_a_network(text: str) -> None:
    with pytest.raises(ValueError):
        rt.network_span(text)


@given(st.integers(0, 2**32 - 1), st.integers(0, 32))
def test_span_of_matches_ipaddress_v4(value: int, prefix: int) -> None:
    net = ipaddress.IPv4Network((value, prefix), strict=False)
    assert rt.span_of(socket.AF_INET, value.to_bytes(4, "big"), prefix) == _span(net)


@given(st.integers(0, 2**128 - 1), st.integers(0, 128))
def test_span_of_matches_ipaddress_v6(value: int, prefix: int) -> None:
    net = ipaddress.IPv6Network((value, prefix), strict=False)
    assert rt.span_of(socket.AF_INET6, value.to_bytes(16, "big"), prefix) == _span(net)


def test_span_of_refuses_bad_lengths() -> None:
    assert rt.span_of(socket.AF_INET, b"\1\2\3", 24) is None
    assert rt.span_of(socket.AF_INET, b"\1\2\3\4", 33) is None
    assert rt.span_of(socket.AF_INET6, b"\0" * 4, 24) is None
    assert rt.span_of(socket.AF_PACKET, b"\0" * 4, 24) is None


def test_messages_stop_at_a_truncated_one() -> None:
    one = rt.message(rt.NLMSG_DONE, 0, b"\0\0\0\0", seq=3)
    two = rt.message(rt.NLMSG_ERROR, 0, struct.pack("=i", -17) + b"x" * 16, seq=4)
    got = list(rt.messages(one + two + two[:10]))
    assert [(k, s) for k, _f, s, _b in got] == [(rt.NLMSG_DONE, 3), (rt.NLMSG_ERROR, 4)]
    assert list(rt.messages(struct.pack("=IHHII", 8, 0, 0, 0, 0))) == []  # length < header
