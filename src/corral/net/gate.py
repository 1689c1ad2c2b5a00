"""Where a flow of the data path is decided: one place for the TCP proxy, the UDP relay, the
ICMP relay and the published ports.

The policy engine (:mod:`corral.policy`) answers "may this flow pass, and by which rule?".
The gate adds what is the data path's own business and holds whatever the policy says:

- an address of another sandbox (anything in this sandbox's pools, or in a slot leased to any
  sandbox, but this sandbox's own gateway) is always denied, before the policy is asked (SPEC:
  sandboxes never reach each other directly; the firewall's output chain enforces the same in
  the kernel);
- an allowed flow to the sandbox's gateway is delivered to the host's loopback, same port;
- ``max_connections`` counts TCP connections plus UDP flows from the sandbox, exactly: a
  slot is taken before the upstream is dialled and given back when the flow ends;
- every denial (and every allow when asked) becomes an audit event.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from corral.config import PolicyDirection, PolicyProtocol
from corral.net.audit import AuditLog
from corral.policy import Flow

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

LOOPBACK_V4 = ipaddress.IPv4Address("127.0.0.1")
LOOPBACK_V6 = ipaddress.IPv6Address("::1")

#: Audit events for "over max_connections" per second at most: a guest opening thousands of
#: UDP flows must not turn the audit file into its own denial of service. The events that are
#: suppressed are counted and reported in the next one.
LIMIT_EVENTS_PER_SECOND = 10

#: DNS: the preset rule "allow egress host udp,tcp 53" exists to reach the sandbox's own
#: resolver (the DNS interceptor, a later piece). Until that interceptor answers on the
#: gateway, port 53 of the gateway and of every host address is refused, so the rule never
#: opens the host's own DNS service to the sandbox. Port 53 of other destinations is decided like any other flow.
DNS_PORT = 53
_NO_RESOLVER = "port 53 of the host is reserved for corral's DNS interceptor (not running yet)"

_EGRESS = PolicyDirection.EGRESS
_INGRESS = PolicyDirection.INGRESS
_PROTOCOLS = {p.value: p for p in PolicyProtocol}


class Decision(Protocol):
    @property
    def action(self) -> Any: ...
    @property
    def rule(self) -> int | None: ...
    @property
    def reason(self) -> str: ...


class Decider(Protocol):
    def decide(self, flow: Any) -> Decision: ...


def unmap(addr: IPAddress) -> IPAddress:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@dataclass(frozen=True, slots=True)
class Verdict:
    """The gate's answer: pass to ``target`` (address to dial), or not."""

    allowed: bool
    target: IPAddress | None
    rule: int | None
    reason: str


class FlowGate:
    """Decides flows for one sandbox; see the module docstring."""

    def __init__(
        self,
        *,
        sandbox: str,
        policy: Decider,
        gateways: list[IPAddress],
        pools: list[IPNetwork],
        max_connections: int,
        audit: AuditLog,
        host_addresses: list[IPAddress] | None = None,
        leased: Callable[[], list[IPNetwork]] | None = None,
        flow_type: Any = None,
    ) -> None:
        if flow_type is None:
            flow_type = Flow
        self.sandbox = sandbox
        self.policy = policy
        self.gateways = frozenset(gateways)
        self.host_addresses = frozenset(unmap(a) for a in host_addresses or ()) | self.gateways
        self.pools = pools
        self.leased = leased
        self.max_connections = max_connections
        self.active = 0
        self.audit = audit
        self._flow = flow_type
        self._limit_window = 0.0
        self._limit_events = 0
        self._limit_suppressed = 0

    # -- counting ---------------------------------------------------------------------------
    def try_acquire(self, protocol: str, source: str, destination: IPAddress, port: int) -> bool:
        """Take a connection slot; False (and an audit event) when ``max_connections`` is reached."""
        if self.active < self.max_connections:
            self.active += 1
            return True
        now = time.monotonic()
        if now - self._limit_window >= 1.0:
            self._limit_window = now
            self._limit_events = 0
        if self._limit_events < LIMIT_EVENTS_PER_SECOND:
            self._limit_events += 1
            extra = f" ({self._limit_suppressed} more not logged)" if self._limit_suppressed else ""
            self._limit_suppressed = 0
            self.audit.record(
                direction="egress",
                protocol=protocol,
                source=source,
                destination=str(destination),
                port=port,
                action="deny",
                reason=f"max_connections ({self.max_connections}) reached{extra}",
            )
        else:
            self._limit_suppressed += 1
        return False

    def release(self) -> None:
        self.active -= 1

    # -- deciding ---------------------------------------------------------------------------
    def egress(
        self,
        protocol: str,
        source: str,
        destination: IPAddress,
        port: int | None,
        *,
        audit: bool = True,
    ) -> Verdict:
        """Decide a flow from the sandbox to ``destination`` (as the guest addressed it)."""
        addr = unmap(destination)
        if addr not in self.gateways and self._is_other_sandbox(addr):
            verdict = Verdict(False, None, None, "another sandbox's address is never reachable")
        elif port == DNS_PORT and addr in self.host_addresses:
            verdict = Verdict(False, None, None, _NO_RESOLVER)
        else:
            flow = self._flow(
                direction=_EGRESS,
                protocol=_PROTOCOLS[protocol],
                address=addr,
                port=port,
                names=frozenset(),
                sni=None,
            )
            d = self.policy.decide(flow)
            allowed = str(d.action) == "allow"
            target: IPAddress | None = None
            if allowed:
                if addr in self.gateways:
                    target = LOOPBACK_V4 if addr.version == 4 else LOOPBACK_V6
                else:
                    target = addr
            verdict = Verdict(allowed, target, d.rule, d.reason)
        if audit:
            self._record("egress", protocol, source, str(destination), port, verdict)
        return verdict

    def record_egress(
        self, protocol: str, source: str, destination: str, port: int | None, verdict: Verdict
    ) -> None:
        """Audit an egress decision made elsewhere (the kernel prefilter's rejects)."""
        self._record("egress", protocol, source, destination, port, verdict)

    def _is_other_sandbox(self, addr: IPAddress) -> bool:
        """In this sandbox's pools, or in a slot leased to any sandbox (other pools too)."""
        if any(addr in pool for pool in self.pools):
            return True
        return self.leased is not None and any(addr in net for net in self.leased())

    def ingress(self, protocol: str, peer: IPAddress, guest: str, guest_port: int) -> Verdict:
        """Decide an inbound connection or UDP peer on a published port."""
        flow = self._flow(
            direction=_INGRESS,
            protocol=_PROTOCOLS[protocol],
            address=unmap(peer),
            port=guest_port,
            names=frozenset(),
            sni=None,
        )
        d = self.policy.decide(flow)
        verdict = Verdict(str(d.action) == "allow", None, d.rule, d.reason)
        self.audit.record(
            direction="ingress",
            protocol=protocol,
            source=str(peer),
            destination=guest,
            port=guest_port,
            action="allow" if verdict.allowed else "deny",
            rule=verdict.rule,
            reason=verdict.reason,
        )
        return verdict

    def _record(
        self,
        direction: str,
        protocol: str,
        source: str,
        destination: str,
        port: int | None,
        v: Verdict,
    ) -> None:
        self.audit.record(
            direction=direction,
            protocol=protocol,
            source=source,
            destination=destination,
            port=port,
            action="allow" if v.allowed else "deny",
            rule=v.rule,
            reason=v.reason,
        )
