# ruff: noqa: F811  (make_net and servers are fixtures imported from test_net_datapath)
"""Certain denials are refused by the kernel before the handshake: a Python client in the
sandbox gets ECONNREFUSED (errno 111) from connect(), UDP clients too, allowed flows still
work, each refusal is still an audit event, and a policy with a domain rule leaves the flows
the prefilter cannot decide to the proxy (which completes the handshake, then resets)."""

from __future__ import annotations

import ipaddress
import json
import sys
import time

import pytest

from corral.config import NetworkConfig, NetworkPolicy, PolicyRule
from corral.net.addressing import FIRST_LEASE_NUMBER
from corral.net.nflog import NflogSocket, candidate_groups
from tests.integration.test_net_datapath import (  # noqa: F401  (fixtures)
    ECHO_PORT,
    HTTP_PORT,
    PRIVATE_V4,
    PRIVATE_V6,
    PUBLIC2_V4,
    PUBLIC_V4,
    PUBLIC_V6,
    MakeNet,
    make_net,
    servers,
)
from tests.support import netns
from tests.support.servers import RunningNetwork
from tests.support.world import World

pytestmark = pytest.mark.timeout(300)

#: The errno of connect() as the guest sees it, from a plain Python client.
CONNECT = (
    "import socket, sys\n"
    "a, p, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]\n"
    "s = socket.socket(socket.AF_INET6 if ':' in a else socket.AF_INET,\n"
    "    socket.SOCK_STREAM if kind == 'tcp' else socket.SOCK_DGRAM)\n"
    "s.settimeout(3)\n"
    "try:\n"
    "    s.connect((a, p))\n"
    "    if kind == 'udp':\n"
    "        s.send(b'x'); s.recv(100)\n"
    "    print('connected')\n"
    "except OSError as e:\n"
    "    print('errno', e.errno)\n"
)


def connect(n: RunningNetwork, kind: str, addr: str, port: int) -> str:
    return str(n.run([sys.executable, "-c", CONNECT, addr, str(port), kind]).stdout.strip())


def wait_event(n: RunningNetwork, **want: object) -> dict[str, object]:
    """The first audit event with these fields; the kernel's rejects are audited from NFLOG,
    asynchronously, so give it a moment."""
    deadline = time.monotonic() + 5
    while True:
        path = n.net.audit_path
        evs = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        for e in evs:
            if all(e.get(k) == v for k, v in want.items()):
                return dict(e)
        if time.monotonic() > deadline:
            raise AssertionError(f"no audit event {want} in {evs}")
        time.sleep(0.05)


def test_public_only_refuses_private_before_the_handshake(make_net: MakeNet) -> None:
    n = make_net(NetworkPolicy.public_only())
    assert connect(n, "tcp", PRIVATE_V4, ECHO_PORT) == "errno 111"
    assert connect(n, "tcp", PRIVATE_V6, ECHO_PORT) == "errno 111"
    assert connect(n, "udp", PRIVATE_V4, ECHO_PORT) == "errno 111"
    assert connect(n, "udp", PRIVATE_V6, ECHO_PORT) == "errno 111"
    # allowed flows are untouched
    assert connect(n, "tcp", PUBLIC_V4, ECHO_PORT) == "connected"
    assert connect(n, "tcp", PUBLIC_V6, ECHO_PORT) == "connected"
    assert n.exchange("tcp", PUBLIC_V4, ECHO_PORT, "hi") == "OK hi"
    assert n.exchange("udp", PUBLIC_V6, ECHO_PORT, "hi6") == "OK hi6"
    # every refusal is still an audit event, with the gate's reason
    for proto, dest in (("tcp", PRIVATE_V4), ("tcp", PRIVATE_V6), ("udp", PRIVATE_V4)):
        e = wait_event(n, action="deny", protocol=proto, destination=dest, port=ECHO_PORT)
        assert e["reason"] == "no rule matched; default egress deny", e
    # busybox nc -z no longer reports a denied port open
    out = n.run(["busybox", "nc", "-z", "-w", "2", PRIVATE_V4, str(ECHO_PORT)])
    assert out.returncode != 0


def test_custom_rules_refuse_denied_and_pass_allowed(make_net: MakeNet) -> None:
    config = NetworkConfig(
        rules=[
            PolicyRule(action="deny", destination=PUBLIC2_V4, protocol="tcp", port=str(ECHO_PORT)),
            PolicyRule(action="deny", destination="2001:db8:f::/64", protocol="udp"),
            PolicyRule(action="allow", destination="*"),
        ],
        default_egress="deny",
    )
    n = make_net(config)
    assert connect(n, "tcp", PUBLIC2_V4, ECHO_PORT) == "errno 111"
    e = wait_event(n, action="deny", destination=PUBLIC2_V4, port=ECHO_PORT)
    assert e["rule"] == 0, e
    assert connect(n, "udp", PUBLIC_V6, ECHO_PORT) == "errno 111"
    assert wait_event(n, action="deny", protocol="udp", destination=PUBLIC_V6)["rule"] == 1
    # the same addresses on what the rules allow
    assert n.exchange("tcp", PUBLIC2_V4, HTTP_PORT, "GET / HTTP/1.0\r\n\r\n").startswith("OK")
    assert n.exchange("tcp", PUBLIC_V6, ECHO_PORT, "six") == "OK six"
    assert n.exchange("udp", PUBLIC_V4, ECHO_PORT, "four") == "OK four"
    # and allow * still passes private (positive control for the first test)
    assert connect(n, "tcp", PRIVATE_V4, ECHO_PORT) == "connected"


def test_a_domain_rule_passes_only_pinned_addresses_to_the_proxy(make_net: MakeNet) -> None:
    config = NetworkConfig(
        rules=[
            PolicyRule(action="deny", destination=PRIVATE_V4),
            PolicyRule(action="allow", destination="example.com"),
            PolicyRule(action="deny", destination=PUBLIC2_V4),
            PolicyRule(action="allow", destination="*"),
        ],
        default_egress="deny",
    )
    n = make_net(config)
    # before the domain rule: decided by the kernel
    assert connect(n, "tcp", PRIVATE_V4, ECHO_PORT) == "errno 111"
    # after it, for an address no name pinned: still the kernel (a domain rule cannot
    # match it without a pin), with the audit event of the rule that decided
    assert connect(n, "tcp", PUBLIC2_V4, ECHO_PORT) == "errno 111"
    e = wait_event(n, action="deny", destination=PUBLIC2_V4)
    assert e["rule"] == 2, e
    # once the sandbox's DNS pinned it to example.com: the proxy decides, with the names
    address = ipaddress.ip_address(PUBLIC2_V4)
    n.call(lambda: n.net.pinned(n.net.pins.add(["example.com"], [address], 300)))
    assert connect(n, "tcp", PUBLIC2_V4, ECHO_PORT) == "connected"
    assert n.exchange("tcp", PUBLIC2_V4, ECHO_PORT, "pinned") == "OK pinned"
    assert n.exchange("tcp", PUBLIC_V4, ECHO_PORT, "ok") == "OK ok"


def test_a_held_nflog_group_does_not_cost_the_prefilter(make_net: MakeNet, world: World) -> None:
    """The slot's own NFLOG group held by another process of the namespace (another corral
    home's sandbox, or a removed one still exiting): the sandbox binds its next candidate,
    so denials are still refused before the handshake and still audited."""
    with netns.entered(world.host_ns):
        held = [NflogSocket(g) for g in candidate_groups(FIRST_LEASE_NUMBER)[:2]]
    try:
        n = make_net(NetworkPolicy.public_only())
        assert n.net.slot is not None and n.net.slot.number == FIRST_LEASE_NUMBER
        assert connect(n, "tcp", PRIVATE_V4, ECHO_PORT) == "errno 111"
        e = wait_event(n, action="deny", protocol="tcp", destination=PRIVATE_V4, port=ECHO_PORT)
        assert e["reason"] == "no rule matched; default egress deny", e
    finally:
        for sock in held:
            sock.close()
