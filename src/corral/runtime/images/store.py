"""The content-addressed image store shared by all sandboxes.

Layout under the store root (``paths.images_dir()`` by default)::

    blobs/sha256/<hex>        every verified blob: manifests, configs, compressed layers
    images/<hex>/image.json   one pulled image, named by its (platform) manifest digest
    images/<hex>/rootfs/      its layers flattened, whiteouts applied, uids shifted
    refs.json                 "registry/repo:tag" and "registry/repo@digest" -> manifest digest
    locks/<hex>.lock          flock per digest: concurrent pulls wait for each other
    tmp/                      partial downloads and unpacks (same filesystem, so rename works)

Nothing becomes visible under ``blobs/`` or ``images/`` before it is complete and verified:
blobs are written to ``tmp/`` and renamed once their digest checks; a rootfs is unpacked in
``tmp/`` and the whole image directory renamed into ``images/``. A failure removes the temp
files, so a crash leaves at worst debris in ``tmp/``, cleared by the next store open when no
operation is running (``busy()`` is a shared flock every writer holds).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from corral.errors import ImageError
from corral.runtime import paths
from corral.runtime.images.idmap import UID_BASE
from corral.runtime.images.manifest import (
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    host_target,
    parse_config,
    parse_manifest_or_index,
    select_platform,
)
from corral.runtime.images.reference import DEFAULT_REGISTRY, parse_reference
from corral.runtime.images.registry import CHUNK_SIZE, RegistryClient
from corral.runtime.images.unpack import LayerApplier

#: Version of image.json; bump when its fields change meaning.
IMAGE_META_VERSION = 1
#: Mode of an unpacked rootfs's top directory (the image may override it with a "./" entry).
ROOTFS_MODE = 0o755


class ProgressSink(Protocol):
    """Receives progress of a pull; ``phase`` is "download" or "unpack"."""

    def layer_start(self, digest: str, size: int, phase: str) -> None: ...

    def layer_advance(self, digest: str, nbytes: int) -> None: ...

    def layer_done(self, digest: str) -> None: ...


@dataclass(frozen=True)
class Image:
    """An image present in the store, ready to be the lower dir of a sandbox's overlay."""

    reference: str
    digest: str
    rootfs: Path
    config: dict[str, Any]
    size: int
    created: str | None
    layers: tuple[str, ...] = field(default=())


def local_alias(ref: str) -> str | None:
    """``localhost/<ref>`` for a reference that names no registry host, else None."""
    first, sep, _rest = ref.partition("/")
    parsed = parse_reference(ref)
    if parsed.registry != DEFAULT_REGISTRY or (sep and first in ("docker.io", "index.docker.io")):
        return None
    return f"localhost/{ref}"


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


def _disk_error(exc: OSError, step: str) -> ImageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ImageError(f"disk full while {step}.")
    return ImageError(f"{step} failed: {exc.strerror or exc}.")


class ImageStore:
    """See the module docstring. Safe to use from several threads and processes at once."""

    def __init__(
        self,
        root: Path | None = None,
        *,
        ca_file: Path | str | None = None,
        insecure_registries: Iterable[str] = (),
        shift_ids: bool | None = None,
    ) -> None:
        self.root = Path(root) if root is not None else paths.images_dir()
        self.shift_ids = os.geteuid() == 0 if shift_ids is None else shift_ids
        for sub in ("blobs/sha256", "images", "locks", "tmp"):
            (self.root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        self.clean_debris()
        auth_file = self.root.parent / "auth.json"
        self.client = RegistryClient(
            ca_file=ca_file, insecure_registries=insecure_registries, auth_file=auth_file
        )

    # -- paths and locks -------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        algo, hexpart = digest.split(":", 1)
        return self.root / "blobs" / algo / hexpart

    def image_dir(self, digest: str) -> Path:
        return self.root / "images" / _hex(digest)

    @contextlib.contextmanager
    def _flock(self, name: str, operation: int) -> Iterator[bool]:
        """Holds ``locks/<name>.lock`` with ``operation``; yields False when a non-blocking
        request (LOCK_NB) finds it taken."""
        fd = os.open(self.root / "locks" / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, operation)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        with self._flock(name, fcntl.LOCK_EX):
            yield

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Held (shared) by every operation that writes to tmp/, so clean_debris skips them."""
        with self._flock("store", fcntl.LOCK_SH):
            yield

    @contextlib.contextmanager
    def _idle(self) -> Iterator[bool]:
        """Yields True while holding the store exclusively (no pull/import/remove running)."""
        with self._flock("store", fcntl.LOCK_EX | fcntl.LOCK_NB) as held:
            yield held

    def clean_debris(self) -> int:
        """Delete what crashed pulls left in tmp/, unless an operation is running right now.

        Returns how many entries were removed. Called on every store open; ``corral gc`` may
        call it too.
        """
        with self._idle() as idle:
            if not idle:
                return 0
            removed = 0
            for entry in (self.root / "tmp").iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed += 1
            return removed

    # -- refs ------------------------------------------------------------------------------
    def _read_refs(self) -> dict[str, str]:
        try:
            data = json.loads((self.root / "refs.json").read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ImageError(
                f"image index {self.root / 'refs.json'} is unreadable ({exc})."
            ) from None
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}

    def _update_refs(self, change: Callable[[dict[str, str]], None]) -> None:
        with self.busy(), self._lock("refs"):
            refs = self._read_refs()
            change(refs)
            fd, tmp = tempfile.mkstemp(dir=self.root / "tmp", prefix="refs-")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(refs, f, indent=1, sort_keys=True)
                os.replace(tmp, self.root / "refs.json")
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise

    # -- reading images ----------------------------------------------------------------------
    def _load(self, digest: str, reference: str) -> Image | None:
        directory = self.image_dir(digest)
        try:
            meta = json.loads((directory / "image.json").read_text())
        except (OSError, ValueError):
            return None
        return Image(
            reference=reference,
            digest=digest,
            rootfs=directory / "rootfs",
            config=meta.get("config") or {},
            size=int(meta.get("size", 0)),
            created=meta.get("created"),
            layers=tuple(meta.get("layers", ())),
        )

    def lookup(self, ref: str) -> Image | None:
        """The local image for ``ref``, or None; never touches the network.

        An image the index knows but whose files are missing or unreadable is an ImageError
        naming it (never None: the caller would pull instead and hide the damage).
        """
        parsed = parse_reference(ref)
        refs = self._read_refs()
        key = f"{parsed.name}@{parsed.digest}" if parsed.digest else str(parsed)
        digest = refs.get(key)
        if digest is None and parsed.digest and self.image_dir(parsed.digest).is_dir():
            digest = parsed.digest
        if digest is None:
            return None
        image = self._load(digest, str(parsed))
        if image is None or not image.rootfs.is_dir():
            what = "image.json" if image is None else "rootfs"
            raise ImageError(
                f"local image {parsed} ({digest}) is damaged: its {what} in "
                f"{self.image_dir(digest)} is missing or unreadable; remove it with "
                f"'corral images rm {parsed}' and pull or import it again."
            )
        return image

    def resolve(self, ref: str, *, progress: ProgressSink | None = None) -> Image:
        """The local image for ``ref`` if there is one (no network), else pull it.

        Local first, as users of ``images import`` expect: ``ref`` as given (normalised,
        ``alpine`` is ``docker.io/library/alpine:latest``), then - for a name that names no
        registry - the same name under ``localhost/`` (where imports without a registry
        land); only then the registry.
        """
        image = self.lookup(ref)
        if image is None:
            local_name = local_alias(ref)
            if local_name is not None:
                image = self.lookup(local_name)
        return image or self.pull(ref, progress=progress)

    def list(self) -> builtins.list[Image]:
        """One entry per tag in the store (digest-only images once), sorted by reference."""
        refs = self._read_refs()
        tagged = {digest for reference, digest in refs.items() if "@" not in reference}
        images = []
        for reference, digest in sorted(refs.items()):
            if "@" in reference and (digest in tagged or not reference.endswith(digest)):
                continue
            image = self._load(digest, reference)
            if image is not None:
                images.append(image)
        return images

    def remove(self, ref: str) -> None:
        """Forget ``ref``; delete the image and unshared blobs when no reference remains.

        Removing an image a running sandbox uses pulls its overlay's lower dir away: the
        sandbox layer must check that before calling this.
        """
        parsed = parse_reference(ref)
        key = f"{parsed.name}@{parsed.digest}" if parsed.digest else str(parsed)
        removed: builtins.list[str] = []

        def change(refs: dict[str, str]) -> None:
            digest = refs.get(key)
            if digest is None and parsed.digest in refs.values():
                digest = parsed.digest
            if digest is None:
                raise ImageError(f"image {ref} is not in the local store.")
            for k in [k for k, v in refs.items() if k == key or (parsed.digest and v == digest)]:
                del refs[k]
            # Digest aliases do not keep an image alive once its last tag is gone (as Docker).
            if not any(v == digest and "@" not in k for k, v in refs.items()):
                for k in [k for k, v in refs.items() if v == digest]:
                    del refs[k]
                removed.append(digest)

        self._update_refs(change)
        for digest in removed:
            with self.busy(), self._lock("image-" + _hex(digest)):
                directory = self.image_dir(digest)
                if directory.exists():
                    trash = Path(tempfile.mkdtemp(dir=self.root / "tmp", prefix="rm-"))
                    os.rename(directory, trash / "image")
                    shutil.rmtree(trash)
        if removed:
            self._collect_blobs()

    def _collect_blobs(self) -> None:
        """Delete blobs no remaining image lists (manifests, configs, layers).

        Only when the store is idle: a pull in progress has stored blobs that no image.json
        lists yet. Skipped blobs are collected by a later remove.
        """
        with self._idle() as idle:
            if idle:
                self._collect_blobs_idle()

    def _collect_blobs_idle(self) -> None:
        keep: set[str] = set()
        for meta_path in (self.root / "images").glob("*/image.json"):
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                continue
            keep.update(meta.get("blobs", ()))
        for blob in (self.root / "blobs" / "sha256").iterdir():
            if f"sha256:{blob.name}" not in keep:
                with self._lock("blob-" + blob.name):
                    blob.unlink(missing_ok=True)

    # -- blobs -----------------------------------------------------------------------------
    def _store_blob(
        self,
        desc: Descriptor,
        write: Callable[[BinaryIO], None],
        progress: ProgressSink | None = None,
    ) -> Path:
        """Ensure blob ``desc`` is in the store; ``write`` streams it (and verifies it)."""
        final = self.blob_path(desc.digest)
        with self._lock("blob-" + _hex(desc.digest)):
            if final.is_file() and final.stat().st_size == desc.size:
                return final
            fd, tmp = tempfile.mkstemp(dir=self.root / "tmp", prefix="blob-")
            try:
                with os.fdopen(fd, "wb") as out:
                    if progress is not None:
                        progress.layer_start(desc.digest, desc.size, "download")
                    write(out)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, final)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise _disk_error(exc, f"storing blob {desc.digest} in {self.root}") from None
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            finally:
                if progress is not None:
                    progress.layer_done(desc.digest)
        return final

    def _store_bytes(self, digest: str, data: bytes) -> None:
        def write(out: BinaryIO) -> None:
            out.write(data)

        desc = Descriptor("application/octet-stream", digest, len(data))
        self._store_blob(desc, write)

    # -- pulling ---------------------------------------------------------------------------
    def pull(self, ref: str, *, progress: ProgressSink | None = None) -> Image:
        """Fetch ``ref`` from its registry, verify every blob, unpack it; return the Image."""
        parsed = parse_reference(ref)
        body, content_type, top_digest = self.client.get_manifest(parsed)
        document = parse_manifest_or_index(body, content_type, f"manifest of {parsed}")
        manifest_digest = top_digest
        if isinstance(document, Index):
            chosen = select_platform(document, host_target(), f"image {parsed}")
            body, content_type, manifest_digest = self.client.get_manifest(parsed, chosen.digest)
            document = parse_manifest_or_index(body, content_type, f"manifest of {parsed}")
            if not isinstance(document, Manifest):
                raise ImageError(f"image {parsed}: the index points at another index.")
        manifest = document

        def fetch(desc: Descriptor) -> Callable[[BinaryIO], None]:
            def write(out: BinaryIO) -> None:
                advance = None
                if progress is not None:
                    sink = progress

                    def advance(n: int) -> None:
                        sink.layer_advance(desc.digest, n)

                self.client.fetch_blob(parsed, desc, out, advance)

            return write

        aliases = [str(parsed) if not parsed.digest else f"{parsed.name}@{parsed.digest}"]
        aliases += [f"{parsed.name}@{top_digest}", f"{parsed.name}@{manifest_digest}"]
        return self.install(str(parsed), manifest_digest, body, manifest, fetch, aliases, progress)

    def install(
        self,
        reference: str,
        manifest_digest: str,
        manifest_body: bytes,
        manifest: Manifest,
        source: Callable[[Descriptor], Callable[[BinaryIO], None]],
        aliases: builtins.list[str],
        progress: ProgressSink | None = None,
    ) -> Image:
        """Store a manifest's blobs (from ``source``) and unpack it, unless already there.

        Used by pulls and by local imports alike; ``source(desc)`` returns a function that
        writes the verified blob to a file.
        """
        with self.busy(), self._lock("image-" + _hex(manifest_digest)):
            image = self._load(manifest_digest, reference)
            if image is None:
                self._store_bytes(manifest_digest, manifest_body)
                config_path = self._store_blob(manifest.config, source(manifest.config))
                config = parse_config(config_path.read_bytes(), f"config of image {reference}")
                if len(config.diff_ids) != len(manifest.layers):
                    raise ImageError(
                        f"image {reference} lists {len(manifest.layers)} layers but its config "
                        f"has {len(config.diff_ids)} diff_ids."
                    )
                for layer in manifest.layers:
                    self._store_blob(layer, source(layer), progress)
                self._unpack(reference, manifest_digest, manifest, config, progress)
                image = self._load(manifest_digest, reference)
                if image is None:
                    raise ImageError(f"image {reference} vanished from the store after unpacking.")

        def change(refs: dict[str, str]) -> None:
            for alias in aliases:
                refs[alias] = manifest_digest

        self._update_refs(change)
        return image

    def _unpack(
        self,
        reference: str,
        manifest_digest: str,
        manifest: Manifest,
        config: ImageConfig,
        progress: ProgressSink | None,
    ) -> None:
        staging = Path(tempfile.mkdtemp(dir=self.root / "tmp", prefix="unpack-"))
        try:
            rootfs = staging / "rootfs"
            rootfs.mkdir(mode=0o700)
            if self.shift_ids:
                os.chown(rootfs, UID_BASE, UID_BASE)
            os.chmod(rootfs, ROOTFS_MODE)
            applier = LayerApplier(
                rootfs, shift_ids=self.shift_ids, destination=f"the image store {self.root}"
            )
            for i, layer in enumerate(manifest.layers):
                what = f"layer {i + 1}/{len(manifest.layers)} ({layer.digest}) of {reference}"
                if progress is not None:
                    progress.layer_start(layer.digest, layer.size, "unpack")
                with open(self.blob_path(layer.digest), "rb", buffering=CHUNK_SIZE) as blob:
                    diff_id = applier.apply(blob, what)
                if progress is not None:
                    progress.layer_done(layer.digest)
                if diff_id != config.diff_ids[i]:
                    raise ImageError(
                        f"{what} unpacks to {diff_id}, not the diff_id {config.diff_ids[i]} "
                        "its config declares."
                    )
            meta = {
                "version": IMAGE_META_VERSION,
                "reference": reference,
                "digest": manifest_digest,
                "config_digest": manifest.config.digest,
                "config": config.config,
                "created": config.created,
                "layers": [layer.digest for layer in manifest.layers],
                "size": sum(layer.size for layer in manifest.layers),
                "blobs": [manifest_digest, manifest.config.digest]
                + [layer.digest for layer in manifest.layers],
                "unpacked_at": time.time(),
            }
            (staging / "image.json").write_text(json.dumps(meta, indent=1))
            os.rename(staging, self.image_dir(manifest_digest))
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise _disk_error(exc, f"unpacking image {reference} into {self.root}") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    # -- local sources ---------------------------------------------------------------------
    def import_path(self, path: Path, name: str | None = None) -> Image:
        """Import a rootfs directory, an OCI layout (dir or tar) or a ``docker save`` tar."""
        from corral.runtime.images import local

        return local.import_path(self, Path(path), name)
