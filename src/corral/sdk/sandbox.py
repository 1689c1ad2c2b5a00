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
import dataclasses
import os
import posixpath
import re
import stat
import threading
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
from corral.lifecycle import access, sandboxes
from corral.lifecycle.access import ChannelClient, ExecProcess, FileInfo, Volume, check_volumes
from corral.lifecycle.steps import caller_netns, in_caller_netns

__all__ = ["caller_netns", "in_caller_netns"]  # the sync twin's and the tests' way in

T = TypeVar("T")

#: Bytes per chunk when files stream between host and sandbox: large enough for few
#: round trips, small enough that a multi-GiB file never sits in memory.
COPY_CHUNK = 1024 * 1024

#: Seconds of grace a stop gives the sandbox's processes before they are killed.
DEFAULT_STOP_TIMEOUT = sandboxes.DEFAULT_STOP_TIMEOUT

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
        source = Path(host_path)
        try:
            st = source.lstat()
        except OSError as exc:
            raise SandboxError(f"copy_in: cannot read {source}: {exc.strerror or exc}") from None
        client = await self._sandbox._channel()
        if stat.S_ISDIR(st.st_mode) or archive or stat.S_ISLNK(st.st_mode):
            info = await _stat_or_none(client, path)
            if info is not None and info.kind == "dir" and stat.S_ISDIR(st.st_mode):
                await access.send_tree(client, source, path, None, archive=archive)
            else:
                parent, name = posixpath.split(path.rstrip("/") or "/")
                if not name:
                    raise ConfigError("path", f"{path!r} names no file to copy to")
                if parent and parent != "/":
                    await client.mkdir(parent, True)
                await access.send_tree(client, source, parent or "/", name, archive=archive)
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
        target = Path(host_path)
        client = await self._sandbox._channel()
        info = await client.stat(path)
        if info.kind == "dir" or archive:
            if info.kind == "dir" and os.path.lexists(target):
                raise SandboxError(f"copy_out: {target} already exists on the host")
            await access.receive_tree(
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

    def __init__(self, sandbox_state: sandboxes.SandboxState) -> None:
        self._state = sandbox_state
        self._directory = sandboxes.sandbox_dir(sandbox_state.name)
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
    def state(self) -> sandboxes.SandboxState:
        """What the sandbox was created with (a copy; changing it changes nothing)."""
        return dataclasses.replace(self._state)

    @property
    def network(self) -> NetworkConfig:
        return NetworkConfig.from_dict(self._state.network)

    @property
    def status(self) -> str:
        """``creating``, ``running``, ``stopped`` or ``crashed`` (read now, from disk)."""
        return sandboxes.status(self._directory)

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
        sandboxes.validate_name(name)
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

        def prepare_and_start() -> sandboxes.SandboxState:
            prepared = sandboxes.prepare(
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
                    prepared, auto_remove=True, creator=sandboxes.creator_identity()
                )
            if cancelled.is_set():
                raise _CreateAbandoned  # nobody awaits it (dropped); nothing was claimed yet
            return sandboxes.start(prepared, {e.env_var: str(e.value) for e in resolved_secrets})

        return cls(
            await in_caller_netns(prepare_and_start, undo=sandboxes.abandon, on_cancel=cancelled.set)
        )

    @classmethod
    async def get(cls, name: str) -> Sandbox:
        """A handle on an existing sandbox (from any process); SandboxNotFound if none."""
        return cls(await asyncio.to_thread(sandboxes.read_state, name))

    @classmethod
    async def list(cls) -> list[Sandbox]:
        """Every sandbox under CORRAL_HOME (half-created ones without state are skipped)."""

        def read_all() -> list[sandboxes.SandboxState]:
            found = []
            for name in sandboxes.list_names():
                try:
                    found.append(sandboxes.read_state(name))
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
        # The supervisor's pid, why it stopped, TLS interception (never a secret's value).
        out.update(sandboxes.info(self._directory))
        return out

    async def start(self) -> None:
        """Start a stopped (or crashed) sandbox again: same name, image, configuration and
        writable layer; a new init, so no process survives a stop. Running: nothing to do."""
        if self.status == sandboxes.RUNNING:
            return
        await self._close_channel()
        self._state = await in_caller_netns(sandboxes.restart, self.name)

    async def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Stop the sandbox: SIGTERM to its processes, SIGKILL after ``timeout`` seconds.

        Stopping a stopped sandbox does nothing; a crashed one is cleaned up (as gc would).
        """
        await self._close_channel()
        if not await sandboxes.stop(self._directory, timeout) and self.status == sandboxes.CRASHED:
            await in_caller_netns(sandboxes.collect_crashed, self.name)

    async def remove(self, *, force: bool = True) -> None:
        """Stop (if running) and delete the sandbox and its writable layer.

        With ``force=False`` a running sandbox is an error instead of being stopped.
        """
        if not force and self.status == sandboxes.RUNNING:
            raise SandboxError(
                f"sandbox {self.name!r} is running; stop it first or remove it with force"
            )
        await self.stop()
        await in_caller_netns(sandboxes.remove, self.name)

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
        if status != sandboxes.RUNNING or not self._state.channel_path:
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
        return sandboxes.oom_kills(self._directory)

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
        if not follow:
            for event in await access.audit_events(self._directory):
                yield event
            return
        iterator = access.follow_audit(self._directory)
        while True:
            task = asyncio.ensure_future(iterator.__anext__())
            while not task.done():
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if not done and self.status != sandboxes.RUNNING:
                    task.cancel()
                    return
            try:
                yield task.result()
            except StopAsyncIteration:
                return


class _CreateAbandoned(Exception):
    """Stops a create whose caller was cancelled before the name was claimed."""


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
