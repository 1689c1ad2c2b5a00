"""Ports and names in networked sandboxes (issue 10, point 6): low ports for the sandbox's
users (``ip_unprivileged_port_start`` 0, as docker), ``/etc/hosts`` address first so that
``host.corral.internal`` resolves, random host ports (``-p 80``, ``-p 0:80``) shown by
``corral port NAME``. Everything runs in the test world's host namespace."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

import corral.sync
from corral import NetworkPolicy
from corral.errors import ConfigError
from tests.integration.lifecycle_support import (  # noqa: F401 - fixtures
    corral_cli,
    corral_home_fixture,
    image_fixture,
    in_world_fixture,
    unique,
)

pytestmark = [pytest.mark.usefixtures("in_world"), pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def tools_image(corral_home: object, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tools test image (python3) imported from an OCI layout."""
    from corral.runtime.images import ImageStore
    from tests.support import images

    ref = "corral-test/tools:ports"
    layout = images.write_oci_layout(
        images.build_tools(), tmp_path_factory.mktemp("tools-oci"), "ports"
    )
    ImageStore().import_path(layout, ref)
    return ref


@pytest.fixture(name="web")
def web_fixture(image: str) -> Iterator[str]:
    """A networked busybox sandbox publishing guest 80 on random ports (-p 80, -p 0:80,
    -p 127.0.0.1::81) and a fixed one."""
    name = unique("ports")
    res = corral_cli("create", "--name", name, "-p", "80", "-p", "0:80", "-p", "127.0.0.1::81",
                     "-p", "0:53/udp", image)  # fmt: skip
    assert res.returncode == 0, res.stderr
    try:
        yield name
    finally:
        corral_cli("rm", "-f", name)


def fetch(port: int, deadline: float) -> bytes:
    """Connect to 127.0.0.1:port until the guest answers (its nc may not listen yet)."""
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
                s.sendall(b"ping\n")
                s.shutdown(socket.SHUT_WR)
                data = s.recv(100)
                if data:
                    return data
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing answered on 127.0.0.1:{port}")
        time.sleep(0.1)


def test_random_host_ports_and_corral_port(web: str) -> None:
    lines = corral_cli("port", web).stdout.decode().splitlines()
    assert len(lines) == 4, lines
    tcp80 = [line for line in lines if line.startswith("80/tcp -> 127.0.0.1:")]
    assert len(tcp80) == 2
    ports = [int(line.rsplit(":", 1)[1]) for line in tcp80]
    assert all(p > 0 for p in ports) and ports[0] != ports[1]
    assert any(line.startswith("53/udp -> 127.0.0.1:") for line in lines)
    assert corral_cli("port", web, "81").stdout.decode().startswith("81/tcp -> 127.0.0.1:")
    res = corral_cli("port", web, "9999")
    assert res.returncode == ConfigError.exit_code and b"does not publish" in res.stderr
    info = json.loads(corral_cli("inspect", web).stdout)
    assert sorted(p["host_port"] for p in info["published"] if p["guest_port"] == 80) == sorted(
        ports
    )
    # The sandbox's root listens on port 80 (a low port: ip_unprivileged_port_start is 0)
    # and both random host ports reach it.
    res = corral_cli("exec", web, "--", "cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start")
    assert res.stdout == b"0\n", res.stderr
    res = corral_cli("exec", "-d", web, "--", "sh", "-c",
                     "while true; do echo pong | nc -l -p 80; done")  # fmt: skip
    assert res.returncode == 0, res.stderr
    deadline = time.monotonic() + 30
    for port in ports:
        assert fetch(port, deadline) == b"pong\n"


def test_an_unprivileged_user_binds_a_low_port(image: str) -> None:
    with corral.sync.Sandbox.create(
        unique("lowport"), image=image, network=NetworkPolicy.public_only(), ports={0: 443},
        user="1000:1000",
    ) as sb:  # fmt: skip
        assert sb.exec("id", ["-u"]).stdout_text == "1000\n"
        sb.exec_detached("sh", ["-c", "while true; do echo tls-ish | nc -l -p 443; done"])
        (published,) = sb.state.published
        assert published["guest_port"] == 443 and published["host_port"] > 0
        assert fetch(published["host_port"], time.monotonic() + 30) == b"tls-ish\n"


def test_hosts_file_is_address_first_and_host_names_resolve(tools_image: str) -> None:
    code = (
        "import socket\n"
        "lines=[l.split() for l in open('/etc/hosts') if 'host.corral.internal' in l]\n"
        "gw=[l for l in open('/proc/net/route') if l.split()[1]=='00000000'][0].split()[2]\n"
        "gw='.'.join(str(int(gw[i:i+2],16)) for i in (6,4,2,0))\n"
        "v4=[l for l in lines if '.' in l[0]][0]\n"
        "print(v4[0]==gw, v4[1:], socket.gethostbyname('host.corral.internal')==gw,\n"
        "      socket.gethostbyname('host.microsandbox.internal')==gw)\n"
        "print(socket.gethostname(), socket.gethostbyname(socket.gethostname()))\n"
    )
    with corral.sync.Sandbox.create(
        unique("hosts"), image=tools_image, network=NetworkPolicy.public_only(), hostname="box1"
    ) as sb:
        out = sb.exec("python3", ["-c", code])
        assert out.stdout_text.splitlines() == [
            "True ['host.corral.internal', 'host.microsandbox.internal'] True True",
            "box1 127.0.1.1",
        ], out.stderr_text
