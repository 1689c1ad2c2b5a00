"""The data path under a real sandbox (SDK -> supervisor -> SandboxNetwork): busybox clients
inside, servers in the internet namespace, a published port served from inside the sandbox."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import pytest

import corral.sync
from corral import NetworkPolicy
from corral.config import NetworkConfig, PolicyRule
from tests.integration.lifecycle_support import (  # noqa: F401 - fixtures
    corral_home_fixture,
    image_fixture,
    in_world_fixture,
    unique,
)
from tests.support import world as world_mod
from tests.support.servers import ECHO_PORT, start_servers
from tests.support.world import HOST_V4, SERVER_V4, SERVER_V6

pytestmark = [pytest.mark.usefixtures("in_world"), pytest.mark.timeout(300)]

PRIVATE = "10.66.0.20"


@pytest.fixture(scope="module")
def inet_servers(world: world_mod.World) -> Iterator[None]:
    if f"{PRIVATE}/32" not in world.extra_addresses:
        world.add_server_address(f"{PRIVATE}/32")
    proc = start_servers(world.spawn_inet, [SERVER_V4, SERVER_V6, PRIVATE])
    try:
        yield
    finally:
        world.stop_process(proc)


@pytest.fixture(scope="module")
def tools_image(corral_home: object, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tools test image (curl, python3, nc) imported from an OCI layout."""
    from corral.runtime.images import ImageStore
    from tests.support import images

    ref = "corral-test/tools:net"
    layout = images.write_oci_layout(
        images.build_tools(), tmp_path_factory.mktemp("tools-oci"), "net"
    )
    ImageStore().import_path(layout, ref)
    return ref


#: An ICMP echo from an unprivileged ICMP socket (what iputils ping does without CAP_NET_RAW).
PY_PING = (
    "import socket,sys\n"
    "fam=socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET\n"
    "s=socket.socket(fam,socket.SOCK_DGRAM,socket.IPPROTO_ICMP if fam==socket.AF_INET else socket.IPPROTO_ICMPV6)\n"
    "s.settimeout(3)\n"
    "s.sendto(bytes([8 if fam==socket.AF_INET else 128,0,0,0,0,0,0,1])+b'corral',(sys.argv[1],0))\n"
    "try: print('reply', s.recvfrom(100)[0][8:].decode())\n"
    "except OSError as e: print('none', type(e).__name__)\n"
)


def nc(addr: str, port: int = ECHO_PORT, text: str = "hi") -> str:
    return f"echo {text} | nc -w 3 {addr} {port}"


@pytest.mark.usefixtures("inet_servers")
def test_real_sandbox_public_only(tools_image: str) -> None:
    with corral.sync.Sandbox.create(
        unique("netsb"), image=tools_image, network=NetworkPolicy.public_only()
    ) as sb:
        out = sb.exec("curl", ["-sS", "-m", "5", f"http://{SERVER_V4}/"])
        assert out.stdout_text.strip() == f"reached {SERVER_V4}:80", out.stderr_text
        out = sb.exec("curl", ["-sS", "-m", "5", f"http://[{SERVER_V6}]/"])
        assert out.stdout_text.strip() == f"reached {SERVER_V6}:80", out.stderr_text
        for target in (SERVER_V4, SERVER_V6):
            assert sb.exec("python3", ["-c", PY_PING, target]).stdout_text.strip() == "reply corral"
        for target in (PRIVATE, HOST_V4, "169.254.169.254", f"[::ffff:{PRIVATE}]"):
            out = sb.exec("curl", ["-sS", "-m", "3", f"http://{target}/"])
            assert out.exit_code != 0 and "reached" not in out.stdout_text, (target, out)
        assert sb.exec("python3", ["-c", PY_PING, PRIVATE]).stdout_text.startswith("none")
        # The sandbox's root cannot change its address: the netns is not its own.
        code = "import socket; s=socket.socket(); s.bind(('10.9.9.9',0))"
        assert sb.exec("python3", ["-c", code]).exit_code != 0
        events = list(sb.logs())
        assert {e.destination for e in events if e.action == "deny"} >= {PRIVATE, HOST_V4}


@pytest.mark.usefixtures("inet_servers")
def test_real_sandbox_published_port_with_ingress_rule(image: str, world: world_mod.World) -> None:
    host_port = 18000 + int(time.time()) % 1000
    cfg = NetworkConfig(
        policy="public-only",
        rules=[PolicyRule(action="deny", direction="ingress", destination=f"{HOST_V4}/32")],
    )
    with corral.sync.Sandbox.create(
        unique("netpub"), image=image, network=cfg, ports={host_port: 9000},
        port_bindings=[{"bind": HOST_V4, "host_port": host_port + 1, "guest_port": 9000}],
    ) as sb:  # fmt: skip
        sb.exec("sh", ["-c", "(while true; do nc -l -p 9000 -e cat; done) >/dev/null 2>&1 &"])
        deadline = time.monotonic() + 10
        reply = b""
        while time.monotonic() < deadline and reply != b"in\n":
            # Until the guest's nc listens, the published port resets the connection.
            try:
                with socket.create_connection(("127.0.0.1", host_port), timeout=3) as s:
                    s.sendall(b"in\n")
                    s.shutdown(socket.SHUT_WR)
                    reply = s.recv(10)
            except OSError:
                reply = b""
            time.sleep(0.2)
        assert reply == b"in\n"
        # From the host's uplink address: denied by the ingress rule (reset or closed).
        got = b""
        with (
            contextlib.suppress(ConnectionResetError, BrokenPipeError),  # the reset may win
            socket.create_connection((HOST_V4, host_port + 1), timeout=3) as s,
        ):
            s.sendall(b"x\n")
            got = s.recv(10)
        assert got == b""
        assert any(e.direction == "ingress" and e.action == "deny" for e in sb.logs())


@pytest.mark.usefixtures("inet_servers")
def test_a_policy_of_a_thousand_rules_starts_beside_many_sandboxes(image: str) -> None:
    """Beside firewall.REPLAY_FROM_TABLES other sandboxes' tables a sandbox's table is built
    in its own namespace and replayed here; a policy of 1,000 rules makes a table larger than
    a netlink socket's default send buffer (that create failed with EMSGSIZE). It starts and
    enforces: its last rule lets the world's echo port through, the default denies port 80."""
    from corral.net import firewall, nftables

    others: list[corral.sync.Sandbox] = []
    try:
        while nftables.table_count() < firewall.REPLAY_FROM_TABLES:
            others.append(corral.sync.Sandbox.create(unique("beside"), image=image,
                                                     network=NetworkPolicy.public_only()))  # fmt: skip
        rules = [PolicyRule(action="deny", destination=f"198.18.{i >> 8}.{i & 255}/32")
                 for i in range(999)]  # fmt: skip
        rules.append(PolicyRule(action="allow", destination=f"{SERVER_V4}/32",
                                protocols=["tcp"], ports=[str(ECHO_PORT)]))  # fmt: skip
        cfg = NetworkConfig(default_egress="deny", rules=rules)
        with corral.sync.Sandbox.create(unique("big"), image=image, network=cfg) as sb:
            assert sb.exec("sh", ["-c", nc(SERVER_V4)]).stdout_text == "hi\n"  # the last rule
            assert sb.exec("sh", ["-c", nc(SERVER_V4, 80)]).stdout_text == ""  # the default
    finally:
        for other in others:
            other.remove()
