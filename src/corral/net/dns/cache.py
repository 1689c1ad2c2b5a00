"""The answer cache of one sandbox's DNS interceptor (sans-I/O, clock passed in).

Per sandbox by construction (each interceptor owns one): a sandbox must not learn what another
asked by timing a cache hit. Entries are rendered templates (:class:`corral.net.dns.wire.Template`)
with what their answer pins, keyed by (lower-case question name on the wire, type). Bounded in
entries and in bytes; least recently used goes first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from corral.config.values import IPAddress
from corral.net.dns.wire import Template

#: Entries per sandbox. dnsmasq caches 150 names by default (at most 10,000); one sandbox
#: rarely needs more than a few hundred names at once. 4096 keeps a crawler's working set.
MAX_CACHE_ENTRIES = 4096

#: Bytes of answers per sandbox. Unbound's ``msg-cache-size`` defaults to 4 MiB for a whole
#: resolver; per sandbox the same bounds what a guest can make corral hold by asking for large
#: answers (one 64 KiB answer per name would otherwise reach 256 MiB at the entry bound).
MAX_CACHE_BYTES = 4 * 1024 * 1024

#: Longest a positive answer is kept, whatever its TTL. Unbound's ``cache-max-ttl`` default.
MAX_CACHE_TTL = 86400

#: Longest a negative answer is kept (RFC 2308 5 suggests one to three hours; Unbound's
#: ``cache-max-negative-ttl`` defaults to 3600).
MAX_NEGATIVE_TTL = 3600

CacheKey = tuple[bytes, int]  # (lower-case qname wire, qtype)


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    template: Template
    expires: float
    #: What serving it pins: the chain's names, the addresses, and the pin's TTL at creation.
    names: tuple[str, ...] = ()
    addresses: tuple[IPAddress, ...] = ()
    pin_ttl: float = 0.0


class AnswerCache:
    """Bounded TTL cache; ``get`` drops an expired entry it meets."""

    __slots__ = ("_bytes", "_entries", "max_bytes", "max_entries")

    def __init__(
        self, *, max_entries: int = MAX_CACHE_ENTRIES, max_bytes: int = MAX_CACHE_BYTES
    ) -> None:
        self._entries: OrderedDict[CacheKey, CachedAnswer] = OrderedDict()
        self._bytes = 0
        self.max_entries = max_entries
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, key: CacheKey, now: float) -> CachedAnswer | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= now:
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: CacheKey, entry: CachedAnswer) -> None:
        size = len(entry.template.wire)
        if size > self.max_bytes:
            return
        if key in self._entries:
            self._remove(key)
        self._entries[key] = entry
        self._bytes += size
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            self._remove(oldest)

    def expire(self, now: float) -> None:
        """Drop expired entries (a periodic sweep; ``get`` also drops them lazily)."""
        for key in [k for k, e in self._entries.items() if e.expires <= now]:
            self._remove(key)

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def _remove(self, key: CacheKey) -> None:
        entry = self._entries.pop(key)
        self._bytes -= len(entry.template.wire)
