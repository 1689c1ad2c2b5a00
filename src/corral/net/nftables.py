"""nftables in-process: a small ctypes binding of Debian's ``libnftables1``.

``nft -f`` is a process start, a PATH search and a dynamic link of libnftables for every
transaction (about 3-4 ms here); a sandbox's create and remove each need one, and the DNS
interceptor adds set elements per answer. The library behind ``nft`` takes the same text
(``nft -f`` syntax, one call = one atomic netlink batch) in-process.

Loaded by its soname (``libnftables.so.1``), never through ``ctypes.util.find_library``
(which runs ``ldconfig -p`` and ``gcc``, tens of milliseconds, on each call). The library is
loaded at import, so a fork server that imported this module hands it, mapped and linked, to
every child.

A fresh ``nft_ctx`` per call (22 us to make and free here, against 0.1-10 ms for the call):
a kept one carries its object cache from call to call, and libnftables 1.0.6 keeps, in cached
objects, source locations that point into the previous call's (freed) input; an error that
quotes one aborts the process (seen here: ``BUG: invalid input descriptor type``, erec.c:161,
after a dry run). A fresh context also opens its netlink socket in the calling thread's
network namespace and never shares one with a forked child.

Thread safety: libnftables keeps process-wide state outside the context (its interface name
cache is a global), so one lock serialises every call of the process; a call takes well under
a millisecond, and nothing calls it on a per-packet path.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import re
import socket
import struct
import threading
from collections.abc import Iterable

from corral.errors import NetworkError
from corral.kernel import libc
from corral.kernel import netns as kernel_netns

#: The library's soname (Debian package ``libnftables1``, installed by scripts/install.sh).
LIBRARY = "libnftables.so.1"

#: ``nft_ctx_new`` flag: a context with its own netlink socket (the library's default).
_NFT_CTX_DEFAULT = 0

_lib: ctypes.CDLL | None = None
_load_error: str | None = None
try:
    _lib = ctypes.CDLL(LIBRARY, use_errno=True)
except OSError as exc:  # reported on first use, with the package to install
    _load_error = str(exc)
else:
    _lib.nft_ctx_new.restype = ctypes.c_void_p
    _lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    _lib.nft_ctx_free.restype = None
    _lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    _lib.nft_ctx_buffer_output.restype = ctypes.c_int
    _lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
    _lib.nft_ctx_buffer_error.restype = ctypes.c_int
    _lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    # c_void_p, not c_char_p: the buffers belong to the context (copied with string_at).
    _lib.nft_ctx_get_output_buffer.restype = ctypes.c_void_p
    _lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
    _lib.nft_ctx_get_error_buffer.restype = ctypes.c_void_p
    _lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    _lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    _lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    _lib.nft_run_cmd_from_filename.restype = ctypes.c_int
    _lib.nft_run_cmd_from_filename.argtypes = [ctypes.c_void_p, ctypes.c_char_p]

_lock = threading.Lock()

#: SO_SNDBUFFORCE (asm-generic/socket.h; the socket module does not name it).
_SO_SNDBUFFORCE = 32

#: Free heap (bytes) above which a call hands memory back to the kernel. libnftables fills its
#: cache with every table's chains, sets and rules before it evaluates a table: beside 100
#: sandboxes' tables one apply took 53 MiB of heap, which glibc keeps after free(); without a
#: trim every networked supervisor carried ~30 MiB of it (bench/density_bench.py). A trim of
#: that much takes ~20 ms, so it runs on a thread of its own, off the caller's path. The bar is
#: low: even beside 4 tables an apply left ~2.5 MiB free but dirty (glibc trims by itself only
#: the top of the heap, and Python's objects sit above libnftables' freed ones), which was a
#: quarter of an idle networked supervisor's private memory (its smaps_rollup, measured
#: at each start step); trimming that costs well under a millisecond, on that thread.
TRIM_ABOVE = 256 << 10


class _MallInfo2(ctypes.Structure):
    _fields_ = tuple((name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost",
    ))  # fmt: skip


_libc = libc.libc
_libc.mallinfo2.restype = _MallInfo2
_libc.malloc_trim.argtypes = [ctypes.c_size_t]


def _trim_if_bloated() -> None:
    if _libc.mallinfo2().fordblks > TRIM_ABOVE:
        threading.Thread(target=_libc.malloc_trim, args=(0,), name="corral-trim",
                         daemon=True).start()  # fmt: skip


def available() -> bool:
    """Whether libnftables could be loaded."""
    return _lib is not None


def _new_context() -> int:
    if _lib is None:
        raise NetworkError(
            f"nftables: cannot load {LIBRARY} ({_load_error}); install the Debian package "
            "libnftables1 (scripts/install.sh)"
        )
    ctx = _lib.nft_ctx_new(_NFT_CTX_DEFAULT)
    if not ctx:
        raise NetworkError("nftables: nft_ctx_new failed (out of memory or no netlink)")
    if _lib.nft_ctx_buffer_output(ctx) != 0 or _lib.nft_ctx_buffer_error(ctx) != 0:
        _lib.nft_ctx_free(ctx)
        raise NetworkError("nftables: cannot buffer libnftables' output")
    return int(ctx)


def _buffer(pointer: int | None) -> str:
    return "" if not pointer else ctypes.string_at(pointer).decode("utf-8", "replace")


def run(commands: str) -> str:
    """Run ``commands`` (``nft -f`` syntax) as one atomic transaction; return nft's output.

    Raises NetworkError carrying nft's own error text (which names the line and the token)
    when the kernel or the parser rejects any of it; nothing of the transaction is applied
    then.
    """
    if "\0" in commands:
        raise NetworkError("nftables: the commands contain a NUL byte")
    data = commands.encode()
    multiline = b"\n" in data.rstrip(b"\n")
    with _lock:
        ctx = _new_context()
        assert _lib is not None
        try:
            run_input = _run_as_file if multiline else _lib.nft_run_cmd_from_buffer
            rc = run_input(ctx, data)
            out = _buffer(_lib.nft_ctx_get_output_buffer(ctx))
            err = _buffer(_lib.nft_ctx_get_error_buffer(ctx))
        finally:
            _lib.nft_ctx_free(ctx)
        _trim_if_bloated()
    if rc != 0:
        text = _FILE_LOCATION.sub(r"line \1, columns \2: ", err.strip())
        raise NetworkError(f"nftables: {text or f'libnftables returned {rc} without a message'}")
    return out


#: How libnftables prefixes an error in a file: ``/proc/self/fd/7:2:44-47: Error: ...``.
_FILE_LOCATION = re.compile(r"/proc/self/fd/\d+:(\d+):([\d-]+): ")


def _run_as_file(ctx: int, data: bytes) -> int:
    """Run multi-line input from a memfd: for input read from a buffer, libnftables prints the
    buffer's *first* line under any error, whichever line it is about; for a file it prints
    the right line and its number (~20 us more per call, so single lines skip this)."""
    assert _lib is not None
    fd = os.memfd_create("corral-nft", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        return int(_lib.nft_run_cmd_from_filename(ctx, f"/proc/self/fd/{fd}".encode()))
    finally:
        os.close(fd)


# -- nf_tables netlink, for the calls libnftables makes slow --------------------------------
#
# Before it evaluates a command, libnftables fills a cache from the kernel, and for ``add
# element`` and ``list tables`` (nft 1.0.6) that cache is every table's sets *with their
# elements*: measured here, ``add element`` into a small set took 0.13 ms alone, 18 ms beside a
# 10,000-element interval set, and 170-200 ms with 100 sandboxes' tables present (a DNS answer
# would wait for that). These three calls need no parser and no cache, so they are one netlink
# message each, built here: the same batch libnftables would send, without the dump before it.

#: netlink protocol of nfnetlink, and the nf_tables subsystem id (linux/netfilter/nfnetlink.h).
_NETLINK_NETFILTER = 12
_NFNL_SUBSYS_NFTABLES = 10
_NFNL_MSG_BATCH_BEGIN = 0x10
_NFNL_MSG_BATCH_END = 0x11
#: nf_tables message types (linux/netfilter/nf_tables.h; the DESTROY ones since Linux 6.3).
_NFT_MSG_NEWTABLE = 0
_NFT_MSG_GETTABLE = 1
_NFT_MSG_NEWCHAIN = 3
_NFT_MSG_GETCHAIN = 4
_NFT_MSG_NEWRULE = 6
_NFT_MSG_GETRULE = 7
_NFT_MSG_NEWSET = 9
_NFT_MSG_GETSET = 10
_NFT_MSG_NEWSETELEM = 12
_NFT_MSG_GETSETELEM = 13
_NFT_MSG_DESTROYTABLE = 26
#: netlink header flags and message types (linux/netlink.h).
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
_NLM_F_CREATE = 0x400
_NLM_F_APPEND = 0x800
_NLM_F_DUMP = 0x300
_NLMSG_ERROR = 0x2
_NLMSG_DONE = 0x3
_NLA_F_NESTED = 0x8000
#: Attributes (nf_tables.h): table name; set element list, its table, set and elements; an
#: element, its key and timeout; a data value.
_NFTA_TABLE_NAME = 1
_NFTA_SET_ELEM_LIST_TABLE = 1
_NFTA_SET_ELEM_LIST_SET = 2
_NFTA_SET_ELEM_LIST_ELEMENTS = 3
_NFTA_LIST_ELEM = 1
_NFTA_SET_ELEM_KEY = 1
_NFTA_SET_ELEM_TIMEOUT = 4
_NFTA_DATA_VALUE = 1
#: nfproto numbers of the table families corral uses.
FAMILIES = {"inet": 1, "ip": 2, "ip6": 10}

#: Elements per NEWSETELEM message: a netlink attribute length is 16 bits, so one element
#: list must stay under 64 KiB; an IPv6 element with its timeout is ~48 bytes.
MAX_ELEMENTS_PER_MESSAGE = 1000

#: Seconds to wait for the kernel's answer (it answers in microseconds; this only bounds a
#: kernel that never does).
NETLINK_TIMEOUT = 5.0

_nl_sock: socket.socket | None = None
_nl_key: tuple[int, int, int] = (0, 0, 0)
_seq = 0


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _nest(kind: int, *attrs: bytes) -> bytes:
    return _attr(kind | _NLA_F_NESTED, b"".join(attrs))


def _message(
    kind: int, flags: int, family: int, seq: int, payload: bytes, res_id: int = 0
) -> bytes:
    body = struct.pack("=BBH", family, 0, socket.htons(res_id)) + payload
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def _netlink() -> tuple[socket.socket, bool]:
    """(socket, whether to close it after the call). Holds _lock.

    One socket is kept per process and netns, not one per call: the kernel makes the close
    of a netfilter netlink socket wait for the deferred destruction of deleted tables (an
    RCU grace period), so a socket closed right after its own DESTROYTABLE would wait ~15 ms.
    A thread in another netns gets a socket for that call; a forked child makes its own."""
    global _nl_sock, _nl_key
    key = (os.getpid(), *kernel_netns.identity())
    if _nl_sock is not None and _nl_key == key:
        return _nl_sock, False
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_NETFILTER
    )
    sock.settimeout(NETLINK_TIMEOUT)
    sock.bind((0, 0))
    if _nl_sock is not None and _nl_key[0] == key[0]:
        return sock, True  # a thread in another netns: a socket for this call
    if _nl_sock is not None:  # inherited through fork: the parent's, left open for it
        _nl_sock.detach()
    _nl_sock, _nl_key = sock, key
    return sock, False


def _talk(
    messages: list[tuple[int, int, bytes]],
    family: int,
    *,
    batch: bool,
    on: socket.socket | None = None,
    ack_each: bool = True,
) -> list[int]:
    """Send ``messages`` ((type, extra flags, payload)) and return each one's errno (0:
    done). ``batch``: wrapped in one nf_tables transaction (all or nothing). ``on``: a
    socket of the caller's (left open), instead of the process's. ``ack_each`` False: only
    the last message asks for an acknowledgement (the kernel still answers every failed
    one, and answers a batch all at once after its last message), so a batch of 10,000
    rules does not queue 10,000 acknowledgements in the socket's receive buffer."""
    global _seq
    with _lock:
        sock, temporary = (on, False) if on is not None else _netlink()
        try:
            parts: list[bytes] = []
            seqs: list[int] = []
            if batch:
                _seq += 1
                parts.append(_message(_NFNL_MSG_BATCH_BEGIN, _NLM_F_REQUEST, 0, _seq, b"",
                                      _NFNL_SUBSYS_NFTABLES))  # fmt: skip
            for i, (kind, flags, payload) in enumerate(messages):
                _seq += 1
                seqs.append(_seq)
                ack = _NLM_F_ACK if ack_each or i == len(messages) - 1 else 0
                parts.append(
                    _message((_NFNL_SUBSYS_NFTABLES << 8) | kind,
                             _NLM_F_REQUEST | ack | flags, family, _seq, payload)
                )  # fmt: skip
            if batch:
                _seq += 1
                parts.append(_message(_NFNL_MSG_BATCH_END, _NLM_F_REQUEST, 0, _seq, b"",
                                      _NFNL_SUBSYS_NFTABLES))  # fmt: skip
            data = b"".join(parts)
            _fit_send_buffer(sock, len(data))
            sock.sendall(data)
            errors = dict.fromkeys(seqs, -1 if ack_each else 0)
            waiting = set(seqs) if ack_each else {seqs[-1]}
            first = seqs[0] - (1 if batch else 0)
            while waiting:
                reply = sock.recv(65536)
                offset = 0
                while offset + 16 <= len(reply):
                    length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", reply, offset)
                    offset += max(16, (length + 3) & ~3)
                    if kind != _NLMSG_ERROR or not first <= seq <= _seq:
                        continue  # a reply's payload (GETTABLE), or a stale answer
                    err = -struct.unpack_from("=i", reply, offset - length + 16)[0]
                    if seq in errors:
                        errors[seq] = err
                        waiting.discard(seq)
                    elif err:  # the batch itself was refused: nothing else will answer
                        for s in waiting:
                            errors[s] = err
                        waiting.clear()
        except OSError as exc:
            raise NetworkError(f"nftables: netlink request failed: {exc}") from None
        finally:
            if temporary:
                sock.close()
    return [errors[s] for s in seqs]


def _fit_send_buffer(sock: socket.socket, size: int) -> None:
    """Grow the socket's send buffer to take ``size`` bytes in one message: a netlink send
    larger than the buffer fails with EMSGSIZE, and a transaction must be one message
    (a table of ~500 rules is larger than the default 208 KiB). As libnftables does, with
    SO_SNDBUFFORCE (CAP_NET_ADMIN, which every caller has) past the system's maximum."""
    need = size + 4096  # the kernel's own skb overhead is counted against the buffer
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= need:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, need)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, need)


def _strz(text: str) -> bytes:
    return text.encode() + b"\0"


def table_exists(table: str, family: str = "inet") -> bool:
    """Whether the table exists (one GETTABLE; libnftables would dump every table first)."""
    (err,) = _talk([(_NFT_MSG_GETTABLE, 0, _attr(_NFTA_TABLE_NAME, _strz(table)))],
                   FAMILIES[family], batch=False)  # fmt: skip
    if err in (0, errno.ENOENT):
        return err == 0
    raise NetworkError(f"nftables: looking up table {family} {table} failed: {os.strerror(err)}")


def destroy_table(table: str, family: str = "inet", *, on: socket.socket | None = None) -> None:
    """Delete the table and everything in it; no error when it does not exist. ``on``: a
    socket of the caller's (see :func:`open_socket`) instead of the process's."""
    (err,) = _talk([(_NFT_MSG_DESTROYTABLE, 0, _attr(_NFTA_TABLE_NAME, _strz(table)))],
                   FAMILIES[family], batch=True, on=on)  # fmt: skip
    if err == errno.EOPNOTSUPP or err == errno.EINVAL:  # a kernel before 6.3: no DESTROY
        run(f"add table {family} {table}\ndelete table {family} {table}\n")
    elif err != 0:
        raise NetworkError(f"nftables: deleting table {family} {table} failed: {os.strerror(err)}")


def add_elements(
    table: str,
    set_name: str,
    elements: Iterable[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]],
    family: str = "inet",
) -> None:
    """Add (address, timeout in ms) elements to an address set with ``flags timeout`` (type
    ``ipv4_addr`` or ``ipv6_addr``, not an interval set), in one transaction. An element that
    is already there gets the new timeout (Linux 6.x updates it on a re-add).

    The same as ``run("add element <family> <table> <set> { A timeout Nms, ... }")`` without
    libnftables' cache fill (see above): ~0.05 ms whatever else is in the ruleset.
    """
    items = [
        _nest(_NFTA_LIST_ELEM,
              _nest(_NFTA_SET_ELEM_KEY, _attr(_NFTA_DATA_VALUE, address.packed)),
              _attr(_NFTA_SET_ELEM_TIMEOUT, struct.pack(">Q", max(0, int(timeout_ms)))))
        for address, timeout_ms in elements
    ]  # fmt: skip
    if not items:
        return
    head = _attr(_NFTA_SET_ELEM_LIST_TABLE, _strz(table)) + _attr(
        _NFTA_SET_ELEM_LIST_SET, _strz(set_name)
    )
    messages = [
        (_NFT_MSG_NEWSETELEM, _NLM_F_CREATE,
         head + _nest(_NFTA_SET_ELEM_LIST_ELEMENTS, *items[i : i + MAX_ELEMENTS_PER_MESSAGE]))
        for i in range(0, len(items), MAX_ELEMENTS_PER_MESSAGE)
    ]  # fmt: skip
    errs = [e for e in _talk(messages, FAMILIES[family], batch=True) if e != 0]
    if errs:
        why = _ELEMENT_ERRORS.get(errs[0], os.strerror(errs[0]))
        raise NetworkError(
            f"nftables: adding {len(items)} elements to set {family} {table} {set_name} "
            f"failed: {why}"
        )


# -- a table built elsewhere, replayed here ------------------------------------------------
#
# libnftables evaluates ``add chain``/``add set``/``add rule`` against a cache of the whole
# ruleset of its namespace, which it first reads from the kernel (every table's chains, sets
# and rules; nft 1.0.6): measured here, one sandbox's table took 3.5 ms to apply beside no
# other table, 25 ms beside 60 and ~40 ms beside 100, most of a create's growth with many
# sandboxes. A new network namespace has no table at all, so there the same text costs what
# it costs alone. :func:`snapshot_table` reads a table back as the NEW messages that
# recreate it (the kernel's own dump, which carries the rules' bytecode as libnftables made
# it), and :func:`replay` sends them as one transaction: what ``nft list`` shows of the
# result is exactly what libnftables' apply shows (tests/integration/test_net_nftables.py).

#: Attributes a dump carries that a NEW message must not (handles, use counts, the kernel's
#: own bookkeeping): table USE/HANDLE/OWNER, chain HANDLE/USE/COUNTERS/FLAGS/ID, set
#: HANDLE/TYPE/COUNT (DESC only when empty), rule HANDLE/POSITION.
_DUMP_ONLY = {
    _NFT_MSG_NEWTABLE: frozenset({3, 4, 7}),
    _NFT_MSG_NEWCHAIN: frozenset({2, 6, 8, 10, 11}),
    _NFT_MSG_NEWSET: frozenset({16, 19, 20}),
    _NFT_MSG_NEWRULE: frozenset({3, 6}),
}
_NFTA_SET_NAME = 2
_NFTA_SET_DESC = 9
_NFTA_SET_ID = 10


def _attributes(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        out.append((kind, data[offset + 4 : offset + length]))
        offset += (length + 3) & ~3
    return out


def _recreate(kind: int, payload: bytes) -> bytes:
    drop = _DUMP_ONLY.get(kind, frozenset())
    kept = []
    for attr, value in _attributes(payload):
        code = attr & 0x3FFF
        if code in drop or (kind == _NFT_MSG_NEWSET and code == _NFTA_SET_DESC and not value):
            continue
        kept.append(struct.pack("=HH", 4 + len(value), attr) + value + b"\0" * (-len(value) % 4))
    return b"".join(kept)


def _dump(sock: socket.socket | None, kind: int, family: int, payload: bytes) -> list[bytes]:
    """The payloads (after the nfgenmsg header) of a dump's answers on ``sock`` (None: the
    process's socket of the calling thread's namespace)."""
    global _seq
    with _lock:
        temporary = False
        if sock is None:
            sock, temporary = _netlink()
        _seq += 1
        seq = _seq
        request = _message((_NFNL_SUBSYS_NFTABLES << 8) | kind, _NLM_F_REQUEST | _NLM_F_DUMP,
                           family, seq, payload)  # fmt: skip
        try:
            sock.sendall(request)
            out: list[bytes] = []
            while True:
                data = sock.recv(1 << 20)
                offset = 0
                while offset + 16 <= len(data):
                    length, got, _flags, got_seq, _pid = struct.unpack_from("=IHHII", data, offset)
                    body = data[offset + 16 : offset + length]
                    offset += max(16, (length + 3) & ~3)
                    if got_seq != seq:
                        continue
                    if got == _NLMSG_DONE:
                        return out
                    if got == _NLMSG_ERROR:
                        err = -struct.unpack_from("=i", body)[0] if len(body) >= 4 else errno.EIO
                        if err:
                            raise OSError(err, os.strerror(err))
                        return out
                    out.append(body[4:])
        except OSError as exc:
            raise NetworkError(f"nftables: reading the ruleset back failed: {exc}") from None
        finally:
            if temporary:
                sock.close()


def open_socket() -> socket.socket:
    """A nf_tables netlink socket of the calling thread's network namespace (the caller
    closes it; closing waits while a deleted table's destruction is pending)."""
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_NETFILTER
    )
    sock.settimeout(NETLINK_TIMEOUT)
    sock.bind((0, 0))
    return sock


def table_count() -> int:
    """How many tables (any family) the calling thread's namespace has: one dump, no cache."""
    return len(_dump(None, _NFT_MSG_GETTABLE, 0, b""))


def snapshot_table(
    sock: socket.socket, table: str, family: str = "inet"
) -> list[tuple[int, int, bytes]]:
    """The NEW messages ((type, flags, payload), in order: table, chains, sets, elements,
    rules) that recreate ``table`` as it is in the namespace of ``sock``."""
    fam = FAMILIES[family]
    name = _strz(table)
    by_name = _attr(_NFTA_TABLE_NAME, name)
    tables = [t for t in _dump(sock, _NFT_MSG_GETTABLE, fam, b"")
              if (_NFTA_TABLE_NAME, name) in _attributes(t)]  # fmt: skip
    if not tables:
        raise NetworkError(f"nftables: table {family} {table} is not there to be read back")

    def ours(payloads: list[bytes]) -> list[bytes]:
        # Not every dump filters by the table named in its request (chains: none does):
        # only objects whose table attribute (type 1 of chains, sets, rules) is ours.
        return [p for p in payloads if (1, name) in _attributes(p)]

    out = [(_NFT_MSG_NEWTABLE, _NLM_F_CREATE, _recreate(_NFT_MSG_NEWTABLE, tables[0]))]
    for chain in ours(_dump(sock, _NFT_MSG_GETCHAIN, fam, by_name)):
        out.append((_NFT_MSG_NEWCHAIN, _NLM_F_CREATE, _recreate(_NFT_MSG_NEWCHAIN, chain)))
    sets = ours(_dump(sock, _NFT_MSG_GETSET, fam, by_name))
    for number, found in enumerate(sets, 1):
        # A set's ID (which the kernel does not report) is required to create one.
        payload = _recreate(_NFT_MSG_NEWSET, found) + _attr(_NFTA_SET_ID, struct.pack(">I", number))
        out.append((_NFT_MSG_NEWSET, _NLM_F_CREATE, payload))
    for found in sets:
        set_name = dict(_attributes(found))[_NFTA_SET_NAME]
        head = by_name + _attr(_NFTA_SET_ELEM_LIST_SET, set_name)
        for elements in _dump(sock, _NFT_MSG_GETSETELEM, fam, head):
            out.append((_NFT_MSG_NEWSETELEM, _NLM_F_CREATE, elements))
    for rule in ours(_dump(sock, _NFT_MSG_GETRULE, fam, by_name)):
        out.append(
            (_NFT_MSG_NEWRULE, _NLM_F_CREATE | _NLM_F_APPEND, _recreate(_NFT_MSG_NEWRULE, rule))
        )
    return out


def replay(
    messages: list[tuple[int, int, bytes]], table: str, family: str = "inet", *, replace: bool
) -> None:
    """Create the table :func:`snapshot_table` read, here, in one transaction; ``replace``
    destroys an existing one of that name first, in the same transaction."""
    batch = list(messages)
    if replace:
        batch.insert(0, (_NFT_MSG_DESTROYTABLE, 0, _attr(_NFTA_TABLE_NAME, _strz(table))))
    errs = _talk(batch, FAMILIES[family], batch=True, ack_each=False)
    failed = [(i, e) for i, e in enumerate(errs) if e]
    if failed:
        index, err = failed[0]
        raise NetworkError(
            f"nftables: recreating table {family} {table} failed at message {index} "
            f"(type {batch[index][0]}): {os.strerror(err)}"
        )


#: What the kernel's answers to NEWSETELEM mean here.
_ELEMENT_ERRORS = {
    errno.ENOENT: "no such table or set",
    errno.EINVAL: "an element does not fit the set (address family, or no timeout flag)",
    errno.ENFILE: "the set is full",
    errno.ERANGE: "a timeout is out of range",
}
