"""The host-side nftables ruleset of one sandbox: where its packets are diverted into corral.

One ``inet`` table per sandbox (``corral-<id>``) in the host network namespace, replaced and
removed atomically with ``nft -f``. What it does to every packet arriving from the sandbox's
veth, in order:

1. IPv6 neighbour discovery from link-local/unspecified sources is accepted (the guest must
   resolve its gateway); any other packet whose source is not the guest's own address is
   dropped — the guest's root can change its IP and MAC, and that must gain it nothing.
2. Packets in the *reply* direction of a connection the host opened (published ports) are
   accepted; they are addressed to the gateway and reach corral's own sockets.
3. Neighbour discovery from the guest's address is accepted. ICMP echo requests are dropped
   here: :mod:`corral.net.icmp` reads them from a packet socket (which sees them before
   netfilter) and answers after asking the policy. The host kernel must never answer them.
4. UDP and TCP to port 53 go to the DNS ports, all other TCP and UDP to the transparent proxy
   ports (TPROXY + a firewall mark; a per-sandbox ``ip rule`` sends marked packets to a table
   whose only route is ``local default``, so they are delivered to the proxy's socket and never
   routed). If no proxy socket is there (supervisor gone), TPROXY falls through to the drop.
5. Everything else is dropped. A forward chain also drops anything from or to the veth, so
   the kernel never routes a sandbox packet anywhere even if forwarding is on.

Toward the sandbox (output chain), the host sends only replies of flows the guest opened
(``ct direction reply``: the proxies' answers), connections of the published ports (their
sockets carry :data:`PUBLISHED_MARK`) and neighbour discovery. Anything else a host process —
another sandbox's proxy included — sends to the guest is dropped: sandboxes reach each other
only through published ports, whatever pools they were given.

:func:`ruleset` is pure (unit-tested); :func:`apply` and :func:`remove` hand it to libnftables
in-process (:mod:`corral.net.nftables`), one atomic transaction each.
"""

from __future__ import annotations

import ipaddress
import threading
from dataclasses import dataclass

from corral.config import DNS_PORT
from corral.errors import NetworkError
from corral.kernel import netns as kernel_netns
from corral.net import nftables
from corral.net.prefilter import Prefilter, render_chain, render_sets

#: Firewall mark put on diverted packets; the per-sandbox ``ip rule`` selects on it. "cr" in
#: ASCII, low bits only, so it coexists with software that uses the high bits of the mark.
DIVERT_MARK = 0x6372
DIVERT_MARK_MASK = 0xFFFF

#: Firewall mark of the sockets that connect published ports to the guest: the only
#: connections the host may open toward the sandbox.
PUBLISHED_MARK = 0x6373

#: Neighbour discovery the host side sends on the link.
_HOST_ND_TYPES = "{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert }"

#: Priority of the mangle stage: TPROXY is only valid in prerouting, and this runs after
#: conntrack (-200) so ``ct direction`` is known, and before NAT/filter of other software.
PREROUTING_PRIORITY = -150

#: Neighbour discovery messages a guest legitimately sends on its link.
_ND_TYPES = "{ nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert }"


@dataclass(frozen=True, slots=True)
class FirewallSpec:
    """Everything the ruleset of one sandbox depends on."""

    table: str  # nft table name, ``corral-<id>``
    link: str  # host side of the veth, ``cr-<id>``
    guest_ipv4: ipaddress.IPv4Address
    gateway_ipv4: ipaddress.IPv4Address
    guest_ipv6: ipaddress.IPv6Address | None
    gateway_ipv6: ipaddress.IPv6Address | None
    tcp_port_v4: int
    udp_port_v4: int
    tcp_port_v6: int | None = None
    udp_port_v6: int | None = None
    dns_tcp_port_v4: int | None = None  # None: DNS goes to the ordinary proxy ports
    dns_udp_port_v4: int | None = None
    dns_tcp_port_v6: int | None = None
    dns_udp_port_v6: int | None = None
    #: Certain denials rejected before the handshake (None: the proxy decides everything).
    prefilter: Prefilter | None = None
    #: NFLOG group the prefilter's rejects are copied to (the audit); None: not logged.
    log_group: int | None = None


def _tproxy(family: str, address: str, port: int) -> str:
    target = f"[{address}]:{port}" if family == "ip6" else f"{address}:{port}"
    return f"tproxy {family} to {target} meta mark set {DIVERT_MARK:#x} accept"


def ruleset(spec: FirewallSpec) -> str:
    """The ``nft -f`` input that atomically (re)creates the sandbox's table."""
    t, link = spec.table, spec.link
    v6 = spec.guest_ipv6 is not None and spec.gateway_ipv6 is not None
    rules: list[str] = [
        f"ip6 saddr {{ ::, fe80::/10 }} icmpv6 type {_ND_TYPES} accept",
        f"ip saddr != {spec.guest_ipv4} drop",
        f"ip6 saddr != {spec.guest_ipv6} drop" if v6 else "meta nfproto ipv6 drop",
        "ct direction reply accept",
    ]
    if v6:
        rules.append(f"icmpv6 type {_ND_TYPES} accept")
    rules += ["icmp type echo-request drop", "icmpv6 type echo-request drop"]

    def dns(family: str, gateway: str, dns_tcp: int | None, dns_udp: int | None) -> None:
        nfproto = "ipv4" if family == "ip" else "ipv6"
        if dns_udp is not None:
            rules.append(
                f"meta nfproto {nfproto} udp dport {DNS_PORT} {_tproxy(family, gateway, dns_udp)}"
            )
        if dns_tcp is not None:
            rules.append(
                f"meta nfproto {nfproto} tcp dport {DNS_PORT} {_tproxy(family, gateway, dns_tcp)}"
            )

    def divert(family: str, gateway: str, tcp: int, udp: int) -> None:
        nfproto = "ipv4" if family == "ip" else "ipv6"
        rules.append(f"meta nfproto {nfproto} meta l4proto tcp {_tproxy(family, gateway, tcp)}")
        rules.append(f"meta nfproto {nfproto} meta l4proto udp {_tproxy(family, gateway, udp)}")

    if v6 and (spec.tcp_port_v6 is None or spec.udp_port_v6 is None):
        raise ValueError("an IPv6 slot needs IPv6 proxy ports")
    dns("ip", str(spec.gateway_ipv4), spec.dns_tcp_port_v4, spec.dns_udp_port_v4)
    if v6:
        dns("ip6", str(spec.gateway_ipv6), spec.dns_tcp_port_v6, spec.dns_udp_port_v6)
    if spec.prefilter is not None:
        # Only packets that open a flow: a connection's later packets never pay for it.
        rules.append("ct state new meta l4proto { tcp, udp } jump prefilter")
    divert("ip", str(spec.gateway_ipv4), spec.tcp_port_v4, spec.udp_port_v4)
    if v6:
        assert spec.tcp_port_v6 is not None and spec.udp_port_v6 is not None
        divert("ip6", str(spec.gateway_ipv6), spec.tcp_port_v6, spec.udp_port_v6)
    rules.append("drop")
    sets = ""
    prefilter_chain = ""
    if spec.prefilter is not None:
        sets = "".join(f"{line}\n" for line in render_sets(spec.prefilter))
        pf_body = "\n".join(f"    {r}" for r in render_chain(spec.prefilter, spec.log_group))
        prefilter_chain = f"  chain prefilter {{\n{pf_body}\n  }}\n"

    body = "\n".join(f"    {r}" for r in rules)
    return (
        f"add table inet {t}\n"
        f"delete table inet {t}\n"
        f"table inet {t} {{\n"
        f"{sets}"
        f"  chain prerouting {{\n"
        f"    type filter hook prerouting priority {PREROUTING_PRIORITY}; policy accept;\n"
        f'    iifname "{link}" jump from_sandbox\n'
        f"  }}\n"
        f"  chain from_sandbox {{\n{body}\n  }}\n"
        f"{prefilter_chain}"
        f"  chain input {{\n"
        f"    type filter hook input priority 0; policy accept;\n"
        f'    iifname "{link}" meta mark & {DIVERT_MARK_MASK:#x} == {DIVERT_MARK:#x} accept\n'
        f'    iifname "{link}" ct direction reply accept\n'
        f'    iifname "{link}" icmpv6 type {_ND_TYPES} accept\n'
        f'    iifname "{link}" drop\n'
        f"  }}\n"
        f"  chain forward {{\n"
        f"    type filter hook forward priority 0; policy accept;\n"
        f'    iifname "{link}" drop\n'
        f'    oifname "{link}" drop\n'
        f"  }}\n"
        f"  chain output {{\n"
        f"    type filter hook output priority 0; policy accept;\n"
        f'    oifname "{link}" ct direction reply accept\n'
        f'    oifname "{link}" meta mark & {DIVERT_MARK_MASK:#x} == {PUBLISHED_MARK:#x} accept\n'
        f'    oifname "{link}" icmpv6 type {_HOST_ND_TYPES} accept\n'
        f'    oifname "{link}" drop\n'
        f"  }}\n"
        f"}}\n"
    )


def _nft(text: str, what: str) -> None:
    """One atomic transaction through libnftables in-process (no ``nft`` process)."""
    try:
        nftables.run(text)
    except NetworkError as exc:
        raise NetworkError(f"{what} failed: {exc}") from None


#: Tables in the namespace from which :func:`apply` builds the table elsewhere and replays
#: it (nftables.replay) instead of applying the text here: libnftables first reads every
#: table's chains, sets and rules (~0.45 ms per sandbox's table), while building in an empty
#: namespace, reading back and replaying costs a constant ~8 ms. bench/netlink_bench.py
#: (quiet machine, medians): 4.8 / 7.9 / 26.7 / 50.3 ms in place beside 0 / 8 / 50 / 100
#: tables, 7.7-8.6 ms built elsewhere; the two cross at 8.
REPLAY_FROM_TABLES = 8


def apply(spec: FirewallSpec, *, build_in: str | None = None) -> None:
    """Create (or atomically replace) the sandbox's table.

    ``build_in``: the path of a network namespace without nftables tables (the sandbox's
    own, made for it): when this namespace already holds many tables, the text is applied
    there (no cache to fill), read back as netlink messages and replayed here in one
    transaction, then deleted there. Same table, same bytecode (tests/integration/
    test_net_nftables.py compares both ways' listings)."""
    text = ruleset(spec)
    replace = f"add table inet {spec.table}\ndelete table inet {spec.table}\n"
    exists = nftables.table_exists(spec.table)
    if text.startswith(replace) and not exists:
        # Nothing to replace: the delete would only queue the empty table's destruction,
        # and freeing the libnftables context then waits for it (an RCU grace period):
        # 15 ms instead of 3 ms for a public-only table here.
        text = text[len(replace) :]
    what = f"applying nftables table {spec.table}"
    if build_in is not None and nftables.table_count() >= REPLAY_FROM_TABLES:
        body = text[len(replace) :] if text.startswith(replace) else text
        try:
            messages = kernel_netns.call_in_thread(
                build_in, lambda: _build_and_read_back(body, spec.table)
            )
            nftables.replay(messages, spec.table, replace=exists)
        except (NetworkError, OSError) as exc:
            raise NetworkError(f"{what} failed: {exc}") from None
        return
    _nft(text, what)


def _build_and_read_back(text: str, table: str) -> list[tuple[int, int, bytes]]:
    """In a thread inside the empty namespace: apply ``text``, read the table back, delete
    it (its hooks and conntrack use would otherwise stay in that namespace)."""
    nftables.run(text)
    sock = nftables.open_socket()
    try:
        messages = nftables.snapshot_table(sock, table)
        nftables.destroy_table(table, on=sock)
    finally:
        # Closing a netfilter socket right after a delete waits for an RCU grace period
        # (the deleted table's destruction): done on a thread of its own, off the create.
        threading.Thread(target=sock.close, name="corral-nft-close", daemon=True).start()
    return messages


def remove(table: str) -> None:
    """Delete the sandbox's table; no error when it is already gone. One netlink message
    (libnftables would first dump every table's sets and elements: 4+ ms beside 100 tables)."""
    try:
        nftables.destroy_table(table, "inet")
    except NetworkError as exc:
        raise NetworkError(f"removing nftables table {table} failed: {exc}") from None


def exists(table: str) -> bool:
    return nftables.table_exists(table, "inet")
