"""Replacing a file whole, so that a reader sees the old content or the new, never a part.

The supervisor (its ``stopped`` and ``ready`` records), the state store (``state.json``)
and the TLS summary each publish small records that other processes read at any moment,
and a crash mid-write must not leave a torn one: the bytes go to a temporary file in the
same directory (``rename`` is atomic only within one filesystem), which then replaces the
target. Imports only ``os``: the supervisor uses it on its lean start-up path.
"""

from __future__ import annotations

import os


def replace_file(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` through a hidden temporary file beside it, then rename.

    The temporary name carries our pid, so two writers never share one; ``mode`` applies
    to the new file from its creation (a private record is never readable, even briefly)."""
    path = os.fspath(path)
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
