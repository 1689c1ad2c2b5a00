"""Sandbox state on disk: names, state.json round-trip, claiming, derived status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.errors import ConfigError, SandboxError, SandboxExists, SandboxNotFound
from corral.runtime import state


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("name", ["a", "0", "worker", "ci-runner.2", "a_b", "x" * 63])
def test_valid_names(name: str) -> None:
    assert state.validate_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "Worker", "-a", ".a", "_a", "a b", "a/b", "..", "x" * 64, "é", "a\n", None, 3]
)
def test_invalid_names_name_the_field(name: object) -> None:
    with pytest.raises(ConfigError) as info:
        state.validate_name(name)
    assert info.value.path == "name"
    assert "not a valid sandbox name" in str(info.value)


@given(st.text(max_size=80))
def test_name_validation_never_accepts_path_tricks(name: str) -> None:
    try:
        state.validate_name(name)
    except ConfigError:
        return
    assert "/" not in name and name not in (".", "..") and len(name) <= 63
    assert name == name.lower() and name[0].isalnum()


def sample(name: str = "sb1") -> state.SandboxState:
    return state.SandboxState(
        name=name,
        image="busybox:latest",
        image_digest="sha256:" + "0" * 64,
        rootfs="/x/rootfs",
        network={"policy": "none"},
        env={"PATH": "/bin", "A": "é"},
        cpus=0.5,
        memory=256 * 1024 * 1024,
        entrypoint=["/bin/sh"],
        cmd=["-c", "true"],
        init_pid=42,
        channel_path="/x/channel.sock",
    )


def test_state_round_trip(home: Path) -> None:
    st_ = sample()
    directory = state.claim("sb1")
    state.write_state(directory, st_)
    assert state.read_state("sb1") == st_
    assert (directory / state.STATE_FILE).stat().st_mode & 0o777 == 0o600
    assert directory.stat().st_mode & 0o777 == 0o700
    assert [p.name for p in directory.iterdir()] == [state.STATE_FILE]  # no temp file left


def test_unknown_key_is_an_error(home: Path) -> None:
    directory = state.claim("sb1")
    data = sample().to_dict() | {"surprise": 1}
    (directory / state.STATE_FILE).write_text(json.dumps(data))
    with pytest.raises(SandboxError, match="unknown key 'surprise'"):
        state.read_state("sb1")


def test_corrupt_state_is_one_sentence(home: Path) -> None:
    directory = state.claim("sb1")
    (directory / state.STATE_FILE).write_text("{not json")
    with pytest.raises(SandboxError, match="not valid JSON"):
        state.read_state("sb1")


def test_missing_sandbox() -> None:
    with pytest.raises(SandboxNotFound, match="no sandbox named 'nope'"):
        state.read_state("nope")


def test_claim_is_exclusive() -> None:
    state.claim("taken")
    with pytest.raises(SandboxExists, match="already exists"):
        state.claim("taken")
    assert state.list_names() == ["taken"]


def test_list_skips_lock_dir_and_files(home: Path) -> None:
    with state.name_lock("b"):
        state.claim("b")
    state.claim("a")
    (state.paths.sandboxes_dir() / "stray-file").write_text("")
    assert state.list_names() == ["a", "b"]


def test_name_lock_excludes_other_processes() -> None:
    code = (
        "import fcntl,os,sys;"
        "fd=os.open(sys.argv[1],os.O_RDWR);"
        "fcntl.flock(fd,fcntl.LOCK_EX|fcntl.LOCK_NB)"
    )
    lock = state.paths.sandboxes_dir() / ".locks" / "x.lock"
    with state.name_lock("x"):
        held = subprocess.run([sys.executable, "-c", code, str(lock)], capture_output=True)
        assert held.returncode != 0 and b"BlockingIOError" in held.stderr
    free = subprocess.run([sys.executable, "-c", code, str(lock)], capture_output=True)
    assert free.returncode == 0


def test_status_is_derived_from_pid_file_and_marker() -> None:
    directory = state.claim("s")
    assert state.status(directory) == state.CRASHED  # nothing ever started
    start = state.process_start_time(os.getpid())
    assert start is not None
    (directory / state.PID_FILE).write_text(f"{os.getpid()} {start}\n")
    assert state.status(directory) == state.CREATING
    (directory / state.CONTROL_SOCKET).write_text("")
    assert state.status(directory) == state.RUNNING
    # the same pid with another start time is a recycled pid, not our supervisor
    (directory / state.PID_FILE).write_text(f"{os.getpid()} {start + 1}\n")
    assert state.status(directory) == state.CRASHED
    (directory / state.STOPPED_FILE).write_text("stopped on request\n")
    assert state.status(directory) == state.STOPPED
    assert state.stopped_reason(directory) == "stopped on request"


def test_dead_and_zombie_processes_are_not_alive() -> None:
    proc = subprocess.Popen(["true"])
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
    assert state.process_start_time(proc.pid) is None
    proc.wait()
    assert state.process_start_time(proc.pid) is None


def test_process_start_time_survives_odd_command_names(tmp_path: Path) -> None:
    odd = tmp_path / "a) b ("
    odd.symlink_to("/bin/sleep")
    proc = subprocess.Popen([str(odd), "5"])
    try:
        assert state.process_start_time(proc.pid) is not None
    finally:
        proc.kill()
        proc.wait()
