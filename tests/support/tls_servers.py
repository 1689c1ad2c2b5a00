"""TLS servers for the test world's internet namespace (interception and secrets tests).

``python -m tests.support.tls_servers CERTDIR CAPTUREDIR ADDR...`` listens on every address:

- TCP 443: a certificate of the test CA for ``good.test`` and ``*.good.test``, ALPN h2 and
  http/1.1 (HTTP/2 through the h2 library, HTTP/1.1 through a small parser of our own);
- TCP 8443: the same name, an expired certificate; 8444: self-signed; 8445: a certificate for
  ``other.test`` (wrong name); 8446: a good certificate offering http/1.1 only.

Routes (both HTTP versions): ``/echo`` answers the request as the server received it (head
and body, as text; HTTP/2: the header list and body); ``/big?n=N`` N bytes of ``x``;
``/stream`` (HTTP/2) echoes each DATA frame of the request as a DATA frame of the response as
it arrives (a gRPC-style bidirectional stream); ``/ws`` (HTTP/1.1) a WebSocket echo;
``/reset`` (HTTP/1.1) announces 1 MiB, sends 64 KiB and resets the connection;
``/reflect?h=NAME`` answers the value of request header NAME in a response header and the
body (an echo endpoint for masking); anything else ``hello <sni> <alpn>``.

Every plaintext byte a connection received is appended to ``CAPTUREDIR/<port>.bin`` (and
every byte it sent to ``<port>.out``) so tests can search what the server saw.

:func:`make_certs` (run by the test, in the root namespace) writes the test CA and the
certificates. Prints ``ready`` once bound.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import os
import socket
import ssl
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

ROOT = Path(__file__).resolve().parent.parent.parent

GOOD_PORT = 443
EXPIRED_PORT = 8443
SELF_SIGNED_PORT = 8444
WRONG_NAME_PORT = 8445
H1_ONLY_PORT = 8446
PORTS = (GOOD_PORT, EXPIRED_PORT, SELF_SIGNED_PORT, WRONG_NAME_PORT, H1_ONLY_PORT)
NAME = "good.test"

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


# -- certificates (root namespace, at test setup) ----------------------------------------------
def make_certs(directory: Path, extra_names: Sequence[str] = ()) -> Path:
    """Write ca.pem, and <kind>.pem/<kind>.key for good, expired, selfsigned, wrong.

    ``extra_names`` are further names of the good certificate (the docs' and the demo's
    world serve it under a name of their own zone)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("corral test CA"))
        .issuer_name(name("corral test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def leaf(
        kind: str, names: list[str], *, expired: bool = False, self_signed: bool = False
    ) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        start = now - dt.timedelta(days=10 if expired else 1)
        end = now - dt.timedelta(days=2) if expired else now + dt.timedelta(days=10)
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(names[0]))
            .issuer_name(name(names[0]) if self_signed else ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
            )
        )
        cert = builder.sign(key if self_signed else ca_key, hashes.SHA256())
        (directory / f"{kind}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{kind}.key").write_bytes(key_pem(key))

    # A CA of "the user's own" (tls.ca_cert / tls.ca_key), never used by the servers.
    user_key = ec.generate_private_key(ec.SECP256R1())
    user = (
        x509.CertificateBuilder()
        .subject_name(name("user CA"))
        .issuer_name(name("user CA"))
        .public_key(user_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(user_key, hashes.SHA256())
    )
    (directory / "userca.pem").write_bytes(user.public_bytes(serialization.Encoding.PEM))
    (directory / "userca.key").write_bytes(key_pem(user_key))
    leaf("good", [NAME, f"*.{NAME}", *extra_names])
    leaf("expired", [NAME], expired=True)
    leaf("selfsigned", [NAME], self_signed=True)
    leaf("wrong", ["other.test"])
    return directory / "ca.pem"


# -- the server process ------------------------------------------------------------------------
class _Capture:
    def __init__(self, directory: Path, port: int) -> None:
        self.inp = open(directory / f"{port}.bin", "ab", buffering=0)  # noqa: SIM115
        self.out = open(directory / f"{port}.out", "ab", buffering=0)  # noqa: SIM115
        # HTTP/2 requests as decoded (HPACK hides header values from a byte search of .bin).
        self.dec = open(directory / f"{port}.h2", "ab", buffering=0)  # noqa: SIM115


class _Conn:
    """A StreamWriter wrapper that captures what is sent."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cap: _Capture
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.cap = cap

    async def read(self, n: int = 65536) -> bytes:
        data = await self.reader.read(n)
        self.cap.inp.write(data)
        return data

    def write(self, data: bytes) -> None:
        self.cap.out.write(data)
        self.writer.write(data)


def _route_body(path: str, sni: str, alpn: str) -> tuple[bytes, list[tuple[bytes, bytes]]] | None:
    url = urlsplit(path)
    if url.path == "/big":
        return None
    return f"hello {sni} {alpn}\n".encode(), []


async def _http1(conn: _Conn, sni: str, alpn: str) -> None:
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            data = await conn.read()
            if not data:
                return
            buf += data
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        method, target, _ = lines[0].split(b" ", 2)
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip()
        body = b""
        if b"content-length" in headers:
            n = int(headers[b"content-length"])
            while len(buf) < n:
                data = await conn.read()
                if not data:
                    return
                buf += data
            body, buf = buf[:n], buf[n:]
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            while True:
                while b"\r\n" not in buf:
                    buf += await conn.read()
                size_line, _, buf = buf.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                while len(buf) < size + 2:
                    buf += await conn.read()
                body += buf[:size]
                buf = buf[size + 2 :]
                if size == 0:
                    break
        url = urlsplit(target.decode())
        extra = b""
        if url.path == "/ws" and headers.get(b"upgrade", b"").lower() == b"websocket":
            accept = base64.b64encode(
                hashlib.sha1(headers[b"sec-websocket-key"] + _WS_GUID).digest()
            )
            conn.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            await _ws_echo(conn, buf)
            return
        if url.path == "/echo":
            out = head + b"\r\n\r\n" + body
        elif url.path == "/big":
            n = int(parse_qs(url.query).get("n", ["0"])[0])
            conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
            chunk = b"x" * 65536
            left = n
            while left:
                piece = chunk[: min(left, len(chunk))]
                conn.writer.write(piece)  # not captured: megabytes of x
                left -= len(piece)
                await conn.writer.drain()
            continue
        elif url.path == "/reset":
            # An upstream that dies mid-body: 1 MiB announced, 64 KiB sent, then a TCP reset.
            conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n" + b"r" * 65536)
            await conn.writer.drain()
            raw = conn.writer.get_extra_info("socket")
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.writer.transport.abort()
            return
        elif url.path == "/reflect":
            name = parse_qs(url.query).get("h", ["authorization"])[0].encode().lower()
            value = headers.get(name, b"")
            extra = b"X-Reflected: " + value + b"\r\n"
            out = value + b"\n"
        else:
            out = f"hello {sni} {alpn}\n".encode()
        conn.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % len(out) + out
        )  # fmt: skip
        await conn.writer.drain()
        if method == b"HEAD":
            continue


async def _ws_echo(conn: _Conn, buf: bytes) -> None:
    while True:
        while len(buf) < 2:
            data = await conn.read()
            if not data:
                return
            buf += data
        b1, b2 = buf[0], buf[1]
        n = b2 & 0x7F
        pos = 2
        if n == 126:
            n, pos = int.from_bytes(buf[2:4], "big"), 4
        elif n == 127:
            n, pos = int.from_bytes(buf[2:10], "big"), 10
        masked = bool(b2 & 0x80)
        need = pos + (4 if masked else 0) + n
        while len(buf) < need:
            data = await conn.read()
            if not data:
                return
            buf += data
        mask = buf[pos : pos + 4] if masked else b"\0\0\0\0"
        start = pos + (4 if masked else 0)
        payload = bytes(c ^ mask[i % 4] for i, c in enumerate(buf[start:need]))
        buf = buf[need:]
        opcode = b1 & 0x0F
        if opcode == 8:
            conn.write(b"\x88\x00")
            return
        head = bytes([0x80 | opcode])
        head += bytes([n]) if n < 126 else b"\x7e" + n.to_bytes(2, "big")
        conn.write(head + payload)
        await conn.writer.drain()


async def _http2(conn: _Conn, sni: str) -> None:
    import h2.config
    import h2.connection
    import h2.events

    h = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    h.initiate_connection()
    conn.write(h.data_to_send())
    streams: dict[int, dict[str, object]] = {}
    pending: dict[int, list[object]] = {}  # stream -> [bytes left, end_stream]

    def send_data(sid: int, data: bytes, *, end: bool) -> None:
        if sid in pending:
            p = pending[sid]
            p[0] = p[0] + data  # type: ignore[operator]
            p[1] = end
        else:
            pending[sid] = [data, end]
        flush()

    def flush() -> None:
        for sid in list(pending):
            data, end = pending[sid]
            assert isinstance(data, bytes)
            view, pos = memoryview(data), 0  # offsets, not slices: bodies are 64 MiB
            while True:
                room = min(h.local_flow_control_window(sid), h.max_outbound_frame_size)
                if room <= 0 and pos < len(data):
                    break
                piece = bytes(view[pos : pos + room])
                pos += len(piece)
                last = pos >= len(data)
                h.send_data(sid, piece, end_stream=bool(end) and last)
                if last:
                    del pending[sid]
                    break
            if sid in pending:
                pending[sid][0] = data[pos:]

    def respond(
        sid: int, status: bytes, body: bytes, extra: list[tuple[bytes, bytes]] = ()
    ) -> None:  # type: ignore[assignment]
        h.send_headers(
            sid, [(b":status", status), (b"content-length", str(len(body)).encode()), *extra]
        )
        send_data(sid, body, end=True)

    while True:
        data = await conn.read()
        if not data:
            return
        for ev in h.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                hdrs = [(bytes(k), bytes(v)) for k, v in ev.headers]
                conn.cap.dec.write(b"".join(k + b": " + v + b"\n" for k, v in hdrs))
                path = dict(hdrs).get(b":path", b"/").decode()
                streams[ev.stream_id] = {"headers": hdrs, "body": b"", "path": path}
                if urlsplit(path).path == "/stream":
                    h.send_headers(ev.stream_id, [(b":status", b"200")])
            elif isinstance(ev, h2.events.DataReceived):
                st = streams[ev.stream_id]
                h.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                conn.cap.dec.write(ev.data)
                if urlsplit(str(st["path"])).path == "/stream":
                    if ev.data:
                        send_data(ev.stream_id, ev.data, end=False)
                else:
                    st["body"] = st["body"] + ev.data  # type: ignore[operator]
            elif isinstance(ev, h2.events.StreamEnded):
                st = streams.pop(ev.stream_id)
                url = urlsplit(str(st["path"]))
                hdrs = st["headers"]  # type: ignore[assignment]
                if url.path == "/stream":
                    send_data(ev.stream_id, b"", end=True)
                elif url.path == "/echo":
                    text = b"".join(k + b": " + v + b"\n" for k, v in hdrs) + b"\n" + st["body"]  # type: ignore[operator]
                    respond(ev.stream_id, b"200", text)
                elif url.path == "/big":
                    n = int(parse_qs(url.query).get("n", ["0"])[0])
                    respond(ev.stream_id, b"200", b"x" * n)
                elif url.path == "/reflect":
                    name = parse_qs(url.query).get("h", ["authorization"])[0].encode().lower()
                    value = dict(hdrs).get(name, b"")
                    respond(ev.stream_id, b"200", value + b"\n", [(b"x-reflected", value)])
                else:
                    respond(ev.stream_id, b"200", f"hello {sni} h2\n".encode())
            elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                flush()
            elif isinstance(ev, h2.events.StreamReset):
                pending.pop(ev.stream_id, None)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                conn.write(h.data_to_send())
                return
        out = h.data_to_send()
        if out:
            conn.write(out)
            await conn.writer.drain()


def _context(certdir: Path, kind: str, alpn: list[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certdir / f"{kind}.pem", certdir / f"{kind}.key")
    ctx.set_alpn_protocols(alpn)

    def remember(obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        obj.corral_sni = name  # type: ignore[attr-defined]  # what the server was asked for

    ctx.sni_callback = remember  # type: ignore[assignment]
    return ctx


def _handler(
    capdir: Path, port: int
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], object]:
    cap = _Capture(capdir, port)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_obj = writer.get_extra_info("ssl_object")
        alpn = ssl_obj.selected_alpn_protocol() or "none"
        sni = getattr(ssl_obj, "corral_sni", None) or "-"
        conn = _Conn(reader, writer, cap)
        try:
            if alpn == "h2":
                await _http2(conn, sni)
            else:
                await _http1(conn, sni, alpn)
        except (OSError, ValueError, asyncio.IncompleteReadError, IndexError):
            pass
        except Exception:  # a bug of the test server: say so on stderr, end the connection
            import traceback

            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    return handle


async def _serve(certdir: Path, capdir: Path, addresses: list[str]) -> None:
    kinds = {
        GOOD_PORT: ("good", ["h2", "http/1.1"]),
        EXPIRED_PORT: ("expired", ["h2", "http/1.1"]),
        SELF_SIGNED_PORT: ("selfsigned", ["h2", "http/1.1"]),
        WRONG_NAME_PORT: ("wrong", ["h2", "http/1.1"]),
        H1_ONLY_PORT: ("good", ["http/1.1"]),
    }
    keep = []
    for port, (kind, alpn) in kinds.items():
        ctx = _context(certdir, kind, alpn)
        handler = _handler(capdir, port)
        for addr in addresses:
            keep.append(
                await asyncio.start_server(
                    handler,
                    addr,
                    port,
                    ssl=ctx,
                    reuse_address=True,
                    reuse_port=True,  # type: ignore[arg-type]
                )
            )
    print("ready", flush=True)
    await asyncio.Event().wait()


def start_tls_servers(
    spawn: Callable[..., subprocess.Popen[bytes]], certdir: Path, capdir: Path, addresses: list[str]
) -> subprocess.Popen[bytes]:
    capdir.mkdir(parents=True, exist_ok=True)
    proc = spawn(
        [sys.executable, "-m", "tests.support.tls_servers", str(certdir), str(capdir), *addresses],
        stdout=subprocess.PIPE,
        cwd=str(ROOT),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if b"ready" not in line:
        raise RuntimeError("the TLS test servers did not start")
    return proc


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]))
