"""The network configuration types of SPEC section 2 (the reference's Go structs).

Every type is a frozen dataclass validated on construction: a value that is wrong raises
ConfigError naming the field (``rules[2].ports[0]: '70000' is not a port (1-65535)``). Fields
keep the reference's names in snake_case; Go pointers are Optional (None = unset, the default
applies; the ``effective_*`` properties say what it is). Enum fields accept the member or its
wire string, list fields any iterable (stored as tuples), so a config is immutable and can be
shared between the SDK, the supervisor and the policy engine.
"""

from __future__ import annotations

import dataclasses
import gc
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from corral.config.enums import (
    NetworkPolicyPreset,
    PolicyAction,
    PolicyDirection,
    PolicyProtocol,
    PortProtocol,
    ViolationAction,
    coerce_enum,
)
from corral.config.values import (
    Destination,
    format_port_spec,
    normalize_domain,
    normalize_suffix,
    parse_cidr,
    parse_destination,
    parse_host_pattern,
    parse_hostport,
    parse_ip,
    parse_port,
    parse_port_spec,
)
from corral.errors import ConfigError

DEFAULT_IPV4_POOL = "172.16.0.0/12"
DEFAULT_IPV6_POOL = "fd42:6d73:62::/48"
#: Concurrent TCP connections plus UDP flows per sandbox when max_connections is unset.
DEFAULT_MAX_CONNECTIONS = 256
#: The DNS port (RFC 1035, UDP and TCP): what the firewall diverts to the DNS interceptor,
#: what a nameserver without a port is asked on, and the port a query is decided on.
DNS_PORT = 53
#: Per-attempt upstream DNS timeout when query_timeout_ms is unset.
DEFAULT_DNS_QUERY_TIMEOUT_MS = 5000
#: An upstream DNS attempt longer than this is a configuration mistake, not patience.
MAX_DNS_QUERY_TIMEOUT_MS = 60_000
DEFAULT_INTERCEPTED_PORTS = (443,)
DEFAULT_BIND = "127.0.0.1"
#: A max_connections above this would exhaust the host's file descriptors before the cap bit.
MAX_MAX_CONNECTIONS = 1_000_000

_ENV_VAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

#: The body formats of ``NetworkConfig.deny_response`` (SPEC "Readable denials").
DENY_RESPONSE_FORMATS = ("text", "json")


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)


def _opt_bool(value: object, path: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise ConfigError(path, f"{value!r} is not true or false")


def _tuple(value: object, path: str) -> tuple[Any, ...]:
    if type(value) is tuple:  # the common cases first: no ABC check for them
        return value
    if type(value) is list:
        return tuple(value)
    if value is None:
        return ()
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ConfigError(path, f"{value!r} is not a list")
    return tuple(value)


def _nested(kind: type[Any], value: object, path: str) -> Any:
    """``value`` as an instance of ``kind``: already one, or a dict of its fields."""
    if isinstance(value, kind):
        return value
    if isinstance(value, Mapping):
        try:
            return kind.from_dict(value)
        except ConfigError as exc:
            raise exc.under(path) from None
    raise ConfigError(path, f"expected {kind.__name__} or an object, got {type(value).__name__}")


def _reject_unknown(kind: type[Any], data: Mapping[str, Any]) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(
            "", f"expected a JSON object for {kind.__name__}, got {type(data).__name__}"
        )
    names = _FIELD_NAMES.get(kind)
    if names is None:
        names = _FIELD_NAMES[kind] = frozenset(f.name for f in dataclasses.fields(kind))
    for key in data:
        if key not in names:
            raise ConfigError(str(key), f"unknown field of {kind.__name__}")


#: Each config type's field names, read once: a 10,000-rule policy asks 10,000 times.
_FIELD_NAMES: dict[type[Any], frozenset[str]] = {}


def _from_dict(kind: type[Any], data: Mapping[str, Any]) -> Any:
    _reject_unknown(kind, data)
    return kind(**dict(data))


@dataclass(frozen=True)
class PolicyRule:
    """One firewall rule; rules are evaluated first-match-wins per direction.

    ``protocol`` (legacy, one) and ``protocols`` merge, as do ``port`` and ``ports``; empty
    means any. Ingress rules carrying ICMP are rejected: the host has no inbound ICMP path.
    A rule of direction ``any`` with ICMP is accepted; its ingress half can never match
    (``corral policy check`` says so).
    """

    action: PolicyAction | str
    destination: str = "*"
    direction: PolicyDirection | str = PolicyDirection.EGRESS
    protocol: PolicyProtocol | str | None = None
    protocols: Sequence[PolicyProtocol | str] = ()
    port: str | None = None
    ports: Sequence[str] = ()

    def __post_init__(self) -> None:
        # object.__setattr__ without the wrapper call: ten per rule, 10,000 rules a policy.
        put = object.__setattr__
        put(self, "action", coerce_enum(PolicyAction, self.action, "action"))
        put(
            self, "direction", coerce_enum(PolicyDirection, self.direction or "egress", "direction")
        )
        target = parse_destination(self.destination, "destination")
        put(self, "destination", target.value)
        put(self, "_target", target)
        protocol = self.protocol
        if protocol == "":
            protocol = None
        if protocol is not None:
            protocol = coerce_enum(PolicyProtocol, protocol, "protocol")
        put(self, "protocol", protocol)
        protos = tuple(
            coerce_enum(PolicyProtocol, p, f"protocols[{i}]")
            for i, p in enumerate(_tuple(self.protocols, "protocols"))
        )
        put(self, "protocols", protos)
        port = self.port
        if port == "":
            port = None
        if isinstance(port, int) and not isinstance(port, bool):
            port = str(port)
        ranges: list[tuple[int, int]] = []
        if port is not None:
            ranges.append(parse_port_spec(port, "port"))
            port = format_port_spec(*ranges[-1])
        put(self, "port", port)
        normalized_ports = []
        for i, p in enumerate(_tuple(self.ports, "ports")):
            rng = parse_port_spec(p, f"ports[{i}]")
            ranges.append(rng)
            normalized_ports.append(format_port_spec(*rng))
        put(self, "ports", tuple(normalized_ports))
        put(self, "_port_ranges", tuple(sorted(set(ranges))))
        all_protos = frozenset(protos) | ({protocol} if protocol is not None else set())
        put(self, "_protocol_set", all_protos)
        if self.direction == PolicyDirection.INGRESS:
            for i, p in enumerate(protos):
                if p.is_icmp:
                    raise ConfigError(
                        f"protocols[{i}]",
                        f"{p.value} cannot be used in an ingress rule (the host has no inbound "
                        "ICMP path; use direction 'egress')",
                    )
            if protocol is not None and protocol.is_icmp:
                raise ConfigError(
                    "protocol",
                    f"{protocol.value} cannot be used in an ingress rule (the host has no "
                    "inbound ICMP path; use direction 'egress')",
                )

    # The parsed views the policy engine works on (computed once, at construction).
    @property
    def target(self) -> Destination:
        return self._target  # type: ignore[attr-defined,no-any-return]

    @property
    def protocol_set(self) -> frozenset[PolicyProtocol]:
        """Every protocol the rule names (``protocol`` + ``protocols``); empty = any."""
        return self._protocol_set  # type: ignore[attr-defined,no-any-return]

    @property
    def port_ranges(self) -> tuple[tuple[int, int], ...]:
        """Every port range the rule names (``port`` + ``ports``), sorted; empty = any."""
        return self._port_ranges  # type: ignore[attr-defined,no-any-return]

    def applies_to(self, direction: PolicyDirection) -> bool:
        return self.direction in (direction, PolicyDirection.ANY)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"action": str(self.action), "direction": str(self.direction)}
        out["destination"] = self.destination
        if self.protocol is not None:
            out["protocol"] = str(self.protocol)
        if self.protocols:
            out["protocols"] = [str(p) for p in self.protocols]
        if self.port is not None:
            out["port"] = self.port
        if self.ports:
            out["ports"] = list(self.ports)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PolicyRule:
        _reject_unknown(cls, data)
        if "action" not in data:
            raise ConfigError("action", "is required ('allow' or 'deny')")
        return cls(**dict(data))


@dataclass(frozen=True)
class DNSConfig:
    """The sandbox's DNS interceptor: rebind protection, upstream resolvers, timeout."""

    rebind_protection: bool | None = None
    nameservers: Sequence[str] = ()
    query_timeout_ms: int | None = None

    def __post_init__(self) -> None:
        _set(self, "rebind_protection", _opt_bool(self.rebind_protection, "rebind_protection"))
        servers = _tuple(self.nameservers, "nameservers")
        for i, ns in enumerate(servers):
            parse_hostport(ns, f"nameservers[{i}]", default_port=DNS_PORT)
        _set(self, "nameservers", tuple(s.strip() for s in servers))
        t = self.query_timeout_ms
        if t is not None and (
            isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= MAX_DNS_QUERY_TIMEOUT_MS
        ):
            raise ConfigError(
                "query_timeout_ms", f"{t!r} is not a timeout in ms (1-{MAX_DNS_QUERY_TIMEOUT_MS})"
            )

    @property
    def effective_query_timeout_ms(self) -> int:
        return (
            self.query_timeout_ms
            if self.query_timeout_ms is not None
            else DEFAULT_DNS_QUERY_TIMEOUT_MS
        )

    def upstreams(self) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
        """The nameservers as (address, port), in order."""
        return [
            parse_hostport(ns, "nameservers", default_port=DNS_PORT) for ns in self.nameservers
        ]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.rebind_protection is not None:
            out["rebind_protection"] = self.rebind_protection
        if self.nameservers:
            out["nameservers"] = list(self.nameservers)
        if self.query_timeout_ms is not None:
            out["query_timeout_ms"] = self.query_timeout_ms
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DNSConfig:
        return _from_dict(cls, data)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class TLSConfig:
    """Transparent TLS interception. Paths are checked when the sandbox is created."""

    bypass: Sequence[str] = ()
    verify_upstream: bool | None = None
    intercepted_ports: Sequence[int] = ()
    block_quic: bool | None = None
    ca_cert: str | None = None
    ca_key: str | None = None
    upstream_ca_certs: Sequence[str] = ()

    def __post_init__(self) -> None:
        _set(
            self,
            "bypass",
            tuple(
                parse_host_pattern(p, f"bypass[{i}]")
                for i, p in enumerate(_tuple(self.bypass, "bypass"))
            ),
        )
        _set(self, "verify_upstream", _opt_bool(self.verify_upstream, "verify_upstream"))
        ports = tuple(
            parse_port(p, f"intercepted_ports[{i}]")
            for i, p in enumerate(_tuple(self.intercepted_ports, "intercepted_ports"))
        )
        seen: set[int] = set()
        for i, p in enumerate(ports):
            if p in seen:
                raise ConfigError(f"intercepted_ports[{i}]", f"port {p} is listed twice")
            seen.add(p)
        _set(self, "intercepted_ports", ports)
        _set(self, "block_quic", _opt_bool(self.block_quic, "block_quic"))
        for name in ("ca_cert", "ca_key"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise ConfigError(name, f"{v!r} is not a file path")
        if (self.ca_cert is None) != (self.ca_key is None):
            given, missing = ("ca_cert", "ca_key") if self.ca_key is None else ("ca_key", "ca_cert")
            raise ConfigError(
                missing, f"is required when {given} is set (a CA is a certificate and its key)"
            )
        certs = _tuple(self.upstream_ca_certs, "upstream_ca_certs")
        for i, c in enumerate(certs):
            if not isinstance(c, str) or not c.strip():
                raise ConfigError(f"upstream_ca_certs[{i}]", f"{c!r} is not a file path")
        _set(self, "upstream_ca_certs", certs)

    @property
    def effective_intercepted_ports(self) -> tuple[int, ...]:
        return self.intercepted_ports or DEFAULT_INTERCEPTED_PORTS  # type: ignore[return-value]

    @property
    def effective_verify_upstream(self) -> bool:
        return self.verify_upstream is not False

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.bypass:
            out["bypass"] = list(self.bypass)
        if self.verify_upstream is not None:
            out["verify_upstream"] = self.verify_upstream
        if self.intercepted_ports:
            out["intercepted_ports"] = list(self.intercepted_ports)
        if self.block_quic is not None:
            out["block_quic"] = self.block_quic
        if self.ca_cert is not None:
            out["ca_cert"] = self.ca_cert
        if self.ca_key is not None:
            out["ca_key"] = self.ca_key
        if self.upstream_ca_certs:
            out["upstream_ca_certs"] = list(self.upstream_ca_certs)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TLSConfig:
        return _from_dict(cls, data)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class PortBinding:
    """A published port: ``bind:host_port`` on the host forwards to ``guest_port``.

    ``host_port=0`` asks for a free port chosen by the kernel when the sandbox starts (as
    docker's ``-p 80``); ``corral port NAME`` and the sandbox's state show which.
    """

    bind: str = DEFAULT_BIND
    host_port: int = 0
    guest_port: int = 0
    protocol: PortProtocol | str = PortProtocol.TCP

    def __post_init__(self) -> None:
        bind = self.bind if self.bind not in (None, "") else DEFAULT_BIND
        _set(self, "bind", str(parse_ip(str(bind).strip("[]"), "bind")))
        if self.host_port not in (0, "0"):
            _set(self, "host_port", parse_port(self.host_port, "host_port"))
        else:
            _set(self, "host_port", 0)
        _set(self, "guest_port", parse_port(self.guest_port, "guest_port"))
        _set(self, "protocol", coerce_enum(PortProtocol, self.protocol or "tcp", "protocol"))

    @property
    def bind_address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.bind)

    def conflicts_with(self, other: PortBinding) -> bool:
        """Two bindings that could not both listen: same protocol and port, overlapping address."""
        if self.protocol != other.protocol or self.host_port != other.host_port:
            return False
        if self.host_port == 0:
            return False  # each gets a port of its own
        a, b = self.bind_address, other.bind_address
        return a == b or a.is_unspecified or b.is_unspecified

    def to_dict(self) -> dict[str, Any]:
        return {
            "bind": self.bind,
            "host_port": self.host_port,
            "guest_port": self.guest_port,
            "protocol": str(self.protocol),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PortBinding:
        return _from_dict(cls, data)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class SecretEntry:
    """A secret whose real value never enters the sandbox (SPEC "Secrets and violations").

    The guest sees ``placeholder`` in ``env_var``; on intercepted traffic to one of
    ``allowed_hosts`` (exact names or ``*.suffix``) the placeholder is replaced by the value.
    The value is given directly (``value``) or read from the host's environment variable
    ``from_env`` when the sandbox is created. ``allow_placeholder_for`` names hosts (same
    patterns) that may receive the placeholder unchanged: it is inert there (no value is put
    in) and audited, for hosts that legitimately see the agent's text, such as an LLM API
    reading a transcript that mentions ``$GITHUB_TOKEN``.
    """

    PLACEHOLDER_PREFIX: ClassVar[str] = "$CORRAL_SECRET_"

    env_var: str
    value: str | None = None
    from_env: str | None = None
    placeholder: str | None = None
    allowed_hosts: Sequence[str] = ()
    on_violation: ViolationAction | str | None = None
    inject_headers: bool = True
    inject_basic_auth: bool = True
    inject_query: bool = False
    inject_body: bool = False
    allow_placeholder_for: Sequence[str] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.env_var, str) or not _ENV_VAR_RE.match(self.env_var):
            raise ConfigError("env_var", f"{self.env_var!r} is not an environment variable name")
        if (self.value is None) == (self.from_env is None):
            raise ConfigError("value", "give exactly one of value and from_env")
        if self.from_env is not None and not _ENV_VAR_RE.match(str(self.from_env)):
            raise ConfigError("from_env", f"{self.from_env!r} is not an environment variable name")
        if self.value is not None and (not isinstance(self.value, str) or not self.value):
            raise ConfigError("value", "must be a non-empty string")
        placeholder = self.placeholder
        if placeholder is None:
            placeholder = f"{self.PLACEHOLDER_PREFIX}{self.env_var}"
        if not isinstance(placeholder, str) or len(placeholder) < 8:
            raise ConfigError(
                "placeholder", f"{placeholder!r} is too short to be found reliably (8+ characters)"
            )
        if self.value is not None and (placeholder in self.value or self.value in placeholder):
            raise ConfigError(
                "placeholder", "must not contain, or be contained in, the secret's value"
            )
        _set(self, "placeholder", placeholder)
        hosts = _tuple(self.allowed_hosts, "allowed_hosts")
        if not hosts:
            raise ConfigError("allowed_hosts", "a secret needs at least one allowed host")
        _set(
            self,
            "allowed_hosts",
            tuple(parse_host_pattern(h, f"allowed_hosts[{i}]") for i, h in enumerate(hosts)),
        )
        _set(
            self,
            "allow_placeholder_for",
            tuple(
                parse_host_pattern(h, f"allow_placeholder_for[{i}]")
                for i, h in enumerate(_tuple(self.allow_placeholder_for, "allow_placeholder_for"))
            ),
        )
        if self.on_violation is not None:
            _set(
                self,
                "on_violation",
                coerce_enum(ViolationAction, self.on_violation, "on_violation"),
            )
        for name in ("inject_headers", "inject_basic_auth", "inject_query", "inject_body"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"{getattr(self, name)!r} is not true or false")

    def __repr__(self) -> str:  # never print a secret's value
        shown = "<redacted>" if self.value is not None else None
        return (
            f"SecretEntry(env_var={self.env_var!r}, value={shown!r}, from_env={self.from_env!r}, "
            f"placeholder={self.placeholder!r}, allowed_hosts={self.allowed_hosts!r})"
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"env_var": self.env_var}
        if self.value is not None:
            out["value"] = self.value
        if self.from_env is not None:
            out["from_env"] = self.from_env
        out["placeholder"] = self.placeholder
        out["allowed_hosts"] = list(self.allowed_hosts)
        if self.on_violation is not None:
            out["on_violation"] = str(self.on_violation)
        for name in ("inject_headers", "inject_basic_auth", "inject_query", "inject_body"):
            out[name] = getattr(self, name)
        if self.allow_placeholder_for:
            out["allow_placeholder_for"] = list(self.allow_placeholder_for)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SecretEntry:
        return _from_dict(cls, data)  # type: ignore[no-any-return]


def validate_secrets(secrets: Iterable[SecretEntry | Mapping[str, Any]]) -> tuple[SecretEntry, ...]:
    """The secrets of one sandbox, checked together: env vars and placeholders must not collide.

    A placeholder that contains another would make replacement ambiguous, so it is refused.
    """
    out: list[SecretEntry] = []
    for i, s in enumerate(secrets):
        entry = _nested(SecretEntry, s, f"secrets[{i}]")
        for j, prev in enumerate(out):
            if prev.env_var == entry.env_var:
                raise ConfigError(
                    f"secrets[{i}].env_var", f"{entry.env_var!r} is also secrets[{j}]'s"
                )
            a, b = str(prev.placeholder), str(entry.placeholder)
            if a in b or b in a:
                raise ConfigError(
                    f"secrets[{i}].placeholder",
                    f"{b!r} collides with secrets[{j}]'s placeholder {a!r}",
                )
        out.append(entry)
    return tuple(out)


@dataclass(frozen=True)
class NetworkConfig:
    """A sandbox's whole network stack (the reference's NetworkConfig).

    Defaults: egress deny and ingress allow unless a preset or the field says otherwise;
    with both ``policy`` and ``rules``, the preset's rules come first. An explicit
    ``default_egress``/``default_ingress`` wins over the preset's. ``deny_response``
    (corral's own, default off) answers an HTTP request refused by default egress with a 403
    whose body ("text" or "json") names the host and how to allow it.
    """

    policy: NetworkPolicyPreset | str | None = None
    rules: Sequence[PolicyRule] = ()
    default_egress: PolicyAction | str | None = None
    default_ingress: PolicyAction | str | None = None
    deny_domains: Sequence[str] = ()
    deny_domain_suffixes: Sequence[str] = ()
    dns: DNSConfig | None = None
    dns_rebind_protection: bool | None = None
    tls: TLSConfig | None = None
    ports: Mapping[int, int] = field(default_factory=dict)
    port_bindings: Sequence[PortBinding] = ()
    ipv4_pool: str = DEFAULT_IPV4_POOL
    ipv6_pool: str = DEFAULT_IPV6_POOL
    max_connections: int | None = None
    on_secret_violation: ViolationAction | str | None = None
    trust_host_cas: bool | None = None
    deny_response: str | None = None

    def __post_init__(self) -> None:
        if self.policy is not None and self.policy != "":
            _set(self, "policy", coerce_enum(NetworkPolicyPreset, self.policy, "policy"))
        else:
            _set(self, "policy", None)
        # Each rule is a few containers, none in a cycle: the full collections that
        # 10,000 rules' allocations trigger would walk them all (a third of the parse).
        collecting = gc.isenabled()
        gc.disable()
        try:
            rules = [
                _nested(PolicyRule, r, f"rules[{i}]")
                for i, r in enumerate(_tuple(self.rules, "rules"))
            ]
        finally:
            if collecting:
                gc.enable()
        _set(self, "rules", tuple(rules))
        for name in ("default_egress", "default_ingress"):
            v = getattr(self, name)
            _set(self, name, None if v in (None, "") else coerce_enum(PolicyAction, v, name))
        _set(
            self,
            "deny_domains",
            tuple(
                normalize_domain(d, f"deny_domains[{i}]")
                for i, d in enumerate(_tuple(self.deny_domains, "deny_domains"))
            ),
        )
        _set(
            self,
            "deny_domain_suffixes",
            tuple(
                normalize_suffix(d, f"deny_domain_suffixes[{i}]")
                for i, d in enumerate(_tuple(self.deny_domain_suffixes, "deny_domain_suffixes"))
            ),
        )
        if self.dns is not None:
            _set(self, "dns", _nested(DNSConfig, self.dns, "dns"))
        _set(
            self,
            "dns_rebind_protection",
            _opt_bool(self.dns_rebind_protection, "dns_rebind_protection"),
        )
        if self.tls is not None:
            _set(self, "tls", _nested(TLSConfig, self.tls, "tls"))
        self._check_ports()
        v4 = parse_cidr(self.ipv4_pool, "ipv4_pool")
        if not isinstance(v4, ipaddress.IPv4Network) or v4.prefixlen > 30:
            raise ConfigError(
                "ipv4_pool", f"{self.ipv4_pool!r} must be an IPv4 CIDR of /30 or larger"
            )
        v6 = parse_cidr(self.ipv6_pool, "ipv6_pool")
        if not isinstance(v6, ipaddress.IPv6Network) or v6.prefixlen > 64:
            raise ConfigError(
                "ipv6_pool", f"{self.ipv6_pool!r} must be an IPv6 CIDR of /64 or larger"
            )
        _set(self, "ipv4_pool", str(v4))
        _set(self, "ipv6_pool", str(v6))
        mc = self.max_connections
        if mc is not None and (
            isinstance(mc, bool) or not isinstance(mc, int) or not 1 <= mc <= MAX_MAX_CONNECTIONS
        ):
            raise ConfigError("max_connections", f"{mc!r} is not a count (1-{MAX_MAX_CONNECTIONS})")
        if self.on_secret_violation not in (None, ""):
            _set(
                self,
                "on_secret_violation",
                coerce_enum(ViolationAction, self.on_secret_violation, "on_secret_violation"),
            )
        else:
            _set(self, "on_secret_violation", None)
        _set(self, "trust_host_cas", _opt_bool(self.trust_host_cas, "trust_host_cas"))
        dr = self.deny_response
        if dr in (None, ""):
            dr = None
        elif not isinstance(dr, str) or dr.strip().lower() not in DENY_RESPONSE_FORMATS:
            raise ConfigError(
                "deny_response", f"{dr!r} is not 'text' or 'json' (leave it unset for no body)"
            )
        else:
            dr = dr.strip().lower()
        _set(self, "deny_response", dr)

    def _check_ports(self) -> None:
        if not isinstance(self.ports, Mapping):
            raise ConfigError(
                "ports", f"expected a mapping of host port to guest port, got {self.ports!r}"
            )
        ports: dict[int, int] = {}
        for host, guest in self.ports.items():
            hp = 0 if host in (0, "0") else parse_port(host, f"ports[{host!r}]")  # 0: random
            ports[hp] = parse_port(guest, f"ports[{host!r}]")
        _set(self, "ports", ports)
        bindings = tuple(
            _nested(PortBinding, b, f"port_bindings[{i}]")
            for i, b in enumerate(_tuple(self.port_bindings, "port_bindings"))
        )
        _set(self, "port_bindings", bindings)
        seen: list[tuple[str, PortBinding]] = []
        for where, b in self._all_bindings_with_paths():
            for other_where, other in seen:
                if b.conflicts_with(other):
                    raise ConfigError(
                        where,
                        f"{b.protocol} port {b.bind}:{b.host_port} is already published by {other_where}",
                    )
            seen.append((where, b))
        if self.policy == NetworkPolicyPreset.NONE and seen:
            raise ConfigError(
                seen[0][0], "policy 'none' has no network interface, so no port can be published"
            )

    def _all_bindings_with_paths(self) -> list[tuple[str, PortBinding]]:
        out = [
            (f"ports[{h}]", PortBinding(host_port=h, guest_port=g)) for h, g in self.ports.items()
        ]
        out += [(f"port_bindings[{i}]", b) for i, b in enumerate(self.port_bindings)]
        return out

    # -- effective values -------------------------------------------------------------------
    @property
    def is_offline(self) -> bool:
        """Preset ``none``: no network interface at all."""
        return self.policy == NetworkPolicyPreset.NONE

    @property
    def all_port_bindings(self) -> tuple[PortBinding, ...]:
        """``ports`` (TCP on 127.0.0.1) and ``port_bindings`` as one list."""
        return tuple(b for _, b in self._all_bindings_with_paths())

    @property
    def effective_rebind_protection(self) -> bool:
        """``dns.rebind_protection`` wins over the legacy field; on unless either says off."""
        if isinstance(self.dns, DNSConfig) and self.dns.rebind_protection is not None:
            return self.dns.rebind_protection
        if self.dns_rebind_protection is not None:
            return self.dns_rebind_protection
        return True

    @property
    def effective_max_connections(self) -> int:
        return self.max_connections if self.max_connections is not None else DEFAULT_MAX_CONNECTIONS

    @property
    def effective_on_secret_violation(self) -> ViolationAction:
        v = self.on_secret_violation
        return v if isinstance(v, ViolationAction) else ViolationAction.BLOCK_AND_LOG

    @property
    def tls_enabled(self) -> bool:
        """TLS interception is on when ``tls`` is set (secrets also turn it on; see the SDK)."""
        return self.tls is not None

    def merged_ports(
        self,
        ports: Mapping[int, int] | None = None,
        ports_udp: Mapping[int, int] | None = None,
        port_bindings: Iterable[PortBinding | Mapping[str, Any]] | None = None,
    ) -> NetworkConfig:
        """This config with the SDK's ``ports=``/``ports_udp=``/``port_bindings=`` merged in.

        Like WithPorts/WithPortsUDP, later maps merge into earlier ones (a host port given
        again takes the new guest port); UDP ports become 127.0.0.1 port bindings.
        """
        merged = dict(self.ports)
        merged.update(ports or {})
        bindings = list(self.port_bindings)
        for h, g in (ports_udp or {}).items():
            bindings = [
                b
                for b in bindings
                if not (
                    b.protocol == PortProtocol.UDP
                    and b.host_port == h
                    and h != 0
                    and b.bind == DEFAULT_BIND
                )
            ]
            bindings.append(PortBinding(host_port=h, guest_port=g, protocol=PortProtocol.UDP))
        bindings.extend(
            _nested(PortBinding, b, f"port_bindings[{i}]")
            for i, b in enumerate(port_bindings or ())
        )
        return dataclasses.replace(self, ports=merged, port_bindings=tuple(bindings))

    # -- wire format (SPEC section 3) -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The wire form: unset (None) and empty fields are left out; they read back the same."""
        out: dict[str, Any] = {}
        if self.policy is not None:
            out["policy"] = str(self.policy)
        if self.rules:
            out["rules"] = [r.to_dict() for r in self.rules]
        for name in ("default_egress", "default_ingress", "on_secret_violation"):
            v = getattr(self, name)
            if v is not None:
                out[name] = str(v)
        if self.deny_domains:
            out["deny_domains"] = list(self.deny_domains)
        if self.deny_domain_suffixes:
            out["deny_domain_suffixes"] = list(self.deny_domain_suffixes)
        if self.dns is not None:
            out["dns"] = self.dns.to_dict()
        if self.dns_rebind_protection is not None:
            out["dns_rebind_protection"] = self.dns_rebind_protection
        if self.tls is not None:
            out["tls"] = self.tls.to_dict()
        if self.ports:
            out["ports"] = {str(h): g for h, g in sorted(self.ports.items())}
        if self.port_bindings:
            out["port_bindings"] = [b.to_dict() for b in self.port_bindings]
        if self.ipv4_pool != DEFAULT_IPV4_POOL:
            out["ipv4_pool"] = self.ipv4_pool
        if self.ipv6_pool != DEFAULT_IPV6_POOL:
            out["ipv6_pool"] = self.ipv6_pool
        if self.max_connections is not None:
            out["max_connections"] = self.max_connections
        if self.trust_host_cas is not None:
            out["trust_host_cas"] = self.trust_host_cas
        if self.deny_response is not None:
            out["deny_response"] = self.deny_response
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NetworkConfig:
        _reject_unknown(cls, data)
        kwargs = dict(data)
        if "ports" in kwargs and isinstance(kwargs["ports"], Mapping):
            ports: dict[int, int] = {}
            for k, v in kwargs["ports"].items():
                ports[0 if k in (0, "0") else parse_port(k, f"ports[{k!r}]")] = v
            kwargs["ports"] = ports
        for key in ("ipv4_pool", "ipv6_pool"):
            if kwargs.get(key) is None:
                kwargs.pop(key, None)
        return cls(**kwargs)

    def to_json(self, *, indent: int | None = 2) -> str:
        import json

        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> NetworkConfig:
        import json

        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError("", f"not valid JSON: {exc}") from None
        return cls.from_dict(data)


class NetworkPolicy:
    """Factory of preset configs, as the reference's ``NetworkPolicy`` namespace."""

    @staticmethod
    def public_only() -> NetworkConfig:
        """Public internet only; private, loopback, link-local, metadata, host are blocked."""
        return NetworkConfig(policy=NetworkPolicyPreset.PUBLIC_ONLY)

    @staticmethod
    def none() -> NetworkConfig:
        """No network interface at all; exec and files still work."""
        return NetworkConfig(policy=NetworkPolicyPreset.NONE)

    @staticmethod
    def allow_all() -> NetworkConfig:
        """Everything, including private addresses and the host."""
        return NetworkConfig(policy=NetworkPolicyPreset.ALLOW_ALL)

    @staticmethod
    def non_local() -> NetworkConfig:
        """Public plus private/LAN; loopback, link-local, metadata and host blocked."""
        return NetworkConfig(policy=NetworkPolicyPreset.NON_LOCAL)
