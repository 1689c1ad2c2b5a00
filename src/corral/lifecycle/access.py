"""Reaching into a running sandbox: its init's channel (exec, files, trees), its audit log.

Exec and file operations go from the SDK and the CLI straight to the sandbox init's channel
socket (:mod:`corral.runtime.channel`), not through the supervisor; audit events are read from
the sandbox's ``net-audit.jsonl`` (:mod:`corral.net.audit`) by the reader itself. This module
is where the SDK and the CLI get those parts (docs/design.md, "Layers"): the channel's
client and its types are runtime's own classes, named here; the tree copy and the audit
reader are imported only when used (they are not on the SDK's import path otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO

from corral.runtime.channel import ChannelClient, ExecProcess, FileInfo
from corral.runtime.channel_wire import DEFAULT_TERMINAL_SIZE
from corral.runtime.volumes import Volume, check_volumes

__all__ = [
    "DEFAULT_TERMINAL_SIZE", "ChannelClient", "ExecProcess", "FileInfo", "Volume", "audit_events",
    "check_volumes", "follow_audit", "receive_tree", "send_tree", "tar_from", "tar_to",
]  # fmt: skip


async def send_tree(
    client: ChannelClient, source: Path, parent: str, name: str | None, *, archive: bool
) -> None:
    """Copy the host tree ``source`` into the sandbox directory ``parent`` (as ``name``)."""
    from corral.runtime import tree_copy

    await tree_copy.send_tree(client, source, parent, name, archive=archive)


async def receive_tree(
    client: ChannelClient, path: str, parent: Path, name: str | None, *, archive: bool
) -> None:
    """Copy the sandbox tree ``path`` to the host as ``parent / name``."""
    from corral.runtime import tree_copy

    await tree_copy.receive_tree(client, path, parent, name, archive=archive)


async def tar_to(client: ChannelClient, src: str, out: BinaryIO) -> None:
    """The raw tar stream of the sandbox's ``src`` into ``out`` (as the sandbox wrote it: not
    checked, not extracted; ``corral cp NAME:SRC -``)."""
    from corral.runtime import tree_copy

    name = posixpath.basename(src.rstrip("/")) or "root"
    async with contextlib.aclosing(tree_copy.tar_out(client, src, name)) as chunks:
        async for body in chunks:
            out.write(body)
    out.flush()


async def tar_from(client: ChannelClient, fd: int, dst: str) -> None:
    """Extract a tar stream read from descriptor ``fd`` into the sandbox directory ``dst``
    (``corral cp - NAME:DST``); the sandbox's init checks every member."""
    from corral.runtime.channel_wire import (
        KIND_FILE,
        MAX_DATA_SIZE,
        encode_control,
        encode_data,
        error_from_reply,
    )

    async with client._lease() as conn:
        await conn.send(encode_control({"op": "tar_in", "path": dst}))
        reply = await conn.recv_control()
        if reply.get("t") == "error":
            raise error_from_reply(reply)
        while chunk := await asyncio.to_thread(os.read, fd, MAX_DATA_SIZE):
            await conn.send(encode_data(KIND_FILE, chunk))
        await conn.send(encode_data(KIND_FILE, b""))
        reply = await conn.recv_control()
    if reply.get("t") == "error":
        raise error_from_reply(reply)


def _audit_path(directory: Path) -> Path:
    from corral.net import audit

    return directory / audit.AUDIT_FILE


async def audit_events(directory: Path) -> list[Any]:
    """The audit events (``corral.net.audit.AuditEvent``) of the sandbox in ``directory``
    so far, oldest first (read in a thread)."""
    from corral.net import audit

    return await asyncio.to_thread(audit.read_events, _audit_path(directory))


def follow_audit(directory: Path) -> AsyncIterator[Any]:
    """Its audit events from the first, then each new one as it is written (never ends)."""
    from corral.net import audit

    return audit.follow(_audit_path(directory)).__aiter__()

