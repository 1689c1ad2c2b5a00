"""Running a blocking lifecycle step from asyncio, in the caller's network namespace.

A supervisor is started in the network namespace of the thread that spawns it, and gc's
network clean-up works in the namespace it runs in; both must be the namespace of the code
that asked (a test inside its world's namespace, a tool under ``ip netns exec``), not the one
some pooled worker thread was created in. :func:`in_caller_netns` runs each step in a fresh
thread that joins that namespace first, and undoes a step whose caller was cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from corral.kernel import netns

T = TypeVar("T")


def current_netns() -> int:
    """A new descriptor of the calling thread's network namespace (close it when done)."""
    return netns.open_current()


#: The network namespace (an fd of it) of the code that called the SDK, when that is not the
#: thread running the event loop: the sync twin sets it, its loop thread being shared.
caller_netns: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "corral_caller_netns", default=None
)


async def in_caller_netns(
    func: Callable[..., T],
    *args: Any,
    undo: Callable[[T], object] | None = None,
    on_cancel: Callable[[], object] | None = None,
) -> T:
    """Run blocking ``func(*args)`` in a new thread that is in the caller's network namespace.

    Supervisors (and gc's network clean-up) must run in the network namespace of the code
    that asked for them - a test that entered its world's namespace, a tool that runs corral
    inside a netns - not in whatever namespace a pooled worker thread happened to be
    created in. A fresh thread starts in the namespace of the thread that creates it (here the
    event loop's) and, when the sync twin passed one, joins the caller's namespace first.

    If the awaiting task is cancelled (Ctrl-C during ``create``), ``func`` still runs to its
    end in its thread and then ``undo(result)`` runs there too, so nothing is left behind
    that nobody holds a handle on. ``on_cancel()`` is called (on the loop) at the cancel, so
    that ``func`` can stop early at a point where it holds nothing yet.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()
    netns_fd = caller_netns.get()
    lock = threading.Lock()
    flags = {"abandoned": False, "delivered": False}

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def body() -> None:
        try:
            if netns_fd is not None:
                netns.join(netns_fd)
            result = func(*args)
        except BaseException as exc:
            with lock:
                if flags["abandoned"]:
                    return
                flags["delivered"] = True
            with contextlib.suppress(RuntimeError):  # the loop may be gone
                loop.call_soon_threadsafe(settle, None, exc)
            return
        with lock:
            abandoned = flags["abandoned"]
            flags["delivered"] = not abandoned
        if abandoned:
            if undo is not None:
                undo(result)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, None)

    worker = threading.Thread(target=body, name="corral-step")
    worker.start()
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        with lock:
            flags["abandoned"] = True
            delivered = flags["delivered"]
        if on_cancel is not None:
            on_cancel()  # after "abandoned": func stopping on it is never delivered
        if delivered and undo is not None:
            # The result was already on its way to us: undo it here, after the thread.
            await asyncio.shield(asyncio.to_thread(_undo_delivered, worker, done, undo))
        raise


def _undo_delivered(
    worker: threading.Thread, done: asyncio.Future[T], undo: Callable[[T], object]
) -> None:
    worker.join()
    deadline = time.monotonic() + 1
    while not done.done() and time.monotonic() < deadline:
        time.sleep(0.001)
    if done.done() and not done.cancelled() and done.exception() is None:
        undo(done.result())
