"""The seam between a sandbox's supervisor and its network data path.

The supervisor (one asyncio process per sandbox, in the host network namespace) drives a
:class:`SandboxNetwork` through three steps:

1. :meth:`SandboxNetwork.reserve` (sync, before the sandbox's init is forked): leases the
   address slot, creates the sandbox's netns so the init can join it, and binds the published
   ports so a port in use fails the create before anything else exists.
2. :meth:`SandboxNetwork.start` (async, after the init joined the netns): veth, addresses,
   routes, the policy compiled, the proxies listening, and only then the nftables table that
   diverts the sandbox's packets to them (so no packet ever finds the divert without a proxy).
3. :meth:`SandboxNetwork.close`: removes every trace; idempotent. :func:`cleanup_leftovers`
   does the same from the sandbox id alone, for ``corral gc`` after a supervisor died.

Policy ``none`` has no network at all: reserve and start do nothing and ``netns_path`` is
None (the launcher gives the sandbox an empty netns of its own).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from corral.config import NetworkConfig
from corral.errors import NetworkError
from corral.net import firewall, nflog, nftables, plumbing
from corral.net.addressing import AddressPool, Slot, host_has_ipv6
from corral.net.audit import AUDIT_FILE, AuditEvent, AuditLog, follow
from corral.net.dns import DnsInterceptor
from corral.net.dns.upstreams import query_timeout_for, upstreams_for
from corral.net.gate import FlowGate, IPAddress
from corral.net.guest_trust import rootfs_state
from corral.net.icmp import IcmpRelay
from corral.net.ports import Published, PublishedPorts, bind_published
from corral.net.prefilter import PINNED_SETS, Prefilter, compile_prefilter
from corral.net.rtnetlink import network_span
from corral.net.secrets import SecretTable
from corral.net.splice import PipePool
from corral.net.tcp_proxy import CONNECT_TIMEOUT, TcpProxy
from corral.net.tls_ca import GUEST_BUNDLE_PATHS, GUEST_CA_ANCHORS, GuestTrust, read_host_bundle
from corral.net.tls_interceptor import CONNECT_PROXY_PORT, TlsInterceptor, TlsSettings
from corral.net.udp_relay import UdpRelay
from corral.policy import Policy
from corral.policy.pins import PinSet
from corral.policy.verdict import unmap

_log = logging.getLogger(__name__)

#: MTU of the veth pair. Every flow of the sandbox ends at corral (TCP is terminated, UDP and
#: ICMP are re-originated), so the guest's link MTU has nothing to do with the path outside:
#: a large one means 64 KiB segments and a tenth of the packets and ACKs on the guest leg.
#: Measured here: 1.35 instead of 1.9 CPU-seconds per GB, ~9 instead of ~7 Gbit/s. Below
#: veth's maximum (65535) with room for the Ethernet header.
DEFAULT_MTU = 65000

#: Milliseconds a pinned set element outlives its pin: covers the moment between the PinSet's
#: clock reading and the kernel's, so the kernel set never expires an element first.
PINNED_SET_SLACK_MS = 1000

#: Names that resolve to the gateway inside the sandbox (SPEC: reaching the host).
HOST_NAMES = ("host.corral.internal", "host.microsandbox.internal")


class SandboxNetwork:
    """One sandbox's network: slot, netns, veth, firewall, proxies, published ports."""

    def __init__(
        self,
        sandbox_id: str,
        config: NetworkConfig,
        state_dir: Path,
        *,
        slot: Slot | None,
        pool: AddressPool,
        published: list[Published],
        mtu: int,
        policy: Policy | None,
        log_allowed: bool,
        connect_timeout: float = CONNECT_TIMEOUT,
        tls: TlsSettings | None = None,
    ) -> None:
        self.sandbox_id = sandbox_id
        #: TLS interception (None: off). Holds the CA key and the secrets' values, in memory.
        self.tls_settings = tls
        #: Called (on the loop) with a reason when a secret's block-and-terminate fires: the
        #: supervisor sets it to stop the whole sandbox.
        self.on_terminate: Callable[[str], None] | None = None
        self.config = config
        self.state_dir = state_dir
        self.names = plumbing.names_for(sandbox_id)
        self.slot = slot
        self.pool = pool
        self.mtu = mtu
        self.log_allowed = log_allowed
        self.connect_timeout = connect_timeout
        self._published = published
        self._policy = policy
        self._closed = False
        self._audit: AuditLog | None = None
        self._parts: list[Any] = []  # started components, closed in reverse order
        self.gate: FlowGate | None = None
        self.tcp: TcpProxy | None = None
        self.udp: UdpRelay | None = None
        self.icmp: IcmpRelay | None = None
        self.dns: DnsInterceptor | None = None
        self.ports: PublishedPorts | None = None
        #: What the sandbox's own resolver answered: name -> addresses, with TTLs. The DNS
        #: interceptor fills it, the gate decides domain rules with it.
        self.pins = PinSet()
        #: family -> nft set, when the prefilter uses pins
        self._pinned_sets: dict[int, str] | None = None
        #: Parts whose close waits for the kernel, left open by ``close(linger=True)``.
        self.lingering: list[Any] = []

    # -- step 1 -----------------------------------------------------------------------------
    @classmethod
    def reserve(
        cls,
        sandbox_id: str,
        config: NetworkConfig,
        state_dir: Path,
        *,
        mtu: int = DEFAULT_MTU,
        policy: Policy | None = None,
        pool: AddressPool | None = None,
        log_allowed: bool = False,
        connect_timeout: float = CONNECT_TIMEOUT,
        secrets: SecretTable | None = None,
    ) -> SandboxNetwork:
        """Lease the slot, create the netns, bind published ports. Sync; NetworkError on failure.

        ``policy`` replaces the engine compiled from ``config`` (tests); ``log_allowed`` also
        audits allowed flows; ``connect_timeout`` bounds each upstream TCP dial; ``secrets``
        (values in memory) turn TLS interception on like ``config.tls`` does. The CA is made
        (or the user's pair read and checked) here, so a bad one fails the create early.
        """
        pool = pool or AddressPool()
        tls = None if config.is_offline else TlsSettings.from_config(sandbox_id, config, secrets)
        if config.is_offline:
            return cls(
                sandbox_id, config, state_dir, slot=None, pool=pool, published=[], mtu=mtu,
                policy=policy, log_allowed=log_allowed,
            )  # fmt: skip
        names = plumbing.names_for(sandbox_id)
        if (
            pool.get(sandbox_id) is not None
            or plumbing.link_exists(names.link)
            or os.path.exists(names.netns_path)
            or firewall.exists(names.table)
        ):
            # A crashed predecessor of the same id (the runtime holds the name's lock, so no
            # live sandbox owns these): start from nothing.
            cleanup_leftovers(sandbox_id, pool=pool)
        v6_pool = ipaddress.IPv6Network(config.ipv6_pool) if host_has_ipv6() else None
        slot = pool.lease(
            sandbox_id,
            ipaddress.IPv4Network(config.ipv4_pool),
            v6_pool,
            busy_numbers=plumbing.lease_numbers_in_kernel(),
        )
        published: list[Published] = []
        try:
            for b in config.all_port_bindings:
                published.append(
                    bind_published(b.bind_address, b.host_port, b.guest_port, str(b.protocol))
                )
            plumbing.create_netns(names)
        except BaseException:
            for p in published:
                p.sock.close()
            plumbing.remove(names, plumbing.routing_table(slot))
            pool.release(sandbox_id)
            raise
        return cls(
            sandbox_id, config, state_dir, slot=slot, pool=pool, published=published, mtu=mtu,
            policy=policy, log_allowed=log_allowed, connect_timeout=connect_timeout, tls=tls,
        )  # fmt: skip

    # -- addresses --------------------------------------------------------------------------
    @property
    def netns_path(self) -> str | None:
        return None if self.slot is None else self.names.netns_path

    @property
    def guest_ipv4(self) -> ipaddress.IPv4Address | None:
        return None if self.slot is None else self.slot.guest_ipv4

    @property
    def gateway_ipv4(self) -> ipaddress.IPv4Address | None:
        return None if self.slot is None else self.slot.gateway_ipv4

    @property
    def guest_ipv6(self) -> ipaddress.IPv6Address | None:
        return None if self.slot is None else self.slot.guest_ipv6

    @property
    def gateway_ipv6(self) -> ipaddress.IPv6Address | None:
        return None if self.slot is None else self.slot.gateway_ipv6

    @property
    def audit_path(self) -> Path:
        return self.state_dir / AUDIT_FILE

    def hosts_entries(self) -> list[tuple[str, str]]:
        """(name, address) lines for the guest's /etc/hosts: the host names -> the gateway."""
        out: list[tuple[str, str]] = []
        for gw in (self.gateway_ipv4, self.gateway_ipv6):
            if gw is not None:
                out += [(name, str(gw)) for name in HOST_NAMES]
        return out

    def published_ports(self) -> list[tuple[str, int, int, str]]:
        """(bind, host port, guest port, protocol) of each published port as bound: a host
        port of 0 in the config is the one the kernel chose."""
        bound = self.ports.published if self.ports is not None else self._published
        return [(str(p.bind), p.host_port, p.guest_port, p.protocol) for p in bound]

    def resolv_conf(self) -> str:
        """The guest's /etc/resolv.conf. Queries to any resolver are diverted anyway; the
        gateway is named so that tools which insist on a nameserver line have one."""
        if self.gateway_ipv4 is None:
            return ""
        return f"nameserver {self.gateway_ipv4}\noptions timeout:2 attempts:2\n"

    def guest_trust(self) -> GuestTrust | None:
        """What the guest's rootfs and environment need to trust the interception CA (its
        certificate only; the key never leaves this process), or None when interception is
        off. ``trust_host_cas`` adds the host's bundle."""
        if self.tls_settings is None:
            return None
        host = read_host_bundle() if self.config.trust_host_cas else None
        return GuestTrust(self.tls_settings.ca.cert_pem, host)

    def guest_files(self, rootfs: Path) -> dict[str, bytes]:
        """Files to write into the guest (guest path -> content, after its pivot, like
        /etc/hosts) so it trusts the interception CA: the image's bundles (``rootfs`` is the
        image's tree on the host, read as it is) with the CA appended, created when missing,
        and the CA alone where update-ca-certificates / update-ca-trust look. Empty when
        interception is off."""
        trust = self.guest_trust()
        if trust is None:
            return {}
        state = rootfs_state(rootfs, (*GUEST_BUNDLE_PATHS, *GUEST_CA_ANCHORS))
        return {w.path: w.content for w in trust.files(state)}

    def guest_environment(self) -> dict[str, str]:
        """Variables pointing the guest's TLS stacks at that bundle (SSL_CERT_FILE,
        REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE, NODE_EXTRA_CA_CERTS); empty when off."""
        trust = self.guest_trust()
        return {} if trust is None else trust.environment()

    def tls_summary(self) -> dict[str, object] | None:
        """What ``corral inspect`` may show of interception: the CA's fingerprint, the secret
        names (never a value, never the CA key); None when off."""
        s = self.tls_settings
        if s is None:
            return None
        return {
            "ca_fingerprint": s.ca.fingerprint,
            "ca_generated": s.ca.generated,
            "intercepted_ports": sorted(s.ports),
            "bypass": list(s.bypass),
            "secrets": list(s.secrets.names),
        }

    def _terminate(self, reason: str) -> None:
        _log.warning("sandbox %s: %s", self.sandbox_id, reason)
        if self.on_terminate is not None:
            self.on_terminate(reason)

    # -- step 2 -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Bring the link up and start diverting; NetworkError (after cleaning up) on failure."""
        if self.slot is None:
            return
        if self._closed:
            raise NetworkError(f"the network of sandbox {self.sandbox_id} was already closed")
        try:
            self._start(self.slot)
        except BaseException:
            await self.close()
            raise

    def _start(self, slot: Slot) -> None:
        names = self.names
        gateways: list[IPAddress] = [slot.gateway_ipv4]
        guests: list[IPAddress] = [slot.guest_ipv4]
        pools: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = [
            ipaddress.IPv4Network(self.config.ipv4_pool)
        ]
        if slot.gateway_ipv6 is not None and slot.guest_ipv6 is not None:
            gateways.append(slot.gateway_ipv6)
            guests.append(slot.guest_ipv6)
            pools.append(ipaddress.IPv6Network(self.config.ipv6_pool))
        plumbing.create_link(names, slot, self.mtu)
        # Other sandboxes' gateways (inside the pools) are left out of the group ``host``:
        # "another sandbox's address" refuses them first anyway, and with them the group,
        # its prefilter sets and the table grew with every running sandbox (docs/network.md).
        inside_pools = [network_span(str(p)) for p in pools]
        host_addresses = [*plumbing.host_addresses(inside_pools), *gateways]
        policy = self._policy
        if policy is None:
            policy = Policy.compile(self.config, host_addresses=host_addresses)
        self._audit = AuditLog(self.sandbox_id, self.state_dir, log_allowed=self.log_allowed)
        self.gate = FlowGate(
            sandbox=self.sandbox_id,
            policy=policy,
            gateways=gateways,
            pools=pools,
            max_connections=self.config.effective_max_connections,
            audit=self._audit,
            host_addresses=host_addresses,
            leased=self.pool.leased_networks,
            pins=self.pins,
            tls_interception=self.tls_settings is not None,
        )
        pipes = PipePool()
        interceptor = None
        if self.tls_settings is not None:
            interceptor = TlsInterceptor(
                self.tls_settings, self._audit, connect_timeout=self.connect_timeout,
                on_terminate=self._terminate,
            )  # fmt: skip
            # CONNECT names are resolved the way the guest would: a query from the guest's
            # own address in its netns to the sandbox's DNS interceptor (policy, pins).
            interceptor.resolver_at = (names.netns_path, slot.guest_ipv4, slot.gateway_ipv4)
        self.tcp = TcpProxy(
            self.gate, guests, gateways, pipes=pipes, connect_timeout=self.connect_timeout,
            tls=interceptor,
        )  # fmt: skip
        self._parts.append(self.tcp)
        quic = self.tls_settings
        self.udp = UdpRelay(
            self.gate, guests, gateways,
            blocked_ports=quic.ports if quic is not None and quic.block_quic else frozenset(),
        )  # fmt: skip
        self._parts.append(self.udp)
        self.icmp = IcmpRelay(self.gate, names.link, guests, ipv6=slot.ipv6 is not None)
        self._parts.append(self.icmp)
        self.ports = PublishedPorts(self.gate, slot.guest_ipv4, self._published)
        self._published = []
        self._parts.append(self.ports)
        # DNS: every query to port 53 of any address is answered here (docs/network.md "DNS").
        # A test double of a policy cannot decide queries: the config's own policy does.
        dns_policy = (
            policy
            if isinstance(policy, Policy)
            else Policy.compile(self.config, host_addresses=host_addresses)
        )
        self.dns = DnsInterceptor(
            sandbox=self.sandbox_id,
            policy=dns_policy,
            pins=self.pins,
            gateways=gateways,
            guests=guests,
            upstreams=upstreams_for(self.config),
            query_timeout=query_timeout_for(self.config),
            audit=self._audit,
            ipv6=slot.ipv6 is not None,
            on_pinned=self.pinned,
        )
        self._parts.append(self.dns)
        prefilter: Prefilter | None = None
        log_group: int | None = None
        if isinstance(policy, Policy):
            # Certain denials are rejected by the kernel before the handshake; their audit
            # events come back through NFLOG. Without an NFLOG group (other processes hold
            # every candidate) there is no prefilter: the proxy decides and audits it all.
            candidate = compile_prefilter(
                policy.rules, policy.default_egress, policy.host,
                pools=pools, gateways=gateways, ipv6=slot.ipv6 is not None,
                connect_port=CONNECT_PROXY_PORT if self.tls_settings is not None else None,
                tls_interception=self.tls_settings is not None,
            )  # fmt: skip
            for group in nflog.candidate_groups(slot.number):
                try:
                    self._parts.append(nflog.RejectAudit(self.gate, candidate, group))
                except (OSError, NetworkError):
                    continue  # held by another process of this namespace: the next one
                prefilter, log_group = candidate, group
                break
            else:
                _log.warning(
                    "sandbox %s: no free NFLOG group among %s: no kernel prefilter, the "
                    "proxy decides every flow", self.sandbox_id, nflog.candidate_groups(slot.number),
                )  # fmt: skip
            if prefilter is not None and prefilter.uses_pins:
                self._pinned_sets = {v: f"pf_{n}" for v, n in PINNED_SETS.items()}
        for part in self._parts:
            part.start()
        firewall.apply(
            firewall.FirewallSpec(
                table=names.table,
                link=names.link,
                guest_ipv4=slot.guest_ipv4,
                gateway_ipv4=slot.gateway_ipv4,
                guest_ipv6=slot.guest_ipv6,
                gateway_ipv6=slot.gateway_ipv6,
                tcp_port_v4=self.tcp.ports[4],
                udp_port_v4=self.udp.ports[4],
                tcp_port_v6=self.tcp.ports.get(6),
                udp_port_v6=self.udp.ports.get(6),
                dns_tcp_port_v4=self.dns.ports[4]["tcp"],
                dns_udp_port_v4=self.dns.ports[4]["udp"],
                dns_tcp_port_v6=self.dns.ports[6]["tcp"] if 6 in self.dns.ports else None,
                dns_udp_port_v6=self.dns.ports[6]["udp"] if 6 in self.dns.ports else None,
                prefilter=prefilter,
                log_group=log_group,
            ),
            # The sandbox's own netns has no table: beside many sandboxes the table is built
            # there and replayed here (firewall.apply; libnftables' cache fill grows with
            # every sandbox's table in this namespace).
            build_in=names.netns_path,
        )

    def pinned(self, entries: list[tuple[IPAddress, float]]) -> None:
        """The DNS interceptor pinned (or extended) these addresses, each for the seconds
        given: put them in the prefilter's pinned sets *before* the answer leaves for the
        guest, so its first SYN to them reaches the proxy instead of a reject. The element's
        timeout is never shorter than the pin (re-adding an element updates its timeout on
        this kernel; see docs/network.md), so the kernel never refuses what the proxy would
        allow. One netlink transaction per family and answer (``nftables.add_elements``)."""
        sets = self._pinned_sets
        if sets is None or not entries or self._closed:
            return
        by_family: dict[int, list[tuple[IPAddress, int]]] = {4: [], 6: []}
        for address, seconds in entries:
            address = unmap(address)
            ms = max(1000, math.ceil(seconds * 1000) + PINNED_SET_SLACK_MS)
            by_family[address.version].append((address, ms))
        for version, items in by_family.items():
            if not items or version not in sets:
                continue
            try:
                nftables.add_elements(self.names.table, sets[version], items)
            except NetworkError as exc:
                # The proxy still decides these flows correctly: it resets after the
                # handshake what the kernel would have refused before it.
                _log.warning("pinning %d addresses in nftables failed: %s", len(items), exc)

    # -- step 3 -----------------------------------------------------------------------------
    def quiesce(self) -> None:
        """The first step of a stop, while the init is still being stopped. Nothing to do any
        more: the ICMP relay's packet sockets, whose close waits for an RCU grace period, are
        no longer closed during the stop at all (:meth:`close` with ``linger``). Kept for the
        supervisor that still calls it."""

    async def close(self, *, leave_link: bool = False, linger: bool | None = None) -> None:
        """Stop every proxy and remove every kernel object and the lease. Idempotent.

        ``leave_link``: the sandbox's processes are gone (its supervisor stopped the init), so
        the veth is left to the kernel, which destroys it with the unreferenced namespace in
        the background instead of making this call wait ~30 ms for an RCU grace period
        (plumbing.remove). Nothing can send on it any more; a namesake created before it is
        gone deletes it itself (reserve's leftover check).

        ``linger`` (default: as ``leave_link``; a supervisor that exits right after): the ICMP
        relay's packet sockets are not closed but kept in :attr:`lingering`. Closing a packet
        socket always waits for an RCU grace period (``packet_release`` calls
        ``synchronize_net``: 8-15 ms here), which a ``remove`` waiting for the stop need not
        wait for: the supervisor answers the stop first and the process's exit (or
        :meth:`close_lingering`) closes them. They hold nothing a namesake needs: the
        sockets are bound to this sandbox's link, which goes with its namespace, and not
        one name or number of the sandbox. The NFLOG socket (which does hold a number, the
        log group a new lease would reuse) is closed *first* instead, before the table's
        delete: a netfilter netlink socket's close waits only while a deleted table's
        destruction is pending, so closed before the delete it does not wait."""
        if linger is None:
            linger = leave_link
        if self._closed:
            return
        self._closed = True
        if self.slot is None:
            return
        parts = list(reversed(self._parts))
        self._parts.clear()
        if linger:
            # The init is dead: no packet can be refused any more, so NFLOG has nothing to
            # report; closed before the table's delete, its close waits for nothing.
            for part in [p for p in parts if isinstance(p, nflog.RejectAudit)]:
                with contextlib.suppress(Exception):
                    part.close()
                parts.remove(part)
            self.lingering = [p for p in parts if isinstance(p, IcmpRelay)]
            parts = [p for p in parts if not isinstance(p, IcmpRelay)]
        # The divert goes first: from here on the sandbox's packets are dropped, not proxied.
        with contextlib.suppress(NetworkError):
            firewall.remove(self.names.table)
        # The kernel frees a deleted table after an RCU grace period (8-15 ms here), and
        # closing any nftables/NFLOG netlink socket meanwhile waits for that; so does closing
        # a packet socket, always (the ICMP relay's). The relay goes first, so that the two
        # grace periods elapse together and the NFLOG socket (and, at exit, the process's
        # other netfilter sockets) find nothing left to wait for.
        parts.sort(key=lambda part: not isinstance(part, IcmpRelay))
        for part in parts:
            with contextlib.suppress(Exception):
                part.close()
        for p in self._published:
            p.sock.close()
        self._published = []
        if self._audit is not None:
            self._audit.close()
        keep_link = leave_link or linger
        plumbing.remove(self.names, plumbing.routing_table(self.slot), link=not keep_link)
        self.pool.release(self.sandbox_id)

    def close_lingering(self) -> None:
        """Close what :meth:`close` with ``linger`` left open (waits for the kernel: an RCU
        grace period). Any thread, after the data path's loop is gone; idempotent."""
        parts, self.lingering = self.lingering, []
        for part in parts:
            with contextlib.suppress(Exception):
                part.close()

    # -- audit ------------------------------------------------------------------------------
    def events(self, *, from_start: bool = True) -> AsyncIterator[AuditEvent]:
        """The sandbox's audit events as they are written (tail -f)."""
        return follow(self.audit_path, from_start=from_start)


def cleanup_leftovers(sandbox_id: str, *, pool: AddressPool | None = None) -> None:
    """Remove whatever a dead supervisor left of the sandbox's network: nft table, divert
    rules and table, veth, netns, address lease. Safe to call when nothing is left."""
    pool = pool or AddressPool()
    names = plumbing.names_for(sandbox_id)
    slot = pool.get(sandbox_id)
    with contextlib.suppress(NetworkError):
        firewall.remove(names.table)
    plumbing.remove(names, None if slot is None else plumbing.routing_table(slot))
    pool.release(sandbox_id)
