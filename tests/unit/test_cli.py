"""CLI parsing with click's CliRunner: flags -> NetworkConfig, env pairs, errors, exit codes.

Nothing here starts a sandbox; commands that would are checked up to the first error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from corral.cli import sandbox as cli_sandbox
from corral.cli.main import cli
from corral.config import NetworkConfig, NetworkPolicy
from corral.errors import ConfigError, SandboxError


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path))
    return tmp_path


def test_default_network_is_public_only() -> None:
    assert cli_sandbox.build_network() == NetworkPolicy.public_only()


@pytest.mark.parametrize("preset", ["none", "public-only", "non-local", "allow-all"])
def test_presets(preset: str) -> None:
    assert str(cli_sandbox.build_network(net=preset).policy) == preset


def test_flags_map_one_to_one_onto_fields() -> None:
    config = cli_sandbox.build_network(
        net="public-only",
        rules=["allow:egress@api.example.com:tcp:443", "deny@10.0.0.0/8"],
        default_egress="allow",
        default_ingress="deny",
        publish=["8080:80", "127.0.0.1:5353:53/udp"],
        max_connections=10,
        ipv4_pool="10.200.0.0/16",
        ipv6_pool="fd42:1::/48",
        deny_domains=["evil.example", ".tracker.example"],
        dns_nameservers=["1.1.1.1:53"],
        tls_bypass=["*.bank.example"],
    )
    data = config.to_dict()
    assert data["policy"] == "public-only"
    assert [r["destination"] for r in data["rules"]] == ["api.example.com", "10.0.0.0/8"]
    assert data["default_egress"] == "allow" and data["default_ingress"] == "deny"
    assert data["max_connections"] == 10
    assert data["ipv4_pool"] == "10.200.0.0/16" and data["ipv6_pool"] == "fd42:1::/48"
    assert data["deny_domains"] == ["evil.example"]
    assert data["deny_domain_suffixes"] == [".tracker.example"]
    assert data["dns"]["nameservers"] == ["1.1.1.1:53"]
    assert data["tls"]["bypass"] == ["*.bank.example"]
    ports = {(b.host_port, b.guest_port, str(b.protocol)) for b in config.all_port_bindings}
    assert ports == {(8080, 80, "tcp"), (5353, 53, "udp")}


def test_network_file_is_the_base_and_flags_extend_it(tmp_path: Path) -> None:
    base = NetworkConfig(default_egress="allow", rules=[{"action": "deny", "destination": "1.2.3.4"}])
    path = tmp_path / "net.json"
    path.write_text(base.to_json())
    config = cli_sandbox.build_network(network_file=str(path), rules=["deny@5.6.7.8"])
    assert [str(r.destination) for r in config.rules] == ["1.2.3.4", "5.6.7.8"]
    assert str(config.default_egress) == "allow"


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"net": "none", "network_file": "x.json"}, "--net"),
        ({"net": "everything"}, "--net"),
        ({"network_file": "/no/such/file.json"}, "--network-file"),
        ({"rules": ["nonsense"]}, "--rule"),
        ({"publish": ["1:2:3:4"]}, "-p"),
        ({"max_connections": -1}, "--max-connections"),
        ({"ipv4_pool": "not-a-cidr"}, "--ipv4-pool"),
    ],
)
def test_bad_flags_name_the_flag(kwargs: dict[str, object], flag: str) -> None:
    with pytest.raises(ConfigError) as info:
        cli_sandbox.build_network(**kwargs)  # type: ignore[arg-type]
    assert str(info.value).startswith(flag), str(info.value)


def test_bad_network_file_names_the_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "net.json"
    path.write_text(json.dumps({"policy": "none", "surprise": 1}))
    with pytest.raises(ConfigError) as info:
        cli_sandbox.build_network(network_file=str(path))
    assert str(info.value).startswith("--network-file")


def test_parse_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FROM_HOST", "h")
    assert cli_sandbox.parse_env(["A=1", "B=x=y", "C=", "FROM_HOST"]) == {
        "A": "1", "B": "x=y", "C": "", "FROM_HOST": "h",
    }  # fmt: skip
    monkeypatch.delenv("FROM_HOST")
    for bad in (["=v"], ["FROM_HOST"]):
        with pytest.raises(ConfigError, match="--env"):
            cli_sandbox.parse_env(bad)


def test_strip_separator() -> None:
    assert cli_sandbox.strip_separator(("--", "ls", "--", "-l")) == ["ls", "--", "-l"]
    assert cli_sandbox.strip_separator(("ls", "-l")) == ["ls", "-l"]
    assert cli_sandbox.strip_separator(()) == []


def test_default_name_is_valid() -> None:
    from corral.runtime.state import validate_name

    for image in ("alpine", "registry.example:5000/Team/Tool@sha256:abcd", "python:3.12", "---"):
        validate_name(cli_sandbox.default_name(image))


def test_command_exit_codes() -> None:
    assert cli_sandbox.command_exit_code(SandboxError("command not found in the sandbox: 'x'")) == 127
    assert (
        cli_sandbox.command_exit_code(SandboxError("command is not executable in the sandbox: 'x'"))
        == 126
    )
    assert cli_sandbox.command_exit_code(SandboxError("other")) is None


def test_errors_print_one_sentence_and_the_class_exit_code() -> None:
    runner = CliRunner(mix_stderr=False)
    res = runner.invoke(cli, ["inspect", "ghost"])
    assert res.exit_code == SandboxError.exit_code
    assert res.stderr == "corral: no sandbox named 'ghost' (see 'corral ls')\n"
    res = runner.invoke(cli, ["run", "--memory", "lots", "img", "--", "true"])
    assert res.exit_code == ConfigError.exit_code
    assert res.stderr.startswith("corral: memory: 'lots' is not a memory size")
    res = runner.invoke(cli, ["run", "--rule", "bogus", "img"])
    assert res.exit_code == ConfigError.exit_code and res.stderr.startswith("corral: --rule")
    res = runner.invoke(cli, ["gc", "Bad Name"])
    assert res.exit_code == ConfigError.exit_code


def test_usage_errors_exit_2() -> None:
    runner = CliRunner(mix_stderr=False)
    assert runner.invoke(cli, ["run"]).exit_code == 2
    assert runner.invoke(cli, ["run", "--net", "bogus", "img"]).exit_code == 2
    assert runner.invoke(cli, ["exec", "name"]).exit_code == 2
    assert runner.invoke(cli, ["exec", "name", "--"]).exit_code == 2


def test_empty_listing_and_gc() -> None:
    runner = CliRunner(mix_stderr=False)
    res = runner.invoke(cli, ["ls", "-q"])
    assert (res.exit_code, res.stdout) == (0, "")
    res = runner.invoke(cli, ["gc"])
    assert (res.exit_code, res.stdout) == (0, "")
    assert "nothing to remove" in res.stderr


def test_every_documented_command_exists() -> None:
    for name in ("run", "create", "exec", "ls", "inspect", "logs", "start", "stop", "rm", "gc",
                 "policy",
                 "pull", "images"):
        assert name in cli.commands, name


@given(st.text(max_size=120))
def test_default_name_is_valid_for_any_image_text(image: str) -> None:
    from corral.runtime.state import validate_name

    validate_name(cli_sandbox.default_name(image))


@given(st.lists(st.text(max_size=10), max_size=6))
def test_parse_env_never_crashes(pairs: list[str]) -> None:
    try:
        env = cli_sandbox.parse_env(pairs)
    except ConfigError:
        return
    assert all(k and "=" not in k for k in env)
