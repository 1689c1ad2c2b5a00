"""Entering network namespaces from test code.

``setns(CLONE_NEWNET)`` changes the namespace of the calling *thread* only, and every socket
the thread creates afterwards (and every process it spawns) lives in the new namespace. Tests
use this to run corral inside the world's ``host`` namespace without ``ip netns exec``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


@contextlib.contextmanager
def entered(netns: str) -> Iterator[None]:
    """Run the body of the ``with`` in the named netns (``/run/netns/<netns>``)."""
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(back)
    finally:
        os.close(target)
        os.close(back)


def enter_for_good(netns: str) -> int:
    """Move the calling thread into ``netns``; returns an fd of the old netns for ``leave``."""
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        _setns(target)
    finally:
        os.close(target)
    return back


def leave(back_fd: int) -> None:
    """Return the calling thread to the netns saved by ``enter_for_good``."""
    try:
        _setns(back_fd)
    finally:
        os.close(back_fd)
