"""A networked sandbox's stop answers before its supervisor has exited (issue 9): what the
supervisor still does after the answer holds nothing of the sandbox, and a supervisor
SIGKILLed at any moment of its stop leaves nothing ``corral gc`` cannot remove.

The stop's order (``lifecycle.supervisor.Supervisor._release``, ``SandboxNetwork.close(linger=True)``):
init stopped and its cgroup removed, the NFLOG socket closed, the nft table deleted, the
proxies closed, rules, routes and the netns mount removed, the lease released, ``stopped``
written, the stop answered; then the ICMP relay's packet sockets (whose close waits for an
RCU grace period) close with the process's exit, which nobody waits for.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

import corral.sync
from corral import NetworkPolicy
from corral.errors import SandboxError
from corral.lifecycle import gc
from corral.runtime import state
from tests.integration.lifecycle_support import (  # noqa: F401 - fixtures
    corral_home_fixture,
    image_fixture,
    in_world_fixture,
    unique,
)
from tests.support.leftovers import Footprint

pytestmark = [pytest.mark.usefixtures("in_world"), pytest.mark.timeout(300)]


def test_a_stop_answers_with_everything_of_the_sandbox_released(image: str) -> None:
    """When stop() returns, the sandbox's kernel objects, cgroup, lease and processes are
    gone, whether or not its supervisor has finished exiting; the name can be taken again
    at once, with the same lease number's prefilter."""
    name = unique("tdown")
    sb = corral.sync.Sandbox.create(name, image=image, network=NetworkPolicy.public_only())
    footprint = Footprint.of(name)
    sb.stop()
    assert sb.status == state.STOPPED
    left = footprint.remaining()
    # The directory stays (a stopped sandbox), and the supervisor may still be exiting.
    assert [x for x in left if not x.startswith(("directory", "supervisor", "link"))] == [], left
    sb.remove()
    again = corral.sync.Sandbox.create(name, image=image, network=NetworkPolicy.public_only())
    try:
        assert again.exec("true").ok
    finally:
        again.remove()
    footprint.wait_gone()


@pytest.mark.parametrize("when", ["after the stop's answer", "during the release"])
def test_a_supervisor_killed_during_its_stop_leaves_nothing_gc_cannot_remove(
    image: str, when: str
) -> None:
    """SIGKILL the supervisor of a networked sandbox while it stops: right after "stopped"
    appears (what is in flight then is its exit, with the lingering sockets), or as soon as
    its control socket is gone (in the middle of its release: init, table, proxies, netns,
    lease). Either way, gc and remove leave nothing of the sandbox."""
    name = unique("tkill")
    sb = corral.sync.Sandbox.create(name, image=image, network=NetworkPolicy.public_only())
    footprint = Footprint.of(name)
    recorded = state.read_supervisor_pid(sb.directory)
    assert recorded is not None
    control = sb.directory / state.CONTROL_SOCKET
    killed: list[bool] = []

    def killer() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if when == "during the release":
                hit = not control.exists()
            else:
                hit = state.stopped_reason(sb.directory) is not None
            if hit:
                try:
                    os.kill(recorded[0], signal.SIGKILL)
                    killed.append(True)
                except ProcessLookupError:
                    killed.append(False)  # it had already exited: nothing was in flight
                return
            time.sleep(0.0005)

    thread = threading.Thread(target=killer)
    thread.start()
    with contextlib.suppress(SandboxError):  # killed before it answered: the stop says so
        sb.stop()
    thread.join()
    assert killed, "the killer never saw the moment it waits for"
    deadline = time.monotonic() + 10
    while state.supervisor_alive(sb.directory) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not state.supervisor_alive(sb.directory)
    gc.collect([name])
    if sb.directory.exists():
        sb.remove()
    footprint.wait_gone()
    assert gc.collect([name]) == []


def test_gc_removes_empty_sandbox_cgroups_no_home_leads_to(tmp_path: Path) -> None:
    """A sandbox cgroup left empty by a supervisor that died, in a CORRAL_HOME that is gone
    (nothing else leads gc to it): removed once old enough, on the real cgroupfs; one with a
    process in it stays."""
    from corral.runtime import cgroups
    from corral.runtime.cgroups import CgroupLimits

    orphan = cgroups.plan(cgroups.cgroup_name("orphan", tmp_path / "gone-home"))
    busy = cgroups.plan(cgroups.cgroup_name("busy", tmp_path / "gone-home"))
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        cgroups.create(orphan, CgroupLimits())
        cgroups.create(busy, CgroupLimits())
        busy.add(sleeper.pid)
        cgroups.cleanup_orphans()
        assert orphan.exists()  # younger than ORPHAN_MIN_AGE: maybe a launch setting it up
        removed = cgroups.cleanup_orphans(min_age=0)
        assert set(removed) == set(orphan.paths)
        assert not orphan.exists() and busy.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
        for cg in (orphan, busy):
            if cg.exists():
                cgroups.cleanup(cg)
