"""The interception CA, leaves, contexts and guest trust material (corral.net.tls_ca).

Handshakes run between two real OpenSSL endpoints over memory BIOs: no sockets, but the same
certificate checks a guest's client makes (chain to the CA, name, validity, ALPN).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from corral.errors import ConfigError
from corral.net.tls_ca import (
    CONTEXT_CACHE_ENTRIES,
    GUEST_BUNDLE_PATHS,
    GUEST_CA_ANCHORS,
    GUEST_TICKETS,
    LEAF_BACKDATE,
    LEAF_LIFETIME,
    GuestTrust,
    InterceptionCA,
    LeafCache,
    UpstreamContexts,
    read_ca_files,
    read_host_bundle,
    read_upstream_cas,
)

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def ca() -> InterceptionCA:
    return InterceptionCA.generate("test-sbx")


def _ca_key_pem(ca: InterceptionCA) -> bytes:
    key = ca._InterceptionCA__key  # type: ignore[attr-defined]
    return key.private_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, name: str
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A full TLS handshake between two SSLObjects over memory BIOs; raises what OpenSSL does."""
    cin, cout, sin, sout = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(cin, cout, server_hostname=name)
    s = server.wrap_bio(sin, sout, server_side=True)
    done_c = done_s = False
    for _ in range(20):
        if not done_c:
            try:
                c.do_handshake()
                done_c = True
            except ssl.SSLWantReadError:
                pass
        sin.write(cout.read())
        if not done_s:
            try:
                s.do_handshake()
                done_s = True
            except ssl.SSLWantReadError:
                pass
        cin.write(sout.read())
        if done_c and done_s:
            return c, s
    raise AssertionError("handshake did not finish")


def guest_client(ca: InterceptionCA, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


# -- the generated CA -----------------------------------------------------------------------
def test_generated_ca_is_a_p256_ca(ca: InterceptionCA) -> None:
    cert = ca.certificate
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    assert "test-sbx" in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert ca.generated and len(ca.fingerprint.split(":")) == 32


def test_each_sandbox_gets_its_own_ca() -> None:
    a, b = InterceptionCA.generate("a"), InterceptionCA.generate("b")
    assert a.fingerprint != b.fingerprint
    leaf = a.issue("example.com")
    assert a.verifies(leaf.cert) and not b.verifies(leaf.cert)
    # A guest trusting b rejects a's leaf.
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(LeafCache(a).server_context("example.com"), guest_client(b), "example.com")


def test_ca_key_is_never_exposed(ca: InterceptionCA, tmp_path: Path) -> None:
    key_pem = _ca_key_pem(ca)
    body = key_pem.split(b"\n")[1]  # a line of the key's base64
    trust = GuestTrust(ca.cert_pem, host_bundle=None)
    blobs = [ca.cert_pem, repr(ca).encode(), *(w.content for w in trust.files({}))]
    blobs += [str(trust.environment()).encode()]
    leaf = ca.issue("example.com")
    blobs += [leaf.cert_pem, leaf._key_pem, repr(leaf).encode()]
    for blob in blobs:
        assert body not in blob
    public = [n for n in dir(ca) if not n.startswith("_")]
    for n in public:
        v = getattr(ca, n)
        if isinstance(v, bytes):
            assert body not in v, n
    assert "key" not in " ".join(public).replace("public_key", "")


# -- leaves ---------------------------------------------------------------------------------
def test_leaf_for_a_name(ca: InterceptionCA) -> None:
    leaf = ca.issue("API.Example.com.", now=NOW)
    cert = leaf.cert
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["api.example.com"]
    assert cert.not_valid_before_utc == NOW - LEAF_BACKDATE
    assert cert.not_valid_after_utc == NOW - LEAF_BACKDATE + LEAF_LIFETIME
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert ca.verifies(cert)


@pytest.mark.parametrize("ip", ["192.0.2.7", "2001:db8::5"])
def test_leaf_for_an_ip_literal(ca: InterceptionCA, ip: str) -> None:
    leaf = ca.issue(ip)
    san = leaf.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(ip)]
    assert not san.get_values_for_type(x509.DNSName)
    c, _ = handshake(LeafCache(ca).server_context(ip), guest_client(ca), ip)
    assert c.getpeercert() is not None


def test_long_name_has_no_cn_and_a_critical_san(ca: InterceptionCA) -> None:
    name = ".".join(["a" * 60] * 3) + ".example"
    leaf = ca.issue(name)
    assert list(leaf.cert.subject) == []
    assert leaf.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical
    handshake(LeafCache(ca).server_context(name), guest_client(ca), name)


@pytest.mark.parametrize(
    "bad", ["", "a..b", "exa mple.com", "bad\x00name", "*.example.com", "x" * 64 + ".com", "é.com"]
)
def test_odd_names_get_no_leaf(ca: InterceptionCA, bad: str) -> None:
    with pytest.raises(ValueError, match="not a host name"):
        ca.issue(bad)


def test_guest_accepts_the_leaf_and_checks_the_name(ca: InterceptionCA) -> None:
    cache = LeafCache(ca)
    c, s = handshake(cache.server_context("api.example.com"), guest_client(ca), "api.example.com")
    assert c.version() in ("TLSv1.2", "TLSv1.3")
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch|match"):
        handshake(cache.server_context("api.example.com"), guest_client(ca), "other.example.com")


@pytest.mark.parametrize(
    ("selected", "offered", "want"),
    [
        ("h2", ["h2", "http/1.1"], "h2"),
        ("http/1.1", ["h2", "http/1.1"], "http/1.1"),
        (None, ["h2", "http/1.1"], None),
        ("h2", None, None),
    ],
)
def test_guest_is_offered_exactly_the_upstream_alpn(
    ca: InterceptionCA, selected: str | None, offered: list[str] | None, want: str | None
) -> None:
    ctx = LeafCache(ca).server_context("alpn.example.com", selected)
    c, s = handshake(ctx, guest_client(ca, offered), "alpn.example.com")
    assert c.selected_alpn_protocol() == want == s.selected_alpn_protocol()


def _records(data: bytes) -> list[int]:
    """The content types of the TLS records in ``data``."""
    types = []
    while len(data) >= 5:
        types.append(data[0])
        data = data[5 + int.from_bytes(data[3:5], "big") :]
    return types


def test_the_guest_gets_one_ticket_and_can_resume_with_it(ca: InterceptionCA) -> None:
    """One TLS 1.3 ticket per guest handshake (GUEST_TICKETS, not OpenSSL's 2), and it
    resumes: a guest's next connection skips the certificate and the signature."""
    assert GUEST_TICKETS == 1
    ctx = LeafCache(ca).server_context("resume.example.com", "http/1.1")
    client = guest_client(ca, ["http/1.1"])
    cin, cout, sin, sout = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(cin, cout, server_hostname="resume.example.com")
    s = ctx.wrap_bio(sin, sout, server_side=True)
    with pytest.raises(ssl.SSLWantReadError):
        c.do_handshake()
    sin.write(cout.read())
    with pytest.raises(ssl.SSLWantReadError):
        s.do_handshake()
    cin.write(sout.read())
    c.do_handshake()
    sin.write(cout.read())  # the client's Finished
    s.do_handshake()
    after = sout.read()  # what the server sends after its handshake: the tickets, nothing else
    assert _records(after) == [0x17] * GUEST_TICKETS  # each ticket one encrypted record
    cin.write(after)
    with pytest.raises(ssl.SSLWantReadError):
        c.read(1)
    session = c.session
    assert session is not None and session.has_ticket
    cin2, cout2, sin2, sout2 = (ssl.MemoryBIO() for _ in range(4))
    c2 = client.wrap_bio(cin2, cout2, server_hostname="resume.example.com", session=session)
    s2 = ctx.wrap_bio(sin2, sout2, server_side=True)
    for _ in range(4):
        for end, out, peer_in in ((c2, cout2, sin2), (s2, sout2, cin2)):
            with contextlib.suppress(ssl.SSLWantReadError):
                end.do_handshake()
            peer_in.write(out.read())
    assert c2.session_reused and s2.session_reused


def test_a_guest_that_does_not_offer_the_selected_protocol_gets_none(ca: InterceptionCA) -> None:
    """Cannot happen through corral (the upstream picks from the guest's own list), but if it
    did, Python's ssl answers without ALPN (SSL_TLSEXT_ERR_NOACK), never with another one."""
    ctx = LeafCache(ca).server_context("alpn.example.com", "h2")
    c, _ = handshake(ctx, guest_client(ca, ["http/1.1"]), "alpn.example.com")
    assert c.selected_alpn_protocol() is None


def test_cache_reuses_and_bounds(ca: InterceptionCA) -> None:
    cache = LeafCache(ca, max_leaves=3, max_contexts=2)
    a = cache.server_context("a.example", "h2")
    assert cache.server_context("a.example", "h2") is a
    assert cache.server_context("a.example", "http/1.1") is not a
    assert cache.minted == 1  # one leaf, two contexts
    for n in ("b.example", "c.example", "d.example"):
        cache.leaf(n)
    assert len(cache) == 3 and cache.minted == 4
    cache.leaf("a.example")  # evicted (LRU), so minted again
    assert cache.minted == 5
    cache.server_context("b.example", "h2")  # a third context: the least recent one goes
    assert cache.server_context("a.example", "h2") is not a
    assert CONTEXT_CACHE_ENTRIES >= 64


def test_leaves_are_renewed_before_they_expire(ca: InterceptionCA) -> None:
    clock = [NOW]
    cache = LeafCache(ca, clock=lambda: clock[0])
    first = cache.leaf("renew.example")
    ctx = cache.server_context("renew.example")
    clock[0] = NOW + LEAF_LIFETIME - dt.timedelta(days=2)  # backdate: 1 day of validity left
    second = cache.leaf("renew.example")
    assert second is not first and second.not_after > first.not_after
    assert cache.server_context("renew.example") is not ctx


def test_leaf_never_outlives_its_ca() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _ca_cert(key, not_after=NOW + dt.timedelta(days=3))
    ca = InterceptionCA.load(_pem(cert), _key_pem(key), now=NOW)
    assert ca.issue("x.example", now=NOW).not_after == cert.not_valid_after_utc


# -- the user's CA --------------------------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca_cert(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    *,
    ca: bool = True,
    key_cert_sign: bool = True,
    not_before: dt.datetime = NOW - dt.timedelta(days=1),
    not_after: dt.datetime = NOW + dt.timedelta(days=365),
    with_bc: bool = True,
) -> x509.Certificate:
    b = (
        x509.CertificateBuilder()
        .subject_name(_name("user CA"))
        .issuer_name(_name("user CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if with_bc:
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    b = b.add_extension(
        x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=key_cert_sign,
            crl_sign=key_cert_sign,
            encipher_only=False,
            decipher_only=False,
        ),
        critical=True,
    )
    return b.sign(key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, password: bytes | None = None
) -> bytes:
    enc = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


@pytest.mark.parametrize("kind", ["ec", "rsa"])
def test_user_ca_signs_leaves_the_guest_accepts(kind: str) -> None:
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
        ec.generate_private_key(ec.SECP384R1())
        if kind == "ec"
        else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    cert = _ca_cert(key, not_before=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    ca = InterceptionCA.load(_pem(cert), _key_pem(key))
    assert not ca.generated and ca.cert_pem == _pem(cert)
    handshake(LeafCache(ca).server_context("u.example"), guest_client(ca), "u.example")


@pytest.mark.parametrize(
    ("make", "field", "words"),
    [
        (lambda k, c: (b"not a pem", _key_pem(k)), "tls.ca_cert", "not a PEM X.509 certificate"),
        (lambda k, c: (_pem(c), b"garbage"), "tls.ca_key", "not a PEM private key"),
        (
            lambda k, c: (_pem(c), _key_pem(k, b"pw")),
            "tls.ca_key",
            "encrypted",
        ),
        (
            lambda k, c: (_pem(c), _key_pem(ec.generate_private_key(ec.SECP256R1()))),
            "tls.ca_key",
            "not the key of the certificate in tls.ca_cert",
        ),
        (lambda k, c: (_pem(_ca_cert(k, ca=False)), _key_pem(k)), "tls.ca_cert", "not a CA"),
        (lambda k, c: (_pem(_ca_cert(k, with_bc=False)), _key_pem(k)), "tls.ca_cert", "not a CA"),
        (
            lambda k, c: (_pem(_ca_cert(k, key_cert_sign=False)), _key_pem(k)),
            "tls.ca_cert",
            "keyCertSign",
        ),
        (
            lambda k, c: (
                _pem(
                    _ca_cert(
                        k,
                        not_before=NOW - dt.timedelta(days=9),
                        not_after=NOW - dt.timedelta(days=1),
                    )
                ),
                _key_pem(k),
            ),
            "tls.ca_cert",
            "expired on 2026-02-28",
        ),
        (
            lambda k, c: (_pem(_ca_cert(k, not_before=NOW + dt.timedelta(days=1))), _key_pem(k)),
            "tls.ca_cert",
            "not valid before",
        ),
    ],
)
def test_bad_user_ca_names_the_field(make, field: str, words: str) -> None:  # type: ignore[no-untyped-def]
    key = ec.generate_private_key(ec.SECP256R1())
    cert_pem, key_pem = make(key, _ca_cert(key))
    with pytest.raises(ConfigError) as err:
        InterceptionCA.load(cert_pem, key_pem, now=NOW)
    assert err.value.path == field and words in err.value.message, err.value


def test_ca_files(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _ca_cert(key, not_before=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    (tmp_path / "ca.pem").write_bytes(_pem(cert))
    (tmp_path / "ca.key").write_bytes(_key_pem(key))
    ca = read_ca_files(str(tmp_path / "ca.pem"), str(tmp_path / "ca.key"))
    assert ca.certificate == cert
    with pytest.raises(ConfigError) as err:
        read_ca_files(str(tmp_path / "ca.pem"), str(tmp_path / "missing.key"))
    assert err.value.path == "tls.ca_key" and "no such file" in err.value.message
    with pytest.raises(ConfigError) as err:
        read_ca_files(str(tmp_path), str(tmp_path / "ca.key"))
    assert err.value.path == "tls.ca_cert" and "directory" in err.value.message


# -- upstream verification ----------------------------------------------------------------
@pytest.fixture(scope="module")
def upstream_ca() -> InterceptionCA:
    """A stand-in for a public or corporate CA that signs the upstream server's certificate."""
    return InterceptionCA.generate("upstream-world")


def test_upstream_verified_against_extra_cas(upstream_ca: InterceptionCA) -> None:
    server = LeafCache(upstream_ca).server_context("upstream.test", "h2")
    ups = UpstreamContexts(extra_cas=[upstream_ca.cert_pem])
    c, _ = handshake(server, ups.context(["h2", "http/1.1"]), "upstream.test")
    assert c.selected_alpn_protocol() == "h2"
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server, ups.context(), "wrong-name.test")


def test_upstream_without_the_ca_fails(upstream_ca: InterceptionCA) -> None:
    server = LeafCache(upstream_ca).server_context("upstream.test")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server, UpstreamContexts().context(), "upstream.test")


def test_upstream_verification_off(upstream_ca: InterceptionCA) -> None:
    server = LeafCache(upstream_ca).server_context("upstream.test")
    ups = UpstreamContexts(verify=False)
    handshake(server, ups.context(), "any-name.test")


def test_upstream_contexts_are_cached_per_alpn_list() -> None:
    ups = UpstreamContexts(max_entries=2)
    a = ups.context(["h2", "http/1.1"])
    assert ups.context(("h2", "http/1.1")) is a
    assert ups.context(["http/1.1"]) is not a
    ups.context(["h2"])
    assert ups.context(["h2", "http/1.1"]) is not a  # evicted


def test_upstream_ca_files(tmp_path: Path, upstream_ca: InterceptionCA) -> None:
    good = tmp_path / "corp.pem"
    good.write_bytes(b"# corporate roots\n" + upstream_ca.cert_pem)
    assert read_upstream_cas([str(good)]) == [upstream_ca.cert_pem]
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"nothing here")
    with pytest.raises(ConfigError) as err:
        read_upstream_cas([str(good), str(empty)])
    assert err.value.path == "tls.upstream_ca_certs[1]" and "no PEM certificate" in str(err.value)
    with pytest.raises(ConfigError) as err:
        read_upstream_cas([str(tmp_path / "nope.pem")])
    assert err.value.path == "tls.upstream_ca_certs[0]"


# -- guest trust ----------------------------------------------------------------------------
def test_trust_files_in_an_empty_rootfs(ca: InterceptionCA) -> None:
    writes = {w.path: w for w in GuestTrust(ca.cert_pem).files({})}
    assert set(writes) == set(GUEST_BUNDLE_PATHS) | set(GUEST_CA_ANCHORS)
    for w in writes.values():
        assert w.created and w.content.strip() == ca.cert_pem.strip()


def test_trust_appends_to_debian_bundle_once(
    ca: InterceptionCA, upstream_ca: InterceptionCA
) -> None:
    deb = GUEST_BUNDLE_PATHS[0]
    existing_bundle = upstream_ca.cert_pem.rstrip(b"\n")  # no final newline: must still split
    state = {deb: (deb, existing_bundle)}
    writes = {w.path: w for w in GuestTrust(ca.cert_pem).files(state)}
    new = writes[deb].content
    assert not writes[deb].created
    assert new.startswith(existing_bundle + b"\n") and new.endswith(ca.cert_pem)
    # Written again (a restart): nothing is added twice.
    again = {w.path: w for w in GuestTrust(ca.cert_pem).files({deb: (deb, new)})}
    assert deb not in again or again[deb].content == new


def test_trust_writes_a_linked_bundle_once(ca: InterceptionCA) -> None:
    target = "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem"
    state = {
        "/etc/pki/tls/certs/ca-bundle.crt": (target, b""),
        target: (target, b""),
    }
    writes = [w for w in GuestTrust(ca.cert_pem).files(state) if w.path == target]
    assert len(writes) == 1 and writes[0].content.count(b"BEGIN CERTIFICATE") == 1


def test_trust_host_cas_merges_without_duplicates(
    ca: InterceptionCA, upstream_ca: InterceptionCA
) -> None:
    deb = GUEST_BUNDLE_PATHS[0]
    host = upstream_ca.cert_pem + b"\n" + upstream_ca.cert_pem
    writes = {
        w.path: w
        for w in GuestTrust(ca.cert_pem, host_bundle=host).files({deb: (deb, upstream_ca.cert_pem)})
    }
    assert writes[deb].content.count(b"BEGIN CERTIFICATE") == 2
    created = writes[GUEST_BUNDLE_PATHS[1]].content
    assert created.count(b"BEGIN CERTIFICATE") == 2


def test_trust_environment(ca: InterceptionCA) -> None:
    env = GuestTrust(ca.cert_pem).environment()
    assert env == {
        "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt",
        "REQUESTS_CA_BUNDLE": "/etc/ssl/certs/ca-certificates.crt",
        "CURL_CA_BUNDLE": "/etc/ssl/certs/ca-certificates.crt",
        "NODE_EXTRA_CA_CERTS": GUEST_CA_ANCHORS[0],
    }


def test_trusted_bundle_works_for_a_client(
    ca: InterceptionCA, upstream_ca: InterceptionCA, tmp_path: Path
) -> None:
    """The written bundle, loaded as SSL_CERT_FILE would be, trusts both corral's leaves and
    the host's roots (trust_host_cas)."""
    writes = GuestTrust(ca.cert_pem, host_bundle=upstream_ca.cert_pem).files({})
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(next(w.content for w in writes if w.path == GUEST_BUNDLE_PATHS[0]))
    client = ssl.create_default_context(cafile=str(bundle))
    handshake(LeafCache(ca).server_context("x.test"), client, "x.test")
    handshake(LeafCache(upstream_ca).server_context("y.test"), client, "y.test")


def test_host_bundle(tmp_path: Path) -> None:
    f = tmp_path / "b.pem"
    f.write_bytes(b"x")
    assert read_host_bundle([str(tmp_path / "none"), str(f)]) == b"x"
    assert read_host_bundle([str(tmp_path / "none")]) is None
