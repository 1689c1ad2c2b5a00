"""Kernel objects of one sandbox's link: its netns, the veth pair, addresses, routes, and the
policy routing that delivers diverted packets to corral's proxies.

Everything is driven through iproute2 (``ip``), one batch per namespace where possible, and
named after the sandbox so that :func:`remove` (and ``corral gc`` after a crash) can find and
delete every piece without any state but the sandbox id:

- netns ``corral-<id>`` (``/run/netns/corral-<id>``), where the guest side is ``eth0``;
- host-side veth ``cr-<link id>`` (interface names are at most 15 bytes, so long ids are hashed);
- ``ip rule``/``ip -6 rule`` ``iif cr-<link id> fwmark DIVERT_MARK lookup <table>`` and that
  table's ``local default dev lo`` routes (the TPROXY recipe; see :mod:`corral.net.firewall`).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import subprocess
import threading
from dataclasses import dataclass

from corral.errors import NetworkError
from corral.kernel import netns as kernel_netns
from corral.net.addressing import Slot
from corral.net.firewall import DIVERT_MARK, DIVERT_MARK_MASK

#: Linux IFNAMSIZ is 16 including the NUL: 15 usable bytes, 3 taken by ``cr-``.
MAX_LINK_ID = 12

#: Per-sandbox routing tables are BASE + lease number ("cr" in the high half keeps them apart
#: from the small numbers administrators and other tools use).
ROUTING_TABLE_BASE = 0x63720000

#: Priority of the divert rules: before ``main`` (32766), after ``local`` (0).
RULE_PRIORITY = 10000

#: Groups allowed to open unprivileged ICMP echo sockets inside the sandbox: all of them.
PING_GROUP_RANGE = "0 2147483647"

#: Where iproute2 keeps named network namespaces.
NETNS_DIR = kernel_netns.NETNS_DIR

_SAFE_ID = re.compile(r"^[a-z0-9][a-z0-9-]*$")


@dataclass(frozen=True, slots=True)
class LinkNames:
    """The kernel names derived from a sandbox id."""

    netns: str
    link: str
    table: str  # nft table

    @property
    def netns_path(self) -> str:
        return f"{NETNS_DIR}/{self.netns}"


def names_for(sandbox_id: str) -> LinkNames:
    """Names of the sandbox's netns, host-side veth and nft table (pure)."""
    if _SAFE_ID.match(sandbox_id) and len(sandbox_id) <= MAX_LINK_ID:
        short = sandbox_id
        full = sandbox_id
    else:
        short = hashlib.sha256(sandbox_id.encode()).hexdigest()[:MAX_LINK_ID]
        full = sandbox_id if _SAFE_ID.match(sandbox_id) and len(sandbox_id) <= 64 else short
    return LinkNames(netns=f"corral-{full}", link=f"cr-{short}", table=f"corral-{full}")


def routing_table(slot: Slot) -> int:
    return ROUTING_TABLE_BASE + slot.number


def _ip(args: list[str], *, netns: str | None = None, stdin: str | None = None, step: str) -> None:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    res = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise NetworkError(f"{step} failed ({' '.join(argv)}): {res.stderr.strip()}")


def create_netns(names: LinkNames) -> None:
    """Create the sandbox's (empty) network namespace; an existing one is reused."""
    if os.path.exists(names.netns_path):
        return
    _ip(["netns", "add", names.netns], step=f"creating network namespace {names.netns}")


def create_link(names: LinkNames, slot: Slot, mtu: int) -> None:
    """veth pair, addresses, routes and divert rules on both sides."""
    table = routing_table(slot)
    host = [
        f"link add {names.link} mtu {mtu} type veth peer name eth0 mtu {mtu} netns {names.netns}",
        f"addr add {slot.gateway_ipv4}/{slot.ipv4.prefixlen} dev {names.link}",
        f"link set {names.link} up",
        f"route add local 0.0.0.0/0 dev lo table {table}",
    ]
    guest = [
        "link set lo up",
        f"addr add {slot.guest_ipv4}/{slot.ipv4.prefixlen} dev eth0",
        "link set eth0 up",
        f"route add default via {slot.gateway_ipv4} dev eth0",
    ]
    if slot.ipv6 is not None:
        host.insert(2, f"addr add {slot.gateway_ipv6}/{slot.ipv6.prefixlen} dev {names.link} nodad")
        host.append(f"route add local ::/0 dev lo table {table}")
        guest.insert(2, f"addr add {slot.guest_ipv6}/{slot.ipv6.prefixlen} dev eth0 nodad")
        guest.append(f"route add ::/0 via {slot.gateway_ipv6} dev eth0")
    _ip(["-b", "-"], stdin="\n".join(host) + "\n", step=f"creating veth {names.link}")
    # The host side must not autoconfigure from anything the guest sends (rogue RAs).
    _sysctl(f"net.ipv6.conf.{names.link}.accept_ra", "0", missing_ok=True)
    rule = _rule_args(names, table)
    _ip(["-4", "rule", "add", *rule], step=f"adding the IPv4 divert rule of {names.link}")
    if slot.ipv6 is not None:
        _ip(["-6", "rule", "add", *rule], step=f"adding the IPv6 divert rule of {names.link}")
    _ip(
        ["-b", "-"],
        netns=names.netns,
        stdin="\n".join(guest) + "\n",
        step=f"configuring eth0 in {names.netns}",
    )
    # The sandbox's root is not root of this netns (it was created from the host), so it has
    # no CAP_NET_RAW here: ping works through unprivileged ICMP sockets, for every group, as
    # rootless container engines do. What the echo may reach is still the policy's business.
    sysctl_in(names.netns_path, "net.ipv4.ping_group_range", PING_GROUP_RANGE)


def _rule_args(names: LinkNames, table: int) -> list[str]:
    return [
        "iif", names.link,
        "fwmark", f"{DIVERT_MARK:#x}/{DIVERT_MARK_MASK:#x}",
        "lookup", str(table),
        "priority", str(RULE_PRIORITY),
    ]  # fmt: skip


def sysctl_in(netns_path: str, key: str, value: str) -> None:
    """Write a sysctl of another network namespace (from a short thread that joins it)."""
    error: list[BaseException] = []

    def write() -> None:
        try:
            kernel_netns.join_path(netns_path)
            _sysctl(key, value, missing_ok=False)
        except BaseException as exc:
            error.append(exc)

    # The thread ends right after; a thread that changed its netns is never reused.
    thread = threading.Thread(target=write, name="corral-sysctl")
    thread.start()
    thread.join()
    if error:
        raise NetworkError(f"setting {key} in {netns_path} failed: {error[0]}")


def _sysctl(key: str, value: str, *, missing_ok: bool) -> None:
    path = "/proc/sys/" + key.replace(".", "/")
    try:
        with open(path, "w") as f:
            f.write(value)
    except FileNotFoundError:
        if not missing_ok:
            raise


def divert_rules() -> list[tuple[str, int]]:
    """(iif, table) of every policy rule with an input interface, v4 and v6."""
    rules: list[tuple[str, int]] = []
    for family in ("-4", "-6"):
        res = subprocess.run(
            ["ip", "-j", family, "rule", "show"], capture_output=True, text=True, check=False
        )
        if res.returncode != 0:
            continue
        for entry in json.loads(res.stdout or "[]"):
            iif = entry.get("iif")
            if iif:
                with contextlib.suppress(ValueError):
                    rules.append((str(iif), int(str(entry.get("table")))))
    return rules


def lease_numbers_in_kernel() -> set[int]:
    """Lease numbers whose routing table some divert rule uses (of any corral home): a new
    lease must not reuse them, or two sandboxes would share (and flush) one table."""
    return {t - ROUTING_TABLE_BASE for _, t in divert_rules() if t > ROUTING_TABLE_BASE}


def remove(names: LinkNames, table: int | None) -> None:
    """Delete the veth, divert rules and table routes, and the netns. Idempotent; best effort
    on each piece so one missing object does not keep the others alive."""
    rules = divert_rules()
    tables = {t for iif, t in rules if iif == names.link}
    if table is not None:
        tables.add(table)
    others = {t for iif, t in rules if iif != names.link}
    for t in tables:
        for family in ("-4", "-6"):
            # Repeat: a crashed start may have added the same rule twice.
            for _ in range(8):
                res = subprocess.run(
                    ["ip", family, "rule", "del", *_rule_args(names, t)],
                    capture_output=True,
                    check=False,
                )
                if res.returncode != 0:
                    break
            if t not in others:  # never flush a table another sandbox's rule still uses
                subprocess.run(
                    ["ip", family, "route", "flush", "table", str(t)],
                    capture_output=True,
                    check=False,
                )
    subprocess.run(["ip", "link", "del", names.link], capture_output=True, check=False)
    if os.path.exists(names.netns_path):
        subprocess.run(["ip", "netns", "del", names.netns], capture_output=True, check=False)


def link_exists(link: str) -> bool:
    return os.path.exists(f"/sys/class/net/{link}")


def host_addresses() -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address configured in the current netns (the policy's group ``host``)."""
    res = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise NetworkError(f"reading the host's addresses failed: {res.stderr.strip()}")
    out: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for link in json.loads(res.stdout or "[]"):
        for info in link.get("addr_info", []):
            with contextlib.suppress(ValueError, KeyError):
                out.append(ipaddress.ip_address(info["local"]))
    return out
