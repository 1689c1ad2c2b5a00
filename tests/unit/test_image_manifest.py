"""Manifest/index decoding and platform selection; auth challenge and credentials."""

from __future__ import annotations

import base64
import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.errors import ImageError
from corral.runtime.images import auth
from corral.runtime.images.manifest import (
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Index,
    Manifest,
    Platform,
    parse_config,
    parse_manifest_or_index,
    select_platform,
)

D1, D2, D3 = ("sha256:" + c * 64 for c in "123")


def _desc(digest: str, media: str = OCI_MANIFEST, **extra: object) -> dict[str, object]:
    return {"mediaType": media, "digest": digest, "size": 10, **extra}


def _index(*platforms: tuple[str, str, str | None]) -> bytes:
    entries = []
    for i, (os_name, arch, variant) in enumerate(platforms):
        plat = {"os": os_name, "architecture": arch}
        if variant:
            plat["variant"] = variant
        entries.append(_desc("sha256:" + f"{i:x}" * 64, platform=plat))
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()


def test_manifest_decodes() -> None:
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": _desc(D1, "application/vnd.oci.image.config.v1+json"),
            "layers": [_desc(D2, "application/vnd.oci.image.layer.v1.tar+zstd")],
        }
    ).encode()
    m = parse_manifest_or_index(body, None)
    assert isinstance(m, Manifest)
    assert m.config.digest == D1 and [layer.digest for layer in m.layers] == [D2]


def test_media_type_from_header_or_shape() -> None:
    body = json.dumps({"schemaVersion": 2, "manifests": [_desc(D1)]}).encode()
    assert isinstance(parse_manifest_or_index(body, None), Index)
    assert isinstance(parse_manifest_or_index(body, DOCKER_MANIFEST_LIST), Index)


def test_platform_selection_prefers_linux_amd64() -> None:
    idx = parse_manifest_or_index(
        _index(
            ("linux", "arm64", "v8"),
            ("windows", "amd64", None),
            ("linux", "amd64", None),
            ("unknown", "unknown", None),
        ),  # fmt: skip
        None,
    )
    assert isinstance(idx, Index)
    chosen = select_platform(idx, Platform("linux", "amd64"))
    assert chosen.platform == Platform("linux", "amd64")
    arm = select_platform(idx, Platform("linux", "arm64", "v8"))
    assert arm.platform == Platform("linux", "arm64", "v8")
    with pytest.raises(ImageError, match=r"no linux/s390x variant \(available: linux/amd64"):
        select_platform(idx, Platform("linux", "s390x"))


def test_variant_falls_back_to_unvaried() -> None:
    idx = parse_manifest_or_index(_index(("linux", "arm", "v6"), ("linux", "arm", None)), None)
    assert isinstance(idx, Index)
    assert select_platform(idx, Platform("linux", "arm", "v7")).platform == Platform("linux", "arm")


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"schemaVersion": 1, "mediaType": OCI_MANIFEST}, "schemaVersion 1"),
        ({"schemaVersion": 2, "mediaType": "text/plain"}, "unsupported media type"),
        ({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}, "config is not a JSON object"),
        (
            {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": _desc(D1), "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "sha256:x",
                 "size": 1}]},
            r"layers\[0\].digest",
        ),
        (
            {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": _desc(D1),
             "layers": [_desc(D2, "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip")]},
            "cannot unpack",
        ),
        (
            {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": _desc(D1),
             "layers": [{**_desc(D2, "application/vnd.oci.image.layer.v1.tar"), "size": -1}]},
            "non-negative",
        ),
    ],
)  # fmt: skip
def test_bad_manifests(doc: dict[str, object], message: str) -> None:
    with pytest.raises(ImageError, match=message):
        parse_manifest_or_index(json.dumps(doc).encode(), None)


def test_oversized_and_non_json() -> None:
    with pytest.raises(ImageError, match="more than"):
        parse_manifest_or_index(b" " * (5 * 1024 * 1024), None)
    with pytest.raises(ImageError, match="not valid JSON"):
        parse_manifest_or_index(b"{", None)
    with pytest.raises(ImageError, match="not a JSON object"):
        parse_manifest_or_index(b"[]", None)


def test_config() -> None:
    body = json.dumps(
        {"config": {"Cmd": ["sh"]}, "rootfs": {"type": "layers", "diff_ids": [D1, D2]},
         "os": "linux", "architecture": "amd64", "created": "2026-01-01T00:00:00Z"}
    ).encode()  # fmt: skip
    cfg = parse_config(body)
    assert cfg.config == {"Cmd": ["sh"]} and cfg.diff_ids == (D1, D2)
    with pytest.raises(ImageError, match="diff_ids"):
        parse_config(b'{"config": {}}')


@given(st.binary(max_size=400))
def test_manifest_parser_survives_garbage(data: bytes) -> None:
    with contextlib.suppress(ImageError):
        parse_manifest_or_index(data, None)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(
        st.sampled_from(
            [
                "schemaVersion",
                "mediaType",
                "config",
                "layers",
                "manifests",
                "digest",
                "size",
                "platform",
                "os",
                "architecture",
            ]
        ),
        children,
        max_size=6,
    ),  # fmt: skip
    max_leaves=20,
)


@given(_json)
def test_manifest_parser_survives_odd_json(doc: object) -> None:
    for content_type in (None, OCI_MANIFEST, OCI_INDEX):
        with contextlib.suppress(ImageError):
            parse_manifest_or_index(json.dumps(doc).encode(), content_type)
        with contextlib.suppress(ImageError):
            parse_config(json.dumps(doc).encode())


# -- auth -----------------------------------------------------------------------------------
def test_bearer_challenge() -> None:
    c = auth.parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:a/b:pull,push"'
    )
    assert c.scheme == "bearer"
    assert c.params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:a/b:pull,push",
    }
    assert auth.parse_challenge('Basic realm="x \\"q\\""').params == {"realm": 'x "q"'}
    assert auth.parse_challenge("Basic").params == {}
    with pytest.raises(ImageError, match="unreadable"):
        auth.parse_challenge('Bearer realm="unterminated')


@given(st.text(max_size=200))
def test_challenge_parser_survives_garbage(text: str) -> None:
    with contextlib.suppress(ImageError):
        auth.parse_challenge(text)


def test_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(auth.USER_ENV, raising=False)
    monkeypatch.delenv(auth.PASSWORD_ENV, raising=False)
    f = tmp_path / "auth.json"
    assert auth.load_credentials("h:5000", f) is None
    f.write_text(json.dumps({"auths": {
        "h:5000": {"auth": base64.b64encode(b"u:p:w").decode()},
        "https://index.docker.io/v1/": {"username": "hub", "password": "pw"},
        "bad": {"auth": "!!"},
    }}))  # fmt: skip
    assert auth.load_credentials("h:5000", f) == auth.Credentials("u", "p:w")
    assert auth.load_credentials("docker.io", f) == auth.Credentials("hub", "pw")
    assert auth.load_credentials("other", f) is None
    with pytest.raises(ImageError, match="not base64"):
        auth.load_credentials("bad", f)
    monkeypatch.setenv(auth.USER_ENV, "envuser")
    monkeypatch.setenv(auth.PASSWORD_ENV, "envpw")
    assert auth.load_credentials("other", f) == auth.Credentials("envuser", "envpw")
    assert auth.Credentials("a", "b").basic_header() == "Basic YTpi"


def test_insecure_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(auth.INSECURE_ENV, "reg.test:5000, 10.0.0.1")
    allowed = auth.insecure_registries(["extra:1"])
    assert auth.is_insecure("reg.test:5000", allowed)
    assert not auth.is_insecure("reg.test:5001", allowed)
    assert auth.is_insecure("10.0.0.1:80", allowed)
    assert auth.is_insecure("extra:1", allowed)
    assert auth.is_insecure("localhost:5000", allowed)
    assert auth.is_insecure("127.0.0.1:5000", allowed)
    assert auth.is_insecure("[::1]:5000", allowed)
    assert not auth.is_insecure("docker.io", allowed)
