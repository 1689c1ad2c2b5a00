"""gc of a sandbox's network: in the namespace it was built in, and only what is verified gone.

The host side of a sandbox's network (veth ``cr-<id>``, its divert rules and routing table,
the nftables table ``corral-<id>``) lives in the network namespace the sandbox was created
from, recorded in its state (``host_netns``, :mod:`corral.lifecycle.hostnetns`). gc enters that
namespace from a thread of its own (``setns`` moves one thread only, and every ``ip``/``nft``
it runs inherits it), lists which pieces exist, removes them, and lists again: a line is
reported for each piece that was there before and is not after, and a piece still there is
an error, so that gc keeps the sandbox's state and tries again next time instead of
forgetting it. When the namespace no longer exists, neither do the pieces that lived in it:
only the address lease (a file of CORRAL_HOME) and the sandbox's own namespace are left to
remove.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from typing import TypeVar

from corral.errors import CorralError, SandboxError
from corral.kernel import netns
from corral.lifecycle import hostnetns

T = TypeVar("T")


def pieces(name: str) -> list[str]:
    """The parts of sandbox ``name``'s network that exist, seen from the calling thread."""
    from corral.net import firewall, plumbing
    from corral.net.addressing import AddressPool

    names = plumbing.names_for(name)
    found = []
    if firewall.exists(names.table):
        found.append(f"nft table {names.table}")
    link = subprocess.run(
        ["ip", "-o", "link", "show", "dev", names.link], capture_output=True, check=False
    )
    if link.returncode == 0:
        found.append(f"link {names.link}")
    if any(iif == names.link for iif, _table in plumbing.divert_rules()):
        found.append(f"divert rules of {names.link}")
    if os.path.exists(names.netns_path):
        found.append(f"network namespace {names.netns}")
    if AddressPool().get(name) is not None:
        found.append("address lease")
    return found


def release(name: str, record: dict[str, object] | None) -> list[str]:
    """Remove sandbox ``name``'s network where it was built; one line per piece removed.

    ``record`` is the state's ``host_netns`` (None for a state written before it was
    recorded: the calling thread's namespace is assumed, as gc always did).
    """
    if record is None or hostnetns.is_current(record):
        return _release_here(name, "")
    path = hostnetns.locate(record)
    if path is None:
        return _release_gone(name)
    return in_namespace(path, _release_here, name, f" (in {path})")


def _release_here(name: str, where: str) -> list[str]:
    from corral.net import datapath

    before = pieces(name)
    if not before:
        return []
    try:
        datapath.cleanup_leftovers(name)
    except CorralError as exc:
        raise SandboxError(f"gc: removing the network of {name!r}{where} failed: {exc}") from None
    left = pieces(name)
    if left:
        raise SandboxError(
            f"gc: {', '.join(left)} of sandbox {name!r}{where} could not be removed"
        )
    return [f"{piece}{where}" for piece in before]


def _release_gone(name: str) -> list[str]:
    """The namespace the sandbox was built in is gone, and its veth, rules and table with
    it: remove what lives elsewhere (its own namespace's name, the lease) and verify."""
    from corral.net import plumbing
    from corral.net.addressing import AddressPool

    names = plumbing.names_for(name)
    removed = []
    if os.path.exists(names.netns_path):
        subprocess.run(["ip", "netns", "del", names.netns], capture_output=True, check=False)
        if os.path.exists(names.netns_path):
            raise SandboxError(f"gc: network namespace {names.netns} could not be removed")
        removed.append(f"network namespace {names.netns}")
    pool = AddressPool()
    if pool.get(name) is not None:
        pool.release(name)
        if pool.get(name) is not None:
            raise SandboxError(f"gc: the address lease of {name!r} could not be released")
        removed.append("address lease (its host namespace is gone, with the link, rules and table)")
    return removed


def in_namespace(path: str, func: Callable[..., T], *args: object) -> T:
    """``func(*args)`` on a short-lived thread in the network namespace at ``path``
    (:func:`corral.kernel.netns.call_in_thread`); a namespace it cannot enter is a
    SandboxError that names it."""
    try:
        return netns.call_in_thread(path, lambda: func(*args))
    except OSError as exc:
        raise SandboxError(f"gc: cannot enter the network namespace {path}: {exc.strerror}") from None
