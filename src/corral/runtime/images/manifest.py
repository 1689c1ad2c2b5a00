"""Manifests, indexes and image configs: decoding and platform selection (pure; no I/O).

Registries serve four JSON shapes for one tag: an OCI or Docker v2 *manifest* (config +
layers) or an OCI *index* / Docker *manifest list* (one manifest per platform). Everything
here takes bytes that came from the network and returns checked values or raises ImageError.
"""

from __future__ import annotations

import json
import platform as host_platform
from dataclasses import dataclass
from typing import Any

from corral.errors import ImageError
from corral.runtime.images.reference import validate_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
#: What we send as Accept: single-platform manifests first, then indexes.
ACCEPT_MANIFESTS = ", ".join(MANIFEST_TYPES + INDEX_TYPES)

#: Layer media types we can unpack (compression is also sniffed from the bytes themselves).
LAYER_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.zstd",
    }
)

#: distribution refuses manifests over 4 MiB when they are pushed; anything larger is not one.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
#: An image config is a few KiB (history can make it a few hundred); 8 MiB is generous.
MAX_CONFIG_BYTES = 8 * 1024 * 1024
#: More layers than this is not a real image (Docker's own limit on a stack is 125 layers).
MAX_LAYERS = 256

#: uname machine -> OCI architecture (and variant) names.
_ARCH = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i686": ("386", None),
    "i386": ("386", None),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text


def host_target() -> Platform:
    """The platform images are selected for: linux on this machine's architecture."""
    machine = host_platform.machine()
    arch, variant = _ARCH.get(machine, (machine, None))
    return Platform("linux", arch, variant)


@dataclass(frozen=True)
class Descriptor:
    """A pointer to a blob: media type, digest, size (and platform for index entries)."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: tuple[tuple[str, str], ...] = ()

    def annotation(self, key: str) -> str | None:
        return dict(self.annotations).get(key)


@dataclass(frozen=True)
class Manifest:
    """A single-platform image: its config blob and its layers, bottom first."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class Index:
    """A multi-platform image: one manifest descriptor per platform."""

    media_type: str
    manifests: tuple[Descriptor, ...]


def _load_json(data: bytes, what: str, limit: int) -> dict[str, Any]:
    if len(data) > limit:
        raise ImageError(f"{what} is {len(data)} bytes, more than the {limit} allowed.")
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageError(f"{what} is not valid JSON ({exc}).") from None
    if not isinstance(value, dict):
        raise ImageError(f"{what} is not a JSON object.")
    return value


def _descriptor(raw: Any, what: str) -> Descriptor:
    if not isinstance(raw, dict):
        raise ImageError(f"{what} is not a JSON object.")
    media_type = raw.get("mediaType")
    digest = raw.get("digest")
    size = raw.get("size")
    if not isinstance(media_type, str):
        raise ImageError(f"{what}.mediaType is missing or not a string.")
    if not isinstance(digest, str):
        raise ImageError(f"{what}.digest is missing or not a string.")
    validate_digest(digest, f"{what}.digest")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageError(f"{what}.size is missing or not a non-negative integer.")
    plat = None
    raw_plat = raw.get("platform")
    if isinstance(raw_plat, dict):
        os_name, arch = raw_plat.get("os"), raw_plat.get("architecture")
        variant = raw_plat.get("variant")
        if isinstance(os_name, str) and isinstance(arch, str):
            plat = Platform(os_name, arch, variant if isinstance(variant, str) else None)
    ann = raw.get("annotations")
    annotations: tuple[tuple[str, str], ...] = ()
    if isinstance(ann, dict):
        annotations = tuple(
            (k, v) for k, v in sorted(ann.items()) if isinstance(k, str) and isinstance(v, str)
        )
    return Descriptor(media_type, digest, size, plat, annotations)


def parse_manifest_or_index(
    data: bytes, content_type: str | None, what: str = "manifest"
) -> Manifest | Index:
    """Decode a manifest or index; the media type comes from the body, else the header."""
    doc = _load_json(data, what, MAX_MANIFEST_BYTES)
    media_type = doc.get("mediaType") or (content_type or "").split(";")[0].strip()
    if not media_type:
        # OCI allows omitting mediaType; the shape tells which one it is.
        media_type = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    if doc.get("schemaVersion") != 2:
        raise ImageError(
            f"{what} has schemaVersion {doc.get('schemaVersion')!r}; only 2 is supported "
            "(Docker schema 1 images are deprecated: re-push the image)."
        )
    if media_type in INDEX_TYPES:
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise ImageError(f"{what}.manifests is missing or not a list.")
        return Index(
            media_type,
            tuple(_descriptor(e, f"{what}.manifests[{i}]") for i, e in enumerate(entries)),
        )
    if media_type in MANIFEST_TYPES:
        config = _descriptor(doc.get("config"), f"{what}.config")
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise ImageError(f"{what}.layers is missing or not a list.")
        if len(layers) > MAX_LAYERS:
            raise ImageError(f"{what} has {len(layers)} layers, more than {MAX_LAYERS}.")
        descs = tuple(_descriptor(e, f"{what}.layers[{i}]") for i, e in enumerate(layers))
        for i, d in enumerate(descs):
            if d.media_type not in LAYER_TYPES:
                raise ImageError(
                    f"{what}.layers[{i}] has media type {d.media_type!r}, which corral "
                    "cannot unpack (foreign or non-tar layer)."
                )
        return Manifest(media_type, config, descs)
    raise ImageError(f"{what} has unsupported media type {media_type!r}.")


def select_platform(index: Index, target: Platform, what: str = "image") -> Descriptor:
    """The manifest of ``index`` for ``target``; an exact variant match wins over none."""
    candidates = [
        d
        for d in index.manifests
        if d.platform is not None
        and d.platform.os == target.os
        and d.platform.architecture == target.architecture
        and d.media_type in MANIFEST_TYPES
    ]
    if target.variant is not None:
        exact = [d for d in candidates if d.platform and d.platform.variant == target.variant]
        unvaried = [d for d in candidates if d.platform and d.platform.variant is None]
        candidates = exact or unvaried or candidates
    if not candidates:
        available = sorted({str(d.platform) for d in index.manifests if d.platform})
        raise ImageError(
            f"{what} has no {target} variant (available: {', '.join(available) or 'none'})."
        )
    return candidates[0]


@dataclass(frozen=True)
class ImageConfig:
    """What matters of an image config: the run settings and the uncompressed layer digests."""

    config: dict[str, Any]
    diff_ids: tuple[str, ...]
    created: str | None
    platform: Platform | None


def parse_config(data: bytes, what: str = "image config") -> ImageConfig:
    doc = _load_json(data, what, MAX_CONFIG_BYTES)
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
        raise ImageError(f"{what}.rootfs.diff_ids is missing or not a list.")
    diff_ids = []
    for i, d in enumerate(rootfs["diff_ids"]):
        if not isinstance(d, str):
            raise ImageError(f"{what}.rootfs.diff_ids[{i}] is not a string.")
        diff_ids.append(validate_digest(d, f"{what}.rootfs.diff_ids[{i}]"))
    config = doc.get("config") or {}
    if not isinstance(config, dict):
        raise ImageError(f"{what}.config is not a JSON object.")
    created = doc.get("created")
    os_name, arch = doc.get("os"), doc.get("architecture")
    plat = Platform(os_name, arch) if isinstance(os_name, str) and isinstance(arch, str) else None
    return ImageConfig(config, tuple(diff_ids), created if isinstance(created, str) else None, plat)
