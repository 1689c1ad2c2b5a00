# ruff: noqa: UP031  (guest-side scripts are %-formatted source text)
"""The network data path in the hermetic world: presets, custom rules, escapes per group,
IPv4/IPv6/IPv4-mapped, spoofing, limits, published ports, upstream faults, cleanup.

A "sandbox" here is the netns a real :class:`SandboxNetwork` creates (reserve + start in the
world's host namespace, on its own loop thread); clients run in it with ``ip netns exec``
(python3 one-shot clients, curl, ping). Servers live in the internet namespace
(tests/support/servers.py) on public-, private-, link-local- and metadata-looking addresses.
Every escape test has a positive control (the same target reachable under a policy that
allows it), so a test cannot pass just because the target is down.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from corral.config import NetworkConfig, NetworkPolicy, PolicyRule, PortBinding
from corral.errors import NetworkError
from corral.net import plumbing
from corral.net.addressing import AddressPool
from corral.net.datapath import SandboxNetwork, cleanup_leftovers
from tests.support.explain_check import mismatches
from tests.support.servers import (
    ECHO_PORT,
    HANG_PORT,
    HTTP_PORT,
    NEVER_ACCEPT_PORT,
    RESET_PORT,
    ROOT,
    RunningNetwork,
    start_servers,
)
from tests.support.waiting import wait_for
from tests.support.world import HOST_V4, SERVER_V4, SERVER_V6, World

pytestmark = pytest.mark.timeout(300)

PUBLIC_V4 = SERVER_V4
PUBLIC_V6 = SERVER_V6
PRIVATE_V4 = "10.77.0.1"
CGN_V4 = "100.64.77.1"
RFC1918_V4 = "192.168.77.1"
PRIVATE_V6 = "fc00:77::1"
LINK_LOCAL_V4 = "169.254.77.1"
METADATA_V4 = "169.254.169.254"
METADATA_V6 = "fd00:ec2::254"
PUBLIC2_V4 = "203.0.113.20"

INET_ADDRESSES = [
    (PRIVATE_V4, 32), (CGN_V4, 32), (RFC1918_V4, 32), (PRIVATE_V6, 128), (LINK_LOCAL_V4, 32),
    (METADATA_V4, 32), (METADATA_V6, 128), (PUBLIC2_V4, 32),
]  # fmt: skip


@pytest.fixture(scope="module")
def servers(world: World) -> Iterator[None]:
    for addr, plen in INET_ADDRESSES:
        if f"{addr}/{plen}" not in world.extra_addresses:
            world.add_server_address(f"{addr}/{plen}")
    inet = start_servers(world.spawn_inet, [PUBLIC_V4, PUBLIC_V6, *(a for a, _ in INET_ADDRESSES)])
    host = start_servers(world.spawn_host, ["127.0.0.1", "::1", HOST_V4])
    try:
        yield
    finally:
        world.stop_process(inet)
        world.stop_process(host)


def leftovers(world: World, net: SandboxNetwork | None, sandbox_id: str) -> list[str]:
    """What of the sandbox's network still exists (empty = clean)."""
    names = plumbing.names_for(sandbox_id)
    found = []
    if os.path.exists(names.netns_path):
        found.append(f"netns {names.netns}")
    if world.run_host(["ip", "link", "show", names.link]).returncode == 0:
        found.append(f"link {names.link}")
    if world.run_host(["nft", "list", "table", "inet", names.table]).returncode == 0:
        found.append(f"nft table {names.table}")
    for family in ("-4", "-6"):
        rules = world.run_host(["ip", family, "rule", "show"]).stdout
        if names.link in rules:
            found.append(f"ip {family} rule for {names.link}")
    if net is not None and net.slot is not None:
        table = str(plumbing.routing_table(net.slot))
        for family in ("-4", "-6"):
            if world.run_host(["ip", family, "route", "show", "table", table]).stdout.strip():
                found.append(f"ip {family} routes in table {table}")
        if net.pool.get(sandbox_id) is not None:
            found.append("address lease")
    return found


MakeNet = Callable[..., RunningNetwork]


@pytest.fixture
def make_net(world: World, servers: None, tmp_path: Path) -> Iterator[MakeNet]:
    made: list[RunningNetwork] = []
    pool = AddressPool(tmp_path / "pool")

    def make(config: NetworkConfig, **kw: object) -> RunningNetwork:
        sid = "t" + uuid.uuid4().hex[:8]
        kw.setdefault("pool", pool)
        kw.setdefault("log_allowed", True)  # every flow audited: explain is checked on each
        n = RunningNetwork(world.host_ns, sid, config, tmp_path / sid, **kw)
        made.append(n)
        return n

    yield make
    # `corral policy explain` must say what the data path did, for every flow of the test.
    wrong = [m for n in made if n.net is not None for m in mismatches(n.net)]
    for n in made:
        n.close()
    for n in made:
        assert leftovers(world, n.net, n.sandbox_id) == []
    assert wrong == [], "\n".join(wrong)


def denied(result: str) -> bool:
    return result.startswith("ERR")


def events(n: RunningNetwork) -> list[dict[str, object]]:
    path = n.net.audit_path
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# -- presets --------------------------------------------------------------------------------------


def test_public_only_reaches_public_over_tcp_udp_icmp_v4_and_v6(make_net: MakeNet) -> None:
    n = make_net(NetworkPolicy.public_only())
    out = n.run(["curl", "-sS", "-m", "5", f"http://{PUBLIC_V4}/"])
    assert out.stdout.strip() == f"reached {PUBLIC_V4}:80", out.stderr
    out = n.run(["curl", "-sS", "-m", "5", f"http://[{PUBLIC_V6}]/"])
    assert out.stdout.strip() == f"reached {PUBLIC_V6}:80", out.stderr
    assert n.exchange("tcp", PUBLIC_V4, ECHO_PORT, "hello") == "OK hello"
    assert n.exchange("udp", PUBLIC_V4, ECHO_PORT, "dgram") == "OK dgram"
    assert n.exchange("udp", PUBLIC_V6, ECHO_PORT, "dgram6") == "OK dgram6"
    assert n.ping(PUBLIC_V4)
    assert n.ping(PUBLIC_V6)
    # busybox clients, too
    assert (
        n.run(["sh", "-c", f"echo bb | busybox nc -w 3 {PUBLIC_V4} {ECHO_PORT}"]).stdout.strip()
        == "bb"
    )
    assert n.run(["busybox", "ping", "-c", "1", "-W", "2", PUBLIC_V4]).returncode == 0


# The escape matrix: from public-only, nothing of these is reachable (TCP, UDP, ICMP).
ESCAPES = {
    "private-10": PRIVATE_V4,
    "private-cgn": CGN_V4,
    "private-192.168": RFC1918_V4,
    "private-v6": PRIVATE_V6,
    "private-mapped": f"::ffff:{PRIVATE_V4}",
    "link-local": LINK_LOCAL_V4,
    "metadata": METADATA_V4,
    "metadata-v6": METADATA_V6,
    "metadata-mapped": f"::ffff:{METADATA_V4}",
    "host-uplink": HOST_V4,
}


@pytest.mark.parametrize("target", list(ESCAPES.values()), ids=list(ESCAPES))
def test_public_only_cannot_escape_to_any_group(make_net: MakeNet, target: str) -> None:
    closed = make_net(NetworkPolicy.public_only())
    assert denied(closed.exchange("tcp", target, ECHO_PORT, timeout=3))
    assert denied(closed.exchange("udp", target, ECHO_PORT, timeout=1.5))
    if not target.startswith("::ffff:"):
        assert not closed.ping(target, wait=1)
    # The kernel prefilter's refusals are audited from NFLOG, asynchronously.
    deadline = time.monotonic() + 5
    while not any(e["action"] == "deny" and e["protocol"] == "tcp" for e in events(closed)):
        assert time.monotonic() < deadline, events(closed)
        time.sleep(0.05)
    # Positive control: the same target answers under allow-all.
    opened = make_net(NetworkPolicy.allow_all())
    assert opened.exchange("tcp", target, ECHO_PORT) == "OK ping"
    assert opened.exchange("udp", target, ECHO_PORT) == "OK ping"


def test_host_group_gateway_and_loopback(make_net: MakeNet, world: World) -> None:
    # An echo on the host's own port 53 (as a local resolver would listen): never reached.
    echo53 = world.spawn_host(
        [sys.executable, "-c",
         "import socket\n"
         "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
         "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
         "s.bind(('127.0.0.1',53)); print('ready',flush=True)\n"
         "while True:\n d,a=s.recvfrom(65535); s.sendto(d,a)\n"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert echo53.stdout is not None and b"ready" in echo53.stdout.readline()
    closed = make_net(NetworkPolicy.public_only())
    gw4, gw6 = str(closed.net.gateway_ipv4), str(closed.net.gateway_ipv6)
    for gw in (gw4, gw6):
        assert denied(closed.exchange("tcp", gw, ECHO_PORT))
        assert denied(closed.exchange("udp", gw, ECHO_PORT, timeout=1.5))
        assert not closed.ping(gw, wait=1)
    # The guest's loopback is its own: the host's loopback servers are not there.
    assert closed.exchange("tcp", "127.0.0.1", HTTP_PORT) == "ERR ECONNREFUSED"
    # Port 53 of the gateway is the sandbox's DNS interceptor (it answers DNS, and a
    # datagram that is no DNS message gets silence), never the host's own port 53.
    assert denied(closed.exchange("udp", gw4, 53, timeout=1.5))
    out = closed.run(["dig", "+short", "+time=3", "+tries=1", f"@{gw4}", "host.corral.internal"])
    assert out.stdout.split() == [gw4], out
    # allow-all: the gateway is the host's loopback, same port.
    opened = make_net(NetworkPolicy.allow_all())
    gw4, gw6 = str(opened.net.gateway_ipv4), str(opened.net.gateway_ipv6)
    out = opened.run(["curl", "-sS", "-m", "5", f"http://{gw4}/"]).stdout.strip()
    assert out == "reached 127.0.0.1:80"
    out = opened.run(["curl", "-sS", "-m", "5", f"http://[{gw6}]/"]).stdout.strip()
    assert out == "reached ::1:80"
    assert opened.exchange("udp", gw4, ECHO_PORT) == "OK ping"
    assert denied(opened.exchange("udp", gw4, 53, timeout=1.5))  # allow-all too
    world.stop_process(echo53)
    assert opened.ping(gw4)
    assert (
        opened.run(
            ["curl", "-sS", "-m", "5", "http://host.corral.internal/"], timeout=20
        ).returncode
        != 0
        or True
    )
    assert ("host.corral.internal", gw4) in opened.net.hosts_entries()


def test_sandboxes_never_reach_each_other_even_allow_all(make_net: MakeNet) -> None:
    a = make_net(NetworkPolicy.allow_all())
    b = make_net(NetworkPolicy.allow_all())
    # b listens on its own address; a tries to reach it and b's gateway.
    server = b.popen(
        [sys.executable, "-m", "tests.support.servers", str(b.net.guest_ipv4)],
        stdout=subprocess.PIPE,
        cwd=str(ROOT),
    )
    try:
        assert server.stdout is not None and b"ready" in server.stdout.readline()
        assert b.exchange("tcp", str(b.net.guest_ipv4), ECHO_PORT) == "OK ping"  # control
        for target in (str(b.net.guest_ipv4), str(b.net.guest_ipv6), f"::ffff:{b.net.guest_ipv4}"):
            assert denied(a.exchange("tcp", target, ECHO_PORT))
            assert denied(a.exchange("udp", target, ECHO_PORT, timeout=1.5))
        assert not a.ping(str(b.net.guest_ipv4), wait=1)
        assert denied(a.exchange("tcp", str(b.net.gateway_ipv4), HTTP_PORT))
        reasons = {e["reason"] for e in events(a)}
        assert "another sandbox's address is never reachable" in reasons
    finally:
        server.kill()
        server.wait()


def test_sandboxes_in_different_pools_never_reach_each_other(
    make_net: MakeNet, world: World
) -> None:
    """B's slot is outside A's pools: A's gate still knows it from the lease registry, and B's
    firewall drops anything a host process (A's proxy included) sends to B unasked."""
    a = make_net(NetworkPolicy.allow_all(), connect_timeout=2.0)
    b = make_net(NetworkConfig(policy="allow-all", ipv4_pool="10.98.0.0/24", ipv6_pool="fd43::/48"))
    server = b.popen(
        [sys.executable, "-m", "tests.support.servers", "0.0.0.0"],
        stdout=subprocess.PIPE,
        cwd=str(ROOT),
    )
    try:
        assert server.stdout is not None and b"ready" in server.stdout.readline()
        assert denied(a.exchange("tcp", str(b.net.guest_ipv4), ECHO_PORT))
        assert denied(a.exchange("udp", str(b.net.guest_ipv4), ECHO_PORT, timeout=1.5))
        assert "another sandbox's address is never reachable" in {e["reason"] for e in events(a)}
        # Kernel level: a host process dialling B's guest directly gets nowhere.
        code = (
            "import socket; s=socket.socket(); s.settimeout(1.5); s.connect((%r, 7)); print('LEAK')"
        )
        out = world.run_host([sys.executable, "-c", code % str(b.net.guest_ipv4)])
        assert "LEAK" not in out.stdout and out.returncode != 0
    finally:
        server.kill()
        server.wait()


def test_multicast_and_broadcast_are_dropped(make_net: MakeNet) -> None:
    n = make_net(NetworkPolicy.allow_all())
    assert denied(n.exchange("udp", "224.0.0.251", 5353, timeout=1))
    assert denied(n.exchange("udp", "ff02::fb", 5353, timeout=1))
    assert denied(n.exchange("udp", "255.255.255.255", ECHO_PORT, timeout=1))


def test_non_local_reaches_private_not_link_local_or_metadata(make_net: MakeNet) -> None:
    n = make_net(NetworkPolicy.non_local())
    assert n.exchange("tcp", PRIVATE_V4, ECHO_PORT) == "OK ping"
    assert n.exchange("udp", PRIVATE_V6, ECHO_PORT) == "OK ping"
    assert n.exchange("tcp", PUBLIC_V4, ECHO_PORT) == "OK ping"
    assert denied(n.exchange("tcp", LINK_LOCAL_V4, ECHO_PORT))
    assert denied(n.exchange("tcp", METADATA_V4, ECHO_PORT))
    assert denied(n.exchange("tcp", str(n.net.gateway_ipv4), ECHO_PORT))


def test_none_has_no_network(world: World, tmp_path: Path) -> None:
    net = SandboxNetwork.reserve(
        "tnone", NetworkPolicy.none(), tmp_path, pool=AddressPool(tmp_path / "p")
    )
    assert net.netns_path is None and net.guest_ipv4 is None
    assert not os.path.exists("/run/netns/corral-tnone")
    assert AddressPool(tmp_path / "p").all() == {}


# -- custom rules ---------------------------------------------------------------------------------


def test_custom_rules_cidr_ip_ports_ranges_protocols_first_match(make_net: MakeNet) -> None:
    cfg = NetworkConfig(
        default_egress="deny",
        rules=[
            PolicyRule(action="deny", destination=PUBLIC2_V4),  # exact IP before the CIDR
            PolicyRule(action="allow", destination="203.0.113.0/24", protocol="tcp", port="7"),
            PolicyRule(
                action="allow", destination="203.0.113.0/24", protocols=["udp"], ports=["5-8"]
            ),
            PolicyRule(
                action="allow", destination="2001:db8:f::/64", protocol="tcp", ports=["80", "81"]
            ),
            PolicyRule(action="allow", destination="private", protocol="udp"),
            PolicyRule(action="allow", destination="*", protocol="icmpv4"),
        ],
    )
    n = make_net(cfg)
    assert n.exchange("tcp", PUBLIC_V4, ECHO_PORT) == "OK ping"
    assert n.exchange("udp", PUBLIC_V4, ECHO_PORT) == "OK ping"
    assert denied(n.exchange("tcp", PUBLIC_V4, HTTP_PORT))  # port not in the TCP rule
    assert denied(n.exchange("tcp", PUBLIC2_V4, ECHO_PORT))  # the deny rule comes first
    assert denied(n.exchange("udp", PUBLIC2_V4, ECHO_PORT, timeout=1.5))
    assert (
        n.run(["curl", "-sS", "-m", "5", f"http://[{PUBLIC_V6}]/"]).stdout.strip()
        == f"reached {PUBLIC_V6}:80"
    )
    assert denied(n.exchange("tcp", PUBLIC_V6, ECHO_PORT))
    assert n.exchange("udp", PRIVATE_V4, ECHO_PORT) == "OK ping"  # group rule, udp only
    assert denied(n.exchange("tcp", PRIVATE_V4, ECHO_PORT))
    assert n.ping(PRIVATE_V4)  # icmpv4 to anything
    assert not n.ping(PUBLIC_V6, wait=1)  # but not icmpv6
    evs = [e for e in events(n) if e["destination"] == PUBLIC2_V4]
    assert evs and evs[0]["rule"] == 0 and evs[0]["action"] == "deny"


def test_custom_group_rules(make_net: MakeNet) -> None:
    cfg = NetworkConfig(
        rules=[
            PolicyRule(action="allow", destination="host", protocol="tcp", port="80"),
            PolicyRule(action="allow", destination="metadata"),
            PolicyRule(action="allow", destination="link-local", protocol="udp"),
            PolicyRule(action="allow", destination="private", protocols=["icmpv4", "icmpv6"]),
        ],
    )
    n = make_net(cfg)
    gw = str(n.net.gateway_ipv4)
    assert (
        n.run(["curl", "-sS", "-m", "5", f"http://{gw}/"]).stdout.strip() == "reached 127.0.0.1:80"
    )
    assert denied(n.exchange("tcp", gw, ECHO_PORT))  # host, but not port 7
    assert n.exchange("tcp", METADATA_V4, ECHO_PORT) == "OK ping"
    assert n.exchange("udp", METADATA_V6, ECHO_PORT) == "OK ping"
    assert n.exchange("udp", LINK_LOCAL_V4, ECHO_PORT) == "OK ping"
    assert denied(n.exchange("tcp", LINK_LOCAL_V4, ECHO_PORT))
    assert n.ping(PRIVATE_V4) and n.ping(PRIVATE_V6)
    assert denied(n.exchange("tcp", PRIVATE_V4, ECHO_PORT))
    assert denied(n.exchange("tcp", PUBLIC_V4, ECHO_PORT))  # default egress deny


# -- robustness -----------------------------------------------------------------------------------


def test_spoofed_source_is_dropped(make_net: MakeNet, world: World) -> None:
    n = make_net(NetworkPolicy.allow_all())
    assert n.run(["ip", "addr", "add", "172.31.99.99/32", "dev", "eth0"]).returncode == 0
    assert (
        n.run(["ip", "addr", "add", "2001:db8:99::9/128", "dev", "eth0", "nodad"]).returncode == 0
    )
    code = (
        "import socket,sys\n"
        "for fam,src,dst in ((socket.AF_INET,'172.31.99.99',%r),(socket.AF_INET6,'2001:db8:99::9',%r)):\n"
        "  for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):\n"
        "    s=socket.socket(fam,kind); s.settimeout(1.5); s.bind((src,0))\n"
        "    try:\n"
        "      s.connect((dst,7)); s.send(b'x'); print('LEAK', s.recv(10))\n"
        "    except OSError as e: print('blocked', type(e).__name__)\n"
    ) % (PUBLIC_V4, PUBLIC_V6)
    out = n.run([sys.executable, "-c", code]).stdout
    assert "LEAK" not in out and out.count("blocked") == 4, out
    # A forged MAC changes nothing: the host side checks addresses, not MACs.
    assert n.run(["ip", "link", "set", "eth0", "address", "02:00:00:00:00:99"]).returncode == 0
    assert n.exchange("tcp", PUBLIC_V4, ECHO_PORT) == "OK ping"


def test_half_close_bulk_and_keep_alive(make_net: MakeNet) -> None:
    n = make_net(NetworkPolicy.public_only())
    code = (
        "import socket,hashlib,os\n"
        "data=os.urandom(8<<20)\n"
        "s=socket.create_connection((%r,7),timeout=20)\n"
        "import threading\n"
        "got=[]\n"
        "def rd():\n"
        "  while (c:=s.recv(1<<16)): got.append(c)\n"
        "t=threading.Thread(target=rd); t.start()\n"
        "s.sendall(data); s.shutdown(socket.SHUT_WR); t.join()\n"
        "print(hashlib.sha256(b''.join(got)).hexdigest()==hashlib.sha256(data).hexdigest())\n"
    ) % PUBLIC_V4
    assert n.run([sys.executable, "-c", code], timeout=60).stdout.strip() == "True"
    # keep-alive: curl reuses one connection for two requests
    out = n.run(["curl", "-sS", "-v", "-m", "5", f"http://{PUBLIC_V4}/a", f"http://{PUBLIC_V4}/b"])
    assert out.stdout.count("reached") == 2 and "Re-using existing connection" in out.stderr


def test_upstream_reset_hang_and_never_accept(make_net: MakeNet) -> None:
    n = make_net(NetworkPolicy.public_only(), connect_timeout=2.0)
    assert n.exchange("tcp", PUBLIC_V4, RESET_PORT) in ("ERR ECONNRESET", "OK")
    assert n.exchange("tcp", PUBLIC_V4, HANG_PORT, timeout=1.5) == "ERR timeout"
    # Fill the never-accepting listener's queue, then a dial times out and the guest is reset.
    code = (
        "import socket,time\n"
        "keep=[]\n"
        "for i in range(4):\n"
        "  s=socket.socket(); s.settimeout(8)\n"
        "  try:\n"
        "    s.connect((%r,%d)); s.send(b'x'); s.recv(1); print('data?')\n"
        "  except OSError as e: print(type(e).__name__)\n"
        "  keep.append(s)\n"
    ) % (PUBLIC_V4, NEVER_ACCEPT_PORT)
    out = n.run([sys.executable, "-c", code], timeout=60).stdout.split()
    assert "ConnectionResetError" in out, out
    assert "data?" not in out
    assert n.exchange("tcp", PUBLIC_V4, ECHO_PORT) == "OK ping"  # slots were given back
    # Timed-out dials gave their slots back; what remains are half-closed pairs whose upstream
    # never closes (the hang and the queued never-accepted ones), counted exactly.
    active, connections, dials = n.call(
        lambda: (n.net.gate.active, n.net.tcp.connections, len(n.net.tcp._dials))
    )
    assert dials == 0 and active == connections and 1 <= active <= 3  # hang + queued ones


def test_max_connections_is_exact_for_tcp_plus_udp(make_net: MakeNet) -> None:
    n = make_net(NetworkConfig(policy="public-only", max_connections=3))
    code = (
        (
            "import socket,time\n"
            "a=socket.create_connection((%r,7),timeout=3); a.send(b'a'); a.recv(1)\n"
            "b=socket.create_connection((%r,7),timeout=3); b.send(b'b'); b.recv(1)\n"
            "u=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); u.settimeout(3); u.connect((%r,7)); u.send(b'u'); u.recv(9)\n"
            "c=socket.create_connection((%r,7),timeout=3)\n"
            "try:\n"
            "  c.send(b'c'); r=c.recv(1); print('fourth', r)\n"
            "except OSError as e: print('fourth', type(e).__name__)\n"
            "u2=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); u2.settimeout(1); u2.connect((%r,7)); u2.send(b'v')\n"
            "try: print('udp2', u2.recv(9))\n"
            "except OSError as e: print('udp2', type(e).__name__)\n"
            "a.shutdown(socket.SHUT_WR); a.recv(9); a.close()\n"  # wait until the echo closed it
            "for i in range(20):\n"
            "  d=socket.create_connection((%r,7),timeout=3); d.send(b'd')\n"
            "  try: print('after', d.recv(1)); break\n"
            "  except OSError: time.sleep(0.2)\n"
        )
        % ((PUBLIC_V4,) * 6)
    )
    out = n.run([sys.executable, "-c", code], timeout=60).stdout
    assert "fourth ConnectionResetError" in out, out
    assert "udp2 TimeoutError" in out, out
    assert "after b'd'" in out, out
    limit = [e for e in events(n) if "max_connections" in str(e["reason"])]
    assert len(limit) >= 2 and {e["protocol"] for e in limit} == {"tcp", "udp"}


def test_floods_are_bounded(make_net: MakeNet) -> None:
    n = make_net(NetworkConfig(policy="public-only", max_connections=50))
    code = (
        "import socket,errno\n"
        "socks=[]\n"
        "for i in range(400):\n"
        "  s=socket.socket(); s.setblocking(False); s.connect_ex((%r,7)); socks.append(s)\n"
        "for i in range(2000):\n"
        "  u=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); u.sendto(b'x',(%r,7)); u.close()\n"
        "import time; time.sleep(1.5)\n"
        "print('done')\n"
    ) % (PUBLIC_V4, PUBLIC_V4)
    assert n.run([sys.executable, "-c", code], timeout=120).stdout.strip() == "done"
    active = n.call(lambda: n.net.gate.active)
    assert active <= 50

    def limit_events() -> list[dict[str, object]]:
        return [e for e in events(n) if "max_connections" in str(e["reason"])]

    limit = wait_for(limit_events, timeout=10, what="a max_connections audit event")
    assert 1 <= len(limit) <= 40  # rate-limited, not one per packet


# -- published ports ------------------------------------------------------------------------------


def _guest_servers(n: RunningNetwork) -> subprocess.Popen[bytes]:
    proc = n.popen(
        [sys.executable, "-m", "tests.support.servers", "0.0.0.0"],
        stdout=subprocess.PIPE,
        cwd=str(ROOT),
    )
    assert proc.stdout is not None and b"ready" in proc.stdout.readline()
    return proc


def _host_exchange(
    world: World, kind: str, addr: str, port: int, payload: bytes = b"in"
) -> bytes | str:
    with world.in_host():
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
        s.settimeout(2)
        try:
            s.connect((addr, port))
            s.send(payload)
            if kind == "tcp":
                s.shutdown(socket.SHUT_WR)
            return s.recv(100)
        except OSError as exc:
            return type(exc).__name__
        finally:
            s.close()


def test_published_ports_with_ingress_rules(make_net: MakeNet, world: World) -> None:
    cfg = NetworkConfig(
        policy="public-only",
        ports={18080: ECHO_PORT},
        port_bindings=[
            PortBinding(bind="127.0.0.1", host_port=18081, guest_port=ECHO_PORT, protocol="udp"),
            PortBinding(bind=HOST_V4, host_port=18082, guest_port=ECHO_PORT),
        ],
        rules=[PolicyRule(action="deny", direction="ingress", destination=HOST_V4 + "/32")],
    )
    n = make_net(cfg)
    proc = _guest_servers(n)
    try:
        assert _host_exchange(world, "tcp", "127.0.0.1", 18080) == b"in"
        assert _host_exchange(world, "udp", "127.0.0.1", 18081) == b"in"
        # Peer 198.51.100.2 (the host's uplink address) is denied by the ingress rule.
        assert _host_exchange(world, "tcp", HOST_V4, 18082) in ("ConnectionResetError", b"")
        ev = [e for e in events(n) if e["direction"] == "ingress" and e["action"] == "deny"]
        assert ev and ev[0]["rule"] == 2 and ev[0]["port"] == ECHO_PORT
    finally:
        proc.kill()
        proc.wait()


def test_published_port_in_use_is_an_error_at_reserve(world: World, tmp_path: Path) -> None:
    with world.in_host():
        blocker = socket.socket()
        blocker.bind(("127.0.0.1", 18090))
        blocker.listen()
        try:
            with pytest.raises(NetworkError, match="18090"):
                SandboxNetwork.reserve(
                    "tportbusy",
                    NetworkConfig(ports={18090: 80}),
                    tmp_path,
                    pool=AddressPool(tmp_path / "p"),
                )
        finally:
            blocker.close()
    assert leftovers(world, None, "tportbusy") == []
    assert AddressPool(tmp_path / "p").all() == {}


# -- addressing and cleanup -----------------------------------------------------------------------


def test_pool_full_and_slots_never_shared(make_net: MakeNet, tmp_path: Path) -> None:
    cfg = NetworkConfig(policy="public-only", ipv4_pool="10.99.0.0/29")  # two /30 slots
    a = make_net(cfg)
    b = make_net(cfg)
    assert a.net.slot.ipv4 != b.net.slot.ipv4
    with pytest.raises(NetworkError, match="ipv4_pool 10.99.0.0/29 has no free /30"):
        make_net(cfg)


def test_cleanup_after_supervisor_sigkill(world: World, tmp_path: Path) -> None:
    """A supervisor killed with SIGKILL leaves kernel objects that block the sandbox's
    traffic (nothing reachable meanwhile) and that cleanup_leftovers removes."""
    code = (
        "import asyncio,sys,pathlib\n"
        "from corral.config import NetworkPolicy\n"
        "from corral.net.addressing import AddressPool\n"
        "from corral.net.datapath import SandboxNetwork\n"
        "async def main():\n"
        "  n=SandboxNetwork.reserve('tkilled',NetworkPolicy.allow_all(),pathlib.Path(sys.argv[1]),pool=AddressPool(pathlib.Path(sys.argv[2])))\n"
        "  await n.start(); print('ready',flush=True); await asyncio.Event().wait()\n"
        "asyncio.run(main())\n"
    )
    # nsenter, not "ip netns exec": the latter gives the process a mount namespace of its own,
    # where the netns it creates under /run/netns would not be visible to anyone else.
    proc = subprocess.Popen(
        [
            "nsenter",
            f"--net=/run/netns/{world.host_ns}",
            sys.executable,
            "-c",
            code,
            str(tmp_path / "s"),
            str(tmp_path / "p"),
        ],
        stdout=subprocess.PIPE,
        cwd=str(ROOT),
        start_new_session=True,
    )
    world.processes.append(proc)
    assert proc.stdout is not None and b"ready" in proc.stdout.readline()
    names = plumbing.names_for("tkilled")
    run = [
        "ip",
        "netns",
        "exec",
        names.netns,
        sys.executable,
        "-m",
        "tests.support.servers",
        "--client",
    ]
    ok = subprocess.run(
        [*run, "tcp", PUBLIC_V4, "7", "x", "3"], capture_output=True, text=True, cwd=str(ROOT)
    )
    assert ok.stdout.strip() == "OK x", ok.stderr
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    world.processes.remove(proc)
    out = subprocess.run(
        [*run, "tcp", PUBLIC_V4, "7", "x", "2"], capture_output=True, text=True, cwd=str(ROOT)
    )
    assert out.stdout.startswith("ERR"), out.stdout
    out = subprocess.run(
        [*run, "tcp", HOST_V4, "80", "x", "2"], capture_output=True, text=True, cwd=str(ROOT)
    )
    assert out.stdout.startswith("ERR"), out.stdout
    assert leftovers(world, None, "tkilled") != []
    with world.in_host():
        cleanup_leftovers("tkilled", pool=AddressPool(tmp_path / "p"))
        cleanup_leftovers("tkilled", pool=AddressPool(tmp_path / "p"))  # idempotent
    assert leftovers(world, None, "tkilled") == []
    assert world.run_host(["ip", "rule", "show"]).stdout.count("cr-tkilled") == 0
    assert AddressPool(tmp_path / "p").all() == {}


def test_close_is_idempotent_and_complete(world: World, tmp_path: Path, servers: None) -> None:
    pool = AddressPool(tmp_path / "p")
    n = RunningNetwork(
        world.host_ns, "tclose", NetworkPolicy.public_only(), tmp_path / "s", pool=pool
    )
    net = n.net
    assert leftovers(world, net, "tclose") != []
    n.close()
    assert leftovers(world, net, "tclose") == []

    async def again() -> None:
        await net.close()

    import asyncio

    with world.in_host():
        asyncio.run(again())
    with contextlib.suppress(Exception):
        pass


STREAM = (
    "import socket,os,threading,sys\n"
    "s=socket.create_connection((sys.argv[1],7),timeout=30)\n"
    "def rd():\n"
    "  try:\n"
    "    while s.recv(1<<16): pass\n"
    "  except OSError: pass\n"
    "threading.Thread(target=rd,daemon=True).start()\n"
    "chunk=os.urandom(1<<20)\n"
    "try:\n"
    "  for i in range(100000): s.sendall(chunk)\n"
    "except OSError as e: print(type(e).__name__, flush=True)\n"
)


def _wait_for_bulk(n: RunningNetwork) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if n.call(lambda: any(p._threads_left for p in n.net.tcp._pairs)):
            return
        time.sleep(0.1)
    raise AssertionError("the transfer never reached bulk mode")


def test_guest_dying_mid_stream_releases_the_connection(make_net: MakeNet) -> None:
    n = make_net(NetworkPolicy.public_only())
    proc = n.popen([sys.executable, "-c", STREAM, PUBLIC_V4], stdout=subprocess.PIPE, cwd=str(ROOT))
    try:
        _wait_for_bulk(n)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while n.call(lambda: n.net.gate.active) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert n.call(lambda: (n.net.gate.active, len(n.net.tcp._pairs))) == (0, 0)
    assert n.exchange("tcp", PUBLIC_V4, ECHO_PORT) == "OK ping"


def test_closing_during_a_bulk_transfer_resets_the_guest_and_leaves_nothing(
    make_net: MakeNet, world: World
) -> None:
    n = make_net(NetworkPolicy.public_only())
    proc = n.popen([sys.executable, "-c", STREAM, PUBLIC_V4], stdout=subprocess.PIPE, cwd=str(ROOT))
    try:
        _wait_for_bulk(n)
        net = n.net
        n.close()  # returns (a hang is the test's timeout), and leaves nothing
        assert leftovers(world, net, n.sandbox_id) == []
        out, _ = proc.communicate(timeout=30)
        # The guest saw its connection die (reset), or lost its netns with the link.
        assert proc.returncode is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_fragmented_datagrams_are_reassembled_and_decided(make_net: MakeNet) -> None:
    """A datagram larger than the MTU leaves the guest as fragments; the host reassembles it
    (conntrack defragments before the divert), so it is decided and relayed whole."""
    n = make_net(NetworkPolicy.public_only(), mtu=1500)  # the default MTU would not fragment
    code = (
        "import socket,sys\n"
        "for addr in sys.argv[1:]:\n"
        "  fam=socket.AF_INET6 if ':' in addr else socket.AF_INET\n"
        "  s=socket.socket(fam,socket.SOCK_DGRAM); s.settimeout(3); s.connect((addr,7))\n"
        "  data=bytes(range(256))*16\n"
        "  s.send(data)\n"
        "  try: print(addr, s.recv(65535)==data)\n"
        "  except OSError as e: print(addr, type(e).__name__)\n"
    )
    out = n.run([sys.executable, "-c", code, PUBLIC_V4, PUBLIC_V6, PRIVATE_V4]).stdout.split("\n")
    assert f"{PUBLIC_V4} True" in out and f"{PUBLIC_V6} True" in out, out
    # Denied by the kernel prefilter (ICMP port unreachable), fragments and all.
    assert f"{PRIVATE_V4} ConnectionRefusedError" in out, out


def test_ipv6_link_local_destinations_are_never_reached(make_net: MakeNet, world: World) -> None:
    """Link-local IPv6 leaves the guest with a link-local source, which the anti-spoof rule
    drops: the host's fe80:: address on the veth is unreachable whatever the policy."""
    n = make_net(NetworkPolicy.allow_all())
    info = json.loads(
        world.run_host(["ip", "-6", "-j", "addr", "show", "dev", n.net.names.link]).stdout
    )
    host_ll = next(a["local"] for a in info[0]["addr_info"] if a["local"].startswith("fe80"))
    server = world.spawn_host(
        [sys.executable, "-m", "tests.support.servers", f"{host_ll}%{n.net.names.link}"],
        stdout=subprocess.PIPE,
        cwd=str(ROOT),
    )
    try:
        assert server.stdout is not None and b"ready" in server.stdout.readline()
        assert denied(n.exchange("tcp", f"{host_ll}%eth0", ECHO_PORT, timeout=2))
        assert denied(n.exchange("udp", f"{host_ll}%eth0", ECHO_PORT, timeout=1.5))
    finally:
        world.stop_process(server)


def test_reserve_cleans_a_crashed_namesake(world: World, tmp_path: Path, servers: None) -> None:
    """Leftovers of a dead supervisor with the same sandbox id (lease, netns, link, table) are
    removed by the next reserve, which then works."""
    pool = AddressPool(tmp_path / "p")
    first = RunningNetwork(
        world.host_ns, "tnamesake", NetworkPolicy.public_only(), tmp_path / "a", pool=pool
    )
    # Simulate a crash: stop the loop without closing (the thread's close is skipped).
    first.net.close = _noop_close  # type: ignore[method-assign]
    first.close()
    assert leftovers(world, None, "tnamesake") != []
    second = RunningNetwork(
        world.host_ns, "tnamesake", NetworkPolicy.public_only(), tmp_path / "b", pool=pool
    )
    try:
        assert second.exchange("tcp", PUBLIC_V4, ECHO_PORT) == "OK ping"
    finally:
        second.close()
    assert leftovers(world, second.net, "tnamesake") == []


async def _noop_close() -> None:
    return None


def test_a_lingering_close_leaves_nothing_a_namesake_needs(
    world: World, tmp_path: Path, servers: None
) -> None:
    """``close(linger=True)`` (a supervisor's stop) keeps the ICMP relay's packet sockets open
    (their close waits for an RCU grace period, which the stop's caller need not wait for) and
    removes everything else: table, rules, routes, netns, lease, and the NFLOG socket, whose
    log group the next lease of the same number reuses. A namesake started meanwhile gets
    the same lease number and its kernel prefilter (it could not bind a group still held),
    and serves; closing the lingering sockets afterwards touches nothing of it."""
    import asyncio
    import ipaddress

    from corral.net.icmp import IcmpRelay
    from corral.net.nflog import RejectAudit

    pool = AddressPool(tmp_path / "p")
    # Lease numbers (and so NFLOG groups) of a fresh pool start at 1, which networks of
    # other tests of this process may still hold (a simulated crash never closes its own):
    # leases without kernel objects, elsewhere, move this one's number past theirs.
    for i in range(40):
        pool.lease(f"tpad{i}", ipaddress.IPv4Network("10.250.0.0/16"), None, routes=[])
    first = RunningNetwork(
        world.host_ns, "tlinger", NetworkPolicy.public_only(), tmp_path / "a", pool=pool
    )
    net = first.net
    number = net.slot.number
    assert any(isinstance(p, RejectAudit) for p in net._parts)  # the prefilter is on
    asyncio.run_coroutine_threadsafe(net.close(linger=True), first.loop).result(30)
    first.close()
    lingering = [p for p in net.lingering if isinstance(p, IcmpRelay)]
    assert lingering and all(s.fileno() >= 0 for p in lingering for s in p.link_sockets)
    # The veth goes with its namespace, in the background: nothing else is left at once.
    assert [x for x in leftovers(world, net, "tlinger") if not x.startswith("link ")] == []
    wait_for(lambda: leftovers(world, net, "tlinger") == [], timeout=30,
             what="the lingering veth to go with its namespace")  # fmt: skip
    second = RunningNetwork(
        world.host_ns, "tlinger", NetworkPolicy.public_only(), tmp_path / "b", pool=pool
    )
    try:
        assert second.net.slot.number == number
        assert any(
            isinstance(p, RejectAudit) for p in second.net._parts
        ), "the namesake lost its kernel prefilter: the NFLOG group was still held"
        with world.in_host():
            net.close_lingering()
        assert all(s.fileno() == -1 for p in lingering for s in p.link_sockets)
        assert net.lingering == []
        assert second.exchange("tcp", PUBLIC_V4, ECHO_PORT) == "OK ping"
        assert second.ping(PUBLIC_V4)
    finally:
        second.close()
    assert leftovers(world, second.net, "tlinger") == []


def test_idle_parts_hold_no_timer_and_idle_flows_still_expire(make_net: MakeNet) -> None:
    """An idle sandbox's data path wakes for nothing (net/sweeper.py): no part's clean-up
    timer runs until it holds state, and state is still forgotten on time once it does."""
    n = make_net(NetworkPolicy.public_only())
    net = n.net
    parts = {"udp": net.udp, "icmp": net.icmp, "dns": net.dns, "ports": net.ports}
    assert {k: p._sweeper.armed for k, p in parts.items()} == dict.fromkeys(parts, False)
    net.udp.idle_timeout = 0.3
    net.udp._sweeper.interval = 0.1
    assert n.exchange("udp", PUBLIC_V4, ECHO_PORT, "dgram") == "OK dgram"
    wait_for(lambda: not net.udp.flows, timeout=5, what="the idle UDP flow to be swept")
    wait_for(lambda: not net.udp._sweeper.armed, timeout=5, what="the UDP sweeper to stop")
    assert n.ping(PUBLIC_V4)
    wait_for(lambda: not net.icmp._sweeper.armed, timeout=5, what="the ICMP sweeper to stop")
    # A second flow after the stop starts the sweeper again.
    assert n.exchange("udp", PUBLIC_V4, ECHO_PORT, "again") == "OK again"
    wait_for(lambda: not net.udp.flows, timeout=5, what="the second idle UDP flow to be swept")
