"""`corral rm --all`, `corral prune`, and `images rm` refusing an image a sandbox stands on
(issue 10, point 1). Each test has a CORRAL_HOME of its own: prune and rm --all act on
everything in a home, and the session's is shared with the other tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.errors import ConfigError, ImageError
from tests.integration.lifecycle_support import ROOT, in_world_fixture, unique  # noqa: F401
from tests.support import debris, images
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.usefixtures("in_world"), pytest.mark.timeout(300)]


class Home:
    """A CORRAL_HOME of one test and the `corral` command pointed at it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.env = {**os.environ, "CORRAL_HOME": str(path)}

    def cli(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "corral.cli", *args],
            capture_output=True,
            timeout=120,
            cwd=str(ROOT),
            env=self.env,
            stdin=subprocess.DEVNULL,
        )

    def ok(self, *args: str) -> bytes:
        res = self.cli(*args)
        assert res.returncode == 0, (args, res.stderr)
        return res.stdout

    def names(self) -> list[str]:
        return self.ok("ls", "-q").decode().split()

    def status(self, name: str) -> str:
        return str(json.loads(self.ok("inspect", name))["status"])


@pytest.fixture(name="home")
def home_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Home]:
    home = Home(tmp_path_factory.mktemp("own-home"))
    debris.watch_home(home.path)
    layout = images.write_oci_layout(
        images.build_busybox(), tmp_path_factory.mktemp("bb-oci"), "own"
    )
    home.ok("images", "import", str(layout), "--name", "local/bb:1")
    try:
        yield home
    finally:
        home.cli("rm", "-f", "--all")


def test_rm_all_removes_stopped_ones_and_running_ones_only_with_force(home: Home) -> None:
    a, b, c = unique("rma"), unique("rmb"), unique("rmc")
    for name in (a, b, c):
        home.ok("create", "--net", "none", "--name", name, "local/bb:1")
    home.ok("stop", c)
    res = home.cli("rm", "--all")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [c.encode()]
    assert b"kept 2 running sandbox(es)" in res.stderr and b"add -f" in res.stderr
    assert sorted(home.names()) == sorted([a, b])
    res = home.cli("rm", "-f", "--all")
    assert res.returncode == 0, res.stderr
    assert sorted(res.stdout.split()) == sorted([a.encode(), b.encode()])
    assert home.names() == []
    sandboxes = home.path / "sandboxes"
    assert [p.name for p in sandboxes.iterdir() if not p.name.startswith(".")] == []
    assert not any((sandboxes / ".trash").iterdir())
    assert home.cli("rm", "--all", a).returncode == 2
    assert home.cli("rm").returncode == 2


def test_images_rm_refuses_an_image_a_sandbox_uses(home: Home) -> None:
    name = unique("img")
    home.ok("create", "--net", "none", "--name", name, "local/bb:1")
    res = home.cli("images", "rm", "local/bb:1")
    assert res.returncode == ImageError.exit_code
    assert res.stderr == (
        f"corral: image local/bb:1 is used by sandbox {name}; remove it first "
        f"(corral rm {name})\n"
    ).encode()
    assert b"local/bb:1" in home.ok("images", "-q")
    # A second tag of the same image: dropping one tag leaves the image, so it is allowed.
    home.ok("images", "import", str(_layout_of(home)), "--name", "local/bb:2")
    home.ok("images", "rm", "local/bb:1")
    # A stopped sandbox counts (start mounts the image again).
    home.ok("stop", name)
    res = home.cli("images", "rm", "local/bb:2")
    assert res.returncode == ImageError.exit_code, res.stderr
    home.ok("start", name)
    assert home.ok("exec", name, "--", "echo", "still-there") == b"still-there\n"
    home.ok("rm", "-f", name)
    home.ok("images", "rm", "local/bb:2")
    assert home.ok("images", "-q") == b""


def _layout_of(home: Home) -> Path:
    return images.write_oci_layout(images.build_busybox(), home.path / "layout-again", "again")


def test_prune_removes_stopped_and_crashed_sandboxes_and_unused_images(
    home: Home, tmp_path: Path
) -> None:
    running, stopped, crashed = unique("prr"), unique("prs"), unique("prc")
    for name in (running, stopped, crashed):
        home.ok("create", "--net", "none", "--name", name, "local/bb:1")
    home.ok("stop", stopped)
    pid = int((home.path / "sandboxes" / crashed / "supervisor.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: home.status(crashed) == "crashed", timeout=30, what="the crash")
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "unused").write_text("nobody runs me\n")
    home.ok("images", "import", str(rootfs), "--name", "local/unused:1")
    # Not on a terminal, without -f: refused, nothing removed.
    res = home.cli("prune")
    assert res.returncode == ConfigError.exit_code
    assert b"--force: prune removes stopped and crashed sandboxes and unused images" in res.stderr
    assert len(home.names()) == 3
    res = home.cli("prune", "-f")
    assert res.returncode == 0, res.stderr
    out = res.stdout.decode()
    assert f"removed {crashed}: cgroup" in out
    assert f"removed sandbox {stopped}" in out
    removed_images = [line for line in out.splitlines() if line.startswith("removed image ")]
    assert len(removed_images) == 1 and removed_images[0].endswith("local/unused:1"), out
    assert home.names() == [running]
    # The running sandbox's image stays (references print with their registry's name).
    assert home.ok("images", "-q").decode().split() == [_ref(home, "local/bb:1")]
    assert home.ok("exec", running, "--", "echo", "alive") == b"alive\n"
    home.ok("stop", running)
    res = home.cli("prune", "-f", "--keep-images")
    assert f"removed sandbox {running}".encode() in res.stdout
    assert home.ok("images", "-q").decode().split() == [_ref(home, "local/bb:1")]


def _ref(home: Home, short: str) -> str:
    listed = [r for r in home.ok("images", "-q").decode().split() if r.endswith(short)]
    assert len(listed) == 1, listed
    return listed[0]
