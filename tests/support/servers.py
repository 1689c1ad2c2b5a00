"""Servers for the test world's internet namespace, and a harness that runs one sandbox's
network data path (:class:`corral.net.SandboxNetwork`) in the world's host namespace.

Servers: ``python -m tests.support.servers ADDR...`` (run by :func:`start_servers` inside a
namespace) listens on every address given:

- TCP 7 and UDP 7: echo (TCP echoes until the client half-closes, then closes);
- TCP 80: a tiny HTTP/1.1 server (keep-alive) answering ``reached <addr>:<port>``;
- TCP 81: accepts, then resets the connection;
- TCP 82: accepts and never says anything (an upstream that hangs);
- TCP 83: a listener that never accepts (backlog 1: further SYNs go unanswered);
- TCP 84: a server-first protocol (an SSH-style banner on accept, then echo).

It prints ``ready`` once every socket is bound, so the caller knows it can start. Sockets use
SO_REUSEPORT, so two test modules' server sets on the same address do not collide.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent

ECHO_PORT = 7
HTTP_PORT = 80
RESET_PORT = 81
HANG_PORT = 82
NEVER_ACCEPT_PORT = 83
BANNER_PORT = 84
BANNER = b"SSH-2.0-corral-test\r\n"


# -- the server process ------------------------------------------------------------------------


async def _tcp_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def _http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    local = writer.get_extra_info("sockname")
    body = f"reached {local[0]}:{local[1]}\n".encode()
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            close = b"connection: close" in head.lower()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                + str(len(body)).encode()
                + (b"\r\nConnection: close" if close else b"")
                + b"\r\n\r\n"
                + body
            )
            await writer.drain()
            if close:
                break
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
        pass
    finally:
        writer.close()


async def _reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(BANNER)
    await _tcp_echo(reader, writer)


async def _hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(3600)  # never a byte, never a FIN: the client must give up
    writer.close()


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(data, addr)  # type: ignore[attr-defined]


async def _serve(addresses: Sequence[str]) -> None:
    loop = asyncio.get_running_loop()
    keep: list[Any] = []
    for addr in addresses:
        for port, handler in (
            (ECHO_PORT, _tcp_echo),
            (HTTP_PORT, _http),
            (RESET_PORT, _reset),
            (HANG_PORT, _hang),
            (BANNER_PORT, _banner),
        ):
            keep.append(
                await asyncio.start_server(handler, addr, port, reuse_address=True, reuse_port=True)
            )
        transport, _ = await loop.create_datagram_endpoint(
            _UdpEcho, local_addr=(addr, ECHO_PORT), reuse_port=True
        )
        keep.append(transport)
        never = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
        never.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        never.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        never.bind(socket.getaddrinfo(addr, NEVER_ACCEPT_PORT, type=socket.SOCK_STREAM)[0][4])
        never.listen(0)
        keep.append(never)
    print("ready", flush=True)
    await asyncio.Event().wait()


def start_servers(
    spawn: Callable[..., subprocess.Popen[bytes]], addresses: Sequence[str]
) -> subprocess.Popen[bytes]:
    """Start the servers with ``spawn`` (``world.spawn_inet`` or ``world.spawn_host``)."""
    proc = spawn(
        [sys.executable, "-m", "tests.support.servers", *addresses],
        stdout=subprocess.PIPE,
        cwd=str(ROOT),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if b"ready" not in line:
        raise RuntimeError(f"test servers on {addresses} did not start")
    return proc


# -- the data path harness ---------------------------------------------------------------------


class RunningNetwork:
    """A SandboxNetwork reserved and started in the world's host netns, on its own loop thread.

    The "sandbox" is the netns the network creates; :meth:`run` executes a client in it.
    """

    def __init__(
        self, host_ns: str, sandbox_id: str, config: Any, state_dir: Path, **kw: Any
    ) -> None:
        from tests.support import netns

        self.sandbox_id = sandbox_id
        self.loop = asyncio.new_event_loop()
        self.error: BaseException | None = None
        self.net: Any = None
        ready = threading.Event()

        def main() -> None:
            from corral.net.datapath import SandboxNetwork

            back = netns.enter_for_good(host_ns)
            try:
                asyncio.set_event_loop(self.loop)
                try:
                    self.net = SandboxNetwork.reserve(sandbox_id, config, state_dir, **kw)
                    self.loop.run_until_complete(self.net.start())
                except BaseException as exc:
                    self.error = exc
                    return
                finally:
                    ready.set()
                self.loop.run_forever()
                self.loop.run_until_complete(self.net.close())
            finally:
                netns.leave(back)
                self.loop.close()

        self.thread = threading.Thread(target=main, name=f"net-{sandbox_id}", daemon=True)
        self.thread.start()
        ready.wait(30)
        if self.error is not None:
            self.thread.join(5)
            raise self.error

    @property
    def netns(self) -> str:
        return str(self.net.names.netns)

    def run(
        self, argv: Sequence[str], timeout: float = 30, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("cwd", str(ROOT))
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], timeout=timeout, **kw)  # type: ignore[call-overload,no-any-return]

    def exchange(
        self, kind: str, addr: str, port: int, payload: str = "ping", timeout: float = 3.0
    ) -> str:
        """``OK <reply>`` or ``ERR <reason>`` of one TCP/UDP exchange from inside the sandbox."""
        argv = client_argv(kind, addr, port, payload, timeout)
        return self.run(argv, timeout=timeout + 30).stdout.strip()

    def ping(self, addr: str, count: int = 1, wait: float = 2.0) -> bool:
        argv = ["ping", "-6" if ":" in addr else "-4", "-c", str(count), "-W", str(wait), addr]
        return self.run(argv).returncode == 0

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["ip", "netns", "exec", self.netns, *argv], **kw)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the network's loop thread and return its result."""
        fut: asyncio.Future[Any] = asyncio.run_coroutine_threadsafe(_call(fn), self.loop)  # type: ignore[arg-type]
        return fut.result(10)

    def close(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)


async def _call(fn: Callable[[], Any]) -> Any:
    return fn()


@contextlib.contextmanager
def running(
    host_ns: str, sandbox_id: str, config: Any, state_dir: Path, **kw: Any
) -> Iterator[RunningNetwork]:
    net = RunningNetwork(host_ns, sandbox_id, config, state_dir, **kw)
    try:
        yield net
    finally:
        net.close()


# -- clients (run inside a sandbox netns) --------------------------------------------------------


def _client(kind: str, addr: str, port: int, payload: bytes, timeout: float) -> str:
    """One exchange; ``OK <reply>`` or ``ERR <errno name or timeout>``."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    try:
        sock.connect((addr, port))
        if kind == "tcp":
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
            reply = b"".join(chunks)
        else:
            sock.send(payload)
            reply = sock.recv(65536)
        return "OK " + reply.decode(errors="replace").strip()
    except TimeoutError:
        return "ERR timeout"
    except OSError as exc:
        import errno as errno_mod

        return "ERR " + errno_mod.errorcode.get(exc.errno or 0, str(exc))
    finally:
        sock.close()


def client_argv(
    kind: str, addr: str, port: int, payload: str = "ping", timeout: float = 3.0
) -> list[str]:
    """argv of a one-shot client (``tcp`` or ``udp``) for :meth:`RunningNetwork.run`."""
    return [
        sys.executable,
        "-m",
        "tests.support.servers",
        "--client",
        kind,
        addr,
        str(port),
        payload,
        str(timeout),
    ]


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if sys.argv[1:2] == ["--client"]:
        kind, addr, port, payload, timeout = sys.argv[2:7]
        print(_client(kind, addr, int(port), payload.encode(), float(timeout)))
        sys.exit(0)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(sys.argv[1:]))
