"""Per-operation cost of a sandbox's kernel network objects: ``ip``/``nft`` processes vs
pyroute2 vs corral's in-process rtnetlink and libnftables, measured in one run.

Run as root:  .venv/bin/python bench/netlink_bench.py [--runs 30]

Everything happens inside a private network namespace made for the run (``unshare --net``
re-executes this script), so nothing touches the host's links, rules or ruleset. For each
way it times, per iteration: netns creation, the veth pair with addresses, link up, the two
TPROXY routes and the two divert rules, the guest side (addresses, routes), an nftables
table (the public-only ruleset shape), and the removal of all of it. Prints medians and the
ratios against corral's in-process path (the choice recorded in docs/design.md). Then the cost
of one DNS pin (an element with a timeout) through libnftables' ``run`` and through
``nftables.add_elements``, alone and beside large rulesets; and of one sandbox's table
applied by libnftables in place against built in an empty namespace and replayed
(``firewall.apply(..., build_in=...)``), beside 0 to 100 other tables.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

SLOT_V4 = ipaddress.IPv4Network("10.231.0.0/30")
SLOT_V6 = ipaddress.IPv6Network("fd42:9:9:1::/64")
TABLE = 0x63720000 + 4242
RULESET = """table inet corral-nlbench {
  chain prerouting {
    type filter hook prerouting priority -150; policy accept;
    iifname "cr-nlbench" jump from_sandbox
  }
  chain from_sandbox {
    ip saddr != 10.231.0.2 drop
    ct direction reply accept
    meta nfproto ipv4 meta l4proto tcp tproxy ip to 10.231.0.1:4000 meta mark set 0x6372 accept
    meta nfproto ipv4 meta l4proto udp tproxy ip to 10.231.0.1:4001 meta mark set 0x6372 accept
    drop
  }
  chain input {
    type filter hook input priority 0; policy accept;
    iifname "cr-nlbench" meta mark & 0xffff == 0x6372 accept
    iifname "cr-nlbench" drop
  }
  chain output {
    type filter hook output priority 0; policy accept;
    oifname "cr-nlbench" ct direction reply accept
    oifname "cr-nlbench" drop
  }
}
"""


def with_ip(run: int) -> dict[str, float]:
    """The way corral did it before issue 9: one ``ip -b`` batch per namespace, ``nft -f``."""
    ns, link, out = f"nlb{run}", f"cr-nlb{run}", {}

    def sh(*argv: str, stdin: str | None = None) -> None:
        subprocess.run(argv, input=stdin, text=True, check=True, capture_output=True)

    t = time.perf_counter()
    sh("ip", "netns", "add", ns)
    out["netns"] = time.perf_counter() - t
    t = time.perf_counter()
    sh("ip", "-b", "-", stdin=(
        f"link add {link} mtu 65000 type veth peer name eth0 mtu 65000 netns {ns}\n"
        f"addr add 10.231.0.1/30 dev {link}\naddr add fd42:9:9:1::1/64 dev {link} nodad\n"
        f"link set {link} up\nroute add local 0.0.0.0/0 dev lo table {TABLE}\n"
        f"route add local ::/0 dev lo table {TABLE}\n"))  # fmt: skip
    for family in ("-4", "-6"):
        sh("ip", family, "rule", "add", "iif", link, "fwmark", "0x6372/0xffff", "lookup",
           str(TABLE), "priority", "10000")  # fmt: skip
    sh("ip", "-n", ns, "-b", "-", stdin=(
        "link set lo up\naddr add 10.231.0.2/30 dev eth0\naddr add fd42:9:9:1::2/64 dev eth0 "
        "nodad\nlink set eth0 up\nroute add default via 10.231.0.1 dev eth0\n"
        "route add ::/0 via fd42:9:9:1::1 dev eth0\n"))  # fmt: skip
    out["link, addresses, routes, rules"] = time.perf_counter() - t
    t = time.perf_counter()
    sh("nft", "-f", "-", stdin=RULESET.replace("cr-nlbench", link))
    out["nft table"] = time.perf_counter() - t
    t = time.perf_counter()
    sh("nft", "delete", "table", "inet", "corral-nlbench")
    for family in ("-4", "-6"):
        sh("ip", family, "rule", "del", "iif", link, "fwmark", "0x6372/0xffff", "lookup",
           str(TABLE), "priority", "10000")  # fmt: skip
        sh("ip", family, "route", "flush", "table", str(TABLE))
    sh("ip", "link", "del", link)
    sh("ip", "netns", "del", ns)
    out["remove (link deleted)"] = time.perf_counter() - t
    return out


def with_pyroute2(run: int) -> dict[str, float]:
    import pyroute2

    ns, link, out = f"nlp{run}", f"cr-nlp{run}", {}
    t = time.perf_counter()
    pyroute2.netns.create(ns)
    out["netns"] = time.perf_counter() - t
    t = time.perf_counter()
    with pyroute2.IPRoute() as ipr:
        ipr.link("add", ifname=link, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns},
                 mtu=65000)  # fmt: skip
        idx = ipr.link_lookup(ifname=link)[0]
        ipr.addr("add", index=idx, address="10.231.0.1", prefixlen=30)
        ipr.addr("add", index=idx, address="fd42:9:9:1::1", prefixlen=64, flags=0x02)
        ipr.link("set", index=idx, state="up")
        ipr.route("add", dst="0.0.0.0/0", type="local", oif=1, table=TABLE, scope=254)
        ipr.route("add", dst="::/0", type="local", oif=1, table=TABLE, family=10, scope=254)
        for family in (2, 10):
            ipr.rule("add", iifname=link, fwmark=0x6372, fwmask=0xFFFF, table=TABLE,
                     priority=10000, family=family)  # fmt: skip
    with pyroute2.NetNS(ns) as nsr:
        eth0 = nsr.link_lookup(ifname="eth0")[0]
        nsr.link("set", index=1, state="up")
        nsr.addr("add", index=eth0, address="10.231.0.2", prefixlen=30)
        nsr.addr("add", index=eth0, address="fd42:9:9:1::2", prefixlen=64, flags=0x02)
        nsr.link("set", index=eth0, state="up")
        nsr.route("add", dst="0.0.0.0/0", gateway="10.231.0.1", oif=eth0)
        nsr.route("add", dst="::/0", gateway="fd42:9:9:1::1", oif=eth0, family=10)
    out["link, addresses, routes, rules"] = time.perf_counter() - t
    t = time.perf_counter()
    with pyroute2.IPRoute() as ipr:
        for family in (2, 10):
            ipr.rule("del", iifname=link, fwmark=0x6372, fwmask=0xFFFF, table=TABLE,
                     priority=10000, family=family)  # fmt: skip
        ipr.route("del", dst="0.0.0.0/0", type="local", oif=1, table=TABLE, scope=254)
        ipr.route("del", dst="::/0", type="local", oif=1, table=TABLE, family=10, scope=254)
        ipr.link("del", ifname=link)
    pyroute2.netns.remove(ns)
    out["remove (link deleted)"] = time.perf_counter() - t
    return out


def with_corral(run: int) -> dict[str, float]:
    from corral.net import nftables, plumbing
    from corral.net.addressing import Slot

    names = plumbing.LinkNames(netns=f"nlc{run}", link=f"cr-nlc{run}", table="corral-nlbench")
    slot = Slot(SLOT_V4, SLOT_V6, TABLE - plumbing.ROUTING_TABLE_BASE)
    out = {}
    t = time.perf_counter()
    plumbing.create_netns(names)
    out["netns"] = time.perf_counter() - t
    t = time.perf_counter()
    plumbing.create_link(names, slot, 65000)
    out["link, addresses, routes, rules"] = time.perf_counter() - t
    t = time.perf_counter()
    nftables.run(RULESET.replace("cr-nlbench", names.link))
    out["nft table"] = time.perf_counter() - t
    t = time.perf_counter()
    nftables.destroy_table("corral-nlbench")
    plumbing.remove(names, TABLE)
    out["remove (link deleted)"] = time.perf_counter() - t
    # What a stopped sandbox's remove does: the link is left to the netns's destruction.
    plumbing.create_netns(names)
    plumbing.create_link(names, slot, 65000)
    nftables.run(RULESET.replace("cr-nlbench", names.link))
    t = time.perf_counter()
    nftables.destroy_table("corral-nlbench")
    plumbing.remove(names, TABLE, link=False)
    out["remove (link left to the kernel)"] = time.perf_counter() - t
    deadline = time.monotonic() + 10
    while plumbing.link_exists(names.link) and time.monotonic() < deadline:
        time.sleep(0.005)  # gone before the next iteration reuses its name
    return out


def element_costs(runs: int) -> None:
    """One pin (``add element ... timeout``) through libnftables vs one netlink message, alone,
    beside a 10,000-element interval set, and beside 100 sandbox-sized tables."""
    from corral.net import nftables

    def table(name: str, elements: int) -> None:
        text = (f"add table inet {name}\n"
                f"add set inet {name} pins {{ type ipv4_addr; flags timeout; }}\n"
                f"add set inet {name} big {{ type ipv4_addr; flags interval; }}\n")  # fmt: skip
        if elements:
            addrs = ", ".join(
                str(ipaddress.IPv4Address(0x0A000000 + 2 * i)) for i in range(elements)
            )
            text += f"add element inet {name} big {{ {addrs} }}\n"
        nftables.run(text)

    def timed(label: str, func: Callable[[int], None]) -> str:
        xs = []
        for i in range(runs):
            t = time.perf_counter()
            func(i)
            xs.append((time.perf_counter() - t) * 1000)
        return f"{label}: {statistics.median(xs):.3f} ms"

    def by_text(i: int) -> None:
        nftables.run(f"add element inet corral-e0 pins {{ 11.0.{i // 250}.{i % 250} timeout 30s }}")

    def by_message(i: int) -> None:
        nftables.add_elements(
            "corral-e0", "pins", [(ipaddress.IPv4Address(0x0C000000 + i), 30_000)]
        )

    rows = []
    table("corral-e0", 0)
    rows.append(("alone", timed("run()", by_text), timed("add_elements()", by_message)))
    nftables.destroy_table("corral-e0")
    table("corral-e0", 10_000)
    rows.append(("beside a 10,000-element interval set", timed("run()", by_text),
                 timed("add_elements()", by_message)))  # fmt: skip
    for k in range(1, 100):
        table(f"corral-e{k}", 1000)
    rows.append(("beside 100 tables of 1,000 elements", timed("run()", by_text),
                 timed("add_elements()", by_message)))  # fmt: skip
    for k in range(100):
        nftables.destroy_table(f"corral-e{k}")
    print("one pinned address into a timeout set (median):")
    for where, a, b in rows:
        print(f"  {where:38} {a:22} {b}")


def apply_costs(runs: int) -> None:
    """One sandbox's public-only table (prefilter included) through ``firewall.apply``:
    libnftables here (it reads every table's chains, sets and rules first) against the build
    in an empty namespace, read back and replayed here (``build_in``), beside 0 to 100
    sandbox-sized tables. Decides ``firewall.REPLAY_FROM_TABLES``."""
    from corral.config import NetworkPolicy
    from corral.kernel import netns as kernel_netns
    from corral.net import firewall, nftables
    from corral.net.prefilter import compile_prefilter
    from corral.policy import Policy

    cfg = NetworkPolicy.public_only()
    gw4, g4 = ipaddress.ip_address("10.231.0.1"), ipaddress.ip_address("10.231.0.2")
    gw6, g6 = ipaddress.ip_address("fd42:9:9:1::1"), ipaddress.ip_address("fd42:9:9:1::2")
    policy = Policy.compile(cfg, host_addresses=[gw4, gw6])
    pools = [ipaddress.ip_network(cfg.ipv4_pool), ipaddress.ip_network(cfg.ipv6_pool)]
    prefilter = compile_prefilter(policy.rules, policy.default_egress, policy.host,
                                  pools=pools, gateways=[gw4, gw6], ipv6=True,
                                  connect_port=None, tls_interception=False)  # fmt: skip

    def spec(name: str) -> firewall.FirewallSpec:
        return firewall.FirewallSpec(
            table=name, link=f"cr-{name[-8:]}", guest_ipv4=g4, gateway_ipv4=gw4,
            guest_ipv6=g6, gateway_ipv6=gw6, tcp_port_v4=1, udp_port_v4=2, tcp_port_v6=3,
            udp_port_v6=4, dns_tcp_port_v4=5, dns_udp_port_v4=6, dns_tcp_port_v6=7,
            dns_udp_port_v6=8, prefilter=prefilter, log_group=5,
        )  # fmt: skip

    build = "/run/netns/nlbench-build"
    open(build, "w").close()  # a mount point
    kernel_netns.call_in_thread(
        None, lambda: subprocess.run(["mount", "--bind", "/proc/thread-self/ns/net", build],
                                     check=True), new=True)  # fmt: skip
    print("one sandbox's table through firewall.apply (median ms):")
    print(f"  {'tables beside':>14} {'libnftables here':>18} {'built elsewhere':>16}")
    made = 0
    for beside in (0, 4, 8, 16, 50, 100):
        while made < beside:
            firewall.apply(spec(f"corral-nlb{made:05d}"))
            made += 1
        here, there = [], []
        for _ in range(runs):
            for out, build_in in ((here, None), (there, build)):
                t = time.perf_counter()
                if build_in is None:
                    firewall.apply(spec("corral-nlbtest"))
                else:  # the replay itself, whatever the threshold says
                    messages = kernel_netns.call_in_thread(
                        build, lambda: firewall._build_and_read_back(
                            firewall.ruleset(spec("corral-nlbtest")).split("\n", 2)[2],
                            "corral-nlbtest"))  # fmt: skip
                    nftables.replay(messages, "corral-nlbtest", replace=False)
                out.append((time.perf_counter() - t) * 1000)
                nftables.destroy_table("corral-nlbtest")
                time.sleep(0.02)  # the destroyed table's grace period, off the next sample
        print(f"  {beside:>14} {statistics.median(here):>18.2f} {statistics.median(there):>16.2f}")
    for k in range(made):
        nftables.destroy_table(f"corral-nlb{k:05d}")
    subprocess.run(["umount", build], check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("netlink_bench needs root")
    if os.environ.get("NLBENCH_INSIDE") != "1":
        env = dict(os.environ, NLBENCH_INSIDE="1")
        # A private netns and mount namespace: /run/netns mounts made here stay here.
        argv = ["unshare", "--net", "--mount", "--propagation", "private",
                sys.executable, __file__, "--runs", str(args.runs)]  # fmt: skip
        raise SystemExit(subprocess.run(argv, env=env, check=False).returncode)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run/netns"], check=False)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    t = time.perf_counter()
    import pyroute2  # noqa: F401

    pyroute2_import = (time.perf_counter() - t) * 1000
    ways: dict[str, Callable[[int], dict[str, float]]] = {
        "ip/nft processes": with_ip, "pyroute2": with_pyroute2, "corral in-process": with_corral,
    }  # fmt: skip
    results: dict[str, dict[str, list[float]]] = {w: {} for w in ways}
    for run in range(args.runs + 2):
        for way, func in ways.items():  # interleaved: load changes hit all alike
            for step, seconds in func(run).items():
                if run >= 2:
                    results[way].setdefault(step, []).append(seconds * 1000)
    steps = list(results["corral in-process"])
    print(f"medians of {args.runs} runs, ms (pyroute2 import: {pyroute2_import:.0f} ms, once)")
    print(f"{'step':34}" + "".join(f"{w:>20}" for w in ways))
    for step in steps:
        row = f"{step:34}"
        for way in ways:
            values = results[way].get(step)
            row += f"{statistics.median(values):20.2f}" if values else f"{'-':>20}"
        print(row)
    for way in ways:
        total = sum(statistics.median(v) for k, v in results[way].items()
                    if k != "remove (link left to the kernel)")  # fmt: skip
        print(f"total create+remove, {way}: {total:.2f} ms")
    element_costs(max(10, args.runs))
    apply_costs(max(10, args.runs // 2))
    print(f"load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
