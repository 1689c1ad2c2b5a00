"""Volumes: host directories (or files) bind-mounted into a sandbox, ``-v HOST:GUEST[:ro]``.

The sandbox's root is host id UID_BASE, so a plain bind mount would show the host's files as
owned by nobody and let the sandbox write only where "other" may. corral instead gives each
volume an *idmapped* mount (Linux 5.12+, mount_setattr(2)) whose map has exactly one entry:
the owner of the volume's top directory (or file) on the host is the sandbox's user. So
``-v $PWD:/src`` behaves as users expect: the sandbox reads and writes the checkout as its
own, and what it creates there belongs to the checkout's owner on the host. Every other id
stays unmapped: files of other host users show as nobody (65534) inside and keep their
"other" permissions; the sandbox cannot create files as any other id there.

Decisions (docs/cli.md, "Volumes"):

* The mount is always ``nosuid`` and ``nodev``: a host directory with a device node or a
  setuid binary in it gives the sandbox no new power.
* A volume whose owner is host root maps the sandbox's user to host root *inside that
  directory*: what the sandbox writes there is root's on the host, set-uid bits included,
  as with docker. Give a sandbox a directory owned by an unprivileged user, or ``:ro``.
* Where the filesystem cannot be idmapped (mount_setattr refuses: an old kernel, a
  filesystem without support), the volume is an ordinary bind mount with the same flags, so
  the ids show unshifted (as nobody inside); it still works for reading.

How (docs/isolation.md): stage A, still real root in the host's user namespace, clones the
host path into a detached mount (open_tree), gives it the idmap of a short-lived helper user
namespace and the flags, and keeps the fd; stage B, after the pivot, attaches it at GUEST,
a path resolved inside the sandbox's own root (so a symlink in the image can only lead
somewhere inside the sandbox).
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from corral.errors import ConfigError
from corral.kernel import procfs
from corral.runtime import syscalls

#: Volumes per sandbox: each is a mount in the sandbox and an fd held during the launch;
#: docker has no limit, but 64 is far above any real use and bounds what a create may ask.
MAX_VOLUMES = 64


@dataclass(frozen=True)
class Volume:
    """One volume: ``host`` (absolute, exists) mounted at ``guest`` (absolute)."""

    host: str
    guest: str
    read_only: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {"host": self.host, "guest": self.guest, "read_only": self.read_only}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Volume:
        return cls(str(data["host"]), str(data["guest"]), bool(data.get("read_only")))


def parse_volume(text: str, field: str = "volumes", cwd: str | None = None) -> Volume:
    """A Volume from ``HOST:GUEST[:ro|:rw]``; a relative HOST is taken from ``cwd`` (the
    CLI's working directory) and must exist. ConfigError names ``field``."""
    if not isinstance(text, str):
        raise ConfigError(field, f"{text!r} is not HOST:GUEST[:ro]")
    parts = text.split(":")
    read_only = False
    if len(parts) == 3 and parts[2] in ("ro", "rw"):
        read_only = parts.pop() == "ro"
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise ConfigError(field, f"{text!r} is not HOST:GUEST[:ro] (paths cannot contain ':')")
    return check_volume(Volume(parts[0], parts[1], read_only), field, cwd)


def check_volume(volume: Volume, field: str = "volumes", cwd: str | None = None) -> Volume:
    """The volume with HOST made absolute and GUEST normalised, or ConfigError."""
    host, guest = volume.host, volume.guest
    if not isinstance(host, str) or not host or "\0" in host:
        raise ConfigError(field, f"host path {host!r} is not a path")
    if not isinstance(guest, str) or "\0" in guest or not guest.startswith("/"):
        raise ConfigError(field, f"guest path {guest!r} is not an absolute path")
    host = os.path.abspath(os.path.join(cwd or os.getcwd(), os.path.expanduser(host)))
    try:
        st = os.stat(host)
    except OSError as exc:
        raise ConfigError(field, f"host path {host} cannot be used: {exc.strerror}") from None
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise ConfigError(field, f"host path {host} is neither a directory nor a regular file")
    normal = posixpath.normpath(guest)
    if normal.startswith("//"):
        normal = "/" + normal.lstrip("/")
    if normal == "/":
        raise ConfigError(field, "a volume cannot be mounted on / (the sandbox's root)")
    if normal.split("/")[1] in ("proc", "dev"):
        raise ConfigError(field, f"guest path {guest} is inside /proc or /dev, which corral owns")
    return Volume(host, normal, bool(volume.read_only))


def check_volumes(volumes: Any, cwd: str | None = None) -> tuple[Volume, ...]:
    """Volumes from strings (``HOST:GUEST[:ro]``) or Volume objects; GUEST paths unique."""
    if volumes is None:
        return ()
    if isinstance(volumes, str | bytes | Volume):
        raise ConfigError("volumes", "must be a list of volumes, not a single one")
    out: list[Volume] = []
    for i, item in enumerate(volumes):
        field = f"volumes[{i}]"
        if isinstance(item, Volume):
            out.append(check_volume(item, field, cwd))
        else:
            out.append(parse_volume(item, field, cwd))
    if len(out) > MAX_VOLUMES:
        raise ConfigError("volumes", f"{len(out)} volumes are more than the {MAX_VOLUMES} allowed")
    seen: set[str] = set()
    for i, v in enumerate(out):
        if v.guest in seen:
            raise ConfigError(f"volumes[{i}]", f"guest path {v.guest} is mounted twice")
        seen.add(v.guest)
    return tuple(out)


# --- the launch's side (stage A: host root; stage B: inside the sandbox) ---------------------


def idmap_lines(host_id: int, sandbox_id: int, uid_base: int) -> str:
    """The one-line id map of a volume's helper namespace: host id -> the sandbox's id.

    An idmapped mount reads an on-disk id through the map from "inside" to "outside"; the
    outside ids are the kernel's (uid_base + n is the sandbox's n), so on-disk ``host_id``
    becomes the sandbox's ``sandbox_id``, and nothing else is mapped.
    """
    return f"{host_id} {uid_base + sandbox_id} 1\n"


def helper_user_namespace(uid_map: str, gid_map: str) -> int:
    """An fd of a new user namespace with these maps (for MOUNT_ATTR_IDMAP).

    A forked child unshares a user namespace and waits; we (host root) write its maps, open
    its namespace and let it exit. The namespace lives on as long as the fd. Call from a
    thread-free process (stage A).
    """
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    done_r, done_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(ready_r)
            os.close(done_w)
            syscalls.unshare(syscalls.CLONE_NEWUSER)
            os.write(ready_w, b"u")
            os.read(done_r, 1)  # EOF when the parent has the namespace (or died)
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(done_r)
    try:
        if os.read(ready_r, 1) != b"u":
            raise OSError(0, "the helper process could not create a user namespace")
        procfs.write_id_maps(pid, uid_map, gid_map)
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_r)
        os.close(done_w)
        os.waitpid(pid, 0)


def open_volume(volume: Volume, sandbox_uid: int, sandbox_gid: int, uid_base: int) -> int:
    """A detached, flagged and (where possible) idmapped clone of ``volume.host``: its fd.

    OSError names the failing call; EINVAL/EPERM/EOPNOTSUPP from the idmap fall back to an
    ordinary bind mount with the same flags (see the module docstring).
    """
    tree = syscalls.open_tree(
        volume.host,
        syscalls.OPEN_TREE_CLONE | syscalls.OPEN_TREE_CLOEXEC | syscalls.AT_RECURSIVE,
    )
    try:
        flags = syscalls.MOUNT_ATTR_NOSUID | syscalls.MOUNT_ATTR_NODEV
        if volume.read_only:
            flags |= syscalls.MOUNT_ATTR_RDONLY
        st = os.fstat(tree)
        userns = helper_user_namespace(
            idmap_lines(st.st_uid, sandbox_uid, uid_base),
            idmap_lines(st.st_gid, sandbox_gid, uid_base),
        )
        try:
            syscalls.mount_setattr(tree, flags | syscalls.MOUNT_ATTR_IDMAP, userns_fd=userns)
        except OSError as exc:
            if exc.errno not in _NO_IDMAP:
                raise
            syscalls.mount_setattr(tree, flags)
        finally:
            os.close(userns)
    except BaseException:
        os.close(tree)
        raise
    return tree


#: What mount_setattr answers when a mount cannot be idmapped (old kernel, filesystem
#: without support, a mount already idmapped): the volume falls back to a plain bind.
_NO_IDMAP = frozenset({errno.EINVAL, errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS})


def attach_volume(tree: int, volume: Volume, is_dir: bool) -> None:
    """Attach the detached mount ``tree`` at ``volume.guest`` (inside the sandbox, after
    the pivot), creating the mount point (a directory, or an empty file for a file volume)
    as the sandbox's root would. OSError names the path."""
    guest = volume.guest
    try:
        st = os.lstat(guest)
    except FileNotFoundError:
        os.makedirs(posixpath.dirname(guest) or "/", mode=0o755, exist_ok=True)
        if is_dir:
            os.mkdir(guest, 0o755)
        else:
            os.close(os.open(guest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
    else:
        if stat.S_ISLNK(st.st_mode):
            # Resolved inside the sandbox's root: it can only point into the sandbox.
            st = os.stat(guest)
        if is_dir != stat.S_ISDIR(st.st_mode):
            want = "a directory" if is_dir else "a file"
            raise OSError(errno.ENOTDIR if is_dir else errno.EISDIR, f"the mount point is not {want}")
    syscalls.move_mount(tree, "", guest, syscalls.MOVE_MOUNT_F_EMPTY_PATH)
