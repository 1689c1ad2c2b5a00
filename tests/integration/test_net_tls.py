# ruff: noqa: F811  (pytest fixtures imported from test_net_datapath are parameters here)
"""TLS interception in the hermetic world: real TLS servers of a test CA in the internet
namespace (tests/support/tls_servers.py: HTTP/1.1 and HTTP/2, WebSocket, an h2 stream), real
clients in the sandbox netns (curl incl. --http2, Python's ssl, openssl s_client) trusting the
sandbox's own CA (written to a file, as the runtime writes it into a rootfs).

Each test has its positive control on the same server: bypassed names reach the server's own
certificate, intercepted ones get a leaf of the sandbox CA; a verification failure is a TLS
alert toward the guest and an audit event, never a downgrade.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.config import NetworkConfig, NetworkPolicy, PolicyRule, TLSConfig
from tests.integration.test_net_datapath import (  # noqa: F401 - fixtures
    MakeNet,
    events,
    make_net,
    servers,
)
from tests.support.servers import ECHO_PORT, RunningNetwork
from tests.support.tls_servers import (
    EXPIRED_PORT,
    GOOD_PORT,
    H1_ONLY_PORT,
    NAME,
    SELF_SIGNED_PORT,
    WRONG_NAME_PORT,
    make_certs,
    start_tls_servers,
)
from tests.support.world import SERVER_V4, World

pytestmark = pytest.mark.timeout(300)

ALL_PORTS = [GOOD_PORT, EXPIRED_PORT, SELF_SIGNED_PORT, WRONG_NAME_PORT, H1_ONLY_PORT]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tls-certs")
    make_certs(d)
    return d


@pytest.fixture(scope="module")
def tls_servers(
    world: World, servers: None, certs: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    capdir = tmp_path_factory.mktemp("tls-capture")
    proc = start_tls_servers(world.spawn_inet, certs, capdir, [SERVER_V4])
    try:
        yield capdir
    finally:
        world.stop_process(proc)


def tls_config(certs: Path, **kw: object) -> NetworkConfig:
    tls = TLSConfig(upstream_ca_certs=[str(certs / "ca.pem")], intercepted_ports=ALL_PORTS, **kw)  # type: ignore[arg-type]
    return NetworkConfig(policy="public-only", tls=tls)


def sandbox_ca(n: RunningNetwork, tmp: Path) -> Path:
    path = tmp / f"{n.sandbox_id}-ca.pem"
    path.write_bytes(n.net.tls_settings.ca.cert_pem)
    return path


def curl(
    n: RunningNetwork, ca: Path, url: str, *extra: str, port: int = GOOD_PORT
) -> subprocess.CompletedProcess[str]:
    return n.run(
        ["curl", "-sS", "-m", "10", "--cacert", str(ca), "--resolve", f"{NAME}:{port}:{SERVER_V4}",
         "-w", "\\n%{http_version} %{http_code}", *extra, url]
    )  # fmt: skip


def lines(out: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in out.stdout.splitlines() if line]


PEER_CERT = """
import socket, ssl, sys
host, addr, port, ca = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ctx = ssl.create_default_context(cafile=ca)
ctx.set_alpn_protocols(["h2", "http/1.1"])
try:
    with socket.create_connection((addr, port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as s:
            issuer = dict(x[0] for x in s.getpeercert()["issuer"])
            print("OK", issuer.get("commonName"), s.selected_alpn_protocol())
except ssl.SSLError as e:
    print("SSLERR", e.reason)
except OSError as e:
    print("ERR", e)
"""


def peer(n: RunningNetwork, ca: Path, port: int = GOOD_PORT, name: str = NAME) -> str:
    return n.run(
        [sys.executable, "-c", PEER_CERT, name, SERVER_V4, str(port), str(ca)]
    ).stdout.strip()


def test_intercepted_http1_and_http2_with_alpn_carried(
    make_net: MakeNet, tls_servers: Path, certs: Path, tmp_path: Path
) -> None:
    n = make_net(tls_config(certs))
    ca = sandbox_ca(n, tmp_path)
    # The guest sees a leaf of the sandbox's CA, with the protocol the upstream selected.
    assert peer(n, ca).startswith("OK corral sandbox"), peer(n, ca)
    out = curl(n, ca, f"https://{NAME}/", "--http1.1")
    assert lines(out) == [f"hello {NAME} http/1.1", "1.1 200"], out.stderr
    out = curl(n, ca, f"https://{NAME}/", "--http2")
    assert lines(out) == [f"hello {NAME} h2", "2 200"], out.stderr
    # An upstream that offers http/1.1 only: the guest is offered http/1.1 only too.
    out = curl(n, ca, f"https://{NAME}:{H1_ONLY_PORT}/", "--http2", port=H1_ONLY_PORT)
    assert lines(out) == [f"hello {NAME} http/1.1", "1.1 200"], out.stderr
    # Without the sandbox CA the guest refuses the leaf: interception is visible.
    out = n.run(["curl", "-sS", "-m", "10", "--cacert", str(certs / "ca.pem"),
                 "--resolve", f"{NAME}:443:{SERVER_V4}", f"https://{NAME}/"])  # fmt: skip
    assert out.returncode == 60, (out.returncode, out.stderr)
    assert n.net.tcp.tls.handshakes >= 3


def test_openssl_s_client_sees_the_leaf_and_h2(
    make_net: MakeNet, tls_servers: Path, certs: Path, tmp_path: Path
) -> None:
    n = make_net(tls_config(certs))
    ca = sandbox_ca(n, tmp_path)
    out = n.run(
        ["openssl", "s_client", "-connect", f"{SERVER_V4}:443", "-servername", NAME,
         "-alpn", "h2,http/1.1", "-CAfile", str(ca), "-verify_return_error"],
        input="", timeout=30, errors="replace",
    )  # fmt: skip
    text = out.stdout + out.stderr
    assert "ALPN protocol: h2" in text, text
    assert "Verify return code: 0 (ok)" in text, text
    assert "i:CN = corral sandbox" in text, text  # the leaf's issuer: the sandbox's CA


def test_bypassed_names_are_spliced_untouched(
    make_net: MakeNet, tls_servers: Path, certs: Path, tmp_path: Path
) -> None:
    n = make_net(tls_config(certs, bypass=["*.good.test"]))
    ca = sandbox_ca(n, tmp_path)
    # A subdomain is bypassed: the guest meets the server's own certificate (the test CA).
    assert peer(n, certs / "ca.pem", name=f"api.{NAME}") == "OK corral test CA h2"
    assert peer(n, ca, name=f"api.{NAME}").startswith("SSLERR")
    # The apex is not in "*.good.test": intercepted (positive control).
    assert peer(n, ca).startswith("OK corral sandbox")
    assert n.net.tcp.tls.handshakes == 1


NO_SNI = """
import socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[2])
ctx.check_hostname = False
try:
    with socket.create_connection((sys.argv[1], 443), timeout=10) as raw:
        with ctx.wrap_socket(raw) as s:
            print("OK")
except (ssl.SSLError, OSError) as e:
    print("ERR", type(e).__name__)
"""


def test_tls_without_sni_is_refused_and_audited(
    make_net: MakeNet, tls_servers: Path, certs: Path, tmp_path: Path
) -> None:
    n = make_net(tls_config(certs))
    ca = sandbox_ca(n, tmp_path)
    out = n.run([sys.executable, "-c", NO_SNI, SERVER_V4, str(ca)]).stdout.strip()
    assert out.startswith("ERR"), out
    assert any("no SNI" in str(e["reason"]) for e in events(n))
    assert peer(n, ca).startswith("OK corral sandbox")  # the same server, with an SNI


@pytest.mark.parametrize(
    ("port", "why"),
    [
        (EXPIRED_PORT, "expired"),
        (SELF_SIGNED_PORT, "self-signed"),
        (WRONG_NAME_PORT, "Hostname mismatch"),
    ],
)
def test_failed_upstream_verification_is_an_alert_and_an_event(
    make_net: MakeNet, tls_servers: Path, certs: Path, tmp_path: Path, port: int, why: str
) -> None:
    n = make_net(tls_config(certs))
    ca = sandbox_ca(n, tmp_path)
    out = curl(n, ca, f"https://{NAME}:{port}/", port=port)
    assert out.returncode == 35, (out.returncode, out.stderr)  # CURLE_SSL_CONNECT_ERROR
    assert "handshake failure" in out.stderr, out.stderr
    reasons = [str(e["reason"]) for e in events(n) if e["port"] == port and e["action"] == "deny"]
    assert any("failed verification" in r and why in r for r in reasons), reasons
    assert n.net.tcp.tls.verify_failures == 1
    # Positive control: the good server through the same sandbox.
    assert lines(curl(n, ca, f"https://{NAME}/")) == [f"hello {NAME} h2", "2 200"]


def test_verify_upstream_off_carries_a_self_signed_upstream(
    make_net: MakeNet, tls_servers: Path, certs: Path, tmp_path: Path
) -> None:
    n = make_net(tls_config(certs, verify_upstream=False))
    ca = sandbox_ca(n, tmp_path)
    out = curl(n, ca, f"https://{NAME}:{SELF_SIGNED_PORT}/", port=SELF_SIGNED_PORT)
    assert lines(out) == [f"hello {NAME} h2", "2 200"], out.stderr


def test_the_users_own_ca_signs_the_leaves(
    make_net: MakeNet, tls_servers: Path, certs: Path, tmp_path: Path
) -> None:
    n = make_net(
        tls_config(certs, ca_cert=str(certs / "userca.pem"), ca_key=str(certs / "userca.key"))
    )
    assert peer(n, certs / "userca.pem") == "OK user CA h2"
    out = curl(n, certs / "userca.pem", f"https://{NAME}/", "--http1.1")
    assert lines(out) == [f"hello {NAME} http/1.1", "1.1 200"], out.stderr


WEBSOCKET = """
import base64, os, socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[3])
ctx.set_alpn_protocols(["http/1.1"])
with socket.create_connection((sys.argv[2], 443), timeout=10) as raw, ctx.wrap_socket(raw, server_hostname=sys.argv[1]) as s:
    key = base64.b64encode(os.urandom(16))
    s.sendall(b"GET /ws HTTP/1.1\\r\\nHost: " + sys.argv[1].encode() + b"\\r\\nUpgrade: websocket\\r\\n"
              b"Connection: Upgrade\\r\\nSec-WebSocket-Version: 13\\r\\nSec-WebSocket-Key: " + key + b"\\r\\n\\r\\n")
    buf = b""
    while b"\\r\\n\\r\\n" not in buf:
        buf += s.recv(4096)
    head, _, buf = buf.partition(b"\\r\\n\\r\\n")
    print(head.split(b"\\r\\n")[0].decode())
    for i in range(3):
        payload = f"message {i}".encode()
        mask = os.urandom(4)
        s.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(c ^ mask[j % 4] for j, c in enumerate(payload)))
        while len(buf) < 2 or len(buf) < 2 + buf[1]:
            more = s.recv(4096)
            if not more:
                print("closed")
                sys.exit(0)
            buf += more
        n = buf[1]
        print(buf[2:2 + n].decode())
        buf = buf[2 + n:]
"""


def test_websocket_through_interception(
    make_net: MakeNet, tls_servers: Path, certs: Path, tmp_path: Path
) -> None:
    n = make_net(tls_config(certs))
    ca = sandbox_ca(n, tmp_path)
    out = n.run([sys.executable, "-c", WEBSOCKET, NAME, SERVER_V4, str(ca)])
    assert lines(out) == [
        "HTTP/1.1 101 Switching Protocols",
        "message 0",
        "message 1",
        "message 2",
    ], out.stderr


H2_STREAM = """
import socket, ssl, sys
import h2.connection, h2.events
ctx = ssl.create_default_context(cafile=sys.argv[3])
ctx.set_alpn_protocols(["h2"])
with socket.create_connection((sys.argv[2], 443), timeout=10) as raw, ctx.wrap_socket(raw, server_hostname=sys.argv[1]) as s:
    assert s.selected_alpn_protocol() == "h2"
    c = h2.connection.H2Connection()
    c.initiate_connection()
    c.send_headers(1, [(":method", "POST"), (":path", "/stream"), (":scheme", "https"),
                       (":authority", sys.argv[1]), ("content-type", "application/grpc")])
    s.sendall(c.data_to_send())
    for i in range(3):
        # One message out, its echo back before the next leaves: streamed both ways, not buffered.
        c.send_data(1, f"chunk {i}".encode())
        s.sendall(c.data_to_send())
        got = b""
        while not got:
            for ev in c.receive_data(s.recv(65536)):
                if isinstance(ev, h2.events.DataReceived):
                    got += ev.data
                    c.acknowledge_received_data(ev.flow_controlled_length, 1)
            s.sendall(c.data_to_send())
        print(got.decode())
    c.end_stream(1)
    s.sendall(c.data_to_send())
"""


def test_h2_bidirectional_stream_through_interception(
    make_net: MakeNet, tls_servers: Path, certs: Path, tmp_path: Path
) -> None:
    n = make_net(tls_config(certs))
    ca = sandbox_ca(n, tmp_path)
    out = n.run([sys.executable, "-c", H2_STREAM, NAME, SERVER_V4, str(ca)])
    assert lines(out) == ["chunk 0", "chunk 1", "chunk 2"], out.stderr


@pytest.mark.parametrize("version", ["--http1.1", "--http2"])
def test_large_download_and_upload_stream_through(
    make_net: MakeNet, tls_servers: Path, certs: Path, tmp_path: Path, version: str
) -> None:
    n = make_net(tls_config(certs))
    ca = sandbox_ca(n, tmp_path)
    size = 64 << 20
    out = n.run(["curl", "-sS", "-m", "60", "--cacert", str(ca), "--resolve", f"{NAME}:443:{SERVER_V4}",
                 version, "-o", "/dev/null", "-w", "%{size_download}", f"https://{NAME}/big?n={size}"], timeout=90)  # fmt: skip
    assert out.stdout.strip() == str(size), out.stderr
    upload = tmp_path / "upload.bin"
    upload.write_bytes(b"u" * (16 << 20))
    out = curl(n, ca, f"https://{NAME}/", version, "--data-binary", f"@{upload}")
    assert (
        lines(out)[0] == f"hello {NAME} {'h2' if version == '--http2' else 'http/1.1'}"
    ), out.stderr


@pytest.mark.parametrize("block", [True, False])
def test_block_quic_drops_udp_to_intercepted_ports(
    make_net: MakeNet, tls_servers: Path, certs: Path, block: bool
) -> None:
    # The world's UDP echo (port 7) stands in for a QUIC server: port 7 is made intercepted.
    tls = TLSConfig(upstream_ca_certs=[str(certs / "ca.pem")], intercepted_ports=[443, ECHO_PORT],
                    block_quic=block)  # fmt: skip
    n = make_net(NetworkConfig(policy="public-only", tls=tls))
    out = n.exchange("udp", SERVER_V4, ECHO_PORT, "quic?", timeout=2.0)
    if block:
        assert out == "ERR timeout", out
        assert any("block_quic" in str(e["reason"]) for e in events(n))
    else:
        assert out == "OK quic?", out


def test_deny_response_answers_default_egress_denials_readably(
    make_net: MakeNet, tls_servers: Path, certs: Path, tmp_path: Path
) -> None:
    """Only good.test is allowed (a domain rule; its address pinned as the DNS interceptor
    would): a request naming another host on the same address is refused by the default
    egress and answered 403 with a text naming the host and the rule to add, over HTTPS
    (intercepted with a leaf for that name, h2 and HTTP/1.1) and plain HTTP alike."""
    cfg = NetworkConfig(
        rules=[PolicyRule(action="allow", destination=NAME, protocols=["tcp"], ports=["80", "443"])],
        default_egress="deny",
        tls=TLSConfig(upstream_ca_certs=[str(certs / "ca.pem")]),
        deny_response="text",
    )  # fmt: skip
    n = make_net(cfg)
    address = ipaddress.ip_address(SERVER_V4)
    n.call(lambda: n.net.pinned(n.net.pins.add([NAME], [address], 300)))
    ca = sandbox_ca(n, tmp_path)
    other = f"api.{NAME}"
    assert lines(curl(n, ca, f"https://{NAME}/")) == [f"hello {NAME} h2", "2 200"]  # control
    for version, shown in (("--http2", "2 403"), ("--http1.1", "1.1 403")):
        out = n.run(["curl", "-sS", "-m", "10", "--cacert", str(ca), "--resolve",
                     f"{other}:443:{SERVER_V4}", "-w", "\\n%{http_version} %{http_code}",
                     version, f"https://{other}/"])  # fmt: skip
        got = lines(out)
        assert got[-1] == shown, (out.stdout, out.stderr)
        assert f"corral blocked this request to {other}" in got[0], got
        assert f"--rule allow@{other}:tcp:443" in out.stdout
    out = n.run(["curl", "-sS", "-m", "10", "-H", f"Host: {other}", "-w", "\\n%{http_code}",
                 f"http://{SERVER_V4}/"])  # fmt: skip
    assert lines(out)[-1] == "403" and f"request to {other}" in out.stdout, out.stdout
    assert any(e["action"] == "deny" and e["revealed"] == other for e in events(n))


#: A DNS server of this module's own, authoritative for good.test (CONNECT names are resolved
#: through the sandbox's DNS interceptor, which asks it).
CONNECT_DNS_V4 = "203.0.113.55"


@pytest.fixture(scope="module")
def good_test_dns(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tests.support.dns_server import start_dns_server

    if f"{CONNECT_DNS_V4}/32" not in world.extra_addresses:
        world.add_server_address(f"{CONNECT_DNS_V4}/32")
    zones = {"zones": ["good.test"], "records": [[NAME, "A", 300, SERVER_V4]]}
    server = start_dns_server(
        world.spawn_inet, [CONNECT_DNS_V4], zones, tmp_path_factory.mktemp("tls-dns"),
        stop=world.stop_process,
    )  # fmt: skip
    try:
        yield CONNECT_DNS_V4
    finally:
        server.stop()


PROXY_ECHO = """
import socket, sys
s = socket.create_connection((sys.argv[1], 3128), timeout=10)
s.sendall(b"CONNECT " + sys.argv[2].encode() + b" HTTP/1.1\\r\\nHost: " + sys.argv[2].encode() + b"\\r\\n\\r\\n")
head = b""
while b"\\r\\n\\r\\n" not in head:
    head += s.recv(4096)
print(head.split(b"\\r\\n")[0].decode())
if b" 200 " in head:
    s.sendall(b"through the tunnel")
    print(s.recv(100).decode())
"""


def test_http_connect_to_the_gateway_is_decided_and_intercepted(
    make_net: MakeNet, tls_servers: Path, certs: Path, tmp_path: Path, good_test_dns: str
) -> None:
    from corral.config import DNSConfig

    tls = TLSConfig(upstream_ca_certs=[str(certs / "ca.pem")])
    n = make_net(
        NetworkConfig(policy="public-only", tls=tls, dns=DNSConfig(nameservers=[good_test_dns]))
    )
    ca = sandbox_ca(n, tmp_path)
    proxy = f"http://{n.net.gateway_ipv4}:3128"
    # The authority is resolved by the sandbox's DNS and the tunnel's TLS is intercepted.
    for version, shown in (
        ("--http2", [f"hello {NAME} h2", "2 200"]),
        ("--http1.1", [f"hello {NAME} http/1.1", "1.1 200"]),
    ):
        out = n.run(["curl", "-sS", "-m", "10", "--cacert", str(ca), "-x", proxy, version,
                     "-w", "\\n%{http_version} %{http_code}", f"https://{NAME}/"])  # fmt: skip
        assert lines(out) == shown, (out.stdout, out.stderr)
    assert n.net.pins.names_for(ipaddress.ip_address(SERVER_V4)) == {NAME}
    # A tunnel the policy refuses (a private address under public-only): 403, nothing dialled.
    out = n.run(["curl", "-sS", "-m", "10", "--cacert", str(ca), "-x", proxy, "https://10.77.0.1/"])
    assert out.returncode != 0 and "403" in out.stderr, out.stderr
    # TLS in the tunnel must name the authority.
    out = n.run(["openssl", "s_client", "-proxy", f"{n.net.gateway_ipv4}:3128", "-connect",
                 f"{NAME}:443", "-servername", f"api.{NAME}", "-CAfile", str(ca)],
                input="", timeout=30, errors="replace")  # fmt: skip
    assert "no peer certificate available" in out.stdout, out.stdout
    assert any("is not its authority" in str(e["reason"]) for e in events(n))
    # A port that is not intercepted: spliced (the world's TCP echo).
    out = n.run([sys.executable, "-c", PROXY_ECHO, str(n.net.gateway_ipv4), f"{SERVER_V4}:7"])
    assert lines(out) == ["HTTP/1.1 200 Connection established", "through the tunnel"], out.stderr
    # Not CONNECT: refused with a sentence.
    out = n.run(["curl", "-sS", "-m", "5", f"{proxy}/"])
    assert "CONNECT only" in out.stdout, out.stdout


DOT_CLIENT = """
import socket, ssl, struct, sys
import dns.message
addr, sni, ca, name = sys.argv[1:5]
ctx = ssl.create_default_context(cafile=ca)
ctx.set_alpn_protocols(["dot"])
with socket.create_connection((addr, 853), timeout=10) as raw, ctx.wrap_socket(raw, server_hostname=sni) as s:
    for qname in (name, "nowhere." + name):
        q = dns.message.make_query(qname, "A").to_wire()
        s.sendall(struct.pack(">H", len(q)) + q)
        n = struct.unpack(">H", s.recv(2))[0]
        data = b""
        while len(data) < n:
            data += s.recv(n - len(data))
        r = dns.message.from_wire(data)
        print(qname, dns.rcode.to_text(r.rcode()), [rr.address for rrset in r.answer for rr in rrset])
"""


def test_dns_over_tls_is_answered_by_the_sandbox_dns(
    make_net: MakeNet, tls_servers: Path, certs: Path, tmp_path: Path, good_test_dns: str
) -> None:
    """DoT to any address is terminated (a leaf for its SNI, or the address) and each query is
    answered by the sandbox's DNS interceptor: allowed names are pinned, nothing is dialled
    to the address the guest chose (1.1.1.1 is not in the hermetic world at all)."""
    from corral.config import DNSConfig

    tls = TLSConfig(upstream_ca_certs=[str(certs / "ca.pem")])
    n = make_net(
        NetworkConfig(policy="public-only", tls=tls, dns=DNSConfig(nameservers=[good_test_dns]))
    )
    ca = sandbox_ca(n, tmp_path)
    for addr, sni in (("1.1.1.1", "1.1.1.1"), ("9.9.9.9", "dns.quad9.net")):
        out = n.run([sys.executable, "-c", DOT_CLIENT, addr, sni, str(ca), NAME])
        got = lines(out)
        assert got == [f"{NAME} NOERROR ['{SERVER_V4}']", f"nowhere.{NAME} NXDOMAIN []"], out.stderr
    assert NAME in n.net.pins.names_for(ipaddress.ip_address(SERVER_V4))


def test_dns_over_tls_is_refused_without_interception(make_net: MakeNet, tmp_path: Path) -> None:
    n = make_net(NetworkPolicy.public_only())
    assert n.exchange("tcp", "1.1.1.1", 853, "x").startswith("ERR")


def test_an_upstream_reset_mid_body_reaches_the_guest_as_a_failure(
    make_net: MakeNet, tls_servers: Path, certs: Path, tmp_path: Path
) -> None:
    n = make_net(tls_config(certs))
    ca = sandbox_ca(n, tmp_path)
    out = n.run(["curl", "-sS", "-m", "10", "--cacert", str(ca), "--resolve", f"{NAME}:443:{SERVER_V4}",
                 "--http1.1", "-o", "/dev/null", "-w", "%{size_download}", f"https://{NAME}/reset"])  # fmt: skip
    # curl: 56 (recv failure: reset) or 18 (partial file); never a clean, complete body.
    assert out.returncode in (18, 56), (out.returncode, out.stderr)
    assert int(out.stdout or 0) < 1048576
    assert lines(curl(n, ca, f"https://{NAME}/")) == [f"hello {NAME} h2", "2 200"]  # still fine


STALL = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], 443), timeout=30)
# A ClientHello's first bytes, then nothing: the hold (3 s) decides it, cut off = invalid.
s.sendall(bytes.fromhex("160301"))
t = time.monotonic()
try:
    print("closed" if s.recv(10) == b"" else "data", end=" ")
except OSError as e:
    print(type(e).__name__, end=" ")
print(round(time.monotonic() - t))
"""

NO_FINISH = """
import socket, ssl, sys, time
ctx = ssl.create_default_context(cafile=sys.argv[2])
inb, outb = ssl.MemoryBIO(), ssl.MemoryBIO()
obj = ctx.wrap_bio(inb, outb, server_hostname=sys.argv[3])
try:
    obj.do_handshake()
except ssl.SSLWantReadError:
    pass
s = socket.create_connection((sys.argv[1], 443), timeout=60)
s.sendall(outb.read())          # a whole ClientHello, then never the client's Finished
got = b""
t = time.monotonic()
try:
    while (d := s.recv(65536)):
        got += d
    print("closed", end=" ")
except OSError as e:
    print(type(e).__name__, end=" ")
print(len(got) > 0, round(time.monotonic() - t))
"""


def test_clients_that_stall_are_bounded(
    make_net: MakeNet, tls_servers: Path, certs: Path, tmp_path: Path
) -> None:
    """A truncated ClientHello is cut off by the first-flight bound and refused; a client
    that sends a whole ClientHello but never finishes its handshake is dropped after the
    interceptor's handshake bound; either way the connection slot comes back."""
    from corral.net.tls_interceptor import HANDSHAKE_TIMEOUT

    assert HANDSHAKE_TIMEOUT < 60  # the bound fires before NO_FINISH's own socket timeout
    n = make_net(tls_config(certs))
    ca = sandbox_ca(n, tmp_path)
    out = n.run([sys.executable, "-c", STALL, SERVER_V4], timeout=60).stdout.split()
    # Closed by corral (the client's own 30 s timeout would be TimeoutError).
    assert out[0] in ("closed", "ConnectionResetError"), out
    out = n.run(
        [sys.executable, "-c", NO_FINISH, SERVER_V4, str(ca), NAME], timeout=90
    ).stdout.split()
    # The server's first flight came (we answered the hello), then the bound closed it.
    # (Not the client's own 60 s timeout: that would be TimeoutError; the audit says why.)
    assert out[0] in ("closed", "ConnectionResetError") and out[1] == "True", out
    assert n.call(lambda: n.net.gate.active) == 0
    assert any("did not finish in time" in str(e["reason"]) for e in events(n))


#: A one-certificate HTTPS server for the resumption tests: argv address, port, cert, key.
#: Each process has its own ticket keys, so a restarted one cannot resume an earlier session.
ONE_CERT_SERVER = """
import socket, ssl, sys, threading
addr, port, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
ctx.set_alpn_protocols(["http/1.1"])
srv = socket.create_server((addr, port), reuse_port=True)
print("ready", flush=True)
def serve(raw):
    try:
        with ctx.wrap_socket(raw, server_side=True) as s:
            while b"\\r\\n\\r\\n" not in s.recv(65536):
                pass
            s.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 3\\r\\nConnection: close\\r\\n\\r\\nok\\n")
    except (OSError, ssl.SSLError):
        pass
while True:
    raw, _ = srv.accept()
    threading.Thread(target=serve, args=(raw,), daemon=True).start()
"""

RESUME_PORT = 8450


def test_upstream_sessions_are_resumed_and_a_changed_server_is_verified_again(
    make_net: MakeNet, world: World, servers: None, certs: Path, tmp_path: Path
) -> None:
    """Upstream TLS sessions are kept and resumed (no chain verification on a resumed
    handshake: it was verified when the session was made); a server that can no longer
    resume (restarted, here with an expired certificate) gets a full handshake, which is
    verified and fails as any other, and the failure drops the kept session."""
    tls = TLSConfig(upstream_ca_certs=[str(certs / "ca.pem")], intercepted_ports=[RESUME_PORT])
    n = make_net(NetworkConfig(policy="public-only", tls=tls))
    ca = sandbox_ca(n, tmp_path)
    interceptor = n.net.tcp.tls

    def serve(kind: str) -> subprocess.Popen[bytes]:
        proc = world.spawn_inet(
            [sys.executable, "-c", ONE_CERT_SERVER, SERVER_V4, str(RESUME_PORT),
             str(certs / f"{kind}.pem"), str(certs / f"{kind}.key")],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        return proc

    def get() -> subprocess.CompletedProcess[str]:
        return curl(n, ca, f"https://{NAME}:{RESUME_PORT}/", "--http1.1", port=RESUME_PORT)

    good = serve("good")
    try:
        for _ in range(3):
            assert lines(get()) == ["ok", "1.1 200"]
    finally:
        world.stop_process(good)
    assert interceptor.handshakes == 3
    assert interceptor.resumed == 2  # the first made the session, the others resumed it
    assert len(interceptor._sessions) == 1

    expired = serve("expired")
    try:
        out = get()
    finally:
        world.stop_process(expired)
    assert out.returncode == 35 and "handshake failure" in out.stderr, (out.returncode, out.stderr)
    assert interceptor.verify_failures == 1
    assert len(interceptor._sessions) == 0  # the failed handshake dropped what was kept
    reasons = [str(e["reason"]) for e in events(n) if e["port"] == RESUME_PORT]
    assert any("failed verification" in r and "expired" in r for r in reasons), reasons

    good = serve("good")  # positive control: a full handshake again, verified, carried
    try:
        assert lines(get()) == ["ok", "1.1 200"]
    finally:
        world.stop_process(good)
    assert interceptor.handshakes == 4 and interceptor.resumed == 2


#: A server that speaks first (an SMTPS/IMAPS shape): greets right after its handshake, then
#: closes. argv address, port, cert, key.
GREETING_SERVER = """
import socket, ssl, sys
addr, port, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv = socket.create_server((addr, port), reuse_port=True)
print("ready", flush=True)
while True:
    raw, _ = srv.accept()
    raw.settimeout(10)
    try:
        with ctx.wrap_socket(raw, server_side=True) as s:  # needs the client's Finished
            s.sendall(b"220 greetings\\r\\n")
    except (OSError, ssl.SSLError):
        pass
"""

READ_ONLY_CLIENT = """
import socket, ssl, sys
host, addr, port, ca = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ctx = ssl.create_default_context(cafile=ca)
with socket.create_connection((addr, port), timeout=10) as raw:
    with ctx.wrap_socket(raw, server_hostname=host) as s:
        got = b""
        try:
            while chunk := s.recv(4096):
                got += chunk
        except (ssl.SSLEOFError, ConnectionError):
            pass
        print(got.decode().strip())
"""


def test_a_server_that_speaks_first_is_carried(
    make_net: MakeNet, world: World, servers: None, certs: Path, tmp_path: Path
) -> None:
    """Our Finished toward the upstream is held for the guest's first bytes (one send with
    them); a guest that sends nothing still gets it sent when the relay starts, so a server
    that waits for it and then speaks first (SMTPS, IMAPS) is carried."""
    tls = TLSConfig(upstream_ca_certs=[str(certs / "ca.pem")], intercepted_ports=[RESUME_PORT])
    n = make_net(NetworkConfig(policy="public-only", tls=tls))
    ca = sandbox_ca(n, tmp_path)
    proc = world.spawn_inet(
        [sys.executable, "-c", GREETING_SERVER, SERVER_V4, str(RESUME_PORT),
         str(certs / "good.pem"), str(certs / "good.key")],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        for _ in range(2):  # a full upstream handshake, then a resumed one
            out = n.run(
                [sys.executable, "-c", READ_ONLY_CLIENT, NAME, SERVER_V4, str(RESUME_PORT),
                 str(ca)]
            )  # fmt: skip
            assert out.stdout.strip() == "220 greetings", (out.stdout, out.stderr)
    finally:
        world.stop_process(proc)
    assert n.net.tcp.tls.handshakes == 2
