"""The DNS interceptor in the hermetic world: real clients in the sandbox, a real server outside.

A "sandbox" is the netns of a real :class:`SandboxNetwork` (tests/support/servers.py runs it in
the world's host namespace); ``dig`` and Python's resolver run inside it. The upstream is
tests/support/dns_server.py on the world's DNS addresses, authoritative for ``example.test``
and ``other.test``, logging every query it receives: refused names are proven absent there.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.config import DNSConfig, NetworkConfig, NetworkPolicy, PolicyRule
from corral.net.addressing import AddressPool
from corral.net.dns import resolver as resolver_mod
from corral.net.dns.interceptor import MAX_TCP_CONNECTIONS
from tests.support.dns_server import RunningDnsServer, start_dns_server
from tests.support.explain_check import mismatches
from tests.support.servers import RunningNetwork
from tests.support.world import DNS_V4, DNS_V6, World

pytestmark = pytest.mark.timeout(300)

ZONE = "example.test"
WWW_V4 = "203.0.113.10"
WWW_V6 = "2001:db8:f::10"
PRIVATE_V4 = "10.77.0.1"

ZONES: dict[str, Any] = {
    "zones": [ZONE, "other.test"],
    "records": [
        ["www.example.test", "A", 300, WWW_V4],
        ["www.example.test", "AAAA", 300, WWW_V6],
        ["alias.example.test", "CNAME", 60, "www.example.test"],
        ["api.svc.example.test", "A", 60, "203.0.113.11"],
        ["svc.example.test", "A", 60, "203.0.113.12"],
        ["ads.example.test", "A", 60, "203.0.113.13"],
        ["x.ads.example.test", "A", 60, "203.0.113.14"],
        ["private.example.test", "A", 60, PRIVATE_V4],
        ["mixed.example.test", "A", 60, PRIVATE_V4],
        ["mixed.example.test", "A", 60, "203.0.113.15"],
        ["zero.example.test", "A", 0, "203.0.113.16"],
        ["www.other.test", "A", 60, "203.0.113.17"],
        ["p1.example.test", "A", 60, "203.0.113.19"],
        ["p2.example.test", "A", 60, "203.0.113.20"],
    ],
    "faults": {
        "silent.example.test": "silent",
        "wrongid.example.test": "wrong-id",
        "garbage.example.test": "garbage-id",
        "many.example.test": "many:3000",
        "flip.example.test": f"flip:203.0.113.18,{PRIVATE_V4}",
        "loop.example.test": "loop",
        "chain.example.test": "chain:20",
    },
}

UPSTREAM = DNSConfig(nameservers=[DNS_V4], query_timeout_ms=1500)


@pytest.fixture(scope="module")
def dns_server(
    world: World, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningDnsServer]:
    server = start_dns_server(
        world.spawn_inet,
        [DNS_V4, DNS_V6],
        ZONES,
        tmp_path_factory.mktemp("dns"),
        stop=world.stop_process,
    )
    try:
        yield server
    finally:
        server.stop()


MakeNet = Callable[..., RunningNetwork]


@pytest.fixture
def make_net(world: World, dns_server: RunningDnsServer, tmp_path: Path) -> Iterator[MakeNet]:
    made: list[RunningNetwork] = []
    pool = AddressPool(tmp_path / "pool")

    def make(config: NetworkConfig, **kw: object) -> RunningNetwork:
        sid = "d" + uuid.uuid4().hex[:8]
        kw.setdefault("pool", pool)
        kw.setdefault("log_allowed", True)  # every query audited: explain is checked on each
        n = RunningNetwork(world.host_ns, sid, config, tmp_path / sid, **kw)
        made.append(n)
        return n

    yield make
    # `corral policy explain --query` must say what the interceptor did, for every query.
    wrong = [m for n in made if n.net is not None for m in mismatches(n.net)]
    for n in made:
        n.close()
    assert wrong == [], "\n".join(wrong)


def cfg(**kw: Any) -> NetworkConfig:
    kw.setdefault("dns", UPSTREAM)
    kw.setdefault("policy", "public-only")
    return NetworkConfig(**kw)


def dig(
    n: RunningNetwork, name: str, rtype: str = "A", *args: str, server: str | None = None
) -> dict[str, Any]:
    """dig inside the sandbox; the status, the answer's data, the flags, dig's output."""
    argv = ["dig", "+time=3", "+tries=1", "+nocookie", *args, name, rtype]
    if server is not None:
        argv.insert(1, f"@{server}")
    out = n.run(argv, timeout=30)
    text = out.stdout
    status = ""
    flags = ""
    for line in text.splitlines():
        if "status:" in line:
            status = line.split("status:")[1].split(",")[0].strip()
        if line.startswith(";; flags:"):
            flags = line.split(";")[2].split(":")[1].strip() if ";" in line else line
    answers = []
    section = False
    for line in text.splitlines():
        if line.startswith(";; ANSWER SECTION"):
            section = True
            continue
        if section:
            if not line.strip():
                section = False
                continue
            parts = line.split()
            answers.append((parts[3], parts[4]))
    return {"status": status, "answers": answers, "flags": flags, "out": text + out.stderr}


def data(result: dict[str, Any], rtype: str = "A") -> list[str]:
    return sorted(d for t, d in result["answers"] if t == rtype)


def events(n: RunningNetwork) -> list[dict[str, Any]]:
    path = n.net.audit_path
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# -- answering every resolver address -------------------------------------------------------------


def test_allowed_name_resolves_over_udp_tcp_v4_v6_to_any_resolver(make_net: MakeNet) -> None:
    n = make_net(cfg())
    gw4, gw6 = str(n.net.gateway_ipv4), str(n.net.gateway_ipv6)
    for server in (gw4, gw6, "8.8.8.8", "2001:4860:4860::8888", "198.51.100.77", None):
        for extra in ((), ("+tcp",)):
            r = dig(n, "www.example.test", "A", *extra, server=server)
            assert r["status"] == "NOERROR" and data(r) == [WWW_V4], (server, extra, r["out"])
    r = dig(n, "www.example.test", "AAAA", server="2001:4860:4860::8888")
    assert data(r, "AAAA") == [WWW_V6], r["out"]
    r = dig(n, "alias.example.test", server="1.1.1.1")
    assert ("CNAME", "www.example.test.") in r["answers"] and data(r) == [WWW_V4]


def test_python_getaddrinfo_resolves_through_the_interceptor(make_net: MakeNet) -> None:
    n = make_net(cfg())
    script = (
        "import socket;"
        "print(sorted({a[4][0] for a in socket.getaddrinfo('www.example.test', 80, type=socket.SOCK_STREAM)}))"
    )
    out = n.run([sys.executable, "-c", script])
    assert out.stdout.strip() == str(sorted([WWW_V4, WWW_V6])), out.stderr


def test_host_names_answer_the_gateway(make_net: MakeNet, dns_server: RunningDnsServer) -> None:
    n = make_net(cfg())
    for name in ("host.corral.internal", "host.microsandbox.internal"):
        assert data(dig(n, name)) == [str(n.net.gateway_ipv4)]
        assert data(dig(n, name, "AAAA"), "AAAA") == [str(n.net.gateway_ipv6)]
    assert not {"host.corral.internal", "host.microsandbox.internal"} & dns_server.names()


def test_queries_are_rebuilt_toward_upstream(
    make_net: MakeNet, dns_server: RunningDnsServer
) -> None:
    n = make_net(cfg())
    r = dig(n, "svc.example.test", "A", "+subnet=198.51.100.0/24", "+cookie", "+nsid", "+qid=4242")
    assert data(r) == ["203.0.113.12"], r["out"]
    (seen,) = dns_server.queries("svc.example.test")
    assert seen["options"] == 0  # no ECS, cookie or NSID from the guest
    assert seen["id"] != 4242
    assert data(dig(n, "p1.example.test", "A", "+qid=4242")) == ["203.0.113.19"]
    assert data(dig(n, "p2.example.test", "A", "+qid=4242")) == ["203.0.113.20"]
    ports = {
        q["port"]
        for q in dns_server.queries()
        if q["name"] in ("p1.example.test", "p2.example.test")
    }
    assert len(ports) == 2  # a fresh source port per upstream try


# -- the policy -----------------------------------------------------------------------------------


def test_refused_names_are_nxdomain_and_never_reach_upstream(
    make_net: MakeNet, dns_server: RunningDnsServer
) -> None:
    rules = [
        PolicyRule(action="allow", destination="www.example.test", protocol="tcp", port="443"),
        PolicyRule(action="allow", destination=".svc.example.test"),
    ]
    n = make_net(cfg(policy=None, default_egress="deny", rules=rules))
    assert data(dig(n, "www.example.test")) == [WWW_V4]
    assert data(dig(n, "api.svc.example.test", "A", "+tcp")) == ["203.0.113.11"]
    tag = uuid.uuid4().hex[:6]
    refused = ["svc.example.test", f"exfil-{tag}.other.test", f"secret-{tag}.example.test"]
    for name in refused:
        for extra in ((), ("+tcp",)):
            r = dig(n, name, "A", *extra, server="8.8.8.8")
            assert r["status"] == "NXDOMAIN" and not r["answers"], r["out"]
            assert "AUTHORITY SECTION" not in r["out"]
    assert not set(refused[1:]) & dns_server.names()
    denials = [e for e in events(n) if e["action"] == "deny" and e["port"] == 53]
    assert {e["names"][0] for e in denials} >= set(refused)
    assert all(e["protocol"] in ("udp", "tcp") and "DNS query for" in e["reason"] for e in denials)


def test_deny_lists_and_suffix_rules(make_net: MakeNet, dns_server: RunningDnsServer) -> None:
    n = make_net(cfg(deny_domains=["www.other.test"], deny_domain_suffixes=[".ads.example.test"]))
    for name in ("www.other.test", "ads.example.test", "x.ads.example.test"):
        assert dig(n, name)["status"] == "NXDOMAIN"
    assert data(dig(n, "www.example.test")) == [WWW_V4]
    assert not {"www.other.test", "ads.example.test", "x.ads.example.test"} & dns_server.names()
    reasons = [e["reason"] for e in events(n) if e["action"] == "deny"]
    assert any("deny_domains[0]" in r for r in reasons)
    assert any("deny_domain_suffixes[0]" in r for r in reasons)


def test_rebinding_removed_and_kept(make_net: MakeNet) -> None:
    n = make_net(cfg())
    assert dig(n, "private.example.test")["status"] == "NXDOMAIN"
    assert data(dig(n, "mixed.example.test")) == ["203.0.113.15"]
    flips = [dig(n, "flip.example.test") for _ in range(4)]
    assert [f["status"] for f in flips].count("NOERROR") == 2
    assert [f["status"] for f in flips].count("NXDOMAIN") == 2
    assert all(data(f) in ([], ["203.0.113.18"]) for f in flips)
    assert any("rebind protection removed 10.77.0.1" in e["reason"] for e in events(n))
    off = make_net(cfg(dns=DNSConfig(nameservers=[DNS_V4], rebind_protection=False)))
    assert data(dig(off, "private.example.test")) == [PRIVATE_V4]
    allowed = make_net(
        cfg(
            rules=[
                PolicyRule(action="allow", destination="10.77.0.0/16", protocol="tcp", port="5432")
            ]
        )
    )
    assert data(dig(allowed, "mixed.example.test")) == sorted([PRIVATE_V4, "203.0.113.15"])


# -- size, faults ---------------------------------------------------------------------------------


def test_large_answer_is_truncated_over_udp_and_retried_over_tcp(
    make_net: MakeNet, dns_server: RunningDnsServer
) -> None:
    n = make_net(cfg())
    # without EDNS a guest takes 512 bytes over UDP: TC, and no records
    r = dig(n, "many.example.test", "A", "+noedns", "+ignore")
    assert "tc" in r["flags"].split() and not r["answers"], r["out"]
    r = dig(n, "many.example.test", "A", "+noedns")  # dig retries over TCP on TC
    assert len(data(r)) == resolver_mod.MAX_ADDRESSES_PER_ANSWER, r["out"]
    assert "(TCP)" in r["out"]
    # corral itself got TC from the upstream (3000 records) and asked again over TCP
    assert any(q["transport"] == "tcp" for q in dns_server.queries("many.example.test"))


def test_upstream_that_never_answers_is_servfail_within_the_budget(make_net: MakeNet) -> None:
    n = make_net(cfg(dns=DNSConfig(nameservers=[DNS_V4, f"[{DNS_V6}]:53"], query_timeout_ms=400)))
    # One try of dig with a long wait: the upstreams never answer, so a SERVFAIL can only
    # be corral's, once its budget ran out (no timing asserted: a loaded machine is slow).
    r = dig(n, "silent.example.test", "A", "+time=20")
    assert r["status"] == "SERVFAIL", r["out"]
    # the next resolver is tried on timeout: both saw the question
    r = dig(n, "www.example.test")
    assert data(r) == [WWW_V4]


def test_wrong_id_and_garbage_answers_are_not_accepted(make_net: MakeNet) -> None:
    n = make_net(cfg(dns=DNSConfig(nameservers=[DNS_V4], query_timeout_ms=400)))
    assert dig(n, "wrongid.example.test", "A", "+time=5")["status"] == "SERVFAIL"
    assert dig(n, "garbage.example.test", "A", "+time=5")["status"] == "SERVFAIL"


def test_cname_loop_and_long_chain_are_servfail(make_net: MakeNet) -> None:
    n = make_net(cfg())
    assert dig(n, "loop.example.test")["status"] == "SERVFAIL"
    assert dig(n, "chain.example.test")["status"] == "SERVFAIL"


def test_malformed_queries_get_formerr_or_silence_and_others_still_resolve(
    make_net: MakeNet,
) -> None:
    n = make_net(cfg())
    gw = str(n.net.gateway_ipv4)
    script = f"""
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1.0)
def ask(data):
    s.sendto(data, ({gw!r}, 53))
    try:
        return s.recv(4096)
    except TimeoutError:
        return None
out = []
out.append(ask(b"") is None)
out.append(ask(b"\\x01\\x02\\x03") is None)
r = ask(struct.pack("!6H", 77, 0x0100, 2, 0, 0, 0) + b"\\x01a\\x00\\x00\\x01\\x00\\x01" * 2)
out.append(r is not None and r[:2] == struct.pack("!H", 77) and r[3] & 0xF == 1)
r = ask(struct.pack("!6H", 78, 0x0100, 1, 0, 0, 0) + b"\\x01a\\xc0\\x0c\\x00\\x01\\x00\\x01")
out.append(r is not None and r[3] & 0xF == 1)
r = ask(struct.pack("!6H", 79, 0x0100, 1, 0, 0, 0) + b"\\x40" + b"a" * 64 + b"\\x00\\x00\\x01\\x00\\x01")
out.append(r is not None and r[3] & 0xF == 1)
print(out)
"""
    out = n.run([sys.executable, "-c", script])
    assert out.stdout.strip() == "[True, True, True, True, True]", out.stderr
    assert data(dig(n, "www.example.test")) == [WWW_V4]


def test_a_query_storm_from_one_sandbox_does_not_starve_another(make_net: MakeNet) -> None:
    noisy = make_net(cfg())
    quiet = make_net(cfg())
    script = """
import os, socket, struct, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
end = time.monotonic() + 6
i = 0
while time.monotonic() < end:
    name = b"".join(bytes([len(p)]) + p for p in (os.urandom(4).hex().encode(), b"example", b"test")) + b"\\0"
    try:
        s.sendto(struct.pack("!6H", i & 0xFFFF, 0x0100, 1, 0, 0, 0) + name + b"\\x00\\x01\\x00\\x01", ("8.8.8.8", 53))
    except BlockingIOError:
        pass
    i += 1
print(i)
"""
    storm = noisy.popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)  # the storm is running (it runs 6 s whatever happens here)
        results = [dig(quiet, "www.example.test", "A", "+time=2") for _ in range(5)]
        assert all(data(r) == [WWW_V4] for r in results), [r["out"] for r in results]
        # and the noisy sandbox itself is still answered, paced: an answer, or SERVFAIL
        # when its own in-flight bound is full (never a crash of its interceptor)
        assert dig(noisy, "www.example.test", "A", "+time=2", "+tries=3")["status"] in (
            "NOERROR",
            "SERVFAIL",
            "",
        )
    finally:
        sent = storm.communicate(timeout=30)[0]
    assert int(sent.strip()) > resolver_mod.MAX_QUERIES_PER_SECOND  # it really was a storm


def test_default_upstreams_come_from_the_host_resolv_conf(
    make_net: MakeNet, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_RESOLV_CONF", world.resolv_conf)
    n = make_net(NetworkPolicy.public_only())
    assert data(dig(n, "www.example.test")) == [WWW_V4]


def test_aaaa_in_a_sandbox_without_ipv6_is_empty(
    make_net: MakeNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    from corral.net import datapath

    monkeypatch.setattr(datapath, "host_has_ipv6", lambda: False)
    n = make_net(cfg())
    assert n.net.gateway_ipv6 is None
    r = dig(n, "www.example.test", "AAAA")
    assert r["status"] == "NOERROR" and not r["answers"], r["out"]
    assert data(dig(n, "www.example.test")) == [WWW_V4]


def test_pins_are_in_place_when_the_answer_arrives(make_net: MakeNet) -> None:
    import ipaddress

    n = make_net(cfg())
    r = dig(n, "zero.example.test")
    assert data(r) == ["203.0.113.16"]
    names = n.call(lambda: n.net.pins.names_for(ipaddress.ip_address("203.0.113.16")))
    assert names == {"zero.example.test"}
    r = dig(n, "alias.example.test")
    names = n.call(lambda: n.net.pins.names_for(ipaddress.ip_address(WWW_V4)))
    assert names == {"alias.example.test", "www.example.test"}


def test_tcp_pipelining_and_bad_streams(make_net: MakeNet) -> None:
    """20 queries in one write on one connection are all answered (RFC 7766); a zero-length
    message closes that connection only; more than MAX_TCP_CONNECTIONS are not all kept."""
    n = make_net(cfg())
    gw = str(n.net.gateway_ipv4)
    script = f"""
import socket, struct
def q(i, name):
    wire = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\\0"
    m = struct.pack("!6H", i, 0x0100, 1, 0, 0, 0) + wire + b"\\x00\\x01\\x00\\x01"
    return struct.pack("!H", len(m)) + m
def read(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf
s = socket.create_connection(({gw!r}, 53), timeout=5)
s.sendall(b"".join(q(i, "www.example.test" if i % 2 else "p1.example.test") for i in range(20)))
ids = set()
for _ in range(20):
    (length,) = struct.unpack("!H", read(s, 2))
    ids.add(struct.unpack("!H", read(s, length)[:2])[0])
ok_pipeline = ids == set(range(20))
bad = socket.create_connection(({gw!r}, 53), timeout=5)
bad.sendall(b"\\x00\\x00")
try:
    closed = bad.recv(10) == b""
except ConnectionResetError:
    closed = True
s.sendall(q(99, "www.example.test"))
(length,) = struct.unpack("!H", read(s, 2))
still = struct.unpack("!H", read(s, length)[:2])[0] == 99
many = [socket.create_connection(({gw!r}, 53), timeout=5) for _ in range({MAX_TCP_CONNECTIONS} + 8)]
alive = 0
for c in many:
    try:
        c.sendall(q(7, "www.example.test"))
        (length,) = struct.unpack("!H", read(c, 2))
        read(c, length)
        alive += 1
    except (OSError, EOFError):
        pass
print(ok_pipeline, closed, still, alive <= {MAX_TCP_CONNECTIONS})
"""
    out = n.run([sys.executable, "-c", script])
    assert out.stdout.split() == ["True", "True", "True", "True"], out.stdout + out.stderr
    assert data(dig(n, "www.example.test", "A", "+tcp")) == [WWW_V4]
