"""The supervisor fork server: request/reply, a failed supervisor start, shutdown on close."""

from __future__ import annotations

import os
import select
import socket
import sys
import time
from pathlib import Path

import pytest

from corral.lifecycle import forkserver, spawn


@pytest.fixture
def client() -> object:
    c = forkserver.ForkServerClient([sys.executable, "-I", "-S", "-c", spawn._bootstrap_code()])
    yield c
    c.close()


def read_line(fd: int, timeout: float = 30) -> str:
    data = b""
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, "no answer on the ready pipe"
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode()


def test_a_supervisor_without_state_reports_one_error_line(
    client: forkserver.ForkServerClient, tmp_path: Path
) -> None:
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        pid = client.fork_supervisor(str(tmp_path), write_end)
    finally:
        os.close(write_end)
    assert pid > 0
    line = read_line(read_end)
    os.close(read_end)
    status, kind, message = line.rstrip("\n").split("\t")
    assert (status, kind) == ("error", "StartError") or kind == "SandboxError", line
    assert "state.json" in message or "fork failed" in message
    assert (tmp_path / "supervisor.log").exists()


def test_malformed_requests_are_refused_and_the_server_keeps_serving(
    client: forkserver.ForkServerClient, tmp_path: Path
) -> None:
    sock: socket.socket = client._sock  # type: ignore[attr-defined]
    sock.send(b"not json")
    assert b"error" in sock.recv(4096)
    socket.send_fds(sock, [b'{"state_dir": "/x", "env": {}}'], [])  # no fds attached
    assert b"error" in sock.recv(4096)
    assert client.usable()
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        client.fork_supervisor(str(tmp_path), write_end)
    finally:
        os.close(write_end)
    assert read_line(read_end).startswith("error\t")
    os.close(read_end)


def test_the_server_exits_when_the_sdk_closes_its_end() -> None:
    c = forkserver.ForkServerClient([sys.executable, "-I", "-S", "-c", spawn._bootstrap_code()])
    proc = c._proc  # type: ignore[attr-defined]
    assert c.usable()
    c.close()
    assert proc.returncode == 0


def test_no_process_of_the_server_outlives_close() -> None:
    c = forkserver.ForkServerClient([sys.executable, "-I", "-S", "-c", spawn._bootstrap_code()])
    server_pid = c._proc.pid  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    children: list[str] = []
    while not children and time.monotonic() < deadline:  # the spare is forked at start-up
        children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
        time.sleep(0.01)
    assert len(children) == 1
    c.close()
    assert not Path(f"/proc/{children[0]}").exists()
