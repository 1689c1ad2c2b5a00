"""How secret values get from the creating process into the supervisor's memory, and no further.

state.json holds each secret's settings (env var, placeholder, hosts, actions) but never its
value. The creating process writes the values into a hand-off file in the sandbox's state
directory (mode 0600, created exclusively, in a directory only root reads), just before it
spawns the supervisor; the supervisor reads it and unlinks it before it reserves the network,
so the values exist on disk only between those two moments (milliseconds) and live in the
supervisor's memory afterwards. The sandbox cannot read the state directory (it is not
mounted into the guest), and nothing else writes the values anywhere: the SecretTable's repr
redacts, audit events name secrets, and ``corral inspect`` shows names only.

Consequence (decision): a stopped sandbox with secrets cannot be started again by ``start``,
since no process holds the values any more; it says so, and the sandbox is created anew.
A descriptor handed through the fork server instead of a file would remove the on-disk
moment; that is a change to the fork-server protocol, not made here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from corral.config.enums import ViolationAction
from corral.errors import ConfigError
from corral.kernel.files import replace_file
from corral.net.secrets import SecretTable

#: The hand-off file's name in the sandbox's state directory.
HANDOFF_FILE = "secrets.handoff"

#: Largest hand-off accepted (a bound on a file the supervisor parses). Secrets are API keys
#: and tokens (< 4 KiB each; a JWT rarely exceeds 8 KiB); 1 MiB covers hundreds.
MAX_HANDOFF_BYTES = 1 << 20


def write_handoff(directory: Path, values: Mapping[str, str]) -> None:
    """Write ``values`` (env var -> value) for the supervisor about to start."""
    path = directory / HANDOFF_FILE
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        data = json.dumps(dict(values)).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def take_handoff(directory: Path) -> dict[str, str] | None:
    """Read and unlink the hand-off (None when there is none)."""
    path = directory / HANDOFF_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        os.unlink(path)
        data = os.read(fd, MAX_HANDOFF_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_HANDOFF_BYTES:
        raise ConfigError("secrets", "the secrets hand-off is larger than its bound")
    loaded = json.loads(data)
    if not isinstance(loaded, dict):
        raise ConfigError("secrets", "the secrets hand-off is not a JSON object")
    return {str(k): str(v) for k, v in loaded.items()}


def secret_table(
    entries: Sequence[Mapping[str, Any]],
    values: Mapping[str, str] | None,
    on_secret_violation: ViolationAction | str | None,
) -> SecretTable | None:
    """The sandbox's SecretTable from state.json's entries and the hand-off's values; None
    when it has no secrets. A secret without a value is a ConfigError naming it."""
    if not entries:
        return None
    full = []
    for i, entry in enumerate(entries):
        env_var = str(entry.get("env_var"))
        if values is None or env_var not in values:
            raise ConfigError(
                f"secrets[{i}]",
                f"the value of {env_var} lived only in the memory of this sandbox's previous "
                "supervisor; remove the sandbox and create it again to give it",
            )
        full.append({**entry, "value": values[env_var], "from_env": None})
    return SecretTable.from_entries(full, on_secret_violation=on_secret_violation, environ={})


#: What ``corral inspect`` shows of interception, written by the supervisor once the network
#: is reserved: the CA's fingerprint, ports, bypass patterns and secret *names* (never a
#: value, never the CA key).
TLS_SUMMARY_FILE = "tls.json"


def write_tls_summary(directory: Path, summary: Mapping[str, object]) -> None:
    replace_file(directory / TLS_SUMMARY_FILE, json.dumps(dict(summary)).encode())


def read_tls_summary(directory: Path) -> dict[str, Any] | None:
    try:
        loaded = json.loads((directory / TLS_SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None
