"""Audit events of a sandbox's network: one JSON object per line in ``<state_dir>/net-audit.jsonl``.

Denials are always written; allows only when the supervisor asks (they can be many). Lines are
written with one ``write`` on an ``O_APPEND`` descriptor, so a reader never sees half an event
from this writer, and readers (``corral logs --net``, the SDK) tail the file with
:func:`follow`. Writes are synchronous: a line is a few hundred bytes into the page cache, far
cheaper than a thread hop, and an event must not be lost when the supervisor is killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path

#: File name of the audit log inside the sandbox's state directory.
AUDIT_FILE = "net-audit.jsonl"

#: How often :func:`follow` looks for new lines when it has reached the end of the file: a
#: person watching ``corral logs --net -f`` does not notice 200 ms, and polling costs nothing.
FOLLOW_POLL_SECONDS = 0.2


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One decided flow (SPEC "Audit")."""

    time: float
    sandbox: str
    direction: str  # egress | ingress
    protocol: str  # tcp | udp | icmpv4 | icmpv6
    source: str
    destination: str
    port: int | None
    names: list[str]
    rule: int | None  # index in the expanded rule list; None = the direction's default
    action: str  # allow | deny
    reason: str
    #: The name the connection itself revealed (TLS SNI, HTTP Host, :authority), when it was
    #: read (``names`` are the names the sandbox's DNS pinned to the destination).
    revealed: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> AuditEvent:
        data = json.loads(line)
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})


class AuditLog:
    """Appends events of one sandbox to its audit file."""

    def __init__(self, sandbox: str, state_dir: Path, *, log_allowed: bool = False) -> None:
        self.sandbox = sandbox
        self.path = state_dir / AUDIT_FILE
        self.log_allowed = log_allowed
        state_dir.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(
            self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
        )

    def record(
        self,
        *,
        direction: str,
        protocol: str,
        source: str,
        destination: str,
        port: int | None,
        action: str,
        reason: str,
        rule: int | None = None,
        names: list[str] | None = None,
        revealed: str | None = None,
    ) -> None:
        """Write the event if it is a denial, or an allow and allows are logged."""
        if self._fd is None or (action == "allow" and not self.log_allowed):
            return
        event = AuditEvent(
            time=time.time(),
            sandbox=self.sandbox,
            direction=direction,
            protocol=protocol,
            source=source,
            destination=destination,
            port=port,
            names=names or [],
            rule=rule,
            action=action,
            reason=reason,
            revealed=revealed,
        )
        os.write(self._fd, (event.to_json() + "\n").encode())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_events(path: Path) -> list[AuditEvent]:
    """Every complete event in the file, oldest first.

    A torn last line (no newline yet: a write under way, or a supervisor killed in the middle
    of one) is skipped; :func:`follow` hands it over once it is whole. Bytes, not text, are
    split, so a torn multi-byte character cannot fail the decoding of the whole file.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    *complete, _torn = data.split(b"\n")
    return [AuditEvent.from_json(line.decode()) for line in complete if line.strip()]


async def follow(path: Path, *, from_start: bool = True) -> AsyncIterator[AuditEvent]:
    """Events as they are written, ``tail -f`` style; waits for the file to appear."""
    pos = 0
    pending = b""
    first = True
    while True:
        try:
            with open(path, "rb") as f:
                if first and not from_start:
                    f.seek(0, os.SEEK_END)
                    pos = f.tell()
                first = False
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
        except FileNotFoundError:
            chunk = b""
        if chunk:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.strip():
                    yield AuditEvent.from_json(line.decode())
            continue
        await asyncio.sleep(FOLLOW_POLL_SECONDS)
