"""Pure parts of the SDK: argument checks, sizes, results, exports, the sync twin's surface."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import corral
import corral.sync
from corral.errors import ConfigError, SandboxNotFound
from corral.lifecycle import sandboxes
from corral.sdk import sandbox as sdk


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        (268435456, 268435456),
        ("256m", 256 * 1024**2),
        ("256M", 256 * 1024**2),
        ("256MiB", 256 * 1024**2),
        ("1g", 1024**3),
        ("16384k", 16 * 1024**2),
        ("16777216", 16 * 1024**2),
        ("1.5g", 1536 * 1024**2),
        ("1.5G", 1536 * 1024**2),
        ("0.5gb", 512 * 1024**2),
        ("64 m", 64 * 1024**2),
    ],
)
def test_parse_memory(value: object, expected: int | None) -> None:
    assert sdk.parse_memory(value) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value", ["", "m", "12x", "-1m", "1.5.1g", True, 1.5, "1m", "8m", 100, "²", "٣m", "1e9"]
)
def test_parse_memory_rejects(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        sdk.parse_memory(value)  # type: ignore[arg-type]
    assert info.value.path == "memory"


@given(st.text(max_size=20))
def test_parse_memory_never_crashes(text: str) -> None:
    try:
        result = sdk.parse_memory(text)
    except ConfigError:
        return
    assert result is not None and result >= sdk.MIN_MEMORY


def test_parse_cpus() -> None:
    assert sdk.parse_cpus(None) is None
    assert sdk.parse_cpus(0.5) == 0.5
    assert sdk.parse_cpus("1") == 1.0
    for bad in (0, -1, "x", 10_000, True):
        with pytest.raises(ConfigError, match="cpus"):
            sdk.parse_cpus(bad)  # type: ignore[arg-type]


def test_exec_result_text() -> None:
    res = sdk.ExecResult(0, b"hi\n", b"\xff")
    assert res.stdout_text == "hi\n"
    assert res.stderr_text == "\ufffd"
    assert res.ok and not sdk.ExecResult(1, b"", b"").ok


def test_check_env() -> None:
    assert sdk._check_env({"A": "1"}) == {"A": "1"}
    for bad in ({"": "x"}, {"A=B": "x"}, {"A": "x\0"}, {"A": 1}):
        with pytest.raises(ConfigError, match="env"):
            sdk._check_env(bad)  # type: ignore[arg-type]


def test_env_list_from_image_config() -> None:
    assert sandboxes._env_list_to_dict(["A=1", "B=x=y", "junk", "=v"]) == {"A": "1", "B": "x=y"}


def test_secrets_from_env_are_resolved_at_create(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKEN_X", "s3cr3t-value")
    (entry,) = sdk._resolve_secrets(
        [{"env_var": "TOKEN", "from_env": "TOKEN_X", "allowed_hosts": ["api.example.com"]}]
    )
    assert entry.value == "s3cr3t-value" and entry.from_env is None
    monkeypatch.delenv("TOKEN_X")
    with pytest.raises(ConfigError) as info:
        sdk._resolve_secrets(
            [{"env_var": "TOKEN", "from_env": "TOKEN_X", "allowed_hosts": ["api.example.com"]}]
        )
    assert info.value.path == "secrets[0].from_env"


def test_create_validates_before_touching_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path))

    async def attempt(**kw: object) -> None:
        await sdk.Sandbox.create(**kw)  # type: ignore[arg-type]

    cases = [
        ({"name": "Bad Name", "image": "x"}, "name"),
        ({"name": "ok", "image": ""}, "image"),
        ({"name": "ok", "image": "x", "network": {"policy": "none"}}, "network"),
        ({"name": "ok", "image": "x", "memory": "lots"}, "memory"),
        ({"name": "ok", "image": "x", "cpus": -1}, "cpus"),
        ({"name": "ok", "image": "x", "workdir": "rel"}, "workdir"),
        ({"name": "ok", "image": "x", "env": {"A=": "1"}}, "env['A=']"),
        ({"name": "ok", "image": "x", "ports": {70000: 80}}, "ports"),
    ]
    for kwargs, path in cases:
        with pytest.raises(ConfigError) as info:
            asyncio.run(attempt(**kwargs))
        assert info.value.path.startswith(path), (kwargs, info.value)
    assert not (tmp_path / "sandboxes").exists() or not any(
        p for p in (tmp_path / "sandboxes").iterdir() if not p.name.startswith(".")
    )


def test_get_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path))
    with pytest.raises(SandboxNotFound):
        asyncio.run(sdk.Sandbox.get("ghost"))
    with pytest.raises(SandboxNotFound):
        corral.sync.Sandbox.get("ghost")
    assert asyncio.run(sdk.Sandbox.list()) == []
    assert corral.sync.Sandbox.list() == []


def test_top_level_exports() -> None:
    for name in corral.__all__:
        assert getattr(corral, name) is not None
    assert corral.Sandbox is sdk.Sandbox
    assert corral.NetworkPolicy.none().is_offline
    with pytest.raises(AttributeError):
        _ = corral.NoSuchThing  # type: ignore[attr-defined]


def test_sync_twin_has_the_same_names_and_parameters() -> None:
    for cls_async, cls_sync in (
        (sdk.Sandbox, corral.sync.Sandbox),
        (sdk.SandboxFs, corral.sync.SandboxFs),
        (sdk.ExecStream, corral.sync.ExecStream),
    ):
        public = {n for n in dir(cls_async) if not n.startswith("_")}
        assert public <= set(dir(cls_sync)), public - set(dir(cls_sync))
        for name in public:
            a, s = getattr(cls_async, name), getattr(cls_sync, name)
            if callable(a) and not isinstance(a, type):
                assert list(inspect.signature(a).parameters) == list(
                    inspect.signature(s).parameters
                ), name


def test_supervisor_import_path_is_lean() -> None:
    """The supervisor's start-up must not import the heavy modules (docs/sdk.md)."""
    import subprocess
    import sys

    code = (
        "import sys;"
        "from corral.lifecycle import supervisor;"
        "print(' '.join(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", f"import sys;sys.path[:0]={sys.path!r};{code}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for heavy in ("asyncio", "typing", "dataclasses", "json", "re", "click", "rich", "enum"):
        assert heavy not in out, heavy


def test_privileges_are_checked_from_capeff() -> None:
    from corral.errors import PermissionDenied

    root = "Name:\tx\nCapEff:\t000001ffffffffff\n"
    sdk.check_privileges(root)
    only_sys_admin = f"CapEff:\t{1 << sdk.CAP_SYS_ADMIN:016x}\n"
    with pytest.raises(PermissionDenied, match="needs root \\(or CAP_NET_ADMIN\\)"):
        sdk.check_privileges(only_sys_admin)
    with pytest.raises(PermissionDenied, match="CAP_SYS_ADMIN and CAP_NET_ADMIN"):
        sdk.check_privileges("CapEff:\t0000000000000000\n")
    assert PermissionDenied.exit_code == 6
