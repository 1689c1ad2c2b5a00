"""Shared fixtures of the lifecycle, CLI and gc tests: one CORRAL_HOME, one busybox image.

The image is the busybox test image of tests/support/images.py (Debian's busybox-static,
Cmd ["/bin/sh"]) written as an OCI layout and imported with ``ImageStore.import_path``, as a
user would import a local image. Every sandbox a
test creates is removed by the test's own ``finally``; the debris check that runs after the
whole session (tests/support/debris.py) proves that the suite left nothing.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import debris
from tests.support import world as world_mod

IMAGE = "corral-test/busybox:lifecycle"
ROOT = Path(__file__).resolve().parent.parent.parent

#: CORRAL_HOME of every lifecycle/CLI/gc test of this run (the debris check inspects it).
HOME_ENV = "CORRAL_HOME"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session", name="corral_home")
def corral_home_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("corral-home")
    debris.watch_home(home)
    old = os.environ.get(HOME_ENV)
    os.environ[HOME_ENV] = str(home)
    try:
        yield home
    finally:
        if old is None:
            os.environ.pop(HOME_ENV, None)
        else:
            os.environ[HOME_ENV] = old


@pytest.fixture(scope="session", name="image")
def image_fixture(corral_home: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The busybox test image (Cmd ["/bin/sh"]) imported from an OCI layout directory."""
    from corral.runtime.images import ImageStore
    from tests.support import images

    layout = images.write_oci_layout(
        images.build_busybox(), tmp_path_factory.mktemp("busybox-oci"), "lifecycle"
    )
    ImageStore().import_path(layout, IMAGE)
    return IMAGE


@pytest.fixture(name="in_world")
def in_world_fixture(world: world_mod.World) -> Iterator[world_mod.World]:
    """The test (and the supervisors it spawns) runs in the world's host namespace."""
    with world.in_host():
        yield world


def corral_cli(*args: str, stdin: bytes | None = None, timeout: float = 60) -> (
    subprocess.CompletedProcess[bytes]
):
    """Run the ``corral`` command as a user would (a new process, our CORRAL_HOME)."""
    return subprocess.run(
        [sys.executable, "-m", "corral.cli", *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        cwd=str(ROOT),
    )


def supervisor_processes() -> list[int]:
    """Pids of every corral supervisor on the machine."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{entry}/cmdline", "rb") as f:
            if b"corral.lifecycle.supervisor" in f.read():
                pids.append(int(entry))
    return pids
