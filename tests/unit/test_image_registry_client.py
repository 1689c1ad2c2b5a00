"""The registry client against a scripted HTTP server on loopback (allowed plain HTTP).

The real registry is exercised in tests/integration; this covers the edge cases a real
registry will not produce on demand: a blob whose bytes do not match, a blob longer than
declared, a redirect to another host, token caching.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from corral.errors import ImageError
from corral.runtime.images.manifest import OCI_MANIFEST, Descriptor
from corral.runtime.images.reference import parse_reference
from corral.runtime.images.registry import RegistryClient


@dataclass
class Script:
    routes: dict[str, tuple[int, dict[str, str], bytes]] = field(default_factory=dict)
    seen: list[tuple[str, str | None]] = field(default_factory=list)
    token_requests: int = 0


@pytest.fixture
def server() -> Iterator[tuple[str, Script]]:
    script = Script()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            auth = self.headers.get("Authorization")
            script.seen.append((self.path, auth))
            if self.path.startswith("/token"):
                script.token_requests += 1
                body = json.dumps({"token": "T1", "expires_in": 300}).encode()
                return self._send(200, {}, body)
            if self.path.startswith("/v2/secure/") and auth != "Bearer T1":
                realm = f'Bearer realm="http://{host}/token",service="svc"'
                return self._send(401, {"WWW-Authenticate": realm}, b"")
            route = script.routes.get(self.path)
            if route is None:
                err = {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}
                return self._send(404, {}, json.dumps(err).encode())
            self._send(*route)

        def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    host = f"127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield host, script
    finally:
        httpd.shutdown()
        httpd.server_close()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_blob_verification(server: tuple[str, Script]) -> None:
    host, script = server
    ref = parse_reference(f"{host}/repo/x:1")
    good = b"layer bytes" * 100
    desc = Descriptor("application/vnd.oci.image.layer.v1.tar", _digest(good), len(good))
    client = RegistryClient(timeout=5)
    script.routes[f"/v2/repo/x/blobs/{desc.digest}"] = (200, {}, good)
    out = io.BytesIO()
    client.fetch_blob(ref, desc, out)
    assert out.getvalue() == good

    script.routes[f"/v2/repo/x/blobs/{desc.digest}"] = (200, {}, good[:-1] + b"!")
    with pytest.raises(ImageError, match="failed verification"):
        client.fetch_blob(ref, desc, io.BytesIO())
    script.routes[f"/v2/repo/x/blobs/{desc.digest}"] = (200, {}, good + b"more")
    with pytest.raises(ImageError, match="larger than"):
        client.fetch_blob(ref, desc, io.BytesIO())
    script.routes[f"/v2/repo/x/blobs/{desc.digest}"] = (200, {}, good[:10])
    with pytest.raises(ImageError, match="truncated"):
        client.fetch_blob(ref, desc, io.BytesIO())
    missing = Descriptor(desc.media_type, "sha256:" + "0" * 64, 1)
    with pytest.raises(ImageError, match="not found"):
        client.fetch_blob(ref, missing, io.BytesIO())


def test_manifest_digests_are_checked(server: tuple[str, Script]) -> None:
    host, script = server
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST}).encode()
    script.routes["/v2/repo/m/manifests/good"] = (200, {"Content-Type": OCI_MANIFEST}, body)
    script.routes["/v2/repo/m/manifests/lying"] = (
        200,
        {"Docker-Content-Digest": "sha256:" + "1" * 64},
        body,
    )
    pinned = "sha256:" + "2" * 64
    script.routes[f"/v2/repo/m/manifests/{pinned}"] = (200, {}, body)
    client = RegistryClient(timeout=5)
    got, ctype, digest = client.get_manifest(parse_reference(f"{host}/repo/m:good"))
    assert (got, ctype, digest) == (body, OCI_MANIFEST, _digest(body))
    with pytest.raises(ImageError, match="but the registry says"):
        client.get_manifest(parse_reference(f"{host}/repo/m:lying"))
    with pytest.raises(ImageError, match="not the requested"):
        client.get_manifest(parse_reference(f"{host}/repo/m@{pinned}"))
    with pytest.raises(ImageError, match=r"not found in .*MANIFEST_UNKNOWN"):
        client.get_manifest(parse_reference(f"{host}/repo/m:absent"))


def test_token_is_fetched_once_and_reused(server: tuple[str, Script]) -> None:
    host, script = server
    data = b"secret blob"
    desc = Descriptor("application/vnd.oci.image.layer.v1.tar", _digest(data), len(data))
    script.routes[f"/v2/secure/blobs/{desc.digest}"] = (200, {}, data)
    client = RegistryClient(timeout=5)
    ref = parse_reference(f"{host}/secure")
    for _ in range(3):
        out = io.BytesIO()
        client.fetch_blob(ref, desc, out)
        assert out.getvalue() == data
    assert script.token_requests == 1
    token_query = next(p for p, _ in script.seen if p.startswith("/token"))
    assert "scope=repository%3Asecure%3Apull" in token_query and "service=svc" in token_query


def test_redirects_drop_credentials_on_other_hosts(server: tuple[str, Script]) -> None:
    host, script = server
    data = b"via cdn"
    desc = Descriptor("application/vnd.oci.image.layer.v1.tar", _digest(data), len(data))
    other = host.replace("127.0.0.1", "localhost")  # same server, a different host name
    script.routes[f"/v2/secure/blobs/{desc.digest}"] = (
        307,
        {"Location": f"http://{other}/cdn/blob"},
        b"",
    )
    script.routes["/cdn/blob"] = (200, {}, data)
    client = RegistryClient(timeout=5)
    out = io.BytesIO()
    client.fetch_blob(parse_reference(f"{host}/secure"), desc, out)
    assert out.getvalue() == data
    assert ("/cdn/blob", None) in script.seen


def test_unreachable_and_https_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_INSECURE_REGISTRIES", raising=False)
    client = RegistryClient(timeout=2)
    # Port 9 on loopback: nothing listens (discard service is not installed).
    with pytest.raises(ImageError, match="cannot be reached"):
        client.get_manifest(parse_reference("127.0.0.1:9/x"))
    assert client._base_url("registry.example:5000").startswith("https://")
    assert client._base_url("localhost:5000").startswith("http://")
    with pytest.raises(ImageError, match="CA bundle"):
        RegistryClient(ca_file="/nonexistent/ca.pem")
