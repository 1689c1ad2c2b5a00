"""Tar archives as a byte stream, both ways, with no I/O (h11 style): what ``corral cp`` and
``fs.copy_in``/``copy_out`` of directories send over the sandbox's channel.

Why not :mod:`tarfile`: the archive a sandbox sends is hostile input for the host, and
tarfile reads a pax header of any declared size into memory at once, and looks owner names
up through NSS (``pwd``/``grp``), which inside the sandbox's init would load the sandbox's
own libraries. This module knows only what corral's copies need - regular files,
directories, symbolic links, their mode, owner ids and mtime - and bounds everything it
buffers:

* :class:`TarReader` is fed bytes and yields events: a :class:`TarEntry` (one member's
  header), :class:`TarData` chunks of its content (never more than it was fed), then
  :data:`ENTRY_END`, and :data:`ARCHIVE_END` after the terminating zero block. It reads
  ustar headers (with their 155-byte prefix), POSIX pax extended headers (path, linkpath,
  size, uid, gid, mtime) and GNU long names, checks every header's checksum, and raises
  :class:`TarError` (one sentence) on anything else that is malformed.
* :func:`encode_entry` writes a member's header (a pax header first when a name, a size or
  an id does not fit ustar's fields); :func:`padding` and :data:`END_OF_ARCHIVE` finish it.

Names are ``str`` decoded with ``surrogateescape`` (``os.fsdecode``), so any byte sequence a
file system holds survives the round trip.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: Size of a tar block; headers are one block, data is padded to a whole number of them.
BLOCK = 512

#: The end of an archive: two zero blocks (POSIX; readers stop at the first).
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)

#: Longest member name or link target accepted: Linux's PATH_MAX (4096) - a path longer
#: than that cannot be created with one system call anyway. GNU tar and libarchive have no
#: fixed limit; a bound is what keeps a hostile archive from making us buffer a name of any
#: size.
MAX_NAME = 4096

#: Largest pax extended header (or GNU long-name block) read into memory. Its records are a
#: path and a link target (each <= MAX_NAME) and a few numbers; 64 KiB leaves room for the
#: extra records other writers add (atime, ctime, SCHILY xattrs, comments), which are
#: read and ignored. libarchive caps pax headers at 1 MiB, Go's archive/tar at 1 MiB too;
#: ours only ever carries paths, so it can be 16 times smaller.
MAX_EXTENDED_HEADER = 64 * 1024

#: Largest value of ustar's 7-digit octal id fields and 11-digit size/mtime fields.
_MAX_OCTAL_7 = 0o7777777
_MAX_OCTAL_11 = 0o77777777777

#: Member kinds corral copies; everything else in an archive is reported as "other".
FILE = "file"
DIR = "dir"
SYMLINK = "symlink"
HARDLINK = "hardlink"
OTHER = "other"

_TYPEFLAG_KIND = {b"0": FILE, b"\0": FILE, b"7": FILE, b"5": DIR, b"2": SYMLINK, b"1": HARDLINK}
_KIND_TYPEFLAG = {FILE: b"0", DIR: b"5", SYMLINK: b"2"}


class TarError(ValueError):
    """The bytes are not a tar archive corral can read; the message says what and where."""


@dataclass(frozen=True)
class TarEntry:
    """One member: ``path`` relative (``a/b``), ``kind`` (FILE, DIR, SYMLINK, HARDLINK,
    OTHER), permission bits ``mode`` (including set-id and sticky bits), owner ids, size of
    its content (files only), mtime in seconds, and for links the ``target``."""

    path: str
    kind: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime: float = 0.0
    target: str = ""


@dataclass(frozen=True)
class TarData:
    """A piece of the current member's content."""

    data: bytes


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: The current member's content is complete.
ENTRY_END = _Marker("ENTRY_END")
#: The archive's end-of-archive block was read; nothing after it is looked at.
ARCHIVE_END = _Marker("ARCHIVE_END")

TarEvent = TarEntry | TarData | _Marker


# --- reading ---------------------------------------------------------------------------------


def _octal(field: bytes, what: str) -> int:
    """A numeric header field: octal digits (NUL/space padded), or GNU base-256."""
    if field and field[0] & 0x80:
        # GNU base-256: big-endian two's complement in the rest of the field.
        value = int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
        if field[0] & 0x40:
            raise TarError(f"tar header field {what} is negative")
        return value
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if not all(48 <= c <= 55 for c in text):
        raise TarError(f"tar header field {what} is not an octal number: {text[:20]!r}")
    return int(text, 8)


def _name(raw: bytes, what: str) -> str:
    if len(raw) > MAX_NAME:
        raise TarError(f"tar member {what} is longer than {MAX_NAME} bytes")
    if b"\0" in raw:
        raise TarError(f"tar member {what} contains a NUL byte")
    return os.fsdecode(raw)


def _parse_pax(body: bytes) -> dict[str, bytes]:
    """Records ``"<len> <key>=<value>\\n"`` of a pax extended header."""
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(body):
        if body[pos] == 0:
            break  # NUL padding after the last record
        space = body.find(b" ", pos, pos + 20)
        if space < 0 or not body[pos:space].isdigit():
            raise TarError("tar pax header has a record without a length")
        length = int(body[pos:space])
        end = pos + length
        if length < 5 or end > len(body) or body[end - 1 : end] != b"\n":
            raise TarError("tar pax header has a record whose length does not fit")
        key, eq, value = body[space + 1 : end - 1].partition(b"=")
        if not eq:
            raise TarError("tar pax header has a record without '='")
        records[key.decode("utf-8", "replace")] = value
        pos = end
    return records


class TarReader:
    """Sans-I/O tar reader: ``feed(bytes)``, ``feed_eof()``, then ``next_event()`` until it
    returns None (more bytes needed) or ARCHIVE_END. See the module docstring."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._eof = False
        self._done = False
        self._remaining = 0  # content bytes of the current member still to come
        self._pad = 0  # padding bytes after it
        self._in_entry = False
        self._extended: dict[str, bytes] = {}  # from a pax header, for the next member
        self._long_name: bytes | None = None
        self._long_link: bytes | None = None
        self._pending_ext: tuple[bytes, int] | None = None  # (typeflag, size) being read

    def feed(self, data: bytes) -> None:
        if self._eof:
            raise TarError("tar data after the end of the stream")
        self._buf += data

    def feed_eof(self) -> None:
        self._eof = True

    @property
    def done(self) -> bool:
        return self._done

    def next_event(self) -> TarEvent | None:
        if self._done:
            return ARCHIVE_END
        while True:
            if self._in_entry:
                if self._remaining:
                    if not self._buf:
                        self._need_more("the content of a member")
                        return None
                    take = min(self._remaining, len(self._buf))
                    chunk = bytes(self._buf[:take])
                    del self._buf[:take]
                    self._remaining -= take
                    return TarData(chunk)
                if self._pad:
                    take = min(self._pad, len(self._buf))
                    del self._buf[:take]
                    self._pad -= take
                    if self._pad:
                        self._need_more("the padding of a member")
                        return None
                self._in_entry = False
                return ENTRY_END
            if self._pending_ext is not None:
                flag, size = self._pending_ext
                total = size + (-size % BLOCK)
                if len(self._buf) < total:
                    self._need_more("an extended header")
                    return None
                body = bytes(self._buf[:size])
                del self._buf[:total]
                self._pending_ext = None
                self._take_extended(flag, body)
                continue
            if len(self._buf) < BLOCK:
                if self._eof and not self._buf:
                    raise TarError("the tar stream ended without its end-of-archive block")
                self._need_more("a member header")
                return None
            block = bytes(self._buf[:BLOCK])
            del self._buf[:BLOCK]
            if block == b"\0" * BLOCK:
                self._done = True
                self._buf.clear()
                return ARCHIVE_END
            entry = self._header(block)
            if entry is not None:
                return entry

    def _need_more(self, what: str) -> None:
        """Raise if no more bytes can come (the stream ended inside ``what``)."""
        if self._eof:
            raise TarError(f"the tar stream ended inside {what}")

    def _header(self, block: bytes) -> TarEntry | None:
        stored = _octal(block[148:156], "chksum")
        unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
        signed = unsigned - 2 * sum(b for b in block[:148] + block[156:] if b & 0x80)
        if stored not in (unsigned, signed):
            raise TarError("a tar header's checksum does not match (not a tar stream?)")
        flag = block[156:157]
        size = _octal(block[124:136], "size")
        if flag in (b"x", b"g", b"L", b"K"):
            if size > MAX_EXTENDED_HEADER:
                raise TarError(
                    f"a tar extended header of {size} bytes is larger than the "
                    f"{MAX_EXTENDED_HEADER} accepted"
                )
            self._pending_ext = (flag, size)
            return None
        ext, self._extended = self._extended, {}
        long_name, self._long_name = self._long_name, None
        long_link, self._long_link = self._long_link, None
        if "size" in ext:
            size = _pax_int(ext["size"], "size")
        kind = _TYPEFLAG_KIND.get(flag, OTHER)
        if "path" in ext:
            raw_name = ext["path"]
        elif long_name is not None:
            raw_name = long_name
        else:
            raw_name = block[0:100].split(b"\0", 1)[0]
            if block[257:262] == b"ustar":
                prefix = block[345:500].split(b"\0", 1)[0]
                if prefix:
                    raw_name = prefix + b"/" + raw_name
        raw_link = ext.get("linkpath", long_link)
        if raw_link is None:
            raw_link = block[157:257].split(b"\0", 1)[0]
        path = _name(raw_name, "name")
        path = path.rstrip("/") or path  # directories are often written "dir/"
        if not path:
            raise TarError("a tar member has an empty name")
        entry = TarEntry(
            path=path,
            kind=kind,
            mode=_octal(block[100:108], "mode") & 0o7777,
            uid=_pax_int(ext["uid"], "uid") if "uid" in ext else _octal(block[108:116], "uid"),
            gid=_pax_int(ext["gid"], "gid") if "gid" in ext else _octal(block[116:124], "gid"),
            size=size if kind in (FILE, OTHER) else 0,
            mtime=(
                _pax_float(ext["mtime"]) if "mtime" in ext else float(_octal(block[136:148], "mtime"))
            ),
            target=_name(raw_link, "link target") if kind in (SYMLINK, HARDLINK) else "",
        )
        # Content follows for regular files (and, by the size field, for unknown kinds);
        # links and directories carry none whatever their size field says.
        self._remaining = entry.size
        self._pad = -entry.size % BLOCK
        self._in_entry = True
        return entry

    def _take_extended(self, flag: bytes, body: bytes) -> None:
        if flag == b"x":
            self._extended = _parse_pax(body)
        elif flag == b"g":
            _parse_pax(body)  # global defaults: checked, not applied (corral writes none)
        elif flag == b"L":
            self._long_name = body.split(b"\0", 1)[0]
        else:
            self._long_link = body.split(b"\0", 1)[0]


def _pax_int(value: bytes, what: str) -> int:
    if not value.isdigit() or len(value) > 20:
        raise TarError(f"tar pax record {what} is not a number: {value[:20]!r}")
    return int(value)


def _pax_float(value: bytes) -> float:
    whole, _, frac = value.partition(b".")
    sign = -1.0 if whole.startswith(b"-") else 1.0
    whole = whole.lstrip(b"-")
    if not whole.isdigit() or (frac and not frac.isdigit()) or len(value) > 40:
        raise TarError(f"tar pax record mtime is not a time: {value[:20]!r}")
    return sign * float(whole + b"." + (frac or b"0"))


# --- writing ---------------------------------------------------------------------------------


def _pax_record(key: str, value: bytes) -> bytes:
    payload = b" " + key.encode() + b"=" + value + b"\n"
    length = len(payload) + 1
    while len(str(length)) + len(payload) != length:
        length = len(str(length)) + len(payload)
    return str(length).encode() + payload


def _octal_field(value: int, width: int) -> bytes:
    return (f"{value:0{width - 1}o}").encode() + b"\0"


def _raw_header(
    name: bytes, flag: bytes, mode: int, uid: int, gid: int, size: int, mtime: int, link: bytes
) -> bytes:
    header = bytearray(BLOCK)
    header[0 : len(name)] = name
    header[100:108] = _octal_field(mode, 8)
    header[108:116] = _octal_field(uid, 8)
    header[116:124] = _octal_field(gid, 8)
    header[124:136] = _octal_field(size, 12)
    header[136:148] = _octal_field(mtime, 12)
    header[156:157] = flag
    header[157 : 157 + len(link)] = link
    header[257:263] = b"ustar\0"
    header[263:265] = b"00"
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}".encode() + b"\0 "
    return bytes(header)


def encode_entry(entry: TarEntry) -> bytes:
    """The header block(s) of ``entry``: a pax header first when its name or target is not
    short ASCII, or a number does not fit ustar's fields. Content and padding follow."""
    flag = _KIND_TYPEFLAG.get(entry.kind)
    if flag is None:
        raise ValueError(f"corral writes files, directories and symlinks, not {entry.kind!r}")
    name = os.fsencode(entry.path)
    link = os.fsencode(entry.target) if entry.kind == SYMLINK else b""
    size = entry.size if entry.kind == FILE else 0
    mtime = max(0, int(entry.mtime))
    records = b""
    if len(name) > 99 or not name.isascii():
        records += _pax_record("path", name)
        name = name[:99].decode("ascii", "replace").encode("ascii", "replace")
    if len(link) > 99 or not link.isascii():
        records += _pax_record("linkpath", link)
        link = link[:99].decode("ascii", "replace").encode("ascii", "replace")
    for key, value, limit in (
        ("uid", entry.uid, _MAX_OCTAL_7),
        ("gid", entry.gid, _MAX_OCTAL_7),
        ("size", size, _MAX_OCTAL_11),
        ("mtime", mtime, _MAX_OCTAL_11),
    ):
        if value > limit:
            records += _pax_record(key, str(value).encode())
    uid = min(entry.uid, _MAX_OCTAL_7)
    gid = min(entry.gid, _MAX_OCTAL_7)
    out = b""
    if records:
        out += _raw_header(b"././@PaxHeader", b"x", 0o644, 0, 0, len(records), 0, b"")
        out += records + padding(len(records))
    out += _raw_header(
        name, flag, entry.mode & 0o7777, uid, gid, min(size, _MAX_OCTAL_11),
        min(mtime, _MAX_OCTAL_11), link,
    )  # fmt: skip
    return out


def padding(size: int) -> bytes:
    """The zero bytes that follow ``size`` bytes of content up to a whole block."""
    return b"\0" * (-size % BLOCK)


def member_path_parts(path: str) -> list[str]:
    """The components of a member's path, or TarError when it is absolute or climbs
    (``..``), so that it could land outside the directory it is extracted into."""
    if path.startswith("/"):
        raise TarError(f"tar member {path!r} has an absolute path")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise TarError(f"tar member {path!r} climbs out of its directory ('..')")
    return parts
