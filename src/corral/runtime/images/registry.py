"""A client of the OCI distribution API (v2): manifests and blobs, with auth and TLS.

The stdlib's http.client does the HTTP; this module adds what a registry needs on top: the
401 challenge dance (Bearer tokens from a realm, cached per scope until they expire, or
Basic), redirects for blobs (registries hand blobs to a CDN), TLS with the system roots plus
an extra CA bundle, plain HTTP only where allowed (see auth.py), timeouts on every socket, and
verification of every byte against its digest while it streams.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from corral.errors import ImageError
from corral.runtime.images import auth
from corral.runtime.images.manifest import ACCEPT_MANIFESTS, MAX_MANIFEST_BYTES, Descriptor
from corral.runtime.images.reference import DEFAULT_REGISTRY, ImageRef

#: A registry (host[:port]) that serves docker.io's repositories instead of Docker Hub, as
#: docker's ``registry-mirrors``: a company cache, or an offline world's own registry. Plain
#: HTTP only when it is also in CORRAL_INSECURE_REGISTRIES.
MIRROR_ENV = "CORRAL_REGISTRY_MIRROR"

#: Seconds to wait for a connection or for the next bytes of a response. A registry that is
#: silent this long is down for our purposes; layers stream, so this is not a whole-blob limit.
NETWORK_TIMEOUT = 30.0
#: Redirect hops we follow (registries redirect blobs once, to a CDN; 5 is curl's habit x1).
MAX_REDIRECTS = 5
#: Read size while streaming blobs: big enough for throughput, small enough for progress.
CHUNK_SIZE = 1024 * 1024
#: Token lifetime when the token server does not say (the distribution spec's default).
DEFAULT_TOKEN_SECONDS = 60
#: Refresh a cached token this many seconds before it expires, so it does not expire in flight.
TOKEN_MARGIN_SECONDS = 5
#: A token response is a small JSON object; cap what we read from a token server.
MAX_TOKEN_RESPONSE_BYTES = 1024 * 1024
#: How much of an error body we read to find the registry's error message.
MAX_ERROR_BODY_BYTES = 64 * 1024

_REDIRECTS = (301, 302, 303, 307, 308)


@dataclass
class RegistryResponse:
    """A response whose body is still on the wire; ``close()`` it (it owns the connection)."""

    status: int
    headers: http.client.HTTPMessage
    raw: http.client.HTTPResponse
    conn: http.client.HTTPConnection

    def read_limited(self, limit: int, what: str) -> bytes:
        data = self.raw.read(limit + 1)
        if len(data) > limit:
            self.close()
            raise ImageError(f"{what} is larger than the {limit} bytes allowed.")
        return data

    def close(self) -> None:
        self.conn.close()


def _digest_hasher(digest: str) -> hashlib._Hash:
    algo = digest.split(":", 1)[0]
    return hashlib.sha512() if algo == "sha512" else hashlib.sha256()


def _registry_error(body: bytes) -> str:
    """The first message of a registry's JSON error body, or ''."""
    try:
        doc = json.loads(body)
        err = doc["errors"][0]
        return f"{err.get('code', '')}: {err.get('message', '')}".strip(": ")
    except (ValueError, KeyError, IndexError, TypeError):
        return ""


class RegistryClient:
    """Talks to registries for one store; caches bearer tokens across requests."""

    def __init__(
        self,
        *,
        ca_file: Path | str | None = None,
        insecure_registries: Iterable[str] = (),
        auth_file: Path | None = None,
        timeout: float = NETWORK_TIMEOUT,
    ) -> None:
        self.timeout = timeout
        self.auth_file = auth_file
        self.insecure = auth.insecure_registries(insecure_registries)
        ca = ca_file or os.environ.get(auth.CA_FILE_ENV)
        self._ca_file = str(ca) if ca else None
        if self._ca_file is not None and not os.path.isfile(self._ca_file):
            raise ImageError(f"registry CA bundle {self._ca_file} cannot be loaded (no such file).")
        # Built on first HTTPS use: loading the system roots costs ~20 ms, and a store that
        # only resolves cached images (every sandbox start) never needs it.
        self._tls: ssl.SSLContext | None = None
        self._tls_lock = threading.Lock()
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}
        self._basic: dict[str, str] = {}
        mirror = os.environ.get(MIRROR_ENV, "").strip()
        #: Where docker.io's images are fetched from instead (docker's registry-mirrors).
        self.mirror = mirror or None

    # -- transport ------------------------------------------------------------------------
    def _tls_context(self) -> ssl.SSLContext:
        with self._tls_lock:
            if self._tls is None:
                context = ssl.create_default_context()
                if self._ca_file is not None:
                    try:
                        context.load_verify_locations(cafile=self._ca_file)
                    except (OSError, ssl.SSLError) as exc:
                        raise ImageError(
                            f"registry CA bundle {self._ca_file} cannot be loaded ({exc})."
                        ) from None
                self._tls = context
            return self._tls

    def _base_url(self, host: str) -> str:
        scheme = "http" if auth.is_insecure(host, self.insecure) else "https"
        return f"{scheme}://{host}"

    def _send(
        self, method: str, url: str, headers: dict[str, str], body: bytes | BinaryIO | None
    ) -> RegistryResponse:
        parts = urllib.parse.urlsplit(url)
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(
                parts.netloc, timeout=self.timeout, context=self._tls_context()
            )
        elif parts.scheme == "http":
            conn = http.client.HTTPConnection(parts.netloc, timeout=self.timeout)
        else:
            raise ImageError(f"registry sent a URL with unsupported scheme: {url}.")
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        try:
            conn.request(method, target, body=body, headers={"User-Agent": "corral", **headers})
            raw = conn.getresponse()
        except ssl.SSLCertVerificationError as exc:
            conn.close()
            raise ImageError(
                f"TLS certificate of {parts.netloc} is not trusted ({exc.verify_message}); "
                f"give its CA bundle with {auth.CA_FILE_ENV}."
            ) from None
        except (ssl.SSLError, http.client.HTTPException) as exc:
            conn.close()
            raise ImageError(f"registry {parts.netloc} failed the request ({exc}).") from None
        except TimeoutError:
            conn.close()
            raise ImageError(
                f"registry {parts.netloc} did not answer within {self.timeout:g} seconds."
            ) from None
        except OSError as exc:
            conn.close()
            reason = exc.strerror or str(exc)
            raise ImageError(f"registry {parts.netloc} cannot be reached ({reason}).") from None
        return RegistryResponse(raw.status, raw.headers, raw, conn)

    def _send_following(
        self, method: str, url: str, headers: dict[str, str], body: bytes | BinaryIO | None
    ) -> RegistryResponse:
        origin = urllib.parse.urlsplit(url).netloc
        for _ in range(MAX_REDIRECTS + 1):
            resp = self._send(method, url, headers, body)
            if resp.status not in _REDIRECTS:
                return resp
            location = resp.headers.get("Location")
            resp.close()
            if not location:
                raise ImageError(f"registry {origin} sent a redirect without a Location.")
            url = urllib.parse.urljoin(url, location)
            if urllib.parse.urlsplit(url).netloc != origin:
                # Credentials are for the registry, never for the CDN it redirects to.
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        raise ImageError(f"registry {origin} redirected more than {MAX_REDIRECTS} times.")

    # -- auth -----------------------------------------------------------------------------
    def _fetch_token(self, host: str, challenge: auth.Challenge, scope: str) -> tuple[str, float]:
        realm = challenge.params.get("realm")
        if not realm:
            raise ImageError(f"registry {host} asked for a bearer token without a realm.")
        realm_parts = urllib.parse.urlsplit(realm)
        if realm_parts.scheme != "https" and not (
            realm_parts.scheme == "http" and auth.is_insecure(realm_parts.netloc, self.insecure)
        ):
            raise ImageError(
                f"token server {realm} of registry {host} is not HTTPS and not listed in "
                f"{auth.INSECURE_ENV}."
            )
        query = {"scope": challenge.params.get("scope", scope)}
        if "service" in challenge.params:
            query["service"] = challenge.params["service"]
        url = realm + ("&" if realm_parts.query else "?") + urllib.parse.urlencode(query)
        headers: dict[str, str] = {}
        creds = auth.load_credentials(host, self.auth_file)
        if creds is not None:
            headers["Authorization"] = creds.basic_header()
        resp = self._send_following("GET", url, headers, None)
        try:
            body = resp.read_limited(MAX_TOKEN_RESPONSE_BYTES, f"token response from {realm}")
        finally:
            resp.close()
        if resp.status in (401, 403):
            hint = "" if creds else f"; set {auth.USER_ENV}/{auth.PASSWORD_ENV} or auth.json"
            raise ImageError(
                f"token server {realm} refused credentials for {host} (HTTP {resp.status}){hint}."
            )
        if resp.status != 200:
            raise ImageError(f"token server {realm} answered HTTP {resp.status}.")
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
            lifetime = int(doc.get("expires_in") or DEFAULT_TOKEN_SECONDS)
        except (ValueError, AttributeError, TypeError):
            raise ImageError(f"token server {realm} sent an unreadable token response.") from None
        if not isinstance(token, str) or not token:
            raise ImageError(f"token server {realm} sent no token.")
        return token, time.monotonic() + max(lifetime - TOKEN_MARGIN_SECONDS, 1)

    def _auth_header(self, host: str, scope: str) -> str | None:
        cached = self._tokens.get((host, scope))
        if cached and cached[1] > time.monotonic():
            return f"Bearer {cached[0]}"
        return self._basic.get(host)

    def _answer_challenge(self, host: str, header: str | None, scope: str) -> str:
        if not header:
            raise ImageError(f"registry {host} answered 401 without an auth challenge.")
        challenge = auth.parse_challenge(header)
        if challenge.scheme == "bearer":
            token, expiry = self._fetch_token(host, challenge, scope)
            self._tokens[(host, scope)] = (token, expiry)
            return f"Bearer {token}"
        if challenge.scheme == "basic":
            creds = auth.load_credentials(host, self.auth_file)
            if creds is None:
                raise ImageError(
                    f"registry {host} requires a login; set {auth.USER_ENV} and "
                    f"{auth.PASSWORD_ENV}, or add {host} to auth.json in CORRAL_HOME."
                )
            self._basic[host] = creds.basic_header()
            return self._basic[host]
        raise ImageError(f"registry {host} asks for unsupported auth scheme {challenge.scheme!r}.")

    def request(
        self,
        method: str,
        host: str,
        repository: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        actions: tuple[str, ...] = ("pull",),
    ) -> RegistryResponse:
        """Send an authorised request to ``/v2/<repository>/<path>`` (or a full URL path).

        ``path`` starting with ``/`` or a scheme is used as is (upload Locations). On 401 the
        challenge is answered once and the request repeated.
        """
        if "://" in path:
            url = path
        elif path.startswith("/"):
            url = self._base_url(host) + path
        else:
            url = f"{self._base_url(host)}/v2/{repository}/{path}"
        scope = f"repository:{repository}:{','.join(actions)}"
        hdrs = dict(headers or {})
        cached = self._auth_header(host, scope)
        if cached:
            hdrs["Authorization"] = cached
        resp = self._send_following(method, url, hdrs, body)
        if resp.status == 401:
            challenge = resp.headers.get("WWW-Authenticate")
            resp.close()
            hdrs["Authorization"] = self._answer_challenge(host, challenge, scope)
            resp = self._send_following(method, url, hdrs, body)
            if resp.status == 401:
                resp.close()
                raise ImageError(f"registry {host} refused the credentials for {repository}.")
        return resp

    def _fail(self, resp: RegistryResponse, what: str, ref: ImageRef) -> ImageError:
        try:
            detail = _registry_error(resp.raw.read(MAX_ERROR_BODY_BYTES))
        except (OSError, http.client.HTTPException):
            detail = ""
        finally:
            resp.close()
        suffix = f" ({detail})" if detail else ""
        if resp.status == 404:
            return ImageError(f"{what} of image {ref} was not found in {ref.registry}{suffix}.")
        if resp.status == 403:
            return ImageError(f"registry {ref.registry} denied access to {what} of {ref}{suffix}.")
        return ImageError(
            f"registry {ref.registry} answered HTTP {resp.status} for {what} of {ref}{suffix}."
        )

    def endpoint(self, ref: ImageRef) -> str:
        """The host:port a reference's manifests and blobs are fetched from: the mirror for
        docker.io when ``CORRAL_REGISTRY_MIRROR`` names one, else the registry's API host."""
        if self.mirror is not None and ref.registry == DEFAULT_REGISTRY:
            return self.mirror
        return ref.api_host

    # -- the two things a pull needs ------------------------------------------------------
    def get_manifest(self, ref: ImageRef, identifier: str | None = None) -> tuple[bytes, str, str]:
        """Fetch a manifest or index: (body, content type, digest of the body).

        When fetched by digest the body must hash to it; when by tag the registry's
        Docker-Content-Digest (if sent) must agree with the body.
        """
        ident = identifier or ref.identifier
        resp = self.request(
            "GET",
            self.endpoint(ref),
            ref.repository,
            f"manifests/{ident}",
            headers={"Accept": ACCEPT_MANIFESTS},
        )
        if resp.status != 200:
            raise self._fail(resp, f"manifest {ident}", ref)
        try:
            body = resp.read_limited(MAX_MANIFEST_BYTES, f"manifest {ident} of {ref}")
        except (OSError, http.client.HTTPException) as exc:
            raise ImageError(
                f"registry {ref.registry} broke off manifest {ident} ({exc})."
            ) from None
        finally:
            resp.close()
        content_type = resp.headers.get("Content-Type", "")
        if ident.startswith(("sha256:", "sha512:")):
            h = _digest_hasher(ident)
            h.update(body)
            actual = f"{ident.split(':')[0]}:{h.hexdigest()}"
            if actual != ident:
                raise ImageError(
                    f"manifest of image {ref} has digest {actual}, not the requested {ident}."
                )
            return body, content_type, ident
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        claimed = resp.headers.get("Docker-Content-Digest")
        if claimed and claimed.startswith("sha256:") and claimed != digest:
            raise ImageError(
                f"manifest of image {ref} hashes to {digest} but the registry says {claimed}."
            )
        return body, content_type, digest

    def fetch_blob(
        self,
        ref: ImageRef,
        desc: Descriptor,
        out: BinaryIO,
        advance: Callable[[int], None] | None = None,
    ) -> None:
        """Stream blob ``desc`` into ``out``, verifying size and digest; raise on mismatch.

        The caller owns ``out`` (a temp file) and must discard it when this raises.
        """
        resp = self.request("GET", self.endpoint(ref), ref.repository, f"blobs/{desc.digest}")
        if resp.status != 200:
            raise self._fail(resp, f"blob {desc.digest}", ref)
        hasher = _digest_hasher(desc.digest)
        received = 0
        try:
            while True:
                chunk = resp.raw.read(min(CHUNK_SIZE, desc.size - received + 1))
                if not chunk:
                    break
                received += len(chunk)
                if received > desc.size:
                    raise ImageError(
                        f"blob {desc.digest} of {ref} is larger than the {desc.size} bytes "
                        "its manifest declares."
                    )
                hasher.update(chunk)
                out.write(chunk)
                if advance is not None:
                    advance(len(chunk))
        except TimeoutError:
            raise ImageError(
                f"registry {ref.registry} stalled for {self.timeout:g} s while sending blob "
                f"{desc.digest} ({received} of {desc.size} bytes)."
            ) from None
        except (http.client.HTTPException, ConnectionError) as exc:
            raise ImageError(
                f"registry {ref.registry} broke off blob {desc.digest} after {received} of "
                f"{desc.size} bytes ({type(exc).__name__})."
            ) from None
        finally:
            resp.close()
        if received != desc.size:
            raise ImageError(
                f"blob {desc.digest} of {ref} is truncated: {received} of {desc.size} bytes."
            )
        actual = f"{desc.digest.split(':')[0]}:{hasher.hexdigest()}"
        if actual != desc.digest:
            raise ImageError(
                f"blob {desc.digest} of {ref} failed verification: its content hashes to "
                f"{actual}."
            )
