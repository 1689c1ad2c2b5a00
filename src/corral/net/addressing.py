"""Per-sandbox address slots: a /30 out of ``ipv4_pool`` and a /64 out of ``ipv6_pool``.

Each supervisor is a separate process, so "never two sandboxes on one slot" cannot be an
in-memory fact: leases live in one JSON file under ``CORRAL_HOME/net/`` and every read-modify-
write of it holds an ``flock``. The choice of a slot is a pure function (:func:`choose_slot`)
so the rules (skip slots overlapping a host route, skip leased slots, lowest free first) are
unit-tested without touching the machine; :class:`AddressPool` is the thin I/O shell.

A lease also carries a small integer (``number``) unique among live leases; the data path
derives per-sandbox kernel identifiers from it (the policy routing table of the TPROXY
divert), so nothing needs a second registry.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from corral.errors import NetworkError
from corral.net.rtnetlink import RouteSocket, Span, network_span
from corral.paths import PRIVATE_DIR_MODE, corral_home

IPv4Network = ipaddress.IPv4Network
IPv6Network = ipaddress.IPv6Network
IPNetwork = IPv4Network | IPv6Network

#: A sandbox's IPv4 slot: network, gateway (.1), guest (.2), broadcast — the smallest subnet
#: with two usable hosts.
IPV4_SLOT_PREFIX = 30
#: A sandbox's IPv6 slot: /64 is the smallest prefix SLAAC and most tooling treat as a link.
IPV6_SLOT_PREFIX = 64

#: Lease numbers start here; 0 is never used so "no lease" can't be mistaken for one.
FIRST_LEASE_NUMBER = 1


@dataclass(frozen=True, slots=True)
class Slot:
    """The addresses of one sandbox's link: gateway (host side) and guest."""

    ipv4: IPv4Network
    ipv6: IPv6Network | None
    number: int

    @property
    def gateway_ipv4(self) -> ipaddress.IPv4Address:
        return self.ipv4.network_address + 1

    @property
    def guest_ipv4(self) -> ipaddress.IPv4Address:
        return self.ipv4.network_address + 2

    @property
    def gateway_ipv6(self) -> ipaddress.IPv6Address | None:
        return None if self.ipv6 is None else self.ipv6.network_address + 1

    @property
    def guest_ipv6(self) -> ipaddress.IPv6Address | None:
        return None if self.ipv6 is None else self.ipv6.network_address + 2

    def to_json(self) -> dict[str, object]:
        return {
            "ipv4": str(self.ipv4),
            "ipv6": None if self.ipv6 is None else str(self.ipv6),
            "number": self.number,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Slot:
        v6 = data.get("ipv6")
        return cls(
            ipv4=IPv4Network(str(data["ipv4"])),
            ipv6=None if v6 is None else IPv6Network(str(v6)),
            number=int(str(data["number"])),
        )


# -- pure part ------------------------------------------------------------------------------


def choose_slot(
    pool: IPNetwork,
    prefixlen: int,
    taken: Iterable[IPNetwork | Span],
    host_routes: Iterable[IPNetwork | Span],
) -> IPNetwork | None:
    """The lowest ``/prefixlen`` of ``pool`` not taken and not overlapping a host route.

    ``taken`` and ``host_routes`` are networks or their spans (rtnetlink.Span: the create
    path reads both as integers). Default routes (/0) are ignored: they overlap everything
    and say nothing about which addresses are in use on a link. Returns None when the pool
    has no free slot.
    """
    if prefixlen < pool.prefixlen:
        return None
    size = 1 << (pool.max_prefixlen - prefixlen)
    start = int(pool.network_address)
    end = start + (1 << (pool.max_prefixlen - pool.prefixlen)) - 1
    everything = (1 << pool.max_prefixlen) - 1
    # Integer bounds, not ipaddress' broadcast_address/overlaps: this runs over every lease
    # on every create, and those properties cost ~10 us each.
    blockers = []
    for n in [*taken, *host_routes]:
        if isinstance(n, tuple):
            version, lo, hi = n
        else:
            version, lo = n.version, int(n.network_address)
            hi = lo + (1 << (n.max_prefixlen - n.prefixlen)) - 1
        if version != pool.version or (lo == 0 and hi == everything):
            continue
        if lo <= end and hi >= start:
            blockers.append((lo, hi))
    blockers.sort()
    candidate = start
    for lo, hi in blockers:
        if candidate + size - 1 < lo:
            break  # the candidate ends before this (and, sorted, every later) blocker
        if hi >= candidate:
            # Next aligned slot after the blocker's end.
            candidate = max(candidate, ((hi - start) // size + 1) * size + start)
        if candidate > end:
            return None
    if candidate + size - 1 > end:
        return None
    return ipaddress.ip_network((candidate, prefixlen))


def next_lease_number(used: Iterable[int]) -> int:
    """The smallest lease number not in ``used``."""
    taken = set(used)
    number = FIRST_LEASE_NUMBER
    while number in taken:
        number += 1
    return number


# -- I/O part -------------------------------------------------------------------------------


def host_routes() -> set[Span]:
    """Every route destination of the current network namespace (all tables, v4 and v6), read
    with one rtnetlink dump (no ``ip`` process). Default routes are left out."""
    try:
        with RouteSocket() as sock:
            return sock.route_spans()
    except OSError as exc:
        raise NetworkError(f"reading the host's routes failed: {exc}") from None


def host_has_ipv6() -> bool:
    """IPv6 is enabled in this netns and some interface has a global IPv6 address."""
    try:
        disabled = Path("/proc/sys/net/ipv6/conf/all/disable_ipv6").read_text().strip()
        lines = Path("/proc/thread-self/net/if_inet6").read_text().splitlines()
    except OSError:
        return False
    # if_inet6 columns: address, ifindex, prefixlen, scope, flags, name; scope 00 = global.
    return disabled == "0" and any(
        len(cols) >= 4 and cols[3] == "00" for cols in (line.split() for line in lines)
    )


class AddressPool:
    """Leases slots of the configured pools to sandboxes, shared by every corral process.

    The lease file maps sandbox id -> :class:`Slot`. All access holds an exclusive ``flock``
    on a sibling lock file, so two supervisors starting at once cannot pick the same slot.
    """

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory if directory is not None else corral_home() / "net"
        self.leases_path = self.directory / "leases.json"
        self.lock_path = self.directory / "leases.lock"
        self._seen: tuple[int, int, int] | None = None
        self._networks: list[IPNetwork] = []

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, dict[str, object]]]:
        """The leases as stored (id -> :meth:`Slot.to_json` form), under the lock; written back
        if changed. Kept in that form: parsing every lease's networks (``ipaddress``) on each
        access cost more than the file's I/O with 30 leases, and a release parses none."""
        self.directory.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._recover()
            leases = self._read()
            before = dict(leases)
            yield leases
            if leases != before:
                self._write(leases)
        finally:
            os.close(fd)  # closing releases the flock

    def _read(self) -> dict[str, dict[str, object]]:
        try:
            raw = json.loads(self.leases_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise NetworkError(
                f"the address lease file {self.leases_path} is unreadable: {exc}"
            ) from None
        if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
            raise NetworkError(f"the address lease file {self.leases_path} is not a lease map")
        return {str(k): v for k, v in raw.items()}

    @staticmethod
    def _slot(sandbox_id: str, data: dict[str, object], path: Path) -> Slot:
        try:
            return Slot.from_json(data)
        except (KeyError, ValueError, TypeError) as exc:
            raise NetworkError(
                f"the lease of {sandbox_id!r} in {path} is malformed: {exc}"
            ) from None

    @property
    def _tmp_path(self) -> Path:
        return self.leases_path.with_suffix(".tmp")

    def _write(self, leases: dict[str, dict[str, object]]) -> None:
        """Replace the file whole. Not with ``os.replace``: on ext4, renaming over an existing
        file (or truncating one) makes the kernel write the new file's data out first
        (``auto_da_alloc``), ~4 ms here, twice per sandbox. The old file is unlinked first
        instead; a crash between unlink and rename leaves the complete new file as
        ``leases.tmp``, which the next locked access renames into place (:meth:`_recover`)."""
        # One lease per line, each encoded by json's C encoder (``indent`` selects the pure
        # Python one: 3x slower here, on every create and remove).
        lines = ",\n".join(
            f" {json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in sorted(leases.items())
        )
        data = "{\n" + lines + "\n}\n" if lines else "{}\n"
        tmp = self._tmp_path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # a crashed write's leftover (leases.json exists: _recover ran)
        tmp.write_text(data)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.leases_path)
        os.rename(tmp, self.leases_path)

    def _recover(self) -> None:
        """Under the lock: finish a write that crashed between its unlink and its rename."""
        if not self.leases_path.exists() and self._tmp_path.exists():
            try:
                json.loads(self._tmp_path.read_text())
            except ValueError:  # the crash came while writing it: nothing was committed
                self._tmp_path.unlink()
                return
            os.rename(self._tmp_path, self.leases_path)

    def _wait_for_writer(self) -> None:
        """Block until no writer holds the lock (it may be between unlink and rename)."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        finally:
            os.close(fd)

    def lease(
        self,
        sandbox_id: str,
        ipv4_pool: IPv4Network,
        ipv6_pool: IPv6Network | None,
        routes: Iterable[IPNetwork | Span] | None = None,
        busy_numbers: Iterable[int] = (),
    ) -> Slot:
        """The sandbox's slot (the existing lease if it has one); NetworkError if a pool is full.

        ``busy_numbers``: lease numbers the kernel still uses (tables of other corral homes or
        of crashed sandboxes), never handed out."""
        routes = host_routes() if routes is None else routes
        with self._locked() as leases:
            if sandbox_id in leases:
                return self._slot(sandbox_id, leases[sandbox_id], self.leases_path)
            v4_taken, v6_taken, numbers = self._taken(leases)
            v4 = choose_slot(ipv4_pool, IPV4_SLOT_PREFIX, v4_taken, routes)
            if v4 is None:
                raise NetworkError(
                    f"ipv4_pool {ipv4_pool} has no free /{IPV4_SLOT_PREFIX} left "
                    "(every slot is leased or overlaps a host route)"
                )
            v6: IPNetwork | None = None
            if ipv6_pool is not None:
                v6 = choose_slot(
                    ipv6_pool,
                    IPV6_SLOT_PREFIX,
                    v6_taken,
                    routes,
                )
                if v6 is None:
                    raise NetworkError(
                        f"ipv6_pool {ipv6_pool} has no free /{IPV6_SLOT_PREFIX} left "
                        "(every slot is leased or overlaps a host route)"
                    )
            assert isinstance(v4, IPv4Network)
            assert v6 is None or isinstance(v6, IPv6Network)
            slot = Slot(v4, v6, next_lease_number(numbers | set(busy_numbers)))
            leases[sandbox_id] = slot.to_json()
            return slot

    def _taken(self, leases: dict[str, dict[str, object]]) -> tuple[list[Span], list[Span], set[int]]:
        """The leased IPv4 and IPv6 networks (as spans) and lease numbers, read from the
        stored form without a :class:`Slot` per lease; NetworkError names a malformed one."""
        v4: list[Span] = []
        v6: list[Span] = []
        numbers: set[int] = set()
        for sandbox_id, data in leases.items():
            try:
                v4.append(network_span(str(data["ipv4"])))
                if data.get("ipv6") is not None:
                    v6.append(network_span(str(data["ipv6"])))
                numbers.add(int(str(data["number"])))
            except (KeyError, ValueError, TypeError) as exc:
                raise NetworkError(
                    f"the lease of {sandbox_id!r} in {self.leases_path} is malformed: {exc}"
                ) from None
        return v4, v6, numbers

    def release(self, sandbox_id: str) -> None:
        """Forget the sandbox's lease (no-op without one)."""
        with self._locked() as leases:
            leases.pop(sandbox_id, None)

    def get(self, sandbox_id: str) -> Slot | None:
        with self._locked() as leases:
            found = leases.get(sandbox_id)
            return None if found is None else self._slot(sandbox_id, found, self.leases_path)

    def leased_networks(self) -> list[IPNetwork]:
        """Every leased /30 and /64 of every sandbox (any pool), cheap to call per flow: the
        file is re-read only when it changed. It is always replaced whole, so no lock, except
        when it is missing: a writer may be between its unlink and its rename (_write)."""
        try:
            try:
                st = os.stat(self.leases_path)
                if (st.st_ino, st.st_mtime_ns, st.st_size) == self._seen:
                    return self._networks
                f = open(self.leases_path, "rb")  # noqa: SIM115 - closed below
            except FileNotFoundError:
                self._wait_for_writer()
                f = open(self.leases_path, "rb")  # noqa: SIM115 - closed below
            with f:  # the open file is one version, whatever a writer does meanwhile
                st = os.fstat(f.fileno())
                key = (st.st_ino, st.st_mtime_ns, st.st_size)
                raw = json.loads(f.read())
            leases = [Slot.from_json(v) for v in raw.values()]
        except FileNotFoundError:
            return []  # no lease file: no lease
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return self._networks  # unreadable for a moment: the last good view
        nets: list[IPNetwork] = []
        for slot in leases:
            nets.append(slot.ipv4)
            if slot.ipv6 is not None:
                nets.append(slot.ipv6)
        self._networks, self._seen = nets, key
        return self._networks

    def all(self) -> dict[str, Slot]:
        with self._locked() as leases:
            return {k: self._slot(k, v, self.leases_path) for k, v in leases.items()}
