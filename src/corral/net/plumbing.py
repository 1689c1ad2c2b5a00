"""Kernel objects of one sandbox's link: its netns, the veth pair, addresses, routes, and the
policy routing that delivers diverted packets to corral's proxies.

Everything is done in-process: the netns as iproute2's ``ip netns add`` makes it (a thread
unshares its network namespace, which is then bind-mounted under /run/netns), links, addresses,
routes and rules through rtnetlink (:mod:`corral.net.rtnetlink`), one batch of requests per
namespace. No ``ip`` process is started (each cost ~2-3 ms; a networked create ran 18). Every
object is named after the sandbox so that :func:`remove` (and ``corral gc`` after a crash) can
find and delete every piece without any state but the sandbox id:

- netns ``corral-<id>`` (``/run/netns/corral-<id>``), where the guest side is ``eth0``;
- host-side veth ``cr-<link id>`` (interface names are at most 15 bytes, so long ids are hashed);
- ``ip rule``/``ip -6 rule`` ``iif cr-<link id> fwmark DIVERT_MARK lookup <table>`` and that
  table's ``local default dev lo`` routes (the TPROXY recipe; see :mod:`corral.net.firewall`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import os
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from corral.errors import NetworkError
from corral.kernel import libc
from corral.kernel import netns as kernel_netns
from corral.net import rtnetlink
from corral.net.addressing import Slot
from corral.net.firewall import DIVERT_MARK, DIVERT_MARK_MASK
from corral.net.rtnetlink import NetlinkError, RouteSocket

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

#: The guest side of the veth, and its ifindex: a new netns has only ``lo`` (1), so the peer
#: is created with index 2 and its addresses and routes need no lookup.
GUEST_LINK = "eth0"
GUEST_INDEX = 2

#: mount(2) flags (linux/mount.h) for the /run/netns bind mounts, as iproute2 makes them.
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_SHARED = 1 << 20

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


T = TypeVar("T")


def in_netns(netns_path: str | None, func: Callable[[], T], *, unshare: bool = False) -> T:
    """``func()`` on a short-lived thread in another network namespace: the one at
    ``netns_path``, or (``unshare``) a new one. Sockets it opens stay in that namespace.

    A thread, so the caller's own threads never leave the host's namespace; it ends right
    after (a thread that changed its namespace is never reused)."""
    return kernel_netns.call_in_thread(netns_path, func, new=unshare)


def _mount(source: str, target: str, flags: int) -> None:
    libc.mount(source, target, "none", flags)


_netns_dir_ready = False


def _prepare_netns_dir() -> None:
    """/run/netns as ``ip netns add`` leaves it: a shared mount, so that a netns bind-mounted
    there is seen from every mount namespace (the sandbox's stage A joins it by path)."""
    global _netns_dir_ready
    if _netns_dir_ready:
        return
    os.makedirs(NETNS_DIR, mode=0o755, exist_ok=True)
    try:
        _mount("", NETNS_DIR, _MS_SHARED | _MS_REC)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: not a mount point yet
            raise
        _mount(NETNS_DIR, NETNS_DIR, _MS_BIND | _MS_REC)
        _mount("", NETNS_DIR, _MS_SHARED | _MS_REC)
    _netns_dir_ready = True


def create_netns(names: LinkNames) -> None:
    """Create the sandbox's (empty) network namespace; an existing one is reused."""
    path = names.netns_path
    if os.path.exists(path):
        return
    try:
        _prepare_netns_dir()
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0))
    except OSError as exc:
        raise NetworkError(f"creating network namespace {names.netns} failed: {exc}") from None

    def setup() -> None:
        # The sandbox's root is not root of this netns (it was created from the host), so it
        # has no CAP_NET_RAW here: ping works through unprivileged ICMP sockets, for every
        # group, as rootless container engines do. What the echo may reach is still the
        # policy's business.
        _sysctl("net.ipv4.ping_group_range", PING_GROUP_RANGE, missing_ok=False)
        _mount(kernel_netns.THREAD_NETNS, path, _MS_BIND)

    try:
        in_netns(None, setup, unshare=True)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise NetworkError(f"creating network namespace {names.netns} failed: {exc}") from None


def create_link(names: LinkNames, slot: Slot, mtu: int) -> None:
    """veth pair, addresses, routes and divert rules on both sides (two request batches)."""
    table = routing_table(slot)
    try:
        netns_fd = os.open(names.netns_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NetworkError(f"opening network namespace {names.netns} failed: {exc}") from None
    with RouteSocket() as host:
        try:
            _run(host, [(rtnetlink.new_veth(names.link, GUEST_LINK, mtu, netns_fd, GUEST_INDEX),
                         f"creating veth {names.link}")])  # fmt: skip
        finally:
            os.close(netns_fd)
        # The host side must not autoconfigure from anything the guest sends (rogue RAs):
        # set before the link is up.
        _sysctl(f"net.ipv6.conf.{names.link}.accept_ra", "0", missing_ok=True)
        index = socket.if_nametoindex(names.link)
        link = names.link
        steps = [(rtnetlink.new_address(index, slot.gateway_ipv4, slot.ipv4.prefixlen),
                  f"adding {slot.gateway_ipv4}/{slot.ipv4.prefixlen} to {link}")]  # fmt: skip
        if slot.ipv6 is not None and slot.gateway_ipv6 is not None:
            steps.append((rtnetlink.new_address(index, slot.gateway_ipv6, slot.ipv6.prefixlen,
                                                nodad=True),
                          f"adding {slot.gateway_ipv6}/{slot.ipv6.prefixlen} to {link}"))  # fmt: skip
        steps.append((rtnetlink.set_up(index), f"bringing {link} up"))
        versions = (4, 6) if slot.ipv6 is not None else (4,)
        for v in versions:
            steps.append((rtnetlink.local_default_route(v, table),
                          f"adding the IPv{v} local default route of table {table}"))  # fmt: skip
        for v in versions:
            steps.append((_rule(v, link, table), f"adding the IPv{v} divert rule of {link}"))
        _run(host, steps, ok=frozenset({errno.EEXIST}))

    def guest() -> None:
        eth0 = GUEST_INDEX
        steps = [(rtnetlink.set_up(rtnetlink.LOOPBACK_INDEX), "bringing lo up"),
                 (rtnetlink.new_address(eth0, slot.guest_ipv4, slot.ipv4.prefixlen),
                  f"adding {slot.guest_ipv4}/{slot.ipv4.prefixlen} to {GUEST_LINK}")]  # fmt: skip
        if slot.ipv6 is not None and slot.guest_ipv6 is not None:
            steps.append((rtnetlink.new_address(eth0, slot.guest_ipv6, slot.ipv6.prefixlen,
                                                nodad=True),
                          f"adding {slot.guest_ipv6}/{slot.ipv6.prefixlen} to {GUEST_LINK}"))  # fmt: skip
        steps.append((rtnetlink.set_up(eth0), f"bringing {GUEST_LINK} up"))
        steps.append((rtnetlink.default_route_via(slot.gateway_ipv4, eth0),
                      f"adding the default route via {slot.gateway_ipv4}"))  # fmt: skip
        if slot.gateway_ipv6 is not None:
            steps.append((rtnetlink.default_route_via(slot.gateway_ipv6, eth0),
                          f"adding the default route via {slot.gateway_ipv6}"))  # fmt: skip
        with RouteSocket() as sock:
            _run(sock, steps, where=f" in {names.netns}")

    in_netns(names.netns_path, guest)


def _run(
    sock: RouteSocket,
    steps: list[tuple[bytes, str]],
    *,
    ok: frozenset[int] = frozenset(),
    where: str = "",
) -> None:
    """Send the steps' requests as one batch; NetworkError naming the first that failed."""
    try:
        results = sock.results(request for request, _ in steps)
    except OSError as exc:
        raise NetworkError(f"{steps[0][1]}{where} failed: {exc}") from None
    for (_request, step), err in zip(steps, results, strict=True):
        if err and err not in ok:
            raise NetworkError(f"{step}{where} failed: {os.strerror(err)}")


def _rule(version: int, link: str, table: int, *, delete: bool = False) -> bytes:
    return rtnetlink.rule(
        version, link, DIVERT_MARK, DIVERT_MARK_MASK, table, RULE_PRIORITY, delete=delete
    )


def sysctl_in(netns_path: str, key: str, value: str) -> None:
    """Write a sysctl of another network namespace (from a short thread that joins it)."""
    try:
        in_netns(netns_path, lambda: _sysctl(key, value, missing_ok=False))
    except OSError as exc:
        raise NetworkError(f"setting {key} in {netns_path} failed: {exc}") from None


def _sysctl(key: str, value: str, *, missing_ok: bool) -> None:
    # /proc/sys/net belongs to the network namespace of the thread that opens the file.
    path = "/proc/sys/" + key.replace(".", "/")
    try:
        with open(path, "w") as f:
            f.write(value)
    except FileNotFoundError:
        if not missing_ok:
            raise


def divert_rules() -> list[tuple[str, int]]:
    """(iif, table) of every policy rule with an input interface, v4 and v6."""
    with RouteSocket() as sock:
        return sock.rule_tables()


def lease_numbers_in_kernel() -> set[int]:
    """Lease numbers whose routing table some divert rule uses (of any corral home): a new
    lease must not reuse them, or two sandboxes would share (and flush) one table."""
    return {t - ROUTING_TABLE_BASE for _, t in divert_rules() if t > ROUTING_TABLE_BASE}


#: Answers of a delete that mean "already gone".
_GONE = frozenset({errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL})


def remove(names: LinkNames, table: int | None, *, link: bool = True) -> None:
    """Delete the divert rules and table routes, the veth, and the netns. Idempotent; best
    effort on each piece so one missing object does not keep the others alive.

    ``link=False`` leaves the veth to the kernel: deleting it waits for an RCU grace period
    (28 ms median here, 50 ms at worst), while a namespace that nothing holds any more is
    destroyed in the background, its links with it (~40 ms later, off everyone's path). Only
    for a netns whose processes are all gone (a stopped sandbox); gc and a crashed namesake's
    clean-up delete the link themselves, so they never depend on who else holds the netns."""
    with RouteSocket() as sock:
        rules = sock.rules()
        ours = [r for r in rules if r.iif == names.link]
        tables = {r.table for r in ours} | ({table} if table is not None else set())
        others = {r.table for r in rules if r.iif != names.link}
        requests = [
            rtnetlink.rule(4 if r.family == socket.AF_INET else 6, names.link, r.mark, r.mask,
                           r.table, r.priority, delete=True)
            for r in ours  # every copy: a crashed start may have added one twice
        ]  # fmt: skip
        for t in sorted(tables - others):  # never flush a table another sandbox's rule uses
            requests += [rtnetlink.local_default_route(v, t, delete=True) for v in (4, 6)]
        if link:
            requests.append(rtnetlink.delete_link(names.link))
        with contextlib.suppress(OSError):
            sock.results(requests)
    remove_netns(names)


def remove_netns(names: LinkNames) -> None:
    """Unmount and delete /run/netns/<name> (``ip netns del``); the kernel frees the namespace,
    and any link still in it, once nothing else holds it. No error when it is gone."""
    path = names.netns_path
    try:
        libc.umount2(path, libc.MNT_DETACH)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOENT):  # EINVAL: not mounted
            raise NetworkError(
                f"unmounting network namespace {names.netns} failed: {exc}"
            ) from None
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise NetworkError(f"deleting network namespace {names.netns} failed: {exc}") from None


def link_exists(link: str) -> bool:
    """Whether the calling thread's netns has ``link`` (not /sys/class/net: that shows the
    netns sysfs was mounted in, not the caller's)."""
    try:
        socket.if_nametoindex(link)
    except OSError:
        return False
    return True


def host_addresses(
    skip: Iterable[rtnetlink.Span] = (),
) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address configured in the current netns (the policy's group ``host``) but those
    inside ``skip`` (the sandbox pools: other sandboxes' gateways, docs/network.md)."""
    try:
        with RouteSocket() as sock:
            return sock.addresses(skip)
    except (OSError, NetlinkError) as exc:
        raise NetworkError(f"reading the host's addresses failed: {exc}") from None
