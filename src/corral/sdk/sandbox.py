"""``corral.Sandbox``: the async SDK (SPEC section 1).

A :class:`Sandbox` is a handle on a sandbox directory (:mod:`corral.runtime.state`); the
sandbox itself lives in its supervisor process, so handles are cheap, any number of processes
can hold one (``Sandbox.get``), and the sandbox outlives the process that created it.

Exec and files go straight to the sandbox init's channel socket (not through the supervisor and
not over the network); lifecycle steps go to the supervisor's control socket. Blocking steps
(image resolution, spawning the supervisor, deleting a directory) run in a worker thread so the
caller's event loop keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import os
import posixpath
import re
import stat
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from corral.config import (
    NetworkConfig,
    NetworkPolicy,
    PortBinding,
    SecretEntry,
    refuse_unsupported,
    validate_secrets,
)
from corral.errors import ConfigError, PermissionDenied, SandboxError
from corral.kernel import procfs
from corral.lifecycle import gc, hostnetns, spawn
from corral.runtime import cgroupfs, control, state
from corral.runtime.channel import ChannelClient, ExecProcess, FileInfo
from corral.runtime.volumes import Volume, check_volumes

T = TypeVar("T")

#: Bytes per chunk when files stream between host and sandbox: large enough for few
#: round trips, small enough that a multi-GiB file never sits in memory.
COPY_CHUNK = 1024 * 1024

#: Seconds of grace a stop gives the sandbox's processes before they are killed.
DEFAULT_STOP_TIMEOUT = control.DEFAULT_STOP_TIMEOUT

#: Seconds a control request (other than stop) may take before the supervisor is deemed hung.
CONTROL_TIMEOUT = 10.0

#: Memory size units accepted by ``memory=`` (binary, as docker and cgroups use them).
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5}

#: A memory size as docker's ``RAMInBytes`` reads it: a decimal number (``1.5``), an
#: optional space, an optional unit letter, an optional ``i`` and ``b`` (``512MiB``, ``1gb``).
_SIZE_PATTERN = re.compile(r"([0-9]+(?:\.[0-9]+)?) ?([kmgtp]?)i?b?", re.IGNORECASE)

#: Smallest memory limit accepted. Measured here (2026-12): a busybox sandbox's init plus a
#: shell fail to start at 5 MiB now and then and start at 6 MiB (docker's own minimum is
#: 6 MB); the init's pages grow with its workers (one per concurrent exec or file
#: operation, a pty), so the floor leaves room for a few of those and a small command.
MIN_MEMORY = 16 * 1024 * 1024

#: Largest memory limit: cgroups store it as a signed 64-bit count of bytes.
MAX_MEMORY = 2**63 - 1


def parse_memory(value: int | str | None, field: str = "memory") -> int | None:
    """Bytes from ``268435456``, ``"256m"``, ``"1.5g"``, ``"512MiB"`` (docker's forms);
    None stays None. Below MIN_MEMORY is an error: such a sandbox could not start."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(field, f"{value!r} is not a memory size")
    if isinstance(value, int):
        amount = value
    elif isinstance(value, str):
        match = _SIZE_PATTERN.fullmatch(value.strip())
        if match is None:
            raise ConfigError(field, f"{value!r} is not a memory size (like 256m, 1.5g or 1g)")
        amount = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    else:
        raise ConfigError(field, f"{value!r} is not a memory size (like 256m, 1.5g or 1g)")
    if amount > MAX_MEMORY:
        raise ConfigError(field, f"{value!r} is larger than any memory limit the kernel takes")
    if amount < MIN_MEMORY:
        raise ConfigError(
            field,
            f"{value!r} is below the minimum of {MIN_MEMORY // 1024**2} MiB a sandbox needs "
            "to start",
        )
    return amount


#: Longest exec timeout, in seconds: the sandbox's init waits with epoll, whose timeout is
#: an int of milliseconds (INT_MAX ms, about 24.8 days); beyond it the wait itself fails.
MAX_EXEC_TIMEOUT = (2**31 - 1) // 1000


def check_timeout(value: float | int | None, field: str = "timeout") -> float | None:
    """``value`` as seconds if it is a number in (0, MAX_EXEC_TIMEOUT], else ConfigError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(field, f"{value!r} is not a number of seconds")
    if not 0 < value <= MAX_EXEC_TIMEOUT:  # NaN fails both comparisons
        raise ConfigError(
            field,
            f"{value!r} is not a timeout in seconds (more than 0, at most {MAX_EXEC_TIMEOUT}, "
            "about 24 days)",
        )
    return float(value)


def parse_cpus(value: float | int | str | None, field: str = "cpus") -> float | None:
    if value is None:
        return None
    try:
        cpus = float(value)
    except (TypeError, ValueError):
        raise ConfigError(field, f"{value!r} is not a number of CPUs") from None
    if isinstance(value, bool) or not 0.01 <= cpus <= (os.cpu_count() or 1) * 1.0:
        raise ConfigError(
            field, f"{value!r} is not a number of CPUs in 0.01..{os.cpu_count() or 1}"
        )
    return cpus


#: Capability bits (linux/capability.h) a sandbox's creation needs: namespaces, mounts and
#: cgroups (CAP_SYS_ADMIN), links, addresses and nftables (CAP_NET_ADMIN).
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21


def effective_capabilities(status_text: str | None = None) -> int:
    """The CapEff mask of this process (from /proc/self/status unless given)."""
    if status_text is None:
        with open("/proc/self/status") as f:
            status_text = f.read()
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def check_privileges(status_text: str | None = None) -> None:
    """PermissionDenied, one sentence, unless this process may create sandboxes."""
    caps = effective_capabilities(status_text)
    missing = [
        name
        for bit, name in ((CAP_SYS_ADMIN, "CAP_SYS_ADMIN"), (CAP_NET_ADMIN, "CAP_NET_ADMIN"))
        if not caps & (1 << bit)
    ]
    if missing:
        raise PermissionDenied(
            f"creating a sandbox needs root (or {' and '.join(missing)}); run corral as root"
        )


def _env_list_to_dict(entries: Iterable[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for entry in entries:
        key, sep, val = entry.partition("=")
        if sep and key:
            out[key] = val
    return out


def _check_env(env: Mapping[str, str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, val in (env or {}).items():
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise ConfigError(f"env[{key!r}]", "is not an environment variable name")
        if not isinstance(val, str) or "\0" in val:
            raise ConfigError(f"env[{key!r}]", f"{val!r} is not a string without NUL bytes")
        out[key] = val
    return out


def _resolve_secrets(
    secrets: Iterable[SecretEntry | Mapping[str, Any]] | None,
) -> tuple[SecretEntry, ...]:
    """Validate secrets and read ``from_env`` values now (the host's environment at create)."""
    entries = validate_secrets(secrets or ())
    resolved = []
    for i, entry in enumerate(entries):
        if entry.from_env is not None:
            value = os.environ.get(entry.from_env)
            if not value:
                raise ConfigError(
                    f"secrets[{i}].from_env",
                    f"the host environment variable {entry.from_env!r} is not set",
                )
            entry = dataclasses.replace(entry, value=value, from_env=None)
        resolved.append(entry)
    return tuple(resolved)


def _exec_argv(cmd: object, args: object) -> list[str]:
    """``[cmd, *args]``, or TypeError/ConfigError saying how the call should look."""
    if not isinstance(cmd, str):
        raise TypeError(f"cmd must be a str (the program), not {type(cmd).__name__}")
    if not cmd:
        raise ConfigError("cmd", "the command is empty")
    if args is None:
        return [cmd]
    if isinstance(args, str | bytes):
        raise TypeError(
            f"args must be a sequence of strings, not a {type(args).__name__}: write "
            f"exec({cmd!r}, [{args!r}]) (a str would be taken letter by letter)"
        )
    items = list(args)  # type: ignore[call-overload]
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(f"args[{i}] must be a str, not {type(item).__name__}")
    return [cmd, *items]


#: Exit code of a command killed by SIGKILL (128 + 9), which is what the OOM killer sends.
OOM_EXIT_CODE = 137


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """The outcome of :meth:`Sandbox.exec`."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    #: True when the command was SIGKILLed (exit 137) by the OOM killer because the sandbox
    #: hit its memory limit.
    oom_killed: bool = False

    @property
    def stdout_text(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class ExecStream:
    """A running command: iterate for ``(stream, bytes)`` chunks, then ``await wait()``.

    ``stream`` is ``"stdout"`` or ``"stderr"``. Chunks arrive as the command writes them.
    """

    def __init__(
        self, process: ExecProcess, argv: Sequence[str], oom_kills: Callable[[], int] | None = None
    ) -> None:
        self._process = process
        self.argv = list(argv)
        self._oom_kills = oom_kills
        self._oom_before = oom_kills() if oom_kills is not None else 0
        self._oom_killed = False
        self._kills: set[asyncio.Task[None]] = set()

    def __aiter__(self) -> AsyncIterator[tuple[str, bytes]]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[tuple[str, bytes]]:
        async for stream, data in self._process.output():
            yield str(stream), bytes(data)

    async def wait(self) -> int:
        """The command's exit code (128 + N when killed by signal N)."""
        code = await self._process.wait()
        if code == OOM_EXIT_CODE and self._oom_kills is not None:
            self._oom_killed = self._oom_kills() > self._oom_before
        return code

    @property
    def oom_killed(self) -> bool:
        """After :meth:`wait`: the command was killed because the memory limit was hit.

        Told by the sandbox's cgroup OOM-kill count growing while the command ran; with
        several commands running at once, one SIGKILLed by other means at the same moment
        could be reported too.
        """
        return self._oom_killed

    @property
    def timed_out(self) -> bool:
        """True when the exec's ``timeout`` expired and the command was killed."""
        return self._process.timed_out

    def kill(self) -> asyncio.Task[None]:
        """SIGKILL everything the command started; ``wait()`` then returns 137 (128 + 9).

        Works with or without ``await``, as the blocking twin's ``kill()`` does: the request
        is sent on the running loop at its next step (``await proc.kill()`` waits until it
        was sent). After the command has ended it does nothing.
        """
        task = asyncio.get_running_loop().create_task(self._process.kill())
        self._kills.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._kills.discard)
        return task

    async def send_signal(self, signum: int) -> None:
        """Deliver ``signum`` to the command as a terminal would: with ``tty`` to the
        terminal's foreground process group (the job in front of a shell), else to the
        command's process group. What the command does with it is its business; ``wait()``
        gives 128+N if it dies of it."""
        await self._process.send_signal(signum)

    async def resize(self, rows: int, cols: int) -> None:
        """Change the window size of a ``tty`` exec's terminal (the command gets SIGWINCH)."""
        await self._process.resize(rows, cols)


class SandboxFs:
    """Files inside a sandbox, through the channel (``sb.fs``)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    async def read(self, path: str) -> bytes:
        """The whole file (use :meth:`copy_out` or :meth:`read_stream` for large files)."""
        chunks = [chunk async for chunk in self.read_stream(path)]
        return b"".join(chunks)

    async def read_stream(self, path: str) -> AsyncIterator[bytes]:
        client = await self._sandbox._channel()
        async for chunk in client.read_file(path):
            yield bytes(chunk)

    async def write(
        self, path: str, data: bytes | str, mode: int = 0o644, *, parents: bool = False
    ) -> None:
        """Write (replace atomically) a file; ``parents=True`` first makes its missing
        parent directories, as ``mkdir -p`` would."""
        client = await self._sandbox._channel()
        payload = data.encode() if isinstance(data, str) else bytes(data)
        if parents:
            parent = posixpath.dirname(path)
            if parent and parent != "/":
                await client.mkdir(parent, True)
        await client.write_file(path, payload, mode)

    async def list(self, path: str) -> list[FileInfo]:
        client = await self._sandbox._channel()
        return await client.list_dir(path)

    async def stat(self, path: str) -> FileInfo:
        client = await self._sandbox._channel()
        return await client.stat(path)

    async def mkdir(self, path: str, parents: bool = False) -> None:
        client = await self._sandbox._channel()
        await client.mkdir(path, parents)

    async def remove(self, path: str, recursive: bool = False) -> None:
        client = await self._sandbox._channel()
        await client.remove(path, recursive)

    async def exists(self, path: str) -> bool:
        client = await self._sandbox._channel()
        return await client.exists(path)

    async def copy_in(
        self, host_path: str | os.PathLike[str], path: str, *, archive: bool = False
    ) -> None:
        """Copy a host file or directory tree to ``path`` in the sandbox, streamed.

        A file is written whole or not at all (COPY_CHUNK pieces). A directory becomes
        ``path`` (missing parents are made; an existing directory there is merged into,
        files in it replaced): files, directories and symlinks with their modes and mtimes, as a
        tar stream over the channel. Everything belongs to the sandbox's root unless
        ``archive`` keeps the host's numeric owners.
        """
        from corral.runtime import tree_copy

        source = Path(host_path)
        try:
            st = source.lstat()
        except OSError as exc:
            raise SandboxError(f"copy_in: cannot read {source}: {exc.strerror or exc}") from None
        client = await self._sandbox._channel()
        if stat.S_ISDIR(st.st_mode) or archive or stat.S_ISLNK(st.st_mode):
            info = await _stat_or_none(client, path)
            if info is not None and info.kind == "dir" and stat.S_ISDIR(st.st_mode):
                await tree_copy.send_tree(client, source, path, None, archive=archive)
            else:
                parent, name = posixpath.split(path.rstrip("/") or "/")
                if not name:
                    raise ConfigError("path", f"{path!r} names no file to copy to")
                if parent and parent != "/":
                    await client.mkdir(parent, True)
                await tree_copy.send_tree(client, source, parent or "/", name, archive=archive)
            return
        try:
            handle = open(source, "rb")  # noqa: SIM115 - closed by the generator below
        except OSError as exc:
            raise SandboxError(f"copy_in: cannot read {source}: {exc.strerror or exc}") from None

        async def chunks() -> AsyncIterator[bytes]:
            with handle:
                while True:
                    chunk = await asyncio.to_thread(handle.read, COPY_CHUNK)
                    if not chunk:
                        return
                    yield chunk

        await client.write_file(path, chunks(), st.st_mode & 0o7777)

    async def copy_out(
        self, path: str, host_path: str | os.PathLike[str], *, archive: bool = False
    ) -> None:
        """Copy a sandbox file or directory tree to ``host_path``, streamed.

        A file appears whole or not at all (an existing host file is replaced). A directory
        becomes ``host_path``, which must not exist (its parent must): what the sandbox sent
        is only ever created there, never written through, symlinks are recreated as links,
        set-uid/set-gid bits are dropped, and a failed copy removes what it made. Owned by
        whoever runs corral, or with ``archive`` by the sandbox's numeric ids.
        """
        from corral.runtime import tree_copy

        target = Path(host_path)
        client = await self._sandbox._channel()
        info = await client.stat(path)
        if info.kind == "dir" or archive:
            if info.kind == "dir" and os.path.lexists(target):
                raise SandboxError(f"copy_out: {target} already exists on the host")
            await tree_copy.receive_tree(
                client, path, target.parent, target.name, archive=archive
            )
            return
        tmp = target.with_name(f".{target.name}.corral-{os.getpid()}.part")
        try:
            with open(tmp, "wb") as out:
                async for chunk in self.read_stream(path):
                    await asyncio.to_thread(out.write, chunk)
            os.chmod(tmp, info.mode & 0o1777)
            os.replace(tmp, target)
        except OSError as exc:
            raise SandboxError(f"copy_out: cannot write {target}: {exc.strerror or exc}") from None
        finally:
            if tmp.exists():
                tmp.unlink()


async def _stat_or_none(client: ChannelClient, path: str) -> FileInfo | None:
    """``stat`` of a sandbox path, None when it does not exist."""
    if not await client.exists(path):
        return None
    return await client.stat(path)


class Sandbox:
    """A handle on one sandbox. Create with :meth:`create`, reattach with :meth:`get`."""

    def __init__(self, sandbox_state: state.SandboxState) -> None:
        self._state = sandbox_state
        self._directory = state.sandbox_dir(sandbox_state.name)
        self._client: ChannelClient | None = None
        self.fs = SandboxFs(self)

    # -- identity ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._state.name

    @property
    def image(self) -> str:
        return self._state.image

    @property
    def state(self) -> state.SandboxState:
        """What the sandbox was created with (a copy; changing it changes nothing)."""
        return dataclasses.replace(self._state)

    @property
    def network(self) -> NetworkConfig:
        return NetworkConfig.from_dict(self._state.network)

    @property
    def status(self) -> str:
        """``creating``, ``running``, ``stopped`` or ``crashed`` (read now, from disk)."""
        return state.status(self._directory)

    @property
    def directory(self) -> Path:
        return self._directory

    def __repr__(self) -> str:
        return f"<Sandbox {self.name!r} image={self.image!r} {self.status}>"

    # -- lifecycle --------------------------------------------------------------------------
    @classmethod
    async def create(
        cls,
        name: str,
        *,
        image: str,
        network: NetworkConfig | None = None,
        ports: Mapping[int, int] | None = None,
        ports_udp: Mapping[int, int] | None = None,
        port_bindings: Iterable[PortBinding | Mapping[str, Any]] | None = None,
        secrets: Iterable[SecretEntry | Mapping[str, Any]] | None = None,
        env: Mapping[str, str] | None = None,
        cpus: float | int | str | None = None,
        memory: int | str | None = None,
        workdir: str | None = None,
        auto_remove: bool = False,
        user: str | None = None,
        hostname: str | None = None,
        volumes: Iterable[str | Volume] | None = None,
    ) -> Sandbox:
        """Create and start a sandbox; returns once it accepts exec and files.

        ``user`` ("name", "uid" or "uid:gid", as docker's ``--user``) replaces the image's
        User for every command; ``hostname`` the hostname (default: the name); ``volumes``
        are ``"HOST:GUEST[:ro]"`` strings or ``Volume`` objects (see docs/sdk.md, Volumes).

        ``network=None`` means ``NetworkPolicy.public_only()``. ``memory`` takes bytes or
        ``"256m"``; ``cpus`` a fraction of CPUs. Errors are one sentence (ConfigError for a bad
        argument, ImageError for the image, SandboxExists for a taken name, SandboxError or
        NetworkError for a failed start) and leave nothing behind.

        ``auto_remove=True``: the sandbox is removed as soon as it stops (for any reason) or
        the process that created it dies, however it dies (SIGKILL included). Its supervisor
        watches this process through a pidfd, so it holds even when no ``finally`` runs.
        """
        state.validate_name(name)
        if not isinstance(image, str) or not image:
            raise ConfigError("image", f"{image!r} is not an image reference")
        config = NetworkPolicy.public_only() if network is None else network
        if not isinstance(config, NetworkConfig):
            raise ConfigError("network", f"{type(config).__name__} is not a NetworkConfig")
        if ports or ports_udp or port_bindings:
            config = config.merged_ports(ports, ports_udp, port_bindings)
        secret_list = list(secrets or ())
        refuse_unsupported(config, secret_list)
        resolved_secrets = _resolve_secrets(secret_list)
        user_env = _check_env(env)
        memory_bytes = parse_memory(memory)
        cpu_count = parse_cpus(cpus)
        if workdir is not None and (not isinstance(workdir, str) or not workdir.startswith("/")):
            raise ConfigError("workdir", f"{workdir!r} is not an absolute path")
        if not isinstance(auto_remove, bool):
            raise ConfigError("auto_remove", f"{auto_remove!r} is not True or False")
        options = _launch_options(user, hostname, volumes)
        check_privileges()
        # Set when the awaiting task is cancelled: a create cancelled while the image is
        # still being resolved stops before it claims the name, instead of starting a
        # whole sandbox only to take it down again (_abandon).
        cancelled = threading.Event()

        def prepare_and_start() -> state.SandboxState:
            prepared = _prepare_state(
                name,
                image,
                config,
                resolved_secrets,
                user_env,
                cpu_count,
                memory_bytes,
                workdir,
            )
            prepared = dataclasses.replace(prepared, **options)
            if auto_remove:
                prepared = dataclasses.replace(
                    prepared, auto_remove=True, creator=[os.getpid(), procfs.own_start_time()]
                )
            if cancelled.is_set():
                raise _CreateAbandoned  # nobody awaits it (dropped); nothing was claimed yet
            return _start(prepared, {e.env_var: str(e.value) for e in resolved_secrets})

        return cls(
            await in_caller_netns(prepare_and_start, undo=_abandon, on_cancel=cancelled.set)
        )

    @classmethod
    async def get(cls, name: str) -> Sandbox:
        """A handle on an existing sandbox (from any process); SandboxNotFound if none."""
        return cls(await asyncio.to_thread(state.read_state, name))

    @classmethod
    async def list(cls) -> list[Sandbox]:
        """Every sandbox under CORRAL_HOME (half-created ones without state are skipped)."""

        def read_all() -> list[state.SandboxState]:
            found = []
            for name in state.list_names():
                try:
                    found.append(state.read_state(name))
                except SandboxError:
                    continue
            return found

        return [cls(s) for s in await asyncio.to_thread(read_all)]

    async def info(self) -> dict[str, Any]:
        """State plus the live view: status, supervisor and init pids (JSON-ready)."""
        out: dict[str, Any] = self._state.to_dict()
        out["secrets"] = [
            {**s, "value": "<redacted>"} if "value" in s else s for s in out["secrets"]
        ]
        out["status"] = self.status
        out["directory"] = str(self._directory)
        recorded = state.read_supervisor_pid(self._directory)
        out["supervisor_pid"] = recorded[0] if recorded else None
        out["stopped_reason"] = state.stopped_reason(self._directory)
        from corral.net.secret_handoff import read_tls_summary

        # TLS interception: the CA fingerprint and secret names (never values).
        out["tls"] = read_tls_summary(self._directory)
        return out

    async def start(self) -> None:
        """Start a stopped (or crashed) sandbox again: same name, image, configuration and
        writable layer; a new init, so no process survives a stop. Running: nothing to do."""
        if self.status == state.RUNNING:
            return
        await self._close_channel()
        self._state = await in_caller_netns(_restart, self.name)

    async def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Stop the sandbox: SIGTERM to its processes, SIGKILL after ``timeout`` seconds.

        Stopping a stopped sandbox does nothing; a crashed one is cleaned up (as gc would).
        """
        await self._close_channel()
        status = self.status
        if status in (state.RUNNING, state.CREATING):
            recorded = state.read_supervisor_pid(self._directory)
            answered = False
            try:
                await control.call(
                    str(self._directory / state.CONTROL_SOCKET),
                    control.stop_request(timeout),
                    timeout + spawn.EXIT_MARGIN,
                )
                answered = True
            except SandboxError:
                # Stopping by itself (its init exited, a violation), it may have removed its
                # control socket already: then it is not an error, only an exit to wait for.
                if state.supervisor_alive(self._directory) and not _only_exiting(self._directory):
                    raise
            # A supervisor answers the stop once the sandbox's processes, cgroup, network and
            # lease are gone and "stopped" is written; what it still does after (close the
            # sockets whose close waits for the kernel, exit) holds nothing of the sandbox,
            # so its exit is not waited for, unless it is this process's child (reaped).
            if recorded is not None and (not answered or recorded[0] in spawn._children):
                await _wait_exit(*recorded, spawn.EXIT_MARGIN)
        elif status == state.CRASHED:
            await in_caller_netns(_collect_keeping_state, self.name)

    async def remove(self, *, force: bool = True) -> None:
        """Stop (if running) and delete the sandbox and its writable layer.

        With ``force=False`` a running sandbox is an error instead of being stopped.
        """
        if not force and self.status == state.RUNNING:
            raise SandboxError(
                f"sandbox {self.name!r} is running; stop it first or remove it with force"
            )
        await self.stop()
        await in_caller_netns(_remove, self.name)

    async def __aenter__(self) -> Sandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.remove()

    # -- exec -------------------------------------------------------------------------------
    async def _channel(self) -> ChannelClient:
        # Checked on every call (two small file reads): another process may have stopped it.
        status = self.status
        if status != state.RUNNING or not self._state.channel_path:
            await self._close_channel()
            raise SandboxError(
                f"sandbox {self.name!r} is {status}; it cannot run commands or reach files"
            )
        if self._client is None:
            self._client = await ChannelClient.connect(Path(self._state.channel_path))
        return self._client

    async def _close_channel(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def exec_stream(
        self,
        cmd: str,
        args: Sequence[str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | str | AsyncIterable[bytes] | None = None,
        tty: bool = False,
        tty_size: tuple[int, int] | None = None,
        user: str | None = None,
    ) -> ExecStream:
        """Start ``cmd args...`` in the sandbox and stream its output (see ExecStream).

        ``tty=True`` gives the command a terminal of its own (a pty in the sandbox, window
        ``tty_size`` = (rows, cols), default 24x80): its stdout and stderr both arrive as
        ``"stdout"`` chunks, with the terminal's line endings (``\\r\\n``); stdin bytes are
        typed into it (``b"\\x03"`` is Ctrl-C). ``user`` runs it as another user than the
        sandbox's (a name, uid or uid:gid).
        """
        argv = _exec_argv(cmd, args)
        timeout = check_timeout(timeout)
        if tty_size is not None and not tty:
            raise ConfigError("tty_size", "is only meaningful with tty=True")
        client = await self._channel()
        payload = stdin.encode() if isinstance(stdin, str) else stdin
        try:
            process = await client.exec(
                argv,
                env=_check_env(env) or None,
                cwd=cwd,
                stdin=payload,
                timeout=timeout,
                tty=tty,
                tty_size=tty_size,
                user=_check_user(user),
            )
        except SandboxError as exc:
            if str(exc).startswith("tty_size"):
                raise ConfigError("tty_size", str(exc).partition(" ")[2]) from None
            raise
        return ExecStream(process, argv, self._oom_kills)

    async def exec_detached(
        self,
        cmd: str,
        args: Sequence[str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> int:
        """Start ``cmd args...`` in the background (``corral run -d``, ``exec -d``) and
        return its pid in the sandbox. It outlives this call and this process: stdin is
        /dev/null, stdout and stderr are appended to ``sb.directory / "command.log"`` (a host
        file, what ``corral logs NAME`` prints), and the sandbox's init reaps it."""
        argv = _exec_argv(cmd, args)
        client = await self._channel()
        reply = await client._call(
            {
                "op": "exec_detached",
                "argv": argv,
                "env": _check_env(env),
                "cwd": cwd,
                "user": _check_user(user),
            }
        )
        return int(reply.get("pid", 0))

    def _oom_kills(self) -> int:
        """OOM kills in the sandbox's cgroup so far (0 when it cannot be read)."""
        # Imported here: the launcher's modules are not on the SDK's import path otherwise.
        from corral.runtime.cgroups import Cgroup
        from corral.runtime.launcher import CGROUP_RECORD

        try:
            record = (self._directory / CGROUP_RECORD).read_text()
            cgroupfs.ensure()  # another process's sandbox, seen from under ip netns exec
            return Cgroup.from_json(record).oom_kills()
        except (OSError, ValueError, KeyError, SandboxError):
            return 0

    async def exec(
        self,
        cmd: str,
        args: Sequence[str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | str | AsyncIterable[bytes] | None = None,
        tty: bool = False,
        tty_size: tuple[int, int] | None = None,
        user: str | None = None,
    ) -> ExecResult:
        """Run ``cmd args...`` to completion; stdout and stderr are collected separately
        (with ``tty=True`` both are the terminal's output, in ``stdout``)."""
        stream = await self.exec_stream(
            cmd, args, env=env, cwd=cwd, timeout=timeout, stdin=stdin, tty=tty, tty_size=tty_size,
            user=user,
        )  # fmt: skip
        out: list[bytes] = []
        err: list[bytes] = []
        async for which, data in stream:
            (err if which == "stderr" else out).append(data)
        code = await stream.wait()
        return ExecResult(code, b"".join(out), b"".join(err), oom_killed=stream.oom_killed)

    # -- logs -------------------------------------------------------------------------------
    async def logs(self, *, follow: bool = False) -> AsyncIterator[Any]:
        """The sandbox's network audit events (``corral.net.audit.AuditEvent``), oldest first.

        With ``follow`` the iterator waits for new events until the sandbox stops.
        """
        from corral.net import audit

        path = self._directory / audit.AUDIT_FILE
        if not follow:
            for event in await asyncio.to_thread(audit.read_events, path):
                yield event
            return
        iterator = audit.follow(path).__aiter__()
        while True:
            task = asyncio.ensure_future(iterator.__anext__())
            while not task.done():
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if not done and self.status != state.RUNNING:
                    task.cancel()
                    return
            try:
                yield task.result()
            except StopAsyncIteration:
                return


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
                from corral.kernel import netns

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


class _CreateAbandoned(Exception):
    """Stops a create whose caller was cancelled before the name was claimed."""


def _undo_delivered(
    worker: threading.Thread, done: asyncio.Future[T], undo: Callable[[T], object]
) -> None:
    worker.join()
    deadline = time.monotonic() + 1
    while not done.done() and time.monotonic() < deadline:
        time.sleep(0.001)
    if done.done() and not done.cancelled() and done.exception() is None:
        undo(done.result())


def _collect_keeping_state(name: str) -> list[str]:
    return gc.collect([name], keep_state=True)


def _abandon(sandbox_state: state.SandboxState) -> None:
    """Take down a sandbox whose create was cancelled after it started."""
    directory = state.sandbox_dir(sandbox_state.name)
    with state.name_lock(sandbox_state.name):
        spawn.kill_supervisor(directory)
        gc.release_leftovers(sandbox_state.name, directory)
        gc.remove_directory(directory)


async def _wait_exit(pid: int, start_time: int, timeout: float) -> None:
    """Wait (on the event loop, through a pidfd) until process ``pid`` started at
    ``start_time`` has exited; reap it if it is our child. Gives up after ``timeout``."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if state.process_start_time(pid) == start_time:  # not a recycled pid
            loop = asyncio.get_running_loop()
            exited = loop.create_future()

            def on_exit() -> None:
                if not exited.done():
                    exited.set_result(None)

            loop.add_reader(pidfd, on_exit)
            try:
                await asyncio.wait_for(exited, timeout)
            except TimeoutError:
                pass
            finally:
                loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)
    spawn.reap(pid)


# -- blocking steps (worker thread) ---------------------------------------------------------


_image_stores: dict[tuple[Path, tuple[str | None, ...]], Any] = {}
_image_stores_lock = threading.Lock()

#: Environment variables an ImageStore reads when it is built (registry trust and
#: credentials); a change of any of them gets a new store.
_IMAGE_STORE_ENV = (
    "CORRAL_INSECURE_REGISTRIES",
    "CORRAL_REGISTRY_CA_FILE",
    "CORRAL_REGISTRY_USER",
    "CORRAL_REGISTRY_PASSWORD",
    "CORRAL_REGISTRY_MIRROR",
)


def _image_store() -> Any:
    """One ImageStore per image directory and registry settings: building one (registry
    client, TLS context) costs tens of milliseconds, more than a whole sandbox start should."""
    from corral.runtime import paths
    from corral.runtime.images import ImageStore

    key = (paths.images_dir(), tuple(os.environ.get(v) for v in _IMAGE_STORE_ENV))
    with _image_stores_lock:
        store = _image_stores.get(key)
        if store is None:
            store = _image_stores[key] = ImageStore(key[0])
        return store


#: Hostnames: what the kernel takes (HOST_NAME_MAX 64) in RFC 1123 characters.
_HOSTNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

#: Longest ``user`` accepted: a name of /etc/passwd (32 on most systems) or "uid:gid".
MAX_USER_SPEC = 256


def _check_user(user: object, field: str = "user") -> str | None:
    if user is None:
        return None
    if (
        not isinstance(user, str)
        or not user
        or len(user) > MAX_USER_SPEC
        or user.count(":") > 1
        or any(c.isspace() or c in "\0/" for c in user)
    ):
        raise ConfigError(field, f"{user!r} is not a user (name, uid or uid:gid)")
    return user


def _launch_options(
    user: object, hostname: object, volumes: object
) -> dict[str, Any]:
    """The state fields of ``create``'s user, hostname and volumes, checked."""
    out: dict[str, Any] = {}
    if user is not None:
        out["user"] = _check_user(user)
    if hostname is not None:
        if not isinstance(hostname, str) or not _HOSTNAME.fullmatch(hostname):
            raise ConfigError(
                "hostname",
                f"{hostname!r} is not a hostname (1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit)",
            )
        out["hostname"] = hostname
    if volumes is not None:
        out["volumes"] = [v.to_wire() for v in check_volumes(volumes)]
    return out


def _resolve_image(image_ref: str) -> Any:
    """The image for ``image_ref``: a path (``./rootfs``, ``/abs/dir``, an OCI layout or a
    docker-save tar) is imported, cached by content; a name is looked up locally first."""
    from corral.runtime.images import local

    if local.looks_like_path(image_ref):
        return local.import_cached(_image_store(), Path(image_ref))
    return _image_store().resolve(image_ref)


def _prepare_state(
    name: str,
    image_ref: str,
    config: NetworkConfig,
    secrets: tuple[SecretEntry, ...],
    user_env: dict[str, str],
    cpus: float | None,
    memory: int | None,
    workdir: str | None,
) -> state.SandboxState:
    """Resolve the image (pulling it if needed) and compute what the supervisor launches."""
    image = _resolve_image(image_ref)
    image_config = image.config.get("config", image.config) or {}
    env = _env_list_to_dict(image_config.get("Env") or ())
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env.setdefault("HOME", "/root")
    env.update(user_env)
    for secret in secrets:
        assert secret.placeholder is not None
        env[secret.env_var] = secret.placeholder
    return state.SandboxState(
        name=name,
        image=image.reference,
        image_digest=image.digest,
        rootfs=str(image.rootfs),
        network=config.to_dict(),
        offline=config.is_offline,
        # Values never go into state.json: _start hands them to the supervisor, whose
        # memory is the only place they live (SPEC "Secrets and violations").
        secrets=[{k: v for k, v in s.to_dict().items() if k != "value"} for s in secrets],
        env=env,
        workdir=workdir or image_config.get("WorkingDir") or "/",
        user=image_config.get("User") or "0",
        cpus=cpus,
        memory=memory,
        entrypoint=list(image_config.get("Entrypoint") or []),
        cmd=list(image_config.get("Cmd") or []),
        created_at=time.time(),
    )


def _start(
    new_state: state.SandboxState, secret_values: dict[str, str] | None = None
) -> state.SandboxState:
    """Claim the name (after gc of a crashed namesake), write state, spawn, wait for ready.

    ``secret_values`` (env var -> value) go to the supervisor through a 0600 hand-off file
    in the state directory that it reads and unlinks before anything else (never in
    state.json; see docs/network.md "Secrets: where values live")."""
    name = new_state.name
    # Where this thread's mount namespace shows no cgroup hierarchy (ip netns exec), mount
    # it now, so that the note about it comes from the creating process.
    cgroupfs.ensure()
    new_state = dataclasses.replace(new_state, host_netns=hostnetns.identify())
    with state.name_lock(name):
        directory = state.sandbox_dir(name)
        if directory.exists() and state.status(directory) == state.CRASHED:
            gc.release_leftovers(name, directory)
            gc.remove_directory(directory)
        directory = state.claim(name)
        try:
            state.write_state(directory, new_state)
            if secret_values:
                from corral.net.secret_handoff import write_handoff

                write_handoff(directory, secret_values)
            new_state = _with_runtime(new_state, spawn.spawn_supervisor(directory))
            state.write_state(directory, new_state)
        except BaseException:
            spawn.kill_supervisor(directory)
            gc.release_leftovers(name, directory)
            gc.remove_directory(directory)
            raise
    return new_state


def _with_runtime(
    sandbox_state: state.SandboxState, ready: dict[str, object]
) -> state.SandboxState:
    """The state with the runtime fields of a supervisor's ready message."""
    return dataclasses.replace(
        sandbox_state,
        init_pid=int(ready.get("init_pid") or 0) or None,  # type: ignore[call-overload]
        channel_path=str(ready.get("channel_path") or "") or None,
        cgroup=str(ready.get("cgroup") or "") or None,
        netns_path=str(ready.get("netns_path") or "") or None,
        published=[dict(p) for p in ready.get("published") or () if isinstance(p, dict)],  # type: ignore[attr-defined]
    )


def _restart(name: str) -> state.SandboxState:
    with state.name_lock(name):
        directory = state.sandbox_dir(name)
        sandbox_state = state.read_state(name)
        status = state.status(directory)
        if status == state.RUNNING:
            return sandbox_state
        if status == state.CREATING:
            raise SandboxError(f"sandbox {name!r} is being started by another process")
        if status == state.CRASHED:
            gc.release_leftovers(name, directory)
        for leftover in (state.STOPPED_FILE, state.PID_FILE, state.CONTROL_SOCKET):
            (directory / leftover).unlink(missing_ok=True)
        # The network is built where this start runs, which may be another namespace.
        cgroupfs.ensure()
        sandbox_state = dataclasses.replace(sandbox_state, host_netns=hostnetns.identify())
        state.write_state(directory, sandbox_state)
        try:
            ready = spawn.spawn_supervisor(directory)
        except BaseException:
            if not (directory / state.STOPPED_FILE).exists():
                (directory / state.STOPPED_FILE).write_text("failed to start again\n")
            raise
        sandbox_state = _with_runtime(sandbox_state, ready)
        state.write_state(directory, sandbox_state)
        return sandbox_state


def _only_exiting(directory: Path) -> bool:
    """Whether the sandbox's supervisor, though still a live process, has finished.

    A supervisor's last steps are: release everything (its control socket first), write the
    ``stopped`` record, answer its stop waiters, exit. Its exit (closing a networked
    supervisor's sockets, freeing its memory) can outlast ``stop()``'s wait on a loaded
    machine; ``remove()`` then reported a stopped sandbox as "still running". A live
    supervisor with a ``stopped`` record and no control socket touches nothing of its
    directory any more (``start`` deletes a stale record, under the name's lock, before it
    spawns a new supervisor).
    """
    return (
        state.stopped_reason(directory) is not None
        and not (directory / state.CONTROL_SOCKET).exists()
    )


def _remove(name: str) -> None:
    with state.name_lock(name):
        directory = state.sandbox_dir(name)
        if not directory.exists():
            return
        if state.supervisor_alive(directory) and not _only_exiting(directory):
            raise SandboxError(f"sandbox {name!r} is still running; stop it before removing it")
        if state.status(directory) == state.CRASHED:
            gc.release_leftovers(name, directory)
        gc.remove_directory(directory, background=True)
