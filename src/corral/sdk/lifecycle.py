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
import time
from pathlib import Path

from corral import errors
from corral.errors import CorralError, SandboxError
from corral.runtime import leanjson, state
from corral.runtime.supervisor import READY_FD_ENV

#: Seconds ``create`` waits for the supervisor's ready line: a cold sandbox with a network
#: is ready in well under a second; this bound only catches a hung start.
READY_TIMEOUT = 60.0

#: Seconds beyond the graceful stop timeout that we wait for a supervisor to exit.
EXIT_MARGIN = 10.0

#: Poll interval while waiting for a supervisor that is not our child to exit.
EXIT_POLL = 0.002

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
        "from corral.runtime.supervisor import main;"
        "sys.exit(main())"
    )


def spawn_supervisor(directory: Path) -> dict[str, object]:
    """Start the supervisor of the sandbox in ``directory`` and wait for it to be ready.

    Returns the runtime fields of its ready message (init_pid, channel_path, cgroup,
    netns_path); a failed start raises SandboxError with the supervisor's sentence, after
    the supervisor has exited.
    """
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    env = dict(os.environ)
    env[READY_FD_ENV] = str(write_end)
    try:
        with open(directory / state.LOG_FILE, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _bootstrap_code(), str(directory)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(write_end,),
                start_new_session=True,
                env=env,
                cwd="/",
            )
    finally:
        os.close(write_end)
    _children[proc.pid] = proc
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
    wait_supervisor_exit(proc.pid, EXIT_MARGIN)
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


def kill_supervisor(directory: Path) -> None:
    """SIGKILL a live supervisor (last resort of a forced remove); gc then cleans up."""
    recorded = state.read_supervisor_pid(directory)
    if recorded is None or not state.supervisor_alive(directory):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(recorded[0], signal.SIGKILL)
    wait_supervisor_exit(recorded[0], EXIT_MARGIN)
