"""What the first bytes of a connection reveal, and how a host name off the wire is judged.

A name read from a TLS ClientHello, an HTTP/1 Host header, a request target or an HTTP/2
``:authority`` is untrusted: it can be empty, carry odd bytes, be longer than DNS allows, or
be written so that two parsers disagree about it. Every such name goes through
:func:`host_from_wire` (a bare name, SNI) or :func:`authority_from_wire` (``host[:port]``),
which normalise it exactly as :func:`corral.policy.normalize_name` does and say whether it is
a valid host name at all. Policy treats a connection whose name is not valid as denied, so
the judgement here is strict where leniency could let two readers see different hosts.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from corral.policy.names import normalize_name

#: Longest host name in presentation form without the trailing dot (RFC 1035: 255 octets on
#: the wire, 253 characters written out).
MAX_HOST_NAME = 253
#: Longest label (RFC 1035 section 2.3.4).
MAX_LABEL = 63
#: Raw names longer than this are invalid before any decoding is tried: an SNI can be 64 KiB
#: long (RFC 6066 HostName<1..2^16-1>) and IDNA is costly, while no valid name, even in
#: U-label form, needs more than four UTF-8 bytes per A-label character.
MAX_RAW_NAME = 4 * MAX_HOST_NAME
#: The part of an invalid name kept for audit events (escaped): enough to recognise it.
RAW_NAME_SHOWN = 80

# Letters, digits, hyphen and underscore: the underscore is not LDH but appears in real
# names (``_dmarc``, some internal service names), and a policy can only ever match it.
_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
# The last label looks like a number: WHATWG URL parsers (and inet_aton) read such a name as
# an IPv4 address ("0x7f.1", "127.1", "1.2.3.256"), so it is not a host name anyone may
# name in a policy.
_NUMERIC_LABEL = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)")
_PORT = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True, slots=True)
class Revealed:
    """What the first flight of a connection says about where it is going.

    ``name`` is normalised (lower-case, no trailing dot, no port, IDNA A-label; an IP literal
    as its compressed text) and is ``None`` when no valid name was revealed. ``valid`` is
    ``False`` when the connection did reveal something that is not a usable host name, or
    said contradictory things (two Host headers, a Host that differs from the request
    target), or was cut off before it said everything: policy denies such a connection.
    ``raw_name`` is a printable, truncated form of an invalid name for the audit log;
    ``reason`` says in one sentence why ``valid`` is ``False`` or ``protocol`` is unknown.
    """

    protocol: str  # "tls" | "http1" | "h2" | "unknown"
    name: str | None
    valid: bool
    alpn: tuple[str, ...] = ()
    connect: bool = False
    port: int | None = None
    tls_versions: tuple[int, ...] = ()
    ech: bool = False
    raw_name: str | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Host:
    """A judged host from the wire: ``name`` normalised when ``valid``, else ``None``."""

    name: str | None
    valid: bool
    port: int | None = None
    raw: str | None = None  # printable form of an invalid name, for audit
    reason: str | None = None


def shown(raw: bytes | str) -> str:
    """A printable, bounded rendering of untrusted name bytes for logs."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
    text = raw[:RAW_NAME_SHOWN].decode("ascii", "backslashreplace")
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text + ("..." if len(raw) > RAW_NAME_SHOWN else "")


def _invalid(raw: bytes | str, reason: str, port: int | None = None) -> Host:
    return Host(None, False, port, shown(raw), reason)


def host_from_wire(raw: bytes | str) -> Host:
    """Judge a bare host name (SNI, or the host part of an authority): never raises.

    IPv4 and IPv6 literals are accepted and given as their compressed text (an SNI must not
    carry one, RFC 6066, but the address is then what the policy compares anyway).
    """
    if len(raw) > MAX_RAW_NAME:
        return _invalid(raw, "the host name is longer than any valid name")
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return _invalid(raw, "the host name is not UTF-8")
    else:
        text = raw
    if not text:
        return _invalid(raw, "the host name is empty")
    if text.isascii() and "%" not in text and (":" in text or text[-1:].isdigit()):
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            pass
        else:
            return Host(address.compressed, True)  # ("%": no IPv6 zone id, RFC 9110 4.3.5)
    name = normalize_name(text)
    if not name.isascii():
        return _invalid(raw, "the host name has characters IDNA cannot encode")
    if not name or len(name) > MAX_HOST_NAME:
        return _invalid(raw, "the host name is empty or longer than 253 characters")
    labels = name.split(".")
    for label in labels:
        if not _LABEL.fullmatch(label):
            return _invalid(raw, "the host name has an empty label, a label over 63 "
                            "characters or a character other than letters, digits, - and _")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        return _invalid(raw, "the host name ends in a numeric label but is not an IPv4 address")
    return Host(name, True)


def authority_from_wire(raw: bytes | str, *, port_required: bool = False) -> Host:
    """Judge ``host[:port]`` (RFC 3986 authority without userinfo; IPv6 in brackets).

    Used for the Host header, an absolute-form target's authority, CONNECT's authority-form
    and HTTP/2 ``:authority``. Userinfo (``user@host``) is refused: it is deprecated for http
    (RFC 9110 section 4.2.4) and the classic way to make two URL parsers disagree on the host.
    """
    text = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
    if "@" in text:
        return _invalid(raw, "the authority carries userinfo (user@host)")
    port: int | None = None
    if text.startswith("["):
        close = text.find("]")
        if close == -1:
            return _invalid(raw, "the authority has an unclosed IPv6 bracket")
        host_part, rest = text[1:close], text[close + 1 :]
        if rest and not rest.startswith(":"):
            return _invalid(raw, "the authority has bytes after its IPv6 literal")
        port_text = rest[1:] if rest else None
        try:
            if "%" in host_part:
                raise ValueError("zone id")
            address = ipaddress.IPv6Address(host_part)
        except ValueError:
            return _invalid(raw, "the authority's bracketed host is not an IPv6 address")
        host = Host(address.compressed, True)
    else:
        host_part, sep, port_text_found = text.rpartition(":")
        if not sep:
            host_part, port_text = text, None
        else:
            port_text = port_text_found
        if ":" in host_part:
            return _invalid(raw, "the authority has an IPv6 address without brackets")
        host = host_from_wire(host_part)
    if port_text:
        if not _PORT.fullmatch(port_text) or int(port_text) > 65535:
            return _invalid(raw, "the authority's port is not a number from 0 to 65535")
        port = int(port_text)
    elif port_required:
        return _invalid(raw, "the authority has no port")
    if not host.valid:
        return Host(None, False, port, shown(raw), host.reason)
    return Host(host.name, True, port)
