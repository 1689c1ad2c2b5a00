"""Which network namespace a sandbox's host side lives in, and how to get back into it.

A networked sandbox's veth, divert rules and nftables table live in the network namespace
of the code that created it (the test world's ``host``, a tool under ``ip netns exec``, a
container), not necessarily in the one ``corral gc`` later runs in. gc working in the wrong
namespace would find nothing there, and used to report removing what it never touched. So
the creator's namespace is recorded when the sandbox is made (:func:`identify`: the
``dev``/``ino`` pair of its nsfs file, which names a namespace for as long as it exists, plus
its /run/netns path when it has one), and gc looks for a way back in (:func:`locate`).

A network namespace lives as long as something refers to it: a process in it, an open
descriptor of it, or a bind mount of it (``ip netns add``). :func:`locate` tries those in
that order of cost: the recorded path, every /run/netns name, the calling thread's own
namespace, every process's ``ns/net``, every process's open descriptors. When none of them
is the namespace, it is gone, and the kernel took the links, rules and tables in it along.
Partial: a bind mount that only another mount namespace can see is not searched. Such a
namespace is alive but out of reach; gc then treats it as gone: it claims to have removed
nothing in it, but it does forget it (with the sandbox's state).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator

from corral.kernel import netns

#: Keys of a recorded namespace (SandboxState.host_netns).
DEV = "dev"
INO = "ino"
PATH = "path"

#: Names of the sandboxes' own network namespaces (net/plumbing.py names them corral-<id>).
SANDBOX_NETNS_PREFIX = "corral-"


def identity_of(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the namespace file ``path`` (:func:`corral.kernel.netns.identity`);
    None if it cannot be read."""
    try:
        return netns.identity(path)
    except OSError:
        return None


def identify(path: str = netns.THREAD_NETNS) -> dict[str, object]:
    """The record of the network namespace at ``path`` (default: the calling thread's)."""
    found = identity_of(path)
    if found is None:
        raise OSError(f"cannot read the network namespace {path}")
    record: dict[str, object] = {DEV: found[0], INO: found[1], PATH: None}
    # Sandboxes' own namespaces (corral-*) are skipped: nobody creates sandboxes from inside
    # one, and with hundreds of sandboxes the stats would add up on every create.
    for candidate in _named():
        if os.path.basename(candidate).startswith(SANDBOX_NETNS_PREFIX):
            continue
        if identity_of(candidate) == found:
            record[PATH] = candidate
            break
    return record


def matches(record: dict[str, object], found: tuple[int, int] | None) -> bool:
    """Whether ``found`` (an identity) is the namespace ``record`` names."""
    return found is not None and (record.get(DEV), record.get(INO)) == found


def fd_link_names(ino: int) -> tuple[str, ...]:
    """What ``readlink`` of a descriptor of network namespace ``ino`` shows."""
    return (f"net:[{ino}]",)


def candidates(record: dict[str, object]) -> Iterator[str]:
    """Paths that may open the recorded namespace, cheapest first (see the module doc)."""
    hint = record.get(PATH)
    if isinstance(hint, str) and hint:
        yield hint
    yield from _named()
    yield netns.THREAD_NETNS
    pids = _pids()
    for pid in pids:
        yield f"/proc/{pid}/ns/net"
    ino = record.get(INO)
    if not isinstance(ino, int):
        return
    links = fd_link_names(ino)
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            entries = os.listdir(fd_dir)
        except OSError:
            continue
        for entry in entries:
            with contextlib.suppress(OSError):
                if os.readlink(f"{fd_dir}/{entry}") in links:
                    yield f"{fd_dir}/{entry}"


def locate(record: dict[str, object], paths: Iterable[str] | None = None) -> str | None:
    """A path that opens the recorded namespace now, or None when none exists any more."""
    for path in candidates(record) if paths is None else paths:
        if matches(record, identity_of(path)):
            return path
    return None


def is_current(record: dict[str, object]) -> bool:
    """Whether the calling thread is in the recorded namespace."""
    return matches(record, identity_of(netns.THREAD_NETNS))


def _named() -> list[str]:
    try:
        names = sorted(os.listdir(netns.NETNS_DIR))
    except OSError:
        return []
    return [netns.path_of(name) for name in names]


def _pids() -> list[int]:
    try:
        return sorted(int(e) for e in os.listdir("/proc") if e.isdigit())
    except OSError:
        return []
