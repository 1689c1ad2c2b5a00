"""A networked sandbox's create and remove start no helper process (issue 9).

The kernel's process events connector reports every fork and exec on the machine as it
happens (short-lived ones too, which polling /proc would miss). The test counts the execs of
its own process tree during a networked create -> exec -> remove: the one exec allowed is the
command inside the sandbox; an ``ip``, ``nft`` or ``ldconfig`` would be another.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading

import pytest

import corral.sync
from corral import NetworkPolicy
from corral.kernel import netns
from tests.integration.lifecycle_support import (  # noqa: F401 - fixtures
    corral_home_fixture,
    image_fixture,
    in_world_fixture,
    unique,
)
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.usefixtures("in_world"), pytest.mark.timeout(300)]

_NETLINK_CONNECTOR, _CN_IDX_PROC, _CN_VAL_PROC = 11, 1, 1

#: The connector exists in the initial network namespace only, and the test body runs in the
#: world's: the namespace this module was imported in (pytest's, at collection) is kept.
_IMPORTED_IN = os.open(netns.THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)
_LISTEN, _IGNORE = 1, 2
_FORK, _EXEC = 0x1, 0x2


def _descendants(root: int) -> set[int]:
    """``root`` and every process below it now (from /proc's parent links)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    raw = f.read()
            except OSError:
                continue
            parent[int(entry)] = int(raw[raw.rindex(b")") + 2 :].split()[1])
    found, grew = {root}, True
    while grew:
        more = {pid for pid, ppid in parent.items() if ppid in found} - found
        found |= more
        grew = bool(more)
    return found


class Execs:
    """Execs of the calling process's descendants, below or outside a sandbox's init."""

    def __init__(self) -> None:
        self.tree = _descendants(os.getpid())  # the fork server already runs
        self.children: dict[int, list[int]] = {}
        self.events: list[int] = []  # pids that exec'd
        self.lock = threading.Lock()
        # Opened from a thread in the namespace the module was imported in; it stays there.
        self.sock = netns.call_in_thread(f"/proc/self/fd/{_IMPORTED_IN}", self._open)
        self._control(_LISTEN)
        threading.Thread(target=self._read, daemon=True).start()

    @staticmethod
    def _open() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_CONNECTOR)
        sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE
        sock.bind((0, _CN_IDX_PROC))
        return sock

    def _control(self, op: int) -> None:
        body = struct.pack("=I", op)
        cn = struct.pack("=IIIIHH", _CN_IDX_PROC, _CN_VAL_PROC, 0, 0, len(body), 0) + body
        self.sock.send(struct.pack("=IHHII", 16 + len(cn), 3, 0, 0, 0) + cn)

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if len(data) < 60:
                continue
            (what,) = struct.unpack_from("=I", data, 36)
            with self.lock:
                if what == _FORK:
                    _pp, ptgid, cpid, ctgid = struct.unpack_from("=IIII", data, 52)
                    if ptgid in self.tree and cpid == ctgid:
                        self.tree.add(ctgid)
                        self.children.setdefault(ptgid, []).append(ctgid)
                elif what == _EXEC:
                    _pid, tgid = struct.unpack_from("=II", data, 52)
                    if tgid in self.tree:
                        self.events.append(tgid)

    def saw(self, pid: int) -> bool:
        """Whether the reader has read an exec of ``pid``."""
        with self.lock:
            return pid in self.events

    def outside(self, init_pid: int) -> list[int]:
        """Pids that exec'd and are not the sandbox's init or below it."""
        with self.lock:
            inside, todo = set(), [init_pid]
            while todo:
                p = todo.pop()
                inside.add(p)
                todo += self.children.get(p, [])
            return [p for p in self.events if p not in inside]

    def close(self) -> None:
        self._control(_IGNORE)
        self.sock.close()


def test_a_networked_create_exec_remove_starts_no_helper_process(image: str) -> None:
    # Warm-up: the SDK process's fork server is itself an exec (once per SDK process).
    with corral.sync.Sandbox.create(unique("warm"), image=image, network=NetworkPolicy.none()):
        pass
    execs = Execs()
    try:
        sb = corral.sync.Sandbox.create(
            unique("noexec"), image=image, network=NetworkPolicy.public_only()
        )
        init_pid = int(sb.state.init_pid or 0)
        assert sb.exec("true").exit_code == 0
        sb.remove()
        # A marker exec of our own, after everything above: the kernel queued the events of
        # the create and remove before it, so once the reader has seen it, it has read them
        # all (a fixed sleep for the reader could end before it ran, on a loaded machine).
        marker = subprocess.Popen(["true"])
        marker.wait()
        wait_for(lambda: execs.saw(marker.pid), timeout=30, what="the marker exec's event")
        assert init_pid and [p for p in execs.outside(init_pid) if p != marker.pid] == []
        assert len(execs.events) >= 1  # the command itself: the counter does see execs
    finally:
        execs.close()
