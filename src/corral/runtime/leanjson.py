"""JSON for the supervisor's start-up path, without the ``json`` package.

The supervisor is started once per sandbox and its start-up time is part of every ``create``.
On the machines corral is measured on, ``import json`` costs about 7 ms because it pulls in
``re``; the C accelerator ``_json`` that ``json`` itself uses costs nothing. These two functions
cover what the supervisor and the control protocol exchange: objects of str, int, float, bool,
None, lists and dicts with string keys. Everything else in corral uses ``json``.
"""

from __future__ import annotations

import _json

#: Characters JSON allows between tokens.
_WHITESPACE = " \t\n\r"


class _ScanContext:
    """The attributes ``_json.make_scanner`` reads from a ``json.JSONDecoder``."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = None
    memo: dict[str, str] = {}  # noqa: RUF012 - the C scanner wants a plain dict attribute


_scan = _json.make_scanner(_ScanContext())  # type: ignore[arg-type]


def loads(text: str) -> object:
    """Parse one JSON document; ``ValueError`` when ``text`` is not exactly one document."""
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan(text, start)
    except StopIteration as exc:
        raise ValueError(f"not JSON at character {exc.value}") from None
    if text[end:].strip(_WHITESPACE):
        raise ValueError(f"extra data after the JSON document at character {end}")
    return value


def dumps(value: object) -> str:
    """Serialise ``value`` compactly (ASCII only, so it is also valid as one line)."""
    parts: list[str] = []
    _encode(value, parts)
    return "".join(parts)


def _encode(value: object, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(_json.encode_basestring_ascii(value))
    elif isinstance(value, int):
        out.append(int.__repr__(value))
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("JSON cannot carry NaN or infinity")
        out.append(float.__repr__(value))
    elif isinstance(value, dict):
        out.append("{")
        for i, (key, item) in enumerate(value.items()):
            if not isinstance(key, str):
                raise TypeError(f"JSON object keys must be strings, not {type(key).__name__}")
            if i:
                out.append(",")
            out.append(_json.encode_basestring_ascii(key))
            out.append(":")
            _encode(item, out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _encode(item, out)
        out.append("]")
    else:
        raise TypeError(f"cannot encode {type(value).__name__} as JSON")
