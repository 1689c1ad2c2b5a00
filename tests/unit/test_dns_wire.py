"""The guest-side DNS wire format: query parser, templates, TCP framer (corral.net.dns.wire)."""

from __future__ import annotations

import struct

import dns.message
import dns.rcode
import pytest

from corral.config import DNSConfig, NetworkConfig
from corral.net.dns import wire
from corral.net.dns.upstreams import host_upstreams, parse_resolv_conf, upstreams_for


def header(
    qid: int = 1, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0
) -> bytes:
    return struct.pack("!6H", qid, flags, qd, an, ns, ar)


def name(*labels: bytes) -> bytes:
    return b"".join(bytes([len(x)]) + x for x in labels) + b"\0"


def q(*labels: bytes, qtype: int = 1, tail: bytes = b"", **kw: int) -> bytes:
    return header(**kw) + name(*labels) + struct.pack("!HH", qtype, 1) + tail


def formerr(data: bytes) -> wire.QueryError:
    with pytest.raises(wire.QueryError) as info:
        wire.parse_query(data)
    return info.value


def test_plain_query() -> None:
    got = wire.parse_query(q(b"WWW", b"Example", b"com", qid=77))
    assert got.id == 77 and got.name == "www.example.com" and got.qtype == 1
    assert got.qname_wire == name(b"WWW", b"Example", b"com")
    assert got.key_name == name(b"www", b"example", b"com")
    assert not got.edns and got.udp_size == 512


def test_root_query() -> None:
    got = wire.parse_query(header() + b"\0" + struct.pack("!HH", 2, 1))
    assert got.name == "" and got.qname_wire == b"\0"


def test_63_byte_labels_and_255_byte_names_are_the_limits() -> None:
    assert wire.parse_query(q(b"a" * 63, b"example")).name.startswith("a" * 63)
    formerr(q(b"a" * 64, b"example"))  # 64 = 0x40: an extended label type, not a length
    labels = [b"b" * 63] * 3 + [b"c" * 61]  # 4*1 + 3*63 + 61 + root = 255
    assert len(name(*labels)) == 255
    assert wire.parse_query(q(*labels)).name.endswith("c" * 61)
    too_long = [b"b" * 63] * 3 + [b"c" * 62]
    assert "255" in formerr(q(*too_long)).reason


def test_compression_in_the_question_is_formerr() -> None:
    data = header() + b"\x01a\xc0\x0c" + struct.pack("!HH", 1, 1)  # a pointer to itself
    assert formerr(data).rcode == wire.FORMERR


def test_zero_length_and_truncated() -> None:
    for data in (b"", b"\x00", header()[:11]):
        with pytest.raises(wire.Unanswerable):
            wire.parse_query(data)
    for cut in range(12, len(q(b"abc", b"example"))):
        assert formerr(q(b"abc", b"example")[:cut]).rcode == wire.FORMERR


def test_counts_and_opcode() -> None:
    assert formerr(q(b"a", qd=0)).rcode == wire.FORMERR
    assert formerr(q(b"a", qd=2)).rcode == wire.FORMERR
    assert formerr(q(b"a", flags=0x2800)).rcode == wire.NOTIMP  # opcode 5 (update)
    with pytest.raises(wire.Unanswerable):
        wire.parse_query(q(b"a", flags=0x8100))
    # answer records in a query are skipped; a count the bytes cannot hold is FORMERR
    rr = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + b"\x01\x02\x03\x04"
    assert wire.parse_query(q(b"a", an=1, tail=rr)).name == "a"
    assert formerr(q(b"a", an=2, tail=rr)).rcode == wire.FORMERR
    assert formerr(q(b"a", an=65535)).rcode == wire.FORMERR


def test_edns() -> None:
    opt = b"\0" + struct.pack("!HHIH", 41, 4096, 0, 0)
    got = wire.parse_query(q(b"a", ar=1, tail=opt))
    assert got.edns and got.udp_size == 4096 and wire.udp_limit(got) == wire.UDP_PAYLOAD
    small = b"\0" + struct.pack("!HHIH", 41, 100, 0, 0)
    assert wire.parse_query(q(b"a", ar=1, tail=small)).udp_size == 512
    assert formerr(q(b"a", ar=2, tail=opt + opt)).rcode == wire.FORMERR
    owned = b"\x01x\0" + struct.pack("!HHIH", 41, 4096, 0, 0)
    assert formerr(q(b"a", ar=1, tail=owned)).rcode == wire.FORMERR
    v1 = b"\0" + struct.pack("!HHIH", 41, 4096, 1 << 16, 0)
    err = formerr(q(b"a", ar=1, tail=v1))
    assert err.rcode == wire.BADVERS
    assert dns.message.from_wire(err.response()).rcode() == dns.rcode.BADVERS


def test_odd_bytes_in_labels_are_escaped() -> None:
    got = wire.parse_query(q(b"a.b", b"\xff\x00 x", b"Com"))
    assert got.name == "a\\046b.\\255\\000\\032x.com"


def test_oversized_query() -> None:
    big = q(b"a", ar=1, tail=b"\0" + struct.pack("!HHIH", 41, 4096, 0, 5000) + b"\0" * 5000)
    assert "4096" in formerr(big).reason


def test_error_response_shape() -> None:
    resp = wire.error_response(header(qid=9, flags=0x0100), wire.FORMERR)
    msg = dns.message.from_wire(resp)
    assert msg.id == 9 and msg.rcode() == dns.rcode.FORMERR and not msg.question


def test_template_render_patches_id_case_ttl_and_truncates() -> None:
    query = wire.parse_query(q(b"WwW", b"ex", qid=5))
    records = [(wire.TYPE_A, 100, bytes([203, 0, 113, i])) for i in range(3)]
    t = wire.synthetic_template(query.key_name, 1, wire.NOERROR, records, created=10.0)
    out, truncated = wire.render(t, query, now=40.5, limit=512)
    assert not truncated
    msg = dns.message.from_wire(out)
    assert msg.id == 5 and str(msg.question[0].name) == "WwW.ex."
    assert msg.answer[0].ttl == 70 and len(msg.answer[0]) == 3
    out, truncated = wire.render(t, query, now=10.0, limit=40)
    assert truncated
    msg = dns.message.from_wire(out)
    assert msg.flags & 0x0200 and not msg.answer
    out, _ = wire.render(t, query, now=500.0, limit=None)
    assert dns.message.from_wire(out).answer[0].ttl == 0


def test_framer() -> None:
    f = wire.StreamFramer()
    m1, m2 = q(b"a"), q(b"b")
    stream = wire.frame(m1) + wire.frame(m2)
    got = [m for i in range(len(stream)) for m in f.feed(stream[i : i + 1])]
    assert got == [m1, m2] and f.pending == 0
    with pytest.raises(wire.FramingError):
        wire.StreamFramer().feed(b"\x00\x00")
    with pytest.raises(wire.FramingError):
        wire.StreamFramer().feed(struct.pack("!H", wire.MAX_QUERY_SIZE + 1))
    big = wire.StreamFramer(wire.MAX_TCP_MESSAGE)
    assert big.feed(struct.pack("!H", 65535) + b"x" * 65535) == [b"x" * 65535]


# -- resolv.conf ----------------------------------------------------------------------------------


def test_parse_resolv_conf() -> None:
    text = """
    # comment
    search example.com
    nameserver 1.1.1.1
    nameserver   2606:4700::1111
    nameserver not-an-ip
    nameserver fe80::1%eth0
    nameserver 9.9.9.9
    options timeout:1
    """
    assert parse_resolv_conf(text) == [
        ("1.1.1.1", 53),
        ("2606:4700::1111", 53),
        ("fe80::1%eth0", 53),
    ]
    assert parse_resolv_conf("") == []


def test_host_upstreams(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 203.0.113.53\n")
    monkeypatch.setenv("CORRAL_RESOLV_CONF", str(conf))
    assert host_upstreams() == [("203.0.113.53", 53)]
    assert upstreams_for(NetworkConfig()) == [("203.0.113.53", 53)]
    cfg = NetworkConfig(dns=DNSConfig(nameservers=["198.51.100.9:5353", "[2001:db8::53]"]))
    assert upstreams_for(cfg) == [("198.51.100.9", 5353), ("2001:db8::53", 53)]
    conf.write_text("# nothing\n")
    assert host_upstreams() == [("127.0.0.1", 53)]  # glibc's fallback
    assert host_upstreams(tmp_path / "missing") == [("127.0.0.1", 53)]
