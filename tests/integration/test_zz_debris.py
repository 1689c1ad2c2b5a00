"""Runs last (file name): the whole suite left nothing behind.

No corral netns, veth, nftables table, cgroup, mount or supervisor process, no sandbox in the
suite's CORRAL_HOME, and, once the world is torn down (here, explicitly; the session fixture's
teardown is idempotent), none of the test world's namespaces either.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from corral.runtime import gc
from corral.sdk import lifecycle
from tests.integration.lifecycle_support import supervisor_processes
from tests.support import world as world_mod


def corral_netns() -> list[str]:
    names = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    return [n for n in names if n.startswith("corral-")]


def corral_links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return [line.split(":")[1].strip() for line in out.splitlines() if ": cr-" in line]


def corral_nft_tables() -> list[str]:
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "corral" in line]


def corral_cgroups() -> list[str]:
    out = subprocess.run(
        ["find", "/sys/fs/cgroup", "-maxdepth", "8", "-type", "d", "-name", "corral-*"],
        capture_output=True,
        text=True,
    ).stdout
    return out.split()


def corral_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if "corral" in p or "/sandboxes/" in p]


def test_the_suite_left_no_debris(world: world_mod.World) -> None:
    home = os.environ.get("CORRAL_HOME")
    lifecycle.close_fork_server()  # this test process's own; it would exit with us anyway
    with world.in_host():
        in_host = (corral_links(), corral_nft_tables())
    assert in_host == ([], [])
    assert corral_netns() == []
    assert corral_links() == []
    assert corral_nft_tables() == []
    # Fork servers of processes that just exited (CLI runs) discard their spare's cgroup as
    # they shut down, asynchronously: give them a moment, then nothing may be left.
    deadline = time.monotonic() + 10
    while corral_cgroups() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert corral_cgroups() == []
    assert corral_mounts() == []
    assert supervisor_processes() == []
    if home:
        gc.wait_for_deletions(timeout=30)  # removals delete their directories in a thread
        sandboxes = Path(home) / "sandboxes"
        left = [p.name for p in sandboxes.iterdir()] if sandboxes.is_dir() else []
        assert [n for n in left if not n.startswith(".")] == []
        trash = sandboxes / gc.TRASH_DIR
        assert not trash.is_dir() or list(trash.iterdir()) == []
    world_mod.destroy(world)
    assert world_mod.debris() == []
