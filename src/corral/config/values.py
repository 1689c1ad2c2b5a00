"""Parsers for the scalar values of a network configuration: ports, domains, addresses,
destinations, nameservers.

They are pure functions returning normalised values or raising ConfigError with the path
the caller passes, so every message names the field at fault.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from enum import StrEnum

import idna

from corral.errors import ConfigError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MIN_PORT = 1
MAX_PORT = 65535

#: RFC 1035: 253 characters in the presentation form of a name (255 octets on the wire).
MAX_DOMAIN_LENGTH = 253
#: RFC 1035: 63 octets per label.
MAX_LABEL_LENGTH = 63

# Letters, digits, hyphen (RFC 952/1123) plus underscore, which service names (_dmarc,
# _acme-challenge) use and resolvers accept.
_LABEL_RE = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?$")


class Group(StrEnum):
    """The destination groups of SPEC section 4, in classification order."""

    HOST = "host"
    METADATA = "metadata"
    LOOPBACK = "loopback"
    PRIVATE = "private"
    LINK_LOCAL = "link-local"
    MULTICAST = "multicast"
    PUBLIC = "public"


GROUP_NAMES = frozenset(g.value for g in Group)


def parse_port(value: object, path: str) -> int:
    """A single port number 1..65535 (an int, or a string of digits)."""
    if isinstance(value, bool):
        raise ConfigError(path, f"{value!r} is not a port (1-65535)")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int) or not MIN_PORT <= value <= MAX_PORT:
        raise ConfigError(path, f"{value!r} is not a port (1-65535)")
    return value


def parse_port_spec(value: object, path: str) -> tuple[int, int]:
    """A rule's port: ``"N"`` or ``"A-B"`` with 1 <= A <= B <= 65535, as an inclusive range."""
    if isinstance(value, int) and not isinstance(value, bool):
        port = parse_port(value, path)
        return port, port
    if not isinstance(value, str):
        raise ConfigError(path, f"{value!r} is not a port or port range")
    text = value.strip()
    lo_text, sep, hi_text = text.partition("-")
    if not lo_text.isdigit() or (sep and not hi_text.isdigit()):
        raise ConfigError(path, f'{value!r} is not a port ("443") or range ("8000-9000")')
    lo = int(lo_text)
    hi = int(hi_text) if sep else lo
    if not MIN_PORT <= lo <= MAX_PORT:
        raise ConfigError(path, f"{value!r} is not a port (1-65535)")
    if not MIN_PORT <= hi <= MAX_PORT:
        raise ConfigError(path, f"{value!r}: {hi} is not a port (1-65535)")
    if lo > hi:
        raise ConfigError(path, f"{value!r} is an empty range (start {lo} > end {hi})")
    return lo, hi


def format_port_spec(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


def normalize_domain(value: object, path: str) -> str:
    """A domain name: lower-case, no trailing dot, IDNA (punycode) form, labels validated.

    Internationalised names are converted with UTS #46 mapping, so ``BÜCHER.example`` and
    ``xn--bcher-kva.example`` are the same rule; comparisons elsewhere are plain string ones.
    """
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(path, f"{value!r} is not a domain name")
    text = value.strip()
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1]
    try:
        ascii_name = text.encode("ascii").decode().lower()
    except UnicodeEncodeError:
        try:
            ascii_name = idna.encode(text, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise ConfigError(
                path, f"{value!r} is not a valid internationalised domain: {exc}"
            ) from None
    if len(ascii_name) > MAX_DOMAIN_LENGTH:
        raise ConfigError(path, f"{value!r} is longer than {MAX_DOMAIN_LENGTH} characters")
    labels = ascii_name.split(".")
    for label in labels:
        if not label:
            raise ConfigError(path, f"{value!r} has an empty label")
        if len(label) > MAX_LABEL_LENGTH:
            raise ConfigError(
                path, f"{value!r} has a label longer than {MAX_LABEL_LENGTH} characters"
            )
        if not _LABEL_RE.match(label):
            raise ConfigError(path, f"{value!r} is not a domain name (label {label!r})")
    if labels[-1].isdigit():
        raise ConfigError(path, f"{value!r} is neither an IP address nor a domain name")
    return ascii_name


def normalize_suffix(value: object, path: str) -> str:
    """A domain suffix in its canonical ``.example.com`` form (leading dot added if missing)."""
    if not isinstance(value, str):
        raise ConfigError(path, f"{value!r} is not a domain suffix")
    text = value.strip()
    return "." + normalize_domain(text[1:] if text.startswith(".") else text, path)


def parse_ip(value: object, path: str) -> IPAddress:
    if not isinstance(value, str):
        raise ConfigError(path, f"{value!r} is not an IP address")
    try:
        return ipaddress.ip_address(value.strip())
    except ValueError:
        raise ConfigError(path, f"{value!r} is not an IP address") from None


def parse_cidr(value: object, path: str) -> IPNetwork:
    """A CIDR with no host bits set (``10.0.0.5/8`` is a typo more often than a wish)."""
    if not isinstance(value, str):
        raise ConfigError(path, f"{value!r} is not a CIDR")
    text = value.strip()
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ConfigError(path, f"{value!r} is not a CIDR (like 10.0.0.0/8)") from None
        raise ConfigError(path, f"{value!r} has host bits set; did you mean {loose}?") from None


def unmap(addr: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (::ffff:a.b.c.d) as its IPv4 address; others unchanged."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def unmap_network(net: IPNetwork) -> IPNetwork:
    """``::ffff:10.0.0.0/104`` as ``10.0.0.0/8``; other networks unchanged."""
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = ipaddress.IPv6Network("::ffff:0:0/96")
        if net.subnet_of(mapped):
            base = net.network_address.ipv4_mapped
            assert base is not None
            return ipaddress.IPv4Network(f"{base}/{net.prefixlen - 96}")
    return net


class DestinationKind(StrEnum):
    ANY = "any"
    GROUP = "group"
    CIDR = "cidr"
    IP = "ip"
    DOMAIN = "domain"
    SUFFIX = "suffix"


@dataclass(frozen=True, slots=True)
class Destination:
    """A parsed rule destination. ``value`` is the normalised text (what the wire carries)."""

    kind: DestinationKind
    value: str
    network: IPNetwork | None = None  # for CIDR and IP (an IP is a /32 or /128), unmapped
    group: Group | None = None

    @property
    def is_address(self) -> bool:
        """Rules of these kinds decide by address alone (they never match a DNS query)."""
        return self.kind in (DestinationKind.CIDR, DestinationKind.IP, DestinationKind.GROUP)

    @property
    def is_name(self) -> bool:
        return self.kind in (DestinationKind.DOMAIN, DestinationKind.SUFFIX)


def parse_destination(value: object, path: str) -> Destination:
    """Classify a rule destination: ``*``, a group, a CIDR, an IP, a domain or a ``.suffix``."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(path, "a destination is required (use '*' for any)")
    text = value.strip()
    lowered = text.lower()
    if lowered == "*":
        return Destination(DestinationKind.ANY, "*")
    if lowered in GROUP_NAMES:
        return Destination(DestinationKind.GROUP, lowered, group=Group(lowered))
    if "/" in text:
        net = unmap_network(parse_cidr(text, path))
        return Destination(DestinationKind.CIDR, str(net), network=net)
    # An address ends in a digit (IPv4) or has a colon (IPv6): a name that does neither is
    # not tried as one (the failed parse and its exception cost more than the name's own).
    if ":" in text or text[-1].isdigit() or text[-1] == "]":
        try:
            addr = ipaddress.ip_address(text.strip("[]"))
        except ValueError:
            pass
        else:
            addr = unmap(addr)
            return Destination(DestinationKind.IP, str(addr), network=ipaddress.ip_network(addr))
    if text.startswith("."):
        return Destination(DestinationKind.SUFFIX, normalize_suffix(text, path))
    if text.startswith("*."):
        raise ConfigError(path, f"{value!r}: write a suffix as {text[1:]!r} (leading dot, no '*')")
    return Destination(DestinationKind.DOMAIN, normalize_domain(text, path))


def parse_host_pattern(value: object, path: str) -> str:
    """An exact domain or ``*.suffix`` (TLS bypass, secret hosts), normalised."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(path, f"{value!r} is not a domain or '*.suffix' pattern")
    text = value.strip()
    if text.startswith("*."):
        return "*." + normalize_domain(text[2:], path)
    if "*" in text:
        raise ConfigError(path, f"{value!r}: a wildcard is allowed only as a leading '*.'")
    return normalize_domain(text, path)


def host_pattern_matches(pattern: str, name: str) -> bool:
    """``*.example.com`` matches every subdomain of example.com (not the apex)."""
    if pattern.startswith("*."):
        return name.endswith(pattern[1:])
    return name == pattern


def split_hostport(value: object, path: str) -> tuple[IPAddress, int | None]:
    """``1.1.1.1``, ``1.1.1.1:53``, ``[2606:4700::1111]:53`` or a bare IPv6 address.

    The port is None when the text has none; callers decide whether one is needed.
    """
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(path, f"{value!r} is not an address[:port]")
    text = value.strip()
    port_text: str | None = None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(path, f"{value!r} is not [ipv6]:port")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host = text  # IPv4 without a port, or a bare IPv6 address
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(path, f"{value!r}: {host!r} is not an IP address") from None
    if port_text is None:
        return addr, None
    try:
        return addr, parse_port(port_text, path)
    except ConfigError:
        raise ConfigError(path, f"{value!r}: {port_text!r} is not a port (1-65535)") from None


def parse_hostport(value: object, path: str, default_port: int | None) -> tuple[IPAddress, int]:
    """An address with a port, the port defaulting to ``default_port`` (required when None)."""
    addr, port = split_hostport(value, path)
    if port is None:
        if default_port is None:
            raise ConfigError(path, f"{value!r} needs a port")
        return addr, default_port
    return addr, port
