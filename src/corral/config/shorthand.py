"""The CLI's one-line forms of rules, published ports and secrets.

``--rule ACTION[:DIRECTION]@DESTINATION[:PROTOCOLS[:PORTS]]``
    ``allow:egress@api.example.com:tcp:443``, ``deny@10.0.0.5``,
    ``allow@.internal:tcp,udp:8000-9000,9443``, ``allow@[2001:db8::/32]:any:443``.
    PROTOCOLS is a comma list or ``any``; PORTS a comma list of ``N`` / ``A-B`` or ``any``.
    IPv6 destinations go in brackets because the fields are colon-separated.
``-p [BIND:][HOST:]GUEST[/udp]``
    ``8080:80``, ``0.0.0.0:8080:80``, ``[::1]:5353:53/udp``; without HOST (``80``,
    ``127.0.0.1::80``) or with HOST 0 (``0:80``) the kernel picks a free host port.
``--secret ENV@HOST[,HOST...]``
    the secret's value is read from the host's environment variable ENV.
"""

from __future__ import annotations

from corral.config.enums import PortProtocol
from corral.config.network import PolicyRule, PortBinding, SecretEntry
from corral.errors import ConfigError


def parse_rule(text: str, flag: str = "--rule") -> PolicyRule:
    """A PolicyRule from its one-line form; errors name the flag and the bad part."""
    head, sep, tail = text.partition("@")
    if not sep or not head:
        raise ConfigError(
            flag, f"{text!r} is not ACTION[:DIRECTION]@DESTINATION[:PROTOCOLS[:PORTS]]"
        )
    action, _, direction = head.partition(":")
    if tail.startswith("["):
        dest, close, rest = tail[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            raise ConfigError(flag, f"{text!r}: an IPv6 destination needs its closing ']'")
        rest = rest[1:]
    else:
        dest, _, rest = tail.partition(":")
    protos_text, _, ports_text = rest.partition(":")
    protocols = [] if protos_text in ("", "any", "*") else protos_text.split(",")
    ports = [] if ports_text in ("", "any", "*") else ports_text.split(",")
    try:
        return PolicyRule(
            action=action,
            direction=direction or "egress",
            destination=dest,
            protocols=protocols,
            ports=ports,
        )
    except ConfigError as exc:
        raise ConfigError(flag, f"{text!r}: {exc}") from None


def parse_publish(text: str, flag: str = "-p") -> PortBinding:
    """A PortBinding from ``[BIND:][HOST:]GUEST[/udp]`` (no HOST, or 0: a random port)."""
    body, _, proto = text.partition("/")
    bind = None
    if body.startswith("["):
        addr, close, rest = body[1:].partition("]")
        if not close or not rest.startswith(":"):
            raise ConfigError(flag, f"{text!r}: write an IPv6 bind address as [addr]:HOST:GUEST")
        bind, body = addr, rest[1:]
    parts = body.split(":")
    if len(parts) == 3 and bind is None:
        bind, host, guest = parts
    elif len(parts) == 2:
        host, guest = parts
    elif len(parts) == 1 and bind is None:
        host, guest = "0", parts[0]
    else:
        raise ConfigError(flag, f"{text!r} is not [BIND:][HOST:]GUEST[/udp]")
    host = host or "0"
    try:
        return PortBinding(
            bind=bind or "127.0.0.1",
            host_port=host,  # type: ignore[arg-type]
            guest_port=guest,  # type: ignore[arg-type]
            protocol=PortProtocol(proto.lower()) if proto else PortProtocol.TCP,
        )
    except ValueError as exc:
        raise ConfigError(flag, f"{text!r}: {exc}") from None


def parse_secret(text: str, flag: str = "--secret") -> SecretEntry:
    """A SecretEntry from ``ENV@host1,host2`` (value taken from the host's $ENV)."""
    env, sep, hosts = text.partition("@")
    if not sep or not env or not hosts:
        raise ConfigError(flag, f"{text!r} is not ENV@HOST[,HOST...]")
    try:
        return SecretEntry(env_var=env, from_env=env, allowed_hosts=hosts.split(","))
    except ConfigError as exc:
        raise ConfigError(flag, f"{text!r}: {exc}") from None
