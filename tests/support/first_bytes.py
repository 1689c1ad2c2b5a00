"""Clients that reveal a name in their first bytes, run inside a sandbox netns.

``python -m tests.support.first_bytes tls NAME ADDR PORT`` sends a real TLS ClientHello
(made by Python's ssl module, SNI = NAME, or no SNI when NAME is ``-``) and prints ``OK echo``
when the server (an echo server) sent it back, else ``ERR <errno name or timeout>``.

``... http HOST ADDR PORT`` sends ``GET / HTTP/1.1`` with ``Host: HOST`` and prints ``OK
<status line>`` or ``ERR ...``. ``... banner - ADDR PORT`` only reads: ``OK <first line>``.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import ssl
import sys


def client_hello(name: str | None) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def main(kind: str, name: str, addr: str, port: int, timeout: float) -> str:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((addr, port))
        if kind == "tls":
            hello = client_hello(None if name == "-" else name)
            sock.sendall(hello)
            got = b""
            while len(got) < len(hello):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                got += chunk
            return "OK echo" if got == hello else f"ERR short echo ({len(got)} bytes)"
        if kind == "http":
            sock.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        data = sock.recv(65536)
        if not data:
            return "ERR closed"
        return "OK " + data.split(b"\r\n", 1)[0].decode(errors="replace")
    except TimeoutError:
        return "ERR timeout"
    except OSError as exc:
        return "ERR " + errno.errorcode.get(exc.errno or 0, str(exc))
    finally:
        sock.close()


if __name__ == "__main__":
    kind, name, addr, port = sys.argv[1:5]
    timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 5.0
    print(main(kind, name, addr, int(port), timeout))
