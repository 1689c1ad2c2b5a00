# ruff: noqa: F811  (pytest fixtures imported from other test modules are parameters here)
"""TLS interception and secrets under a real sandbox (SDK -> supervisor -> SandboxNetwork),
with the tools image's own clients (curl, python3 urllib, openssl) using the trust bundle and
variables corral wrote into the guest, names resolved by the sandbox's own DNS (so the
destination is pinned), and the real value of a secret searched for everywhere it must not be.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import corral.sync
from corral.config import DNSConfig, NetworkConfig, SecretEntry, TLSConfig
from corral.errors import ConfigError, SandboxError
from tests.integration.lifecycle_support import (  # noqa: F401 - fixtures
    corral_cli,
    corral_home_fixture,
    image_fixture,
    in_world_fixture,
    unique,
)
from tests.integration.test_net_sandbox import tools_image  # noqa: F401 - fixture
from tests.support import world as world_mod
from tests.support.dns_server import RunningDnsServer, start_dns_server
from tests.support.tls_servers import NAME, make_certs, start_tls_servers
from tests.support.world import SERVER_V4

pytestmark = [pytest.mark.usefixtures("in_world"), pytest.mark.timeout(300)]

#: A DNS server of this module's own (the DNS tests run theirs on the world's DNS address).
RESOLVER_V4 = "203.0.113.155"  # (.51-.54 are the test registries)
VALUE = "ghp_realvalue0123456789abcdef"
PLACEHOLDER = "$CORRAL_SECRET_API_KEY"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tls-sb-certs")
    make_certs(d)
    return d


@pytest.fixture(scope="module")
def world_servers(
    world: world_mod.World, certs: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    if f"{RESOLVER_V4}/32" not in world.extra_addresses:
        world.add_server_address(f"{RESOLVER_V4}/32")
    zones = {
        "zones": ["good.test"],
        "records": [[NAME, "A", 300, SERVER_V4], [f"api.{NAME}", "A", 300, SERVER_V4]],
    }
    dns: RunningDnsServer = start_dns_server(
        world.spawn_inet, [RESOLVER_V4], zones, tmp_path_factory.mktemp("tls-sb-dns"),
        stop=world.stop_process,
    )  # fmt: skip
    capdir = tmp_path_factory.mktemp("tls-sb-capture")
    tls = start_tls_servers(world.spawn_inet, certs, capdir, [SERVER_V4])
    try:
        yield capdir
    finally:
        world.stop_process(tls)
        dns.stop()


def config(certs: Path, **kw: object) -> NetworkConfig:
    return NetworkConfig(
        policy="public-only",
        dns=DNSConfig(nameservers=[RESOLVER_V4]),
        tls=TLSConfig(upstream_ca_certs=[str(certs / "ca.pem")]),
        **kw,  # type: ignore[arg-type]
    )


def captured(capdir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(capdir.iterdir()) if p.is_file())


def everything_on_disk(sb: corral.sync.Sandbox) -> bytes:
    """Every file of the sandbox's state directory (state.json, logs, audit), read now."""
    directory = Path(sb.info()["directory"])
    out = b""
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            try:
                out += p.read_bytes()
            except OSError:
                continue
    return out


def test_guest_trusts_the_sandbox_ca_and_secrets_stay_outside(
    tools_image: str, world_servers: Path, certs: Path
) -> None:
    secret = SecretEntry(env_var="API_KEY", value=VALUE, allowed_hosts=[NAME])
    with corral.sync.Sandbox.create(
        unique("tlssb"), image=tools_image, network=config(certs), secrets=[secret]
    ) as sb:
        env = sb.exec("sh", ["-c", "echo $API_KEY; echo $SSL_CERT_FILE; echo $NODE_EXTRA_CA_CERTS"])
        assert env.stdout_text.split() == [
            PLACEHOLDER, "/etc/ssl/certs/ca-certificates.crt",
            "/usr/local/share/ca-certificates/corral-sandbox-ca.crt",
        ], env  # fmt: skip
        read = "import sys; print(open(sys.argv[1]).read())"
        bundle = sb.exec("python3", ["-c", read, "/etc/ssl/certs/ca-certificates.crt"]).stdout_text
        assert "BEGIN CERTIFICATE" in bundle and "PRIVATE KEY" not in bundle
        # Plain clients, no --cacert: the bundle and the variables are enough.
        out = sb.exec("curl", ["-sS", "-m", "10", f"https://{NAME}/"])
        assert out.stdout_text.strip() == f"hello {NAME} h2", out.stderr_text
        code = f"import urllib.request; print(urllib.request.urlopen('https://{NAME}/').read().decode())"
        out = sb.exec("python3", ["-c", code])
        assert out.stdout_text.strip() == f"hello {NAME} http/1.1", out.stderr_text
        out = sb.exec("sh", ["-c", f"openssl s_client -connect {NAME}:443 -servername {NAME} "
                                   "-verify_return_error </dev/null 2>&1"])  # fmt: skip
        assert "Verify return code: 0 (ok)" in out.stdout_text, out.stdout_text
        # The secret: substituted toward the allowed, DNS-pinned host, masked on the way back.
        before = captured(world_servers)
        out = sb.exec(
            "sh", ["-c", f'curl -sS -m 10 https://{NAME}/echo -H "Authorization: Bearer $API_KEY"']
        )
        assert PLACEHOLDER in out.stdout_text and VALUE not in out.stdout_text, out
        assert VALUE.encode() in captured(world_servers)[
            len(before) :
        ] or VALUE.encode() in captured(world_servers)
        # Toward a host it is not for: not forwarded, audited by name.
        out = sb.exec("sh", ["-c", f'curl -sS -m 10 https://api.{NAME}/echo -H "X-Key: $API_KEY"'])
        assert VALUE not in out.stdout_text
        events = list(sb.logs())
        assert any("API_KEY" in e.reason and e.action == "deny" for e in events), events
        # Nowhere on disk: state.json, the supervisor's log, the audit log.
        disk = everything_on_disk(sb)
        assert VALUE.encode() not in disk
        assert VALUE not in json.dumps(sb.info())
        # `corral inspect`: the CA's fingerprint and the secret's name, never its value.
        shown = corral_cli("inspect", sb.name)
        assert shown.returncode == 0, shown.stderr
        info = json.loads(shown.stdout)
        assert info["tls"]["secrets"] == ["API_KEY"] and info["tls"]["ca_generated"] is True
        assert len(info["tls"]["ca_fingerprint"].split(":")) == 32
        assert VALUE.encode() not in shown.stdout and b"PRIVATE KEY" not in shown.stdout
        # The value lived only in that supervisor: a stopped sandbox cannot be started again
        # with it (docs/network.md "Secrets: where values live"), and says so.
        sb.stop()
        with pytest.raises(ConfigError) as err:
            sb.start()
        assert "create it again" in str(err.value), err.value


def test_block_and_terminate_stops_the_sandbox(
    tools_image: str, world_servers: Path, certs: Path
) -> None:
    secret = SecretEntry(env_var="API_KEY", value=VALUE, allowed_hosts=[NAME],
                         on_violation="block-and-terminate")  # fmt: skip
    with corral.sync.Sandbox.create(
        unique("tlsterm"), image=tools_image, network=config(certs), secrets=[secret]
    ) as sb:
        # The sandbox may be gone before the exec's answer: that is "at once".
        with contextlib.suppress(SandboxError):
            sb.exec("sh", ["-c", f'curl -sS -m 5 https://api.{NAME}/ -H "X-Key: $API_KEY"; true'])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and sb.status != "stopped":
            time.sleep(0.2)
        assert sb.status == "stopped"
        assert "API_KEY" in str(sb.info().get("stopped_reason"))
