"""The pure parts of the TLS interception shell: the image's trust files read through its own
symlinks, the secret hand-off, the interception settings from a config."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import pytest

from corral.config import NetworkConfig, SecretEntry, TLSConfig
from corral.errors import ConfigError
from corral.net.guest_trust import MAX_LINK_HOPS, resolve_in_root, rootfs_state
from corral.net.secret_handoff import (
    HANDOFF_FILE,
    read_tls_summary,
    secret_table,
    take_handoff,
    write_handoff,
    write_tls_summary,
)
from corral.net.secrets import SecretTable
from corral.net.tls_ca import GUEST_BUNDLE_PATHS, GuestTrust, InterceptionCA
from corral.net.tls_interceptor import DEFAULT_PORTS, TlsSettings


def test_links_resolve_inside_the_rootfs_never_on_the_host(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc/pki/ca-trust/extracted/pem").mkdir(parents=True)
    (root / "etc/pki/tls/certs").mkdir(parents=True)
    bundle = root / "etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem"
    bundle.write_bytes(b"image roots\n")
    # RHEL's layout: an absolute link, which means the rootfs's root, not the host's.
    os.symlink(
        "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
        root / "etc/pki/tls/certs/ca-bundle.crt",
    )
    assert (
        resolve_in_root(root, "/etc/pki/tls/certs/ca-bundle.crt")
        == "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem"
    )
    # A link that climbs out with .. stays inside; a link to the host's /etc/passwd reads the rootfs's.
    (root / "etc/ssl").mkdir(parents=True)
    os.symlink("../../../../../../etc/passwd", root / "etc/ssl/cert.pem")
    assert resolve_in_root(root, "/etc/ssl/cert.pem") == "/etc/passwd"
    state = rootfs_state(root, ["/etc/ssl/cert.pem", "/etc/pki/tls/certs/ca-bundle.crt"])
    assert state["/etc/ssl/cert.pem"] == ("/etc/passwd", None)  # not the host's passwd
    assert state["/etc/pki/tls/certs/ca-bundle.crt"][1] == b"image roots\n"


def test_link_loops_and_long_chains_stop(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    os.symlink("/b", root / "a")
    os.symlink("/a", root / "b")
    assert resolve_in_root(root, "/a") == "/a"  # a loop: left as it is
    for i in range(MAX_LINK_HOPS + 2):
        os.symlink(f"/l{i + 1}", root / f"l{i}")
    assert resolve_in_root(root, "/l0") == "/l0"


def test_trust_files_for_an_image_without_bundles_and_with_one(tmp_path: Path) -> None:
    ca = InterceptionCA.generate("t")
    root = tmp_path / "root"
    root.mkdir()
    paths = [*GUEST_BUNDLE_PATHS]
    writes = GuestTrust(ca.cert_pem).files(rootfs_state(root, paths))
    assert {w.path for w in writes} >= set(GUEST_BUNDLE_PATHS)
    assert all(ca.cert_pem.strip() in w.content for w in writes)
    (root / "etc/ssl/certs").mkdir(parents=True)
    (root / "etc/ssl/certs/ca-certificates.crt").write_bytes(
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    )
    writes = {w.path: w for w in GuestTrust(ca.cert_pem).files(rootfs_state(root, paths))}
    debian = writes["/etc/ssl/certs/ca-certificates.crt"]
    assert debian.content.startswith(b"-----BEGIN CERTIFICATE-----\nAAAA") and not debian.created


def test_handoff_is_private_read_once(tmp_path: Path) -> None:
    write_handoff(tmp_path, {"API_KEY": "v4lue"})
    path = tmp_path / HANDOFF_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert take_handoff(tmp_path) == {"API_KEY": "v4lue"}
    assert not path.exists() and take_handoff(tmp_path) is None


def test_secret_table_from_state_needs_the_values(tmp_path: Path) -> None:
    entry = SecretEntry(env_var="API_KEY", value="v4lue-123", allowed_hosts=["api.example.com"])
    stored = {k: v for k, v in entry.to_dict().items() if k != "value"}
    assert secret_table([], None, None) is None
    table = secret_table([stored], {"API_KEY": "v4lue-123"}, None)
    assert table is not None and table.names == ("API_KEY",) and "v4lue" not in repr(table)
    with pytest.raises(ConfigError) as err:
        secret_table([stored], None, None)
    assert err.value.path == "secrets[0]" and "create it again" in str(err.value)


def test_tls_summary_names_no_value(tmp_path: Path) -> None:
    write_tls_summary(tmp_path, {"ca_fingerprint": "AB:CD", "secrets": ["API_KEY"]})
    assert read_tls_summary(tmp_path) == {"ca_fingerprint": "AB:CD", "secrets": ["API_KEY"]}
    assert read_tls_summary(tmp_path / "nowhere") is None


def test_settings_from_config() -> None:
    assert TlsSettings.from_config("s", NetworkConfig()) is None
    entry = SecretEntry(env_var="API_KEY", value="v4lue-123", allowed_hosts=["api.example.com"])
    table = SecretTable.from_entries([entry], environ={})
    s = TlsSettings.from_config("s", NetworkConfig(), table)  # a secret alone turns it on
    assert s is not None and s.ports == frozenset(DEFAULT_PORTS) and s.secrets is table
    s = TlsSettings.from_config(
        "s",
        NetworkConfig(
            tls=TLSConfig(intercepted_ports=[8443], bypass=["*.corp.example"], block_quic=True)
        ),
    )
    assert s is not None and s.intercepts(8443) and not s.intercepts(443) and s.block_quic
    assert s.bypassed("git.corp.example") and not s.bypassed("corp.example")
    with pytest.raises(ConfigError) as err:
        TlsSettings.from_config(
            "s", NetworkConfig(tls=TLSConfig(ca_cert="/nope.pem", ca_key="/nope.key"))
        )
    assert err.value.path == "tls.ca_cert"


def test_stream_scan_stops_the_chunk_that_completes_a_placeholder() -> None:
    from corral.config import ViolationAction
    from corral.net.tls_interceptor import StreamScan

    entry = SecretEntry(env_var="API_KEY", value="v4lue-123", allowed_hosts=["api.example.com"])
    table = SecretTable.from_entries([entry], environ={})
    scan = StreamScan(table, "imap.example.com")
    assert scan.receive_guest(b"a001 LOGIN user ").to_upstream == b"a001 LOGIN user "
    assert scan.receive_guest(b"$CORRAL_SEC").to_upstream == b"$CORRAL_SEC"  # not complete yet
    out = scan.receive_guest(b"RET_API_KEY\r\n")
    assert out.to_upstream == b"" and out.close is not None
    (v,) = out.violations
    assert (v.secret, v.host, v.action) == (
        "API_KEY",
        "imap.example.com",
        ViolationAction.BLOCK_AND_LOG,
    )
    assert scan.receive_upstream(b"* OK").to_guest == b"* OK"


def test_upstream_sessions_are_kept_bounded_refreshed_and_forgotten(tmp_path: Path) -> None:
    """The interceptor's upstream session cache: a real TLS 1.3 session (made by a handshake
    over memory BIOs), fresh until SESSION_REFRESH of its lifetime, LRU-bounded, dropped by
    forget_session (what a failed upstream handshake calls)."""
    import ssl

    from corral.net.audit import AuditLog
    from corral.net.tls_ca import LeafCache, UpstreamContexts
    from corral.net.tls_interceptor import SESSION_REFRESH, UPSTREAM_SESSIONS, TlsInterceptor

    server = LeafCache(InterceptionCA.generate("s")).server_context("up.example.com", None)
    client = UpstreamContexts(verify=False).context()
    cin, cout, sin, sout = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(cin, cout, server_hostname="up.example.com")
    s = server.wrap_bio(sin, sout, server_side=True)
    for end, out, peer_in in ((c, cout, sin), (s, sout, cin), (c, cout, sin), (s, sout, cin)):
        with contextlib.suppress(ssl.SSLWantReadError):
            end.do_handshake()
        peer_in.write(out.read())
    with pytest.raises(ssl.SSLWantReadError):
        c.read(1)  # takes in the ticket
    session = c.session
    assert session is not None and session.has_ticket and session.timeout > 0

    fresh = TlsInterceptor.session_fresh
    assert fresh(session, session.time + 1)
    assert not fresh(session, session.time + session.timeout * SESSION_REFRESH + 1)

    settings = TlsSettings(ca=InterceptionCA.generate("t"), ports=frozenset({443}))
    tls = TlsInterceptor(settings, AuditLog("t", tmp_path))
    key = ("up.example.com", "192.0.2.1", 443, ("h2",))
    assert tls.session_for(key) is None
    tls.keep_session(key, session)
    assert tls.session_for(key) is session
    for i in range(UPSTREAM_SESSIONS):
        tls.keep_session(("other", i), session)
    assert len(tls._sessions) == UPSTREAM_SESSIONS and tls.session_for(key) is None  # LRU
    tls.keep_session(key, session)
    tls.forget_session(key)
    tls.forget_session(key)  # forgetting twice is harmless
    assert tls.session_for(key) is None
    tls.audit.close()
