"""The host's side of copying directory trees in and out of a sandbox (``corral cp``,
``fs.copy_in``/``copy_out`` of a directory): a tar stream over the init's channel.

The init's side is corral.runtime.tree_serve; the format corral.runtime.tarstream.

Into the sandbox (:func:`send_tree`) the host writes the archive, so it decides the owners:
the sandbox's root (0:0) unless ``archive`` keeps the host's numeric ids (those beyond the
sandbox's 65536 become 65534, nobody). Modes and mtimes are kept.

Out of the sandbox (:func:`receive_tree`) the archive is hostile input. The host side only
ever *creates*: every member's parent is walked component by component from the
destination's directory fd with ``O_NOFOLLOW`` (a symlink the sandbox sent is never
followed), every member is made with ``O_EXCL``/``mkdir``/``symlink`` (nothing existing is
written through; an existing name is an error, except that a single file copied onto an
existing regular file replaces it atomically, as ``cp`` would), member names must stay
under the one top name the host asked for, and set-uid/set-gid bits are dropped (a sandbox
must not be able to leave a set-uid binary on the host). Files belong to whoever runs corral
unless ``archive`` asks for the sandbox's numeric ids. A failed copy removes what it made.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
from collections.abc import AsyncGenerator, Generator
from pathlib import Path

from corral.errors import SandboxError
from corral.runtime.channel import ChannelClient
from corral.runtime.channel_wire import (
    KIND_FILE,
    MAX_DATA_SIZE,
    ChannelProtocolError,
    encode_control,
    encode_data,
    error_from_reply,
)
from corral.runtime.tarstream import (
    ARCHIVE_END,
    DIR,
    END_OF_ARCHIVE,
    ENTRY_END,
    FILE,
    SYMLINK,
    TarData,
    TarEntry,
    TarError,
    TarReader,
    encode_entry,
    member_path_parts,
    padding,
)

#: Ids beyond the sandbox's range become this one inside (the kernel's overflow id).
OVERFLOW_ID = 65534
#: Ids a sandbox has: 0..65535 (corral.runtime.images.idmap.ID_RANGE).
ID_RANGE = 65536

#: Bytes of archive handed to the channel per write: 1 MiB (4 frames), as other copies.
SEND_CHUNK = 4 * MAX_DATA_SIZE

#: Permission bits a file copied out of a sandbox may keep: no set-uid, no set-gid.
COPY_OUT_MODE_MASK = 0o1777


# --- into the sandbox ------------------------------------------------------------------------


def _sandbox_id(host_id: int, archive: bool) -> int:
    if not archive:
        return 0
    return host_id if 0 <= host_id < ID_RANGE else OVERFLOW_ID


def archive_of(
    local: Path, top: str | None, *, archive: bool = False
) -> Generator[bytes, None, None]:
    """A tar stream of ``local``: its first member named ``top`` or, with ``top=None``,
    the members are the entries of the directory ``local``. Blocking (run it in a thread)."""
    buffer = bytearray()

    def entries(path: Path, name: str, depth: int) -> Generator[bytes, None, None]:
        st = os.lstat(path)
        ids = {"uid": _sandbox_id(st.st_uid, archive), "gid": _sandbox_id(st.st_gid, archive)}
        common = {"mode": stat.S_IMODE(st.st_mode), "mtime": st.st_mtime, **ids}
        if stat.S_ISDIR(st.st_mode):
            if name:
                yield encode_entry(TarEntry(name, DIR, **common))  # type: ignore[arg-type]
            for child in sorted(os.listdir(path)):
                yield from entries(path / child, f"{name}/{child}" if name else child, depth + 1)
        elif stat.S_ISLNK(st.st_mode):
            yield encode_entry(TarEntry(name, SYMLINK, target=os.readlink(path), **common))  # type: ignore[arg-type]
        elif stat.S_ISREG(st.st_mode):
            with open(path, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                yield encode_entry(TarEntry(name, FILE, size=size, **common))  # type: ignore[arg-type]
                left = size
                while left:
                    chunk = f.read(min(left, SEND_CHUNK))
                    if not chunk:
                        raise OSError(5, f"{path} shrank while it was copied")
                    left -= len(chunk)
                    yield chunk
                yield padding(size)
        # Sockets, fifos and devices are left out.

    for piece in entries(local, top or "", 0):
        buffer += piece
        if len(buffer) >= SEND_CHUNK:
            yield bytes(buffer)
            buffer.clear()
    buffer += END_OF_ARCHIVE
    yield bytes(buffer)


async def send_tree(
    client: ChannelClient, local: Path, dest_dir: str, top: str | None, *, archive: bool = False
) -> None:
    """Copy ``local`` (file or directory) into the existing directory ``dest_dir`` of the
    sandbox, as ``top`` (or, with None, the directory's entries). SandboxError on failure."""
    stream = archive_of(local, top, archive=archive)
    async with client._lease() as conn:
        await conn.send(encode_control({"op": "tar_in", "path": dest_dir}))
        reply = await conn.recv_control()
        if reply.get("t") == "error":
            raise error_from_reply(reply)
        try:
            while (piece := await asyncio.to_thread(next, stream, None)) is not None:
                for i in range(0, len(piece), MAX_DATA_SIZE):
                    await conn.send(encode_data(KIND_FILE, piece[i : i + MAX_DATA_SIZE]))
        except OSError as exc:
            raise SandboxError(f"copy {local}: {exc.strerror or exc}") from None
        finally:
            stream.close()
        await conn.send(encode_data(KIND_FILE, b""))
        reply = await conn.recv_control()
    if reply.get("t") == "error":
        raise error_from_reply(reply)


# --- out of the sandbox ----------------------------------------------------------------------


class HostExtractor:
    """Creates an untrusted archive's members under a host directory (see the module
    docstring for the rules). Feed it a TarReader's events."""

    def __init__(self, dest_fd: int, top: str | None, *, archive: bool = False) -> None:
        self.dest_fd = dest_fd
        self.top = top
        self.archive = archive
        self.created: list[str] = []  # first-level names this extraction made
        self.dirs: list[tuple[list[str], TarEntry]] = []
        self._fd = -1
        self._tmp: tuple[int, str, str] | None = None  # (dir fd, temp name, final name)
        self._entry: TarEntry | None = None

    # -- walking --
    def _parent_fd(self, parts: list[str]) -> int:
        fd = os.dup(self.dest_fd)
        try:
            for part in parts[:-1]:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=fd)
                os.close(fd)
                fd = nxt
        except OSError:
            os.close(fd)
            raise
        return fd

    def _parts(self, entry: TarEntry) -> list[str]:
        parts = member_path_parts(entry.path)
        if not parts:
            raise TarError(f"tar member {entry.path!r} names no file")
        if self.top is not None and parts[0] != self.top:
            raise TarError(f"tar member {entry.path!r} is not under {self.top!r}")
        return parts

    # -- events --
    def begin(self, entry: TarEntry) -> None:
        parts = self._parts(entry)
        parent = self._parent_fd(parts)
        name = parts[-1]
        try:
            if entry.kind == DIR:
                os.mkdir(name, 0o700, dir_fd=parent)
                self._created(parts)
                self.dirs.append((parts, entry))
            elif entry.kind == FILE:
                self._entry = entry
                if len(parts) == 1 and self._is_regular_file(parent, name):
                    # A single file onto an existing file: replace it whole, as cp does.
                    tmp = f".{name}.corral-{os.getpid()}.part"
                    self._fd = os.open(tmp, _CREATE_FLAGS, 0o600, dir_fd=parent)
                    self._tmp = (os.dup(parent), tmp, name)
                else:
                    self._fd = os.open(name, _CREATE_FLAGS, 0o600, dir_fd=parent)
                    self._created(parts)
            elif entry.kind == SYMLINK:
                os.symlink(entry.target, name, dir_fd=parent)
                self._created(parts)
                if self.archive:
                    os.chown(name, entry.uid, entry.gid, dir_fd=parent, follow_symlinks=False)
                with contextlib.suppress(OSError):
                    os.utime(name, (entry.mtime, entry.mtime), dir_fd=parent,
                             follow_symlinks=False)
            else:
                raise ChannelProtocolError(
                    f"the sandbox sent {entry.path!r} of kind {entry.kind}, which corral "
                    "never asks for"
                )
        except FileExistsError:
            raise SandboxError(f"copy out: {'/'.join(parts)!r} already exists on the host") from None
        finally:
            os.close(parent)

    def _is_regular_file(self, parent: int, name: str) -> bool:
        try:
            return stat.S_ISREG(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return False

    def _created(self, parts: list[str]) -> None:
        if len(parts) == 1:
            self.created.append(parts[0])

    def data(self, chunk: bytes) -> None:
        if self._fd >= 0:
            view = memoryview(chunk)
            while view:
                view = view[os.write(self._fd, view):]

    def end(self) -> None:
        entry, self._entry = self._entry, None
        if self._fd < 0 or entry is None:
            return
        fd, self._fd = self._fd, -1
        try:
            if self.archive:
                os.fchown(fd, entry.uid, entry.gid)
            os.fchmod(fd, entry.mode & COPY_OUT_MODE_MASK)
            os.utime(fd, (entry.mtime, entry.mtime))
        finally:
            os.close(fd)
        if self._tmp is not None:
            dir_fd, tmp, final = self._tmp
            self._tmp = None
            try:
                os.rename(tmp, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            finally:
                os.close(dir_fd)

    def finish(self) -> None:
        """Directories' modes, owners and times, deepest first (they were made 0700)."""
        for parts, entry in sorted(self.dirs, key=lambda d: len(d[0]), reverse=True):
            parent = self._parent_fd(parts)
            try:
                fd = os.open(parts[-1], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=parent)
            finally:
                os.close(parent)
            try:
                if self.archive:
                    os.fchown(fd, entry.uid, entry.gid)
                os.fchmod(fd, entry.mode & COPY_OUT_MODE_MASK)
                os.utime(fd, (entry.mtime, entry.mtime))
            finally:
                os.close(fd)

    def abandon(self) -> None:
        """Remove what this extraction made (after a failure)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._tmp is not None:
            dir_fd, tmp, _final = self._tmp
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            os.close(dir_fd)
            self._tmp = None
        for name in self.created:
            with contextlib.suppress(OSError):
                st = os.stat(name, dir_fd=self.dest_fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(name, dir_fd=self.dest_fd)
                else:
                    os.unlink(name, dir_fd=self.dest_fd)


_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def apply(extractor: HostExtractor, reader: TarReader) -> bool:
    """Apply every event the reader has; True once the archive ended."""
    while (event := reader.next_event()) is not None:
        if event is ARCHIVE_END:
            return True
        if isinstance(event, TarEntry):
            extractor.begin(event)
        elif isinstance(event, TarData):
            extractor.data(event.data)
        elif event is ENTRY_END:
            extractor.end()
    return False


async def tar_out(client: ChannelClient, src: str, name: str) -> AsyncGenerator[bytes, None]:
    """The tar stream of the sandbox's ``src`` (named ``name`` inside it, "" for its
    entries), chunk by chunk as the channel carries it: the one reader of the ``tar_out``
    exchange, for the copy that extracts it and for ``corral cp NAME:SRC -`` that passes it
    through. The sandbox's own error, before or after the stream, is raised."""
    async with client._lease() as conn:
        await conn.send(encode_control({"op": "tar_out", "path": src, "name": name}))
        reply = await conn.recv_control()
        if reply.get("t") == "error":
            raise error_from_reply(reply)
        while True:
            frame = await conn.recv()
            if frame.kind != KIND_FILE:
                raise error_from_reply(frame.control())
            if not frame.body:
                break
            yield frame.body
        reply = await conn.recv_control()
    if reply.get("t") == "error":
        raise error_from_reply(reply)


async def receive_tree(
    client: ChannelClient, src: str, dest_dir: Path, top: str | None, *, archive: bool = False
) -> None:
    """Copy ``src`` out of the sandbox into the existing host directory ``dest_dir``, as
    ``top`` (or, with None, the entries of the sandbox directory ``src``)."""
    try:
        dest_fd = os.open(dest_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise SandboxError(f"copy out: cannot use {dest_dir}: {exc.strerror}") from None
    extractor = HostExtractor(dest_fd, top, archive=archive)
    reader = TarReader()
    ended = False
    try:
        async with contextlib.aclosing(tar_out(client, src, top if top else "")) as chunks:
            async for body in chunks:
                if ended:
                    continue  # bytes after the end of the archive are not looked at
                reader.feed(body)
                ended = await asyncio.to_thread(apply, extractor, reader)
        if not ended:
            reader.feed_eof()
            apply(extractor, reader)
        await asyncio.to_thread(extractor.finish)
    except TarError as exc:
        extractor.abandon()
        raise ChannelProtocolError(f"copy out of {src!r}: the sandbox sent {exc}") from None
    except OSError as exc:
        extractor.abandon()
        raise SandboxError(f"copy out of {src!r} to {dest_dir}: {exc.strerror or exc}") from None
    except BaseException:
        extractor.abandon()
        raise
    finally:
        os.close(dest_fd)
