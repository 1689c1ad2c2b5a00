"""``/proc/self/mountinfo``: the mount points of our mount namespace.

The kernel writes a mount point (field 5) with four bytes escaped as three octal digits:
space ``\\040``, tab ``\\011``, newline ``\\012`` and backslash ``\\134`` (``mangle()`` in
fs/proc_namespace.c); every other byte, UTF-8 or not, is written as it is. So the field is
unescaped as bytes and then decoded like any other path (``os.fsdecode``): a path that is
not UTF-8 comes back as the same ``str`` that ``os.listdir`` would give.
"""

from __future__ import annotations

import os

#: Where the calling process's mount table is.
SELF_MOUNTINFO = "/proc/self/mountinfo"

_MOUNT_POINT_FIELD = 4  # 0-based: field 5 of proc(5)
_BACKSLASH = 0x5C
_OCTAL = b"01234567"


def unescape(field: bytes) -> str:
    """A mountinfo path field as the path it names (``\\ooo`` octal escapes undone)."""
    if b"\\" not in field:
        return os.fsdecode(field)
    out = bytearray()
    i = 0
    while i < len(field):
        digits = field[i + 1 : i + 4]
        if (
            field[i] == _BACKSLASH
            and len(digits) == 3
            and all(d in _OCTAL for d in digits)
        ):
            out.append(int(digits, 8) & 0xFF)
            i += 4
        else:
            out.append(field[i])
            i += 1
    return os.fsdecode(bytes(out))


class MountEntry:
    """One line of a mountinfo file, the fields corral reads (a plain class: no dataclasses
    on the supervisor's start-up path)."""

    __slots__ = ("fstype", "point", "shared", "source")

    def __init__(self, point: str, fstype: str, source: str, shared: bool) -> None:
        self.point = point  # where it is mounted
        self.fstype = fstype  # "cgroup2", "tmpfs", "overlay", ...
        self.source = source  # the mount source ("none", "/dev/sda1", "overlay", ...)
        self.shared = shared  # in a peer group: mounts below it propagate elsewhere

    def __repr__(self) -> str:
        return f"MountEntry({self.point!r}, {self.fstype!r}, {self.source!r}, {self.shared})"


def parse_entries(text: bytes) -> list[MountEntry]:
    """Every well-formed line of a mountinfo file, in the file's order (proc(5): mount
    point in field 5, optional fields from 7 up to a lone ``-``, then fstype and source)."""
    entries = []
    for line in text.splitlines():
        fields = line.split(b" ")
        try:
            dash = fields.index(b"-", 6)
        except ValueError:
            continue
        if len(fields) <= dash + 2:
            continue
        entries.append(
            MountEntry(
                point=unescape(fields[_MOUNT_POINT_FIELD]),
                fstype=fields[dash + 1].decode("ascii", "replace"),
                source=unescape(fields[dash + 2]),
                shared=any(o.startswith(b"shared:") for o in fields[6:dash]),
            )
        )
    return entries


def parse_mount_points(text: bytes) -> list[str]:
    """The mount point of every line of a mountinfo file, in the file's order."""
    return [entry.point for entry in parse_entries(text)]


def entries(path: str = SELF_MOUNTINFO) -> list[MountEntry]:
    """Every mount of our mount namespace (empty when /proc is not mounted)."""
    try:
        with open(path, "rb") as f:
            return parse_entries(f.read())
    except FileNotFoundError:
        return []


def mount_points(path: str = SELF_MOUNTINFO) -> list[str]:
    """Every mount point of our mount namespace (empty when /proc is not mounted)."""
    try:
        with open(path, "rb") as f:
            return parse_mount_points(f.read())
    except FileNotFoundError:
        return []


def mounts_under(directory: str | os.PathLike[str], path: str = SELF_MOUNTINFO) -> list[str]:
    """Mount points at or below ``directory``, deepest first (the order to unmount them).

    A point with mounts stacked on it is listed once per mount: each needs its own unmount.
    """
    prefix = os.path.realpath(directory)
    below = prefix.rstrip("/") + "/"
    found = [p for p in mount_points(path) if p == prefix or p.startswith(below)]
    return sorted(found, key=len, reverse=True)
