"""Which resolvers a sandbox's interceptor asks: ``dns.nameservers``, else the host's resolv.conf.

The host's file is read once, when the sandbox's network starts (SPEC: "the host's resolv.conf
read at create time"): a sandbox keeps the resolvers it started with. ``CORRAL_RESOLV_CONF``
names another file (hosts whose resolver list lives elsewhere, and the hermetic test world).
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from corral.config import DEFAULT_DNS_QUERY_TIMEOUT_MS, DNS_PORT, NetworkConfig

#: The host's resolver list.
RESOLV_CONF = Path("/etc/resolv.conf")

#: Environment variable naming another resolv.conf to read instead.
RESOLV_CONF_ENV = "CORRAL_RESOLV_CONF"

#: Nameserver lines used from resolv.conf, like glibc (MAXNS = 3; later lines are ignored).
MAX_RESOLV_NAMESERVERS = 3

#: What glibc asks when resolv.conf names no nameserver (or does not exist): the host itself.
FALLBACK_UPSTREAM = ("127.0.0.1", DNS_PORT)


def parse_resolv_conf(text: str) -> list[tuple[str, int]]:
    """The ``nameserver`` addresses of a resolv.conf, in order, port 53 (the format has no
    port). Lines that are not an IP address are skipped, as glibc skips them; an IPv6
    link-local address keeps its ``%zone``. Empty list when there is none."""
    out: list[tuple[str, int]] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        try:
            addr = ipaddress.ip_address(fields[1])
        except ValueError:
            continue
        out.append((str(addr), DNS_PORT))
        if len(out) == MAX_RESOLV_NAMESERVERS:
            break
    return out


def host_upstreams(path: Path | None = None) -> list[tuple[str, int]]:
    """The host's resolvers (``CORRAL_RESOLV_CONF`` or /etc/resolv.conf), or glibc's fallback."""
    if path is None:
        env = os.environ.get(RESOLV_CONF_ENV)
        path = Path(env) if env else RESOLV_CONF
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return [FALLBACK_UPSTREAM]
    return parse_resolv_conf(text) or [FALLBACK_UPSTREAM]


def upstreams_for(config: NetworkConfig) -> list[tuple[str, int]]:
    """``dns.nameservers`` as (address, port) in order, else the host's resolvers."""
    if config.dns is not None and config.dns.nameservers:
        return [(str(a), p) for a, p in config.dns.upstreams()]
    return host_upstreams()


def query_timeout_for(config: NetworkConfig) -> float:
    """Seconds each upstream try may take (``dns.query_timeout_ms``, default 5000)."""
    ms = (
        config.dns.effective_query_timeout_ms
        if config.dns is not None
        else DEFAULT_DNS_QUERY_TIMEOUT_MS
    )
    return ms / 1000.0
