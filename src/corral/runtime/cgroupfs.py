"""Making the cgroup hierarchy visible at /sys/fs/cgroup when this mount namespace lacks it.

``ip netns exec`` runs its command in a mount namespace of its own with a fresh sysfs on
/sys (sysfs shows the network devices of the namespace that mounted it), and a fresh sysfs
has an empty /sys/fs/cgroup. Containers that bring their own /sys can look the same. The
cgroups themselves are still there: /proc/self/cgroup lists every hierarchy this process
is in and its place in each; only the mounts are missing.

So, where /sys/fs/cgroup holds no cgroup filesystem, corral mounts what it needs there
itself, in the calling process's mount namespace: a tmpfs, then for cgroup v1 each hierarchy
that carries ``memory``, ``cpu`` or ``pids`` (with exactly the controllers it is mounted with
elsewhere, else the kernel refuses with EBUSY; co-mounted controllers get systemd's
``cpu -> cpu,cpuacct`` links), and the v2 tree (at the root on a pure v2 host, at
``unified`` on a hybrid one). Mounting an existing hierarchy again attaches the same
cgroups, so the paths corral records (``/sys/fs/cgroup/memory/...``) name the same
directories in this namespace and in the host's, and gc works from either.

corral does not borrow another namespace's view instead (``/proc/<pid>/root/sys/fs/cgroup``
of a process that sees the hierarchy): the paths it records would then hold only while that
process lives, and on this machine pid 1's root is not even readable by root.

The mounts stay private: under ``ip netns exec`` the namespace is the command's own and goes
away with it. corral refuses to mount when the mount it would mount on is *shared* (its
events propagate to other namespaces, such as a container's /sys shared with the host):
then it says what to do instead. Every time it mounts, it says so (a ``logging`` warning,
which reaches stderr when the application configured no logging).

:func:`mount_plan` is pure (unit-tested with the mountinfo of each layout); :func:`ensure`
reads /proc and mounts.
"""

from __future__ import annotations

import _thread
import contextlib
import os

from corral.errors import SandboxError
from corral.kernel.mountinfo import SELF_MOUNTINFO, MountEntry, parse_entries

#: The controllers corral sets limits with (cgroups.V1_CONTROLLERS; repeated here so this
#: module does not import the one that imports it).
WANTED_CONTROLLERS = frozenset({"memory", "cpu", "pids"})

#: Options of the tmpfs that holds the v1 mount points: systemd's (mode 755), and small,
#: because it only ever holds a few directories and symlinks.
TMPFS_OPTIONS = "mode=755,size=64k,nr_inodes=64"

#: Where the v2 tree goes on a hybrid host (systemd's name for it).
UNIFIED_DIR = "unified"

#: mount(2) flags of every mount made here: cgroupfs and the tmpfs hold no programs or devices.
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8

#: Name of the logger the note goes to (``logging`` is imported only to write it: it costs
#: 6 ms of every supervisor's start-up here, and the note is rare).
LOGGER = "corral"


class HierarchyMount:
    """One mount to make: ``fstype`` with ``options`` on ``target``, then ``links`` (names in
    the target's parent directory that point to it, for co-mounted v1 controllers).

    A plain class, as :class:`MountEntry`: this module is imported by every supervisor's
    fork server, and a dataclass costs a millisecond to create there."""

    __slots__ = ("fstype", "links", "options", "target")

    def __init__(self, target: str, fstype: str, options: str, links: tuple[str, ...] = ()):
        self.target = target
        self.fstype = fstype  # "tmpfs" | "cgroup" | "cgroup2"
        self.options = options
        self.links = links

    def _key(self) -> tuple[str, str, str, tuple[str, ...]]:
        return (self.target, self.fstype, self.options, self.links)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HierarchyMount) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"HierarchyMount{self._key()!r}"


def hierarchies(proc_self_cgroup: str) -> tuple[list[tuple[str, ...]], bool]:
    """(v1 hierarchies carrying a wanted controller, as their controller lists; whether a v2
    hierarchy exists), from the text of /proc/self/cgroup."""
    v1: list[tuple[str, ...]] = []
    v2 = False
    for line in proc_self_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy_id, controllers, _path = parts
        if hierarchy_id == "0" and not controllers:
            v2 = True
            continue
        names = tuple(c for c in controllers.split(",") if c and not c.startswith("name="))
        if WANTED_CONTROLLERS & set(names):
            v1.append(names)
    return v1, v2


def visible(entries: list[MountEntry], root: str) -> bool:
    """Whether a cgroup filesystem is mounted at or below ``root``."""
    below = root.rstrip("/") + "/"
    return any(
        e.fstype in ("cgroup", "cgroup2") and (e.point == root or e.point.startswith(below))
        for e in entries
    )


def covering_mount(entries: list[MountEntry], path: str) -> MountEntry | None:
    """The mount ``path`` lies on (the last mounted one with the longest matching point)."""
    best: MountEntry | None = None
    for e in entries:
        prefix = e.point.rstrip("/") + "/"
        if (path == e.point or path.startswith(prefix) or e.point == "/") and (
            best is None or len(e.point) >= len(best.point)
        ):
            best = e
    return best


def mount_plan(proc_self_cgroup: str, mountinfo: bytes, root: str) -> list[HierarchyMount]:
    """The mounts that make this process's cgroup hierarchies visible at ``root``; empty
    when a cgroup filesystem is already mounted there. SandboxError when mounting there
    would not stay private (the covering mount is shared) or there is nothing to mount."""
    entries = parse_entries(mountinfo)
    if visible(entries, root):
        return []
    v1, v2 = hierarchies(proc_self_cgroup)
    if not v1 and not v2:
        raise SandboxError(
            f"cgroups: /proc/self/cgroup lists no cgroup hierarchy, and none is mounted at "
            f"{root}; corral needs cgroup v1 or v2"
        )
    covering = covering_mount(entries, root)
    if covering is not None and covering.shared:
        raise SandboxError(
            f"cgroups: no cgroup hierarchy is mounted at {root} in this mount namespace, and "
            f"{covering.point} is a shared mount, so mounting one there would show in other "
            f"namespaces too; mount it yourself (mount -t cgroup2 none {root}, or the v1 "
            "hierarchies) or run corral in a private mount namespace (unshare -m)"
        )
    if not v1:
        return [HierarchyMount(root, "cgroup2", "")]
    plan = [HierarchyMount(root, "tmpfs", TMPFS_OPTIONS)]
    for controllers in v1:
        joined = ",".join(controllers)
        links = controllers if len(controllers) > 1 else ()
        plan.append(HierarchyMount(f"{root}/{joined}", "cgroup", joined, links))
    if v2:
        plan.append(HierarchyMount(f"{root}/{UNIFIED_DIR}", "cgroup2", ""))
    return plan


def describe(plan: list[HierarchyMount]) -> str:
    """The names of the hierarchies a plan mounts (``memory, cpu, pids, unified``)."""
    return ", ".join(os.path.basename(m.target) or m.target for m in plan if m.fstype != "tmpfs")


_lock = _thread.allocate_lock()  # _thread: threading costs every supervisor 1.5 ms to import
_done: set[tuple[int, int, str]] = set()


def ensure(root: str = "/sys/fs/cgroup") -> str | None:
    """Mount the cgroup hierarchies at ``root`` if this mount namespace shows none there.

    Returns the sentence it logged when it mounted, None when nothing was needed. Checked
    once per mount namespace and process (a few reads of /proc); SandboxError, naming the
    mount that failed, when the hierarchies are missing and cannot be mounted.
    """
    try:
        st = os.stat("/proc/self/ns/mnt")
        key = (st.st_dev, st.st_ino, root)
    except OSError:
        key = (0, 0, root)
    if key in _done:
        return None
    with _lock:
        if key in _done:
            return None
        with open("/proc/self/cgroup") as f:
            own = f.read()
        with open(SELF_MOUNTINFO, "rb") as f:
            mountinfo = f.read()
        plan = mount_plan(own, mountinfo, root)
        note = None
        if plan:
            _mount(plan)
            note = (
                f"corral: note: no cgroup hierarchy was mounted at {root} in this mount "
                "namespace (as under `ip netns exec`, which mounts a fresh /sys); corral "
                f"mounted {describe(plan)} there, in this mount namespace only"
            )
            import logging

            logging.getLogger(LOGGER).warning(note)
        _done.add(key)
        return note


def _mount(plan: list[HierarchyMount]) -> None:
    """Make the mounts of ``plan`` in order; on a failure undo the ones made and raise."""
    from corral.runtime import syscalls

    made: list[str] = []
    try:
        for step in plan:
            if step.fstype != "tmpfs":
                with contextlib.suppress(FileExistsError):
                    os.mkdir(step.target, 0o755)
            try:
                syscalls.mount(
                    step.fstype,
                    step.target,
                    step.fstype,
                    _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
                    step.options or None,
                )
            except OSError as e:
                what = f"{step.fstype} ({step.options})" if step.options else step.fstype
                raise SandboxError(
                    f"cgroups: no cgroup hierarchy is mounted at {plan[0].target} in this mount "
                    f"namespace, and mounting {what} on {step.target} failed: {e.strerror}"
                ) from None
            made.append(step.target)
            parent = os.path.dirname(step.target)
            for link in step.links:
                with contextlib.suppress(FileExistsError):
                    os.symlink(os.path.basename(step.target), os.path.join(parent, link))
    except BaseException:
        for target in reversed(made):
            with contextlib.suppress(OSError):
                syscalls.umount2(target, syscalls.MNT_DETACH)
        raise
