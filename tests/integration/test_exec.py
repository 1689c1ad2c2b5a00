"""Exec through the channel: args, env, cwd, stdin, timeout, exit codes, streams, errors."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from corral.errors import SandboxError
from corral.runtime import launcher
from corral.runtime.channel import EXIT_TIMED_OUT, ChannelClient
from corral.runtime.channel_wire import (
    KIND_CONTROL,
    KIND_STDIN,
    KIND_STDOUT,
    Frame,
    FrameReader,
    encode_control,
    encode_data,
    short_unix_path,
)
from tests.support.sandbox import collect, launched, run, sh
from tests.support.waiting import async_wait_for, wait_for


@pytest.fixture(scope="module")
def sb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[launcher.Launched]:
    with launched(tmp_path_factory.mktemp("exec") / "sb", name="exec-box") as s:
        yield s


async def _exec(sb: launcher.Launched, argv: list[str], **kw: object) -> tuple[int, bytes, bytes]:
    client = await ChannelClient.connect(sb.channel_path)
    try:
        return await collect(await client.exec(argv, **kw))  # type: ignore[arg-type]
    finally:
        await client.close()


def test_true_exits_zero(sb: launcher.Launched) -> None:
    assert run(_exec(sb, ["true"])) == (0, b"", b"")


@pytest.mark.parametrize("code", [1, 3, 42, 255])
def test_exit_codes(sb: launcher.Launched, code: int) -> None:
    assert run(sh(sb, f"exit {code}"))[0] == code


def test_killed_by_signal_is_128_plus_signal(sb: launcher.Launched) -> None:
    assert run(sh(sb, "kill -TERM $$"))[0] == 128 + 15


def test_args_are_passed_verbatim(sb: launcher.Launched) -> None:
    args = ["a b", "", "ünïcode", "$HOME", "'quoted'", "-n"]
    code, out, _ = run(_exec(sb, ["printf", "[%s]\\n", *args]))
    assert code == 0
    assert out.decode().splitlines() == [f"[{a}]" for a in args]


def test_stdout_and_stderr_are_separate(sb: launcher.Launched) -> None:
    code, out, err = run(sh(sb, "echo to-out; echo to-err >&2; echo more-out"))
    assert (code, out, err) == (0, "to-out\nmore-out\n", "to-err\n")


def test_env_merges_over_the_base_environment(sb: launcher.Launched) -> None:
    code, out, _ = run(sh(sb, 'echo "$CORRAL_TEST/$EXTRA/$HOME"', env={"EXTRA": "x y"}))
    assert out == "base/x y//root\n"
    code, out, _ = run(sh(sb, 'echo "$CORRAL_TEST"', env={"CORRAL_TEST": "override"}))
    assert out == "override\n"


def test_cwd_default_and_explicit(sb: launcher.Launched) -> None:
    assert run(sh(sb, "pwd"))[1] == "/\n"
    assert run(sh(sb, "pwd", cwd="/etc"))[1] == "/etc\n"


def test_stdin_bytes(sb: launcher.Launched) -> None:
    code, out, _ = run(_exec(sb, ["cat"], stdin=b"line one\nline two\n"))
    assert (code, out) == (0, b"line one\nline two\n")


def test_stdin_stream_larger_than_pipe_buffers(sb: launcher.Launched) -> None:
    piece = bytes(range(256)) * 4096  # 1 MiB

    async def source() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield piece

    code, out, _ = run(_exec(sb, ["sh", "-c", "cat | wc -c; cat /dev/null"], stdin=source()))
    assert (code, out.strip()) == (0, str(8 * len(piece)).encode())


def test_large_output_streams_back_intact(sb: launcher.Launched) -> None:
    code, out, _ = run(sh(sb, "head -c 20000000 /dev/zero | tr '\\0' x"))
    assert code == 0 and len(out) == 20_000_000 and set(out) == {"x"}


def test_empty_stdin_gives_eof(sb: launcher.Launched) -> None:
    assert run(_exec(sb, ["cat"], stdin=b"")) == (0, b"", b"")


def test_output_is_streamed_while_the_command_runs(sb: launcher.Launched) -> None:
    """The command waits for a file only the client creates after it saw the first line."""

    async def go() -> list[str]:
        client = await ChannelClient.connect(sb.channel_path)
        try:
            await client.remove("/tmp/go") if await client.exists("/tmp/go") else None
            proc = await client.exec(
                ["sh", "-c", "echo ready; while [ ! -e /tmp/go ]; do sleep 0.02; done; echo done"]
            )
            seen = []
            async for _, data in proc.output():
                seen.append(data.decode())
                if data == b"ready\n":
                    await client.write_file("/tmp/go", b"")
            assert await proc.wait() == 0
            return seen
        finally:
            await client.close()

    assert "".join(run(go())) == "ready\ndone\n"


def test_timeout_kills_the_process_group(sb: launcher.Launched) -> None:
    async def go() -> tuple[int, bool, str]:
        client = await ChannelClient.connect(sb.channel_path)
        try:
            proc = await client.exec(
                ["sh", "-c", "sleep 101 & sleep 102 & echo started; wait"], timeout=2.0
            )
            code, out, _ = await collect(proc)
            assert out == b"started\n"
            _, ps, _ = await collect(await client.exec(["ps", "-o", "args"]))
            return code, proc.timed_out, ps.decode()
        finally:
            await client.close()

    code, timed_out, ps = run(go())
    assert (code, timed_out) == (EXIT_TIMED_OUT, True)
    assert "sleep 101" not in ps and "sleep 102" not in ps


def test_kill(sb: launcher.Launched) -> None:
    async def go() -> int:
        client = await ChannelClient.connect(sb.channel_path)
        try:
            proc = await client.exec(["sleep", "100"])
            await proc.kill()
            return await proc.wait()
        finally:
            await client.close()

    assert run(go()) == 128 + 9


def test_disconnecting_kills_the_command(sb: launcher.Launched) -> None:
    async def go() -> str:
        client = await ChannelClient.connect(sb.channel_path)
        try:
            proc = await client.exec(["sleep", "103"])
            proc._finish()  # drop the connection without waiting

            async def sleep_gone() -> str:
                _, out, _ = await collect(await client.exec(["ps", "-o", "args"]))
                return "" if b"sleep 103" in out else out.decode()

            return await async_wait_for(sleep_gone, timeout=10, what="the command to be killed")
        finally:
            await client.close()

    assert "sleep 103" not in run(go())


def test_concurrent_execs(sb: launcher.Launched) -> None:
    async def go() -> list[tuple[int, bytes, bytes]]:
        client = await ChannelClient.connect(sb.channel_path)
        try:
            procs = [await client.exec(["sh", "-c", f"sleep 0.2; echo {i}"]) for i in range(10)]
            return await asyncio.gather(*(collect(p) for p in procs))
        finally:
            await client.close()

    results = run(go())
    assert [r[1] for r in results] == [f"{i}\n".encode() for i in range(10)]


def test_command_not_found(sb: launcher.Launched) -> None:
    with pytest.raises(SandboxError, match="command not found in the sandbox: 'no-such-cmd'"):
        run(_exec(sb, ["no-such-cmd"]))


def test_command_not_executable(sb: launcher.Launched) -> None:
    with pytest.raises(SandboxError, match="not executable in the sandbox: '/etc/passwd'"):
        run(_exec(sb, ["/etc/passwd"]))


def test_missing_cwd(sb: launcher.Launched) -> None:
    with pytest.raises(SandboxError, match="working directory not found in the sandbox: '/nope'"):
        run(_exec(sb, ["true"], cwd="/nope"))


def test_exec_as_user(sb: launcher.Launched) -> None:
    assert run(_exec(sb, ["id"], user="app"))[1] == b"uid=1000(app) gid=1000(app) groups=2000(extra)\n"
    assert run(_exec(sb, ["id", "-u"], user="1234:55"))[1] == b"1234\n"
    with pytest.raises(SandboxError, match="user not found in the sandbox's /etc/passwd: 'ghost'"):
        run(_exec(sb, ["id"], user="ghost"))


def test_image_user_is_the_default(tmp_path: Path) -> None:
    with launched(tmp_path / "sb", name="user-box", user="app", workdir="/home/app") as s:
        code, out, _ = run(sh(s, "id -un; pwd; echo $HOME; touch mine && ls -ln mine"))
    lines = out.splitlines()
    assert lines[:3] == ["app", "/home/app", "/home/app"]
    assert lines[3].split()[2:4] == ["1000", "1000"]


def test_exec_after_stop_is_a_clear_error(tmp_path: Path) -> None:
    with launched(tmp_path / "sb", name="stopped") as s:
        pass
    with pytest.raises(SandboxError, match="connect to the sandbox channel"):
        run(_exec(s, ["true"]))


def test_background_process_outlives_its_exec(sb: launcher.Launched) -> None:
    """Like `docker exec`: the exec returns when its command exits; daemons keep running."""
    code, out, _ = run(sh(sb, "sleep 104 > /dev/null 2>&1 & echo bg"))
    assert (code, out) == (0, "bg\n")
    assert "sleep 104" in run(_exec(sb, ["ps", "-o", "args"]))[1].decode()
    run(sh(sb, "pkill -f 'sleep 104' || killall sleep"))


def test_timeout_applies_to_a_command_that_never_stops_printing(sb: launcher.Launched) -> None:
    async def go() -> tuple[int, bool, int]:
        client = await ChannelClient.connect(sb.channel_path)
        try:
            proc = await client.exec(["yes"], timeout=0.5)
            code, out, _ = await collect(proc)
            return code, proc.timed_out, len(out)
        finally:
            await client.close()

    code, timed_out, size = run(go())
    assert (code, timed_out) == (EXIT_TIMED_OUT, True) and size > 0


def test_stdin_closed_early_by_the_command(sb: launcher.Launched) -> None:
    """`head -c 5` exits after 5 bytes while the client still streams: no hang, exit 0."""

    async def source() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield b"x" * 65536

    code, out, _ = run(_exec(sb, ["head", "-c", "5"], stdin=source()))
    assert (code, out) == (0, b"xxxxx")


def test_stdin_sent_after_the_command_exited_meets_an_open_connection(
    sb: launcher.Launched,
) -> None:
    """`sh` runs `exit 4` before the client has sent the EOF of its stdin (`corral run -i`
    piping a script): the client's late STDIN and kill frames must not meet a closed socket,
    whose EPIPE asyncio turns into a fatal error that loses the exit not yet read (wait()
    raised BrokenPipeError; `corral run -i` exited 1 with no output). Deterministic: the late
    frames are sent only after the worker's EOF, i.e. once it has done all it does after the
    exit (it used to close there; it now shuts its write side and reads until we close)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(30)
        with short_unix_path(sb.channel_path) as address:
            conn.connect(address)
        conn.sendall(encode_control({"op": "exec", "argv": ["sh"], "stdin": True}))
        conn.sendall(encode_data(KIND_STDIN, b"echo x; exit 4\n"))
        reader = FrameReader()
        frames: list[Frame] = []
        while data := conn.recv(65536):
            reader.feed(data)
            frames.extend(reader.frames())
        controls = [f.control() for f in frames if f.kind == KIND_CONTROL]
        assert [c["t"] for c in controls] == ["started", "exit"]
        assert controls[-1]["code"] == 4
        assert b"".join(f.body for f in frames if f.kind == KIND_STDOUT) == b"x\n"
        conn.sendall(encode_data(KIND_STDIN, b"late\n"))  # BrokenPipeError before the fix
        conn.sendall(encode_data(KIND_STDIN, b""))
        conn.sendall(encode_control({"op": "kill"}))


def test_idle_sandbox_keeps_exactly_one_spare_worker(sb: launcher.Launched) -> None:
    """After bursts of concurrent connections the init is back to one spare, not more."""

    async def burst() -> None:
        clients = [await ChannelClient.connect(sb.channel_path) for _ in range(8)]
        try:
            procs = [await c.exec(["true"]) for c in clients]
            await asyncio.gather(*(p.wait() for p in procs))
            await asyncio.gather(*(c.exists("/") for c in clients))
        finally:
            for c in clients:
                await c.close()

    for _ in range(5):
        run(burst())
    init_exe = os.readlink(f"/proc/{sb.init_pid}/exe")

    def workers() -> list[str]:
        with open(f"/proc/{sb.init_pid}/task/{sb.init_pid}/children") as f:
            children = f.read().split()
        # Orphaned commands are the init's children too; workers run the init's executable.
        return [c for c in children if _exe(c) == init_exe]

    wait_for(lambda: len(workers()) == 1, timeout=10, what="one worker left")


def _exe(pid: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def test_timeout_also_kills_processes_that_left_the_group(sb: launcher.Launched) -> None:
    """setsid'd children and double-forked daemons are found through the worker (a child
    subreaper during the exec) and killed with the rest."""

    async def go() -> tuple[int, str]:
        client = await ChannelClient.connect(sb.channel_path)
        try:
            proc = await client.exec(
                ["sh", "-c", "setsid sleep 105 & (setsid sleep 106 &) ; "
                             "setsid sh -c 'sleep 107 & wait' & echo started; wait"],
                timeout=1.5,
            )
            code, out, _ = await collect(proc)
            assert out == b"started\n"
            _, ps, _ = await collect(await client.exec(["ps", "-o", "args"]))
            return code, ps.decode()
        finally:
            await client.close()

    code, ps = run(go())
    assert code == EXIT_TIMED_OUT
    for marker in ("sleep 105", "sleep 106", "sleep 107"):
        assert marker not in ps, ps
