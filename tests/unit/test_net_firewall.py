"""The nftables ruleset of a sandbox, generated as text by a pure function."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import shutil
import subprocess

import pytest

from corral.net.firewall import DIVERT_MARK, FirewallSpec, ruleset
from corral.net.plumbing import MAX_LINK_ID, names_for

SPEC = FirewallSpec(
    table="corral-sb1",
    link="cr-sb1",
    guest_ipv4=ipaddress.IPv4Address("172.16.0.2"),
    gateway_ipv4=ipaddress.IPv4Address("172.16.0.1"),
    guest_ipv6=ipaddress.IPv6Address("fd42:6d73:62::2"),
    gateway_ipv6=ipaddress.IPv6Address("fd42:6d73:62::1"),
    tcp_port_v4=4000,
    udp_port_v4=4001,
    tcp_port_v6=4002,
    udp_port_v6=4003,
)


def lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()]


def test_table_is_replaced_atomically() -> None:
    text = ruleset(SPEC)
    assert text.startswith(
        "add table inet corral-sb1\ndelete table inet corral-sb1\ntable inet corral-sb1 {"
    )


def test_anti_spoof_comes_before_any_accept_of_guest_traffic() -> None:
    ls = lines(ruleset(SPEC))
    v4 = ls.index("ip saddr != 172.16.0.2 drop")
    v6 = ls.index("ip6 saddr != fd42:6d73:62::2 drop")
    first_divert = next(i for i, line in enumerate(ls) if "tproxy" in line)
    reply = ls.index("ct direction reply accept")
    assert v4 < reply < first_divert and v6 < reply
    # Only neighbour discovery is accepted from link-local/unspecified sources, before that.
    nd = next(i for i, line in enumerate(ls) if line.startswith("ip6 saddr { ::, fe80::/10 }"))
    assert nd < v4 and "icmpv6 type" in ls[nd]


def test_tcp_and_udp_are_diverted_per_family_and_the_rest_dropped() -> None:
    ls = lines(ruleset(SPEC))
    mark = f"meta mark set {DIVERT_MARK:#x} accept"
    assert f"meta nfproto ipv4 meta l4proto tcp tproxy ip to 172.16.0.1:4000 {mark}" in ls
    assert f"meta nfproto ipv4 meta l4proto udp tproxy ip to 172.16.0.1:4001 {mark}" in ls
    assert f"meta nfproto ipv6 meta l4proto tcp tproxy ip6 to [fd42:6d73:62::1]:4002 {mark}" in ls
    assert f"meta nfproto ipv6 meta l4proto udp tproxy ip6 to [fd42:6d73:62::1]:4003 {mark}" in ls
    chain = ls[
        ls.index("chain from_sandbox {") + 1 : ls.index("}", ls.index("chain from_sandbox {"))
    ]
    assert chain[-1] == "drop"
    assert "icmp type echo-request drop" in chain and "icmpv6 type echo-request drop" in chain


def test_forward_chain_drops_both_ways() -> None:
    ls = lines(ruleset(SPEC))
    assert 'iifname "cr-sb1" drop' in ls and 'oifname "cr-sb1" drop' in ls


def test_without_ipv6_all_ipv6_is_dropped() -> None:
    spec = FirewallSpec(
        table="corral-x", link="cr-x", guest_ipv4=SPEC.guest_ipv4, gateway_ipv4=SPEC.gateway_ipv4,
        guest_ipv6=None, gateway_ipv6=None, tcp_port_v4=1, udp_port_v4=2,
    )  # fmt: skip
    text = ruleset(spec)
    assert "meta nfproto ipv6 drop" in text and "tproxy ip6" not in text


def test_dns_ports_are_diverted_first() -> None:
    spec = dataclasses.replace(SPEC, dns_udp_port_v4=5353, dns_tcp_port_v4=5354)
    ls = lines(ruleset(spec))
    dns = next(i for i, line in enumerate(ls) if "udp dport 53" in line)
    tcp = next(i for i, line in enumerate(ls) if "meta l4proto tcp tproxy ip " in line)
    assert dns < tcp and "172.16.0.1:5353" in ls[dns]


def test_names_fit_the_kernel() -> None:
    n = names_for("sb1")
    assert (n.netns, n.link, n.table) == ("corral-sb1", "cr-sb1", "corral-sb1")
    long = names_for("a-very-long-sandbox-name-indeed")
    assert len(long.link) <= 3 + MAX_LINK_ID and long.link.startswith("cr-")
    weird = names_for("Weird Name/..")
    assert (
        all(c.isalnum() or c == "-" for c in weird.netns) and weird.link != names_for("other").link
    )


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="nft -c needs root")
def test_nft_accepts_the_ruleset() -> None:
    ns = f"corral-unit-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        res = subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "-c", "-f", "-"],
            input=ruleset(SPEC),
            text=True,
            capture_output=True,
        )
        assert res.returncode == 0, res.stderr
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_host_reaches_the_guest_only_with_replies_published_ports_and_nd() -> None:
    from corral.net.firewall import PUBLISHED_MARK

    text = ruleset(SPEC)
    out = text[text.index("chain output {") :]
    ls = lines(out[: out.index("\n  }")])
    assert ls[2:] == [
        'oifname "cr-sb1" ct direction reply accept',
        f'oifname "cr-sb1" meta mark & 0xffff == {PUBLISHED_MARK:#x} accept',
        'oifname "cr-sb1" icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert } accept',
        'oifname "cr-sb1" drop',
    ]
