"""kernel.files.replace_file: a reader sees the old record or the new one, never a torn one."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from corral.kernel.files import replace_file


def test_replaces_whole_with_the_mode_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")
    data = b"x" * (4 << 20)  # larger than one pipe/page: the write loop must finish it
    replace_file(target, data, mode=0o600)
    assert target.read_bytes() == data
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_failed_write_keeps_the_old_record_and_removes_the_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "stopped"
    target.write_text("old")

    def failing_write(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(OSError):
        replace_file(str(target), b"new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stopped"]
