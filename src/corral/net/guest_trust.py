"""Where the interception CA goes in a guest's rootfs: the image's trust files as they are.

:class:`~corral.net.tls_ca.GuestTrust` plans the writes purely, given each trust path's
state in the rootfs (the path it resolves to, its content). This module reads that state from
an image's rootfs on the host, *before* the sandbox starts, resolving symlinks inside the
rootfs (an absolute link target means the rootfs's own root, as it will inside the sandbox),
so a bundle reached through links (RHEL's ``ca-bundle.crt`` -> ``tls-ca-bundle.pem``) is
written once, where the guest will read it. The runtime writes the planned files inside the
sandbox after its pivot (``LaunchSpec.extra_files``): nothing on the host is changed.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

#: Symlinks followed per path before giving up (Linux's own limit, MAXSYMLINKS, is 40).
MAX_LINK_HOPS = 40

#: A trust bundle larger than this in the image is not read (and the path is replaced by
#: corral's CA alone plus the host bundle when asked). Real bundles are ~200 KiB (Mozilla's
#: ~150 roots); 16 MiB bounds a hostile image without refusing any real one.
MAX_BUNDLE_BYTES = 16 << 20


def resolve_in_root(root: Path, path: str) -> str:
    """``path`` (absolute, as the guest sees it) with every symlink inside ``root`` resolved;
    the answer is again a guest path. A loop or too many hops leaves the path as it is."""
    parts = [p for p in path.split("/") if p]
    done: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        host = root.joinpath(*done, part)
        try:
            st = os.lstat(host)
        except OSError:
            done.append(part)
            done.extend(p for p in parts if p not in (".", ""))
            break
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > MAX_LINK_HOPS:
                return path
            target = os.readlink(host)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        done.append(part)
    return "/" + "/".join(done)


def rootfs_state(root: Path, paths: Iterable[str]) -> dict[str, tuple[str, bytes | None]]:
    """For each guest path: (where it resolves inside ``root``, its content or None)."""
    out: dict[str, tuple[str, bytes | None]] = {}
    for path in paths:
        real = resolve_in_root(root, path)
        host = root / real.lstrip("/")
        content: bytes | None = None
        try:
            st = os.lstat(host)
            if stat.S_ISREG(st.st_mode) and st.st_size <= MAX_BUNDLE_BYTES:
                content = host.read_bytes()
        except OSError:
            content = None
        out[path] = (real, content)
    return out
