"""The channel's wire format, shared by the sandbox's init and the host's client.

Sans-I/O and free of asyncio (the init imports it; the launcher is imported by the
supervisor's fork server, whose start-up time counts): the frame codec
(:class:`FrameReader`, :func:`encode_control`, :func:`encode_data`), the limits, the error
sentences, and the socket addressing. It never touches a socket, so every edge case is a unit
test and the host side can fuzz it with random bytes (the init runs inside the sandbox, so
what it sends is untrusted input for the host).

Wire format (big-endian)::

    frame   := kind:u8 length:u32 body[length]
    CONTROL := a JSON object (UTF-8), at most MAX_CONTROL_SIZE bytes
    STDIN / STDOUT / STDERR / FILE := raw bytes, at most MAX_DATA_SIZE; an empty body ends that
                                      stream (EOF)

The requests and replies are in docs/isolation.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.errors import ChannelProtocolError as ChannelProtocolError  # re-exported
from corral.errors import SandboxError

KIND_CONTROL = 1
KIND_STDIN = 2
KIND_STDOUT = 3
KIND_STDERR = 4
KIND_FILE = 5
_KINDS = frozenset({KIND_CONTROL, KIND_STDIN, KIND_STDOUT, KIND_STDERR, KIND_FILE})

#: The 5-byte prefix of every frame: kind, then body length.
FRAME_PREFIX = struct.Struct("!BI")

#: Largest data frame body. 256 KiB is the chunk size the contract promises for read_file and
#: matches the pipe/socket buffer sizes that gave the best throughput on this machine
#: (PLATFORM.md, data path): large enough that per-frame overhead vanishes, small enough that
#: a 50 MiB transfer never holds more than a few chunks in memory at either end.
MAX_DATA_SIZE = 256 * 1024

#: Largest control frame body. A request carries argv and env, which the kernel bounds at
#: about 2 MiB (ARG_MAX with the default 8 MiB stack); JSON escaping can double that, so
#: 4 MiB admits every exec the kernel would accept and still bounds what a hostile init can
#: make the host buffer. Directory listings are sent in batches to stay far below it.
MAX_CONTROL_SIZE = 4 * 1024 * 1024

#: Entries per control frame of a directory listing (a few hundred bytes each).
LIST_BATCH = 1000

#: Exit code reported when ``timeout`` expired and the command was killed (as GNU timeout(1)).
EXIT_TIMED_OUT = 124

#: Window size of a terminal exec whose client gives none: the VT100's 24x80, which docker,
#: ssh and the kernel's own console fall back to as well.
DEFAULT_TERMINAL_SIZE = (24, 80)

#: Largest terminal dimension: ``struct winsize`` holds unsigned shorts.
MAX_TERMINAL_DIMENSION = 0xFFFF

#: Signals a client may forward to a command (``{"op": "signal"}``): every standard and
#: real-time signal number of Linux (1-64); 0 (an existence probe) is not a delivery.
MAX_SIGNAL = 64


def terminal_size(rows: object, cols: object) -> tuple[int, int]:
    """(rows, cols) to set on a pty; the default for a value that is missing or out of range.

    The request is from the host, but the bound keeps a bad client from wrapping the
    ioctl's unsigned shorts.
    """
    def valid(value: object) -> bool:
        return type(value) is int and 1 <= value <= MAX_TERMINAL_DIMENSION

    if valid(rows) and valid(cols):
        return rows, cols  # type: ignore[return-value]
    return DEFAULT_TERMINAL_SIZE


def exec_signal(value: object) -> int | None:
    """The signal number of a ``{"op": "signal"}`` request, None when it is not one
    (``signal.Signals`` members are ints too; bools are not signal numbers)."""
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_SIGNAL:
        return int(value)
    return None


#: How long ``ChannelClient.connect`` waits for the init's socket by default.
CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class Frame:
    kind: int
    body: bytes

    def control(self) -> dict[str, Any]:
        """The JSON object of a CONTROL frame; anything else is a protocol error."""
        if self.kind != KIND_CONTROL:
            raise ChannelProtocolError(
                f"the sandbox channel sent a data frame (kind {self.kind}) where a control "
                "frame was expected"
            )
        try:
            obj = json.loads(self.body)
        except (UnicodeDecodeError, ValueError):
            raise ChannelProtocolError(
                "the sandbox channel sent a control frame that is not JSON"
            ) from None
        if not isinstance(obj, dict):
            raise ChannelProtocolError(
                "the sandbox channel sent a control frame that is not a JSON object"
            )
        return obj


class FrameReader:
    """Turns a byte stream into frames; raises ChannelProtocolError on the first bad byte."""

    def __init__(self, max_control: int = MAX_CONTROL_SIZE, max_data: int = MAX_DATA_SIZE):
        self._buf = bytearray()
        self._max_control = max_control
        self._max_data = max_data

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None when more bytes are needed."""
        if len(self._buf) < FRAME_PREFIX.size:
            return None
        kind, length = FRAME_PREFIX.unpack_from(self._buf)
        if kind not in _KINDS:
            raise ChannelProtocolError(f"the sandbox channel sent a frame of unknown kind {kind}")
        limit = self._max_control if kind == KIND_CONTROL else self._max_data
        if length > limit:
            raise ChannelProtocolError(
                f"the sandbox channel sent a frame of {length} bytes (kind {kind}), over the "
                f"limit of {limit}"
            )
        end = FRAME_PREFIX.size + length
        if len(self._buf) < end:
            return None
        body = bytes(self._buf[FRAME_PREFIX.size:end])
        del self._buf[:end]
        return Frame(kind, body)

    def frames(self) -> Iterator[Frame]:
        while (frame := self.next_frame()) is not None:
            yield frame


def encode_control(obj: Mapping[str, Any]) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    if len(body) > MAX_CONTROL_SIZE:
        raise SandboxError(
            f"request too large for the sandbox channel ({len(body)} bytes, limit "
            f"{MAX_CONTROL_SIZE}): shorten argv/env"
        )
    return FRAME_PREFIX.pack(KIND_CONTROL, len(body)) + body


def encode_data(kind: int, data: bytes) -> bytes:
    """One data frame; callers split payloads into MAX_DATA_SIZE pieces first."""
    if len(data) > MAX_DATA_SIZE:
        raise ValueError(f"data frame of {len(data)} bytes exceeds {MAX_DATA_SIZE}")
    return FRAME_PREFIX.pack(kind, len(data)) + data


# --- errors reported by the worker ------------------------------------------------------------

#: Sentences for the error kinds a worker reports; ``{p}`` is the path or command.
_ERROR_SENTENCES = {
    "not_found": "no such file or directory in the sandbox: {p!r}",
    "exists": "already exists in the sandbox: {p!r}",
    "not_dir": "not a directory in the sandbox: {p!r}",
    "is_dir": "is a directory in the sandbox: {p!r}",
    "permission": "permission denied in the sandbox: {p!r}",
    "not_empty": "directory not empty in the sandbox: {p!r} (pass recursive=True)",
    "command_not_found": "command not found in the sandbox: {p!r}",
    "not_executable": "command is not executable in the sandbox: {p!r}",
    "cwd_not_found": "working directory not found in the sandbox: {p!r}",
    "bad_user": "user not found in the sandbox's /etc/passwd: {p!r}",
    "pids_limit": "cannot start {p!r}: the sandbox's process limit (pids_max) is reached",
}


def error_from_reply(reply: Mapping[str, Any]) -> SandboxError:
    """The SandboxError for a worker's ``{"t": "error", ...}`` reply."""
    kind = str(reply.get("kind", "other"))
    subject = str(reply.get("subject", ""))
    template = _ERROR_SENTENCES.get(kind)
    if template is not None:
        return SandboxError(template.format(p=subject))
    op = str(reply.get("op", "operation"))
    message = str(reply.get("message", "unknown error"))
    return SandboxError(f"{op} failed in the sandbox for {subject!r}: {message}")


#: sun_path is 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 107


@contextlib.contextmanager
def short_unix_path(path: Path) -> Iterator[str]:
    """An address for ``path`` that fits sun_path, however deep the state directory is.

    Long paths go through the directory's fd (``/proc/self/fd/N/name``), which the kernel
    resolves like the real path; the fd is closed when the ``with`` ends (after bind or
    connect, the address is no longer needed).
    """
    if len(os.fsencode(str(path))) <= UNIX_PATH_MAX:
        yield str(path)
        return
    dirfd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{dirfd}/{path.name}"
    finally:
        os.close(dirfd)
