"""The hermetic test world (SPEC section 6).

Two network namespaces, built per test run and removed afterwards, also on failure:

    [host ns]  veth 198.51.100.2/24, 2001:db8:1::2/64 --- veth 198.51.100.1/24  [internet ns]
      corral runs here; default routes                     servers on its ``lo``:
      lead only to the internet ns                         203.0.113.0/24, 2001:db8:f::/64,
                                                           plus private-looking test addresses

No route leads out of the pair, so nothing a test sends can leave the machine. The root
namespace's own ranges (192.0.2.0/24, fd00::/64) are never used here.

Tests reach the world through :class:`World`: ``run_host``/``run_inet`` run a command in a
namespace, ``spawn_inet`` starts a server there (killed at teardown), ``add_server_address``
puts another address on the internet side.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from tests.support import netns

#: Prefix of every netns/veth the world creates; ``debris()`` looks for it.
PREFIX = "cw"

HOST_V4 = "198.51.100.2"
INET_LINK_V4 = "198.51.100.1"
HOST_V6 = "2001:db8:1::2"
INET_LINK_V6 = "2001:db8:1::1"

#: Addresses the internet namespace answers on from the start.
SERVER_V4 = "203.0.113.10"
SERVER_V6 = "2001:db8:f::10"

#: The world's DNS server addresses (tests/support/dns_server.py listens there when a test
#: starts it); /etc/netns/<host ns>/resolv.conf names them, so what runs under
#: ``ip netns exec <host ns>`` has them as its resolvers. Processes that only setns() into the
#: host ns read the root's /etc/resolv.conf: point CORRAL_RESOLV_CONF at ``World.resolv_conf``.
DNS_V4 = "203.0.113.153"  # (.51-.54 are the test registries)
DNS_V6 = "2001:db8:f::53"


def ip(*args: str, netns_name: str | None = None, check: bool = True) -> str:
    argv = ["ip"] + (["-n", netns_name] if netns_name else []) + list(args)
    res = subprocess.run(argv, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {res.stderr.strip()}")
    return res.stdout


@dataclass
class World:
    """Handles to one built world; see the module docstring for its shape."""

    tag: str
    host_ns: str
    inet_ns: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    extra_addresses: list[str] = field(default_factory=list)

    # -- running things ---------------------------------------------------------------------
    def run_host(self, argv: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
        return _run_in(self.host_ns, argv, **kw)

    def run_inet(self, argv: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
        return _run_in(self.inet_ns, argv, **kw)

    def spawn_inet(self, argv: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        """Start a long-running server in the internet namespace; stopped at teardown."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.inet_ns, *argv],
            start_new_session=True,
            **kw,  # type: ignore[call-overload]
        )
        self.processes.append(proc)
        return proc

    def spawn_host(self, argv: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.host_ns, *argv],
            start_new_session=True,
            **kw,  # type: ignore[call-overload]
        )
        self.processes.append(proc)
        return proc

    @contextlib.contextmanager
    def in_host(self) -> Iterator[None]:
        """The calling thread (and what it spawns) runs in the host namespace meanwhile."""
        with netns.entered(self.host_ns):
            yield

    @contextlib.contextmanager
    def in_inet(self) -> Iterator[None]:
        with netns.entered(self.inet_ns):
            yield

    def add_server_address(self, cidr: str) -> str:
        """Add ``cidr`` (``10.77.0.1/32``, ``2001:db8:f::20/128``) to the internet side."""
        extra = ["nodad"] if ":" in cidr else []
        ip("addr", "add", cidr, "dev", "lo", *extra, netns_name=self.inet_ns)
        self.extra_addresses.append(cidr)
        return cidr.split("/")[0]

    @property
    def resolv_conf(self) -> str:
        """The host namespace's resolv.conf (names the world's DNS server)."""
        return f"/etc/netns/{self.host_ns}/resolv.conf"

    def stop_process(self, proc: subprocess.Popen[bytes]) -> None:
        _kill_group(proc)
        if proc in self.processes:
            self.processes.remove(proc)


def _run_in(ns: str, argv: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 60)
    return subprocess.run(["ip", "netns", "exec", ns, *argv], **kw)  # type: ignore[call-overload,no-any-return]


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=3)


def _procs_in_netns(ns: str) -> list[int]:
    res = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in res.stdout.split()]


def build(tag: str | None = None) -> World:
    """Create the namespaces, links, addresses and routes of a fresh world."""
    tag = tag or str(os.getpid())
    w = World(tag=tag, host_ns=f"{PREFIX}{tag}h", inet_ns=f"{PREFIX}{tag}i")
    try:
        for ns in (w.host_ns, w.inet_ns):
            ip("netns", "add", ns)
            ip("link", "set", "lo", "up", netns_name=ns)
            for knob in ("all", "default"):
                _sysctl(ns, f"net.ipv6.conf.{knob}.accept_dad", "0")
        vh, vi = f"{PREFIX}{tag}vh"[:15], f"{PREFIX}{tag}vi"[:15]
        ip("link", "add", vh, "type", "veth", "peer", "name", vi)
        ip("link", "set", vh, "netns", w.host_ns)
        ip("link", "set", vi, "netns", w.inet_ns)
        ip("link", "set", vh, "name", "uplink", netns_name=w.host_ns)
        ip("link", "set", vi, "name", "downlink", netns_name=w.inet_ns)
        ip("addr", "add", f"{HOST_V4}/24", "dev", "uplink", netns_name=w.host_ns)
        ip("addr", "add", f"{HOST_V6}/64", "dev", "uplink", "nodad", netns_name=w.host_ns)
        ip("addr", "add", f"{INET_LINK_V4}/24", "dev", "downlink", netns_name=w.inet_ns)
        ip("addr", "add", f"{INET_LINK_V6}/64", "dev", "downlink", "nodad", netns_name=w.inet_ns)
        ip("link", "set", "uplink", "up", netns_name=w.host_ns)
        ip("link", "set", "downlink", "up", netns_name=w.inet_ns)
        ip("route", "add", "default", "via", INET_LINK_V4, netns_name=w.host_ns)
        ip("-6", "route", "add", "default", "via", INET_LINK_V6, netns_name=w.host_ns)
        # This kernel has no dummy links: server addresses live on the inet side's lo.
        ip("addr", "add", f"{SERVER_V4}/32", "dev", "lo", netns_name=w.inet_ns)
        ip("addr", "add", f"{SERVER_V6}/128", "dev", "lo", "nodad", netns_name=w.inet_ns)
        ip("addr", "add", f"{DNS_V4}/32", "dev", "lo", netns_name=w.inet_ns)
        ip("addr", "add", f"{DNS_V6}/128", "dev", "lo", "nodad", netns_name=w.inet_ns)
        os.makedirs(os.path.dirname(w.resolv_conf), exist_ok=True)
        with open(w.resolv_conf, "w") as f:
            f.write(f"nameserver {DNS_V4}\nnameserver {DNS_V6}\n")
        # Replies to the host side leave through the downlink; no default route in inet.
        _wait_reachable(w)
    except BaseException:
        destroy(w)
        raise
    return w


def _sysctl(ns: str, key: str, value: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"{key}={value}"],
        capture_output=True,
        check=False,
    )


def _wait_reachable(w: World) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        ok4 = w.run_host(["ping", "-c1", "-W1", SERVER_V4]).returncode == 0
        ok6 = w.run_host(["ping", "-6", "-c1", "-W1", SERVER_V6]).returncode == 0
        if ok4 and ok6:
            return
        time.sleep(0.05)
    raise RuntimeError("test world: the internet namespace is not reachable from the host one")


def destroy(w: World) -> None:
    """Stop every process of the world and delete its namespaces (idempotent)."""
    for proc in list(w.processes):
        _kill_group(proc)
    w.processes.clear()
    for ns in (w.host_ns, w.inet_ns):
        if not os.path.exists(f"/run/netns/{ns}"):
            continue
        for pid in _procs_in_netns(ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        ip("netns", "del", ns, check=False)
    shutil.rmtree(os.path.dirname(w.resolv_conf), ignore_errors=True)


def debris(tag: str | None = None) -> list[str]:
    """Every world netns still present (of one world, or of any)."""
    names = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    want = f"{PREFIX}{tag}" if tag else PREFIX
    return [n for n in names if n.startswith(want)]


def have_root_tools() -> str | None:
    """None when the world can be built here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root to build network namespaces"
    for tool in ("ip", "nft", "ping"):
        if shutil.which(tool) is None:
            return f"needs {tool!r} (run scripts/install.sh)"
    return None
