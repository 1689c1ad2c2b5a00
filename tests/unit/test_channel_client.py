"""The asyncio ChannelClient against a scripted fake init on a unix socket (no root needed)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from corral.errors import SandboxError
from corral.runtime.channel import (
    FRAME_PREFIX,
    KIND_CONTROL,
    KIND_FILE,
    KIND_STDERR,
    KIND_STDOUT,
    MAX_DATA_SIZE,
    ChannelClient,
    ChannelProtocolError,
    FrameReader,
    encode_control,
    encode_data,
)

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _request(reader: asyncio.StreamReader, frames: FrameReader) -> dict[str, object]:
    while True:
        frame = frames.next_frame()
        if frame is not None:
            return frame.control()
        frames.feed(await reader.read(65536))


def _serve(tmp_path: Path, script: Script, body: Callable[[ChannelClient], Awaitable[object]]) -> object:
    path = tmp_path / "channel.sock"

    async def main() -> object:
        server = await asyncio.start_unix_server(script, path=str(path))
        try:
            client = await ChannelClient.connect(path)
            try:
                return await body(client)
            finally:
                await client.close()
        finally:
            server.close()

    return asyncio.run(main())


def test_exec_streams_and_exit_code(tmp_path: Path) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        request = await _request(r, FrameReader())
        assert request["op"] == "exec" and request["argv"] == ["echo", "hi"]
        w.write(encode_control({"t": "started", "pid": 7}))
        w.write(encode_data(KIND_STDOUT, b"hi\n") + encode_data(KIND_STDERR, b"warn\n"))
        w.write(encode_control({"t": "exit", "code": 3, "timed_out": False}))
        await w.drain()
        w.close()

    async def body(client: ChannelClient) -> object:
        proc = await client.exec(["echo", "hi"])
        seen = [item async for item in proc.output()]
        return proc.pid, seen, await proc.wait()

    assert _serve(tmp_path, script, body) == (7, [("stdout", b"hi\n"), ("stderr", b"warn\n")], 3)


@pytest.mark.parametrize(
    ("garbage", "error"),
    [
        (FRAME_PREFIX.pack(KIND_STDOUT, MAX_DATA_SIZE + 1), ChannelProtocolError),
        (FRAME_PREFIX.pack(42, 0), ChannelProtocolError),
        (FRAME_PREFIX.pack(KIND_CONTROL, 2) + b"[]", ChannelProtocolError),
        (encode_control({"t": "exit"}), ChannelProtocolError),
        (b"", SandboxError),  # connection closed mid-exec
    ],
)
def test_hostile_or_dead_init_gives_a_clear_error(
    tmp_path: Path, garbage: bytes, error: type[Exception]
) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _request(r, FrameReader())
        w.write(encode_control({"t": "started", "pid": 1}) + garbage)
        await w.drain()
        w.close()

    async def body(client: ChannelClient) -> object:
        proc = await client.exec(["x"])
        return await proc.wait()

    with pytest.raises(error):
        _serve(tmp_path, script, body)


def test_read_file_chunks_and_pool_reuse(tmp_path: Path) -> None:
    connections = []

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        connections.append(1)
        frames = FrameReader()
        for _ in range(2):
            request = await _request(r, frames)
            assert request == {"op": "read", "path": "/f"}
            w.write(encode_control({"t": "ok", "size": 6}))
            w.write(encode_data(KIND_FILE, b"abc") + encode_data(KIND_FILE, b"def"))
            w.write(encode_data(KIND_FILE, b""))
            await w.drain()
        await r.read()

    async def body(client: ChannelClient) -> object:
        first = [c async for c in client.read_file("/f")]
        second = [c async for c in client.read_file("/f")]
        return first, second

    assert _serve(tmp_path, script, body) == ([b"abc", b"def"], [b"abc", b"def"])
    assert len(connections) == 1  # the second read reused the pooled connection


def test_error_reply_becomes_a_sentence(tmp_path: Path) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _request(r, FrameReader())
        w.write(encode_control({"t": "error", "op": "stat", "kind": "not_found", "subject": "/x"}))
        await w.drain()
        await r.read()

    async def body(client: ChannelClient) -> object:
        return await client.stat("/x")

    with pytest.raises(SandboxError, match=r"^no such file or directory in the sandbox: '/x'$"):
        _serve(tmp_path, script, body)


def test_connect_to_missing_socket(tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match="connect to the sandbox channel .*is the sandbox running"):
        asyncio.run(ChannelClient.connect(tmp_path / "nope.sock"))
