"""The host-guest channel: exec and file operations over the init's unix socket.

Two layers, h11 style: the sans-I/O codec lives in :mod:`corral.runtime.channel_wire`
(shared with the init, re-exported here), and this module is the asyncio shell the SDK uses,
:class:`ChannelClient`.

One connection carries one request at a time. A file-system request is one CONTROL frame
answered by one CONTROL frame (``read``/``write`` add FILE frames), so its connection goes back
into the client's pool afterwards. An exec owns its connection until the command has exited,
then the connection is closed: the worker on the other side may still be holding pipes of
background processes. Concurrent requests simply use more connections; the init forks one
worker per connection. The full protocol is in docs/isolation.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.errors import SandboxError
from corral.runtime.channel_wire import (
    CONNECT_TIMEOUT,
    DEFAULT_TERMINAL_SIZE,
    EXIT_TIMED_OUT,
    FRAME_PREFIX,
    KIND_CONTROL,
    KIND_FILE,
    KIND_STDERR,
    KIND_STDIN,
    KIND_STDOUT,
    LIST_BATCH,
    MAX_CONTROL_SIZE,
    MAX_DATA_SIZE,
    MAX_SIGNAL,
    MAX_TERMINAL_DIMENSION,
    UNIX_PATH_MAX,
    ChannelProtocolError,
    Frame,
    FrameReader,
    encode_control,
    encode_data,
    error_from_reply,
    exec_signal,
    short_unix_path,
    terminal_size,
)

__all__ = [
    "CONNECT_TIMEOUT",
    "EXIT_TIMED_OUT",
    "FRAME_PREFIX",
    "KIND_CONTROL",
    "KIND_FILE",
    "KIND_STDERR",
    "KIND_STDIN",
    "KIND_STDOUT",
    "LIST_BATCH",
    "MAX_CONTROL_SIZE",
    "MAX_DATA_SIZE",
    "UNIX_PATH_MAX",
    "ChannelClient",
    "ChannelProtocolError",
    "ExecProcess",
    "FileInfo",
    "Frame",
    "FrameReader",
    "encode_control",
    "encode_data",
    "error_from_reply",
    "short_unix_path",
]


# --- client -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileInfo:
    """What ``stat``/``list_dir`` report (lstat semantics: a symlink is kind "symlink")."""

    path: str
    name: str
    kind: str  # "file" | "dir" | "symlink" | "other"
    size: int
    mode: int
    mtime: float
    #: Where a symlink points (as stored in the link); None for other kinds.
    target: str | None = None

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> FileInfo:
        try:
            target = obj.get("target")
            return cls(
                path=str(obj["path"]),
                name=str(obj["name"]),
                kind=str(obj["kind"]),
                size=int(obj["size"]),
                mode=int(obj["mode"]),
                mtime=float(obj["mtime"]),
                target=str(target) if target is not None else None,
            )
        except (KeyError, TypeError, ValueError):
            raise ChannelProtocolError(
                "the sandbox channel sent a malformed file entry"
            ) from None


#: Bytes read from the socket per call on the client side.
_READ_SIZE = 1024 * 1024


class _Connection:
    """One unix-socket connection to the init and the frames read from it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.frames = FrameReader()

    async def recv(self) -> Frame:
        while True:
            frame = self.frames.next_frame()
            if frame is not None:
                return frame
            try:
                data = await self.reader.read(_READ_SIZE)
            except ConnectionError:  # a write of ours met the init's end closed (it died)
                data = b""
            if not data:
                raise SandboxError(
                    "the sandbox closed the channel (it was stopped, or its init died)"
                )
            self.frames.feed(data)

    async def recv_control(self) -> dict[str, Any]:
        return (await self.recv()).control()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


async def _read_host_file(path: Path) -> AsyncIterator[bytes]:
    """A host file in MAX_DATA_SIZE pieces (blocking reads: local disk, small pieces)."""
    with open(path, "rb") as f:
        while piece := f.read(MAX_DATA_SIZE):
            yield piece


def _is_plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


async def _chunks(data: bytes | AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """Split bytes (or an async stream of bytes) into pieces that fit a data frame."""
    if isinstance(data, bytes | bytearray | memoryview):
        view = memoryview(data)
        for i in range(0, len(view), MAX_DATA_SIZE):
            yield bytes(view[i:i + MAX_DATA_SIZE])
        return
    async for piece in data:
        view = memoryview(piece)
        for i in range(0, len(view), MAX_DATA_SIZE):
            yield bytes(view[i:i + MAX_DATA_SIZE])


class ExecProcess:
    """A command running in the sandbox.

    ``async for stream, data in proc.output()`` yields ("stdout"|"stderr", bytes) as the
    command writes them; ``await proc.wait()`` gives the exit code (0-255; 128+N when killed
    by signal N; EXIT_TIMED_OUT when ``timeout`` expired, with ``timed_out`` set). Output not
    consumed before ``wait()`` is discarded.
    """

    def __init__(self, conn: _Connection, argv: Sequence[str], pid: int):
        self._conn = conn
        self.argv = list(argv)
        self.pid = pid  # pid inside the sandbox
        self.returncode: int | None = None
        self.timed_out = False
        self._stdin_task: asyncio.Task[None] | None = None

    async def _next(self) -> tuple[str, bytes] | None:
        if self.returncode is not None:
            return None
        try:
            frame = await self._conn.recv()
        except BaseException:
            self._finish()
            raise
        if frame.kind == KIND_STDOUT:
            return ("stdout", frame.body)
        if frame.kind == KIND_STDERR:
            return ("stderr", frame.body)
        reply = frame.control()
        if reply.get("t") != "exit":
            self._finish()
            raise ChannelProtocolError(
                f"the sandbox channel sent {reply.get('t')!r} during exec of {self.argv[0]!r}"
            )
        code = reply.get("code")
        if not isinstance(code, int):
            self._finish()
            raise ChannelProtocolError("the sandbox channel sent an exit without a code")
        self.returncode = code
        self.timed_out = bool(reply.get("timed_out"))
        self._finish()
        return None

    def _finish(self) -> None:
        if self._stdin_task is not None and not self._stdin_task.done():
            self._stdin_task.cancel()
        self._conn.close()

    async def output(self) -> AsyncIterator[tuple[str, bytes]]:
        while (item := await self._next()) is not None:
            if item[1]:
                yield item

    async def wait(self) -> int:
        while self.returncode is None:
            await self._next()
        assert self.returncode is not None
        return self.returncode

    async def kill(self) -> None:
        """SIGKILL everything the command started; ``wait()`` then reports 128+9."""
        await self._control({"op": "kill"})

    async def send_signal(self, signum: int) -> None:
        """Deliver signal ``signum`` to the command as a terminal would: to the terminal's
        foreground process group with ``tty``, else to the command's process group."""
        if exec_signal(signum) is None:
            raise SandboxError(f"{signum!r} is not a signal number (1..{MAX_SIGNAL})")
        await self._control({"op": "signal", "signum": int(signum)})

    async def resize(self, rows: int, cols: int) -> None:
        """Set the window size of the command's terminal (``tty`` execs; else ignored)."""
        if terminal_size(rows, cols) != (rows, cols):
            raise SandboxError(
                f"{rows!r}x{cols!r} is not a terminal size (rows and columns in "
                f"1..{MAX_TERMINAL_DIMENSION})"
            )
        await self._control({"op": "resize", "rows": rows, "cols": cols})

    async def _control(self, request: Mapping[str, Any]) -> None:
        if self.returncode is None:
            with contextlib.suppress(ConnectionError, SandboxError):
                await self._conn.send(encode_control(request))

    async def _feed_stdin(self, data: bytes | AsyncIterable[bytes]) -> None:
        try:
            async for piece in _chunks(data):
                if piece:
                    await self._conn.send(encode_data(KIND_STDIN, piece))
            await self._conn.send(encode_data(KIND_STDIN, b""))
        except (ConnectionError, OSError):
            pass  # the command exited (or the sandbox stopped); wait() reports it


class ChannelClient:
    """asyncio client of a sandbox's init; safe for many concurrent requests."""

    def __init__(self, path: Path, timeout: float = CONNECT_TIMEOUT):
        self.path = Path(path)
        self._timeout = timeout
        self._idle: list[_Connection] = []
        self._closed = False

    @classmethod
    async def connect(cls, path: Path, timeout: float = CONNECT_TIMEOUT) -> ChannelClient:
        client = cls(path, timeout)
        client._idle.append(await client._open())
        return client

    async def _open(self) -> _Connection:
        if self._closed:
            raise SandboxError(f"the channel client for {str(self.path)!r} is closed")
        try:
            with short_unix_path(self.path) as address:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(address), self._timeout
                )
        except TimeoutError:
            raise SandboxError(
                f"connect to the sandbox channel {str(self.path)!r}: timed out after "
                f"{self._timeout} s"
            ) from None
        except OSError as e:
            raise SandboxError(
                f"connect to the sandbox channel {str(self.path)!r}: {e.strerror or e} "
                "(is the sandbox running?)"
            ) from None
        return _Connection(reader, writer)

    async def _take(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.reader.at_eof() and not conn.writer.is_closing():
                return conn
            conn.close()
        return await self._open()

    def _give_back(self, conn: _Connection) -> None:
        if self._closed or conn.frames.buffered:
            conn.close()
        else:
            self._idle.append(conn)

    @contextlib.asynccontextmanager
    async def _lease(self) -> AsyncIterator[_Connection]:
        conn = await self._take()
        try:
            yield conn
        except BaseException:
            conn.close()
            raise
        self._give_back(conn)

    async def _call(self, request: Mapping[str, Any]) -> dict[str, Any]:
        async with self._lease() as conn:
            await conn.send(encode_control(request))
            reply = await conn.recv_control()
        if reply.get("t") == "error":
            raise error_from_reply(reply)
        return reply

    # --- exec ---------------------------------------------------------------------------------

    async def exec(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | AsyncIterable[bytes] | None = None,
        timeout: float | None = None,
        user: str | None = None,
        tty: bool = False,
        tty_size: tuple[int, int] | None = None,
    ) -> ExecProcess:
        """Start ``argv`` in the sandbox; raises SandboxError if it cannot start.

        ``env`` is merged over the sandbox's base environment; ``cwd`` defaults to the
        sandbox's workdir; ``user`` ("uid[:gid]" or a name from the sandbox's /etc/passwd)
        defaults to the sandbox's user. ``timeout`` (seconds) is enforced inside the sandbox:
        everything it started is killed and ``wait()`` returns EXIT_TIMED_OUT. ``tty`` runs
        it on a pty of its own (``tty_size`` = (rows, cols), default 24x80): its output,
        stderr included, comes as stdout, and ``resize`` changes the window.
        """
        if not argv:
            raise SandboxError("exec needs a command (argv is empty)")
        if timeout is not None and timeout <= 0:
            raise SandboxError(f"exec timeout must be positive, not {timeout}")
        request: dict[str, Any] = {
            "op": "exec",
            "argv": [str(a) for a in argv],
            "env": dict(env) if env else {},
            "cwd": cwd,
            "timeout": timeout,
            "stdin": stdin is not None,
            "user": user,
        }
        if tty:
            rows, cols = tty_size or DEFAULT_TERMINAL_SIZE
            if terminal_size(rows, cols) != (rows, cols):
                raise SandboxError(
                    f"tty_size {tty_size!r} is not (rows, columns) in 1..{MAX_TERMINAL_DIMENSION}"
                )
            request.update(tty=True, rows=rows, cols=cols)
        conn = await self._take()
        try:
            await conn.send(encode_control(request))
            reply = await conn.recv_control()
        except BaseException:
            conn.close()
            raise
        if reply.get("t") == "error":
            conn.close()
            raise error_from_reply(reply)
        if reply.get("t") != "started":
            conn.close()
            raise ChannelProtocolError(
                f"the sandbox channel answered exec with {reply.get('t')!r}"
            )
        proc = ExecProcess(conn, argv, int(reply.get("pid", 0)))
        if stdin is not None:
            proc._stdin_task = asyncio.get_running_loop().create_task(proc._feed_stdin(stdin))
        return proc

    # --- files --------------------------------------------------------------------------------

    async def read_file(self, path: str) -> AsyncIterator[bytes]:
        """Stream a file out of the sandbox in chunks of at most 256 KiB."""
        async with self._lease() as conn:
            await conn.send(encode_control({"op": "read", "path": path}))
            reply = await conn.recv_control()
            if reply.get("t") == "error":
                raise error_from_reply(reply)
            while True:
                frame = await conn.recv()
                if frame.kind == KIND_FILE:
                    if not frame.body:
                        break
                    yield frame.body
                    continue
                reply = frame.control()
                raise error_from_reply(reply)

    async def write_file(
        self, path: str, data: bytes | AsyncIterable[bytes], mode: int = 0o644
    ) -> None:
        """Write (replace atomically) a file in the sandbox, streaming ``data`` in chunks."""
        async with self._lease() as conn:
            await conn.send(encode_control({"op": "write", "path": path, "mode": mode}))
            reply = await conn.recv_control()
            if reply.get("t") == "error":
                raise error_from_reply(reply)
            async for piece in _chunks(data):
                if piece:
                    await conn.send(encode_data(KIND_FILE, piece))
            await conn.send(encode_data(KIND_FILE, b""))
            reply = await conn.recv_control()
        if reply.get("t") == "error":
            raise error_from_reply(reply)

    async def list_dir(self, path: str) -> list[FileInfo]:
        entries: list[FileInfo] = []
        async with self._lease() as conn:
            await conn.send(encode_control({"op": "list", "path": path}))
            while True:
                reply = await conn.recv_control()
                if reply.get("t") == "error":
                    raise error_from_reply(reply)
                raw = reply.get("entries")
                if not isinstance(raw, list):
                    raise ChannelProtocolError("the sandbox channel sent a listing without entries")
                entries.extend(FileInfo.from_wire(e) for e in raw)
                if not reply.get("more"):
                    break
        return entries

    async def stat(self, path: str) -> FileInfo:
        reply = await self._call({"op": "stat", "path": path})
        info = reply.get("info")
        if not isinstance(info, dict):
            raise ChannelProtocolError("the sandbox channel sent a stat reply without info")
        return FileInfo.from_wire(info)

    async def exists(self, path: str) -> bool:
        reply = await self._call({"op": "exists", "path": path})
        return bool(reply.get("exists"))

    async def mkdir(self, path: str, parents: bool = False) -> None:
        await self._call({"op": "mkdir", "path": path, "parents": parents})

    async def remove(self, path: str, recursive: bool = False) -> None:
        await self._call({"op": "remove", "path": path, "recursive": recursive})

    async def symlink(self, path: str, target: str) -> None:
        """Create a symlink at ``path`` pointing to ``target`` (resolved inside the sandbox)."""
        await self._call({"op": "symlink", "path": path, "target": target})

    # --- copy in/out (trees) -------------------------------------------------------------------

    async def copy_in(self, local: Path, dest: str) -> None:
        """Copy a host file or directory tree to ``dest`` in the sandbox.

        Files keep their permission bits, symlinks are recreated as symlinks (never
        followed), other kinds (devices, sockets, fifos) are skipped. Files are streamed.
        """
        local = Path(local)
        st = os.lstat(local)
        if stat.S_ISLNK(st.st_mode):
            await self.symlink(dest, os.readlink(local))
        elif stat.S_ISREG(st.st_mode):
            await self.write_file(dest, _read_host_file(local), mode=stat.S_IMODE(st.st_mode))
        elif stat.S_ISDIR(st.st_mode):
            if not await self.exists(dest):
                await self.mkdir(dest)
            for entry in sorted(os.scandir(local), key=lambda e: e.name):
                await self.copy_in(Path(entry.path), f"{dest.rstrip('/')}/{entry.name}")

    async def copy_out(self, src: str, local: Path) -> None:
        """Copy a file or directory tree from the sandbox to ``local`` (which must not exist).

        Everything the sandbox reports is untrusted: names are checked to be single path
        components, and the host side only ever *creates* entries (O_EXCL, O_NOFOLLOW, mkdir),
        so a symlink the sandbox planted is recreated as a link but never written through.
        """
        local = Path(local)
        if os.path.lexists(local):
            raise SandboxError(f"copy out: {str(local)!r} already exists on the host")
        info = await self.stat(src)
        await self._copy_out_entry(info, src, local)

    async def _copy_out_entry(self, info: FileInfo, src: str, local: Path) -> None:
        if info.kind == "dir":
            os.mkdir(local, 0o700)
            for entry in await self.list_dir(src):
                if not _is_plain_name(entry.name):
                    raise ChannelProtocolError(
                        f"the sandbox channel sent an unsafe entry name {entry.name!r}"
                    )
                await self._copy_out_entry(
                    entry, f"{src.rstrip('/')}/{entry.name}", local / entry.name
                )
            os.chmod(local, info.mode & 0o777)
        elif info.kind == "file":
            fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                async for chunk in self.read_file(src):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
                os.fchmod(fd, info.mode & 0o777)
            finally:
                os.close(fd)
        elif info.kind == "symlink" and info.target is not None:
            os.symlink(info.target, local)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    async def __aenter__(self) -> ChannelClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
