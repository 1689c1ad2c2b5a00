"""The supervisor's control protocol: one JSON object per line over ``control.sock``.

Requests carry an ``op``; every request gets exactly one reply line, ``{"ok": true, ...}`` or
``{"ok": false, "error": "<one sentence>"}``, and the server keeps the connection open for the
next request. The operations:

``info``
    The supervisor's view: pid, init pid, whether the sandbox's init is alive.
``stop`` (``timeout``: seconds of grace before SIGKILL)
    Stop the sandbox; the reply is sent once everything is released, then the supervisor exits.

Audit events are not served here: readers tail ``net-audit.jsonl`` in the state directory
themselves (:func:`corral.net.audit.follow`), which needs no supervisor and works after it.

This module is the sans-I/O core (framing, validation, reply shapes) plus a small asyncio
client for the SDK. The server's I/O lives in :mod:`corral.lifecycle.supervisor`. It is on the
supervisor's start-up path, so it imports nothing heavy (see :mod:`corral.runtime.leanjson`).
"""

from __future__ import annotations

from corral.errors import ControlProtocolError as ControlProtocolError  # re-exported
from corral.errors import SandboxError
from corral.runtime import leanjson

OP_INFO = "info"
OP_STOP = "stop"
OPS = (OP_INFO, OP_STOP)

#: Longest line either side may send. Today's messages are tens (requests) to hundreds
#: (``info`` replies) of bytes; 1 MiB leaves room for a whole NetworkConfig of thousands of
#: rules should a live policy update come this way, and bounds what a broken or hostile
#: peer can make either side buffer.
MAX_LINE_BYTES = 1024 * 1024

#: Grace period of ``stop`` before the sandbox is killed, unless the request says otherwise.
DEFAULT_STOP_TIMEOUT = 5.0

#: Upper bound on the grace period a client may ask for (an hour is a hung sandbox).
MAX_STOP_TIMEOUT = 3600.0


class LineDecoder:
    """Splits a byte stream into JSON objects, one per ``\\n``-terminated line."""

    def __init__(self, limit: int = MAX_LINE_BYTES) -> None:
        self._buffer = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> list[dict[str, object]]:
        """Add received bytes; returns the complete messages they finish, in order."""
        self._buffer += data
        messages: list[dict[str, object]] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                break
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if len(line) > self._limit:
                raise ControlProtocolError(f"control message longer than {self._limit} bytes")
            if line.strip():
                messages.append(_parse_line(line))
        if len(self._buffer) > self._limit:
            raise ControlProtocolError(f"control message longer than {self._limit} bytes")
        return messages

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole line."""
        return len(self._buffer)


def _parse_line(line: bytes) -> dict[str, object]:
    try:
        value = leanjson.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ControlProtocolError(f"control message is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ControlProtocolError("control message is not a JSON object")
    return value


def encode(message: dict[str, object]) -> bytes:
    """One message as a line (ASCII JSON cannot contain a raw newline)."""
    return leanjson.dumps(message).encode("ascii") + b"\n"


# -- requests ---------------------------------------------------------------------------------


def info_request() -> dict[str, object]:
    return {"op": OP_INFO}


def stop_request(timeout: float = DEFAULT_STOP_TIMEOUT) -> dict[str, object]:
    return {"op": OP_STOP, "timeout": timeout}


def parse_request(message: dict[str, object]) -> tuple[str, dict[str, object]]:
    """(op, validated arguments) of a request; ControlProtocolError names what is wrong."""
    op = message.get("op")
    if op not in OPS:
        raise ControlProtocolError(f"unknown control op {op!r} (expected one of {', '.join(OPS)})")
    assert isinstance(op, str)
    if op == OP_STOP:
        timeout = message.get("timeout", DEFAULT_STOP_TIMEOUT)
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 0 <= timeout <= MAX_STOP_TIMEOUT
        ):
            raise ControlProtocolError(
                f"stop.timeout: {timeout!r} is not a number of seconds in 0..{MAX_STOP_TIMEOUT:g}"
            )
        return op, {"timeout": float(timeout)}
    return op, {}


# -- replies ----------------------------------------------------------------------------------


def ok_reply(**fields: object) -> dict[str, object]:
    return {"ok": True, **fields}


def error_reply(message: str) -> dict[str, object]:
    return {"ok": False, "error": message}


def check_reply(reply: dict[str, object], op: str) -> dict[str, object]:
    """``reply`` when it reports success, else SandboxError carrying the server's sentence."""
    if reply.get("ok") is True:
        return reply
    error = reply.get("error")
    raise SandboxError(str(error) if error else f"the supervisor refused {op!r} without a reason")


# -- asyncio client ---------------------------------------------------------------------------


async def call(socket_path: str, request: dict[str, object], timeout: float) -> dict[str, object]:
    """Send one request to a supervisor and return its (successful) reply.

    ``timeout`` bounds the whole exchange; a supervisor that is gone is a SandboxError.
    """
    import asyncio

    op = str(request.get("op"))
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(socket_path, limit=MAX_LINE_BYTES + 1), timeout
        )
    except (FileNotFoundError, ConnectionRefusedError):
        raise SandboxError(f"the sandbox's supervisor is not running ({socket_path})") from None
    except TimeoutError:
        raise SandboxError(f"the sandbox's supervisor did not answer within {timeout:g} s") from None
    try:
        writer.write(encode(request))
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    except TimeoutError:
        raise SandboxError(
            f"the sandbox's supervisor did not answer {op!r} within {timeout:g} s"
        ) from None
    except (ConnectionError, ValueError) as exc:
        raise SandboxError(f"lost the sandbox's supervisor during {op!r} ({exc})") from None
    finally:
        writer.close()
    if not line.endswith(b"\n"):
        raise SandboxError(f"the sandbox's supervisor exited during {op!r}")
    messages = LineDecoder().feed(line)
    if len(messages) != 1:
        raise ControlProtocolError(f"the supervisor sent {len(messages)} replies to {op!r}")
    return check_reply(messages[0], op)
