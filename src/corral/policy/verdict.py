"""The one verdict: what a sandbox's data path does with a flow. Pure.

The engine (:mod:`corral.policy.engine`) answers "what do the rules say?". The data path adds
facts of its own, and this module joins both into one answer, used by the data path's gate
(:mod:`corral.net.gate`, which only adds the I/O: audit writes, the clock, the lease file)
and by ``corral policy explain``, so that explain says what the data path does:

1. TCP and UDP to port 53, whatever the address, never leave: the firewall diverts them to the
   sandbox's DNS interceptor, and each *query* is decided by its name
   (:meth:`Policy.decide_query`).
2. DNS over TLS (TCP 853) is refused while TLS interception is off (SPEC 4: it is terminated
   like other TLS when interception is on).
3. Another sandbox's address (this sandbox's pools, every slot leased to any sandbox) is
   denied whatever the policy says, allow-all included; this sandbox's own gateway is the
   ``host`` group.
4. Then the rules, with the names the sandbox's own resolver pinned to the address and, once
   the connection revealed one, the revealed name (TLS SNI, HTTP Host, ``:authority``). A
   revealed name on the deny lists is denied; a revealed name that is not a valid host name
   is denied wherever a name could matter.
5. An allowed flow to the gateway is delivered to the host's loopback, same port.

When the first bytes have not been read yet (``revealed`` None), ``wait_for_name`` says
whether a name the connection may reveal could still change the outcome: only then does the
TCP proxy hold the connection for its first bytes; otherwise it dials at once, so server-first
protocols (SSH, SMTP) work under domain rules.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from corral.config import PolicyDirection, PolicyProtocol
from corral.config.values import IPAddress
from corral.config.values import unmap as unmap  # re-exported: gate, datapath
from corral.policy.engine import DNS_PORT, Flow, Policy
from corral.policy.names import normalize_name

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: DNS over TLS (RFC 7858).
DOT_PORT = 853

LOOPBACK_V4 = ipaddress.IPv4Address("127.0.0.1")
LOOPBACK_V6 = ipaddress.IPv6Address("::1")

#: Who handles a flow: the DNS interceptor answers port 53 itself; everything else is
#: decided here and carried (or refused) by the proxies.
BY_DNS = "dns-interceptor"
BY_PROXY = "proxy"

OTHER_SANDBOX = "another sandbox's address is never reachable"
DNS_ANSWERED = (
    "port 53 is answered by the sandbox's own DNS interceptor (nothing reaches another "
    "resolver); each query is decided by its name"
)
DOT_REFUSED = "DNS over TLS (TCP 853) is refused while TLS interception is off"

_TCP = PolicyProtocol.TCP
_UDP = PolicyProtocol.UDP
_EGRESS = PolicyDirection.EGRESS
_INGRESS = PolicyDirection.INGRESS


@dataclass(frozen=True, slots=True)
class SandboxView:
    """What the verdict knows of the sandbox besides its policy.

    ``gateways``: the sandbox's own gateway addresses (group ``host``, delivered to the
    host's loopback); ``others``: networks of other sandboxes (the pools and every leased
    slot; the gateways are excepted); ``tls_interception``: whether TLS is intercepted.
    """

    gateways: frozenset[IPAddress] = frozenset()
    others: tuple[IPNetwork, ...] = ()
    tls_interception: bool = False

    def is_other_sandbox(self, addr: IPAddress) -> bool:
        if addr in self.gateways:
            return False
        return any(addr.version == n.version and addr in n for n in self.others)


@dataclass(frozen=True, slots=True)
class Revealed:
    """The name a connection revealed in its first bytes (None: it revealed none);
    ``valid`` False when what it revealed is not a valid host name, is contradictory, or
    was cut off; ``raw``: a printable form of an invalid name, for the reason."""

    name: str | None
    valid: bool = True
    raw: str | None = None


@dataclass(frozen=True, slots=True)
class FlowVerdict:
    """The answer about one flow.

    ``target``: the address to dial when allowed (the gateway becomes loopback); ``rule``:
    the deciding rule's index in ``Policy.rules`` (None: a default, a deny list or a fact of
    the data path); ``names``: the names the sandbox's DNS pinned to the address;
    ``revealed``: the name the connection revealed, when it was read; ``wait_for_name``: read the first bytes before deciding (see the module
    docstring); ``handled_by``: :data:`BY_DNS` or :data:`BY_PROXY`.
    """

    allowed: bool
    target: IPAddress | None
    rule: int | None
    reason: str
    names: tuple[str, ...] = ()
    wait_for_name: bool = False
    handled_by: str = BY_PROXY
    revealed: str | None = None  # the revealed name the decision used (normalised)

    @property
    def action(self) -> str:
        return "allow" if self.allowed else "deny"

    def to_dict(self) -> dict[str, object]:
        return {
            "action": self.action,
            "rule": self.rule,
            "reason": self.reason,
            "names": list(self.names),
            "revealed": self.revealed,
            "wait_for_name": self.wait_for_name,
            "handled_by": self.handled_by,
        }


def _deny(
    reason: str, names: tuple[str, ...] = (), rule: int | None = None, revealed: str | None = None
) -> FlowVerdict:
    return FlowVerdict(False, None, rule, reason, names, revealed=revealed)


def egress(
    policy: Policy,
    view: SandboxView,
    protocol: PolicyProtocol,
    destination: IPAddress,
    port: int | None,
    *,
    names: frozenset[str] = frozenset(),
    revealed: Revealed | None = None,
) -> FlowVerdict:
    """The verdict about a flow from the sandbox to ``destination`` (as the guest addressed
    it). ``names``: the names the sandbox's resolver pinned to the address; ``revealed``:
    None before the first bytes were read, else what they revealed."""
    addr = unmap(destination)
    if port == DNS_PORT and protocol in (_TCP, _UDP):
        return FlowVerdict(True, None, None, DNS_ANSWERED, handled_by=BY_DNS)
    if port == DOT_PORT and protocol is _TCP and not view.tls_interception:
        return _deny(DOT_REFUSED)
    if view.is_other_sandbox(addr):
        return _deny(OTHER_SANDBOX)
    shown = tuple(sorted(names))
    sni: str | None = None
    base = Flow(_EGRESS, protocol, addr, port, names, None)
    if revealed is None:
        d = policy.decide(base)
        wait = protocol is _TCP and policy.name_could_change(base, d)
    else:
        wait = False
        if revealed.name is not None:
            sni = normalize_name(revealed.name)
        if not revealed.valid:
            first = policy.decide(base)
            if policy.name_could_change(base, first):
                what = revealed.raw or revealed.name or "nothing complete"
                return _deny(f"the connection revealed no valid host name ({what})", shown, revealed=sni)
        if sni is not None:
            listed = policy.deny_listed(sni)
            if listed is not None:
                return _deny(listed.reason, shown, revealed=sni)
        d = policy.decide(Flow(_EGRESS, protocol, addr, port, names, sni))
    if not d.allowed:
        return FlowVerdict(False, None, d.rule, d.reason, shown, wait, revealed=sni)
    target: IPAddress = addr
    if addr in view.gateways:
        target = LOOPBACK_V4 if addr.version == 4 else LOOPBACK_V6
    return FlowVerdict(True, target, d.rule, d.reason, shown, wait, revealed=sni)


def ingress(
    policy: Policy, protocol: PolicyProtocol, peer: IPAddress, guest_port: int
) -> FlowVerdict:
    """The verdict about an inbound connection or UDP peer on a published port."""
    d = policy.decide(Flow(_INGRESS, protocol, unmap(peer), guest_port))
    return FlowVerdict(d.allowed, None, d.rule, d.reason)
