"""gc's pure-filesystem parts: background removal through the trash, orphaned trash, status."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from corral.lifecycle import gc
from corral.runtime import state


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path))
    return tmp_path


def test_background_removal_frees_the_name_at_once() -> None:
    directory = state.claim("gone")
    (directory / "upper" / "deep").mkdir(parents=True)
    (directory / "upper" / "deep" / "f").write_text("x")
    gc.remove_directory(directory, background=True)
    assert not directory.exists()
    state.claim("gone")  # the name is free again
    gc.wait_for_deletions(10)
    trash = state.paths.sandboxes_dir() / gc.TRASH_DIR
    assert list(trash.iterdir()) == []


def test_foreground_removal_and_missing_directory() -> None:
    directory = state.claim("fg")
    gc.remove_directory(directory)
    assert not directory.exists()
    gc.remove_directory(directory)  # already gone: nothing to do
    gc.remove_directory(directory, background=True)


def test_trash_of_a_dead_process_is_emptied_by_gc() -> None:
    trash = state.paths.sandboxes_dir() / gc.TRASH_DIR
    trash.mkdir(parents=True)
    dead = trash / "old.999999999.abcd"
    (dead / "sub").mkdir(parents=True)
    mine = trash / f"busy.{os.getpid()}.abcd"
    mine.mkdir()
    removed = gc.collect()
    assert removed == [f"old: leftover of a removal ({dead})"]
    assert not dead.exists() and mine.exists()


def test_gc_leaves_running_and_stopped_sandboxes_alone() -> None:
    stopped = state.claim("stopped-one")
    (stopped / state.STOPPED_FILE).write_text("stopped on request\n")
    running = state.claim("running-one")
    start = state.process_start_time(os.getpid())
    (running / state.PID_FILE).write_text(f"{os.getpid()} {start}\n")
    (running / state.CONTROL_SOCKET).write_text("")
    assert gc.collect() == []
    assert stopped.exists() and running.exists()


def test_mounts_under_parses_mountinfo(tmp_path: Path) -> None:
    assert gc.mounts_under(tmp_path / "nothing-mounted-here") == []
    assert "/" not in gc.mounts_under(Path("/proc/self"))
