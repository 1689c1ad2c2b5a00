"""Real registries for tests: Debian's ``docker-registry`` inside the world's internet netns.

Four variants, each on its own address of the internet side:

* ``plain`` - HTTP, anonymous (203.0.113.51:5000)
* ``tls`` - HTTPS with a certificate from a test CA (203.0.113.52:5000)
* ``basic`` - HTTP with htpasswd basic auth (203.0.113.53:5000)
* ``token`` - HTTP with token auth (203.0.113.54:5000); tokens are JWTs (ES256, the signing
  certificate in the x5c header and in the registry's rootcertbundle) issued by the small
  token server in this module (203.0.113.54:5001), which wants basic credentials.

htpasswd needs bcrypt hashes: Python's ``crypt`` module (glibc's libxcrypt) makes ``$2b$``
hashes, which the registry's Go bcrypt accepts, so neither apache2-utils nor a bcrypt
package is needed. The token server runs as ``python -m tests.support.registry token-server``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import http.server
import ipaddress
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.parse
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from corral.runtime.images.registry import RegistryClient
from tests.support.world import World

REGISTRY_BIN = "/usr/bin/docker-registry"
PORT = 5000
TOKEN_PORT = 5001
ADDRESSES = {"plain": "203.0.113.51", "tls": "203.0.113.52", "basic": "203.0.113.53",
             "token": "203.0.113.54"}  # fmt: skip
SERVICE = "corral-test-registry"
ISSUER = "corral-test-token-issuer"
USERNAME = "tester"
PASSWORD = "s3cret-pass"
#: Seconds to wait for a registry to answer after start (it starts in ~0.1 s here).
START_TIMEOUT = 15.0
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class RunningRegistry:
    """One registry process and what a client needs to reach it."""

    variant: str
    host: str  # "203.0.113.51:5000"
    storage: Path
    ca_file: Path | None = None
    username: str | None = None
    password: str | None = None
    #: Hosts a client must allow over plain HTTP for this variant (registry, token server).
    insecure: tuple[str, ...] = ()
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def store_options(self) -> dict[str, Any]:
        """Keyword arguments for ImageStore / RegistryClient to reach this registry."""
        return {"ca_file": self.ca_file, "insecure_registries": self.insecure}

    def client(self) -> RegistryClient:
        return RegistryClient(**self.store_options())

    def blob_data(self, digest: str) -> Path:
        """The file in the registry's storage that holds blob ``digest`` (to corrupt it)."""
        hexpart = digest.split(":", 1)[1]
        return (self.storage / "docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart
                / "data")  # fmt: skip


# -- certificates ------------------------------------------------------------------------------
@dataclass
class TestCA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    path: Path

    @classmethod
    def create(cls, directory: Path, name: str = "corral test CA") -> TestCA:
        key, builder = _self_signed(name)
        cert = (
            builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )  # fmt: skip
            .sign(key, hashes.SHA256())
        )
        path = directory / "ca.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(key, cert, path)

    def issue(self, directory: Path, ip: str) -> tuple[Path, Path]:
        """A server certificate for ``ip``: (cert.pem, key.pem)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        cert_path, key_path = directory / f"{ip}.crt", directory / f"{ip}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_key_pem(key))
        return cert_path, key_path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _self_signed(
    common_name: str,
) -> tuple[ec.EllipticCurvePrivateKey, x509.CertificateBuilder]:
    """A P-256 key and a self-issued certificate builder valid from an hour ago for two days."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
    )
    return key, builder


def _token_signer(directory: Path) -> tuple[Path, Path]:
    """A self-signed ES256 signing certificate (no EKU: Go verifies it as its own root)."""
    key, builder = _self_signed(ISSUER)
    cert = builder.sign(key, hashes.SHA256())
    cert_path, key_path = directory / "token-signer.crt", directory / "token-signer.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(_key_pem(key))
    return cert_path, key_path


def htpasswd_line(user: str, password: str) -> str:
    """``user:$2b$...``: a bcrypt entry (cost 4, the minimum: these are test credentials)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt

        salt = crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16)
        return f"{user}:{crypt.crypt(password, salt)}"


# -- starting ---------------------------------------------------------------------------------
def _config(variant: str, addr: str, storage: Path, workdir: Path, ca: TestCA | None) -> str:
    lines = [
        "version: 0.1",
        "log:",
        "  level: error",
        "  accesslog:",
        "    disabled: true",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {storage}",
        "  delete:",
        "    enabled: true",
        "  maintenance:",
        "    uploadpurging:",
        "      enabled: false",
        "http:",
        f"  addr: {addr}:{PORT}",
        f"  secret: {secrets.token_hex(16)}",
    ]
    if variant == "tls":
        assert ca is not None
        cert, key = ca.issue(workdir, addr)
        lines += ["  tls:", f"    certificate: {cert}", f"    key: {key}"]
    if variant == "basic":
        htpasswd = workdir / "htpasswd"
        htpasswd.write_text(htpasswd_line(USERNAME, PASSWORD) + "\n")
        lines += ["auth:", "  htpasswd:", "    realm: corral-test", f"    path: {htpasswd}"]
    if variant == "token":
        cert, _key = _token_signer(workdir)
        lines += [
            "auth:",
            "  token:",
            f"    realm: http://{addr}:{TOKEN_PORT}/token",
            f"    service: {SERVICE}",
            f"    issuer: {ISSUER}",
            f"    rootcertbundle: {cert}",
        ]
    return "\n".join(lines) + "\n"


def _wait_listening(world: World, addr: str, port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    with world.in_host():
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server on {addr}:{port} exited with {proc.returncode}")
            with contextlib.suppress(OSError), socket.create_connection((addr, port), timeout=1):
                return
            time.sleep(0.05)
    raise RuntimeError(f"server on {addr}:{port} did not start within {START_TIMEOUT} s")


def start(world: World, variant: str, workdir: Path, ca: TestCA | None = None) -> RunningRegistry:
    """Start registry ``variant`` in ``world``; it is stopped with the world, or by ``stop``."""
    addr = ADDRESSES[variant]
    world.add_server_address(f"{addr}/32")
    workdir.mkdir(parents=True, exist_ok=True)
    storage = workdir / "storage"
    storage.mkdir(exist_ok=True)
    if variant == "tls" and ca is None:
        ca = TestCA.create(workdir)
    config = workdir / "config.yml"
    config.write_text(_config(variant, addr, storage, workdir, ca))
    log = open(workdir / "registry.log", "wb")  # noqa: SIM115 (handed to the child)
    reg = RunningRegistry(variant, f"{addr}:{PORT}", storage)
    proc = world.spawn_inet([REGISTRY_BIN, "serve", str(config)], stdout=log, stderr=log)
    log.close()
    reg.processes.append(proc)
    try:
        _wait_listening(world, addr, PORT, proc)
        if variant == "tls":
            assert ca is not None
            reg.ca_file = ca.path
        else:
            reg.insecure = (reg.host,)
        if variant in ("basic", "token"):
            reg.username, reg.password = USERNAME, PASSWORD
        if variant == "token":
            token_log = open(workdir / "token.log", "wb")  # noqa: SIM115
            token = world.spawn_inet(
                [sys.executable, "-m", "tests.support.registry", "token-server",
                 "--addr", addr, "--port", str(TOKEN_PORT),
                 "--cert", str(workdir / "token-signer.crt"),
                 "--key", str(workdir / "token-signer.key")],
                stdout=token_log, stderr=token_log, cwd=str(REPO_ROOT),
            )  # fmt: skip
            token_log.close()
            reg.processes.append(token)
            _wait_listening(world, addr, TOKEN_PORT, token)
            reg.insecure = (reg.host, f"{addr}:{TOKEN_PORT}")
    except BaseException:
        stop(world, reg)
        raise
    return reg


def stop(world: World, reg: RunningRegistry) -> None:
    for proc in reg.processes:
        world.stop_process(proc)
    reg.processes.clear()


# -- the token server ----------------------------------------------------------------------------
def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_token(key: ec.EllipticCurvePrivateKey, cert_der: bytes, subject: str,
               scopes: list[str], lifetime: int = 300) -> str:  # fmt: skip
    """A registry bearer token (JWT, ES256) granting ``scopes``."""
    access = []
    for scope in scopes:
        parts = scope.split(":")
        if len(parts) >= 3:
            access.append({"type": parts[0], "name": ":".join(parts[1:-1]),
                           "actions": [a for a in parts[-1].split(",") if a]})  # fmt: skip
    now = int(time.time())
    header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(cert_der).decode()]}
    claims = {"iss": ISSUER, "sub": subject, "aud": SERVICE, "exp": now + lifetime,
              "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8), "access": access}  # fmt: skip
    signing_input = (_b64url(json.dumps(header).encode()) + "." +
                     _b64url(json.dumps(claims).encode()))  # fmt: skip
    der = key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def serve_tokens(addr: str, port: int, cert_path: Path, key_path: Path) -> None:
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cert_der = x509.load_pem_x509_certificate(cert_path.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    expected = "Basic " + base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass  # the default does a reverse DNS lookup, which hangs in the netns

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            if url.path != "/token":
                self.send_error(404)
                return
            if self.headers.get("Authorization") != expected:
                self.send_response(401)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            query = urllib.parse.parse_qs(url.query)
            token = make_token(key, cert_der, USERNAME, query.get("scope", []))
            body = json.dumps({"token": token, "access_token": token, "expires_in": 300}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer((addr, port), Handler)
    server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tests.support.registry")
    sub = parser.add_subparsers(dest="command", required=True)
    token = sub.add_parser("token-server")
    token.add_argument("--addr", required=True)
    token.add_argument("--port", type=int, required=True)
    token.add_argument("--cert", type=Path, required=True)
    token.add_argument("--key", type=Path, required=True)
    args = parser.parse_args(argv)
    os.environ.pop("http_proxy", None)
    serve_tokens(args.addr, args.port, args.cert, args.key)


if __name__ == "__main__":
    main()
