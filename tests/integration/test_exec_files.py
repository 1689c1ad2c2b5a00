"""File operations through the channel: streaming, semantics, errors, no escape to the host."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from corral.errors import SandboxError
from corral.runtime import launcher
from corral.runtime.channel import MAX_DATA_SIZE, ChannelClient
from tests.support.sandbox import launched, run, sh
from tests.support.waiting import async_wait_for


@pytest.fixture(scope="module")
def sb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[launcher.Launched]:
    with launched(tmp_path_factory.mktemp("files") / "sb", name="files-box") as s:
        yield s


async def _client(sb: launcher.Launched) -> ChannelClient:
    return await ChannelClient.connect(sb.channel_path)


def test_write_read_roundtrip_and_mode(sb: launcher.Launched) -> None:
    async def go() -> tuple[bytes, int, str]:
        c = await _client(sb)
        try:
            await c.write_file("/tmp/hello.txt", b"hello\n", mode=0o640)
            data = b"".join([x async for x in c.read_file("/tmp/hello.txt")])
            info = await c.stat("/tmp/hello.txt")
            return data, info.mode, info.kind
        finally:
            await c.close()

    assert run(go()) == (b"hello\n", 0o640, "file")
    assert run(sh(sb, "stat -c '%a %U' /tmp/hello.txt; cat /tmp/hello.txt"))[1] == (
        "640 root\nhello\n"
    )


def test_fifty_mib_streams_both_ways(sb: launcher.Launched) -> None:
    size = 50 * 1024 * 1024
    block = os.urandom(1024 * 1024)
    expected = hashlib.sha256(block * 50).hexdigest()

    async def source() -> AsyncIterator[bytes]:
        for _ in range(size // len(block)):
            yield block

    async def go() -> tuple[str, str, int]:
        c = await _client(sb)
        try:
            await c.write_file("/var/tmp/big.bin", source())
            _, inside, _ = await sh(sb, "sha256sum /var/tmp/big.bin")
            digest = hashlib.sha256()
            biggest = 0
            async for chunk in c.read_file("/var/tmp/big.bin"):
                biggest = max(biggest, len(chunk))
                digest.update(chunk)
            await c.remove("/var/tmp/big.bin")
            return inside.split()[0], digest.hexdigest(), biggest
        finally:
            await c.close()

    inside, back, biggest = run(go())
    assert inside == expected and back == expected
    assert biggest <= MAX_DATA_SIZE


def test_symlinks_resolve_inside_the_sandbox(sb: launcher.Launched) -> None:
    """`ln -s /etc/shadow x`: reading x reads the sandbox's shadow, never the host's."""
    run(sh(sb, "ln -sf /etc/shadow /tmp/shadow-link; ln -sfn / /tmp/root-link"))

    async def go() -> tuple[bytes, bytes, bytes]:
        c = await _client(sb)
        try:
            a = b"".join([x async for x in c.read_file("/tmp/shadow-link")])
            b = b"".join([x async for x in c.read_file("/tmp/root-link/etc/os-release")])
            d = b"".join([x async for x in c.read_file("/../../../etc/os-release")])
            return a, b, d
        finally:
            await c.close()

    shadow, release, dotdot = run(go())
    assert shadow == b"root:*:19000:0:99999:7:::\n"
    assert release == dotdot == b"ID=corral-test-busybox\n"


def test_write_through_symlink_stays_inside(sb: launcher.Launched, tmp_path: os.PathLike[str]) -> None:
    host_file = os.path.join(str(tmp_path), "host-only")
    with open(host_file, "w") as f:
        f.write("host")
    run(sh(sb, f"mkdir -p $(dirname {host_file}); ln -sf {host_file} /tmp/out-link"))

    async def go() -> None:
        c = await _client(sb)
        try:
            await c.write_file("/tmp/out-link", b"sandbox")
        finally:
            await c.close()

    run(go())
    with open(host_file) as f:
        assert f.read() == "host"


def test_list_dir_and_kinds(sb: launcher.Launched) -> None:
    run(sh(sb, "rm -rf /tmp/l; mkdir -p /tmp/l/sub; echo abc > /tmp/l/f; ln -s f /tmp/l/link; "
               "mkfifo /tmp/l/fifo"))

    async def go() -> list[tuple[str, str, int]]:
        c = await _client(sb)
        try:
            return [(e.name, e.kind, e.size) for e in await c.list_dir("/tmp/l")]
        finally:
            await c.close()

    entries = run(go())
    assert [(name, kind) for name, kind, _ in entries] == [
        ("f", "file"), ("fifo", "other"), ("link", "symlink"), ("sub", "dir")
    ]
    assert entries[0][2] == 4 and entries[2][2] == 1  # "abc\n"; the link's target "f"


def test_list_large_directory_in_batches(sb: launcher.Launched) -> None:
    run(sh(sb, "rm -rf /tmp/many; mkdir /tmp/many; cd /tmp/many; i=0; "
               "while [ $i -lt 2500 ]; do : > f$i; i=$((i+1)); done"))

    async def go() -> int:
        c = await _client(sb)
        try:
            return len(await c.list_dir("/tmp/many"))
        finally:
            await c.close()

    assert run(go()) == 2500


def test_mkdir_exists_remove(sb: launcher.Launched) -> None:
    async def go() -> list[object]:
        c = await _client(sb)
        seen: list[object] = []
        try:
            await c.mkdir("/tmp/m/a/b", parents=True)
            seen.append(await c.exists("/tmp/m/a/b"))
            await c.write_file("/tmp/m/a/b/f", b"x")
            with pytest.raises(SandboxError, match="already exists in the sandbox: '/tmp/m'"):
                await c.mkdir("/tmp/m")
            with pytest.raises(SandboxError, match=r"directory not empty in the sandbox: '/tmp/m'"):
                await c.remove("/tmp/m")
            await c.remove("/tmp/m", recursive=True)
            seen.append(await c.exists("/tmp/m"))
            return seen
        finally:
            await c.close()

    assert run(go()) == [True, False]


@pytest.mark.parametrize(
    ("op", "message"),
    [
        ("read", "no such file or directory in the sandbox: '/nope'"),
        ("stat", "no such file or directory in the sandbox: '/nope'"),
        ("list", "no such file or directory in the sandbox: '/nope'"),
        ("remove", "no such file or directory in the sandbox: '/nope'"),
        ("write-missing-dir", "no such file or directory in the sandbox: '/nope'"),
        ("read-dir", "is a directory in the sandbox: '/etc'"),
        ("write-dir", "is a directory in the sandbox: '/etc'"),
        ("mkdir-missing-parent", "no such file or directory in the sandbox: '/nope/x'"),
    ],
)
def test_errors_name_the_path(sb: launcher.Launched, op: str, message: str) -> None:
    async def go() -> None:
        c = await _client(sb)
        try:
            if op == "read":
                [x async for x in c.read_file("/nope")]
            elif op == "stat":
                await c.stat("/nope")
            elif op == "list":
                await c.list_dir("/nope")
            elif op == "remove":
                await c.remove("/nope")
            elif op == "write-missing-dir":
                await c.write_file("/nope/file", b"x")
            elif op == "read-dir":
                [x async for x in c.read_file("/etc")]
            elif op == "write-dir":
                await c.write_file("/etc", b"x")
            elif op == "mkdir-missing-parent":
                await c.mkdir("/nope/x")
        finally:
            await c.close()

    with pytest.raises(SandboxError) as info:
        run(go())
    assert str(info.value) == message


def test_failed_write_leaves_no_temp_file(sb: launcher.Launched) -> None:
    async def go() -> list[str]:
        c = await _client(sb)
        try:
            await c.mkdir("/tmp/w", parents=True)

            async def failing() -> AsyncIterator[bytes]:
                yield b"partial"
                raise RuntimeError("source failed")

            with pytest.raises(RuntimeError):
                await c.write_file("/tmp/w/f", failing())
            await c.exists("/tmp/w/f")  # a fresh connection; the worker saw the drop

            async def cleaned_up() -> bool:  # when the worker sees the connection drop
                return not await c.list_dir("/tmp/w")

            await async_wait_for(cleaned_up, timeout=10, what="the partial file to go")
            return [e.name for e in await c.list_dir("/tmp/w")]
        finally:
            await c.close()

    assert run(go()) == []


def test_files_written_by_root_are_owned_by_the_sandbox_range_on_disk(
    sb: launcher.Launched,
) -> None:
    from corral.runtime.images.idmap import UID_BASE

    run(sh(sb, "echo x > /owned; chown 1000:1000 /owned; echo y > /root-owned"))
    upper = sb.state_dir / launcher.UPPER_DIR
    assert os.stat(upper / "owned").st_uid == UID_BASE + 1000
    assert os.stat(upper / "root-owned").st_uid == UID_BASE


def test_copy_tree_in_and_out(sb: launcher.Launched, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "run.sh").write_text("#!/bin/sh\necho ran\n")
    os.chmod(src / "sub" / "run.sh", 0o755)
    (src / "sub" / "deeper" / "big.bin").write_bytes(os.urandom(600_000))
    os.symlink("../a.txt", src / "sub" / "link")

    async def go() -> tuple[str, str]:
        c = await _client(sb)
        try:
            await c.copy_in(src, "/tmp/tree")
            _, ran, _ = await sh(sb, "/tmp/tree/sub/run.sh; cat /tmp/tree/sub/link")
            await c.copy_out("/tmp/tree", tmp_path / "back")
            with pytest.raises(SandboxError, match="already exists on the host"):
                await c.copy_out("/tmp/tree", tmp_path / "back")
            return ran, (await c.stat("/tmp/tree/sub/link")).target or ""
        finally:
            await c.close()

    ran, target = run(go())
    assert ran == "ran\nalpha" and target == "../a.txt"
    back = tmp_path / "back"
    assert (back / "a.txt").read_text() == "alpha"
    assert (back / "sub" / "deeper" / "big.bin").read_bytes() == (
        src / "sub" / "deeper" / "big.bin"
    ).read_bytes()
    assert os.stat(back / "sub" / "run.sh").st_mode & 0o777 == 0o755
    assert os.readlink(back / "sub" / "link") == "../a.txt"


def test_copy_out_never_writes_through_a_planted_symlink(
    sb: launcher.Launched, tmp_path: Path
) -> None:
    """A sandbox link to a host path comes out as a link; nothing is written to its target."""
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    run(sh(sb, f"rm -rf /tmp/evil; mkdir /tmp/evil; ln -s {victim} /tmp/evil/x; echo pwn > /tmp/evil/y"))

    async def go() -> None:
        c = await _client(sb)
        try:
            await c.copy_out("/tmp/evil", tmp_path / "out")
        finally:
            await c.close()

    run(go())
    assert victim.read_text() == "untouched"
    assert os.readlink(tmp_path / "out" / "x") == str(victim)
    assert (tmp_path / "out" / "y").read_text() == "pwn\n"


def test_reading_a_fifo_is_refused_not_hung(sb: launcher.Launched) -> None:
    run(sh(sb, "rm -f /tmp/pipe; mkfifo /tmp/pipe"))

    async def go() -> None:
        c = await _client(sb)
        try:
            [x async for x in c.read_file("/tmp/pipe")]
        finally:
            await c.close()

    with pytest.raises(SandboxError, match="read failed in the sandbox for '/tmp/pipe': not a regular"):
        run(go())
