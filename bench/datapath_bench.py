"""Data path benchmark: corral's proxy vs plain kernel forwarding, measured in one run.

    .venv/bin/python bench/datapath_bench.py [--seconds 5]

Builds a private test world (tests/support/world.py) and two client namespaces behind the
world's host namespace, so both paths have the same shape (client ns -> host ns -> internet ns):

- ``kernel``: a plain netns whose veth the host ns routes (ip_forward on): no proxy at all,
  the physical limit of this machine;
- ``corral``: a sandbox netns of a real SandboxNetwork (nftables TPROXY, splice proxy, policy
  decided per connection with the real engine), run in its own process like a supervisor.

It prints, for each: bulk TCP throughput (iperf3, one stream), new connections per second
(wrk, ``Connection: close``, against ``busybox httpd`` in the internet ns), and request
latency (1-byte ping-pong on one connection to an echo server, p50/p99), then the ratios.
Targets (issue 4): throughput >= 85% of kernel forwarding, connection rate >= 50% of direct,
added p50 latency < 200 us.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from tests.support import world as world_mod  # noqa: E402
from tests.support.world import SERVER_V4, ip  # noqa: E402

from corral.net.datapath import DEFAULT_MTU  # noqa: E402

KERNEL_NS_SUFFIX = "k"
HTTP_PORT = 8080
ECHO_PORT = 7007

SUPERVISOR = """
import asyncio, signal, sys, pathlib
from corral.config import NetworkPolicy
from corral.net.addressing import AddressPool
from corral.net.datapath import SandboxNetwork
async def main():
    net = SandboxNetwork.reserve("bench", NetworkPolicy.public_only(), pathlib.Path(sys.argv[1]), mtu=int(sys.argv[2]),
                                 pool=AddressPool(pathlib.Path(sys.argv[1]) / "pool"))
    await net.start()
    print(net.names.netns, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await stop.wait()
    finally:
        await net.close()
asyncio.run(main())
"""

ECHO_SERVER = """
import socket, threading, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen(16)
print("ready", flush=True)
def serve(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while (d := c.recv(4096)):
        c.sendall(d)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

PING_PONG = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
n = int(sys.argv[3]); out = []
for i in range(n + 200):
    t = time.perf_counter_ns(); s.send(b"x"); s.recv(1); d = time.perf_counter_ns() - t
    if i >= 200: out.append(d)
out.sort()
print(out[len(out) // 2] / 1000, out[int(len(out) * 0.99)] / 1000)
"""


def in_ns(ns: str, argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, check=True, **kw
    )  # type: ignore[call-overload,no-any-return]


def kernel_client(w: world_mod.World) -> str:
    """A plain netns routed by the host ns: the kernel-forwarding baseline."""
    ns = f"{world_mod.PREFIX}{w.tag}{KERNEL_NS_SUFFIX}"
    ip("netns", "add", ns)
    ip(
        "link",
        "add",
        "kfwd0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        ns,
        netns_name=w.host_ns,
    )
    ip("addr", "add", "10.203.0.1/30", "dev", "kfwd0", netns_name=w.host_ns)
    ip("link", "set", "kfwd0", "up", netns_name=w.host_ns)
    ip("link", "set", "lo", "up", netns_name=ns)
    ip("addr", "add", "10.203.0.2/30", "dev", "eth0", netns_name=ns)
    ip("link", "set", "eth0", "up", netns_name=ns)
    ip("route", "add", "default", "via", "10.203.0.1", netns_name=ns)
    in_ns(w.host_ns, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    ip("route", "add", "10.203.0.0/30", "via", world_mod.HOST_V4, netns_name=w.inet_ns)
    return ns


def iperf(ns: str, seconds: int) -> float:
    out = in_ns(
        ns, ["iperf3", "-c", SERVER_V4, "-t", str(seconds), "-J"], timeout=seconds + 30
    ).stdout
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9


def wrk(ns: str, seconds: int, port: int = HTTP_PORT) -> float:
    argv = [
        "wrk",
        "-t",
        "1",
        "-c",
        "16",
        "-d",
        f"{seconds}s",
        "-H",
        "Connection: close",
        f"http://{SERVER_V4}:{port}/",
    ]
    out = in_ns(ns, argv, timeout=seconds + 30).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m is None:
        raise RuntimeError(f"wrk output not understood: {out}")
    return float(m.group(1))


def latency(ns: str, count: int) -> tuple[float, float]:
    out = in_ns(
        ns, [sys.executable, "-c", PING_PONG, SERVER_V4, str(ECHO_PORT), str(count)], timeout=120
    ).stdout
    p50, p99 = out.split()
    return float(p50), float(p99)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--pings", type=int, default=5000)
    ap.add_argument(
        "--mtu", type=int, default=DEFAULT_MTU, help="MTU of the sandbox's veth (default: corral's)"
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="alternating rounds; medians are reported (the machine is shared)",
    )
    args = ap.parse_args()

    w = world_mod.build(f"b{int(time.time()) % 10000}")
    supervisor: subprocess.Popen[str] | None = None
    tmp = tempfile.TemporaryDirectory()
    try:
        www = Path(tmp.name) / "www"
        www.mkdir()
        (www / "index.html").write_text("ok\n")
        w.spawn_inet(["iperf3", "-s", "-B", SERVER_V4], stdout=subprocess.DEVNULL)
        # One server port per round: tens of thousands of closed connections per round leave
        # TIME_WAIT entries on the server side, and a later round reusing those 4-tuples
        # stalls on SYN retransmits (seen as a round at a tenth of the rate on both paths).
        for rnd in range(args.rounds):
            w.spawn_inet(
                ["busybox", "httpd", "-f", "-p", f"{SERVER_V4}:{HTTP_PORT + rnd}", "-h", str(www)]
            )
        echo = w.spawn_inet(
            [sys.executable, "-c", ECHO_SERVER, SERVER_V4, str(ECHO_PORT)], stdout=subprocess.PIPE
        )
        assert echo.stdout is not None and b"ready" in echo.stdout.readline()
        kns = kernel_client(w)
        supervisor = subprocess.Popen(
            [
                "nsenter",
                f"--net=/run/netns/{w.host_ns}",
                sys.executable,
                "-c",
                SUPERVISOR,
                tmp.name,
                str(args.mtu),
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=str(ROOT),
            start_new_session=True,
        )
        assert supervisor.stdout is not None
        cns = supervisor.stdout.readline().strip()
        if not cns:
            raise RuntimeError("the corral supervisor did not start")
        time.sleep(1.0)  # iperf3 server up

        samples: dict[str, dict[str, list[float]]] = {
            name: {"gbit": [], "conn": [], "p50": [], "p99": []} for name in ("kernel", "corral")
        }
        ratios: dict[str, list[float]] = {"gbit": [], "conn": [], "added": []}
        for rnd in range(args.rounds):
            this: dict[str, dict[str, float]] = {}
            for name, ns in (("kernel", kns), ("corral", cns)):
                r = this[name] = {}
                r["p50"], r["p99"] = latency(ns, args.pings)  # first: not after a burst of closes
                r["gbit"] = iperf(ns, args.seconds)
                r["conn"] = wrk(ns, args.seconds, HTTP_PORT + rnd)
                for key, value in r.items():
                    samples[name][key].append(value)
            k, c = this["kernel"], this["corral"]
            ratios["gbit"].append(c["gbit"] / k["gbit"])
            ratios["conn"].append(c["conn"] / k["conn"])
            ratios["added"].append(c["p50"] - k["p50"])
            print(
                f"round {rnd + 1}: Gbit/s {k['gbit']:.2f} vs {c['gbit']:.2f}, conn/s {k['conn']:.0f} vs {c['conn']:.0f}, "
                f"p50 us {k['p50']:.1f} vs {c['p50']:.1f}",
                flush=True,
            )

        k = {key: statistics.median(v) for key, v in samples["kernel"].items()}
        c = {key: statistics.median(v) for key, v in samples["corral"].items()}
        print(f"medians of {args.rounds} alternating rounds (sandbox veth MTU {args.mtu}):")
        print(f"{'':24}{'kernel fwd':>14}{'corral':>14}{'ratio':>10}")
        print(
            f"{'bulk TCP (Gbit/s)':24}{k['gbit']:14.2f}{c['gbit']:14.2f}{c['gbit'] / k['gbit']:10.2f}   target >= 0.85"
        )
        print(
            f"{'new conns/s (wrk)':24}{k['conn']:14.0f}{c['conn']:14.0f}{c['conn'] / k['conn']:10.2f}   target >= 0.50"
        )
        print(f"{'latency p50 (us)':24}{k['p50']:14.1f}{c['p50']:14.1f}{c['p50'] / k['p50']:10.2f}")
        print(f"{'latency p99 (us)':24}{k['p99']:14.1f}{c['p99']:14.1f}{c['p99'] / k['p99']:10.2f}")
        print(
            f"added latency per request: p50 {c['p50'] - k['p50']:.1f} us (target < 200), p99 {c['p99'] - k['p99']:.1f} us"
        )
        print(
            f"median of per-round ratios: throughput {statistics.median(ratios['gbit']):.2f}, "
            f"conn rate {statistics.median(ratios['conn']):.2f}, added p50 {statistics.median(ratios['added']):.1f} us"
        )
        print(
            "(upstream for conns/s: busybox httpd, which forks per connection; both paths share it)"
        )
    finally:
        if supervisor is not None:
            import os
            import signal

            os.killpg(supervisor.pid, signal.SIGTERM)
            try:
                supervisor.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(supervisor.pid, signal.SIGKILL)
                supervisor.wait()
        world_mod.destroy(w)
        kns_path = Path(f"/run/netns/{world_mod.PREFIX}{w.tag}{KERNEL_NS_SUFFIX}")
        if kns_path.exists():
            subprocess.run(["ip", "netns", "del", kns_path.name], check=False)
        subprocess.run(["ip", "netns", "del", "corral-bench"], check=False, capture_output=True)
        tmp.cleanup()


if __name__ == "__main__":
    main()
