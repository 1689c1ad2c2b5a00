"""Which parts of a configuration corral accepts but cannot enforce yet: refused, in one place.

A field that is validated and stored but has no effect would be a silent no-op, and for a
security boundary that is worse than an error: a user who asks for TLS interception or for
a secret to stay out of the sandbox must not get a sandbox that quietly does neither. So
``Sandbox.create`` (and with it every CLI command) asks :func:`unsupported` first and raises
its sentence as a ConfigError.

Each part that is not there yet is one entry of :data:`NOT_ENFORCED`; when the part lands, its
line is deleted and nothing else changes. Pure: no I/O, imports nothing of ``net``/``runtime``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from corral.config.network import NetworkConfig
from corral.errors import ConfigError


@dataclass(frozen=True)
class NotEnforced:
    """One part of the configuration that corral refuses until it is enforced."""

    #: The field path the sentence starts with (``tls``, ``secrets``, ...).
    field: str
    #: What is not there yet, as a noun phrase ("TLS interception").
    what: str
    #: The flags and fields that ask for it, for the sentence.
    flags: str
    #: True when the given config (and secrets) uses this part.
    used: Callable[[NetworkConfig, Sequence[Any]], bool]


#: The parts that are refused today. Delete a line to lift its refusal.
NOT_ENFORCED: tuple[NotEnforced, ...] = (
)  # fmt: skip


def unsupported(config: NetworkConfig, secrets: Iterable[Any] = ()) -> str | None:
    """The sentence refusing the first part of ``config``/``secrets`` that corral cannot
    enforce yet (it starts with the field's name), or None when all of it is enforced."""
    part = _first_used(config, list(secrets))
    if part is None:
        return None
    return f"{part.field}: {_reason(part)}"


def refuse_unsupported(config: NetworkConfig, secrets: Iterable[Any] = ()) -> None:
    """Raise ConfigError (path = the field) for what :func:`unsupported` would name."""
    part = _first_used(config, list(secrets))
    if part is not None:
        raise ConfigError(part.field, _reason(part))


def _first_used(config: NetworkConfig, secrets: Sequence[Any]) -> NotEnforced | None:
    for part in NOT_ENFORCED:
        if part.used(config, secrets):
            return part
    return None


def _reason(part: NotEnforced) -> str:
    return f"{part.what} is not there yet (it is being built): corral refuses {part.flags} until it is"
