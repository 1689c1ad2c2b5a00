"""The network configuration model (SPEC sections 2-3): types, validation, wire format.

Pure: nothing here does I/O or imports from net/runtime.
"""

from corral.config.enforcement import refuse_unsupported, unsupported
from corral.config.enums import (
    NetworkPolicyPreset,
    PolicyAction,
    PolicyDirection,
    PolicyProtocol,
    PortProtocol,
    ViolationAction,
)
from corral.config.network import (
    DEFAULT_DNS_QUERY_TIMEOUT_MS,
    DEFAULT_INTERCEPTED_PORTS,
    DEFAULT_IPV4_POOL,
    DEFAULT_IPV6_POOL,
    DEFAULT_MAX_CONNECTIONS,
    DNS_PORT,
    DNSConfig,
    NetworkConfig,
    NetworkPolicy,
    PolicyRule,
    PortBinding,
    SecretEntry,
    TLSConfig,
    validate_secrets,
)
from corral.config.shorthand import parse_publish, parse_rule, parse_secret
from corral.config.values import Destination, DestinationKind, Group
from corral.errors import ConfigError

__all__ = [
    "DEFAULT_DNS_QUERY_TIMEOUT_MS",
    "DEFAULT_INTERCEPTED_PORTS",
    "DEFAULT_IPV4_POOL",
    "DEFAULT_IPV6_POOL",
    "DEFAULT_MAX_CONNECTIONS",
    "DNS_PORT",
    "ConfigError",
    "DNSConfig",
    "Destination",
    "DestinationKind",
    "Group",
    "NetworkConfig",
    "NetworkPolicy",
    "NetworkPolicyPreset",
    "PolicyAction",
    "PolicyDirection",
    "PolicyProtocol",
    "PolicyRule",
    "PortBinding",
    "PortProtocol",
    "SecretEntry",
    "TLSConfig",
    "ViolationAction",
    "parse_publish",
    "parse_rule",
    "parse_secret",
    "refuse_unsupported",
    "unsupported",
    "validate_secrets",
]
