# ruff: noqa: F811  (pytest fixtures imported from other test modules are parameters here)
"""Secrets on intercepted traffic in the hermetic world: the value goes only to the allowed
host, inside TLS corral terminated, and comes back to the guest as the placeholder.

Real clients in the sandbox netns (curl, HTTP/1.1 and HTTP/2) send the placeholder; the test
servers (tests/support/tls_servers.py) record every plaintext byte they received; every byte
the guest saw is its stdout. The real value must appear in the allowed server's capture and
nowhere else: not in what the guest saw, not in the audit log, not in any other server's
capture. Violations are checked per ViolationAction.
"""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

import pytest

from corral.config import NetworkConfig, SecretEntry, TLSConfig, ViolationAction
from corral.net.secrets import SecretTable
from tests.integration.test_net_datapath import (  # noqa: F401 - fixtures
    MakeNet,
    events,
    make_net,
    servers,
)
from tests.integration.test_net_tls import (  # noqa: F401 - fixtures
    ALL_PORTS,
    certs,
    curl,
    lines,
    sandbox_ca,
    tls_servers,
)
from tests.support.servers import ECHO_PORT, RunningNetwork
from tests.support.tls_servers import GOOD_PORT, NAME
from tests.support.world import SERVER_V4

pytestmark = pytest.mark.timeout(300)

VALUE = "sk-live-7f3a9c1e5b2d4068"
PLACEHOLDER = "$CORRAL_SECRET_API_KEY"


def table(action: ViolationAction | None = None, **kw: object) -> SecretTable:
    entry = SecretEntry(env_var="API_KEY", value=VALUE, allowed_hosts=[NAME], **kw)  # type: ignore[arg-type]
    return SecretTable.from_entries([entry], on_secret_violation=action, environ={})


def start(make_net: MakeNet, certs: Path, secrets: SecretTable, pin: bool = True) -> RunningNetwork:
    tls = TLSConfig(upstream_ca_certs=[str(certs / "ca.pem")], intercepted_ports=ALL_PORTS)
    n = make_net(NetworkConfig(policy="public-only", tls=tls), secrets=secrets)
    if pin:
        address = ipaddress.ip_address(SERVER_V4)
        for name in (NAME, f"api.{NAME}"):
            n.call(lambda name=name: n.net.pins.add([name], [address], 300))
    return n


class Capture:
    """The bytes a test server received since the capture was opened: the plaintext as it
    arrived, then HTTP/2 requests as decoded (header values are HPACK-coded on the wire)."""

    def __init__(self, capdir: Path, port: int = GOOD_PORT) -> None:
        self.paths = [capdir / f"{port}.bin", capdir / f"{port}.h2"]
        self.starts = [p.stat().st_size if p.exists() else 0 for p in self.paths]

    def read(self) -> bytes:
        out = b""
        for path, start in zip(self.paths, self.starts, strict=True):
            if path.exists():
                with path.open("rb") as f:
                    f.seek(start)
                    out += f.read() + b"\n--\n"
        return out


def audit_text(n: RunningNetwork) -> str:
    return n.net.audit_path.read_text() if n.net.audit_path.exists() else ""


@pytest.mark.parametrize("version", ["--http1.1", "--http2"])
def test_value_reaches_only_the_allowed_host_and_echoes_are_masked(
    make_net: MakeNet, tls_servers: Path, certs: Path, tmp_path: Path, version: str
) -> None:
    n = start(make_net, certs, table())
    ca = sandbox_ca(n, tmp_path)
    cap = Capture(tls_servers)
    out = curl(n, ca, f"https://{NAME}/echo", version, "-H", f"Authorization: Bearer {PLACEHOLDER}")
    seen = cap.read()
    assert VALUE.encode() in seen, seen  # substituted on its way to the allowed host
    assert PLACEHOLDER.encode() not in seen
    # The server echoed the request (the value in it); the guest got the placeholder back.
    assert PLACEHOLDER in out.stdout, (out.stdout, out.stderr)
    assert VALUE not in out.stdout and VALUE not in out.stderr
    # The reflected header too (response headers are masked).
    out = curl(n, ca, f"https://{NAME}/reflect?h=authorization", version, "-i",
               "-H", f"Authorization: Bearer {PLACEHOLDER}")  # fmt: skip
    assert VALUE not in out.stdout and PLACEHOLDER in out.stdout, out.stdout
    assert VALUE not in audit_text(n)


@pytest.mark.parametrize("version", ["--http1.1", "--http2"])
def test_placeholder_to_another_host_is_blocked_and_logged(
    make_net: MakeNet, tls_servers: Path, certs: Path, tmp_path: Path, version: str
) -> None:
    n = start(make_net, certs, table())
    ca = sandbox_ca(n, tmp_path)
    cap = Capture(tls_servers)
    other = f"api.{NAME}"  # same server, a name the secret does not allow
    out = n.run(["curl", "-sS", "-m", "10", "--cacert", str(ca), "--resolve", f"{other}:443:{SERVER_V4}",
                 version, "-H", f"X-Key: {PLACEHOLDER}", f"https://{other}/echo"])  # fmt: skip
    seen = cap.read()
    assert PLACEHOLDER.encode() not in seen and VALUE.encode() not in seen, seen
    assert VALUE not in out.stdout
    assert out.returncode != 0 or "200" not in out.stdout, out.stdout
    text = audit_text(n)
    assert "API_KEY" in text and other in text, text
    assert VALUE not in text
    # Positive control: without the placeholder the same request goes through.
    out = n.run(["curl", "-sS", "-m", "10", "--cacert", str(ca), "--resolve", f"{other}:443:{SERVER_V4}",
                 version, f"https://{other}/"])  # fmt: skip
    assert out.stdout.startswith(f"hello {other}"), out.stderr


def test_an_unpinned_destination_gets_no_value(
    make_net: MakeNet, tls_servers: Path, certs: Path, tmp_path: Path
) -> None:
    """The SNI names the allowed host, but the sandbox's DNS never returned this address for
    it: the value is not put in (a guest could otherwise aim the allowed name at any server)."""
    n = start(make_net, certs, table(), pin=False)
    ca = sandbox_ca(n, tmp_path)
    cap = Capture(tls_servers)
    curl(n, ca, f"https://{NAME}/echo", "-H", f"Authorization: Bearer {PLACEHOLDER}")
    seen = cap.read()
    assert VALUE.encode() not in seen and PLACEHOLDER.encode() not in seen, seen
    assert "API_KEY" in audit_text(n)


@pytest.mark.parametrize(
    "action",
    [ViolationAction.BLOCK, ViolationAction.BLOCK_AND_LOG, ViolationAction.BLOCK_AND_TERMINATE],
)
def test_violation_actions(
    make_net: MakeNet, tls_servers: Path, certs: Path, tmp_path: Path, action: ViolationAction
) -> None:
    n = start(make_net, certs, table(action))
    stopped: list[str] = []
    n.call(lambda: setattr(n.net, "on_terminate", stopped.append))
    ca = sandbox_ca(n, tmp_path)
    cap = Capture(tls_servers)
    other = f"api.{NAME}"
    n.run(["curl", "-sS", "-m", "10", "--cacert", str(ca), "--resolve", f"{other}:443:{SERVER_V4}",
           "-H", f"X-Key: {PLACEHOLDER}", f"https://{other}/echo"])  # fmt: skip
    assert PLACEHOLDER.encode() not in cap.read()
    logged = [e for e in events(n) if "API_KEY" in str(e["reason"])]
    if action is ViolationAction.BLOCK:
        assert logged == []
    else:
        assert logged and all(e["action"] == "deny" for e in logged), logged
    assert bool(stopped) == (action is ViolationAction.BLOCK_AND_TERMINATE), stopped
    assert VALUE not in audit_text(n) and all(VALUE not in s for s in stopped)


def test_plain_http_and_unintercepted_ports_do_not_carry_the_placeholder(
    make_net: MakeNet, tls_servers: Path, certs: Path
) -> None:
    """Plain HTTP goes through the HTTP/1 rewriter in detect-only mode; any other TCP
    connection has its first flight searched. The echo server would send the placeholder
    straight back if it had received it."""
    n = start(make_net, certs, table())
    # Plain HTTP to the world's HTTP server (port 80): positive control, then the placeholder.
    ok = n.run(["curl", "-sS", "-m", "5", f"http://{SERVER_V4}/"])
    assert ok.stdout.strip() == f"reached {SERVER_V4}:80", ok.stderr
    out = n.run(["curl", "-sS", "-m", "5", "-H", f"X-Key: {PLACEHOLDER}", f"http://{SERVER_V4}/"])
    assert "reached" not in out.stdout, out.stdout
    # Keep-alive: a second request on the connection is read too (not only the first flight).
    script = (
        "import socket,sys\n"
        "s=socket.create_connection((sys.argv[1],80),timeout=5)\n"
        "s.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'); print(s.recv(4096).split(b'\\r\\n')[0].decode())\n"
        "s.sendall(b'GET /?k=' + sys.argv[2].encode() + b' HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\n"
        "try: print(repr(s.recv(4096)[:12]))\n"
        "except OSError as e: print(type(e).__name__)\n"
    )
    got = n.run([sys.executable, "-c", script, SERVER_V4, PLACEHOLDER]).stdout.split("\n")
    assert got[0] == "HTTP/1.1 200 OK" and "200 OK" not in got[1], got
    # A TCP echo (not HTTP): the first flight is searched.
    assert n.exchange("tcp", SERVER_V4, ECHO_PORT, "hello") == "OK hello"
    out = n.exchange("tcp", SERVER_V4, ECHO_PORT, f"key={PLACEHOLDER}")
    assert PLACEHOLDER not in out and out.startswith("ERR"), out
    reasons = [str(e["reason"]) for e in events(n) if "API_KEY" in str(e["reason"])]
    assert len(reasons) >= 3, reasons
    assert VALUE not in audit_text(n)


def test_streaming_still_works_through_the_rewriters(
    make_net: MakeNet, tls_servers: Path, certs: Path, tmp_path: Path
) -> None:
    """With secrets the plaintext goes through the HTTP/1 and HTTP/2 rewriters: a WebSocket
    echo and an h2 bidirectional stream (gRPC's shape) still work message by message, and a
    placeholder inside a WebSocket message is stopped (the echo would return it)."""
    from tests.integration.test_net_tls import H2_STREAM, WEBSOCKET

    n = start(make_net, certs, table())
    ca = sandbox_ca(n, tmp_path)
    out = n.run([sys.executable, "-c", WEBSOCKET, NAME, SERVER_V4, str(ca)])
    assert lines(out) == [
        "HTTP/1.1 101 Switching Protocols",
        "message 0",
        "message 1",
        "message 2",
    ], out.stderr
    out = n.run([sys.executable, "-c", H2_STREAM, NAME, SERVER_V4, str(ca)])
    assert lines(out) == ["chunk 0", "chunk 1", "chunk 2"], out.stderr
    leak = WEBSOCKET.replace('f"message {i}"', f'f"message {{i}} {PLACEHOLDER}"')
    cap = Capture(tls_servers)
    out = n.run([sys.executable, "-c", leak, NAME, SERVER_V4, str(ca)])
    assert PLACEHOLDER not in out.stdout, out.stdout
    assert PLACEHOLDER.encode() not in cap.read()
    assert any("API_KEY" in str(e["reason"]) for e in events(n))


H2_CONTINUATION = """
import socket, ssl, sys
import h2.connection, h2.events
host, addr, ca, placeholder = sys.argv[1:5]
ctx = ssl.create_default_context(cafile=ca)
ctx.set_alpn_protocols(["h2"])
with socket.create_connection((addr, 443), timeout=10) as raw, ctx.wrap_socket(raw, server_hostname=host) as s:
    c = h2.connection.H2Connection()
    c.initiate_connection()
    s.sendall(c.data_to_send())
    # A header block over 16 KiB: h2 sends HEADERS + CONTINUATION, the placeholder after the cut.
    c.send_headers(1, [(":method", "GET"), (":path", "/echo"), (":scheme", "https"),
                       (":authority", host), ("x-filler", "f" * 20000), ("x-key", placeholder)],
                   end_stream=True)
    s.sendall(c.data_to_send())
    status = None
    try:
        while status is None:
            data = s.recv(65536)
            if not data:
                break
            for ev in c.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = dict(ev.headers)[b":status"].decode()
                elif isinstance(ev, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    status = type(ev).__name__
            s.sendall(c.data_to_send())
    except OSError as e:
        status = type(e).__name__
    print(status)
"""

SPLIT_WRITES = """
import socket, ssl, sys, time
host, addr, ca, placeholder = sys.argv[1:5]
ctx = ssl.create_default_context(cafile=ca)
ctx.set_alpn_protocols(["http/1.1"])
with socket.create_connection((addr, 443), timeout=10) as raw, ctx.wrap_socket(raw, server_hostname=host) as s:
    half = len(placeholder) // 2
    s.sendall(b"GET /echo HTTP/1.1\\r\\nHost: " + host.encode() + b"\\r\\nX-Key: " + placeholder[:half].encode())
    time.sleep(0.2)  # two TLS records, two reads on corral's side
    s.sendall(placeholder[half:].encode() + b"\\r\\n\\r\\n")
    try:
        print(s.recv(100).split(b"\\r\\n")[0].decode() or "closed")
    except OSError as e:
        print(type(e).__name__)
"""


@pytest.mark.parametrize(
    "how",
    ["percent-in-query", "basic-auth", "json-body", "split-writes", "h2-continuation"],
)
def test_encoded_placeholders_toward_another_host_never_arrive(
    make_net: MakeNet, tls_servers: Path, certs: Path, tmp_path: Path, how: str
) -> None:
    """Point 7's shapes, through the real interceptor: each toward a host the secret does not
    allow, each stopped (the server's capture holds neither the placeholder nor the value, in
    any of the encodings used) and audited by name."""
    import base64

    n = start(make_net, certs, table())
    ca = sandbox_ca(n, tmp_path)
    other = f"api.{NAME}"
    cap = Capture(tls_servers)
    base = ["curl", "-sS", "-m", "10", "--cacert", str(ca), "--resolve", f"{other}:443:{SERVER_V4}"]
    if how == "percent-in-query":
        out = n.run([*base, f"https://{other}/echo?k=%24CORRAL_SECRET_API%5FKEY"])
    elif how == "basic-auth":
        out = n.run([*base, "-u", f"user:{PLACEHOLDER}", f"https://{other}/echo"])
    elif how == "json-body":
        out = n.run(
            [*base, "--data", '{"k": "\\u0024CORRAL_SECRET_API_KEY"}', f"https://{other}/echo"]
        )
    elif how == "split-writes":
        out = n.run([sys.executable, "-c", SPLIT_WRITES, other, SERVER_V4, str(ca), PLACEHOLDER])
    else:
        out = n.run([sys.executable, "-c", H2_CONTINUATION, other, SERVER_V4, str(ca), PLACEHOLDER])
        assert out.stdout.strip() != "200", out.stdout
    seen = cap.read()
    forms = [PLACEHOLDER.encode(), b"%24CORRAL_SECRET", b"\\u0024CORRAL_SECRET", VALUE.encode(),
             base64.b64encode(f"user:{PLACEHOLDER}".encode()), base64.b64encode(f"user:{VALUE}".encode())]  # fmt: skip
    assert not [f for f in forms if f in seen], seen[-300:]
    assert "200 OK" not in out.stdout and f"hello {other}" not in out.stdout, out.stdout
    assert any("API_KEY" in str(e["reason"]) for e in events(n)), events(n)


def test_basic_auth_is_substituted_toward_the_allowed_host(
    make_net: MakeNet, tls_servers: Path, certs: Path, tmp_path: Path
) -> None:
    import base64

    n = start(make_net, certs, table())
    ca = sandbox_ca(n, tmp_path)
    cap = Capture(tls_servers)
    out = curl(n, ca, f"https://{NAME}/echo", "--http1.1", "-u", f"user:{PLACEHOLDER}")
    seen = cap.read()
    assert base64.b64encode(f"user:{VALUE}".encode()) in seen, seen[-300:]
    assert VALUE not in out.stdout
    # The echo carried the substituted credentials back; the guest sees its own.
    assert base64.b64encode(f"user:{PLACEHOLDER}".encode()).decode() in out.stdout, out.stdout
