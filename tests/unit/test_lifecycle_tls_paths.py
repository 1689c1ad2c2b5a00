"""TLS files named relative to the caller reach the supervisor as the files the caller meant."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.config import NetworkConfig, TLSConfig
from corral.lifecycle.sandboxes import absolute_tls_paths


def test_relative_tls_files_become_absolute_against_the_callers_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = NetworkConfig(
        tls=TLSConfig(ca_cert="ca.pem", ca_key="keys/ca.key",
                      upstream_ca_certs=["up.pem", "/etc/ssl/x.pem"])  # fmt: skip
    )
    tls = absolute_tls_paths(config).tls
    assert tls is not None
    assert tls.ca_cert == str(tmp_path / "ca.pem")
    assert tls.ca_key == str(tmp_path / "keys" / "ca.key")
    assert list(tls.upstream_ca_certs) == [str(tmp_path / "up.pem"), "/etc/ssl/x.pem"]
    # The stored form round-trips: the supervisor reads the same paths back.
    again = NetworkConfig.from_json(absolute_tls_paths(config).to_json()).tls
    assert again is not None and again.ca_cert == str(tmp_path / "ca.pem")


def test_home_relative_paths_expand_and_no_tls_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/someone")
    tls = absolute_tls_paths(NetworkConfig(tls=TLSConfig(upstream_ca_certs=["~/ca.pem"]))).tls
    assert tls is not None and list(tls.upstream_ca_certs) == ["/home/someone/ca.pem"]
    plain = NetworkConfig()
    assert absolute_tls_paths(plain) is plain
