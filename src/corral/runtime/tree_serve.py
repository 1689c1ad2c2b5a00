"""The init's side of copying directory trees: the ``tar_out`` and ``tar_in`` operations.

Runs inside the sandbox, in a worker of its init (corral.runtime.init), so the rules of that
module hold here too: everything is imported at the top (the init empties ``sys.path``
after the pivot), nothing goes through NSS (owners travel as numbers), no threads.

``tar_out {path, name}``
    Reply ``{"t": "ok"}`` (or an error if ``path`` cannot be looked at), then a tar stream
    (corral.runtime.tarstream) of ``path`` as FILE frames, its first member named ``name``
    (``""``: the members are the directory's entries, for ``cp SRC/.``), an empty FILE frame,
    and a last reply: ``ok``, or the first error met (an unreadable file is left out, a file
    that shrank while read is padded with zeros, and the error names it). Regular files,
    directories and symlinks are sent; sockets, fifos and devices are left out.
``tar_in {path}``
    ``path`` is an existing directory; reply ``{"t": "ready"}``, read FILE frames (a tar
    stream, empty frame = end) and extract them under ``path`` as the sandbox's root would:
    existing files and links are replaced, directories merged; owners, modes and mtimes as
    the archive says (the host chose them). Then ``ok`` or the first error.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from corral.runtime.channel_wire import KIND_FILE, MAX_DATA_SIZE, Frame
from corral.runtime.tarstream import (
    ARCHIVE_END,
    DIR,
    ENTRY_END,
    FILE,
    HARDLINK,
    SYMLINK,
    TarData,
    TarEntry,
    TarError,
    TarReader,
    encode_entry,
    member_path_parts,
    padding,
)

#: Directories nested deeper than this are not followed by tar_out: a bound on the
#: recursion of a walk through a tree the sandbox controls (PATH_MAX allows ~2048 levels
#: of one-letter names; real trees stay far below 256).
MAX_DEPTH = 256


class _Peer(Protocol):
    """What these operations need of the init's Worker."""

    def recv(self) -> Frame: ...

    def send_data(self, kind: int, data: bytes | memoryview) -> None: ...

    def reply(self, **obj: Any) -> None: ...

    def error(self, op: str, subject: str, exc: OSError | None = None, kind: str = "") -> None: ...

    def path_of(self, request: Mapping[str, Any]) -> str: ...


class _FrameSink:
    """Collects tar bytes and sends them in FILE frames of at most MAX_DATA_SIZE."""

    def __init__(self, peer: _Peer) -> None:
        self.peer = peer
        self.buf = bytearray()

    def write(self, data: bytes | memoryview) -> None:
        self.buf += data
        while len(self.buf) >= MAX_DATA_SIZE:
            self.peer.send_data(KIND_FILE, bytes(self.buf[:MAX_DATA_SIZE]))
            del self.buf[:MAX_DATA_SIZE]

    def flush(self) -> None:
        if self.buf:
            self.peer.send_data(KIND_FILE, bytes(self.buf))
            self.buf.clear()


def tar_out(peer: _Peer, request: Mapping[str, Any]) -> bool | None:
    path = peer.path_of(request)
    name = str(request.get("name", os.path.basename(path.rstrip("/")) or "root"))
    try:
        st = os.lstat(path)
        if name:
            member_path_parts(name)
        elif not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory")
    except OSError as e:
        peer.error("tar_out", path, e)
        return None
    except TarError as e:
        peer.error("tar_out", name, OSError(errno.EINVAL, str(e)))
        return None
    peer.reply(t="ok")
    sink = _FrameSink(peer)
    failures: list[tuple[str, OSError]] = []
    if name:
        _send_entry(sink, path, name, st, failures, 0)
    else:
        _send_children(sink, path, "", failures, 0)
    sink.write(b"\0" * 1024)
    sink.flush()
    peer.send_data(KIND_FILE, b"")
    if failures:
        where, exc = failures[0]
        peer.error("tar_out", where, exc)
    else:
        peer.reply(t="ok")
    return None


def _send_children(
    sink: _FrameSink, path: str, prefix: str, failures: list[tuple[str, OSError]], depth: int
) -> None:
    try:
        with os.scandir(path) as it:
            names = sorted(entry.name for entry in it)
    except OSError as e:
        failures.append((path, e))
        return
    for child in names:
        full = os.path.join(path, child)
        try:
            st = os.lstat(full)
        except OSError as e:
            failures.append((full, e))
            continue
        _send_entry(sink, full, f"{prefix}{child}", st, failures, depth + 1)


def _send_entry(
    sink: _FrameSink,
    path: str,
    name: str,
    st: os.stat_result,
    failures: list[tuple[str, OSError]],
    depth: int,
) -> None:
    mode = stat.S_IMODE(st.st_mode)
    common = {"mode": mode, "uid": st.st_uid, "gid": st.st_gid, "mtime": st.st_mtime}
    if stat.S_ISDIR(st.st_mode):
        sink.write(encode_entry(TarEntry(name, DIR, **common)))  # type: ignore[arg-type]
        if depth >= MAX_DEPTH:
            failures.append((path, OSError(errno.ELOOP, f"nested more than {MAX_DEPTH} levels deep")))
            return
        _send_children(sink, path, f"{name}/", failures, depth)
    elif stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(path)
        except OSError as e:
            failures.append((path, e))
            return
        sink.write(encode_entry(TarEntry(name, SYMLINK, target=target, **common)))  # type: ignore[arg-type]
    elif stat.S_ISREG(st.st_mode):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            failures.append((path, e))
            return
        try:
            size = st.st_size
            sink.write(encode_entry(TarEntry(name, FILE, size=size, **common)))  # type: ignore[arg-type]
            left = size
            while left:
                try:
                    chunk = os.read(fd, min(left, MAX_DATA_SIZE))
                except OSError as e:
                    failures.append((path, e))
                    chunk = b""
                if not chunk:
                    # It shrank while we read it: the header promised ``size`` bytes.
                    if not failures or failures[-1][0] != path:
                        failures.append((path, OSError(errno.EIO, "the file shrank while it was copied")))
                    sink.write(b"\0" * left)
                    break
                sink.write(chunk)
                left -= len(chunk)
            sink.write(padding(size))
        finally:
            os.close(fd)
    # Sockets, fifos and devices are left out (docs/cli.md, "cp").


def tar_in(peer: _Peer, request: Mapping[str, Any]) -> bool | None:
    dest = peer.path_of(request)
    if not os.path.isdir(dest):
        peer.error("tar_in", dest, OSError(errno.ENOENT if not os.path.lexists(dest) else errno.ENOTDIR,
                                           "not a directory"))
        return None
    peer.reply(t="ready")
    extractor = _Extractor(dest)
    reader = TarReader()
    while True:
        frame = peer.recv()
        if frame.kind != KIND_FILE:
            return False  # protocol violation: drop the connection
        if not frame.body:
            break
        if extractor.failure is not None and extractor.fatal:
            continue  # keep reading until EOF so the stream stays in sync
        try:
            reader.feed(frame.body)
            extractor.consume(reader)
        except TarError as e:
            extractor.fail(dest, OSError(errno.EINVAL, str(e)), fatal=True)
    if extractor.failure is None or not extractor.fatal:
        try:
            reader.feed_eof()
            extractor.consume(reader)
        except TarError as e:
            extractor.fail(dest, OSError(errno.EINVAL, str(e)), fatal=True)
    extractor.finish()
    if extractor.failure is not None:
        where, exc = extractor.failure
        peer.error("tar_in", where, exc)
    else:
        peer.reply(t="ok")
    return None


class _Extractor:
    """Applies a TarReader's events under ``dest`` (inside the sandbox)."""

    def __init__(self, dest: str) -> None:
        self.dest = dest
        self.fd = -1
        self.current: TarEntry | None = None
        self.current_path = ""
        self.failure: tuple[str, OSError] | None = None
        self.fatal = False
        #: Directories' modes and times, applied at the end (deepest first) so that a
        #: read-only directory can still receive its entries.
        self.dirs: list[tuple[str, TarEntry]] = []

    def fail(self, where: str, exc: OSError, fatal: bool = False) -> None:
        if self.failure is None:
            self.failure = (where, exc)
        self.fatal = self.fatal or fatal

    def consume(self, reader: TarReader) -> None:
        while (event := reader.next_event()) is not None:
            if event is ARCHIVE_END:
                return
            if isinstance(event, TarEntry):
                self._begin(event)
            elif isinstance(event, TarData):
                if self.fd >= 0:
                    self._write(event.data)
            elif event is ENTRY_END:
                self._end()

    def _target(self, entry: TarEntry) -> str:
        return os.path.join(self.dest, *member_path_parts(entry.path))

    def _begin(self, entry: TarEntry) -> None:
        self.current = entry
        try:
            target = self._target(entry)
        except TarError as e:
            self.fail(entry.path, OSError(errno.EINVAL, str(e)))
            self.current = None
            return
        self.current_path = target
        try:
            parent = os.path.dirname(target)
            if parent:
                os.makedirs(parent, 0o755, exist_ok=True)
            if entry.kind == DIR:
                if not os.path.isdir(target):
                    _unlink_non_dir(target)
                    os.mkdir(target, 0o700)
                self.dirs.append((target, entry))
            elif entry.kind == FILE:
                _unlink_non_dir(target)
                self.fd = os.open(
                    target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                )  # fmt: skip
            elif entry.kind == SYMLINK:
                _unlink_non_dir(target)
                os.symlink(entry.target, target)
                _apply_owner_time(target, entry, follow=False)
            elif entry.kind == HARDLINK:
                _unlink_non_dir(target)
                os.link(os.path.join(self.dest, *member_path_parts(entry.target)), target,
                        follow_symlinks=False)
            # Other kinds are skipped (corral's own writer never sends them).
        except (OSError, TarError) as e:
            self.fail(target, e if isinstance(e, OSError) else OSError(errno.EINVAL, str(e)))

    def _write(self, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as e:
            self.fail(self.current_path, e)
            os.close(self.fd)
            self.fd = -1

    def _end(self) -> None:
        entry, self.current = self.current, None
        if self.fd >= 0 and entry is not None:
            try:
                _apply_owner_mode(self.fd, entry)
            except OSError as e:
                self.fail(self.current_path, e)
            os.close(self.fd)
            self.fd = -1
            with contextlib.suppress(OSError):
                os.utime(self.current_path, (entry.mtime, entry.mtime), follow_symlinks=False)

    def finish(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for target, entry in sorted(self.dirs, key=lambda d: d[0].count("/"), reverse=True):
            try:
                os.chown(target, entry.uid, entry.gid, follow_symlinks=False)
                os.chmod(target, entry.mode, follow_symlinks=False)
                os.utime(target, (entry.mtime, entry.mtime), follow_symlinks=False)
            except (OSError, NotImplementedError) as e:
                self.fail(target, e if isinstance(e, OSError) else OSError(errno.EOPNOTSUPP, str(e)))


def _unlink_non_dir(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "a directory is in the way")
        os.unlink(path)


def _apply_owner_mode(fd: int, entry: TarEntry) -> None:
    os.fchown(fd, entry.uid, entry.gid)
    os.fchmod(fd, entry.mode)  # after chown, which clears set-id bits


def _apply_owner_time(path: str, entry: TarEntry, follow: bool) -> None:
    with contextlib.suppress(OSError):
        os.chown(path, entry.uid, entry.gid, follow_symlinks=follow)
        os.utime(path, (entry.mtime, entry.mtime), follow_symlinks=follow)


#: The operations this module adds to the init's table (corral.runtime.init._HANDLERS).
HANDLERS: dict[str, Callable[[Any, Mapping[str, Any]], bool | None]] = {
    "tar_out": tar_out,
    "tar_in": tar_in,
}
