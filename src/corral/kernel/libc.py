"""glibc, loaded once by its soname, for the system calls Python 3.11's ``os`` lacks.

Loaded by soname, never through ``ctypes.util.find_library``: that runs ``ldconfig -p`` (or a
compiler) in a subprocess, about 10 ms of every supervisor's start-up, and corral's namespace
backend runs on glibc Linux only (x86_64, docs/isolation.md). The library is already mapped
into every CPython process, so ``dlopen`` here only looks it up.

Every wrapper raises ``OSError`` with the errno and a short name of the call or path, so a
caller can turn it into one sentence naming its step. The launcher's own calls (mount,
pivot_root, seccomp, capabilities) are in :mod:`corral.runtime.syscalls`, built on
:data:`libc` and :func:`check`; the calls that the runtime and the data path share (setns,
unshare, mount, umount2) are here.
"""

from __future__ import annotations

import ctypes
import os

#: The glibc soname (stable since glibc 2.0 on x86_64).
LIBC_SONAME = "libc.so.6"

try:
    libc = ctypes.CDLL(LIBC_SONAME, use_errno=True)
except OSError as exc:  # pragma: no cover - not glibc
    raise ImportError(
        f"corral needs glibc ({LIBC_SONAME}) for its system calls and cannot load it: {exc}"
    ) from None

#: umount2(2) flag: detach now, finish when the mount is no longer busy (a killed sandbox's
#: process may still hold it for a moment).
MNT_DETACH = 2


def check(result: int, what: str) -> int:
    """``result`` of a libc call, or OSError(errno) naming ``what`` when it is negative."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), what)
    return result


def setns(fd: int, nstype: int = 0) -> None:
    """Move the calling *thread* into the namespace ``fd`` refers to (setns(2))."""
    check(libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def unshare(flags: int) -> None:
    """Move the calling thread (or process) into new namespaces of the ``flags`` kinds."""
    check(libc.unshare(ctypes.c_int(flags)), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0,
          data: str | None = None) -> None:
    """mount(2); OSError names ``target``."""
    check(
        libc.mount(
            os.fsencode(source) if source is not None else None,
            os.fsencode(target),
            fstype.encode() if fstype is not None else None,
            ctypes.c_ulong(flags),
            data.encode() if data is not None else None,
        ),
        target,
    )


def umount2(target: str, flags: int = 0) -> None:
    """Unmount ``target`` (umount2(2)); OSError names the path."""
    check(libc.umount2(os.fsencode(target), ctypes.c_int(flags)), target)
