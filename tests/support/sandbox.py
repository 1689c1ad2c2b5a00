"""Launch a sandbox for a test and prove it left nothing behind.

``launched(tmp_path, ...)`` is a context manager around corral.runtime.launcher: it always
stops the sandbox and runs cleanup_leftovers, then asserts that the init is gone, that no
process is left in its cgroups, that the cgroup directories are removed, and that the host
has no mount under the state directory. Tests use it (directly or through fixtures), so a
test cannot leak debris without failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from corral.kernel import mountinfo
from corral.runtime import launcher
from corral.runtime.channel import ChannelClient, ExecProcess
from tests.support.rootfs import busybox_rootfs

T = TypeVar("T")


def spec_for(state_dir: Path, name: str = "sbx", **overrides: Any) -> launcher.LaunchSpec:
    base = launcher.LaunchSpec(
        name=name,
        rootfs=busybox_rootfs(),
        state_dir=state_dir,
        netns_path=None,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CORRAL_TEST": "base"},
    )
    return replace(base, **overrides)


def host_mounts_under(path: Path) -> list[str]:
    return mountinfo.mounts_under(path)


def assert_no_debris(sb: launcher.Launched) -> None:
    assert not os.path.exists(f"/proc/{sb.init_pid}/ns") or _is_other_process(sb), (
        f"init {sb.init_pid} still running"
    )
    assert sb.cgroup.pids() == set(), "processes left in the sandbox's cgroup"
    assert not sb.cgroup.exists(), f"cgroup left behind: {sb.cgroup.paths}"
    assert host_mounts_under(sb.state_dir) == []
    assert not sb.channel_path.exists()


def _is_other_process(sb: launcher.Launched) -> bool:
    """The pid was reused by an unrelated host process (not in the sandbox's pid ns)."""
    try:
        with open(f"/proc/{sb.init_pid}/status") as f:
            status = f.read()
    except FileNotFoundError:
        return True
    return f"NSpid:\t{sb.init_pid}\t1\n" not in status


@contextlib.contextmanager
def launched(state_dir: Path, **overrides: Any) -> Iterator[launcher.Launched]:
    sb = launcher.launch(spec_for(state_dir, **overrides))
    try:
        yield sb
    finally:
        try:
            launcher.stop(sb, grace=2.0)
        finally:
            launcher.cleanup_leftovers(state_dir)
    assert_no_debris(sb)


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


async def collect(proc: ExecProcess) -> tuple[int, bytes, bytes]:
    out = bytearray()
    err = bytearray()
    async for stream, data in proc.output():
        (out if stream == "stdout" else err).extend(data)
    return await proc.wait(), bytes(out), bytes(err)


async def sh(sb: launcher.Launched, script: str, **kw: Any) -> tuple[int, str, str]:
    """Run ``sh -c script`` in the sandbox; (exit code, stdout, stderr) as text."""
    client = await ChannelClient.connect(sb.channel_path)
    try:
        code, out, err = await collect(await client.exec(["sh", "-c", script], **kw))
    finally:
        await client.close()
    return code, out.decode(errors="replace"), err.decode(errors="replace")
