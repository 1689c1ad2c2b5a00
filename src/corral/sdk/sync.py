"""``corral.sync.Sandbox``: the blocking twin of :class:`corral.Sandbox`, same names.

Every call runs the async SDK's coroutine on one private event loop that lives in a daemon
thread of this process (started on first use) and blocks until it finishes. One shared loop,
rather than ``asyncio.run`` per call, keeps a sandbox's channel connections alive between calls
(``asyncio.run`` would close them with its loop) and costs a thread hop (~50 us) per call.
Calling these methods from inside a running event loop works too (the loop is not ours), but
blocks that loop: use the async SDK there.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterable, Coroutine, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from corral.config import NetworkConfig, PortBinding, SecretEntry
from corral.lifecycle import sandboxes
from corral.lifecycle.access import FileInfo, Volume
from corral.lifecycle.steps import current_netns
from corral.sdk import sandbox as async_sdk
from corral.sdk.sandbox import ExecResult

T = TypeVar("T")

_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _run_here(coro: Coroutine[Any, Any, T]) -> T:
    """Like _run, but steps that start or clean up sandboxes run in the calling thread's
    network namespace rather than in the private loop thread's (see in_caller_netns)."""
    netns_fd = current_netns()

    async def in_callers_namespace() -> T:
        async_sdk.caller_netns.set(netns_fd)  # this task's context only
        return await coro

    try:
        return _run(in_callers_namespace())
    finally:
        os.close(netns_fd)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    global _loop
    with _loop_lock:
        if _loop is None or not _loop.is_running():
            loop = asyncio.new_event_loop()
            started = threading.Event()

            def serve() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(started.set)
                loop.run_forever()

            threading.Thread(target=serve, name="corral-sync", daemon=True).start()
            started.wait()
            _loop = loop
    return asyncio.run_coroutine_threadsafe(coro, _loop).result()


class ExecStream:
    """Blocking :class:`corral.ExecStream`: iterate for ``(stream, bytes)``, then ``wait()``."""

    def __init__(self, stream: async_sdk.ExecStream) -> None:
        self._stream = stream
        self.argv = stream.argv

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        iterator = self._stream.__aiter__()
        while True:
            try:
                yield _run(_anext(iterator))
            except StopAsyncIteration:
                return

    def wait(self) -> int:
        return _run(self._stream.wait())

    def kill(self) -> None:
        """SIGKILL everything the command started (returns once the request is sent);
        ``wait()`` then returns 137."""
        _run(_kill(self._stream))

    def send_signal(self, signum: int) -> None:
        _run(self._stream.send_signal(signum))

    def resize(self, rows: int, cols: int) -> None:
        _run(self._stream.resize(rows, cols))

    @property
    def timed_out(self) -> bool:
        return self._stream.timed_out

    @property
    def oom_killed(self) -> bool:
        return self._stream.oom_killed


async def _kill(stream: async_sdk.ExecStream) -> None:
    await stream.kill()


async def _anext(iterator: Any) -> Any:
    return await iterator.__anext__()


class SandboxFs:
    """Blocking :class:`corral.SandboxFs`."""

    def __init__(self, fs: async_sdk.SandboxFs) -> None:
        self._fs = fs

    def read(self, path: str) -> bytes:
        return _run(self._fs.read(path))

    def read_stream(self, path: str) -> Iterator[bytes]:
        iterator = self._fs.read_stream(path).__aiter__()
        while True:
            try:
                yield _run(_anext(iterator))
            except StopAsyncIteration:
                return

    def write(
        self, path: str, data: bytes | str, mode: int = 0o644, *, parents: bool = False
    ) -> None:
        _run(self._fs.write(path, data, mode, parents=parents))

    def list(self, path: str) -> list[FileInfo]:
        return _run(self._fs.list(path))

    def stat(self, path: str) -> FileInfo:
        return _run(self._fs.stat(path))

    def mkdir(self, path: str, parents: bool = False) -> None:
        _run(self._fs.mkdir(path, parents))

    def remove(self, path: str, recursive: bool = False) -> None:
        _run(self._fs.remove(path, recursive))

    def exists(self, path: str) -> bool:
        return _run(self._fs.exists(path))

    def copy_in(
        self, host_path: str | os.PathLike[str], path: str, *, archive: bool = False
    ) -> None:
        _run(self._fs.copy_in(host_path, path, archive=archive))

    def copy_out(
        self, path: str, host_path: str | os.PathLike[str], *, archive: bool = False
    ) -> None:
        _run(self._fs.copy_out(path, host_path, archive=archive))


class Sandbox:
    """Blocking :class:`corral.Sandbox`; see that class for what each method does."""

    def __init__(self, inner: async_sdk.Sandbox) -> None:
        self._inner = inner
        self.fs = SandboxFs(inner.fs)

    @property
    def name(self) -> str:
        return self._inner.name

    @property
    def image(self) -> str:
        return self._inner.image

    @property
    def state(self) -> sandboxes.SandboxState:
        return self._inner.state

    @property
    def network(self) -> NetworkConfig:
        return self._inner.network

    @property
    def status(self) -> str:
        return self._inner.status

    @property
    def directory(self) -> Path:
        return self._inner.directory

    def __repr__(self) -> str:
        return repr(self._inner)

    @classmethod
    def create(
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
        return cls(
            _run_here(
                async_sdk.Sandbox.create(
                    name,
                    image=image,
                    network=network,
                    ports=ports,
                    ports_udp=ports_udp,
                    port_bindings=port_bindings,
                    secrets=secrets,
                    env=env,
                    cpus=cpus,
                    memory=memory,
                    workdir=workdir,
                    auto_remove=auto_remove,
                    user=user,
                    hostname=hostname,
                    volumes=volumes,
                )
            )
        )

    @classmethod
    def get(cls, name: str) -> Sandbox:
        return cls(_run(async_sdk.Sandbox.get(name)))

    @classmethod
    def list(cls) -> list[Sandbox]:
        return [cls(s) for s in _run(async_sdk.Sandbox.list())]

    def info(self) -> dict[str, Any]:
        return _run(self._inner.info())

    def start(self) -> None:
        _run_here(self._inner.start())

    def stop(self, timeout: float = async_sdk.DEFAULT_STOP_TIMEOUT) -> None:
        _run_here(self._inner.stop(timeout))

    def remove(self, *, force: bool = True) -> None:
        _run_here(self._inner.remove(force=force))

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def exec(
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
        return _run(
            self._inner.exec(
                cmd, args, env=env, cwd=cwd, timeout=timeout, stdin=stdin, tty=tty,
                tty_size=tty_size, user=user,
            )
        )  # fmt: skip

    def exec_stream(
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
        return ExecStream(
            _run(
                self._inner.exec_stream(
                    cmd, args, env=env, cwd=cwd, timeout=timeout, stdin=stdin, tty=tty,
                    tty_size=tty_size, user=user,
                )
            )
        )  # fmt: skip

    def exec_detached(
        self,
        cmd: str,
        args: Sequence[str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> int:
        return _run(self._inner.exec_detached(cmd, args, env=env, cwd=cwd, user=user))

    def logs(self, *, follow: bool = False) -> Iterator[Any]:
        iterator = self._inner.logs(follow=follow).__aiter__()
        while True:
            try:
                yield _run(_anext(iterator))
            except StopAsyncIteration:
                return


__all__ = ["ExecResult", "ExecStream", "Sandbox", "SandboxFs"]
