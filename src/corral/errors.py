"""The exceptions corral raises.

Every error a user can cause or meet is one of these, and its message is one sentence that
names what was at fault (a config field path, a CLI flag, an image reference, a step of the
sandbox launch). The CLI prints ``str(error)`` and exits with ``error.exit_code``. Every
public subclass of :class:`CorralError` is defined here (``tests/unit/test_architecture.py``
checks; a module-private one, like ``unpack._Missing``, never leaves its module).

Other exception classes exist only inside one module or package, as signals between a
sans-I/O core and the shell around it (a parser's ``FramingError``, the launcher's ``_Fail``,
netlink's ``NetlinkError(OSError)``): the module that raises one also catches it or turns
it into one of these before it reaches a caller of corral's API.
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


class StartError(SandboxError):
    """A step of a supervisor's start failed (the message names the step); the creating SDK
    process re-raises it by this name from the supervisor's ready pipe."""


class ChannelProtocolError(SandboxError):
    """The other end of an exec/file channel sent bytes that are not a valid frame (a bug,
    or a hostile sandbox): :mod:`corral.runtime.channel_wire`."""


class ControlProtocolError(SandboxError):
    """A peer broke a supervisor's control protocol (bad JSON, oversized line, unknown op):
    :mod:`corral.runtime.control`."""


class NetworkError(CorralError):
    """The network of a sandbox could not be set up (pool full, port in use, ...)."""

    exit_code = 5


class PermissionDenied(CorralError):
    """corral needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) for this."""

    exit_code = 6
