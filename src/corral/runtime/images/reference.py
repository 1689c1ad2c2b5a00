"""Image references, parsed and normalised the way Docker does (pure; no I/O).

``alpine`` means ``docker.io/library/alpine:latest``; a first component containing ``.`` or
``:`` (or equal to ``localhost``, or with upper case) is a registry host. The grammar follows
distribution's ``reference`` package so that a name that works with ``docker pull`` works here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from corral.errors import ImageError

#: Registry a reference without a host refers to.
DEFAULT_REGISTRY = "docker.io"
#: Where docker.io's registry API actually lives.
DOCKER_HUB_API_HOST = "registry-1.docker.io"
#: Docker Hub's namespace for official images (``alpine`` is ``library/alpine``).
OFFICIAL_NAMESPACE = "library"
DEFAULT_TAG = "latest"

#: distribution's limit on the whole name (host + path): longer names are rejected by registries.
MAX_NAME_LENGTH = 255
#: The longest reference string we even look at; longer input is garbage, not a name.
MAX_REFERENCE_LENGTH = 1024

_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_HOST_LABEL = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_DOMAIN = re.compile(rf"(?:{_HOST_LABEL}(?:\.{_HOST_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{{1,5}})?")
#: Digest algorithms we can verify, with the length of their hex encoding.
DIGEST_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[a-f0-9]+")


def validate_digest(digest: str, what: str = "digest") -> str:
    """Return ``digest`` if it is ``sha256:<64 lowercase hex>`` (or sha512), else raise."""
    algo, sep, hexpart = digest.partition(":")
    if not sep or algo not in DIGEST_HEX_LENGTH:
        raise ImageError(f"{what} {digest!r} is not of the form sha256:<hex>.")
    if len(hexpart) != DIGEST_HEX_LENGTH[algo] or not _HEX.fullmatch(hexpart):
        raise ImageError(
            f"{what} {digest!r} must have {DIGEST_HEX_LENGTH[algo]} lowercase hex digits."
        )
    return digest


@dataclass(frozen=True)
class ImageRef:
    """A normalised reference: ``registry/repository[:tag][@digest]``."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> ImageRef:
        return parse_reference(text)

    @property
    def name(self) -> str:
        """``registry/repository`` without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """The host:port that serves the registry API for this reference."""
        return DOCKER_HUB_API_HOST if self.registry == DEFAULT_REGISTRY else self.registry

    @property
    def identifier(self) -> str:
        """What to ask the manifest endpoint for: the digest if pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def _split_domain(name: str) -> tuple[str, str]:
    first, sep, rest = name.partition("/")
    if sep and (any(c in first for c in ".:") or first == "localhost" or first != first.lower()):
        domain, path = first, rest
    else:
        domain, path = DEFAULT_REGISTRY, name
    if domain == "index.docker.io":
        domain = DEFAULT_REGISTRY
    if domain == DEFAULT_REGISTRY and "/" not in path:
        path = f"{OFFICIAL_NAMESPACE}/{path}"
    return domain, path


def parse_reference(text: str) -> ImageRef:
    """Parse and normalise ``text``; raise ImageError with one sentence saying what is wrong."""
    if not isinstance(text, str) or not text:
        raise ImageError("image reference is empty.")
    if len(text) > MAX_REFERENCE_LENGTH:
        raise ImageError(f"image reference is longer than {MAX_REFERENCE_LENGTH} characters.")
    if text != text.strip() or any(c.isspace() for c in text):
        raise ImageError(f"image reference {text!r} contains whitespace.")
    remainder, at, digest = text.partition("@")
    digest_value: str | None = None
    if at:
        digest_value = validate_digest(digest, f"digest of image reference {text!r}")
    tag: str | None = None
    slash = remainder.rfind("/")
    colon = remainder.rfind(":")
    if colon > slash:
        remainder, tag = remainder[:colon], remainder[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise ImageError(
                f"tag {tag!r} of image reference {text!r} must be 1-128 of [A-Za-z0-9_.-] "
                "not starting with '.' or '-'."
            )
    if not remainder:
        raise ImageError(f"image reference {text!r} has no repository name.")
    domain, path = _split_domain(remainder)
    if not _DOMAIN.fullmatch(domain):
        raise ImageError(f"registry host {domain!r} of image reference {text!r} is not valid.")
    port = domain.rpartition(":")[2] if not domain.endswith("]") and ":" in domain else None
    if port is not None and not 0 < int(port) < 65536:
        raise ImageError(f"registry port {port} of image reference {text!r} is out of range.")
    for component in path.split("/"):
        if not _PATH_COMPONENT.fullmatch(component):
            raise ImageError(
                f"repository component {component!r} of image reference {text!r} must be "
                "lowercase letters and digits separated by '.', '_', '__' or '-'."
            )
    if len(domain) + 1 + len(path) > MAX_NAME_LENGTH:
        raise ImageError(
            f"repository name of image reference {text!r} is longer than {MAX_NAME_LENGTH}."
        )
    if tag is None and digest_value is None:
        tag = DEFAULT_TAG
    return ImageRef(domain, path, tag, digest_value)
