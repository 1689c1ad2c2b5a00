"""Layer unpacking: whiteouts, opaque dirs, compression, and hostile tar members."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import shutil
import stat
import tarfile
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.errors import ImageError
from corral.runtime.images.idmap import ID_RANGE, OVERFLOW_ID, UID_BASE, shift_id
from corral.runtime.images.unpack import LayerApplier

Member = tuple[tarfile.TarInfo, bytes | None]


def f(name: str, data: bytes = b"x", mode: int = 0o644, uid: int = 0, gid: int = 0) -> Member:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.uid, info.gid = len(data), mode, uid, gid
    return info, data


def d(name: str, mode: int = 0o755) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, mode
    return info, None


def sym(name: str, target: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info, None


def hard(name: str, target: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.LNKTYPE, target
    return info, None


def dev(name: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    return info, None


def tar_bytes(*members: Member) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


@pytest.fixture
def env(tmp_path: Path) -> tuple[Path, Path, LayerApplier]:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("do not touch")
    return root, outside, LayerApplier(root, shift_ids=False)


def apply(applier: LayerApplier, *members: Member, compress: str = "none") -> str:
    data = tar_bytes(*members)
    if compress == "gzip":
        data = gzip.compress(data)
    elif compress == "zstd":
        data = zstandard.ZstdCompressor().compress(data)
    return applier.apply(io.BytesIO(data), "layer")


def tree(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            out.append(os.path.relpath(os.path.join(dirpath, n), root))
    return sorted(out)


def assert_outside_untouched(tmp_path: Path, outside: Path) -> None:
    assert sorted(os.listdir(tmp_path)) == ["outside", "root"]
    assert os.listdir(outside) == ["secret"]
    assert (outside / "secret").read_text() == "do not touch"
    assert os.stat(outside / "secret").st_nlink == 1


@pytest.mark.parametrize("compress", ["none", "gzip", "zstd"])
def test_basic_layer_and_diff_id(env: tuple[Path, Path, LayerApplier], compress: str) -> None:
    root, _, applier = env
    members = (d("bin"), f("bin/tool", b"#!", 0o755), sym("bin/alias", "tool"), f("./etc/x"))
    diff_id = apply(applier, *members, compress=compress)
    assert diff_id == "sha256:" + hashlib.sha256(tar_bytes(*members)).hexdigest()
    assert tree(root) == ["bin", "bin/alias", "bin/tool", "etc", "etc/x"]
    assert stat.S_IMODE(os.lstat(root / "bin/tool").st_mode) == 0o755
    assert os.readlink(root / "bin/alias") == "tool"


def test_whiteouts(env: tuple[Path, Path, LayerApplier]) -> None:
    root, _, applier = env
    apply(applier, d("a"), f("a/x"), f("a/y"), d("b"), f("b/z"), f("c"))
    apply(applier, f("a/.wh.x", b""), f(".wh.b", b""), f(".wh.c", b""), f("c2"))
    assert tree(root) == ["a", "a/y", "c2"]


def test_opaque_dir_hides_only_lower_content(env: tuple[Path, Path, LayerApplier]) -> None:
    root, _, applier = env
    apply(applier, d("d"), f("d/old"), d("d/sub"), f("d/sub/deep"), f("keep"))
    # The marker comes after new entries of the same layer: they must survive it.
    apply(applier, d("d"), f("d/new"), d("d/sub"), f("d/sub/fresh"), f("d/.wh..wh..opq", b""))
    assert tree(root) == ["d", "d/new", "d/sub", "d/sub/fresh", "keep"]


def test_later_layer_replaces_types(env: tuple[Path, Path, LayerApplier]) -> None:
    root, _, applier = env
    apply(applier, d("x"), f("x/inner"), f("y"), sym("z", "y"))
    apply(applier, f("x", b"now a file"), d("y"), f("z", b"file, not link"))
    assert (root / "x").read_bytes() == b"now a file"
    assert (root / "y").is_dir()
    assert not (root / "z").is_symlink()


def test_dotdot_is_refused(tmp_path: Path, env: tuple[Path, Path, LayerApplier]) -> None:
    _, outside, applier = env
    with pytest.raises(ImageError, match="climbs out of the rootfs"):
        apply(applier, f("../outside/secret", b"pwned"))
    with pytest.raises(ImageError, match="climbs out"):
        apply(applier, f("a/../../outside/new"))
    assert_outside_untouched(tmp_path, outside)


def test_absolute_names_stay_inside(tmp_path: Path, env: tuple[Path, Path, LayerApplier]) -> None:
    root, outside, applier = env
    apply(applier, f(str(outside / "secret"), b"pwned"), f("/etc/x"))
    assert (root / "etc/x").exists()
    assert (root / str(outside / "secret").lstrip("/")).read_bytes() == b"pwned"
    assert_outside_untouched(tmp_path, outside)


def test_write_through_symlinks_stays_inside(
    tmp_path: Path, env: tuple[Path, Path, LayerApplier]
) -> None:
    root, outside, applier = env
    apply(
        applier,
        sym("abs", str(outside)),
        f("abs/secret", b"pwned"),
        sym("rel", "../../../../.."),
        f("rel/escaped", b"pwned"),
        sym("loop", "loop"),
    )
    # Both resolved inside the root, as in a chroot.
    assert (root / str(outside).lstrip("/") / "secret").read_bytes() == b"pwned"
    assert (root / "escaped").read_bytes() == b"pwned"
    with pytest.raises(ImageError, match="too many symlinks"):
        apply(applier, f("loop/x"))
    assert_outside_untouched(tmp_path, outside)


def test_symlink_as_last_component_is_replaced_not_followed(
    tmp_path: Path, env: tuple[Path, Path, LayerApplier]
) -> None:
    root, outside, applier = env
    apply(applier, sym("target", str(outside / "secret")))
    apply(applier, f("target", b"pwned"))
    assert (root / "target").read_bytes() == b"pwned"
    assert_outside_untouched(tmp_path, outside)


def test_symlink_in_same_layer_then_write(
    tmp_path: Path, env: tuple[Path, Path, LayerApplier]
) -> None:
    _, outside, applier = env
    apply(applier, sym("t", str(outside / "secret")), f("t", b"pwned"))
    assert_outside_untouched(tmp_path, outside)


def test_hard_links_stay_inside(tmp_path: Path, env: tuple[Path, Path, LayerApplier]) -> None:
    root, outside, applier = env
    with pytest.raises(ImageError, match="climbs out"):
        apply(applier, hard("h", "../outside/secret"))
    with pytest.raises(ImageError, match="points at missing"):
        apply(applier, hard("h", str(outside / "secret")))
    with pytest.raises(ImageError, match="points at missing"):
        apply(applier, sym("s", str(outside)), hard("h2", "s/secret"))
    apply(applier, f("real", b"data"), hard("alias", "real"))
    assert os.stat(root / "alias").st_ino == os.stat(root / "real").st_ino
    with pytest.raises(ImageError, match="points at directory"):
        apply(applier, d("dd"), hard("hd", "dd"))
    assert_outside_untouched(tmp_path, outside)


def test_devices_skipped_fifos_kept(env: tuple[Path, Path, LayerApplier]) -> None:
    root, _, applier = env
    fifo = tarfile.TarInfo("pipe")
    fifo.type, fifo.mode = tarfile.FIFOTYPE, 0o600
    apply(applier, d("dev"), dev("dev/null"), (fifo, None))
    assert tree(root) == ["dev", "pipe"]
    assert stat.S_ISFIFO(os.lstat(root / "pipe").st_mode)
    assert applier.skipped_devices == 1


def test_truncated_layers(env: tuple[Path, Path, LayerApplier]) -> None:
    _, _, applier = env
    data = tar_bytes(f("big", os.urandom(64 * 1024)))
    with pytest.raises(ImageError, match="truncated or not a valid tar"):
        applier.apply(io.BytesIO(gzip.compress(data)[:5000]), "layer")
    with pytest.raises(ImageError, match="truncated"):
        applier.apply(io.BytesIO(data[:20000]), "layer")
    with pytest.raises(ImageError, match="truncated or not a valid tar"):
        applier.apply(io.BytesIO(zstandard.ZstdCompressor().compress(data)[:3000]), "layer")


def test_id_shift_function() -> None:
    assert shift_id(0) == UID_BASE
    assert shift_id(1000) == UID_BASE + 1000
    assert shift_id(ID_RANGE - 1) == UID_BASE + ID_RANGE - 1
    assert shift_id(ID_RANGE) == UID_BASE + OVERFLOW_ID
    assert shift_id(2**32 - 1) == UID_BASE + OVERFLOW_ID


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to shifted ids needs root")
def test_ownership_is_shifted_and_setuid_survives(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    applier = LayerApplier(root, shift_ids=True)
    apply(
        applier,
        d("bin"),
        f("bin/su", b"elf", 0o4755, uid=0, gid=0),
        f("bin/sg", b"elf", 0o2755, uid=5, gid=7),
        f("home-file", uid=1000, gid=1000),
        f("huge-id", uid=70000, gid=4_000_000_000),
        sym("link", "bin/su"),
    )
    st_su = os.lstat(root / "bin/su")
    assert (st_su.st_uid, st_su.st_gid) == (UID_BASE, UID_BASE)
    assert stat.S_IMODE(st_su.st_mode) == 0o4755
    st_sg = os.lstat(root / "bin/sg")
    assert (st_sg.st_uid, st_sg.st_gid) == (UID_BASE + 5, UID_BASE + 7)
    assert stat.S_IMODE(st_sg.st_mode) == 0o2755
    assert os.lstat(root / "home-file").st_uid == UID_BASE + 1000
    st_huge = os.lstat(root / "huge-id")
    assert (st_huge.st_uid, st_huge.st_gid) == (UID_BASE + OVERFLOW_ID, UID_BASE + OVERFLOW_ID)
    assert os.lstat(root / "link").st_uid == UID_BASE
    assert os.lstat(root / "bin").st_uid == UID_BASE


# -- property: whatever the members, nothing lands outside the root -------------------------
_names = st.lists(
    st.sampled_from(["a", "b", "..", ".", "", ".wh.a", ".wh..wh..opq", "/", "etc", "out"]),
    min_size=1,
    max_size=4,
).map("/".join)
_targets = st.sampled_from(["a", "../..", "/", "/etc", "b/a", "..", "OUTSIDE", "OUTSIDE/secret"])


@st.composite
def _members(draw: st.DrawFn) -> list[Member]:
    out: list[Member] = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["file", "dir", "sym", "hard", "dev"]))
        name = draw(_names)
        if kind == "file":
            out.append(f(name, draw(st.binary(max_size=8))))
        elif kind == "dir":
            out.append(d(name))
        elif kind == "sym":
            out.append(sym(name, draw(_targets)))
        elif kind == "hard":
            out.append(hard(name, draw(_targets)))
        else:
            out.append(dev(name))
    return out


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(_members(), min_size=1, max_size=3))
def test_no_member_sequence_escapes(tmp_path: Path, layers: list[list[Member]]) -> None:
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(dir=tmp_path))
    try:
        root, outside = base / "root", base / "outside"
        root.mkdir()
        outside.mkdir()
        (outside / "secret").write_text("do not touch")
        applier = LayerApplier(root, shift_ids=False)
        for members in layers:
            fixed = []
            for info, data in members:
                if info.linkname.startswith("OUTSIDE"):
                    info.linkname = info.linkname.replace("OUTSIDE", str(outside))
                fixed.append((info, data))
            with contextlib.suppress(ImageError):
                applier.apply(io.BytesIO(tar_bytes(*fixed)), "layer")
        assert_outside_untouched(base, outside)
        for dirpath, dirnames, filenames in os.walk(root):
            for n in dirnames + filenames:
                assert not n.startswith(".wh."), n
                p = Path(dirpath) / n
                if not p.is_symlink():
                    assert p.resolve().is_relative_to(root.resolve())
    finally:
        shutil.rmtree(base)


_SAMPLE = tar_bytes(d("a"), f("a/x", b"hello"), sym("a/l", "x"), hard("a/h", "a/x"), f("b"))


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(st.tuples(st.integers(0, len(_SAMPLE) - 1), st.integers(0, 255)), max_size=12),
    st.sampled_from(["none", "gzip", "zstd"]),
    st.integers(0, len(_SAMPLE)),
)
def test_mutated_archives_fail_cleanly(
    tmp_path: Path, flips: list[tuple[int, int]], compress: str, cut: int
) -> None:
    import shutil
    import tempfile

    data = bytearray(_SAMPLE)
    for pos, value in flips:
        data[pos] = value
    raw = bytes(data[: max(cut, 1)]) if cut % 3 == 0 else bytes(data)
    if compress == "gzip":
        raw = gzip.compress(raw)
    elif compress == "zstd":
        raw = zstandard.ZstdCompressor().compress(raw)
    base = Path(tempfile.mkdtemp(dir=tmp_path))
    try:
        root = base / "root"
        root.mkdir()
        with contextlib.suppress(ImageError):
            LayerApplier(root, shift_ids=False).apply(io.BytesIO(raw), "layer")
        for dirpath, _, _ in os.walk(root):
            assert Path(dirpath).resolve().is_relative_to(root.resolve())
    finally:
        shutil.rmtree(base)


def _caps_v2(permitted: int, effective: bool = True) -> bytes:
    magic = 0x02000000 | (1 if effective else 0)
    return (
        magic.to_bytes(4, "little")
        + permitted.to_bytes(4, "little")
        + (0).to_bytes(4, "little")
        + (0).to_bytes(8, "little")
    )


CAP_NET_RAW = 1 << 13


@pytest.mark.skipif(os.geteuid() != 0, reason="setting security.capability needs root")
def test_file_capabilities_are_rewritten_for_the_namespace(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    info, data = f("bin/ping", b"elf", 0o755)
    info.pax_headers = {
        "SCHILY.xattr.security.capability": _caps_v2(CAP_NET_RAW).decode(
            "utf-8", "surrogateescape"
        ),
        "SCHILY.xattr.user.note": "hello",
        "SCHILY.xattr.trusted.secret": "dropped",
    }
    applier = LayerApplier(root, shift_ids=True)
    applier.apply(io.BytesIO(tar_bytes((info, data))), "layer")
    value = os.getxattr(root / "bin/ping", "security.capability")
    assert len(value) == 24
    assert int.from_bytes(value[:4], "little") == 0x03000001  # v3, effective
    assert int.from_bytes(value[4:8], "little") == CAP_NET_RAW
    assert int.from_bytes(value[20:24], "little") == UID_BASE  # the sandbox's root
    assert os.getxattr(root / "bin/ping", "user.note") == b"hello"
    assert "trusted.secret" not in os.listxattr(root / "bin/ping")
    assert os.lstat(root / "bin/ping").st_uid == UID_BASE


def test_capability_conversion_rejects_garbage(tmp_path: Path) -> None:
    applier = LayerApplier(tmp_path, shift_ids=False)
    assert applier._capability_for_namespace(b"short") is None
    assert applier._capability_for_namespace(b"\x00" * 24) is None
    v3 = (0x03000000).to_bytes(4, "little") + b"\x00" * 16 + (7).to_bytes(4, "little")
    assert applier._capability_for_namespace(v3) == v3


def test_an_opaque_dir_replaced_by_a_symlink_prunes_nothing_outside(tmp_path: Path) -> None:
    """Found by the fuzz test: ``a/.wh..wh..opq`` then a symlink ``a -> <outside>`` in the
    same layer made the opaque pruning list the link's target and delete the host's files."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("do not touch")
    for target in (str(outside), "..", "../outside"):
        applier = LayerApplier(root, shift_ids=False)
        with contextlib.suppress(ImageError):
            applier.apply(io.BytesIO(tar_bytes(f("a/.wh..wh..opq", b""), sym("a", target))), "layer")
        assert_outside_untouched(tmp_path, outside)
        for leftover in root.iterdir():
            leftover.unlink() if leftover.is_symlink() else shutil.rmtree(leftover)


def test_a_dir_replaced_by_a_symlink_gets_no_mode_change_outside(tmp_path: Path) -> None:
    """``a/b/`` (its mode applied at the layer's end) then ``a -> <outside>``: the mode must not
    land on ``<outside>/b``."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    (outside / "b").mkdir(parents=True)
    (outside / "b").chmod(0o700)
    (outside / "secret").write_text("do not touch")
    layer = tar_bytes(d("a"), d("a/b", mode=0o777), sym("a", str(outside)))
    with contextlib.suppress(ImageError):
        LayerApplier(root, shift_ids=False).apply(io.BytesIO(layer), "layer")
    assert (outside / "b").stat().st_mode & 0o777 == 0o700
