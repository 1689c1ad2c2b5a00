"""The libnftables binding against the kernel: atomic transactions, threads, fork, netns.

Each test runs its script in a fresh interpreter inside a private network namespace
(``unshare --net``), so its tables vanish with it whatever happens, and no test touches the
host's ruleset.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

PRELUDE = """
import json, os, threading
from corral.errors import NetworkError
from corral.net import firewall, nftables
T = "corral-itest"
def tables():
    return sorted(line.split()[2] for line in nftables.run("list tables inet").splitlines())
"""


def isolated(script: str) -> object:
    """Run ``script`` in a private netns; it prints one JSON value, returned here."""
    code = PRELUDE + textwrap.dedent(script)
    res = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_a_failing_transaction_applies_none_of_it() -> None:
    out = isolated(
        """
        try:
            nftables.run(
                f"add table inet {T}\\n"
                f"add chain inet {T} c\\n"
                f"add rule inet {T} nochain accept\\n"
            )
            failed = None
        except NetworkError as exc:
            failed = str(exc)
        print(json.dumps([failed, tables()]))
        """
    )
    assert isinstance(out, list)
    failed, tables = out
    assert failed is not None and "line 3" in failed
    assert tables == []


def test_output_is_returned_and_empty_output_is_empty() -> None:
    out = isolated(
        """
        nftables.run(f"add table inet {T}\\nadd set inet {T} s {{ type ipv4_addr; }}\\n")
        listed = nftables.run(f"list set inet {T} s")
        quiet = nftables.run(f"add element inet {T} s {{ 10.1.2.3 }}")
        again = nftables.run(f"list set inet {T} s")
        print(json.dumps([listed, quiet, again]))
        """
    )
    assert isinstance(out, list)
    listed, quiet, again = out
    assert "set s" in listed and "10.1.2.3" not in listed
    assert quiet == ""
    assert "10.1.2.3" in again


def test_concurrent_threads_lose_no_element() -> None:
    out = isolated(
        """
        nftables.run(f"add table inet {T}\\nadd set inet {T} s {{ type ipv4_addr; }}\\n")
        errors = []
        def add(k):
            try:
                for i in range(50):
                    nftables.run(f"add element inet {T} s {{ 10.{k}.{i}.1 }}")
            except BaseException as exc:
                errors.append(repr(exc))
        threads = [threading.Thread(target=add, args=(k,)) for k in range(8)]
        for t in threads: t.start()
        for t in threads: t.join()
        import re
        count = len(set(re.findall(r"10\\.\\d+\\.\\d+\\.1\\b", nftables.run(f"list set inet {T} s"))))
        print(json.dumps([errors, count]))
        """
    )
    assert out == [[], 400]


def test_a_forked_child_gets_its_own_context() -> None:
    out = isolated(
        """
        nftables.run(f"add table inet {T}")
        pid = os.fork()
        if pid == 0:
            try:
                nftables.run(f"add table inet {T}-child")
                os._exit(0)
            except BaseException:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        nftables.run(f"add table inet {T}-parent")  # the parent's socket still works
        print(json.dumps([os.waitstatus_to_exitcode(status), tables()]))
        """
    )
    assert out == [0, ["corral-itest", "corral-itest-child", "corral-itest-parent"]]


def test_a_thread_in_another_netns_talks_to_that_netns() -> None:
    out = isolated(
        """
        from corral.runtime.syscalls import unshare
        nftables.run(f"add table inet {T}-main")
        seen = []
        def other():
            unshare(0x40000000)  # CLONE_NEWNET, this thread only
            nftables.run(f"add table inet {T}-other")
            seen.append(tables())
        t = threading.Thread(target=other); t.start(); t.join()
        print(json.dumps([seen, tables()]))
        """
    )
    assert out == [[["corral-itest-other"]], ["corral-itest-main"]]


def test_firewall_apply_exists_remove_round_trip() -> None:
    out = isolated(
        """
        import ipaddress
        spec = firewall.FirewallSpec(
            table=T, link="cr-itest",
            guest_ipv4=ipaddress.IPv4Address("10.200.0.2"),
            gateway_ipv4=ipaddress.IPv4Address("10.200.0.1"),
            guest_ipv6=None, gateway_ipv6=None, tcp_port_v4=4000, udp_port_v4=4001,
        )
        steps = [firewall.exists(T)]
        firewall.apply(spec)
        firewall.apply(spec)  # replaced atomically, not duplicated
        steps.append(firewall.exists(T))
        steps.append(nftables.run(f"list table inet {T}").count("chain from_sandbox"))
        firewall.remove(T)
        firewall.remove(T)  # already gone: no error
        steps.append(firewall.exists(T))
        print(json.dumps(steps))
        """
    )
    assert out == [False, True, 1, False]


def test_elements_are_added_with_timeouts_and_a_re_add_updates_the_timeout() -> None:
    out = isolated(
        """
        import ipaddress
        nftables.run(
            f"add table inet {T}\\n"
            f"add set inet {T} p4 {{ type ipv4_addr; flags timeout; }}\\n"
            f"add set inet {T} p6 {{ type ipv6_addr; flags timeout; }}\\n"
        )
        a, b = ipaddress.ip_address("10.9.8.7"), ipaddress.ip_address("fd42::7")
        nftables.add_elements(T, "p4", [(a, 30_000)])
        nftables.add_elements(T, "p6", [(b, 5_000)])
        nftables.add_elements(T, "p4", [(a, 90_000)])  # refreshed, not duplicated
        bulk = [(ipaddress.IPv4Address(0x0B000000 + i), 60_000) for i in range(2500)]
        nftables.add_elements(T, "p4", bulk)  # several messages, one transaction
        errors = []
        for name, addr in (("nope", a), ("p4", b)):
            try:
                nftables.add_elements(T, name, [(addr, 1000)])
            except NetworkError as exc:
                errors.append(str(exc))
        p4 = nftables.run(f"list set inet {T} p4")
        p6 = nftables.run(f"list set inet {T} p6")
        print(json.dumps([p4.count("10.9.8.7"), "10.9.8.7 timeout 1m30s" in p4,
                          p4.count("expires"), "fd42::7 timeout 5s" in p6, errors]))
        """
    )
    assert isinstance(out, list)
    assert out[:4] == [1, True, 2501, True]
    assert out[4] == [
        "nftables: adding 1 elements to set inet corral-itest nope failed: no such table or set",
        "nftables: adding 1 elements to set inet corral-itest p4 failed: an element does not "
        "fit the set (address family, or no timeout flag)",
    ]


def test_table_exists_and_destroy_table_need_no_libnftables_cache() -> None:
    out = isolated(
        """
        steps = [nftables.table_exists(T)]
        nftables.destroy_table(T)  # absent: no error
        nftables.run(f"add table inet {T}\\nadd chain inet {T} c\\n")
        steps.append(nftables.table_exists(T))
        steps.append(nftables.table_exists(T, "ip"))  # another family's namesake
        nftables.destroy_table(T)
        steps.append(nftables.table_exists(T))
        print(json.dumps([steps, tables()]))
        """
    )
    assert out == [[False, True, False, False], []]


SPEC_SCRIPT = """
import ipaddress, subprocess
from corral.config import NetworkPolicy
from corral.kernel import netns as kernel_netns
from corral.net.prefilter import compile_prefilter
from corral.policy import Policy
cfg = NetworkPolicy.public_only()
gw4, g4 = ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.0.0.2")
gw6, g6 = ipaddress.ip_address("fd00::1"), ipaddress.ip_address("fd00::2")
pol = Policy.compile(cfg, host_addresses=[gw4, gw6])
pf = compile_prefilter(pol.rules, pol.default_egress, pol.host,
                       pools=[ipaddress.ip_network(cfg.ipv4_pool), ipaddress.ip_network(cfg.ipv6_pool)],
                       gateways=[gw4, gw6], ipv6=True, connect_port=None, tls_interception=False)
def spec(port):
    return firewall.FirewallSpec(
        table=T, link="cr-itest", guest_ipv4=g4, gateway_ipv4=gw4, guest_ipv6=g6,
        gateway_ipv6=gw6, tcp_port_v4=port, udp_port_v4=2, tcp_port_v6=3, udp_port_v6=4,
        dns_tcp_port_v4=5, dns_udp_port_v4=6, dns_tcp_port_v6=7, dns_udp_port_v6=8,
        prefilter=pf, log_group=5)
def listing():
    return subprocess.run(["nft", "list", "table", "inet", T], capture_output=True,
                          text=True, check=True).stdout
def mount_empty_netns(path):
    open(path, "w").close()
    kernel_netns.call_in_thread(None, lambda: subprocess.run(
        ["mount", "--bind", "/proc/thread-self/ns/net", path], check=True), new=True)
"""


def test_a_table_built_elsewhere_and_replayed_is_the_table_applied_here() -> None:
    """Beside many tables, apply() builds the table in an empty namespace, reads it back and
    replays it: nft lists exactly what a direct libnftables apply gives (in a namespace of
    its own), the kernel's dump of both is the same bytes, the build namespace keeps no
    table, and a second apply replaces the first in one transaction."""
    out = isolated(
        SPEC_SCRIPT
        + textwrap.dedent(
            """
        import tempfile
        scratch = tempfile.mkdtemp()
        direct_ns, build_ns = f"{scratch}/direct", f"{scratch}/build"
        mount_empty_netns(direct_ns)
        mount_empty_netns(build_ns)
        def direct():
            firewall.apply(spec(1))
            sock = nftables.open_socket()
            try:
                return listing(), nftables.snapshot_table(sock, T)
            finally:
                sock.close()
        want, want_messages = kernel_netns.call_in_thread(direct_ns, direct)
        for i in range(firewall.REPLAY_FROM_TABLES):
            nftables.run(f"add table inet other{i}\\nadd chain inet other{i} c\\n")
        firewall.apply(spec(1), build_in=build_ns)
        sock = nftables.open_socket()
        got_messages = nftables.snapshot_table(sock, T)
        sock.close()
        got = listing()
        left = kernel_netns.call_in_thread(build_ns, nftables.table_count)
        firewall.apply(spec(9), build_in=build_ns)  # replaces: the new port only
        replaced = listing()
        for path in (direct_ns, build_ns):
            subprocess.run(["umount", path], check=True)
        print(json.dumps([want, got, want_messages == got_messages, left, replaced]))
        """
        )
    )
    assert isinstance(out, list)
    want, got, same_bytes, left, replaced = out
    assert "pf_public4" in want and "tproxy" in want  # the real ruleset, prefilter included
    assert got == want
    assert same_bytes
    assert left == 0
    assert replaced == want.replace("10.0.0.1:1 ", "10.0.0.1:9 ")
    assert replaced != want


def test_a_table_of_thousands_of_rules_replays_whole_and_a_bad_one_not_at_all() -> None:
    """A replayed table is one transaction however large: 3,000 rules are ~1.3 MB of netlink,
    more than a socket's default send buffer (a send that large failed with EMSGSIZE, so a
    sandbox with a policy of a few hundred rules could not start beside 8 other sandboxes)
    and than its receive buffer holds of acknowledgements. A transaction the kernel refuses
    names the message and leaves nothing."""
    out = isolated(
        SPEC_SCRIPT
        + textwrap.dedent(
            """
        import tempfile
        scratch = tempfile.mkdtemp()
        build_ns = f"{scratch}/build"
        mount_empty_netns(build_ns)
        lines = [f"add table inet {T}",
                 f"add chain inet {T} c {{ type filter hook output priority 0; }}"]
        lines += [f"add rule inet {T} c ip daddr 10.{i >> 8 & 255}.{i & 255}.1 "
                  f"tcp dport {1 + i} accept" for i in range(3000)]
        def build():
            nftables.run("\\n".join(lines) + "\\n")
            sock = nftables.open_socket()
            try:
                messages = nftables.snapshot_table(sock, T)
                nftables.destroy_table(T, on=sock)
            finally:
                sock.close()
            return messages
        messages = kernel_netns.call_in_thread(build_ns, build)
        size = sum(len(m[2]) for m in messages)
        nftables.replay(messages, T, replace=False)
        rules = listing().count("tcp dport")
        nftables.replay(messages, T, replace=True)  # replaced in the same transaction
        again = listing().count("tcp dport")
        nftables.destroy_table(T)
        kind, flags, payload = messages[7]
        broken = [*messages[:7], (kind, flags, b"\\xff" * 8 + payload[8:]), *messages[8:]]
        try:
            nftables.replay(broken, T, replace=False)
            error = ""
        except NetworkError as exc:
            error = str(exc)
        subprocess.run(["umount", build_ns], check=True)
        print(json.dumps([size, rules, again, error, tables()]))
        """
        )
    )
    assert isinstance(out, list)
    size, rules, again, error, left = out
    assert size > 1_000_000
    assert rules == again == 3000
    assert "failed at message 7" in error and "Invalid argument" in error
    assert left == []
