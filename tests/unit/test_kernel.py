"""corral.kernel: the procfs and mountinfo parsers (pure parts; no root needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.kernel import mountinfo, procfs

# -- /proc/<pid>/stat -------------------------------------------------------------------------


def _stat_line(comm: bytes, state: bytes = b"S", ppid: int = 1, pgrp: int = 7,
               start: int = 12345) -> bytes:
    rest = [state, b"%d" % ppid, b"%d" % pgrp] + [b"0"] * 16 + [b"%d" % start, b"0", b"0"]
    return b"42 (" + comm + b") " + b" ".join(rest) + b"\n"


@given(st.binary(max_size=15).filter(lambda b: b"\0" not in b and b"\n" not in b))
def test_stat_parse_survives_any_command_name(comm: bytes) -> None:
    """A process names itself (prctl PR_SET_NAME): ') R 1 2' in its name changes nothing."""
    stat = procfs.parse_stat(_stat_line(comm, b"R", 3, 9, 777))
    assert (stat.state, stat.ppid, stat.pgrp, stat.start_time) == ("R", 3, 9, 777)
    assert stat.alive


def test_stat_of_a_zombie_is_not_alive() -> None:
    assert not procfs.parse_stat(_stat_line(b"x", b"Z")).alive


def test_stat_of_a_dead_process_being_released_is_not_alive() -> None:
    # A fork server's supervisors are reaped by the kernel (SIGCHLD ignored): "X", not "Z".
    assert not procfs.parse_stat(_stat_line(b"x", b"X")).alive


@pytest.mark.parametrize("raw", [b"", b"42 (cut", b"42 (x) S 1 2 3\n"])
def test_stat_parse_refuses_what_is_not_a_stat_line(raw: bytes) -> None:
    with pytest.raises(ValueError, match="not a /proc/<pid>/stat line"):
        procfs.parse_stat(raw)


def test_own_and_live_start_time_agree_with_the_kernel() -> None:
    own = procfs.own_start_time()
    assert procfs.live_start_time(os.getpid()) == own
    assert procfs.read_stat(os.getpid()) is not None
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert procfs.live_start_time(proc.pid) is None  # reaped: no such process
    assert procfs.read_stat(proc.pid) is None


def test_a_zombie_has_no_live_start_time() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        # Not yet reaped: a zombie until wait(). Poll the kernel's view, not the clock.
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        stat = procfs.read_stat(proc.pid)
        assert stat is not None and not stat.alive
        assert procfs.live_start_time(proc.pid) is None
    finally:
        proc.wait()


# -- mountinfo --------------------------------------------------------------------------------


def _mangle(path: bytes) -> bytes:
    """What the kernel writes for a path (fs/proc_namespace.c: mangle(), " \\t\\n\\\\")."""
    return b"".join(b"\\%03o" % c if c in b" \t\n\\" else bytes([c]) for c in path)


@given(st.binary(min_size=1, max_size=64))
def test_unescape_undoes_the_kernels_mangling(path: bytes) -> None:
    assert mountinfo.unescape(_mangle(path)) == os.fsdecode(path)


def test_unescape_leaves_non_escapes_alone() -> None:
    assert mountinfo.unescape(b"/a\\b") == "/a\\b"  # not three octal digits
    assert mountinfo.unescape(b"/a\\08") == "/a\\08"
    assert mountinfo.unescape("/dé jà".encode()) == "/dé jà"


def _line(point: bytes) -> bytes:
    return b"36 35 98:0 / " + _mangle(point) + b" rw,noatime master:1 - ext3 /dev/root rw\n"


def test_mounts_under_lists_deepest_first_with_stacked_mounts(tmp_path: Path) -> None:
    base = tmp_path / "sb dir"
    table = tmp_path / "mountinfo"
    table.write_bytes(
        _line(b"/")
        + _line(os.fsencode(base))
        + _line(os.fsencode(base / "root"))
        + _line(os.fsencode(base / "root" / "proc"))
        + _line(os.fsencode(base / "root" / "proc"))  # stacked: two unmounts
        + _line(os.fsencode(tmp_path / "sb dirt"))  # a sibling with the same prefix
    )
    assert mountinfo.mounts_under(base, str(table)) == [
        str(base / "root" / "proc"),
        str(base / "root" / "proc"),
        str(base / "root"),
        str(base),
    ]


def test_entries_read_fstype_source_and_propagation() -> None:
    text = (
        b"25 1 0:23 / /sys/fs/cgroup rw shared:9 - tmpfs tmpfs ro,mode=755\n"
        b"26 25 0:24 / /sys/fs/cgroup/a\\040b rw - cgroup2 none rw\n"
        b"garbage without the separator\n"
    )
    got = [(e.point, e.fstype, e.source, e.shared) for e in mountinfo.parse_entries(text)]
    assert got == [
        ("/sys/fs/cgroup", "tmpfs", "tmpfs", True),
        ("/sys/fs/cgroup/a b", "cgroup2", "none", False),
    ]


def test_mount_points_of_this_process() -> None:
    assert "/" in mountinfo.mount_points()
    assert any(e.point == "/proc" and e.fstype == "proc" for e in mountinfo.entries())
    assert mountinfo.mount_points("/nonexistent/mountinfo") == []
