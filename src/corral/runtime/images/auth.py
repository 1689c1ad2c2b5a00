"""Registry authentication: challenges, credentials, the insecure-registry rule.

Decisions (see docs/images.md):

* Credentials come from env ``CORRAL_REGISTRY_USER`` / ``CORRAL_REGISTRY_PASSWORD`` (used for
  every registry that asks, meant for CI with one private registry), else from
  ``$CORRAL_HOME/auth.json`` in the ``~/.docker/config.json`` format
  (``{"auths": {"host:port": {"auth": base64("user:pass")}}}``; ``username``/``password``
  keys are accepted too). They are sent only when a registry answers 401 with a challenge.
* Plain HTTP is used only for registries in env ``CORRAL_INSECURE_REGISTRIES``
  (comma-separated ``host[:port]``), or passed as ``insecure_registries``, and for loopback
  hosts (``localhost``, ``127.0.0.1``, ``[::1]``), as Docker does. Everything else is HTTPS with
  the system roots plus an optional extra CA bundle.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from corral.errors import ImageError

USER_ENV = "CORRAL_REGISTRY_USER"
PASSWORD_ENV = "CORRAL_REGISTRY_PASSWORD"
INSECURE_ENV = "CORRAL_INSECURE_REGISTRIES"
CA_FILE_ENV = "CORRAL_REGISTRY_CA_FILE"

#: Hosts that are always allowed over plain HTTP (a registry on the same machine).
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
#: Docker Hub's credentials live under this legacy key in docker's config.json.
DOCKER_HUB_AUTH_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io")
#: A WWW-Authenticate header longer than this is not a real challenge.
MAX_CHALLENGE_LENGTH = 8192


@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: the scheme (lowercased) and its parameters."""

    scheme: str
    params: dict[str, str]


_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]*))\s*(,|$)')


def parse_challenge(header: str) -> Challenge:
    """Parse ``Bearer realm="...",service="...",scope="..."`` (or ``Basic realm=...``)."""
    if len(header) > MAX_CHALLENGE_LENGTH:
        raise ImageError("registry sent a WWW-Authenticate header that is too long.")
    header = header.strip()
    scheme, _, rest = header.partition(" ")
    if not scheme or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", scheme):
        raise ImageError(f"registry sent an unreadable WWW-Authenticate header {header!r}.")
    params: dict[str, str] = {}
    pos = 0
    rest = rest.strip()
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if not m:
            raise ImageError(f"registry sent an unreadable WWW-Authenticate header {header!r}.")
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = m.end()
    return Challenge(scheme.lower(), params)


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


def load_credentials(registry: str, auth_file: Path | None) -> Credentials | None:
    """Credentials for ``registry`` (a host[:port]) following the module's rule, or None."""
    user, password = os.environ.get(USER_ENV), os.environ.get(PASSWORD_ENV)
    if user and password is not None:
        return Credentials(user, password)
    if auth_file is None or not auth_file.is_file():
        return None
    try:
        doc = json.loads(auth_file.read_text())
    except (OSError, ValueError) as exc:
        raise ImageError(f"credentials file {auth_file} cannot be read ({exc}).") from None
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        return None
    keys = [registry, f"https://{registry}", f"http://{registry}", f"https://{registry}/v1/"]
    if registry in ("docker.io", "registry-1.docker.io"):
        keys += list(DOCKER_HUB_AUTH_KEYS)
    for key in keys:
        entry = auths.get(key)
        if not isinstance(entry, dict):
            continue
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                user_pass = base64.b64decode(entry["auth"], validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise ImageError(
                    f"credentials file {auth_file}: auths[{key!r}].auth is not base64 of "
                    "user:password."
                ) from None
            user, sep, password = user_pass.partition(":")
            if not sep:
                raise ImageError(
                    f"credentials file {auth_file}: auths[{key!r}].auth has no ':' "
                    "between user and password."
                )
            return Credentials(user, password)
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return Credentials(entry["username"], entry["password"])
    return None


def insecure_registries(extra: Iterable[str] = ()) -> frozenset[str]:
    """Registries allowed over plain HTTP: the env list, ``extra`` and loopback hosts."""
    listed = [h.strip() for h in os.environ.get(INSECURE_ENV, "").split(",")]
    return frozenset(h for h in [*listed, *extra] if h)


def is_insecure(host: str, allowed: frozenset[str]) -> bool:
    """True when ``host`` (host[:port]) may be spoken to in plain HTTP."""
    if host in allowed:
        return True
    bare = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return bare in LOOPBACK_HOSTS or bare in allowed
