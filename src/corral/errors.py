"""The exceptions corral raises.

Every error a user can cause or meet is one of these, and its message is one sentence that
names what was at fault (a config field path, a CLI flag, an image reference, a step of the
sandbox launch). The CLI prints ``str(error)`` and exits with ``error.exit_code``.
"""

from __future__ import annotations


class CorralError(Exception):
    """Base of every error corral raises on purpose."""

    #: Exit code the CLI uses for this kind of error (see docs/cli.md).
    exit_code = 1


class ConfigError(CorralError, ValueError):
    """A configuration value is invalid; ``path`` names the field (``rules[2].ports[0]``)."""

    exit_code = 2

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)

    def under(self, prefix: str) -> ConfigError:
        """The same error, seen from an enclosing object (``rules[2]`` + ``port``)."""
        if not self.path:
            return ConfigError(prefix, self.message)
        joiner = "" if self.path.startswith("[") else "."
        return ConfigError(f"{prefix}{joiner}{self.path}", self.message)


class ImageError(CorralError):
    """An image could not be resolved, pulled, verified or unpacked."""

    exit_code = 3


class SandboxError(CorralError):
    """A sandbox could not be created, reached, or operated on."""

    exit_code = 4


class SandboxNotFound(SandboxError):
    """No sandbox has that name."""


class SandboxExists(SandboxError):
    """A sandbox of that name already exists."""


class NetworkError(CorralError):
    """The network of a sandbox could not be set up (pool full, port in use, ...)."""

    exit_code = 5


class PermissionDenied(CorralError):
    """corral needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) for this."""

    exit_code = 6
