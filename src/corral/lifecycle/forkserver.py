"""A per-SDK-process fork server that starts supervisors without paying Python's start-up.

Starting a supervisor as a fresh interpreter costs this machine's Python about 11 ms plus the
import of the launcher and what it pulls in (100+ ms here): far above the whole create ->
exec -> remove budget. So the SDK process starts, on its first ``create``, one fork server: an
exec'd, single-threaded interpreter that has imported the supervisor and the launcher once and
then only forks. Each fork becomes one sandbox's supervisor (its own session, stdio to the
sandbox's log, the environment and network namespace of the ``create`` call) and from then on
is exactly the supervisor that ``python -m corral.lifecycle.supervisor`` would be.

This is not a daemon: the fork server belongs to the SDK process that started it and exits
when that process closes the socket (or dies). Supervisors it forked are independent of it
and keep running. Forking happens only in this clean, thread-free process, never in the SDK's
(threads, event loops) - the reason PLATFORM.md gives for exec'ing a helper.

Wire protocol (SOCK_SEQPACKET socketpair, one message per request):
    request:  JSON {"state_dir": str, "env": {str: str}} with two fds attached: the write end
              of the creator's ready pipe and the creator's network namespace
    reply:    JSON {"pid": int} (the supervisor's pid) or {"error": str}
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time

from corral.kernel import netns
from corral.lifecycle.supervisor import FORK_SERVER_ARG
from corral.runtime import leanjson

TYPE_CHECKING = False
if TYPE_CHECKING:
    from corral.runtime.launcher import Zygote

#: Largest request: the creator's environment is sent along (a big CI environment is tens of
#: KiB); the kernel's default socket buffer (~208 KiB) bounds a SEQPACKET message anyway.
MAX_REQUEST = 192 * 1024

#: Seconds the fork server waits for its spare child to exit when it shuts down.
SPARE_EXIT_TIMEOUT = 5.0

#: Longest the server waits for a supervisor's RELEASED before it forks the next spare
#: anyway (a launch takes tens of ms; this only bounds a hung or dead one).
SPARE_DEFER_MAX = 1.0

#: Bytes on the server's pipe: a spare took a request; a supervisor has finished starting.
TAKEN = b"t"
RELEASED = b"r"

#: Set to 0 to have spare supervisors prepare no stage A ahead of time (launcher.Zygote):
#: every launch then makes its cgroup and moves its stage A itself (for comparison).
ZYGOTE_ENV = "CORRAL_ZYGOTE"

#: File descriptors attached to a request (ready pipe, netns).
REQUEST_FDS = 2


def serve(sock: socket.socket) -> int:
    """The fork server's main loop (runs in the exec'd helper process).

    The fork itself (copying the page tables of an interpreter with the launcher loaded, a
    few milliseconds here) is kept off the ``create`` path: the server always has one *spare*
    child already forked and blocked in ``recv`` on the request socket. The spare takes the
    next request, tells the server through a pipe (TAKEN), answers, and becomes that
    sandbox's supervisor. The server itself never reads the socket.

    The next spare is forked once that supervisor's launch is past its cgroup steps (it
    writes RELEASED to the same pipe; at the latest when it reports ready or fails), not at
    once: the new spare moves its zygote into a cgroup, which holds the kernel's cgroup lock
    for an RCU grace period, and the launch's own cgroup rename must not wait for that (nor,
    later, the rmdir of a stop, which a spare forked only at "ready" delayed by ~7 ms in the
    benchmark's create-exec-remove loop). A request that arrives while no spare exists (the
    socket turns readable) gets one forked at once, and SPARE_DEFER_MAX bounds the wait for
    a supervisor that never reports.
    """
    import gc
    import select
    import signal

    from corral.lifecycle import supervisor  # noqa: F401 - the point is to pre-import
    from corral.runtime import launcher  # noqa: F401

    # The network data path too (asyncio, policy, proxies, libnftables: ~75 ms to import here),
    # which every networked supervisor would otherwise import after the fork, on its create's
    # path. Shared copy-on-write with every supervisor, so offline ones pay no memory for it.
    with contextlib.suppress(ImportError):  # the supervisor reports a missing data path
        from corral.net import datapath, secret_handoff  # noqa: F401

    # The sandbox's seccomp filter, compiled once here (libseccomp, ~2 ms and its heap), not
    # in each spare before it forks its zygote (launcher.prepare_zygote).
    from corral.runtime import seccomp_profile

    with contextlib.suppress(ImportError, OSError, RuntimeError):  # the launch reports it
        seccomp_profile.compiled()

    # Supervisors are reaped by the kernel: this process never waits for them.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    gc.collect()
    gc.freeze()  # the imported modules stay shared, unwritten, with every supervisor
    # New objects of the supervisors go to fresh pools, not into this process's shared ones
    # (corral.lifecycle.poolfill: ~0.6 MiB less per sandbox); the fillers live while it does.
    from corral.lifecycle import poolfill

    _fillers = poolfill.fill()
    gc.freeze()
    taken_r, taken_w = os.pipe2(os.O_CLOEXEC)
    poller = select.poll()
    poller.register(sock.fileno(), 0)  # POLLHUP/POLLERR only while a spare reads requests
    poller.register(taken_r, select.POLLIN)
    spare = 0
    spare_fd = -1  # pidfd of the spare: one killed while waiting is replaced
    #: When the next spare must be forked at the latest (0: no spare owed).
    fork_by = 0.0
    while True:
        if spare == 0 and fork_by == 0.0:
            spare = os.fork()
            if spare == 0:
                os.close(taken_r)
                _serve_as_spare(sock, taken_w)
            poller.modify(sock.fileno(), 0)
            spare_fd = os.pidfd_open(spare)
            poller.register(spare_fd, select.POLLIN)
        timeout = None if fork_by == 0.0 else max(0.0, fork_by - time.monotonic()) * 1000
        events = poller.poll(timeout)
        if not events and fork_by:
            fork_by = 0.0  # a supervisor took too long (or died) before "released"
        for fd, mask in events:
            if fd == taken_r:
                for byte in os.read(taken_r, 64):
                    if byte == TAKEN[0]:
                        spare = 0
                        fork_by = time.monotonic() + SPARE_DEFER_MAX
                        # A request arriving before then must not wait for the deadline.
                        poller.modify(sock.fileno(), select.POLLIN)
                    elif byte == RELEASED[0] and spare == 0:
                        fork_by = 0.0
                if spare == 0 and spare_fd >= 0:
                    poller.unregister(spare_fd)  # a supervisor now; not watched by us
                    os.close(spare_fd)
                    spare_fd = -1
            elif fd == spare_fd:
                poller.unregister(spare_fd)
                os.close(spare_fd)
                spare_fd = -1
                if spare != 0:  # killed before it took a request: replace it now
                    spare = 0
                    fork_by = 0.0
            elif mask & (select.POLLHUP | select.POLLERR):
                # The SDK process closed its end: the spare sees EOF and exits; wait for
                # that, so that once this process is gone no process of it is left.
                _wait_gone(spare, SPARE_EXIT_TIMEOUT)
                return 0
            elif mask & select.POLLIN and spare == 0:
                fork_by = 0.0  # a request is waiting and no spare reads it: fork now


def _wait_gone(pid: int, timeout: float) -> None:
    import select

    if pid <= 0:
        return
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)


def _serve_as_spare(sock: socket.socket, taken_w: int) -> None:
    """In a spare child: wait for one valid request, then become its supervisor. Never
    returns (exits on EOF or becomes a supervisor that exits with os._exit)."""
    import signal

    # Supervisors wait for their children (the fork server lets the kernel reap its own).
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    zygote = _prepare_zygote()
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, MAX_REQUEST, REQUEST_FDS)
        except OSError:
            data = b""
        if not data:
            # The SDK process closed its end: done. The zygote and its cgroup go first, so
            # that once the fork server has waited for us, nothing of ours is left.
            if zygote is not None:
                zygote.discard()
            os._exit(0)
        try:
            request = leanjson.loads(data.decode())
            if not isinstance(request, dict) or len(fds) != REQUEST_FDS:
                raise ValueError("malformed fork request")
            state_dir, env = str(request["state_dir"]), request["env"]
            if not isinstance(env, dict):
                raise ValueError("malformed environment in fork request")
        except (ValueError, KeyError, UnicodeDecodeError) as exc:
            for fd in fds:
                os.close(fd)
            sock.send(leanjson.dumps({"error": str(exc)}).encode())
            continue
        break
    ready_fd, netns_fd = fds
    os.write(taken_w, TAKEN)
    sock.send(leanjson.dumps({"pid": os.getpid()}).encode())
    _become_supervisor(sock, state_dir, env, ready_fd, netns_fd, taken_w, zygote)


def _become_supervisor(
    sock: socket.socket,
    state_dir: str,
    env: dict[str, object],
    ready_fd: int,
    netns_fd: int,
    released_fd: int,
    zygote: Zygote | None,
) -> None:
    """In the forked child: detach, take the creator's context, run the supervisor. Never
    returns (os._exit: the fork server's own state must not be torn down twice)."""
    import signal

    from corral.lifecycle import supervisor

    status = 1
    try:
        sock.close()
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        netns.join(netns_fd)
        os.close(netns_fd)
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in env.items()})
        os.chdir("/")
        log = os.open(
            os.path.join(state_dir, "supervisor.log"),
            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
            0o600,
        )
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(devnull)
        os.close(log)
        status = supervisor.Supervisor(state_dir, ready_fd, released_fd, zygote).run()
    except BaseException as exc:
        if zygote is not None:
            zygote.discard()
        with contextlib.suppress(OSError):
            os.write(ready_fd, f"error\tSandboxError\tsupervisor fork failed: {exc!r}\n".encode())
    finally:
        try:
            sys.stderr.flush()
        finally:
            os._exit(status)


def _prepare_zygote() -> Zygote | None:
    """Stage A of the next sandbox, ahead of time (launcher.Zygote); None where that cannot
    be done (no cgroup access, say): the launch then does it on its own path, slower."""
    from corral.errors import SandboxError
    from corral.runtime import launcher

    if os.environ.get(ZYGOTE_ENV, "1") == "0":
        return None
    try:
        return launcher.prepare_zygote()
    except (SandboxError, OSError):
        return None  # silently slower: the launch reports any real cgroup problem itself


class ForkServerClient:
    """The SDK side: starts the fork server on first use and asks it for supervisors."""

    def __init__(self, argv: list[str]) -> None:
        import subprocess
        import threading

        self._lock = threading.Lock()
        self._owner = os.getpid()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [*argv, FORK_SERVER_ARG, str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
                cwd="/",
            )
        finally:
            theirs.close()
        self._sock = ours

    def usable(self) -> bool:
        """False after a fork of the SDK process or when the server has exited."""
        return os.getpid() == self._owner and self._proc.poll() is None

    def fork_supervisor(self, state_dir: str, ready_fd: int) -> int:
        """Ask for a supervisor of ``state_dir``; returns its pid. OSError/RuntimeError on
        failure (the caller falls back to exec'ing one)."""
        request = leanjson.dumps({"state_dir": state_dir, "env": dict(os.environ)}).encode()
        if len(request) > MAX_REQUEST:
            raise RuntimeError("environment too large for the fork server")
        caller_netns = netns.open_current()
        try:
            with self._lock:
                socket.send_fds(self._sock, [request], [ready_fd, caller_netns])
                reply = self._sock.recv(4096)
        finally:
            os.close(caller_netns)
        if not reply:
            raise RuntimeError("the fork server exited")
        answer = leanjson.loads(reply.decode())
        if not isinstance(answer, dict) or not isinstance(answer.get("pid"), int):
            raise RuntimeError(f"the fork server refused: {answer!r}")
        return int(answer["pid"])

    def close(self) -> None:
        self._sock.close()
        try:
            self._proc.wait(5)
        except Exception:
            self._proc.kill()
            self._proc.wait()
