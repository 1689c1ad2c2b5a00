"""``corral cp``: files and directory trees between the host and a sandbox, as ``docker cp``.

    corral cp [-a] SRC NAME:DST      host -> sandbox
    corral cp [-a] NAME:SRC DST      sandbox -> host
    corral cp NAME:SRC -             the tar stream of SRC to stdout
    corral cp - NAME:DST             a tar stream from stdin, extracted into the directory DST

Where things land follows docker's rules (docs/cli.md, "cp"): a SRC ending in ``/.`` copies
the directory's contents; a DST that is an existing directory receives SRC under its own
name; otherwise DST is the new name (its parent must exist; a DST ending in ``/`` must be an
existing directory). The transfer is a tar stream over the sandbox's channel
(corral.lifecycle.access, over corral.runtime.tree_copy); ``-a`` keeps numeric owners, else what lands in the sandbox is
its root's and what lands on the host is the caller's.
"""

from __future__ import annotations

import asyncio
import os
import posixpath
import sys
from pathlib import Path
from typing import Any

import click

from corral.errors import ConfigError, SandboxError
from corral.lifecycle import sandboxes


def split_target(text: str) -> tuple[str | None, str]:
    """``("name", "/path")`` for ``name:/path``, ``(None, text)`` for a host path.

    As with docker, a host path that contains ``:`` is written with a leading ``./`` or
    ``/`` (a path starting with either is never a sandbox target).
    """
    if text.startswith(("/", ".", "~")) or ":" not in text:
        return None, text
    name, _, path = text.partition(":")
    if not sandboxes.NAME_PATTERN.fullmatch(name):
        return None, text
    return name, path or "/"


def _wants_contents(path: str) -> bool:
    return path.endswith("/.") or path == "."


@click.command("cp")
@click.option("-a", "--archive", is_flag=True, help="Keep numeric owners (uid/gid).")
@click.argument("source")
@click.argument("destination")
def cp(archive: bool, source: str, destination: str) -> None:
    """Copy files or directories between the host and a sandbox (NAME:PATH on one side)."""
    src_name, src_path = split_target(source)
    dst_name, dst_path = split_target(destination)
    if (src_name is None) == (dst_name is None):
        raise ConfigError(
            "cp", "exactly one of SOURCE and DESTINATION must be NAME:PATH (a sandbox's path)"
        )
    if dst_name is not None:
        asyncio.run(_copy_in(dst_name, src_path, dst_path, archive))
    else:
        assert src_name is not None
        asyncio.run(_copy_out(src_name, src_path, dst_path, archive))


async def _client(name: str) -> Any:
    from corral.sdk.sandbox import Sandbox

    sandbox = await Sandbox.get(name)
    return await sandbox._channel()


async def _sandbox_dir(client: Any, path: str) -> bool | None:
    """True/False: ``path`` is/is not a directory (following a final symlink, inside the
    sandbox); None: nothing is there."""
    if not await client.exists(path):
        return None
    return bool(await client.exists(path.rstrip("/") + "/."))


async def _copy_in(name: str, src: str, dst: str, archive: bool) -> None:
    from corral.lifecycle import access

    client = await _client(name)
    if src == "-":
        await access.tar_from(client, sys.stdin.fileno(), dst)
        return
    local = Path(os.path.expanduser(src))
    if not os.path.lexists(local):
        raise SandboxError(f"cp: {src} does not exist on the host")
    local_is_dir = local.is_dir() and not local.is_symlink()
    target_is_dir = await _sandbox_dir(client, dst)
    if _wants_contents(src):
        if not local_is_dir:
            raise SandboxError(f"cp: {src} is not a directory")
        if target_is_dir is None:
            await client.mkdir(dst)
        elif not target_is_dir:
            raise SandboxError(f"cp: {dst} is not a directory in sandbox {name!r}")
        await access.send_tree(client, local, dst, None, archive=archive)
    elif target_is_dir:
        await access.send_tree(client, local, dst, local.resolve().name if src in (".", "..")
                                  else local.name, archive=archive)  # fmt: skip
    elif target_is_dir is None:
        if dst.endswith("/"):
            raise SandboxError(f"cp: the directory {dst} does not exist in sandbox {name!r}")
        parent, base = posixpath.split(dst)
        await access.send_tree(client, local, parent or "/", base, archive=archive)
    else:
        if local_is_dir:
            raise SandboxError(f"cp: cannot copy the directory {src} onto the file {dst}")
        parent, base = posixpath.split(dst)
        await access.send_tree(client, local, parent or "/", base, archive=archive)


async def _copy_out(name: str, src: str, dst: str, archive: bool) -> None:
    from corral.lifecycle import access

    client = await _client(name)
    info = await client.stat(src)  # the sandbox's own sentence if it is not there
    if dst == "-":
        await access.tar_to(client, src, sys.stdout.buffer)
        return
    dest = Path(os.path.expanduser(dst))
    base = posixpath.basename(src.rstrip("/")) or "root"
    if _wants_contents(src):
        if info.kind != "dir":
            raise SandboxError(f"cp: {src} is not a directory in sandbox {name!r}")
        if not dest.exists():
            dest.mkdir()
        await access.receive_tree(client, src, dest, None, archive=archive)
    elif dest.is_dir():
        await access.receive_tree(client, src, dest, base, archive=archive)
    elif not os.path.lexists(dest):
        if dst.endswith("/"):
            raise SandboxError(f"cp: the directory {dst} does not exist on the host")
        await access.receive_tree(client, src, dest.parent, dest.name, archive=archive)
    else:
        if info.kind == "dir":
            raise SandboxError(f"cp: cannot copy the directory {src} onto the file {dst}")
        await access.receive_tree(client, src, dest.parent, dest.name, archive=archive)


def register(group: click.Group) -> None:
    group.add_command(cp)
