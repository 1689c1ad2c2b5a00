"""An independent reading of what corral's HTTP/1 rewriter emits, with h11 as the parser.

corral parses with its own strict code; the tests check its output with a different
implementation, so a framing bug on corral's side (a wrong Content-Length after substitution,
a broken re-chunking) shows up as h11 disagreeing rather than as corral agreeing with itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h11


@dataclass
class Message:
    head: h11.Request | h11.Response | h11.InformationalResponse
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    complete: bool = False

    def head_bytes(self) -> bytes:
        """The head as text to search: request line / status and every field."""
        if isinstance(self.head, h11.Request):
            line = self.head.method + b" " + self.head.target
        else:
            line = str(self.head.status_code).encode() + b" " + self.head.reason
        return (
            line
            + b"\r\n"
            + b"".join(n + b": " + v + b"\r\n" for n, v in self.head.headers.raw_items())
        )


def _switches(m: Message) -> bool:
    """Whether a request may turn the connection into a tunnel (what follows is not HTTP)."""
    head = m.head
    assert isinstance(head, h11.Request)
    return head.method == b"CONNECT" or any(
        n.lower() == b"upgrade" for n, _ in head.headers.raw_items()
    )


def read_requests(data: bytes) -> list[Message]:
    """Every request in ``data`` as a server would see it (the last may be incomplete)."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
    conn.receive_data(data)
    out: list[Message] = []
    while True:
        ev = conn.next_event()
        if ev is h11.NEED_DATA or ev is h11.PAUSED:
            if ev is h11.PAUSED and out and out[-1].complete and not _switches(out[-1]):
                # Answer so the next pipelined request is read.
                conn.send(h11.Response(status_code=204, headers=[]))
                conn.send(h11.EndOfMessage())
                conn.start_next_cycle()
                continue
            break
        if isinstance(ev, h11.Request):
            out.append(Message(ev))
        elif isinstance(ev, h11.Data):
            out[-1].body += ev.data
        elif isinstance(ev, h11.EndOfMessage):
            out[-1].trailers = list(ev.headers.raw_items())
            out[-1].complete = True
            if conn.our_state is h11.SEND_RESPONSE and conn.their_state is h11.DONE:
                if _switches(out[-1]):
                    break
                conn.send(h11.Response(status_code=204, headers=[]))
                conn.send(h11.EndOfMessage())
                conn.start_next_cycle()
        elif isinstance(ev, h11.ConnectionClosed):
            break
    return out


def read_responses(data: bytes, methods: list[bytes]) -> list[Message]:
    """Every response in ``data`` as the guest's client would read it, for ``methods`` sent."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=1 << 20)
    out: list[Message] = []
    pending = list(methods)
    sent = False
    conn.receive_data(data)
    while pending or not sent:
        if not sent:
            conn.send(h11.Request(method=pending[0], target=b"/", headers=[(b"Host", b"x")]))
            conn.send(h11.EndOfMessage())
            sent = True
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            conn.receive_data(b"")  # the data ended: close-delimited bodies end here
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                break
        if isinstance(ev, h11.InformationalResponse):
            out.append(Message(ev, complete=True))
        elif isinstance(ev, h11.Response):
            out.append(Message(ev))
        elif isinstance(ev, h11.Data):
            out[-1].body += ev.data
        elif isinstance(ev, h11.EndOfMessage):
            out[-1].trailers = list(ev.headers.raw_items())
            out[-1].complete = True
            pending.pop(0)
            if not pending:
                break
            conn.start_next_cycle()
            sent = False
        elif isinstance(ev, h11.ConnectionClosed) or ev is h11.PAUSED:
            break
    return out
