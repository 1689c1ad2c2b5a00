"""The interception CA of one sandbox, its leaf certificates, and the guest's trust material.

SPEC "TLS interception": each sandbox gets its own EC P-256 CA, generated when it is created
(microsandbox shares one CA across every sandbox of a host, so one sandbox's CA is trusted by
the others; corral does not), unless ``tls.ca_cert``/``tls.ca_key`` name the user's own PEM
pair. Leaves are minted per SNI with ``cryptography`` and cached, each with an
``ssl.SSLContext`` for the guest-facing handshake. The CA's public certificate is written into
the guest's trust bundles; its key stays in this object, in the supervisor's memory: nothing
here returns it, writes it to a file the sandbox can read, or puts it in a repr.

Everything here is pure except :func:`read_ca_files`, :func:`read_upstream_cas` and
:func:`read_host_bundle` (file reads at creation) and the memfd through which a context loads
its leaf (``ssl`` loads keys only from a path; a memfd is a file in memory only, closed at
once, invisible to the sandbox's PID namespace).

Choice: ALPN is per ``SSLContext`` in Python's ``ssl`` (``set_alpn_protocols`` sets the
context's list, shared by every connection using it, and an ``sni_callback`` that switches
context switches ALPN with it in OpenSSL >= 1.1.0). The interceptor knows both the SNI and the
protocol the upstream selected before it starts the guest's handshake (the ClientHello is held
while corral dials upstream), so :meth:`LeafCache.server_context` is keyed by (name, ALPN):
at most three contexts per name (h2, http/1.1, none), built once. Figures: docs/network.md.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
import ssl
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from corral.errors import ConfigError

__all__ = [
    "CA_LIFETIME",
    "CONTEXT_CACHE_ENTRIES",
    "GUEST_BUNDLE_PATHS",
    "GUEST_CA_ANCHORS",
    "LEAF_BACKDATE",
    "LEAF_CACHE_ENTRIES",
    "LEAF_LIFETIME",
    "LEAF_RENEW_BEFORE",
    "GuestTrust",
    "InterceptionCA",
    "Leaf",
    "LeafCache",
    "TrustWrite",
    "UpstreamContexts",
    "read_ca_files",
    "read_host_bundle",
    "read_upstream_cas",
]

#: How far before "now" a leaf becomes valid. The guest shares the host's clock today (Linux
#: namespaces do not virtualise CLOCK_REALTIME), so zero would do; but a client whose clock
#: is a little behind (a VM resumed from a snapshot before NTP catches up, the microVM backend
#: SPEC keeps a seam for, an RTC kept in local time: up to 14 h off) rejects a certificate
#: from its future with an error nobody connects to corral. mitmproxy backdates by two days;
#: one day covers every time zone. Backdating costs nothing: leaves live only in memory.
LEAF_BACKDATE = dt.timedelta(days=1)

#: Validity of a leaf from its notBefore. Browsers cap publicly trusted leaves at 398 days but
#: not leaves of locally installed roots; short is still better (a leaf that escaped is useless
#: soon). A sandbox that runs longer gets fresh leaves (LEAF_RENEW_BEFORE).
LEAF_LIFETIME = dt.timedelta(days=30)

#: A cached leaf with less validity left than this is minted again before use, so no guest
#: handshake ever meets a leaf that expires mid-connection.
LEAF_RENEW_BEFORE = dt.timedelta(days=1)

#: Validity of a generated CA. It lives as long as its sandbox and dies with it; ten years
#: (mitmproxy's CA default) means a long-lived sandbox never meets an expired root.
CA_LIFETIME = dt.timedelta(days=3650)

#: Leaves kept per sandbox (LRU). A leaf is ~1 KiB and minting one ~0.1 ms, so the bound is
#: about memory under a guest that makes up names (every SNI gets a leaf once the policy has
#: allowed it). mitmproxy keeps 100 certificates; 1024 covers any real workload's hosts.
LEAF_CACHE_ENTRIES = 1024

#: Guest-facing SSLContexts kept (LRU), keyed by (name, ALPN). A context holds OpenSSL's
#: SSL_CTX and session cache (tens of KiB) and costs about a millisecond to build; 256 is far
#: above the hosts an agent talks to at once and bounds memory near 10 MiB.
CONTEXT_CACHE_ENTRIES = 256

#: TLS 1.3 session tickets a guest-facing handshake sends. OpenSSL's default is 2 (a spare
#: for a client that opens two connections at once); each costs this side ~35 µs (the
#: session serialised, encrypted and MACed: 338 -> 264 µs of server CPU per handshake from 2
#: to 1, in process) and the client as much to take in, on every new connection. One keeps
#: resumption for a client's next connection; a client opening several at once resumes one
#: and fully handshakes the others, as against Go's crypto/tls server, which sends one.
GUEST_TICKETS = 1

#: Upstream contexts kept, keyed by the ALPN list the guest offered. Real clients offer a
#: handful of lists (["h2", "http/1.1"], ["http/1.1"], ["h2"], none); 16 bounds a guest that
#: varies it on purpose.
UPSTREAM_CONTEXT_ENTRIES = 16

#: Where guests look for their trust bundle. Debian/Ubuntu and Alpine read
#: /etc/ssl/certs/ca-certificates.crt (Alpine's OpenSSL also /etc/ssl/cert.pem); RHEL, Fedora
#: and their kin read /etc/pki/tls/certs/ca-bundle.crt, a link to the extracted bundle of
#: update-ca-trust. Each is appended to when present and created when missing.
GUEST_BUNDLE_PATHS = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/ssl/cert.pem",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
)

#: The CA alone, where each distribution's bundle tool reads extra roots from: a guest that
#: runs ``update-ca-certificates`` (Debian, Alpine) or ``update-ca-trust`` (RHEL), as
#: installing the ca-certificates package does, regenerates its bundle with corral's CA still
#: in it. The first is also NODE_EXTRA_CA_CERTS (Node adds it to its built-in roots).
GUEST_CA_ANCHORS = (
    "/usr/local/share/ca-certificates/corral-sandbox-ca.crt",
    "/etc/pki/ca-trust/source/anchors/corral-sandbox-ca.pem",
)

#: Where the host's own bundle may be, for ``trust_host_cas`` (first that exists).
HOST_BUNDLE_CANDIDATES = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
)

_PEM_CERT_RE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)
_LABEL_RE = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")

CAPrivateKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _fingerprint(cert: x509.Certificate) -> str:
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _sign_hash(key: CAPrivateKey) -> hashes.HashAlgorithm | None:
    return (
        None
        if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
        else hashes.SHA256()
    )


def _host_san(name: str) -> x509.GeneralName:
    """The SAN for ``name``: an IP address for IP literals, else a DNS name (checked)."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    host = name.rstrip(".").lower()
    if not host or len(host) > 253 or not all(_LABEL_RE.match(lb) for lb in host.split(".")):
        raise ValueError(f"{name!r} is not a host name a certificate can be made for")
    return x509.DNSName(host)


@dataclass(frozen=True)
class Leaf:
    """A minted leaf: certificate and key, ``chain_pem`` ready for a server context."""

    name: str
    cert: x509.Certificate
    not_after: dt.datetime
    _key_pem: bytes  # the leaf's own key (not the CA's); never shown

    def __repr__(self) -> str:
        return f"Leaf(name={self.name!r}, not_after={self.not_after.isoformat()})"

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


class InterceptionCA:
    """A CA that signs leaves for intercepted names; its key never leaves this object."""

    def __init__(self, cert: x509.Certificate, key: CAPrivateKey, *, generated: bool) -> None:
        self._cert = cert
        self.__key = key
        self.generated = generated
        self._cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        try:
            ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())
        # One key for every leaf of this CA: a leaf key only ever sits in this process, so a
        # fresh one per name buys nothing and costs a key generation per name.
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key_pem = self._leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self._leaf_public = self._leaf_key.public_key()
        self._leaf_ski = x509.SubjectKeyIdentifier.from_public_key(self._leaf_public)

    def __repr__(self) -> str:
        kind = "generated" if self.generated else "user"
        return f"InterceptionCA({kind}, subject={self._cert.subject.rfc4514_string()!r}, sha256={self.fingerprint})"

    @classmethod
    def generate(cls, sandbox: str, *, now: dt.datetime | None = None) -> InterceptionCA:
        """A fresh EC P-256 CA for one sandbox (``sandbox`` goes into its name)."""
        now = now or _utcnow()
        key = ec.generate_private_key(ec.SECP256R1())
        cn = f"corral sandbox {sandbox} interception CA"[:64]
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, cn),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "corral"),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - LEAF_BACKDATE)
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
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
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key, generated=True)

    @classmethod
    def load(
        cls,
        cert_pem: bytes,
        key_pem: bytes,
        *,
        cert_field: str = "tls.ca_cert",
        key_field: str = "tls.ca_key",
        now: dt.datetime | None = None,
    ) -> InterceptionCA:
        """The user's CA, checked: a PEM CA certificate, valid now, and the key that matches it.

        Each failure is one ConfigError naming the field.
        """
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            raise ConfigError(cert_field, "is not a PEM X.509 certificate") from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except TypeError:
            raise ConfigError(
                key_field, "is encrypted; give the key without a passphrase"
            ) from None
        except (ValueError, UnsupportedAlgorithm):
            raise ConfigError(key_field, "is not a PEM private key") from None
        if not isinstance(
            key,
            ec.EllipticCurvePrivateKey
            | rsa.RSAPrivateKey
            | ed25519.Ed25519PrivateKey
            | ed448.Ed448PrivateKey,
        ):
            raise ConfigError(key_field, f"is a {type(key).__name__}; use an EC, RSA or EdDSA key")
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(
            serialization.Encoding.DER, pub
        ) != cert.public_key().public_bytes(serialization.Encoding.DER, pub):
            raise ConfigError(key_field, f"is not the key of the certificate in {cert_field}")
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise ConfigError(
                cert_field, "is not a CA certificate (its basicConstraints do not say CA:TRUE)"
            )
        if bc.path_length is not None and bc.path_length < 0:
            raise ConfigError(cert_field, "has a negative path length")
        try:
            ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
            if not ku.key_cert_sign:
                raise ConfigError(
                    cert_field, "may not sign certificates (its keyUsage lacks keyCertSign)"
                )
        except x509.ExtensionNotFound:
            pass
        now = now or _utcnow()
        if cert.not_valid_after_utc <= now:
            raise ConfigError(
                cert_field, f"expired on {cert.not_valid_after_utc.date().isoformat()}"
            )
        if cert.not_valid_before_utc > now:
            raise ConfigError(
                cert_field,
                f"is not valid before {cert.not_valid_before_utc.isoformat(timespec='seconds')}",
            )
        return cls(cert, key, generated=False)

    @property
    def certificate(self) -> x509.Certificate:
        return self._cert

    @property
    def cert_pem(self) -> bytes:
        """The CA's public certificate (what the guest trusts)."""
        return self._cert_pem

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the certificate, ``AB:CD:...`` (what ``corral inspect`` shows)."""
        return _fingerprint(self._cert)

    def issue(self, name: str, *, now: dt.datetime | None = None) -> Leaf:
        """A leaf for ``name`` (a DNS name or an IP literal), signed by this CA.

        The CA's notAfter bounds the leaf's: a leaf outliving its issuer fails validation.
        """
        san = _host_san(name)
        now = now or _utcnow()
        not_before = now - LEAF_BACKDATE
        not_after = min(not_before + LEAF_LIFETIME, self._cert.not_valid_after_utc)
        host = str(san.value) if isinstance(san, x509.IPAddress) else san.value
        cn = [x509.NameAttribute(NameOID.COMMON_NAME, host)] if len(host) <= 64 else []
        key_usage = x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=False,
            crl_sign=False,
            encipher_only=False,
            decipher_only=False,
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(cn))
            .issuer_name(self._cert.subject)
            .public_key(self._leaf_public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(key_usage, critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            # RFC 5280 4.2.1.6: with an empty subject the SAN must be critical.
            .add_extension(x509.SubjectAlternativeName([san]), critical=not cn)
            .add_extension(self._aki, critical=False)
            .add_extension(self._leaf_ski, critical=False)
            .sign(self.__key, _sign_hash(self.__key))  # type: ignore[arg-type]
        )
        return Leaf(host, cert, not_after, self._leaf_key_pem)

    def verifies(self, cert: x509.Certificate) -> bool:
        """Whether ``cert`` was signed by this CA (tests and ``corral inspect``)."""
        pub = self._cert.public_key()
        try:
            if isinstance(pub, ec.EllipticCurvePublicKey):
                pub.verify(
                    cert.signature,
                    cert.tbs_certificate_bytes,
                    ec.ECDSA(cert.signature_hash_algorithm),  # type: ignore[arg-type]
                )
            elif isinstance(pub, rsa.RSAPublicKey):
                pub.verify(
                    cert.signature,
                    cert.tbs_certificate_bytes,
                    padding.PKCS1v15(),
                    cert.signature_hash_algorithm,  # type: ignore[arg-type]
                )
            elif isinstance(pub, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
                pub.verify(cert.signature, cert.tbs_certificate_bytes)
            else:
                return False
        except InvalidSignature:
            return False
        return cert.issuer == self._cert.subject


def _load_chain(ctx: ssl.SSLContext, chain_pem: bytes) -> None:
    """``ctx.load_cert_chain`` from memory: through a memfd, closed before returning."""
    fd = os.memfd_create("corral-leaf", os.MFD_CLOEXEC)
    try:
        os.write(fd, chain_pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def server_context(leaf: Leaf, alpn: str | None) -> ssl.SSLContext:
    """A guest-facing TLS server context for one leaf, offering exactly ``alpn`` (or none)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, leaf._key_pem + leaf.cert_pem)
    ctx.num_tickets = GUEST_TICKETS
    if alpn is not None:
        ctx.set_alpn_protocols([alpn])
    return ctx


class LeafCache:
    """Leaves per name and guest-facing contexts per (name, ALPN), both bounded LRU.

    ``clock`` returns the current time (tests move it to check renewal).
    """

    def __init__(
        self,
        ca: InterceptionCA,
        *,
        max_leaves: int = LEAF_CACHE_ENTRIES,
        max_contexts: int = CONTEXT_CACHE_ENTRIES,
        clock: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        self.ca = ca
        self._leaves: OrderedDict[str, Leaf] = OrderedDict()
        self._contexts: OrderedDict[tuple[str, str | None], tuple[Leaf, ssl.SSLContext]] = (
            OrderedDict()
        )
        self._max_leaves = max_leaves
        self._max_contexts = max_contexts
        self._clock = clock
        self.minted = 0  # leaves issued (tests, bench)

    def __len__(self) -> int:
        return len(self._leaves)

    def leaf(self, name: str) -> Leaf:
        key = str(_host_san(name).value).lower()
        now = self._clock()
        leaf = self._leaves.get(key)
        if leaf is not None and leaf.not_after - now > LEAF_RENEW_BEFORE:
            self._leaves.move_to_end(key)
            return leaf
        leaf = self.ca.issue(name, now=now)
        self.minted += 1
        self._leaves[key] = leaf
        self._leaves.move_to_end(key)
        while len(self._leaves) > self._max_leaves:
            self._leaves.popitem(last=False)
        return leaf

    def server_context(self, name: str, alpn: str | None = None) -> ssl.SSLContext:
        """The context to terminate the guest's TLS for ``name``, offering exactly ``alpn``.

        ``alpn`` is what the upstream selected (None: it selected nothing, so the guest is
        offered nothing either and speaks what it would to a server without ALPN).
        """
        hit = self._contexts.get((name, alpn))
        if hit is not None and hit[0].not_after - self._clock() > LEAF_RENEW_BEFORE:
            self._contexts.move_to_end((name, alpn))
            return hit[1]
        leaf = self.leaf(name)
        ckey = (name, alpn)
        ctx = server_context(leaf, alpn)
        self._contexts[ckey] = (leaf, ctx)
        self._contexts.move_to_end(ckey)
        while len(self._contexts) > self._max_contexts:
            self._contexts.popitem(last=False)
        return ctx


# -- upstream verification ----------------------------------------------------------------
class UpstreamContexts:
    """Client contexts toward upstream: the host's roots plus ``upstream_ca_certs``.

    ``verify=False`` (``verify_upstream=False``) turns verification off: no chain check, no
    name check. Contexts are cached per offered ALPN list, since ALPN is per context.
    """

    def __init__(
        self,
        *,
        verify: bool = True,
        extra_cas: Sequence[bytes] = (),
        use_host_roots: bool = True,
        max_entries: int = UPSTREAM_CONTEXT_ENTRIES,
    ) -> None:
        self.verify = verify
        self._extra = tuple(extra_cas)
        self._host_roots = use_host_roots
        self._cache: OrderedDict[tuple[str, ...], ssl.SSLContext] = OrderedDict()
        self._max = max_entries
        self._base = self._build(())  # fails now, at creation, if a CA is unusable

    def _build(self, alpn: tuple[str, ...]) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.verify:
            ctx.check_hostname = True
            ctx.verify_mode = ssl.CERT_REQUIRED
            if self._host_roots:
                ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
            for pem in self._extra:
                ctx.load_verify_locations(cadata=pem.decode("ascii"))
        else:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        return ctx

    def context(self, alpn: Iterable[str] = ()) -> ssl.SSLContext:
        key = tuple(alpn)
        if not key:
            return self._base
        ctx = self._cache.get(key)
        if ctx is None:
            ctx = self._cache[key] = self._build(key)
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return ctx


# -- guest trust material -------------------------------------------------------------------
@dataclass(frozen=True)
class TrustWrite:
    """A file of the guest's rootfs to write whole (``path`` already resolved in the rootfs)."""

    path: str
    content: bytes
    created: bool


def _pem_certs(bundle: bytes) -> list[bytes]:
    return [m.group(0).replace(b"\r\n", b"\n") for m in _PEM_CERT_RE.finditer(bundle)]


def _append_certs(existing: bytes, certs: Iterable[bytes]) -> bytes:
    have = set(_pem_certs(existing))
    out = existing
    for c in certs:
        if c.strip() in have:
            continue
        if out and not out.endswith(b"\n"):
            out += b"\n"
        out += c.strip() + b"\n"
        have.add(c.strip())
    return out


@dataclass(frozen=True)
class GuestTrust:
    """What the guest must be given to trust the CA; the runtime writes it (pure planning)."""

    ca_pem: bytes
    host_bundle: bytes | None = None  # the host's roots, when trust_host_cas

    @property
    def bundle_path(self) -> str:
        """The bundle the variables point at (created when missing, so it always exists)."""
        return GUEST_BUNDLE_PATHS[0]

    def environment(self) -> dict[str, str]:
        """SSL_CERT_FILE (OpenSSL, Python, Go), REQUESTS_CA_BUNDLE (requests), CURL_CA_BUNDLE
        (curl), NODE_EXTRA_CA_CERTS (Node adds it to its own roots, so the CA alone)."""
        return {
            "SSL_CERT_FILE": self.bundle_path,
            "REQUESTS_CA_BUNDLE": self.bundle_path,
            "CURL_CA_BUNDLE": self.bundle_path,
            "NODE_EXTRA_CA_CERTS": GUEST_CA_ANCHORS[0],
        }

    def files(self, existing: Mapping[str, tuple[str, bytes | None]]) -> list[TrustWrite]:
        """The writes, given each path's state in the guest rootfs.

        ``existing`` maps every path of :data:`GUEST_BUNDLE_PATHS` and
        :data:`GUEST_CA_ANCHORS` (missing keys: the path does not exist) to (the path it
        resolves to inside the rootfs, its content or None when absent), so a bundle reached
        through two links (RHEL's ca-bundle.crt -> tls-ca-bundle.pem) is written once.
        Idempotent: certificates already present are not added again.
        """
        add = [self.ca_pem]
        if self.host_bundle:
            add.extend(_pem_certs(self.host_bundle))
        writes: dict[str, TrustWrite] = {}
        for path in GUEST_BUNDLE_PATHS:
            real, content = existing.get(path, (path, None))
            base = writes[real].content if real in writes else (content or b"")
            new = _append_certs(base, add)
            created = writes[real].created if real in writes else content is None
            if new != (content or b"") or content is None:
                writes[real] = TrustWrite(real, new, created)
        for path in GUEST_CA_ANCHORS:
            real, content = existing.get(path, (path, None))
            if content != self.ca_pem:
                writes[real] = TrustWrite(real, self.ca_pem, content is None)
        return list(writes.values())


# -- file reads at creation ---------------------------------------------------------------
def _read(path: str, field: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(field, f"{path}: no such file ({what})") from None
    except IsADirectoryError:
        raise ConfigError(field, f"{path} is a directory, not a {what}") from None
    except PermissionError:
        raise ConfigError(field, f"{path}: permission denied") from None


def read_ca_files(cert_path: str, key_path: str) -> InterceptionCA:
    """The user's ``tls.ca_cert``/``tls.ca_key`` files, loaded and checked."""
    cert = _read(cert_path, "tls.ca_cert", "PEM certificate")
    key = _read(key_path, "tls.ca_key", "PEM private key")
    return InterceptionCA.load(cert, key)


def read_upstream_cas(paths: Sequence[str]) -> list[bytes]:
    """``tls.upstream_ca_certs``: each a PEM file with at least one certificate."""
    out = []
    for i, path in enumerate(paths):
        field = f"tls.upstream_ca_certs[{i}]"
        data = _read(path, field, "PEM certificate bundle")
        certs = _pem_certs(data)
        if not certs:
            raise ConfigError(field, f"{path} holds no PEM certificate")
        for c in certs:
            try:
                x509.load_pem_x509_certificate(c)
            except ValueError:
                raise ConfigError(
                    field, f"{path} holds a certificate that does not parse"
                ) from None
        out.append(b"\n".join(certs) + b"\n")
    return out


def read_host_bundle(candidates: Sequence[str] = HOST_BUNDLE_CANDIDATES) -> bytes | None:
    """The host's CA bundle (for ``trust_host_cas``), or None when the host has none."""
    for path in candidates:
        try:
            return Path(path).read_bytes()
        except OSError:
            continue
    return None
