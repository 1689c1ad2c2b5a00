"""corral: Linux sandboxes for untrusted code, with a programmable host-side network.

The public names are imported lazily (PEP 562): the per-sandbox supervisor imports
``corral.runtime...`` on every ``create``, and importing this package must not drag the SDK,
asyncio and the config model into its start-up (see docs/sdk.md, "Start-up time").
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from corral.config import (
        ConfigError,
        DNSConfig,
        NetworkConfig,
        NetworkPolicy,
        PolicyRule,
        PortBinding,
        SecretEntry,
        TLSConfig,
    )
    from corral.errors import (
        CorralError,
        ImageError,
        NetworkError,
        SandboxError,
        SandboxExists,
        SandboxNotFound,
    )
    from corral.sdk.sandbox import ExecResult, ExecStream, Sandbox, SandboxFs

#: Public name -> module that defines it.
_EXPORTS = {
    "Sandbox": "corral.sdk.sandbox",
    "ExecResult": "corral.sdk.sandbox",
    "ExecStream": "corral.sdk.sandbox",
    "SandboxFs": "corral.sdk.sandbox",
    "NetworkConfig": "corral.config",
    "NetworkPolicy": "corral.config",
    "PolicyRule": "corral.config",
    "PortBinding": "corral.config",
    "SecretEntry": "corral.config",
    "DNSConfig": "corral.config",
    "TLSConfig": "corral.config",
    "ConfigError": "corral.errors",
    "CorralError": "corral.errors",
    "ImageError": "corral.errors",
    "NetworkError": "corral.errors",
    "SandboxError": "corral.errors",
    "SandboxExists": "corral.errors",
    "SandboxNotFound": "corral.errors",
}

__all__ = [
    "ConfigError",
    "CorralError",
    "DNSConfig",
    "ExecResult",
    "ExecStream",
    "ImageError",
    "NetworkConfig",
    "NetworkError",
    "NetworkPolicy",
    "PolicyRule",
    "PortBinding",
    "Sandbox",
    "SandboxError",
    "SandboxExists",
    "SandboxFs",
    "SandboxNotFound",
    "SecretEntry",
    "TLSConfig",
]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'corral' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
