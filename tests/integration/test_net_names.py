# ruff: noqa: F811  (pytest fixtures imported from test_net_datapath are parameters here)
"""Names on connections: the first-bytes stage of the TCP proxy, the pin set and the kernel's
pinned-address sets, in the hermetic world.

Clients inside the sandbox netns reveal names with real TLS ClientHellos (Python's ssl) and
HTTP/1 Host headers (tests/support/first_bytes.py) to the world's echo and HTTP servers. Pins
are put in here the way the DNS interceptor puts them (``SandboxNetwork.pins.add`` then
``SandboxNetwork.pinned``, on the network's loop); tests/integration/test_net_dns.py does the
same through real DNS answers. Every denial has its positive control on the same server.
"""

from __future__ import annotations

import ipaddress
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from corral.config import DNSConfig, NetworkConfig, PolicyRule
from corral.net.sniff import FIRST_FLIGHT_TIMEOUT
from tests.integration.test_net_datapath import (  # noqa: F401 - fixtures
    PUBLIC2_V4,
    PUBLIC_V4,
    MakeNet,
    events,
    make_net,
    servers,
)
from tests.support.dns_server import RunningDnsServer, start_dns_server
from tests.support.servers import BANNER, BANNER_PORT, ECHO_PORT, HTTP_PORT, RunningNetwork
from tests.support.world import World

pytestmark = pytest.mark.timeout(300)

DNS = PolicyRule(action="allow", destination="host", protocols=["udp", "tcp"], port="53")


def reveal(n: RunningNetwork, kind: str, name: str, addr: str, port: int, timeout: float = 5) -> str:
    argv = [sys.executable, "-m", "tests.support.first_bytes", kind, name, addr, str(port), str(timeout)]
    return n.run(argv, timeout=timeout + 30).stdout.strip()


def pin(n: RunningNetwork, name: str, addr: str, ttl: float = 300) -> None:
    """Pin ``addr`` to ``name`` as the DNS interceptor does (PinSet, then the kernel sets)."""
    address = ipaddress.ip_address(addr)
    n.call(lambda: n.net.pinned(n.net.pins.add([name], [address], ttl)))


def test_revealed_name_alone_hits_a_deny_domain_rule(make_net: MakeNet) -> None:
    """A direct-IP connection to an address an address rule allows, revealing a denied name
    (TLS SNI on any port, HTTP Host), is refused; another name on the same address passes."""
    cfg = NetworkConfig(
        rules=[DNS, PolicyRule(action="deny", destination="evil.example"),
               PolicyRule(action="deny", destination=".bad.example"),
               PolicyRule(action="allow", destination="public")],
        default_egress="deny",
    )  # fmt: skip
    n = make_net(cfg)
    assert reveal(n, "tls", "fine.example", PUBLIC_V4, ECHO_PORT) == "OK echo"
    assert reveal(n, "tls", "-", PUBLIC_V4, ECHO_PORT) == "OK echo"  # no SNI: no name
    assert reveal(n, "tls", "evil.example", PUBLIC_V4, ECHO_PORT).startswith("ERR")
    assert reveal(n, "tls", "EVIL.example.", PUBLIC_V4, ECHO_PORT).startswith("ERR")
    assert reveal(n, "tls", "x.bad.example", PUBLIC_V4, ECHO_PORT).startswith("ERR")
    assert reveal(n, "http", "fine.example", PUBLIC_V4, HTTP_PORT) == "OK HTTP/1.1 200 OK"
    assert reveal(n, "http", "evil.example:80", PUBLIC_V4, HTTP_PORT).startswith("ERR")
    denials = [e for e in events(n) if e["action"] == "deny"]
    assert denials and all(e["rule"] in (1, 2) for e in denials), denials
    assert any(e["revealed"] == "evil.example" for e in denials)


def test_deny_lists_match_the_revealed_name(make_net: MakeNet) -> None:
    cfg = NetworkConfig(
        policy="public-only", deny_domains=["evil.example"], deny_domain_suffixes=[".ads.example"]
    )
    n = make_net(cfg)
    assert reveal(n, "http", "ok.example", PUBLIC_V4, HTTP_PORT) == "OK HTTP/1.1 200 OK"
    assert reveal(n, "http", "evil.example", PUBLIC_V4, HTTP_PORT).startswith("ERR")
    assert reveal(n, "tls", "ads.example", PUBLIC_V4, ECHO_PORT).startswith("ERR")  # the apex too
    assert reveal(n, "tls", "t.ads.example", PUBLIC_V4, ECHO_PORT).startswith("ERR")
    reasons = [str(e["reason"]) for e in events(n) if e["action"] == "deny"]
    assert any("deny_domains[0]" in r for r in reasons)
    assert any("deny_domain_suffixes[0]" in r for r in reasons)


def test_server_first_protocol_is_not_held(make_net: MakeNet) -> None:
    """Under a deny list every allowed connection could be held for its first bytes; an
    upstream that speaks first (an SSH banner) ends the hold at once. The client reads with
    a timeout below the hold's, so a proxy that waited for the client would fail it."""
    n = make_net(NetworkConfig(policy="public-only", deny_domains=["evil.example"]))
    timeout = FIRST_FLIGHT_TIMEOUT * 0.6
    out = reveal(n, "banner", "-", PUBLIC_V4, BANNER_PORT, timeout=timeout)
    assert out == "OK " + BANNER.decode().strip(), out


def test_name_allowed_service_by_pins_and_revealed_name(make_net: MakeNet) -> None:
    """allow api.example: only an address pinned to it is reachable (others are refused by
    the kernel before the handshake), and only when the Host/SNI it reveals is the name."""
    cfg = NetworkConfig(
        rules=[DNS, PolicyRule(action="allow", destination="api.example", protocol="tcp")],
        default_egress="deny",
    )
    n = make_net(cfg)
    # Never resolved: refused before the handshake (ECONNREFUSED, not a reset after it).
    assert reveal(n, "http", "api.example", PUBLIC_V4, HTTP_PORT) == "ERR ECONNREFUSED"
    pin(n, "api.example", PUBLIC_V4)
    assert reveal(n, "http", "api.example", PUBLIC_V4, HTTP_PORT) == "OK HTTP/1.1 200 OK"
    assert reveal(n, "tls", "api.example", PUBLIC_V4, ECHO_PORT) == "OK echo"
    # Host / SNI mismatch on the pinned address.
    assert reveal(n, "http", "other.example", PUBLIC_V4, HTTP_PORT).startswith("ERR")
    assert reveal(n, "tls", "other.example", PUBLIC_V4, ECHO_PORT).startswith("ERR")
    # The allowed name's SNI towards an address it was never pinned to.
    assert reveal(n, "tls", "api.example", PUBLIC2_V4, ECHO_PORT) == "ERR ECONNREFUSED"
    # A server-first protocol to the pinned address works (no name is revealed).
    out = reveal(n, "banner", "-", PUBLIC_V4, BANNER_PORT, timeout=FIRST_FLIGHT_TIMEOUT * 0.6)
    assert out == "OK " + BANNER.decode().strip(), out
    kernel = [e for e in events(n) if "before the handshake" in str(e.get("reason", "")) or e["rule"] is None]
    assert kernel, events(n)


def test_pin_expires_after_its_lifetime(make_net: MakeNet) -> None:
    from corral.policy.pins import MIN_PIN_SECONDS

    cfg = NetworkConfig(
        rules=[DNS, PolicyRule(action="allow", destination="api.example", protocol="tcp")],
        default_egress="deny",
    )
    n = make_net(cfg)
    pin(n, "api.example", PUBLIC_V4, ttl=1)
    assert reveal(n, "http", "api.example", PUBLIC_V4, HTTP_PORT) == "OK HTTP/1.1 200 OK"
    deadline = time.monotonic() + MIN_PIN_SECONDS + 30
    result = ""
    while time.monotonic() < deadline:
        result = reveal(n, "http", "api.example", PUBLIC_V4, HTTP_PORT)
        if result == "ERR ECONNREFUSED":
            break
        time.sleep(0.5)
    assert result == "ERR ECONNREFUSED", result


# -- by name, through the sandbox's own DNS ---------------------------------------------------------

NAMES_DNS_V4 = "203.0.113.154"  # this module's own DNS server (the world's is .153)
ZONES = {
    "zones": ["names.test"],
    "records": [
        ["api.names.test", "A", 300, PUBLIC_V4],
        ["other.names.test", "A", 300, PUBLIC2_V4],
        ["short.names.test", "A", 1, PUBLIC_V4],
        ["cdn.names.test", "CNAME", 300, "edge.names.test"],
        ["edge.names.test", "A", 300, PUBLIC2_V4],
    ],
}


@pytest.fixture(scope="module")
def names_dns(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDnsServer]:
    if f"{NAMES_DNS_V4}/32" not in world.extra_addresses:
        world.add_server_address(f"{NAMES_DNS_V4}/32")
    server = start_dns_server(
        world.spawn_inet, [NAMES_DNS_V4], ZONES, tmp_path_factory.mktemp("names-dns"),
        stop=world.stop_process,
    )  # fmt: skip
    try:
        yield server
    finally:
        server.stop()


def by_name(*rules: PolicyRule, **kw: Any) -> NetworkConfig:
    """A name-allow policy: no "allow host 53" rule, so the domain rules decide the queries
    too (with one, every query is allowed by it: SPEC 4) and other names get NXDOMAIN."""
    return NetworkConfig(
        rules=list(rules), default_egress="deny",
        dns=DNSConfig(nameservers=[NAMES_DNS_V4], query_timeout_ms=2000), **kw,
    )  # fmt: skip


def curl(n: RunningNetwork, *args: str) -> str:
    out = n.run(["curl", "-sS", "-m", "5", *args], timeout=40)
    return out.stdout.strip() if out.returncode == 0 else f"ERR {out.returncode} {out.stderr.strip()}"


def test_allowed_name_is_reachable_by_name_and_only_by_it(make_net: MakeNet, names_dns: RunningDnsServer) -> None:
    n = make_net(by_name(PolicyRule(action="allow", destination="api.names.test", protocol="tcp")))
    # Never resolved: the address is refused before the handshake, even with the right Host.
    assert reveal(n, "http", "api.names.test", PUBLIC_V4, HTTP_PORT) == "ERR ECONNREFUSED"
    assert curl(n, "http://api.names.test/") == f"reached {PUBLIC_V4}:80"
    # Now pinned: the bare address (curl's Host is the address, not the name) is refused,
    assert curl(n, f"http://{PUBLIC_V4}/").startswith("ERR")
    # as is another name on the pinned address (Host mismatch) and the name's SNI elsewhere.
    assert reveal(n, "http", "other.names.test", PUBLIC_V4, HTTP_PORT).startswith("ERR")
    assert reveal(n, "tls", "api.names.test", PUBLIC_V4, ECHO_PORT) == "OK echo"
    assert reveal(n, "tls", "evil.example", PUBLIC_V4, ECHO_PORT).startswith("ERR")
    assert reveal(n, "tls", "api.names.test", PUBLIC2_V4, ECHO_PORT) == "ERR ECONNREFUSED"
    # A name the policy does not allow: NXDOMAIN, and it never reached the upstream.
    assert curl(n, "http://other.names.test/").startswith("ERR 6")  # could not resolve
    assert "other.names.test" not in names_dns.names()
    # A server-first protocol by name works at once.
    timeout = FIRST_FLIGHT_TIMEOUT * 0.6
    script = (
        f"import socket;s=socket.create_connection(('api.names.test',{BANNER_PORT}),"
        f"timeout={timeout!r});print(s.recv(64))"
    )
    out = n.run([sys.executable, "-c", script]).stdout.strip()
    assert out == repr(BANNER), out


def test_cname_chain_pins_the_final_address_to_every_name(make_net: MakeNet, names_dns: RunningDnsServer) -> None:
    n = make_net(by_name(PolicyRule(action="allow", destination="cdn.names.test", protocol="tcp")))
    assert curl(n, "http://cdn.names.test/") == f"reached {PUBLIC2_V4}:80"


def test_suffix_rule_by_name(make_net: MakeNet, names_dns: RunningDnsServer) -> None:
    n = make_net(by_name(PolicyRule(action="allow", destination=".names.test", protocol="tcp", port="80")))
    assert curl(n, "http://api.names.test/") == f"reached {PUBLIC_V4}:80"
    assert curl(n, "http://other.names.test/") == f"reached {PUBLIC2_V4}:80"
    # The suffix never matches its apex, and port 7 is not allowed by the rule.
    assert reveal(n, "http", "names.test", PUBLIC_V4, HTTP_PORT).startswith("ERR")
    assert reveal(n, "tls", "api.names.test", PUBLIC_V4, ECHO_PORT) == "ERR ECONNREFUSED"


def test_pin_of_a_short_ttl_answer_expires(make_net: MakeNet, names_dns: RunningDnsServer) -> None:
    from corral.policy.pins import MIN_PIN_SECONDS

    n = make_net(by_name(PolicyRule(action="allow", destination="short.names.test", protocol="tcp")))
    assert curl(n, "http://short.names.test/") == f"reached {PUBLIC_V4}:80"
    deadline = time.monotonic() + MIN_PIN_SECONDS + 30
    result = ""
    while time.monotonic() < deadline:
        result = reveal(n, "http", "short.names.test", PUBLIC_V4, HTTP_PORT)
        if result == "ERR ECONNREFUSED":
            break
        time.sleep(0.5)
    assert result == "ERR ECONNREFUSED", result
    assert curl(n, "http://short.names.test/") == f"reached {PUBLIC_V4}:80"  # resolved again


def test_host_name_reaches_the_hosts_service_when_host_is_allowed(make_net: MakeNet) -> None:
    n = make_net(by_name(PolicyRule(action="allow", destination="host", protocol="tcp", port="80")))
    # curl tries the gateway's IPv6 address first: the host's ::1 answers then.
    assert curl(n, "http://host.corral.internal/") in ("reached 127.0.0.1:80", "reached ::1:80")
    assert curl(n, "-4", "http://host.corral.internal/") == "reached 127.0.0.1:80"
    n2 = make_net(by_name())
    assert curl(n2, "http://host.corral.internal/").startswith("ERR")
