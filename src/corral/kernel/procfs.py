"""``/proc/<pid>/stat``: a process's state, parent, process group and start time.

The start time (field 22, clock ticks since boot) together with the pid names a process for
good: pids are reused, (pid, start time) pairs are not. Supervisor pid files, spare cgroup
names and gc's liveness checks all rest on it.

The command name (field 2) is in parentheses and may itself hold spaces and ``)``: the
fields are split after the *last* ``)``, the only parse that a process cannot fool by naming
itself ``a) R 1 2``.
"""

from __future__ import annotations

#: Indexes into the fields after the command name (field 3 of proc(5) is index 0).
_STATE = 0
_PPID = 1
_PGRP = 2
_START_TIME = 19

#: The state letter of a zombie: the process has exited, only its exit status is left.
ZOMBIE = "Z"
#: Dead and being released (EXIT_DEAD: "X", "x" in old kernels): what a process whose parent
#: ignores SIGCHLD (a fork server's supervisor) shows instead of "Z", for a few ms after its
#: pidfd turned readable.
DEAD = ("X", "x")


class ProcessStat:
    """The parts of ``/proc/<pid>/stat`` corral uses (a plain class: no dataclasses on the
    supervisor's start-up path)."""

    __slots__ = ("pgrp", "ppid", "start_time", "state")

    def __init__(self, state: str, ppid: int, pgrp: int, start_time: int) -> None:
        self.state = state
        self.ppid = ppid
        self.pgrp = pgrp
        self.start_time = start_time

    @property
    def alive(self) -> bool:
        """Whether the process still runs (exists and is neither a zombie nor dead)."""
        return self.state != ZOMBIE and self.state not in DEAD

    def __repr__(self) -> str:
        return (
            f"ProcessStat(state={self.state!r}, ppid={self.ppid}, pgrp={self.pgrp}, "
            f"start_time={self.start_time})"
        )


def parse_stat(raw: bytes) -> ProcessStat:
    """A ``/proc/<pid>/stat`` line; ValueError if it is not one."""
    end = raw.rfind(b")")
    if end < 0:
        raise ValueError("not a /proc/<pid>/stat line: no ')' after the command name")
    fields = raw[end + 1 :].split()
    if len(fields) <= _START_TIME:
        raise ValueError(f"not a /proc/<pid>/stat line: {len(fields) + 2} fields")
    return ProcessStat(
        fields[_STATE].decode("ascii", "replace"),
        int(fields[_PPID]),
        int(fields[_PGRP]),
        int(fields[_START_TIME]),
    )


def read_stat(pid: int | str = "self") -> ProcessStat | None:
    """The stat of ``pid`` (a number, ``"self"``), None when there is no such process.

    Only "no such process" is None (the file is gone, or the process exited while it was
    read); any other error (EACCES under ``hidepid``) is raised, because callers decide
    from None that a process is dead and remove what it owned.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return parse_stat(raw)


def live_start_time(pid: int) -> int | None:
    """Start time of ``pid`` if it runs, None if there is no such process or it is a zombie."""
    stat = read_stat(pid)
    return stat.start_time if stat is not None and stat.alive else None


def own_start_time() -> int:
    """The calling process's start time (for pid files and names that must outlive reuse)."""
    stat = read_stat("self")
    assert stat is not None  # /proc/self always exists for the caller
    return stat.start_time


def write_id_maps(pid: int, uid_map: str, gid_map: str) -> None:
    """Write the uid and gid maps of ``pid``'s (new, still unmapped) user namespace.

    Each map goes in one write(2), as the kernel requires (a map can be written once, whole);
    errors are raised as the kernel gave them (EPERM: the writer lacks the ids; EINVAL: bad
    or overlapping lines), for the caller to phrase."""
    for name, lines in (("uid_map", uid_map), ("gid_map", gid_map)):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(lines)
