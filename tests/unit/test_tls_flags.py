"""The TLS and secret flags of `corral run/create` become the config fields they name."""

from __future__ import annotations

import pytest

from corral.cli.sandbox import build_network
from corral.config.shorthand import parse_secret
from corral.errors import ConfigError


def test_tls_flags_map_to_tlsconfig() -> None:
    c = build_network(
        tls_intercepted_ports=[443, 8443], tls_ca_cert="/ca.pem", tls_ca_key="/ca.key",
        trust_host_cas=True, block_quic=True, tls_bypass=["*.example.com"],
        tls_upstream_ca_certs=["/up.pem"], tls_verify_upstream=False,
    )  # fmt: skip
    assert c.tls is not None
    assert c.tls.intercepted_ports == (443, 8443)
    assert (c.tls.ca_cert, c.tls.ca_key) == ("/ca.pem", "/ca.key")
    assert c.tls.block_quic is True and c.tls.verify_upstream is False
    assert c.tls.bypass == ("*.example.com",) and c.tls.upstream_ca_certs == ("/up.pem",)
    assert c.trust_host_cas is True
    assert build_network(tls=True).tls is not None
    assert build_network().tls is None


@pytest.mark.parametrize(
    ("kw", "flag"),
    [
        ({"tls_ca_cert": "/a"}, "--tls-ca-key"),
        ({"tls_ca_key": "/a"}, "--tls-ca-cert"),
        ({"tls_intercepted_ports": [0]}, "--tls-intercepted-port"),
        ({"tls_intercepted_ports": [443, 443]}, "--tls-intercepted-port"),
        ({"tls_bypass": ["exa mple"]}, "--tls-bypass"),
    ],
)
def test_bad_tls_flags_name_the_flag(kw: dict[str, object], flag: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_network(**kw)  # type: ignore[arg-type]
    assert err.value.path == flag, err.value


def test_secret_flag_takes_the_value_from_the_environment_only() -> None:
    entry = parse_secret("GITHUB_TOKEN@api.github.com,*.github.com")
    assert entry.value is None and entry.from_env == "GITHUB_TOKEN"
    assert entry.allowed_hosts == ("api.github.com", "*.github.com")
    with pytest.raises(ConfigError):
        parse_secret("GITHUB_TOKEN=ghp_literal@api.github.com")
