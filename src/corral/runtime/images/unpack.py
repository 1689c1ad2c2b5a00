"""Apply image layers to one directory: the flattened, uid-shifted rootfs of an image.

Layers are untrusted tar streams. Safety rules, all enforced here:

* Every path is resolved component by component *inside* the root: a symlink met on the way
  is followed the way the kernel would follow it inside a chroot at the root (absolute
  targets restart at the root, ``..`` stops at the root), so nothing a layer contains can make
  a write land outside the tree. Names with a ``..`` component are refused outright.
* The last component is never followed: an existing symlink there is replaced, files are
  created with O_EXCL|O_NOFOLLOW.
* Hard links may only point at something already inside the root (resolved the same way).
* Device nodes are skipped (the runtime bind-mounts a minimal /dev); FIFOs are kept.
* Ownership is shifted by idmap.UID_BASE; modes (setuid/setgid/sticky included) and file
  capabilities are set after the chown, which would otherwise clear them; capabilities are
  rewritten to name the sandbox's root (v3) so the kernel honours them inside the sandbox.

Whiteouts (``.wh.name``) remove a lower entry; an opaque marker (``.wh..wh..opq``) hides all
lower content of its directory. Both are applied, never written, so the result has no
whiteout files and can be the single lower dir of an overlay.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import os
import shutil
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, cast

import zstandard

from corral.errors import ImageError
from corral.runtime.images.idmap import shift_id

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
#: Symlinks followed while resolving one path: Linux's own limit (MAXSYMLINKS).
MAX_SYMLINK_HOPS = 40
#: Copy size for file contents.
COPY_CHUNK = 1024 * 1024
#: Mode of directories a layer implies but does not list (what Docker uses).
IMPLIED_DIR_MODE = 0o755

#: How tar (PAX, as GNU tar and Docker write them) carries extended attributes.
XATTR_PAX_PREFIX = "SCHILY.xattr."
CAPABILITY_XATTR = "security.capability"
#: linux/capability.h: struct vfs_cap_data (v2) and vfs_ns_cap_data (v3, with a root id).
VFS_CAP_REVISION_MASK = 0xFF000000
VFS_CAP_REVISION_2 = 0x02000000
VFS_CAP_REVISION_3 = 0x03000000
VFS_CAP_V2_SIZE = 20
VFS_CAP_V3_SIZE = 24

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes what passes through (the layer's diff_id)."""

    def __init__(self, inner: BinaryIO) -> None:
        self.inner = inner
        self.hasher = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.inner.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.hasher.update(data)
        self.count += n
        return n

    def drain(self) -> None:
        while self.read(COPY_CHUNK):
            pass


def decompressed(stream: BinaryIO) -> BinaryIO:
    """``stream`` decompressed according to its magic bytes (gzip, zstd, or plain tar)."""
    buffered = (
        stream
        if isinstance(stream, io.BufferedReader)
        else io.BufferedReader(cast(io.RawIOBase, stream))
    )
    head = buffered.peek(4)[:4]
    if head.startswith(_GZIP_MAGIC):
        return gzip.GzipFile(fileobj=buffered, mode="rb")  # type: ignore[return-value]
    if head.startswith(_ZSTD_MAGIC):
        reader = zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True)
        return cast(BinaryIO, reader)
    return buffered


class _Missing(ImageError):
    """A path a hard link needs does not exist (turned into a sentence about the link)."""


def _relative_parts(name: str, what: str) -> list[str]:
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImageError(f"{what} contains path {name!r}, which climbs out of the rootfs.")
    return parts


class LayerApplier:
    """Applies layers, bottom first, to ``root`` (which must exist and be private to us).

    ``shift_ids`` False keeps the unpacking user as owner (tests without root); True is what
    the store uses.
    """

    def __init__(self, root: Path, *, shift_ids: bool = True, destination: str = "") -> None:
        self.root = root
        #: How errors name where we unpack (the store, not its temp dir that is gone by then).
        self.destination = destination or str(root)
        self.shift_ids = shift_ids
        self.skipped_devices = 0
        self.skipped_xattrs = 0

    # -- resolution inside the root ---------------------------------------------------------
    def _resolve(self, parts: list[str], what: str, *, create: bool) -> list[str]:
        """Real components (no symlinks) of the directory named by ``parts``, in the root.

        Missing directories are created when ``create``; a non-directory in the way is an error.
        """
        real: list[str] = []
        pending = list(parts)
        hops = 0
        while pending:
            comp = pending.pop(0)
            if comp in ("", "."):
                continue
            if comp == "..":
                if real:
                    real.pop()
                continue
            path = self._host_path([*real, comp])
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if not create:
                    raise _Missing(f"{what}: {'/'.join(parts)} does not exist.") from None
                if comp.startswith(WHITEOUT_PREFIX):
                    raise ImageError(f"{what}: directory {comp!r} has a whiteout name.") from None
                os.mkdir(path, 0o700)
                self._set_owner_mode(path, 0, 0, IMPLIED_DIR_MODE, is_link=False)
                real.append(comp)
                continue
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise ImageError(f"{what}: too many symlinks resolving {'/'.join(parts)}.")
                target = os.readlink(path)
                if target.startswith("/"):
                    real = []
                pending = [p for p in target.split("/") if p] + pending
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise ImageError(f"{what}: {'/'.join([*real, comp])} is not a directory.")
            real.append(comp)
        return real

    def _host_path(self, real: list[str]) -> str:
        return os.path.join(self.root, *real)

    def _set_owner_mode(self, path: str, uid: int, gid: int, mode: int, *, is_link: bool) -> None:
        if self.shift_ids:
            os.chown(path, shift_id(uid), shift_id(gid), follow_symlinks=False)
        if not is_link:
            os.chmod(path, mode & 0o7777)

    @staticmethod
    def _remove(path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)

    # -- one layer -------------------------------------------------------------------------
    def apply(
        self, stream: BinaryIO, what: str, advance: Callable[[int], None] | None = None
    ) -> str:
        """Apply one (possibly compressed) layer; return its diff_id (sha256 of the tar)."""
        try:
            plain = decompressed(stream)
            reader = _HashingReader(plain)
            created: set[str] = set()
            opaque: list[list[str]] = []
            dir_modes: dict[str, tuple[int, int, int, float]] = {}
            with tarfile.open(fileobj=cast(BinaryIO, reader), mode="r|", errorlevel=2) as tar:
                for member in tar:
                    self._member(tar, member, what, created, opaque, dir_modes)
                    if advance is not None:
                        advance(member.size if member.isfile() else 0)
            reader.drain()
            for parts in opaque:
                self._prune_lower(parts, created)
            for path, (uid, gid, mode, mtime) in dir_modes.items():
                # A later member of the layer may have replaced this directory, or one above
                # it, with a symlink: only a path of real directories inside the root is
                # touched (else chmod/chown would follow the link out of the rootfs).
                if self._real_dir(path):
                    self._set_owner_mode(path, uid, gid, mode, is_link=False)
                    os.utime(path, (mtime, mtime), follow_symlinks=False)
        except ImageError:
            raise
        except (tarfile.TarError, EOFError, zstandard.ZstdError, gzip.BadGzipFile) as exc:
            raise ImageError(f"{what} is truncated or not a valid tar archive ({exc}).") from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ImageError(
                    f"disk full while unpacking {what} into {self.destination}."
                ) from None
            raise ImageError(f"unpacking {what} failed: {exc.strerror or exc}.") from None
        return "sha256:" + reader.hasher.hexdigest()

    def _member(
        self,
        tar: tarfile.TarFile,
        member: tarfile.TarInfo,
        what: str,
        created: set[str],
        opaque: list[list[str]],
        dir_modes: dict[str, tuple[int, int, int, float]],
    ) -> None:
        parts = _relative_parts(member.name, what)
        if any(p.startswith(WHITEOUT_PREFIX) for p in parts[:-1]):
            raise ImageError(f"{what}: {member.name!r} has a whiteout name as a directory.")
        if not parts:
            # The layer's own "./" entry: metadata of the root directory.
            if member.isdir():
                dir_modes[str(self.root)] = (member.uid, member.gid, member.mode, member.mtime)
            return
        base = parts[-1]
        if base == OPAQUE_MARKER:
            opaque.append(self._resolve(parts[:-1], what, create=True))
            return
        if base.startswith(WHITEOUT_PREFIX):
            if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
                return  # other aufs metadata (.wh..wh.plnk etc.): not content
            parent = self._resolve(parts[:-1], what, create=True)
            victim = [*parent, base[len(WHITEOUT_PREFIX) :]]
            if victim[-1] not in ("", ".", "..") and "/".join(victim) not in created:
                self._remove(self._host_path(victim))
            return
        if member.ischr() or member.isblk():
            self.skipped_devices += 1
            return
        parent = self._resolve(parts[:-1], what, create=True)
        real = [*parent, base]
        key = "/".join(real)
        target = self._host_path(real)
        created.add(key)
        existing = None
        with contextlib.suppress(FileNotFoundError):
            existing = os.lstat(target)
        if member.isdir():
            if existing is not None and not stat.S_ISDIR(existing.st_mode):
                os.unlink(target)
                existing = None
            if existing is None:
                os.mkdir(target, 0o700)
            dir_modes[target] = (member.uid, member.gid, member.mode, member.mtime)
            return
        if existing is not None:
            self._remove(target)
        if member.isfile():
            self._write_file(tar, member, target)
        elif member.issym():
            os.symlink(member.linkname, target)
            self._set_owner_mode(target, member.uid, member.gid, 0, is_link=True)
            os.utime(target, (member.mtime, member.mtime), follow_symlinks=False)
        elif member.islnk():
            link_parts = _relative_parts(member.linkname, what)
            if not link_parts:
                raise ImageError(f"{what}: hard link {member.name!r} points at the root.")
            try:
                source = [*self._resolve(link_parts[:-1], what, create=False), link_parts[-1]]
                source_path = self._host_path(source)
                st = os.lstat(source_path)
            except (_Missing, FileNotFoundError):
                raise ImageError(
                    f"{what}: hard link {member.name!r} points at missing {member.linkname!r}."
                ) from None
            if stat.S_ISDIR(st.st_mode):
                raise ImageError(
                    f"{what}: hard link {member.name!r} points at directory {member.linkname!r}."
                )
            os.link(source_path, target, follow_symlinks=False)
        elif member.isfifo():
            os.mkfifo(target, 0o600)
            self._set_owner_mode(target, member.uid, member.gid, member.mode, is_link=False)
        else:
            created.discard(key)  # unknown member type (sparse headers etc. already folded)

    def _write_file(self, tar: tarfile.TarFile, member: tarfile.TarInfo, target: str) -> None:
        src = tar.extractfile(member)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(target, flags, 0o600)
        try:
            remaining = member.size
            while remaining > 0 and src is not None:
                chunk = src.read(min(COPY_CHUNK, remaining))
                if not chunk:
                    raise ImageError(f"file {member.name!r} of a layer is truncated.")
                view = memoryview(chunk)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                remaining -= len(chunk)
            if self.shift_ids:
                os.fchown(fd, shift_id(member.uid), shift_id(member.gid))
            os.fchmod(fd, member.mode & 0o7777)
            self._set_xattrs(fd, member)
            os.utime(fd, (member.mtime, member.mtime))
        finally:
            os.close(fd)

    def _set_xattrs(self, fd: int, member: tarfile.TarInfo) -> None:
        """Apply ``user.*`` xattrs and file capabilities (after chown, which clears caps).

        Other namespaces (trusted.*, security.selinux, ACLs) describe the build host, not the
        image, and are dropped. A filesystem that refuses xattrs loses them (counted).
        """
        for key, text in member.pax_headers.items():
            if not key.startswith(XATTR_PAX_PREFIX):
                continue
            name = key[len(XATTR_PAX_PREFIX) :]
            value = text.encode("utf-8", "surrogateescape")
            if name == CAPABILITY_XATTR:
                converted = self._capability_for_namespace(value)
                if converted is None:
                    continue
                value = converted
            elif not name.startswith("user."):
                continue
            try:
                os.setxattr(fd, name, value)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise
                self.skipped_xattrs += 1

    def _capability_for_namespace(self, value: bytes) -> bytes | None:
        """A file capability as the sandbox's user namespace will honour it.

        v2 capabilities (no root id) count only for the initial namespace's root; rewritten as
        v3 with the root id the sandbox's root maps to, they apply inside the sandbox.
        """
        if len(value) < VFS_CAP_V2_SIZE:
            return None
        magic = int.from_bytes(value[:4], "little")
        body = value[4:VFS_CAP_V2_SIZE]
        if magic & VFS_CAP_REVISION_MASK == VFS_CAP_REVISION_2:
            root_id = 0
        elif magic & VFS_CAP_REVISION_MASK == VFS_CAP_REVISION_3 and len(value) >= VFS_CAP_V3_SIZE:
            root_id = int.from_bytes(value[VFS_CAP_V2_SIZE:VFS_CAP_V3_SIZE], "little")
        else:
            return None
        if self.shift_ids:
            root_id = shift_id(root_id)
        flags = magic & ~VFS_CAP_REVISION_MASK & 0xFFFFFFFF
        header = (VFS_CAP_REVISION_3 | flags).to_bytes(4, "little")
        return header + body + root_id.to_bytes(4, "little")

    def _real_dir(self, path: str) -> bool:
        """Whether ``path`` (in the root) is a directory reached through real directories
        only: no component, the last one included, is a symlink."""
        rel = os.path.relpath(path, self.root)
        current = str(self.root)
        for comp in ([] if rel == "." else rel.split(os.sep)):
            if comp in ("", ".", ".."):
                return False
            current = os.path.join(current, comp)
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                return False
            if not stat.S_ISDIR(st.st_mode):
                return False
        return True

    def _prune_lower(self, parts: list[str], created: set[str]) -> None:
        """Under opaque dir ``parts``: delete what this layer did not create, recursively.

        ``parts`` were real directories when the marker was read, but a later member of the
        same layer can replace one of them with a symlink (``a/.wh..wh..opq`` then a symlink
        ``a -> /``): then there is nothing of the layer below to prune, and listing through
        the link would delete the host's files."""
        path = self._host_path(parts)
        if not self._real_dir(path):
            return
        try:
            names = os.listdir(path)
        except (FileNotFoundError, NotADirectoryError):
            return
        for name in names:
            child = [*parts, name]
            child_path = self._host_path(child)
            if "/".join(child) not in created:
                self._remove(child_path)
            elif os.path.isdir(child_path) and not os.path.islink(child_path):
                self._prune_lower(child, created)
