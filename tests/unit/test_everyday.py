"""Pure parts of everyday use (issue 10): refusals of what is not enforced yet, the new CLI
flags and their mapping onto NetworkConfig, SDK argument edges, volumes, random ports, the
hosts file, image paths, cp targets, port listing, env files, docker's entrypoint rule."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from corral.cli import copy as cli_copy
from corral.cli import port as cli_port
from corral.cli import sandbox as cli_sandbox
from corral.cli.main import cli
from corral.config import (
    DNSConfig,
    NetworkConfig,
    NetworkPolicy,
    PortBinding,
    TLSConfig,
    enforcement,
    parse_publish,
    unsupported,
)
from corral.config.enforcement import NotEnforced
from corral.errors import ConfigError
from corral.runtime import launcher, state, volumes
from corral.runtime.images import local
from corral.runtime.images.store import local_alias
from corral.sdk import sandbox as sdk

# -- refusals (point 7) -------------------------------------------------------------------


#: A part that is never enforced, standing in for whatever NOT_ENFORCED lists at the time
#: (the TLS and DNS work lifts its entries as they land).
_FAKE = NotEnforced(
    "max_connections", "a connection cap of 7", "--max-connections 7",
    lambda config, secrets: config.max_connections == 7,
)  # fmt: skip


@pytest.fixture(name="fake_part")
def fake_part_fixture(monkeypatch: pytest.MonkeyPatch) -> NotEnforced:
    monkeypatch.setattr(enforcement, "NOT_ENFORCED", (*enforcement.NOT_ENFORCED, _FAKE))
    return _FAKE


def test_what_is_not_enforced_is_refused_with_one_sentence(fake_part: NotEnforced) -> None:
    sentence = unsupported(NetworkConfig(max_connections=7))
    assert sentence is not None and sentence.startswith("max_connections: a connection cap")
    assert "not there yet" in sentence and "--max-connections 7" in sentence
    assert unsupported(NetworkConfig(max_connections=8)) is None


def test_every_listed_part_names_flags_that_exist() -> None:
    options = {opt for param in cli_sandbox.run.params for opt in param.opts}
    for part in enforcement.NOT_ENFORCED:
        for word in part.flags.replace(",", " ").split():
            if word.startswith("--"):
                assert word in options, (part.field, word)


def test_dns_fields_are_not_refused() -> None:
    config = NetworkConfig(
        deny_domains=["evil.example"],
        deny_domain_suffixes=[".bad.example"],
        dns=DNSConfig(nameservers=["1.1.1.1"], query_timeout_ms=300, rebind_protection=False),
        dns_rebind_protection=False,
    )
    assert unsupported(config) is None
    assert unsupported(NetworkPolicy.public_only()) is None


def test_sdk_refuses_before_anything_else(
    fake_part: NotEnforced, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path))
    with pytest.raises(ConfigError) as info:
        asyncio.run(sdk.Sandbox.create(
            "x", image="img", network=NetworkConfig(max_connections=7),
            secrets=[{"env_var": "T", "from_env": "NOT_SET_ANYWHERE",
                      "allowed_hosts": ["a.example"]}],
        ))  # fmt: skip
    # Refused before $NOT_SET_ANYWHERE is even read, and before the image is looked at.
    assert info.value.path == "max_connections"
    assert not (tmp_path / "sandboxes").exists() or not list((tmp_path / "sandboxes").iterdir())


def test_cli_refuses_unenforced_flags(fake_part: NotEnforced) -> None:
    res = CliRunner(mix_stderr=False).invoke(
        cli, ["run", "--max-connections", "7", "img", "--", "true"]
    )
    assert res.exit_code == ConfigError.exit_code, res.output
    assert res.stderr.startswith("corral: max_connections: ") and res.stderr.count("\n") == 1


def test_cli_dns_flags_map_onto_the_config() -> None:
    config = cli_sandbox.build_network(
        deny_domains=["evil.example", ".bad.example"],
        dns_nameservers=["192.0.2.53", "[2001:db8::53]:5353"],
        dns_query_timeout_ms=750,
        dns_rebind_protection=False,
    )
    assert config.deny_domains == ("evil.example",)
    assert config.deny_domain_suffixes == (".bad.example",)
    assert config.dns == DNSConfig(
        rebind_protection=False,
        nameservers=("192.0.2.53", "[2001:db8::53]:5353"),
        query_timeout_ms=750,
    )
    assert unsupported(config) is None
    with pytest.raises(ConfigError) as info:
        cli_sandbox.build_network(dns_query_timeout_ms=0)
    assert info.value.path == "--dns-query-timeout-ms"


def test_cli_tls_flags_map_onto_tls_config() -> None:
    config = cli_sandbox.build_network(
        tls=True, tls_bypass=["*.internal"], tls_upstream_ca_certs=["/ca.pem"],
        tls_verify_upstream=False, block_quic=True, on_secret_violation="block-and-terminate",
    )  # fmt: skip
    assert config.tls == TLSConfig(
        bypass=("*.internal",), upstream_ca_certs=("/ca.pem",), verify_upstream=False,
        block_quic=True,
    )  # fmt: skip
    assert str(config.on_secret_violation) == "block-and-terminate"


# -- SDK edges (point 8) ------------------------------------------------------------------


def test_exec_with_a_str_for_args_is_a_type_error_with_a_hint() -> None:
    with pytest.raises(TypeError, match=r"exec\('echo', \['hi'\]\)"):
        sdk._exec_argv("echo", "hi")
    with pytest.raises(TypeError, match="cmd must be a str"):
        sdk._exec_argv(["echo"], None)
    with pytest.raises(TypeError, match=r"args\[1\]"):
        sdk._exec_argv("echo", ["a", 1])
    assert sdk._exec_argv("echo", ("a", "b")) == ["echo", "a", "b"]


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf, 10**9, True, "5"])
def test_timeouts_outside_the_channel_range_are_refused(bad: object) -> None:
    with pytest.raises(ConfigError) as info:
        sdk.check_timeout(bad)  # type: ignore[arg-type]
    assert info.value.path == "timeout"
    assert sdk.check_timeout(sdk.MAX_EXEC_TIMEOUT) == sdk.MAX_EXEC_TIMEOUT
    assert sdk.check_timeout(0.001) == 0.001


def test_cli_timeout_zero_names_the_flag_and_exits_2() -> None:
    for argv in (["run", "--timeout", "0", "img", "--", "true"],
                 ["exec", "--timeout", "0", "box", "--", "true"]):  # fmt: skip
        res = CliRunner(mix_stderr=False).invoke(cli, argv)
        assert res.exit_code == 2 and res.stderr.startswith("corral: --timeout: 0.0 is not")


def test_memory_sizes_as_docker_reads_them() -> None:
    assert sdk.parse_memory("1.5g") == 1536 * 1024**2
    assert sdk.parse_memory("2GiB") == 2 * 1024**3
    with pytest.raises(ConfigError, match="minimum of 16 MiB"):
        sdk.parse_memory("15m")
    assert sdk.parse_memory(sdk.MIN_MEMORY) == sdk.MIN_MEMORY


def test_status_of_a_removed_sandbox(tmp_path: Path) -> None:
    assert state.status(tmp_path / "gone") == state.REMOVED


# -- volumes, ports, names (points 4, 6) -------------------------------------------------


def test_parse_volume(tmp_path: Path) -> None:
    v = volumes.parse_volume(f"{tmp_path}:/data:ro")
    assert (v.host, v.guest, v.read_only) == (str(tmp_path), "/data", True)
    assert volumes.parse_volume(f"{tmp_path}://a/./b/:rw").guest == "/a/b"
    rel = volumes.parse_volume(f"./{tmp_path.name}:/x", cwd=str(tmp_path.parent))
    assert rel.host == str(tmp_path)
    for bad in (f"{tmp_path}", f"{tmp_path}:/x:rx", f"{tmp_path}:x", "::", f"{tmp_path}:/"):
        with pytest.raises(ConfigError):
            volumes.parse_volume(bad)
    assert volumes.Volume.from_wire(v.to_wire()) == v


def test_volume_idmap_maps_only_the_owner() -> None:
    assert volumes.idmap_lines(1000, 0, 1_000_000_000) == "1000 1000000000 1\n"
    assert volumes.idmap_lines(0, 33, 1_000_000_000) == "0 1000000033 1\n"


def test_hosts_lines_put_the_address_first() -> None:
    entries = [("host.corral.internal", "172.16.0.1"), ("host.microsandbox.internal", "172.16.0.1"),
               ("host.corral.internal", "fd42::1")]  # fmt: skip
    assert launcher.hosts_lines(entries) == [
        "172.16.0.1\thost.corral.internal host.microsandbox.internal",
        "fd42::1\thost.corral.internal",
    ]


def test_random_published_ports() -> None:
    assert parse_publish("80") == PortBinding(host_port=0, guest_port=80)
    assert parse_publish("0:80") == PortBinding(host_port=0, guest_port=80)
    assert parse_publish("127.0.0.1::80") == PortBinding(bind="127.0.0.1", host_port=0,
                                                         guest_port=80)  # fmt: skip
    assert parse_publish("53/udp").protocol == "udp"
    config = NetworkConfig(ports={0: 80}, port_bindings=[PortBinding(host_port=0, guest_port=81)])
    assert NetworkConfig.from_json(config.to_json()) == config  # two random ports, no clash


def test_port_lines() -> None:
    sandbox_state = state.SandboxState(
        name="x", image="i", network=NetworkConfig(ports={8080: 80}).to_dict(),
        published=[{"bind": "127.0.0.1", "host_port": 40001, "guest_port": 80, "protocol": "tcp"},
                   {"bind": "::1", "host_port": 40002, "guest_port": 53, "protocol": "udp"}],
    )  # fmt: skip
    assert cli_port.published_lines(sandbox_state) == [
        "53/udp -> [::1]:40002", "80/tcp -> 127.0.0.1:40001",
    ]  # fmt: skip
    assert cli_port.published_lines(sandbox_state, "53/udp") == ["53/udp -> [::1]:40002"]
    stopped = state.SandboxState(name="x", image="i",
                                 network=NetworkConfig(ports={8080: 80}).to_dict())  # fmt: skip
    assert cli_port.published_lines(stopped) == ["80/tcp -> 127.0.0.1:8080"]
    with pytest.raises(ConfigError):
        cli_port.published_lines(stopped, "http")


# -- images, cp, env files, entrypoint (points 4, 5) -------------------------------------


def test_image_paths_and_local_names() -> None:
    for path in ("./rootfs", "/abs/dir", "../x.tar", "~/img", ".", ".."):
        assert local.looks_like_path(path)
    for name in ("alpine", "python:3.12", "localhost/x", "host:5000/a/b@sha256:" + "0" * 64):
        assert not local.looks_like_path(name)
    assert local_alias("mytool") == "localhost/mytool"
    assert local_alias("team/tool:1") == "localhost/team/tool:1"
    assert local_alias("docker.io/library/alpine") is None
    assert local_alias("host:5000/x") is None and local_alias("localhost/x") is None


def test_fingerprint_sees_changes(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("1")
    first = local.fingerprint(tmp_path)
    assert local.fingerprint(tmp_path) == first
    (tmp_path / "a").write_text("22")
    assert local.fingerprint(tmp_path) != first


def test_cp_targets() -> None:
    assert cli_copy.split_target("box:/etc/hosts") == ("box", "/etc/hosts")
    assert cli_copy.split_target("box:") == ("box", "/")
    assert cli_copy.split_target("./a:b") == (None, "./a:b")
    assert cli_copy.split_target("/tmp/x") == (None, "/tmp/x")
    assert cli_copy.split_target("Not A Name:/x") == (None, "Not A Name:/x")


def test_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FROM_HOST", "h")
    monkeypatch.delenv("NOT_ON_HOST", raising=False)
    path = tmp_path / "env"
    path.write_text('# c\nA=1\nB="quoted stays"\n  C=x=y\n\nFROM_HOST\nNOT_ON_HOST\n')
    assert cli_sandbox.parse_env_file(str(path)) == {
        "A": "1", "B": '"quoted stays"', "C": "x=y", "FROM_HOST": "h",
    }  # fmt: skip
    path.write_text("BAD KEY=1\n")
    with pytest.raises(ConfigError, match="line 1"):
        cli_sandbox.parse_env_file(str(path))


def test_entrypoint_rule_is_dockers() -> None:
    image = SimpleNamespace(entrypoint=["/entry"], cmd=["--default"])
    assert cli_sandbox.run_argv([], image, None) == ["/entry", "--default"]
    assert cli_sandbox.run_argv(["x"], image, None) == ["/entry", "x"]
    assert cli_sandbox.run_argv([], image, "/bin/sh") == ["/bin/sh"]
    assert cli_sandbox.run_argv(["-c", "id"], image, "/bin/sh") == ["/bin/sh", "-c", "id"]
    assert cli_sandbox.run_argv(["ls"], image, "") == ["ls"]
    plain = SimpleNamespace(entrypoint=[], cmd=["/bin/sh"])
    assert cli_sandbox.run_argv(["ls", "-l"], plain, None) == ["ls", "-l"]


def test_launch_options_are_checked() -> None:
    assert sdk._launch_options("app", "web-1", None) == {"user": "app", "hostname": "web-1"}
    for user in ("", "a b", "1:2:3", 5):
        with pytest.raises(ConfigError, match="user"):
            sdk._launch_options(user, None, None)
    for hostname in ("", "-x", "a" * 65, "a b"):
        with pytest.raises(ConfigError, match="hostname"):
            sdk._launch_options(None, hostname, None)
    with pytest.raises(ConfigError, match="list of volumes"):
        sdk._launch_options(None, None, "/a:/b")


def test_registry_mirror_serves_docker_io_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from corral.runtime.images.reference import parse_reference
    from corral.runtime.images.registry import MIRROR_ENV, RegistryClient

    monkeypatch.setenv(MIRROR_ENV, "mirror.internal:5000")
    client = RegistryClient()
    assert client.endpoint(parse_reference("alpine")) == "mirror.internal:5000"
    assert client.endpoint(parse_reference("docker.io/team/tool:1")) == "mirror.internal:5000"
    assert client.endpoint(parse_reference("ghcr.io/team/tool")) == "ghcr.io"
    monkeypatch.delenv(MIRROR_ENV)
    assert RegistryClient().endpoint(parse_reference("alpine")) == "registry-1.docker.io"
