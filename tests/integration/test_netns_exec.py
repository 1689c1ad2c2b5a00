"""corral wherever root runs it (issue 10, point 2), and gc back in the namespace a sandbox
was created from (point 1).

`ip netns exec NS corral ...` runs corral in a mount namespace with a fresh sysfs on /sys,
where /sys/fs/cgroup is empty; `unshare -m` + a sysfs mount is what a container with its own
/sys looks like. In both corral mounts the cgroup hierarchy it needs there, for that mount
namespace only, and says so on stderr. The pure v2 and hybrid layouts are unit-tested from
their mountinfo (tests/unit/test_cgroupfs.py): this machine is a hybrid.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.runtime import paths, state
from tests.integration.lifecycle_support import (  # noqa: F401 - fixtures
    ROOT,
    corral_cli,
    corral_home_fixture,
    image_fixture,
    unique,
)
from tests.support import world as world_mod
from tests.support.leftovers import Footprint
from tests.support.servers import ECHO_PORT, start_servers
from tests.support.waiting import wait_for
from tests.support.world import SERVER_V4

pytestmark = pytest.mark.timeout(300)

NOTE = b"corral: note: no cgroup hierarchy was mounted at /sys/fs/cgroup"


@pytest.fixture(scope="module")
def echo_server(world: world_mod.World) -> Iterator[None]:
    proc = start_servers(world.spawn_inet, [SERVER_V4])
    try:
        yield
    finally:
        world.stop_process(proc)


def corral_in(prefix: list[str], *args: str, stdin: bytes | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess[bytes]:  # fmt: skip
    """corral run the way a user runs it under ``prefix`` (ip netns exec, unshare)."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "corral.cli", *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        cwd=str(ROOT),
    )


def in_netns(world: world_mod.World) -> list[str]:
    return ["ip", "netns", "exec", world.host_ns]


@pytest.mark.usefixtures("echo_server")
def test_run_under_ip_netns_exec_mounts_the_cgroup_hierarchy_and_reaches_the_network(
    world: world_mod.World, image: str
) -> None:
    res = corral_in(
        in_netns(world), "run", "--net", "public-only", image, "--",
        "sh", "-c", f"cat /proc/self/cgroup >/dev/null; echo hi | nc -w 5 {SERVER_V4} {ECHO_PORT}",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"hi\n"
    assert NOTE in res.stderr, res.stderr
    assert b"in this mount namespace only" in res.stderr
    # The mounts were that command's: the host's view is as it was.
    mounts = Path("/proc/self/mountinfo").read_text()
    assert mounts.count(" /sys/fs/cgroup/memory ") == 1


def test_a_sandbox_made_under_ip_netns_exec_is_used_and_removed_from_elsewhere(
    world: world_mod.World, image: str
) -> None:
    """create under `ip netns exec`, exec and rm from the root namespace (no cgroup mount
    needed there), stop and gc from under `ip netns exec` again."""
    name = unique("nsx")
    res = corral_in(in_netns(world), "create", "--net", "public-only", "--name", name, image)
    assert res.returncode == 0, res.stderr
    try:
        with world.in_host():
            footprint = Footprint.of(name)
        res = corral_cli("exec", name, "--", "sh", "-c", "echo from-root")
        assert (res.returncode, res.stdout) == (0, b"from-root\n"), res.stderr
        recorded = state.read_supervisor_pid(state.sandbox_dir(name))
        assert recorded is not None
        os.kill(recorded[0], signal.SIGKILL)  # a crash: gc's turn, from under ip netns exec
        wait_for(lambda: not state.supervisor_alive(state.sandbox_dir(name)), timeout=30,
                 what="the supervisor to die")  # fmt: skip
        res = corral_in(in_netns(world), "gc", name)
        assert res.returncode == 0, res.stderr
        assert f"removed {name}: cgroup".encode() in res.stdout
        assert f"removed {name}: network of {name}: nft table".encode() in res.stdout
        with world.in_host():
            footprint.wait_gone()
    finally:
        corral_cli("rm", "-f", name)


def test_a_container_with_its_own_sys(image: str) -> None:
    """A private mount namespace whose /sys is a fresh sysfs of its own, without the cgroup
    mounts below it, as a container that brings its own /sys has."""
    script = 'umount -R /sys && mount -t sysfs sysfs /sys && exec "$@"'
    res = corral_in(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh"],
        "run", "--net", "none", image, "--", "echo", "in-a-container",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"in-a-container\n"
    assert NOTE in res.stderr


# -- gc in the namespace the sandbox was created from ----------------------------------------


def test_gc_from_the_root_namespace_enters_the_sandboxs_own(
    world: world_mod.World, image: str
) -> None:
    """The sandbox is made in the world's host namespace; gc runs from the root one. It must
    remove the table and veth *there*, and say where."""
    name = unique("gcns")
    with world.in_host():
        assert corral_cli("create", "--net", "public-only", "--name", name, image).returncode == 0
        footprint = Footprint.of(name)
    try:
        recorded = state.read_supervisor_pid(state.sandbox_dir(name))
        assert recorded is not None
        os.kill(recorded[0], signal.SIGKILL)
        wait_for(lambda: not state.supervisor_alive(state.sandbox_dir(name)), timeout=30,
                 what="the supervisor to die")  # fmt: skip
        res = corral_cli("gc", name)  # this thread is in the root namespace
        assert res.returncode == 0, res.stderr
        where = f"(in /run/netns/{world.host_ns})".encode()
        lines = res.stdout.splitlines()
        assert any(b": nft table corral-" in line and where in line for line in lines)
        assert any(b": link cr-" in line and where in line for line in lines)
        with world.in_host():
            footprint.wait_gone()
        assert corral_cli("gc", name).stdout == b""
    finally:
        with world.in_host():
            corral_cli("rm", "-f", name)


def test_gc_claims_nothing_of_a_namespace_that_is_gone(image: str) -> None:
    """The namespace the sandbox was created in is deleted after its supervisor crashed.
    gc finds it nowhere, so the veth, rules and table went with it: it reports only what
    it removed itself (the address lease), never the table or the link."""
    ns = f"{world_mod.PREFIX}{os.getpid()}g{unique('')[-4:]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    name = unique("gcgone")
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        res = corral_in(["ip", "netns", "exec", ns], "create", "--net", "public-only",
                        "--name", name, image)  # fmt: skip
        assert res.returncode == 0, res.stderr
        recorded = state.read_supervisor_pid(state.sandbox_dir(name))
        assert recorded is not None
        os.kill(recorded[0], signal.SIGKILL)
        wait_for(lambda: not state.supervisor_alive(state.sandbox_dir(name)), timeout=30,
                 what="the supervisor to die")  # fmt: skip
        subprocess.run(["ip", "netns", "del", ns], check=True)
        wait_for(lambda: _netns_gone(state.sandbox_dir(name)), timeout=60,
                 what="the deleted namespace to be freed")  # fmt: skip
        res = corral_cli("gc", name)
        assert res.returncode == 0, res.stderr
        out = res.stdout.decode()
        assert f"removed {name}: network of {name}: address lease" in out, out
        assert "nft table" not in out and "link cr-" not in out, out
        leases = paths.corral_home() / "net" / "leases.json"
        assert name not in json.loads(leases.read_text() or "{}")
        assert not state.sandbox_dir(name).exists()
    finally:
        with contextlib.suppress(Exception):
            corral_cli("rm", "-f", name)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def _netns_gone(directory: Path) -> bool:
    """Whether no process, descriptor or name still holds the namespace recorded there."""
    from corral.lifecycle import hostnetns

    record = json.loads((directory / "state.json").read_text())["host_netns"]
    return hostnetns.locate(record) is None
