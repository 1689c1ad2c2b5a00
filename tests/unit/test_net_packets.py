"""Parsers and builders of packets the data path handles: ICMP echo frames from the guest
(untrusted bytes: fuzzed), echo replies, original-destination control messages, raw UDP."""

from __future__ import annotations

import ipaddress
import socket
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from corral.net.icmp import (
    EchoRequest,
    build_echo_reply,
    checksum,
    parse_echo_reply_v4,
    parse_echo_reply_v6,
    parse_echo_request,
)
from corral.net.udp_relay import build_udp_packet, parse_origdst

GUEST_MAC = bytes.fromhex("020000000002")
HOST_MAC = bytes.fromhex("020000000001")
G4, D4 = ipaddress.IPv4Address("172.16.0.2"), ipaddress.IPv4Address("203.0.113.10")
G6, D6 = ipaddress.IPv6Address("fd42::2"), ipaddress.IPv6Address("2001:db8:f::10")


def request_frame(
    src: ipaddress.IPv4Address | ipaddress.IPv6Address,
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address,
    ident: int,
    seq: int,
    payload: bytes,
) -> bytes:
    """A frame as the guest's kernel would send it (built from a reply, mirrored)."""
    mirrored = EchoRequest(HOST_MAC, GUEST_MAC, dst, src, ident, seq, payload)
    frame = bytearray(build_echo_reply(mirrored))
    if src.version == 4:
        icmp_at = 14 + 20
        frame[icmp_at] = 8  # echo request
        frame[icmp_at + 2 : icmp_at + 4] = b"\0\0"
        frame[icmp_at + 2 : icmp_at + 4] = struct.pack("!H", checksum(bytes(frame[icmp_at:])))
    else:
        icmp_at = 14 + 40
        frame[icmp_at] = 128
        frame[icmp_at + 2 : icmp_at + 4] = b"\0\0"
        pseudo = src.packed + dst.packed + struct.pack("!I3xB", len(frame) - icmp_at, 58)
        frame[icmp_at + 2 : icmp_at + 4] = struct.pack(
            "!H", checksum(pseudo + bytes(frame[icmp_at:]))
        )
    return bytes(frame)


def test_checksum_known_value() -> None:
    # RFC 1071 example bytes
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D


def test_v4_request_round_trip() -> None:
    frame = request_frame(G4, D4, 0x1234, 7, b"hello")
    req = parse_echo_request(frame)
    assert req == EchoRequest(GUEST_MAC, HOST_MAC, G4, D4, 0x1234, 7, b"hello")
    reply = build_echo_reply(req)
    assert reply[:12] == GUEST_MAC + HOST_MAC
    ip = reply[14:]
    assert checksum(ip[:20]) == 0 and ip[12:16] == D4.packed and ip[16:20] == G4.packed
    assert ip[20] == 0 and checksum(ip[20:]) == 0 and ip[28:] == b"hello"


def test_v6_request_round_trip() -> None:
    frame = request_frame(G6, D6, 9, 1, b"x" * 56)
    req = parse_echo_request(frame)
    assert req is not None and (req.source, req.destination, req.ident, req.sequence) == (
        G6,
        D6,
        9,
        1,
    )
    reply = build_echo_reply(req, b"y" * 56)
    ip = reply[14:]
    assert ip[6] == 58 and ip[8:24] == D6.packed and ip[24:40] == G6.packed
    pseudo = D6.packed + G6.packed + struct.pack("!I3xB", len(ip) - 40, 58)
    assert ip[40] == 129 and checksum(pseudo + ip[40:]) == 0


def test_bad_checksum_fragment_and_other_types_are_ignored() -> None:
    frame = bytearray(request_frame(G4, D4, 1, 1, b"abc"))
    bad = bytearray(frame)
    bad[-1] ^= 0xFF
    assert parse_echo_request(bytes(bad)) is None
    frag = bytearray(frame)
    frag[14 + 6] = 0x20  # MF
    assert parse_echo_request(bytes(frag)) is None
    assert parse_echo_request(b"\0" * 60) is None


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_parse_echo_request_never_raises(data: bytes) -> None:
    parse_echo_request(data)
    parse_echo_reply_v4(data)
    parse_echo_reply_v6(data, "2001:db8::1")


@settings(max_examples=1000, deadline=None)
@given(st.binary(min_size=1, max_size=120), st.integers(0, 200), st.integers(0, 255))
def test_mutated_frames_never_raise(payload: bytes, pos: int, value: int) -> None:
    for src, dst in ((G4, D4), (G6, D6)):
        frame = bytearray(request_frame(src, dst, 1, 2, payload))
        frame[pos % len(frame)] = value
        req = parse_echo_request(bytes(frame))
        if req is not None:
            build_echo_reply(req)


def test_origdst_v4_and_v6() -> None:
    v4 = struct.pack("!HH4s8x", socket.AF_INET, 53, D4.packed)
    assert parse_origdst(socket.SOL_IP, 20, v4) == (D4, 53)
    v6 = struct.pack("!HHI16sI", socket.AF_INET6, 443, 0, D6.packed, 0)
    assert parse_origdst(socket.IPPROTO_IPV6, 74, v6) == (D6, 443)
    assert parse_origdst(socket.SOL_IP, 20, b"\0" * 3) is None
    assert parse_origdst(socket.SOL_SOCKET, 1, v4) is None


@given(st.binary(max_size=64))
def test_origdst_never_raises(data: bytes) -> None:
    parse_origdst(socket.SOL_IP, 20, data)
    parse_origdst(socket.IPPROTO_IPV6, 74, data)


def test_raw_udp_packets_have_valid_checksums() -> None:
    pkt = build_udp_packet(D4, 53, G4, 40000, b"answer")
    assert checksum(pkt[:20]) == 0 and pkt[9] == 17
    pseudo = D4.packed + G4.packed + struct.pack("!BBH", 0, 17, len(pkt) - 20)
    assert checksum(pseudo + pkt[20:]) == 0
    pkt6 = build_udp_packet(D6, 53, G6, 40000, b"answer6")
    pseudo6 = D6.packed + G6.packed + struct.pack("!I3xB", len(pkt6) - 40, 17)
    assert checksum(pseudo6 + pkt6[40:]) == 0 and pkt6[6] == 17
