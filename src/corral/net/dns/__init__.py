"""The DNS interceptor of a sandbox (SPEC 4 "DNS"): every query the guest sends, to any
resolver address over UDP or TCP port 53, is answered here.

- :mod:`corral.net.dns.wire`: guest-side wire format (query parser, TCP framer, templates);
- :mod:`corral.net.dns.resolver`: :class:`SandboxResolver`, every decision, no I/O;
- :mod:`corral.net.dns.cache`: the per-sandbox answer cache;
- :mod:`corral.net.dns.upstreams`: the resolver list (config, or the host's resolv.conf);
- :mod:`corral.net.dns.interceptor`: :class:`DnsInterceptor`, the thin asyncio shell.

docs/network.md ("DNS") records the decisions.
"""

from corral.net.dns.interceptor import DnsInterceptor
from corral.net.dns.resolver import HOST_NAMES, SandboxResolver
from corral.net.dns.upstreams import host_upstreams, parse_resolv_conf, upstreams_for

__all__ = [
    "HOST_NAMES",
    "DnsInterceptor",
    "SandboxResolver",
    "host_upstreams",
    "parse_resolv_conf",
    "upstreams_for",
]
