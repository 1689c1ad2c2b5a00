"""nftables in-process: a small ctypes binding of Debian's ``libnftables1``.

``nft -f`` is a process start, a PATH search and a dynamic link of libnftables for every
transaction (about 3-4 ms here); a sandbox's create and remove each need one, and the DNS
interceptor adds set elements per answer. The library behind ``nft`` takes the same text
(``nft -f`` syntax, one call = one atomic netlink batch) in-process, so this module keeps one
``nft_ctx`` per process and feeds it strings.

Loaded by its soname (``libnftables.so.1``), never through ``ctypes.util.find_library``
(which runs ``ldconfig -p`` and ``gcc``, tens of milliseconds, on each call). The library is
loaded at import, so a fork server that imported this module hands it, mapped and linked, to
every child; the context (it owns a netlink socket) is made lazily and per process, so a
forked child never shares its parent's socket.

A netlink socket talks to the network namespace it was opened in. The kept context belongs to
the netns of the process's first call; a call from a thread that is in another netns gets a
context of its own for that call (opened and freed around it, ~0.3 ms more), so no socket
keeps a namespace alive behind anyone's back.

Thread safety: libnftables keeps process-wide state outside the context (its interface name
cache is a global), so one lock serialises every call of the process; a call takes well under
a millisecond, and nothing calls it on a per-packet path.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading

from corral.errors import NetworkError

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
_ctx: int | None = None
#: (pid, netns device, netns inode) the kept context was made for.
_ctx_key: tuple[int, int, int] = (0, 0, 0)


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


def _context() -> tuple[int, bool]:
    """(context, whether the caller must free it after the call). Holds _lock."""
    global _ctx, _ctx_key
    st = os.stat("/proc/thread-self/ns/net")
    pid = os.getpid()
    key = (pid, st.st_dev, st.st_ino)
    if _ctx is not None and _ctx_key == key:
        return _ctx, False
    if _ctx is not None and _ctx_key[0] == pid:
        return _new_context(), True  # a thread in another netns: a context for this call
    # First use, or a context inherited through fork: that one is abandoned, not freed
    # (freeing would close a socket number this process may have reused; it is the parent's).
    _ctx, _ctx_key = _new_context(), key
    return _ctx, False


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
        ctx, temporary = _context()
        assert _lib is not None
        try:
            run_input = _run_as_file if multiline else _lib.nft_run_cmd_from_buffer
            rc = run_input(ctx, data)
            # Reading a buffer rewinds it, so the next call starts empty.
            out = _buffer(_lib.nft_ctx_get_output_buffer(ctx))
            err = _buffer(_lib.nft_ctx_get_error_buffer(ctx))
        finally:
            if temporary:
                _lib.nft_ctx_free(ctx)
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


def table_names(family: str = "inet") -> set[str]:
    """Names of the tables of ``family`` (cheap: tables only, no chains or sets)."""
    names: set[str] = set()
    for line in run(f"list tables {family}").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "table" and parts[1] == family:
            names.add(parts[2])
    return names
