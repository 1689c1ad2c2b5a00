"""Where a flow of the data path meets its verdict: one place for the TCP proxy, the UDP relay,
the ICMP relay, the kernel prefilter's audit and the published ports.

The verdict itself is pure and lives in :mod:`corral.policy.verdict` (shared with ``corral
policy explain``). The gate is the I/O around it:

- the sandbox's facts the verdict needs (gateways, other sandboxes' networks, the pin set)
  are held here; the leased slots of other sandboxes are a snapshot refreshed at most every
  :data:`LEASES_REFRESH_SECONDS` (not a lease-file stat per flow; the firewall's output
  chain of every sandbox drops what the host sends to it anyway, so a slot leased a moment
  ago is enforced by the kernel meanwhile);
- ``max_connections`` counts TCP connections plus UDP flows from the sandbox, exactly: a
  slot is taken before the upstream is dialled and given back when the flow ends;
- every denial (and every allow when asked) becomes an audit event, per flow;
- verdicts before any revealed name are remembered per (protocol, destination, port, pinned
  names) while the policy object and the sandbox view stay the same: the verdict is a pure
  function of exactly those, so a connection gets the same answer the function would give
  (its audit event included), at a dict lookup instead of ~8 us of rule matching.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable

from corral.config import PolicyProtocol
from corral.net.audit import AuditLog
from corral.policy import Policy
from corral.policy import verdict as verdicts
from corral.policy.pins import PinSet
from corral.policy.verdict import FlowVerdict, Revealed, SandboxView, unmap

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Audit events for "over max_connections" per second at most: a guest opening thousands of
#: UDP flows must not turn the audit file into its own denial of service. The events that are
#: suppressed are counted and reported in the next one.
LIMIT_EVENTS_PER_SECOND = 10

#: How stale the snapshot of other sandboxes' leased slots may get (see the module docstring).
LEASES_REFRESH_SECONDS = 1.0

#: Remembered verdicts (see the module docstring); the memory is dropped whole when full.
VERDICT_CACHE = 4096

_PROTOCOLS = {p.value: p for p in PolicyProtocol}

#: The gate's answer (kept under its old name for the proxies).
Verdict = FlowVerdict

__all__ = ["FlowGate", "FlowVerdict", "IPAddress", "Revealed", "Verdict", "unmap"]


class FlowGate:
    """Decides flows for one sandbox; see the module docstring."""

    def __init__(
        self,
        *,
        sandbox: str,
        policy: Policy,
        gateways: list[IPAddress],
        pools: list[IPNetwork],
        max_connections: int,
        audit: AuditLog,
        host_addresses: list[IPAddress] | None = None,
        leased: Callable[[], list[IPNetwork]] | None = None,
        pins: PinSet | None = None,
        tls_interception: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sandbox = sandbox
        self.policy = policy
        self.gateways = frozenset(gateways)
        self.host_addresses = frozenset(unmap(a) for a in host_addresses or ()) | self.gateways
        self.pools = list(pools)
        self.leased = leased
        self.pins = pins if pins is not None else PinSet()
        self.tls_interception = tls_interception
        self.max_connections = max_connections
        self.active = 0
        self.audit = audit
        self._clock = clock
        self._leases_at = float("-inf")
        self.view = SandboxView(self.gateways, tuple(self.pools), tls_interception)
        self._limit_window = 0.0
        self._limit_events = 0
        self._limit_suppressed = 0
        self._verdicts: dict[tuple[str, IPAddress, int | None, frozenset[str]], FlowVerdict] = {}
        self._verdicts_for: tuple[object, SandboxView] | None = None

    def _current_view(self) -> SandboxView:
        if self.leased is not None:
            now = self._clock()
            if now - self._leases_at >= LEASES_REFRESH_SECONDS:
                self._leases_at = now
                others = tuple(dict.fromkeys([*self.pools, *self.leased()]))
                if others != self.view.others:
                    self.view = SandboxView(self.gateways, others, self.tls_interception)
        return self.view

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
        revealed: Revealed | None = None,
    ) -> FlowVerdict:
        """Decide a flow from the sandbox to ``destination`` (as the guest addressed it),
        with the names the sandbox's resolver pinned to it; ``revealed``: see
        :func:`corral.policy.verdict.egress`. A verdict that waits for a name is not
        audited (the final one is)."""
        view = self._current_view()
        names = self.pins.names_for(unmap(destination))
        if revealed is not None:
            v = verdicts.egress(
                self.policy, view, _PROTOCOLS[protocol], destination, port,
                names=names, revealed=revealed,
            )  # fmt: skip
        else:
            memo = self._verdicts
            facts = self._verdicts_for
            if facts is None or facts[0] is not self.policy or facts[1] is not view:
                memo.clear()
                self._verdicts_for = (self.policy, view)
            key = (protocol, destination, port, names)
            found = memo.get(key)
            if found is None:
                found = verdicts.egress(
                    self.policy, view, _PROTOCOLS[protocol], destination, port, names=names
                )
                if len(memo) >= VERDICT_CACHE:
                    memo.clear()
                memo[key] = found
            v = found
        if audit and not v.wait_for_name and (not v.allowed or self.audit.log_allowed):
            self._record("egress", protocol, source, str(destination), port, v)
        return v

    def record_egress(
        self, protocol: str, source: str, destination: str, port: int | None, verdict: FlowVerdict
    ) -> None:
        """Audit an egress decision made elsewhere (the kernel prefilter's rejects)."""
        self._record("egress", protocol, source, destination, port, verdict)

    def ingress(self, protocol: str, peer: IPAddress, guest: str, guest_port: int) -> FlowVerdict:
        """Decide an inbound connection or UDP peer on a published port."""
        v = verdicts.ingress(self.policy, _PROTOCOLS[protocol], peer, guest_port)
        self._record("ingress", protocol, str(peer), guest, guest_port, v)
        return v

    def _record(
        self,
        direction: str,
        protocol: str,
        source: str,
        destination: str,
        port: int | None,
        v: FlowVerdict,
    ) -> None:
        self.audit.record(
            direction=direction,
            protocol=protocol,
            source=source,
            destination=destination,
            port=port,
            action=v.action,
            rule=v.rule,
            reason=v.reason,
            names=list(v.names),
            revealed=v.revealed,
        )
