"""Servers for the test world's internet namespace, and a harness that runs one sandbox's
network data path (:class:`corral.net.SandboxNetwork`) in the world's host namespace.

Servers: ``python -m tests.support.servers ADDR...`` (run by :func:`start_servers` inside a
namespace) listens on every address given:

- TCP 7 and UDP 7: echo (TCP echoes until the client half-closes, then closes);
- TCP 80: a tiny HTTP/1.1 server (keep-alive) answering ``reached <addr>:<port>``;
- TCP 81: accepts, then resets the connection;
- TCP 82: accepts and never says anything (an upstream that hangs);
- TCP 83: a listener that never accepts (backlog 1: further SYNs go unanswered).

It prints ``ready`` once every socket is bound, so the caller knows it can start.
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


async def _hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # until the client gives up
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
        ):
            keep.append(await asyncio.start_server(handler, addr, port, reuse_address=True))
        transport, _ = await loop.create_datagram_endpoint(_UdpEcho, local_addr=(addr, ECHO_PORT))
        keep.append(transport)
        never = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
        never.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        never.bind((addr, NEVER_ACCEPT_PORT))
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
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], timeout=timeout, **kw)  # type: ignore[call-overload,no-any-return]

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


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(sys.argv[1:]))
