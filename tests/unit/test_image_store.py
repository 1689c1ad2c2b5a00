"""The store without network or root: local import, refs, debris cleaning, remove."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from corral.errors import ImageError
from corral.runtime import paths
from corral.runtime.images import ImageStore


def _tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hostname").write_text("box\n")
    return src


def test_import_lookup_resolve_remove(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images", shift_ids=False)
    img = store.import_path(_tree(tmp_path), "localhost/box:1")
    assert (img.rootfs / "etc" / "hostname").read_text() == "box\n"
    assert store.lookup("localhost/box:1") == img
    assert store.lookup(f"localhost/box@{img.digest}") is not None
    assert store.lookup("localhost/box:2") is None
    # resolve() of a local tag never needs the registry (localhost has none running).
    assert store.resolve("localhost/box:1").digest == img.digest
    assert [i.reference for i in store.list()] == ["localhost/box:1"]
    store.remove("localhost/box:1")
    assert store.list() == [] and not img.rootfs.exists()


def test_debris_is_cleaned_unless_busy(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images", shift_ids=False)
    (store.root / "tmp" / "unpack-crashed").mkdir()
    (store.root / "tmp" / "blob-crashed").write_bytes(b"half")
    with store.busy():
        assert store.clean_debris() == 0  # someone is working: leave tmp alone
    assert ImageStore(tmp_path / "images", shift_ids=False).clean_debris() == 0
    assert os.listdir(store.root / "tmp") == []


def test_busy_is_shared_between_processes(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images", shift_ids=False)
    with store.busy():
        fd = os.open(store.root / "locks" / "store.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a second reader gets in
        finally:
            os.close(fd)


def test_remove_unknown_and_bad_reference(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images", shift_ids=False)
    with pytest.raises(ImageError, match="not in the local store"):
        store.remove("alpine")
    with pytest.raises(ImageError, match="repository component"):
        store.lookup("UPPER")


def test_paths_follow_corral_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path / "home"))
    assert paths.corral_home() == tmp_path / "home"
    assert paths.images_dir() == tmp_path / "home" / "images"
    assert paths.sandboxes_dir() == tmp_path / "home" / "sandboxes"
    assert (tmp_path / "home" / "images").stat().st_mode & 0o777 == 0o700
    assert ImageStore(shift_ids=False).root == tmp_path / "home" / "images"


def test_blobs_are_not_collected_while_another_operation_runs(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images", shift_ids=False)
    img = store.import_path(_tree(tmp_path), "localhost/box:1")
    other = ImageStore(tmp_path / "images", shift_ids=False)
    with other.busy():  # e.g. a pull in another process that stored blobs not yet listed
        store.remove("localhost/box:1")
    assert not img.rootfs.exists()
    assert (store.root / "blobs" / "sha256" / img.layers[0].split(":")[1]).exists()
    store.import_path(_tree(tmp_path / "second"), "localhost/box2:1")
    store.remove("localhost/box2:1")  # idle now: everything unreferenced goes
    assert os.listdir(store.root / "blobs" / "sha256") == []
