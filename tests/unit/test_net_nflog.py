"""The NFLOG message parser: the bytes describe packets a guest crafted, so it must never raise
and must read exactly the prefix, addresses and port it was given."""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from corral.net.nflog import (
    GROUP_TRIES,
    candidate_groups,
    check_index,
    group_for,
    packet_flow,
    parse,
)


def _attr(atype: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), atype) + value
    return raw + b"\0" * (-len(raw) % 4)


def message(prefix: bytes, payload: bytes, extra: bytes = b"") -> bytes:
    body = struct.pack("!BBH", 2, 0, 0x6301) + extra + _attr(10, prefix + b"\0") + _attr(9, payload)
    return struct.pack("=IHHII", 16 + len(body), 0x0400, 0, 0, 0) + body


def ipv4(proto: int, src: str, dst: str, dport: int, frag: int = 0) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 40, 0, frag, 64, proto, 0,
        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed,
    )  # fmt: skip
    return header + struct.pack("!HH", 40000, dport) + b"\0" * 16


def ipv6(proto: int, src: str, dst: str, dport: int) -> bytes:
    header = struct.pack("!IHBB", 6 << 28, 20, proto, 64)
    header += ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
    return header + struct.pack("!HH", 40000, dport) + b"\0" * 16


def test_reads_prefix_and_flow_of_v4_and_v6_packets() -> None:
    data = message(b"corral 7", ipv4(6, "172.16.0.2", "10.77.0.1", 7)) + message(
        b"corral 12", ipv6(17, "fd00:1::2", "fc00:77::1", 53), extra=_attr(1, b"\0\0\0\0")
    )
    packets = parse(data)
    assert [p.prefix for p in packets] == ["corral 7", "corral 12"]
    assert [check_index(p.prefix) for p in packets] == [7, 12]
    f4, f6 = (packet_flow(p.payload) for p in packets)
    assert f4 is not None and (f4.protocol, str(f4.source), str(f4.destination), f4.port) == (
        "tcp", "172.16.0.2", "10.77.0.1", 7,
    )  # fmt: skip
    assert f6 is not None and (f6.protocol, str(f6.destination), f6.port) == (
        "udp", "fc00:77::1", 53,
    )  # fmt: skip


def test_rejects_what_it_cannot_read() -> None:
    assert packet_flow(ipv4(1, "1.1.1.1", "2.2.2.2", 0)) is None  # ICMP
    assert packet_flow(ipv4(6, "1.1.1.1", "2.2.2.2", 80, frag=5)) is None  # later fragment
    assert packet_flow(ipv4(6, "1.1.1.1", "2.2.2.2", 80)[:22]) is None  # truncated
    assert packet_flow(b"") is None
    assert check_index("corral x") is None and check_index("other 1") is None
    assert parse(message(b"corral 1", b"")[:-3]) == []
    assert 0x6300 <= group_for(70000) <= 0xFFFF


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=300))
def test_never_raises_on_garbage(data: bytes) -> None:
    for p in parse(data):
        check_index(p.prefix)
        packet_flow(p.payload)
    packet_flow(data)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=120), st.binary(max_size=40), st.integers(0, 200))
def test_never_raises_on_mangled_messages(payload: bytes, prefix: bytes, cut: int) -> None:
    data = message(prefix, payload)
    for p in parse(data[: len(data) - cut] + data[len(data) - cut :][::-1]):
        packet_flow(p.payload)


def test_candidate_groups_start_with_the_slots_own_and_stay_distinct() -> None:
    for number in (1, 2, 63, 4099, 40000, 0x10000):
        groups = candidate_groups(number)
        assert groups[0] == group_for(number)
        assert len(groups) == len(set(groups)) == GROUP_TRIES
        assert all(0x6300 <= g <= 0xFFFF for g in groups)
    # Two low slot numbers never share a fallback with each other's own group.
    assert not set(candidate_groups(1)[1:]) & {group_for(n) for n in range(1, 1000)}
