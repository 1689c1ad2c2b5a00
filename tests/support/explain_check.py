"""Holds ``corral policy explain`` to what the data path did: every audited flow of a
:class:`corral.net.SandboxNetwork` is explained again (the same function the CLI runs) and
must get the same action, rule and reason.

Used by the data-path fixtures at the end of every test (tests/integration/test_net_datapath.py
``make_net``, which every data-path test module shares), while the test's networks are still
up: their audit logs hold every flow the test made (allows too: the fixture logs them).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from corral.config import PolicyDirection, PolicyProtocol
from corral.config.network import DNS_PORT
from corral.net.audit import read_events
from corral.net.tls_interceptor import REASON_PREFIX as INTERCEPTION


def mismatches(net: Any) -> list[str]:
    """One line per audited flow whose explanation differs from what the data path did."""
    from corral.cli.policy import explain_flow

    gate = net.gate
    if gate is None:
        return []
    out: list[str] = []
    others = list(net.pool.leased_networks())
    for e in read_events(net.audit_path):
        if "max_connections" in e.reason:
            continue  # a count, not a verdict: explain has no connections to count
        if e.reason.startswith(INTERCEPTION):
            continue  # after the verdict (TLS interception, secrets): not a verdict to replay
        protocol = PolicyProtocol(e.protocol)
        if e.port == DNS_PORT and protocol in (PolicyProtocol.UDP, PolicyProtocol.TCP):
            name = e.names[0] if e.names else ""
            d = gate.policy.decide_query(name, protocol)
            want = (d.action.value, d.rule, f"DNS query for {name or '.'}: {d.reason}")
            # Rate-limited audit adds "(N more DNS events not logged)": not the verdict's.
            got = (e.action, e.rule, re.sub(r" \(\d+ more DNS events not logged\)$", "", e.reason))
            if got != want and not (e.action == "deny" and d.allowed):
                # A query the policy allows can still be refused after it (rebinding, an
                # upstream failure): those are the interceptor's, not the policy's, denials.
                out.append(f"query {name}: data path {got}, explain {want}")
            continue
        direction = PolicyDirection(e.direction)
        address = ipaddress.ip_address(e.destination if direction is PolicyDirection.EGRESS else e.source)
        pinned = frozenset(e.names)
        _, v, _ = explain_flow(
            net.config,
            protocol,
            address,
            e.port,
            direction=direction,
            names=pinned,
            sni=e.revealed,
            gateways=sorted(gate.gateways, key=str),
            host_addresses=sorted(gate.host_addresses, key=str),
            others=others,
        )
        if (v.action, v.rule, v.reason) != (e.action, e.rule, e.reason):
            out.append(
                f"{e.direction} {e.protocol} {e.destination}:{e.port} names={e.names} "
                f"revealed={e.revealed}: data path {(e.action, e.rule, e.reason)}, "
                f"explain {(v.action, v.rule, v.reason)}"
            )
    return out
