"""The Linux system calls the launcher needs that Python 3.11's ``os`` module lacks.

Thin ctypes wrappers over libc (or ``syscall(2)`` for calls glibc does not wrap), each raising
``OSError`` with errno so that the launcher can turn it into one sentence naming its step.
Numbers are for x86_64, the only architecture corral's namespace backend supports today.

libc itself is loaded once, in :mod:`corral.kernel.libc`, which also has the calls that the
data path shares with the runtime (``setns``, ``unshare``, ``mount``, ``umount2``;
re-exported here with ``CLONE_NEWNET`` and ``MNT_DETACH`` so the launcher reads as one list
of calls).
"""

from __future__ import annotations

import ctypes
import os

from corral.kernel.libc import MNT_DETACH as MNT_DETACH
from corral.kernel.libc import check as _check
from corral.kernel.libc import libc as _libc
from corral.kernel.libc import mount as mount
from corral.kernel.libc import setns as setns
from corral.kernel.libc import umount2 as umount2
from corral.kernel.libc import unshare as unshare
from corral.kernel.netns import CLONE_NEWNET as CLONE_NEWNET

# clone(2)/unshare(2) flags.
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000

# mount(2) flags.
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

# prctl(2) options.
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

# x86_64 numbers of calls glibc 2.36 does not wrap.
_SYS_PIVOT_ROOT = 155
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429

AT_FDCWD = -100
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4

_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def pivot_root(new_root: str, put_old: str) -> None:
    _check(
        _libc.syscall(ctypes.c_long(_SYS_PIVOT_ROOT), new_root.encode(), put_old.encode()),
        new_root,
    )


def open_tree(path: str, flags: int, dirfd: int = AT_FDCWD) -> int:
    return _check(
        _libc.syscall(ctypes.c_long(_SYS_OPEN_TREE), ctypes.c_int(dirfd), path.encode(),
                      ctypes.c_uint(flags)),
        path,
    )


def move_mount(from_fd: int, from_path: str, to_path: str, flags: int,
               to_dirfd: int = AT_FDCWD) -> None:
    _check(
        _libc.syscall(ctypes.c_long(_SYS_MOVE_MOUNT), ctypes.c_int(from_fd), from_path.encode(),
                      ctypes.c_int(to_dirfd), to_path.encode(), ctypes.c_uint(flags)),
        to_path,
    )


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, ctypes.c_size_t(len(raw))), "sethostname")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(
        _libc.prctl(
            ctypes.c_int(option),
            ctypes.c_ulong(arg2),
            ctypes.c_ulong(arg3),
            ctypes.c_ulong(arg4),
            ctypes.c_ulong(arg5),
        ),
        "prctl",
    )


PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2


class _SockFprog(ctypes.Structure):
    _fields_ = [  # noqa: RUF012 - ctypes reads this class attribute
        ("len", ctypes.c_ushort),
        ("filter", ctypes.c_void_p),
    ]


def seccomp_filter(program: bytes) -> None:
    """Install a classic-BPF seccomp program (8-byte sock_filter instructions)."""
    if len(program) % 8:
        raise ValueError("a seccomp program is a whole number of 8-byte instructions")
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    _check(
        _libc.prctl(ctypes.c_int(PR_SET_SECCOMP), ctypes.c_ulong(SECCOMP_MODE_FILTER),
                    ctypes.byref(fprog), ctypes.c_ulong(0), ctypes.c_ulong(0)),
        "seccomp",
    )


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]  # noqa: RUF012


class _CapData(ctypes.Structure):
    _fields_ = [  # noqa: RUF012 - ctypes reads this class attribute
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set the calling thread's capability sets (64-bit masks, capability number = bit)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        shift = 32 * i
        data[i].effective = (effective >> shift) & 0xFFFFFFFF
        data[i].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def capget() -> tuple[int, int, int]:
    """The calling thread's (effective, permitted, inheritable) capability masks."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(header), data), "capget")
    eff = data[0].effective | (data[1].effective << 32)
    perm = data[0].permitted | (data[1].permitted << 32)
    inh = data[0].inheritable | (data[1].inheritable << 32)
    return eff, perm, inh



# mount_setattr(2) (Linux 5.12): change a mount's attributes, among them its idmapping.
_SYS_MOUNT_SETATTR = 442
AT_EMPTY_PATH = 0x1000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_IDMAP = 0x100000


class _MountAttr(ctypes.Structure):
    _fields_ = [  # noqa: RUF012 - ctypes reads this class attribute
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def mount_setattr(fd: int, attr_set: int, *, userns_fd: int = 0, recursive: bool = True) -> None:
    """Set ``attr_set`` on the (detached) mount ``fd``; with MOUNT_ATTR_IDMAP, ``userns_fd``
    names the user namespace whose id map the mount applies to its files' owners."""
    attr = _MountAttr(attr_set, 0, 0, userns_fd)
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    _check(
        _libc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(fd), b"",
                      ctypes.c_uint(flags), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))),
        "mount_setattr",
    )
