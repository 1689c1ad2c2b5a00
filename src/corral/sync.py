"""The blocking SDK: ``from corral.sync import Sandbox`` (see :mod:`corral.sdk.sync`)."""

from corral.sdk.sync import ExecResult, ExecStream, Sandbox, SandboxFs

__all__ = ["ExecResult", "ExecStream", "Sandbox", "SandboxFs"]
