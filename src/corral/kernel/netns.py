"""Network namespaces: naming them as iproute2 does, and moving a thread into one.

``setns(CLONE_NEWNET)`` moves the calling *thread* only: every socket it creates afterwards,
and every process it spawns, lives in the new namespace, while the process's other threads
stay where they were. corral uses that in three ways: the data path writes a sysctl of a
sandbox's namespace from a short-lived thread; a supervisor (forked by the fork server, or
launched by the SDK) takes the network namespace of the thread that called ``create``; and
the launcher's stage A joins the sandbox's namespace before it creates the user namespace
(the other order gives EPERM, PLATFORM.md).

A thread that changed its namespace and is not moved back must not be reused for anything
else: :func:`entered` moves it back, or the caller ends the thread.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator

from corral.kernel import libc

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TypeVar

    T = TypeVar("T")

#: clone(2)/setns(2) namespace type of a network namespace.
CLONE_NEWNET = 0x40000000

#: Where iproute2 (``ip netns``) keeps named network namespaces (bind mounts of nsfs files).
NETNS_DIR = "/run/netns"

#: The calling thread's own network namespace (``/proc/self`` would name the main thread's).
THREAD_NETNS = "/proc/thread-self/ns/net"


def path_of(name: str) -> str:
    """The file of the named network namespace ``name`` (``ip netns add NAME``)."""
    return f"{NETNS_DIR}/{name}"


def open_current() -> int:
    """A close-on-exec descriptor of the calling thread's network namespace."""
    return os.open(THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)


def identity(path: str = THREAD_NETNS) -> tuple[int, int]:
    """(device, inode) of the namespace file ``path`` (default: the calling thread's): what
    tells namespaces apart (the same pair is the same namespace, whatever names it)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def join(fd: int) -> None:
    """Move the calling thread into the network namespace ``fd`` refers to."""
    libc.setns(fd, CLONE_NEWNET)


def join_path(path: str) -> None:
    """Move the calling thread into the network namespace whose file is ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        join(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def entered(path: str) -> Iterator[None]:
    """Run the body of the ``with`` in the network namespace at ``path``, then come back."""
    back = open_current()
    try:
        join_path(path)
        try:
            yield
        finally:
            join(back)
    finally:
        os.close(back)


def call_in_thread(path: str | None, func: Callable[[], T], *, new: bool = False) -> T:
    """``func()`` on a short-lived thread in another network namespace: the one at ``path``,
    or (``new``) a fresh one; its result, or its exception re-raised here.

    A thread of its own, so the caller's threads never leave their namespace; it ends right
    after (a thread that changed its namespace is never reused). Sockets ``func`` opens stay
    in that namespace; a namespace made with ``new`` lives on only if ``func`` bind-mounts
    it (``/proc/thread-self/ns/net``) somewhere or a socket or process keeps it.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            if new:
                libc.unshare(CLONE_NEWNET)
            elif path is not None:
                join_path(path)
            result.append(func())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=body, name="corral-netns")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
