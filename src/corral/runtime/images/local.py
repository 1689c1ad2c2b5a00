"""Images from local sources: a rootfs directory, an OCI image layout (dir or tar), a
``docker save`` tar.

Each source is turned into what a registry would have served (a manifest, a config, layer
blobs with digests) and handed to ``ImageStore.install``, so imported images are verified,
stored and unpacked exactly like pulled ones. Digests stated by the source (OCI layouts) are
verified; ``docker save`` layers are hashed here and then checked against the config's
diff_ids when unpacked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO

from corral.errors import ImageError
from corral.runtime.images.idmap import ID_RANGE, UID_BASE
from corral.runtime.images.manifest import (
    DOCKER_CONFIG,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    OCI_CONFIG,
    OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    host_target,
    parse_manifest_or_index,
    select_platform,
)
from corral.runtime.images.reference import parse_reference, validate_digest
from corral.runtime.images.registry import CHUNK_SIZE

if TYPE_CHECKING:
    from corral.runtime.images.store import Image, ImageStore

#: OCI annotation holding a tag (or a full reference) in an image layout's index.json.
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
#: Registry name for images that came from no registry (Docker/Podman use the same).
LOCAL_REGISTRY = "localhost"

_Opener = Callable[[str], IO[bytes]]


def _copy_verified(src: IO[bytes], desc: Descriptor, out: BinaryIO, what: str) -> None:
    hasher = hashlib.sha256()
    size = 0
    while chunk := src.read(CHUNK_SIZE):
        size += len(chunk)
        if size > desc.size:
            raise ImageError(f"{what} is larger than the {desc.size} bytes declared.")
        hasher.update(chunk)
        out.write(chunk)
    if size != desc.size:
        raise ImageError(f"{what} is truncated: {size} of {desc.size} bytes.")
    if "sha256:" + hasher.hexdigest() != desc.digest:
        raise ImageError(f"{what} does not match its digest {desc.digest}.")


def _hash_stream(src: IO[bytes]) -> tuple[str, int, bytes]:
    """(digest, size, first bytes) of a stream."""
    hasher = hashlib.sha256()
    size = 0
    head = b""
    while chunk := src.read(CHUNK_SIZE):
        if not head:
            head = chunk[:4]
        hasher.update(chunk)
        size += len(chunk)
    return "sha256:" + hasher.hexdigest(), size, head


def _layer_type(head: bytes) -> str:
    if head.startswith(b"\x1f\x8b"):
        return "application/vnd.oci.image.layer.v1.tar+gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "application/vnd.oci.image.layer.v1.tar+zstd"
    return "application/vnd.oci.image.layer.v1.tar"


def _default_name(path: Path) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", path.name.lower().removesuffix(".tar")).strip("-")
    return f"{LOCAL_REGISTRY}/{base or 'image'}:latest"


@contextlib.contextmanager
def _open_source(path: Path) -> Iterator[tuple[_Opener, Callable[[str], bool]]]:
    """(open member, member exists) for a directory or a tar archive."""
    if path.is_dir():

        def open_dir(rel: str) -> IO[bytes]:
            target = (path / rel).resolve()
            if not target.is_relative_to(path.resolve()):
                raise ImageError(f"{path}: {rel!r} points outside the image directory.")
            try:
                return open(target, "rb")
            except OSError as exc:
                raise ImageError(f"{path}: cannot read {rel} ({exc.strerror}).") from None

        yield open_dir, lambda rel: (path / rel).is_file()
        return
    try:
        tar = tarfile.open(path, "r:")  # noqa: SIM115 (closed by the with below)
    except (OSError, tarfile.TarError) as exc:
        raise ImageError(f"{path} is neither a directory nor a tar archive ({exc}).") from None
    with tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}

        def open_tar(rel: str) -> IO[bytes]:
            member = members.get(rel.removeprefix("./"))
            f = tar.extractfile(member) if member is not None else None
            if f is None:
                raise ImageError(f"{path} has no file {rel}.")
            return f

        yield open_tar, lambda rel: rel.removeprefix("./") in members


def _read_json(opener: _Opener, rel: str, path: Path, limit: int) -> Any:
    with opener(rel) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ImageError(f"{path}: {rel} is larger than {limit} bytes.")
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ImageError(f"{path}: {rel} is not valid JSON ({exc}).") from None


def import_path(store: ImageStore, path: Path, name: str | None, *, tag: bool = True) -> Image:
    """Import ``path``; ``tag=False`` records only the digest (``localhost/x@sha256:...``),
    for images run straight from a path, which must not take over a tag."""
    with store.busy():
        return _import(store, path, name, tag)


def _import(store: ImageStore, path: Path, name: str | None, tag: bool = True) -> Image:
    if not path.exists():
        raise ImageError(f"image source {path} does not exist.")
    if path.is_dir() and not (path / "oci-layout").is_file():
        return _import_rootfs(store, path, name, tag)
    with _open_source(path) as (opener, exists):
        if exists("oci-layout") and exists("index.json"):
            return _import_oci(store, path, name, opener, tag)
        if exists("manifest.json"):
            return _import_docker_save(store, path, name, opener, tag)
    raise ImageError(
        f"{path} is not a rootfs directory, an OCI image layout or a docker save archive "
        "(no oci-layout/index.json or manifest.json)."
    )


def _blob_rel(digest: str) -> str:
    validate_digest(digest)
    algo, hexpart = digest.split(":", 1)
    return f"blobs/{algo}/{hexpart}"


def _import_oci(
    store: ImageStore, path: Path, name: str | None, opener: _Opener, tag: bool = True
) -> Image:
    index_doc = _read_json(opener, "index.json", path, MAX_MANIFEST_BYTES)
    index = parse_manifest_or_index(
        json.dumps({"mediaType": "application/vnd.oci.image.index.v1+json", **index_doc}).encode(),
        None,
        f"{path}/index.json",
    )
    if not isinstance(index, Index) or not index.manifests:
        raise ImageError(f"{path}/index.json lists no manifests.")
    wanted = parse_reference(name) if name else None
    chosen = list(index.manifests)
    if wanted is not None:
        matching = [
            d
            for d in chosen
            if d.annotation(REF_NAME_ANNOTATION) in (wanted.tag, str(wanted), wanted.name)
        ]
        chosen = matching or chosen
    if len(chosen) > 1 and all(d.platform for d in chosen):
        desc = select_platform(Index(index.media_type, tuple(chosen)), host_target(), str(path))
    else:
        desc = chosen[0]
    ref_name = desc.annotation(REF_NAME_ANNOTATION)

    def read_manifest(d: Descriptor) -> tuple[bytes, Manifest | Index]:
        with opener(_blob_rel(d.digest)) as f:
            body = f.read(MAX_MANIFEST_BYTES + 1)
        if "sha256:" + hashlib.sha256(body).hexdigest() != d.digest:
            raise ImageError(f"{path}: manifest {d.digest} does not match its digest.")
        return body, parse_manifest_or_index(body, d.media_type, f"{path} manifest {d.digest}")

    body, document = read_manifest(desc)
    if isinstance(document, Index):
        desc = select_platform(document, host_target(), str(path))
        body, document = read_manifest(desc)
    if not isinstance(document, Manifest):
        raise ImageError(f"{path}: the index points at another index.")
    if name:
        reference = str(parse_reference(name))
    elif ref_name and "/" in ref_name:
        reference = str(parse_reference(ref_name))
    elif ref_name:
        reference = _default_name(path).rsplit(":", 1)[0] + ":" + ref_name
        reference = str(parse_reference(reference))
    else:
        reference = _default_name(path)

    def source(d: Descriptor) -> Callable[[BinaryIO], None]:
        def write(out: BinaryIO) -> None:
            with opener(_blob_rel(d.digest)) as f:
                _copy_verified(f, d, out, f"{path}: blob {d.digest}")

        return write

    parsed = parse_reference(reference)
    aliases = [reference] if tag else []
    aliases.append(f"{parsed.name}@{desc.digest}")
    return store.install(reference, desc.digest, body, document, source, aliases)


def _synthesized(
    store: ImageStore,
    reference: str,
    config_body: bytes,
    config_type: str,
    layers: list[tuple[Descriptor, Callable[[BinaryIO], None]]],
    tag: bool = True,
) -> Image:
    """Install an image whose manifest we write ourselves (docker save, rootfs dirs)."""
    config_desc = Descriptor(
        config_type, "sha256:" + hashlib.sha256(config_body).hexdigest(), len(config_body)
    )
    manifest_doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": config_type,
            "digest": config_desc.digest,
            "size": config_desc.size,
        },
        "layers": [
            {"mediaType": d.media_type, "digest": d.digest, "size": d.size} for d, _ in layers
        ],
    }
    body = json.dumps(manifest_doc, sort_keys=True, separators=(",", ":")).encode()
    manifest_digest = "sha256:" + hashlib.sha256(body).hexdigest()
    manifest = parse_manifest_or_index(body, OCI_MANIFEST, f"manifest of {reference}")
    assert isinstance(manifest, Manifest)
    writers = {d.digest: w for d, w in layers}

    def source(d: Descriptor) -> Callable[[BinaryIO], None]:
        if d.digest == config_desc.digest:

            def write_config(out: BinaryIO) -> None:
                out.write(config_body)

            return write_config
        return writers[d.digest]

    parsed = parse_reference(reference)
    aliases = [reference] if tag else []
    aliases.append(f"{parsed.name}@{manifest_digest}")
    return store.install(reference, manifest_digest, body, manifest, source, aliases)


def _import_docker_save(
    store: ImageStore, path: Path, name: str | None, opener: _Opener, tag: bool = True
) -> Image:
    entries = _read_json(opener, "manifest.json", path, MAX_MANIFEST_BYTES)
    if (
        not isinstance(entries, list)
        or not entries
        or not all(isinstance(e, dict) for e in entries)
    ):
        raise ImageError(f"{path}: manifest.json is not a non-empty list of images.")
    entry = entries[0]
    if name:
        wanted = str(parse_reference(name))
        for e in entries:
            tags = [str(parse_reference(t)) for t in e.get("RepoTags") or [] if isinstance(t, str)]
            if wanted in tags:
                entry = e
                break
    config_rel, layer_rels = entry.get("Config"), entry.get("Layers")
    if not isinstance(config_rel, str) or not isinstance(layer_rels, list):
        raise ImageError(f"{path}: manifest.json entry lacks Config or Layers.")
    with opener(config_rel) as f:
        config_body = f.read(MAX_CONFIG_BYTES + 1)
    if len(config_body) > MAX_CONFIG_BYTES:
        raise ImageError(f"{path}: {config_rel} is larger than {MAX_CONFIG_BYTES} bytes.")
    layers: list[tuple[Descriptor, Callable[[BinaryIO], None]]] = []
    for rel in layer_rels:
        if not isinstance(rel, str):
            raise ImageError(f"{path}: manifest.json Layers has a non-string entry.")
        with opener(rel) as f:
            digest, size, head = _hash_stream(f)
        desc = Descriptor(_layer_type(head), digest, size)

        def write(out: BinaryIO, rel: str = rel, desc: Descriptor = desc) -> None:
            with opener(rel) as f:
                _copy_verified(f, desc, out, f"{path}: layer {rel}")

        layers.append((desc, write))
    tags = [t for t in entry.get("RepoTags") or [] if isinstance(t, str)]
    if name:
        reference = str(parse_reference(name))
    elif tags:
        reference = str(parse_reference(tags[0]))
    else:
        reference = _default_name(path)
    return _synthesized(store, reference, config_body, DOCKER_CONFIG, layers, tag)


def _shifted_back(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Undo the uid shift of files that come from an unpacked corral rootfs."""
    for attr in ("uid", "gid"):
        value = getattr(info, attr)
        if UID_BASE <= value < UID_BASE + ID_RANGE:
            setattr(info, attr, value - UID_BASE)
    info.uname = info.gname = ""
    return info


def _import_rootfs(store: ImageStore, path: Path, name: str | None, tag: bool = True) -> Image:
    reference = str(parse_reference(name)) if name else _default_name(path)
    fd, tmp = tempfile.mkstemp(dir=store.root / "tmp", prefix="import-")
    try:
        with (
            os.fdopen(fd, "wb") as out,
            tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            tar.add(path, arcname=".", recursive=True, filter=_shifted_back)
        with open(tmp, "rb") as f:
            digest, size, _ = _hash_stream(f)
        desc = Descriptor("application/vnd.oci.image.layer.v1.tar", digest, size)

        def write(out: BinaryIO) -> None:
            with open(tmp, "rb") as f:
                _copy_verified(f, desc, out, f"layer made from {path}")

        config = {
            "architecture": host_target().architecture,
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [digest]},
        }
        body = json.dumps(config, sort_keys=True).encode()
        return _synthesized(store, reference, body, OCI_CONFIG, [(desc, write)], tag)
    except OSError as exc:
        raise ImageError(f"importing {path} failed: {exc.strerror or exc}.") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


# --- images run straight from a path ---------------------------------------------------------

#: What ``corral run`` takes for a path rather than an image name: references never start
#: with "/" or "." (their grammar has no such component), so these are unambiguous.
_PATH_PREFIXES = ("/", "./", "../", "~")

#: The cache of path imports: source path -> fingerprint and the image it gave.
SOURCES_FILE = "sources.json"


def looks_like_path(image: str) -> bool:
    """True when ``image`` (as given to ``run``/``create``) is a path, not a name."""
    return image in (".", "..") or image.startswith(_PATH_PREFIXES)


def fingerprint(path: Path) -> str:
    """A digest of what ``path`` holds as far as stat tells (names, types, modes, owners,
    sizes, mtimes in ns, inode numbers, link targets; a tar file's own stat), without
    reading file contents: a changed file changes its size or mtime (or, if replaced, its
    inode), so a changed source is imported again while an unchanged one costs a walk."""
    hasher = hashlib.sha256()

    def add(rel: str, st: os.stat_result, target: str = "") -> None:
        hasher.update(
            f"{rel}\0{st.st_mode}\0{st.st_uid}\0{st.st_gid}\0{st.st_size}\0"
            f"{st.st_mtime_ns}\0{st.st_ino}\0{st.st_dev}\0{target}\n".encode(
                "utf-8", "surrogateescape"
            )
        )

    top = os.lstat(path)
    add(".", top)
    if path.is_dir():
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            for entry in sorted(dirnames + filenames):
                full = os.path.join(dirpath, entry)
                st = os.lstat(full)
                link = os.readlink(full) if os.path.islink(full) else ""
                add(os.path.relpath(full, path), st, link)
    return "sha256:" + hasher.hexdigest()


def import_cached(store: ImageStore, path: Path) -> Image:
    """The image of a rootfs directory, OCI layout or docker-save tar at ``path``, imported
    on first use and again only when the source changed (see :func:`fingerprint`).

    Path imports get no tag (only ``localhost/<name>@<digest>``), so running a directory
    never takes over a name; the Image's ``reference`` is the absolute path, as shown by
    ``corral ls``. Same content, same digest: two copies of one tree share one image.
    """
    source = Path(os.path.expanduser(str(path))).resolve()
    if not source.exists():
        raise ImageError(f"image path {path} does not exist.")
    try:
        mark = fingerprint(source)
    except OSError as exc:
        raise ImageError(f"image path {source} cannot be read: {exc.strerror or exc}.") from None
    key = str(source)
    with store._lock("sources"):
        cached = _read_sources(store).get(key)
    if isinstance(cached, dict) and cached.get("fingerprint") == mark:
        digest = str(cached.get("digest", ""))
        image = store._load(digest, key) if digest.startswith("sha256:") else None
        if image is not None and image.rootfs.is_dir():
            return dataclasses.replace(image, reference=key)
    image = import_path(store, source, None, tag=False)
    with store.busy(), store._lock("sources"):
        sources = _read_sources(store)
        sources[key] = {"fingerprint": mark, "digest": image.digest}
        _write_sources(store, sources)
    return dataclasses.replace(image, reference=key)


def _read_sources(store: ImageStore) -> dict[str, Any]:
    try:
        data = json.loads((store.root / SOURCES_FILE).read_text())
    except (OSError, ValueError):
        return {}  # a lost cache costs one import, nothing else
    return data if isinstance(data, dict) else {}


def _write_sources(store: ImageStore, sources: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=store.root / "tmp", prefix="sources-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(sources, f, indent=1, sort_keys=True)
        os.replace(tmp, store.root / SOURCES_FILE)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
