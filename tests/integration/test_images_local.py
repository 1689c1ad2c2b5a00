"""Images from local sources: docker save tar, OCI layout (dir and tar), rootfs directory."""

from __future__ import annotations

import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from corral.errors import ImageError
from corral.runtime.images import ImageStore
from corral.runtime.images.idmap import UID_BASE
from tests.support import images as images_mod

Built = tuple[images_mod.BuiltImage, images_mod.BuiltImage]


def test_docker_save_tar(built_images: Built, tmp_path: Path) -> None:
    busybox, tools = built_images
    archive = images_mod.write_docker_save(tools, tmp_path / "t.tar", "corral/tools:saved")
    store = ImageStore(tmp_path / "images")
    img = store.import_path(archive)
    assert img.reference == "docker.io/corral/tools:saved"
    assert not (img.rootfs / "opt" / "gone.txt").exists()
    assert sorted(os.listdir(img.rootfs / "opt" / "old")) == ["new.txt"]
    assert store.resolve("corral/tools:saved").digest == img.digest
    # Importing again is idempotent: same digest, nothing unpacked twice.
    assert store.import_path(archive).digest == img.digest
    assert len(os.listdir(store.root / "images")) == 1


def test_oci_layout_dir_and_tar(built_images: Built, tmp_path: Path) -> None:
    busybox, _ = built_images
    layout = images_mod.write_oci_layout(busybox, tmp_path / "bb-oci", "v1")
    store = ImageStore(tmp_path / "images")
    img = store.import_path(layout)
    assert img.digest == busybox.manifest_digest  # same manifest as in a registry
    assert img.reference == "localhost/bb-oci:v1"
    assert os.lstat(img.rootfs / "bin" / "busybox").st_uid == UID_BASE
    archive = tmp_path / "bb-oci.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(layout, arcname=".")
    store2 = ImageStore(tmp_path / "images2")
    img2 = store2.import_path(archive, "example.org/team/bb:1")
    assert img2.digest == busybox.manifest_digest
    assert img2.reference == "example.org/team/bb:1"


def test_oci_layout_with_a_corrupted_blob(built_images: Built, tmp_path: Path) -> None:
    busybox, _ = built_images
    layout = images_mod.write_oci_layout(busybox, tmp_path / "bad-oci", "v1")
    blob = layout / "blobs" / "sha256" / busybox.layers[0].digest.split(":")[1]
    data = bytearray(blob.read_bytes())
    data[100] ^= 1
    blob.write_bytes(bytes(data))
    store = ImageStore(tmp_path / "images")
    with pytest.raises(ImageError, match="does not match its digest"):
        store.import_path(layout)
    assert os.listdir(store.root / "tmp") == []
    assert store.list() == []


def test_rootfs_directory(tmp_path: Path) -> None:
    src = tmp_path / "tree"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "hello").write_text("#!/bin/sh\necho hi\n")
    os.chmod(src / "bin" / "hello", 0o4755)
    os.symlink("hello", src / "bin" / "hi")
    (src / "home").mkdir()
    os.chown(src / "home", 1000, 1000)
    store = ImageStore(tmp_path / "images")
    img = store.import_path(src, "localhost/tree:1")
    assert img.reference == "localhost/tree:1"
    hello = img.rootfs / "bin" / "hello"
    assert hello.read_text() == "#!/bin/sh\necho hi\n"
    assert stat.S_IMODE(os.lstat(hello).st_mode) == 0o4755
    assert os.readlink(img.rootfs / "bin" / "hi") == "hello"
    assert os.lstat(img.rootfs / "home").st_uid == UID_BASE + 1000
    # A corral rootfs re-imported keeps the image's ids (the shift is undone, then redone).
    again = ImageStore(tmp_path / "images2").import_path(img.rootfs, "localhost/again")
    assert os.lstat(again.rootfs / "home").st_uid == UID_BASE + 1000


def test_bad_sources(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    with pytest.raises(ImageError, match="does not exist"):
        store.import_path(tmp_path / "missing")
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ImageError, match="neither a directory nor a tar"):
        store.import_path(junk)
    empty_tar = tmp_path / "empty.tar"
    with tarfile.open(empty_tar, "w") as tar:
        info = tarfile.TarInfo("hello.txt")
        tar.addfile(info)
    with pytest.raises(ImageError, match="not a rootfs directory, an OCI image layout"):
        store.import_path(empty_tar)
    save = tmp_path / "save.tar"
    with tarfile.open(save, "w") as tar:
        import io

        data = json.dumps([{"Config": "c.json", "Layers": ["missing/layer.tar"]}]).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ImageError, match="has no file c.json"):
        store.import_path(save)


def test_remove_deletes_unshared_blobs(built_images: Built, tmp_path: Path) -> None:
    busybox, tools = built_images
    store = ImageStore(tmp_path / "images")
    a = store.import_path(images_mod.write_oci_layout(busybox, tmp_path / "a", "v1"))
    b = store.import_path(images_mod.write_oci_layout(tools, tmp_path / "b", "v1"))
    store.remove(a.reference)
    assert not a.rootfs.exists()
    assert b.rootfs.is_dir()
    assert not store.blob_path(busybox.layers[0].digest).exists()
    assert store.blob_path(tools.layers[0].digest).exists()
    assert [i.reference for i in store.list()] == [b.reference]
    with pytest.raises(ImageError, match="not in the local store"):
        store.remove(a.reference)
