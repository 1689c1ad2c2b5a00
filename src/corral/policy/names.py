"""Domain names as the policy compares them: lower-case, no trailing dot, IDNA (SPEC section 4).

Rule destinations are normalised strictly when the config is built
(``corral.config.values.normalize_domain``). Names coming off the wire (TLS SNI, Host
headers, DNS questions, the pin set) are normalised here instead, leniently and cheaply: a
malformed name is not an error, it simply matches no domain rule (while ``*`` and address
rules still apply to its flow).
"""

from __future__ import annotations

from functools import lru_cache

import idna

#: Distinct non-ASCII names whose IDNA form is remembered; they are rare, and converting
#: one costs tens of microseconds, so a small cache keeps a chatty guest cheap.
_IDNA_CACHE_SIZE = 4096


@lru_cache(maxsize=_IDNA_CACHE_SIZE)
def _idna(name: str) -> str:
    try:
        return idna.encode(name, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        return name


def normalize_name(name: str) -> str:
    """``name`` in the form rules use; never raises (garbage simply matches nothing)."""
    name = name.lower() if name.isascii() else _idna(name.lower())
    if name.endswith("."):
        name = name[:-1]
    return name


def name_suffixes(name: str) -> list[str]:
    """Every suffix a ``.suffix`` rule could have to match ``name``, longest first.

    ``a.b.example.com`` -> ``.b.example.com``, ``.example.com``, ``.com``; never the name
    itself, because a suffix rule never matches its apex.
    """
    out = []
    i = name.find(".", 1)  # from 1: a suffix is never the whole name (even ".x" malformed)
    while i != -1:
        out.append(name[i:])
        i = name.find(".", i + 1)
    return out


def suffix_matches(suffix: str, name: str) -> bool:
    """``.example.com`` matches every subdomain of example.com, never example.com itself."""
    return len(name) > len(suffix) and name.endswith(suffix)


def deny_suffix_matches(suffix: str, name: str) -> bool:
    """deny_domain_suffixes entries block the apex and every subdomain (the reference)."""
    return name == suffix[1:] or name.endswith(suffix)
