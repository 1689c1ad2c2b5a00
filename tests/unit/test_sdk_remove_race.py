"""remove() and a supervisor that has finished but not yet exited (the test_ports_names flake).

A supervisor writes its ``stopped`` record after releasing everything (control socket first)
and then only answers its stop waiters and exits; that exit can outlast stop()'s wait on a
loaded machine. The on-disk state of that moment is made here for real: a live process (a
``sleep``) recorded as the supervisor, a ``stopped`` record, no control socket.
Deterministic: nothing here depends on how fast anything runs.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.errors import SandboxError
from corral.kernel import procfs
from corral.lifecycle import gc, sandboxes
from corral.runtime import state


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture
def live_supervisor() -> Iterator[tuple[Path, int]]:
    """A sandbox directory whose recorded supervisor is a live process."""
    directory = state.claim("exiting")
    proc = subprocess.Popen(["sleep", "600"])
    try:
        stat = procfs.read_stat(proc.pid)
        assert stat is not None
        (directory / state.PID_FILE).write_text(f"{proc.pid} {stat.start_time}\n")
        assert state.supervisor_alive(directory)
        yield directory, proc.pid
    finally:
        proc.kill()
        proc.wait()
        gc.wait_for_deletions(10)


def test_a_finished_supervisor_still_exiting_does_not_block_remove(
    live_supervisor: tuple[Path, int],
) -> None:
    directory, _pid = live_supervisor
    (directory / state.STOPPED_FILE).write_text("stopped on request\n")
    sandboxes.remove("exiting")  # raised "is still running" before
    assert not directory.exists()


def test_a_running_supervisor_blocks_remove(live_supervisor: tuple[Path, int]) -> None:
    directory, _pid = live_supervisor
    with pytest.raises(SandboxError, match="is still running"):
        sandboxes.remove("exiting")
    (directory / state.STOPPED_FILE).write_text("stale\n")
    (directory / state.CONTROL_SOCKET).write_text("")  # it still serves its control socket
    with pytest.raises(SandboxError, match="is still running"):
        sandboxes.remove("exiting")
    assert directory.exists()
