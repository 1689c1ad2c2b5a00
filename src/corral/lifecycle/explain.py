"""Where a sandbox would carry out a flow's verdict: the kernel's stage or a proxy.

``corral policy explain`` shows, beside the policy's verdict (:mod:`corral.policy.verdict`),
whether the sandbox's nftables prefilter (:mod:`corral.net.prefilter`, compiled from the same
policy) refuses the flow in the kernel before any proxy sees it. The CLI asks here, the layer
that composes the data path, rather than compiling the prefilter itself (docs/design.md,
"Layers"). Pure: nothing is applied to the kernel.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Sequence

from corral.config.values import IPAddress
from corral.policy import Policy


def denied_in_kernel(
    policy: Policy,
    protocol: str,
    address: IPAddress,
    port: int,
    *,
    pools: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
    gateways: Sequence[IPAddress],
    pinned: Collection[IPAddress] = frozenset(),
) -> bool:
    """Whether the prefilter the data path would compile for ``policy`` (the sandbox's
    ``pools`` and ``gateways``) drops this flow in the kernel; ``pinned``: addresses its DNS
    pinned, which the prefilter leaves to the proxy."""
    from corral.net.prefilter import compile_prefilter, evaluate

    prefilter = compile_prefilter(
        policy.rules, policy.default_egress, policy.host, pools=pools, gateways=gateways
    )
    return evaluate(prefilter, protocol, address, port, pinned)
