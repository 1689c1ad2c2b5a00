"""Entering network namespaces from test code.

``setns(CLONE_NEWNET)`` changes the namespace of the calling *thread* only, and every socket
the thread creates afterwards (and every process it spawns) lives in the new namespace. Tests
use this to run corral inside the world's ``host`` namespace without ``ip netns exec``.
The kernel details are corral's own (:mod:`corral.kernel.netns`); these are the named-netns
shapes the tests want.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from corral.kernel import netns as kernel_netns


@contextlib.contextmanager
def entered(netns: str) -> Iterator[None]:
    """Run the body of the ``with`` in the named netns (``/run/netns/<netns>``)."""
    with kernel_netns.entered(kernel_netns.path_of(netns)):
        yield


def enter_for_good(netns: str) -> int:
    """Move the calling thread into ``netns``; returns an fd of the old netns for ``leave``."""
    back = kernel_netns.open_current()
    try:
        kernel_netns.join_path(kernel_netns.path_of(netns))
    except BaseException:
        os.close(back)
        raise
    return back


def leave(back_fd: int) -> None:
    """Return the calling thread to the netns saved by ``enter_for_good``."""
    try:
        kernel_netns.join(back_fd)
    finally:
        os.close(back_fd)
