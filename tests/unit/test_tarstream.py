"""The tar stream of ``corral cp``: round trips, interop with Python's tarfile and GNU tar's
forms, bounds, and a fuzz of the reader (hypothesis + a seeded mutation loop): whatever the
bytes, it either yields events or raises TarError, never anything else."""

from __future__ import annotations

import contextlib
import io
import random
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.runtime import tarstream
from corral.runtime.tarstream import (
    ARCHIVE_END,
    DIR,
    END_OF_ARCHIVE,
    ENTRY_END,
    FILE,
    MAX_EXTENDED_HEADER,
    MAX_NAME,
    SYMLINK,
    TarData,
    TarEntry,
    TarError,
    TarReader,
    encode_entry,
    member_path_parts,
    padding,
)


def archive(entries: list[tuple[TarEntry, bytes]]) -> bytes:
    out = b""
    for entry, data in entries:
        out += encode_entry(entry) + data + padding(len(data))
    return out + END_OF_ARCHIVE


def read_all(data: bytes, piece: int = 7) -> list[tuple[TarEntry, bytes]]:
    """Every member and its content, feeding ``piece`` bytes at a time."""
    reader = TarReader()
    out: list[tuple[TarEntry, bytes]] = []
    current: list[bytes] = []
    entry: TarEntry | None = None
    pos = 0
    while True:
        event = reader.next_event()
        if event is None:
            if pos >= len(data):
                reader.feed_eof()
            else:
                reader.feed(data[pos : pos + piece])
                pos += piece
            continue
        if event is ARCHIVE_END:
            return out
        if isinstance(event, TarEntry):
            entry, current = event, []
        elif isinstance(event, TarData):
            current.append(event.data)
        elif event is ENTRY_END:
            assert entry is not None
            out.append((entry, b"".join(current)))


SAMPLE = [
    (TarEntry("top", DIR, mode=0o755, uid=0, gid=0, mtime=1_700_000_000), b""),
    (TarEntry("top/a.txt", FILE, mode=0o640, uid=1000, gid=100, size=5, mtime=1.0), b"hello"),
    (TarEntry("top/run.sh", FILE, mode=0o4755, size=0, mtime=2.0), b""),
    (TarEntry("top/link", SYMLINK, mode=0o777, target="../etc/passwd", mtime=3.0), b""),
    (TarEntry("top/" + "d" * 120 + "/é ünïcode", FILE, size=3, mtime=4.0), b"xyz"),
    (TarEntry("top/long-link", SYMLINK, target="/" + "t" * 300), b""),
    (TarEntry("top/big-ids", FILE, uid=3_000_000, gid=4_000_000, size=1, mtime=5.0), b"!"),
]


@pytest.mark.parametrize("piece", [1, 7, 512, 100_000])
def test_round_trip(piece: int) -> None:
    got = read_all(archive(SAMPLE), piece)
    assert [(e.path, e.kind, e.mode, e.uid, e.gid, e.target, d) for e, d in got] == [
        (e.path, e.kind, e.mode, e.uid, e.gid, e.target, d) for e, d in SAMPLE
    ]
    assert [int(e.mtime) for e, _ in got] == [int(e.mtime) for e, _ in SAMPLE]


def test_python_tarfile_reads_what_we_write() -> None:
    with tarfile.open(fileobj=io.BytesIO(archive(SAMPLE)), mode="r:") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [e.path for e, _ in SAMPLE]
        assert members[1].mode == 0o640 and members[1].uid == 1000
        assert members[3].issym() and members[3].linkname == "../etc/passwd"
        assert members[5].linkname == "/" + "t" * 300
        assert members[6].uid == 3_000_000
        f = tar.extractfile(members[4])
        assert f is not None and f.read() == b"xyz"


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_we_read_what_python_tarfile_writes(fmt: int) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        d = tarfile.TarInfo("dir")
        d.type, d.mode = tarfile.DIRTYPE, 0o700
        tar.addfile(d)
        name = "dir/" + ("n" * 60 + "/") * 2 + "f" if fmt != tarfile.USTAR_FORMAT else "dir/f"
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.uid = 4, 0o600, 7
        tar.addfile(info, io.BytesIO(b"data"))
        link = tarfile.TarInfo("dir/l")
        link.type, link.linkname = tarfile.SYMTYPE, "f"
        tar.addfile(link)
    got = read_all(buf.getvalue())
    assert [(e.path, e.kind) for e, _ in got] == [("dir", DIR), (name, FILE), ("dir/l", SYMLINK)]
    assert got[1][1] == b"data" and got[1][0].uid == 7 and got[1][0].mode == 0o600


def test_ustar_prefix_field() -> None:
    buf = io.BytesIO()
    name = "p" * 120 + "/file"
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        tar.addfile(info, io.BytesIO(b""))
    assert read_all(buf.getvalue())[0][0].path == name


def test_bounds() -> None:
    huge_pax = tarstream._raw_header(
        b"././@PaxHeader", b"x", 0o644, 0, 0, MAX_EXTENDED_HEADER + 1, 0, b""
    )
    reader = TarReader()
    reader.feed(huge_pax)
    with pytest.raises(TarError, match="extended header"):
        reader.next_event()
    long = TarEntry("n" * (MAX_NAME + 1), FILE)
    with pytest.raises(TarError, match="longer than"):
        read_all(archive([(long, b"")]))


def test_bad_checksum_and_truncation() -> None:
    data = bytearray(archive(SAMPLE[:2]))
    data[0] ^= 1
    with pytest.raises(TarError, match="checksum"):
        read_all(bytes(data))
    whole = archive(SAMPLE[:2])
    with pytest.raises(TarError, match="ended"):
        read_all(whole[: 512 + 3])


def test_member_paths_cannot_climb() -> None:
    assert member_path_parts("a/./b/") == ["a", "b"]
    for bad in ("/etc/passwd", "a/../../b", ".."):
        with pytest.raises(TarError):
            member_path_parts(bad)


def test_writer_refuses_other_kinds() -> None:
    with pytest.raises(ValueError):
        encode_entry(TarEntry("dev", "other"))


def _events(data: bytes) -> None:
    reader = TarReader()
    reader.feed(data)
    reader.feed_eof()
    for _ in range(100_000):
        event = reader.next_event()
        if event is None or event is ARCHIVE_END:
            return
        if isinstance(event, TarEntry):
            with contextlib.suppress(TarError):
                member_path_parts(event.path)
    raise AssertionError("the reader did not end")


@given(st.binary(max_size=3000))
@settings(max_examples=300)
def test_random_bytes_never_crash(data: bytes) -> None:
    with contextlib.suppress(TarError):
        _events(data)


def test_seeded_mutations_never_crash() -> None:
    rng = random.Random(20261202)
    base = archive(SAMPLE)
    for _ in range(3000):
        data = bytearray(base)
        for _ in range(rng.randint(1, 8)):
            choice = rng.random()
            pos = rng.randrange(len(data))
            if choice < 0.6:
                data[pos] = rng.randrange(256)
            elif choice < 0.8:
                del data[pos : pos + rng.randint(1, 600)]
            else:
                data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
        with contextlib.suppress(TarError):
            _events(bytes(data))
