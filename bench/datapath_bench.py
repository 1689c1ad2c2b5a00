"""Data path benchmark: corral's proxy vs plain kernel forwarding, measured in one run.

    .venv/bin/python bench/datapath_bench.py [--seconds 4] [--rounds 5] [--profile]

Builds a private test world (tests/support/world.py) and two client namespaces behind the
world's host namespace, so both paths have the same shape (client ns -> host ns -> uplink ->
internet ns):

- ``kernel``: a plain netns whose veth the host ns routes (ip_forward on): no proxy at all,
  the physical limit of this machine;
- ``corral``: a sandbox netns of a real SandboxNetwork (nftables TPROXY, splice proxy, policy
  decided per connection with the real engine), run in its own process like a supervisor.

The uplink between the host and internet namespaces has an ordinary 1500-byte MTU (checked,
and printed), whatever the sandbox's own veth has, so both paths pay for real segment sizes.

Upstream servers in the internet ns, shared by both paths: iperf3; ``fastok``, a small epoll
HTTP responder written in C and compiled here (busybox httpd forks per connection and would
bound both rates at what a fork costs); a Python echo server for ping-pong latency.

It prints, for each path, per alternating round and as medians:

- bulk TCP throughput (iperf3, one stream);
- new connections per second, sequential (``wrk -t1 -c1``, ``Connection: close``) and with 8
  threads (``wrk -t8 -c8``);
- connect-to-first-byte: a fresh connection, a request, the first byte of the answer
  (p50/p99 over ``--connects`` sequential connections, Python client);
- request latency on one connection (1-byte ping-pong to the echo server, p50/p99);

then the ratios against their targets (issue 9): bulk >= 0.9 of kernel forwarding, both
connection rates >= 0.6, added connect-to-first-byte p50 < 100 us. Each round measures both
paths back to back, in alternating order (kernel first in odd rounds, corral first in even
ones), so slow drift of the shared machine's load does not favour one side.

For the connection rounds it also reads the CPU they cost per connection: the supervisor's
own (user and system, from /proc/<pid>/stat); the path's processes' (wrk, from its rusage,
the two fastok servers and the supervisor: the packet work the kernel does inside their
system calls is theirs, other jobs on the machine are not); and the whole machine's (every
core's busy time from /proc/stat, which a shared machine's other jobs inflate, the more so
for the slower side). On a machine whose cores are all busy in the kernel path, the CPU per
connection bounds the rate any design can reach. ``--profile`` runs the corral side under cProfile during one extra round of
connections and prints where its CPU time goes, with the supervisor's CPU microseconds per
connection.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
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
#: The uplink MTU the targets are stated for (an ordinary Ethernet path).
UPLINK_MTU = 1500

TARGETS = {"gbit": 0.9, "seq": 0.6, "par": 0.6}
TARGET_ADDED_FIRST_BYTE_US = 100.0

SUPERVISOR = """
import asyncio, cProfile, os, pstats, signal, sys, pathlib
from corral.config import NetworkPolicy
from corral.net.addressing import AddressPool
from corral.net.datapath import SandboxNetwork
profile = cProfile.Profile() if sys.argv[3] == "1" else None
async def main():
    net = SandboxNetwork.reserve("bench", NetworkPolicy.public_only(), pathlib.Path(sys.argv[1]), mtu=int(sys.argv[2]),
                                 pool=AddressPool(pathlib.Path(sys.argv[1]) / "pool"))
    await net.start()
    print(net.names.netns, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if profile is not None:
        loop.add_signal_handler(signal.SIGUSR1, profile.enable)
        loop.add_signal_handler(signal.SIGUSR2, profile.disable)
    try:
        await stop.wait()
    finally:
        await net.close()
        if profile is not None:
            profile.dump_stats(sys.argv[1] + "/profile.out")
asyncio.run(main())
"""

#: An epoll HTTP responder: accept, read what arrives, answer, close. One thread, C, so that
#: the upstream costs both paths the same few microseconds per connection.
FASTOK_C = r"""
#define _GNU_SOURCE
#include <netinet/in.h>
#include <arpa/inet.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>
static const char reply[] =
    "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n";
int main(int argc, char **argv) {
    int l = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &a.sin_addr);
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 4096)) return 1;
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = l}, evs[256];
    epoll_ctl(ep, EPOLL_CTL_ADD, l, &ev);
    write(1, "ready\n", 6);
    char buf[4096];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == l) {
                int c;
                while ((c = accept4(l, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    struct epoll_event ce = {.events = EPOLLIN | EPOLLRDHUP, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ce);
                }
            } else {
                ssize_t r = read(fd, buf, sizeof buf);
                if (r > 0) write(fd, reply, sizeof reply - 1);
                close(fd);
            }
        }
    }
}
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

#: A fresh connection per sample: connect, send a request, wait for the first byte.
FIRST_BYTE = """
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
request = b"GET / HTTP/1.0\\r\\n\\r\\n"
out = []
for i in range(n + 50):
    t = time.perf_counter_ns()
    s = socket.create_connection((host, port))
    s.sendall(request)
    s.recv(1)
    d = time.perf_counter_ns() - t
    s.close()
    if i >= 50: out.append(d)
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
    ip("link", "add", "kfwd0", "type", "veth", "peer", "name", "eth0", "netns", ns,
       netns_name=w.host_ns)  # fmt: skip
    ip("addr", "add", "10.203.0.1/30", "dev", "kfwd0", netns_name=w.host_ns)
    ip("link", "set", "kfwd0", "up", netns_name=w.host_ns)
    ip("link", "set", "lo", "up", netns_name=ns)
    ip("addr", "add", "10.203.0.2/30", "dev", "eth0", netns_name=ns)
    ip("link", "set", "eth0", "up", netns_name=ns)
    ip("route", "add", "default", "via", "10.203.0.1", netns_name=ns)
    in_ns(w.host_ns, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    ip("route", "add", "10.203.0.0/30", "via", world_mod.HOST_V4, netns_name=w.inet_ns)
    return ns


def uplink_mtus(w: world_mod.World) -> set[int]:
    """MTUs of the host ns's links other than loopback and the client veths: the uplink."""
    out = json.loads(ip("-j", "link", "show", netns_name=w.host_ns))
    return {
        int(link["mtu"]) for link in out
        if link["ifname"] != "lo" and link["ifname"] != "kfwd0"
        and not link["ifname"].startswith("cr-")
    }  # fmt: skip


def iperf(ns: str, seconds: int) -> float:
    out = in_ns(
        ns, ["iperf3", "-c", SERVER_V4, "-t", str(seconds), "-J"], timeout=seconds + 30
    ).stdout
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9


def wrk(ns: str, seconds: int, port: int, threads: int) -> float:
    argv = ["wrk", "-t", str(threads), "-c", str(threads), "-d", f"{seconds}s",
            "-H", "Connection: close", f"http://{SERVER_V4}:{port}/"]  # fmt: skip
    out = in_ns(ns, argv, timeout=seconds + 30).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m is None:
        raise RuntimeError(f"wrk output not understood: {out}")
    return float(m.group(1))


def two_numbers(ns: str, script: str, *args: str) -> tuple[float, float]:
    out = in_ns(ns, [sys.executable, "-c", script, *args], timeout=300).stdout
    a, b = out.split()
    return float(a), float(b)


def compile_fastok(directory: Path) -> Path:
    source = directory / "fastok.c"
    source.write_text(FASTOK_C)
    binary = directory / "fastok"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(source)], check=True)
    return binary


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) seconds of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def children_cpu() -> float:
    """User + system seconds of this process's waited-for children (wrk among them)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def machine_busy() -> float:
    """Busy seconds of all cores together (every /proc/stat state but idle and iowait)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:8]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--pings", type=int, default=5000)
    ap.add_argument("--connects", type=int, default=2000)
    ap.add_argument("--mtu", type=int, default=DEFAULT_MTU,
                    help="MTU of the sandbox's veth (default: corral's)")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=5,
                    help="alternating rounds; medians are reported (the machine is shared)")  # fmt: skip
    ap.add_argument("--profile", action="store_true",
                    help="profile the corral side during one extra round of connections")  # fmt: skip
    args = ap.parse_args()

    load_before = f"{os.getloadavg()[0]:.2f}"
    w = world_mod.build(f"b{int(time.time()) % 10000}")
    supervisor: subprocess.Popen[str] | None = None
    tmp = tempfile.TemporaryDirectory()
    try:
        mtus = uplink_mtus(w)
        if mtus != {UPLINK_MTU}:
            raise SystemExit(f"the world's uplink MTU is {mtus}, not {UPLINK_MTU}")
        fastok = compile_fastok(Path(tmp.name))
        w.spawn_inet(["iperf3", "-s", "-B", SERVER_V4], stdout=subprocess.DEVNULL)
        # One server port per round and kind: tens of thousands of closed connections per
        # round leave TIME_WAIT entries on the server side, and a later round reusing those
        # 4-tuples stalls on SYN retransmits (seen as a round at a tenth of the rate).
        ports = [HTTP_PORT + i for i in range(3 * (args.rounds + 1))]
        servers: dict[int, int] = {}  # port -> fastok's pid (ip netns exec execs it)
        for port in ports:
            srv = w.spawn_inet([str(fastok), SERVER_V4, str(port)], stdout=subprocess.PIPE)
            assert srv.stdout is not None and b"ready" in srv.stdout.readline()
            servers[port] = srv.pid
        echo = w.spawn_inet(
            [sys.executable, "-c", ECHO_SERVER, SERVER_V4, str(ECHO_PORT)], stdout=subprocess.PIPE
        )
        assert echo.stdout is not None and b"ready" in echo.stdout.readline()
        kns = kernel_client(w)
        supervisor = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{w.host_ns}", sys.executable, "-c", SUPERVISOR,
             tmp.name, str(args.mtu), "1" if args.profile else "0"],
            stdout=subprocess.PIPE, text=True, cwd=str(ROOT), start_new_session=True,
        )  # fmt: skip
        assert supervisor.stdout is not None
        cns = supervisor.stdout.readline().strip()
        if not cns:
            raise RuntimeError("the corral supervisor did not start")
        time.sleep(1.0)  # iperf3 server up

        keys = ("gbit", "seq", "par", "fb50", "fb99", "p50", "p99", "busy", "path")
        samples = {name: {k: [] for k in keys} for name in ("kernel", "corral")}
        ratios: dict[str, list[float]] = {"gbit": [], "seq": [], "par": [], "added_fb": []}
        free_ports = iter(ports)
        cpu_per_conn: list[float] = []
        user_per_conn: list[float] = []
        for rnd in range(args.rounds):
            this: dict[str, dict[str, float]] = {}
            port_seq, port_par, port_fb = next(free_ports), next(free_ports), next(free_ports)
            order = [("kernel", kns), ("corral", cns)]
            if rnd % 2:
                order.reverse()
            for name, ns in order:
                r = this[name] = {}
                # Latency first: not right after a burst of closes.
                r["p50"], r["p99"] = two_numbers(ns, PING_PONG, SERVER_V4, str(ECHO_PORT),
                                                 str(args.pings))  # fmt: skip
                r["fb50"], r["fb99"] = two_numbers(ns, FIRST_BYTE, SERVER_V4, str(port_fb),
                                                   str(args.connects))  # fmt: skip
                r["gbit"] = iperf(ns, args.seconds)
                user, system = cpu_times(supervisor.pid)
                busy = machine_busy()
                pids = [servers[port_seq], servers[port_par]]
                path = sum(map(cpu_seconds, pids)) + children_cpu()
                r["seq"] = wrk(ns, args.seconds, port_seq, 1)
                r["par"] = wrk(ns, args.seconds, port_par, 8)
                conns = (r["seq"] + r["par"]) * args.seconds
                r["busy"] = (machine_busy() - busy) * 1e6 / conns
                path = sum(map(cpu_seconds, pids)) + children_cpu() - path
                if name == "corral":
                    path += sum(cpu_times(supervisor.pid)) - user - system
                r["path"] = path * 1e6 / conns
                if name == "corral":
                    user2, system2 = cpu_times(supervisor.pid)
                    cpu_per_conn.append((user2 + system2 - user - system) * 1e6 / conns)
                    user_per_conn.append((user2 - user) * 1e6 / conns)
                for key, value in r.items():
                    samples[name][key].append(value)
            k, c = this["kernel"], this["corral"]
            for key in ("gbit", "seq", "par"):
                ratios[key].append(c[key] / k[key])
            ratios["added_fb"].append(c["fb50"] - k["fb50"])
            print(
                f"round {rnd + 1}: Gbit/s {k['gbit']:.2f} vs {c['gbit']:.2f}, "
                f"seq conn/s {k['seq']:.0f} vs {c['seq']:.0f}, "
                f"8-thread conn/s {k['par']:.0f} vs {c['par']:.0f}, "
                f"first byte p50 us {k['fb50']:.0f} vs {c['fb50']:.0f}, "
                f"ping p50 us {k['p50']:.1f} vs {c['p50']:.1f}",
                flush=True,
            )

        k = {key: statistics.median(v) for key, v in samples["kernel"].items()}
        c = {key: statistics.median(v) for key, v in samples["corral"].items()}
        print(f"medians of {args.rounds} alternating rounds (sandbox veth MTU {args.mtu}, "
              f"uplink MTU {UPLINK_MTU}; load average before the run "
              f"{load_before}, now {os.getloadavg()[0]:.2f}):")  # fmt: skip
        print("measured: iperf3 one stream for bulk; wrk -t1 -c1 and -t8 -c8 with "
              "'Connection: close' (one new TCP connection per request) for the rates; "
              "a Python client's connect + request + first byte of the answer for "
              "connect-to-first-byte; 1-byte ping-pong on one connection; policy public-only, "
              "decided per connection")  # fmt: skip
        print(f"{'':30}{'kernel fwd':>12}{'corral':>12}{'ratio':>8}")
        rows = [("bulk TCP (Gbit/s)", "gbit", ".2f"), ("new conns/s, sequential", "seq", ".0f"),
                ("new conns/s, 8 threads", "par", ".0f")]  # fmt: skip
        for label, key, fmt in rows:
            ratio = statistics.median(ratios[key])
            print(f"{label:30}{k[key]:12{fmt}}{c[key]:12{fmt}}{ratio:8.2f}   "
                  f"target >= {TARGETS[key]:.2f}: {'meets' if ratio >= TARGETS[key] else 'misses'}")  # fmt: skip
        for label, key in (("connect-to-first-byte p50 (us)", "fb50"), ("  p99 (us)", "fb99"),
                           ("ping-pong p50 (us)", "p50"), ("  p99 (us)", "p99")):  # fmt: skip
            print(f"{label:30}{k[key]:12.1f}{c[key]:12.1f}{c[key] / k[key]:8.2f}")
        added = statistics.median(ratios["added_fb"])
        print(f"added connect-to-first-byte p50: {added:.1f} us (target < "
              f"{TARGET_ADDED_FIRST_BYTE_US:g}: "
              f"{'meets' if added < TARGET_ADDED_FIRST_BYTE_US else 'misses'})")  # fmt: skip
        print(f"added ping-pong p50: {c['p50'] - k['p50']:.1f} us")
        print(f"corral's CPU per new connection (supervisor, user+system): "
              f"{statistics.median(cpu_per_conn):.0f} us, of which user "
              f"{statistics.median(user_per_conn):.0f} us")  # fmt: skip
        print(f"CPU per new connection of the path's processes (wrk, fastok, supervisor): "
              f"kernel fwd {k['path']:.0f} us, corral {c['path']:.0f} us; of the whole "
              f"machine ({os.cpu_count()} cores, other jobs included): kernel fwd "
              f"{k['busy']:.0f} us, corral {c['busy']:.0f} us")  # fmt: skip
        print("(ratios are medians of per-round ratios; upstream: fastok, one C epoll thread)")

        if args.profile:
            profile_round(supervisor.pid, cns, next(free_ports), next(free_ports), args)
    finally:
        if supervisor is not None:
            os.killpg(supervisor.pid, signal.SIGTERM)
            try:
                supervisor.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(supervisor.pid, signal.SIGKILL)
                supervisor.wait()
        if args.profile and (Path(tmp.name) / "profile.out").exists():
            import pstats

            print("corral side, by own time (cProfile; the profiler itself roughly doubles it):")
            stats = pstats.Stats(str(Path(tmp.name) / "profile.out"))
            stats.sort_stats("tottime").print_stats(25)
        world_mod.destroy(w)
        kns_path = Path(f"/run/netns/{world_mod.PREFIX}{w.tag}{KERNEL_NS_SUFFIX}")
        if kns_path.exists():
            subprocess.run(["ip", "netns", "del", kns_path.name], check=False)
        subprocess.run(["ip", "netns", "del", "corral-bench"], check=False, capture_output=True)
        tmp.cleanup()


def profile_round(
    supervisor_pid: int, cns: str, port_seq: int, port_par: int, args: argparse.Namespace
) -> None:
    """Connections through corral with the profiler on, and CPU per connection."""
    # The python process is the child of nsenter (which exec'd it: same pid).
    os.kill(supervisor_pid, signal.SIGUSR1)
    before = cpu_seconds(supervisor_pid)
    rate_seq = wrk(cns, args.seconds, port_seq, 1)
    rate_par = wrk(cns, args.seconds, port_par, 8)
    used = cpu_seconds(supervisor_pid) - before
    os.kill(supervisor_pid, signal.SIGUSR2)
    conns = (rate_seq + rate_par) * args.seconds
    print(f"profiled round: {rate_seq:.0f} + {rate_par:.0f} conn/s; corral CPU "
          f"{used * 1e6 / conns:.0f} us per connection (with the profiler on)")  # fmt: skip


if __name__ == "__main__":
    main()
