"""A sandbox's state on disk: ``$CORRAL_HOME/sandboxes/<name>/``.

The directory outlives every process that touches it, which is what lets ``Sandbox.get`` from
another process, ``corral ls`` and ``corral gc`` work without a daemon. Its files:

``state.json``
    What the sandbox was created with and where its live parts are (written atomically by the
    creating SDK process; rewritten only through :func:`write_state`).
``supervisor.pid``
    ``"<pid> <start time>"`` written by the supervisor as its first act. The start time (field
    22 of ``/proc/<pid>/stat``) tells a live supervisor from a recycled pid.
``stopped``
    Written by the supervisor after it has stopped the sandbox and released everything; it
    holds the reason. A dead supervisor without this file crashed: ``corral gc`` cleans up.
``control.sock``, ``supervisor.log``
    The supervisor's control socket and its stdout/stderr.

The status is *derived* from these files rather than stored, so that no crash can leave a
status that lies. Names are unique because the directory is created with ``mkdir`` (which
fails if it exists) while holding the name's lock (see :func:`name_lock`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.errors import ConfigError, SandboxError, SandboxExists, SandboxNotFound
from corral.kernel import procfs
from corral.kernel.files import replace_file
from corral.runtime import paths

#: Sandbox names: they become directory names, hostnames and cgroup/netns name parts, so they
#: are kept to DNS-label-like characters; 63 is the DNS label limit (hostname = sandbox name).
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")

STATE_FILE = "state.json"
PID_FILE = "supervisor.pid"
STOPPED_FILE = "stopped"
CONTROL_SOCKET = "control.sock"
LOG_FILE = "supervisor.log"
#: Output of detached commands (``run -d``); the launcher's COMMAND_LOG, written by them.
COMMAND_LOG = "command.log"

#: Version of the state.json layout; bump when a field changes meaning.
STATE_VERSION = 1

#: Statuses a sandbox can be in (derived, see the module docstring).
CREATING = "creating"
RUNNING = "running"
STOPPED = "stopped"
CRASHED = "crashed"
#: The directory is gone: the sandbox was removed (by this handle or another process).
REMOVED = "removed"


def validate_name(name: object) -> str:
    """``name`` if it is a valid sandbox name, else ConfigError naming the rule."""
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise ConfigError(
            "name",
            f"{name!r} is not a valid sandbox name (1 to 63 characters of a-z, 0-9, '_', '.', "
            "'-', starting with a letter or digit)",
        )
    return name


def sandbox_dir(name: str) -> Path:
    return paths.sandboxes_dir() / validate_name(name)


@dataclass
class SandboxState:
    """Everything ``state.json`` holds; see :mod:`corral.lifecycle.supervisor` for who reads it."""

    name: str
    image: str
    image_digest: str = ""
    #: The image's flattened read-only rootfs (the overlay's lower dir).
    rootfs: str = ""
    #: The NetworkConfig in its wire format (SPEC section 3).
    network: dict[str, Any] = field(default_factory=dict)
    #: True when the network config gives the sandbox no interface at all (preset none).
    offline: bool = True
    #: SecretEntry values in wire form; state.json is 0600 inside a 0700 directory.
    secrets: list[dict[str, Any]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: str = "0"
    cpus: float | None = None
    memory: int | None = None
    pids_max: int | None = None
    #: The image's Entrypoint and Cmd, used by ``corral run`` when no command is given.
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    #: The hostname inside the sandbox when it is not the name (``--hostname``).
    hostname: str | None = None
    #: Host paths mounted into the sandbox (corral.runtime.volumes.Volume.to_wire()).
    volumes: list[dict[str, Any]] = field(default_factory=list)
    #: The published ports as bound (a host port of 0 asked: the one the kernel chose),
    #: from the supervisor's ready message: {bind, host_port, guest_port, protocol}.
    published: list[dict[str, Any]] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    #: Remove the sandbox when it stops, or when the process that created it (``creator``:
    #: its pid and start time) dies; the supervisor enforces it (it watches a pidfd).
    auto_remove: bool = False
    creator: list[int] | None = None
    #: The network namespace the sandbox's host side lives in (the creator's): ``dev`` and
    #: ``ino`` of its nsfs file and, when it has one, its ``path`` under /run/netns. gc
    #: enters it to remove the veth, rules and nft table there.
    host_netns: dict[str, Any] | None = None
    #: Filled in from the supervisor's ready message.
    init_pid: int | None = None
    channel_path: str | None = None
    cgroup: str | None = None
    netns_path: str | None = None
    version: int = STATE_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = STATE_FILE) -> SandboxState:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SandboxError(f"{where}: unknown key {unknown[0]!r} (written by a newer corral?)")
        try:
            return cls(**data)
        except TypeError as exc:
            raise SandboxError(f"{where}: {exc}") from None


def write_state(directory: Path, state: SandboxState) -> None:
    """Replace ``state.json`` atomically (write a temporary file, fsync-free rename)."""
    replace_file(directory / STATE_FILE, (json.dumps(state.to_dict(), indent=1) + "\n").encode())


def read_state(name: str) -> SandboxState:
    """The state of sandbox ``name``; SandboxNotFound when there is none."""
    directory = sandbox_dir(name)
    path = directory / STATE_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SandboxNotFound(f"no sandbox named {name!r} (see 'corral ls')") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SandboxError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SandboxError(f"{path}: not a JSON object")
    return SandboxState.from_dict(data, str(path))


def list_names() -> list[str]:
    """Names of every sandbox directory, sorted (including half-created or crashed ones)."""
    root = paths.sandboxes_dir()
    return sorted(
        entry.name
        for entry in root.iterdir()
        if entry.is_dir() and NAME_PATTERN.fullmatch(entry.name)
    )


@contextlib.contextmanager
def name_lock(name: str) -> Iterator[None]:
    """Hold the exclusive lock of ``name`` (create, remove and gc of one name serialise here).

    The lock files live beside the sandbox directories (``.locks/``) and are never deleted:
    deleting a lock file that another process is about to lock would split the lock in two.
    """
    locks = paths.sandboxes_dir() / ".locks"
    locks.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(locks / f"{validate_name(name)}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def claim(name: str) -> Path:
    """Create the sandbox's directory; SandboxExists if the name is taken. Hold name_lock."""
    directory = sandbox_dir(name)
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        raise SandboxExists(
            f"a sandbox named {name!r} already exists (remove it with 'corral rm {name}')"
        ) from None
    return directory


# -- liveness -------------------------------------------------------------------------------


#: Start time of a running ``pid`` in clock ticks since boot; None if there is no such
#: process or it is a zombie (it has finished; only its exit status remains).
process_start_time = procfs.live_start_time


def read_supervisor_pid(directory: Path) -> tuple[int, int] | None:
    """(pid, start time) from ``supervisor.pid``, None if absent or unreadable."""
    try:
        pid_text, start_text = (directory / PID_FILE).read_text().split()
        return int(pid_text), int(start_text)
    except (FileNotFoundError, ValueError):
        return None


def supervisor_alive(directory: Path) -> bool:
    """True when the process recorded in ``supervisor.pid`` is still that process."""
    recorded = read_supervisor_pid(directory)
    if recorded is None:
        return False
    pid, start = recorded
    return process_start_time(pid) == start


def stopped_reason(directory: Path) -> str | None:
    try:
        return (directory / STOPPED_FILE).read_text().strip() or "stopped"
    except FileNotFoundError:
        return None


def status(directory: Path) -> str:
    """creating, running, stopped, crashed or removed (see the module docstring)."""
    if supervisor_alive(directory):
        if (directory / CONTROL_SOCKET).exists():
            return RUNNING
        # A supervisor that wrote "stopped" after removing its control socket has released
        # everything and is only exiting (its last sockets' close waits for the kernel, and
        # a stop does not wait for that); a start deletes a stale record before it spawns.
        return STOPPED if stopped_reason(directory) is not None else CREATING
    if stopped_reason(directory) is not None:
        return STOPPED
    if not directory.is_dir():
        return REMOVED
    return CRASHED
