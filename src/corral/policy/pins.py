"""The pin set of one sandbox: which names its own resolver gave it for which addresses.

SPEC 4: "A domain rule matches an IP connection when that IP was returned to this sandbox by
its own DNS resolver for a name that the rule matches, within the answer's TTL". The DNS
interceptor feeds every A/AAAA answer it gives the guest into :meth:`PinSet.add` (the queried
name and every CNAME of the chain, each pinned to every address) *before* the reply leaves,
so the guest's first SYN can never race its pin; the flow verdict asks :meth:`PinSet.names_for`.

Sans-I/O and pure (stdlib only); the clock is injected, so every expiry case is a unit test.

Shape, and why it is O(1) per lookup:

- ``_names[address]``: name -> expiry of that (name, address) pin, plus a cached frozenset of
  the live names that stays valid until the earliest of their expiries (so a lookup is a dict
  hit and a float compare, and allocates nothing on the connection path);
- ``_expiry[address]``: the address-level expiry (the latest of its names'), which is what a
  kernel set element mirrors (the prefilter's pinned-address set);
- ``_heap``: (address expiry, address), lazily invalidated (an entry counts only while it
  equals ``_expiry[address]``), compacted when stale entries outnumber live ones. It gives
  :meth:`expire` and the eviction of the oldest-expiring address their order.

Rotating answers (a CDN that returns other addresses on each query) keep the earlier addresses
until their own expiry: a pin is only ever extended, never shortened or replaced.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import time
from collections.abc import Callable, Iterable

from corral.config.values import IPAddress
from corral.policy.names import normalize_name

#: Shortest life of a pin, even for TTL 0/1 answers. The guest connects right after it
#: resolves (and may try the next address of the answer a little later, as happy eyeballs
#: does after 250 ms), so a pin must outlive a TTL of 0. Precedents: Cilium's
#: ``--tofqdns-min-ttl`` was 3600 s by default for years, then 0 (honour the TTL) once its
#: DNS proxy made the poller obsolete (cilium/cilium#21439: the long minimum kept "expired DNS
#: info" around at CPU and memory cost); Juniper SRX keeps FQDN addresses at least 16 s. We
#: choose 5 s: long enough for resolve-then-connect and a retry or two, short enough that an
#: address leaves the pin set soon after its name stopped answering with it. Established
#: connections are never re-decided, so expiry only concerns new connections. A runtime that
#: caches answers past their TTL (the JVM keeps positive answers 30 s by default) and opens a
#: new connection later has to resolve again; docs/network.md says so.
MIN_PIN_SECONDS = 5.0

#: Longest life of a pin, whatever the TTL says (TTLs go up to 2^31-1 s). Unbound's
#: ``cache-max-ttl`` defaults to 86400 s (BIND's ``max-cache-ttl`` to one week); a day also
#: matches :data:`corral.net.dns`'s cache cap, so a pin never outlives what the cache would serve.
MAX_PIN_SECONDS = 86400.0

#: Addresses pinned per sandbox at most; beyond it the address whose pin expires first is
#: dropped. Precedents: Cilium bounds IPs per name per endpoint
#: (``--tofqdns-endpoint-max-ip-per-hostname``) and per restored rule
#: (``--tofqdns-max-ips-per-restored-rule``, 1000). A busy crawler resolving 10 names/s with
#: 4 addresses each and TTLs of 300 s holds 12,000 addresses; 16,384 covers that with room, at
#: a few MiB of memory and a kernel set of the same bound. A guest that tries to grow the set
#: without end (a wildcard zone, a name per query) only evicts its own oldest pins.
MAX_PINS = 16384

#: Names pinned per address at most (the earliest-expiring name goes first). One CDN address
#: serves many names, but a guest resolving ``<random>.wildcard.example`` by the thousand must
#: not make every connection's verdict walk thousands of names: the flow verdict looks at each
#: name of the address. 64 is above what a shared CDN address realistically carries for one
#: sandbox in one TTL (Cilium's selector cache keeps names per IP without a bound, and its
#: per-endpoint limits are the precedent for bounding at all).
MAX_NAMES_PER_ADDRESS = 64

_EMPTY: frozenset[str] = frozenset()


def _key(address: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 (::ffff:a.b.c.d) is its IPv4 address everywhere (SPEC 4)."""
    if type(address) is ipaddress.IPv6Address:
        mapped = address.ipv4_mapped
        if mapped is not None:
            return mapped
    return address


class _Entry:
    """The pins of one address."""

    __slots__ = ("live", "live_until", "names")

    def __init__(self) -> None:
        self.names: dict[str, float] = {}
        self.live: frozenset[str] = _EMPTY
        self.live_until = 0.0  # ``live`` holds until this instant (the earliest expiry in it)

    def refresh(self, now: float) -> None:
        dead = [n for n, t in self.names.items() if t <= now]
        for n in dead:
            del self.names[n]
        self.live = frozenset(self.names)
        self.live_until = min(self.names.values(), default=0.0)


class PinSet:
    """name -> addresses of one sandbox's DNS answers, with their expiries (module docstring)."""

    __slots__ = ("_clock", "_expiry", "_heap", "_names", "_seq", "evicted")

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._names: dict[IPAddress, _Entry] = {}
        self._expiry: dict[IPAddress, float] = {}
        # (expiry, sequence, address): the sequence breaks ties, because IPv4 and IPv6
        # addresses do not compare with each other.
        self._heap: list[tuple[float, int, IPAddress]] = []
        self._seq = itertools.count()
        #: Addresses dropped before their expiry because of :data:`MAX_PINS` (a counter for
        #: the audit and the tests).
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._expiry)

    # -- feeding ------------------------------------------------------------------------------
    def add(
        self, names: Iterable[str], addresses: Iterable[IPAddress], ttl: float
    ) -> list[tuple[IPAddress, float]]:
        """Pin every address to every name (the queried name and each CNAME on the chain), each
        (name, address) until now + max(ttl, MIN_PIN_SECONDS) (at most MAX_PIN_SECONDS), never
        shortening an existing later expiry.

        Returns (address, seconds_left) for each address whose address-level expiry grew (new
        ones included), so the caller extends the kernel set element; O(len) in the input.
        """
        now = self._clock()
        self.expire()
        seconds = min(max(float(ttl), MIN_PIN_SECONDS), MAX_PIN_SECONDS)
        until = now + seconds
        wanted = list(dict.fromkeys(normalize_name(n) for n in names))
        if not wanted:
            return []
        grown: list[tuple[IPAddress, float]] = []
        for raw in dict.fromkeys(addresses):
            address = _key(raw)
            entry = self._names.get(address)
            if entry is None:
                entry = self._names[address] = _Entry()
            changed = False
            for name in wanted:
                old = entry.names.get(name)
                if old is None or old < until:
                    if old is None or old <= now:
                        changed = True  # a name the cached frozenset does not hold
                    entry.names[name] = until
            if len(entry.names) > MAX_NAMES_PER_ADDRESS:
                for name, _ in sorted(entry.names.items(), key=lambda kv: kv[1])[
                    : len(entry.names) - MAX_NAMES_PER_ADDRESS
                ]:
                    del entry.names[name]
                changed = True
            if changed or entry.live_until <= now:
                entry.refresh(now)
            old_expiry = self._expiry.get(address)
            if old_expiry is None or old_expiry < until:
                self._expiry[address] = until
                heapq.heappush(self._heap, (until, next(self._seq), address))
                grown.append((address, seconds))
        if len(self._expiry) > MAX_PINS:
            self._evict(len(self._expiry) - MAX_PINS)
            grown = [(a, s) for a, s in grown if a in self._expiry]
        if len(self._heap) > 2 * len(self._expiry) + 64:
            self._compact()
        return grown

    # -- asking -------------------------------------------------------------------------------
    def names_for(self, address: IPAddress) -> frozenset[str]:
        """The names whose unexpired answers carried ``address`` (empty if none). O(1)
        amortised: the frozenset is cached until its first name expires."""
        entry = self._names.get(_key(address))
        if entry is None:
            return _EMPTY
        now = self._clock()
        if entry.live_until > now:
            return entry.live
        entry.refresh(now)
        if not entry.names:
            self._drop(_key(address))
            return _EMPTY
        return entry.live

    def is_pinned(self, address: IPAddress) -> bool:
        """Whether any unexpired answer carried ``address``."""
        key = _key(address)
        expiry = self._expiry.get(key)
        if expiry is None:
            return False
        if expiry > self._clock():
            return True
        self._drop(key)
        return False

    def entries(self) -> list[tuple[IPAddress, float]]:
        """Every pinned address with its seconds left (to rebuild a kernel set from scratch)."""
        now = self._clock()
        return [(a, t - now) for a, t in self._expiry.items() if t > now]

    # -- forgetting ---------------------------------------------------------------------------
    def expire(self) -> None:
        """Drop every address whose pins all expired (called periodically and by ``add``)."""
        now = self._clock()
        heap = self._heap
        while heap and heap[0][0] <= now:
            t, _, address = heapq.heappop(heap)
            if self._expiry.get(address) == t:
                self._drop(address)

    def _evict(self, count: int) -> None:
        heap = self._heap
        while count > 0 and heap:
            t, _, address = heapq.heappop(heap)
            if self._expiry.get(address) == t:
                self._drop(address)
                self.evicted += 1
                count -= 1

    def _drop(self, address: IPAddress) -> None:
        self._names.pop(address, None)
        self._expiry.pop(address, None)

    def _compact(self) -> None:
        self._heap = [(t, next(self._seq), a) for a, t in self._expiry.items()]
        heapq.heapify(self._heap)
