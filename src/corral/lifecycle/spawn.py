"""Blocking lifecycle steps shared by the SDK and ``corral gc``: spawn, stop, remove, gc.

These run in the calling process (the SDK runs them in a worker thread). They talk to a
sandbox only through its directory (:mod:`corral.runtime.state`) and its supervisor's control
socket, so they work the same from the process that created the sandbox and from any other.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from corral import errors
from corral.errors import CorralError, SandboxError
from corral.lifecycle.forkserver import ForkServerClient
from corral.lifecycle.supervisor import READY_FD_ENV
from corral.runtime import leanjson, state

#: Seconds ``create`` waits for the supervisor's ready line: a cold sandbox with a network
#: is ready in well under a second; this bound only catches a hung start.
READY_TIMEOUT = 60.0

#: Seconds beyond the graceful stop timeout that we wait for a supervisor to exit.
EXIT_MARGIN = 10.0

#: Poll interval while waiting for a supervisor that is not our child to exit.
EXIT_POLL = 0.002

#: Set to 0 to start every supervisor as a fresh interpreter instead of forking it from this
#: process's fork server (slower; for debugging and for the benchmark's comparison).
FORK_SERVER_ENV = "CORRAL_FORK_SERVER"

_fork_server_client: ForkServerClient | None = None
_fork_server_lock = threading.Lock()

#: Supervisors this process started, so that their exit is reaped (no zombies) and noticed
#: without polling /proc.
_children: dict[int, subprocess.Popen[bytes]] = {}

def _bootstrap_code() -> str:
    """The ``-c`` program that starts a supervisor with ``-I -S`` and our import path.

    ``-S`` skips ``site`` (3-4 ms here) and with it the .pth files that make an editable
    install importable, so the supervisor gets the SDK process's own ``sys.path`` instead.
    """
    import corral

    root = str(Path(corral.__file__).resolve().parent.parent)
    extra = [p for p in sys.path if p and p != root]
    return (
        "import sys;"
        f"sys.path.insert(0,{root!r});"
        f"sys.path.extend({extra!r});"
        "from corral.lifecycle.supervisor import main;"
        "sys.exit(main())"
    )


def _fork_server() -> ForkServerClient | None:
    """This process's fork server (started on first use), or None when disabled."""
    global _fork_server_client
    if os.environ.get(FORK_SERVER_ENV, "1") == "0":
        return None
    with _fork_server_lock:
        if _fork_server_client is None or not _fork_server_client.usable():
            _fork_server_client = ForkServerClient(
                [sys.executable, "-I", "-S", "-c", _bootstrap_code()]
            )
        return _fork_server_client


def close_fork_server() -> None:
    """Stop this process's fork server now (it also stops by itself when this process exits).

    Supervisors it forked keep running; the next ``create`` starts a new fork server.
    """
    global _fork_server_client
    with _fork_server_lock:
        client, _fork_server_client = _fork_server_client, None
    if client is not None:
        client.close()


def _exec_supervisor(directory: Path, ready_fd: int) -> int:
    """Start a supervisor as a fresh interpreter (no fork server); returns its pid."""
    env = dict(os.environ)
    env[READY_FD_ENV] = str(ready_fd)
    with open(directory / state.LOG_FILE, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _bootstrap_code(), str(directory)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=(ready_fd,),
            start_new_session=True,
            env=env,
            cwd="/",
        )
    _children[proc.pid] = proc
    return proc.pid


def spawn_supervisor(directory: Path) -> dict[str, object]:
    """Start the supervisor of the sandbox in ``directory`` and wait for it to be ready.

    The supervisor is forked by this process's fork server (corral.lifecycle.forkserver) or,
    when that is disabled (``CORRAL_FORK_SERVER=0``) or broken, exec'd as a new interpreter.
    It runs in the network namespace of the calling thread. Returns the runtime fields of its
    ready message (init_pid, channel_path, cgroup, netns_path); a failed start raises the
    error class the supervisor reported, after the supervisor has exited.
    """
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        server = _fork_server()
        pid = None
        if server is not None:
            try:
                pid = server.fork_supervisor(str(directory), write_end)
            except (OSError, RuntimeError, ValueError):
                pid = None  # fall back to exec: slower, same supervisor
        if pid is None:
            pid = _exec_supervisor(directory, write_end)
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    try:
        line = _read_ready(read_end, directory)
    finally:
        os.close(read_end)
    status, _, detail = line.partition("\t")
    error_class: type[CorralError] = SandboxError
    if status == "ok":
        try:
            fields = leanjson.loads(detail)
        except ValueError:
            fields = None
        if isinstance(fields, dict):
            return fields
        detail = f"the supervisor sent a malformed ready message: {line!r}"
    elif status == "error":
        kind, _, detail = detail.partition("\t")
        found = getattr(errors, kind, None)
        if isinstance(found, type) and issubclass(found, CorralError):
            error_class = found
    else:
        tail = _log_tail(directory)
        detail = "the supervisor exited before it was ready" + (f" ({tail})" if tail else "")
    wait_supervisor_exit(pid, EXIT_MARGIN)
    if error_class is errors.ConfigError:
        raise errors.ConfigError("", f"sandbox {directory.name!r} did not start: {detail}")
    raise error_class(f"sandbox {directory.name!r} did not start: {detail}")


def _read_ready(fd: int, directory: Path) -> str:
    deadline = time.monotonic() + READY_TIMEOUT
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise SandboxError(
                f"sandbox {directory.name!r} did not start within {READY_TIMEOUT:g} s "
                f"(see {directory / state.LOG_FILE})"
            )
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode("utf-8", "replace").strip()


def _log_tail(directory: Path) -> str:
    try:
        lines = (directory / state.LOG_FILE).read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return ""
    return lines[-1][-300:] if lines else ""


def wait_supervisor_exit(pid: int, timeout: float) -> bool:
    """Wait until supervisor ``pid`` has exited (reaping it if it is our child)."""
    proc = _children.get(pid)
    if proc is not None:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        del _children[pid]
        return True
    deadline = time.monotonic() + timeout
    while state.process_start_time(pid) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(EXIT_POLL)
    return True


def is_child(pid: int) -> bool:
    """Whether supervisor ``pid`` was exec'd by this process (so must be reaped by it)."""
    return pid in _children


def reap(pid: int) -> None:
    """Collect the exit status of supervisor ``pid`` if it is our child and has exited."""
    proc = _children.get(pid)
    if proc is not None and proc.poll() is not None:
        del _children[pid]


def kill_supervisor(directory: Path) -> None:
    """SIGKILL a live supervisor (last resort of a forced remove); gc then cleans up."""
    recorded = state.read_supervisor_pid(directory)
    if recorded is None or not state.supervisor_alive(directory):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(recorded[0], signal.SIGKILL)
    wait_supervisor_exit(recorded[0], EXIT_MARGIN)

