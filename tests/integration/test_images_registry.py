"""Pulls from real registries (Debian's docker-registry) running in the test world."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from corral.errors import ImageError
from corral.runtime.images import Image, ImageStore
from corral.runtime.images.idmap import UID_BASE
from tests.support import images as images_mod
from tests.support.fixtures_images import PushedImages
from tests.support.registry import RunningRegistry
from tests.support.world import World


def _store(tmp_path: Path, reg: RunningRegistry) -> ImageStore:
    return ImageStore(tmp_path / "images", **reg.store_options())


def _assert_busybox(img: Image) -> None:
    busybox = img.rootfs / "bin" / "busybox"
    assert busybox.is_file()
    assert os.readlink(img.rootfs / "bin" / "sh") == "/bin/busybox"
    st = os.lstat(img.rootfs / "home" / "user")
    assert (st.st_uid, st.st_gid) == (UID_BASE + 1000, UID_BASE + 1000)
    assert os.lstat(busybox).st_uid == UID_BASE
    assert stat.S_IMODE(os.lstat(img.rootfs / "tmp").st_mode) == 0o1777
    assert img.config["Cmd"] == ["/bin/sh"]


def test_pull_busybox_from_plain_registry(
    world: World, registry: RunningRegistry, test_images: PushedImages, tmp_path: Path
) -> None:
    store = _store(tmp_path, registry)
    with world.in_host():
        img = store.pull(test_images.busybox)
    assert img.digest == test_images.busybox_image.manifest_digest
    assert img.reference == test_images.busybox
    _assert_busybox(img)
    # resolve() of a present image does not touch the network: it works with no route at all.
    again = ImageStore(tmp_path / "images").resolve(test_images.busybox)
    assert again.rootfs == img.rootfs
    assert [i.reference for i in store.list()] == [test_images.busybox]


def test_pull_tools_applies_whiteouts_zstd_and_setuid(
    world: World, registry: RunningRegistry, test_images: PushedImages, tmp_path: Path
) -> None:
    store = _store(tmp_path, registry)
    with world.in_host():
        img = store.pull(test_images.tools)
    opt = img.rootfs / "opt"
    assert (opt / "keep.txt").read_text() == "kept\n"
    assert not (opt / "gone.txt").exists()
    assert sorted(os.listdir(opt / "old")) == ["new.txt"]
    assert not any(n.startswith(".wh.") for _, _, files in os.walk(img.rootfs) for n in files)
    assert (img.rootfs / "usr/lib/python3.11/os.py").is_file()  # from the zstd layer
    assert os.lstat(img.rootfs / "usr/local/bin/suid-demo").st_mode & stat.S_ISUID
    # Merged /usr as in Debian, and the unpacked tree really runs (chroot: no sandbox needed).
    assert os.readlink(img.rootfs / "lib64") == "usr/lib64"
    assert (img.rootfs / "usr/lib/x86_64-linux-gnu/libc.so.6").is_file()
    for argv in (
        ["/usr/bin/python3", "-c", "import ssl, json; print(ssl.OPENSSL_VERSION)"],
        ["/usr/bin/curl", "--version"],
        ["/usr/bin/dig", "-v"],
        ["/bin/sh", "-c", "echo ok"],
    ):
        res = subprocess.run(["chroot", str(img.rootfs), *argv], capture_output=True, timeout=30)
        assert res.returncode == 0, (argv, res.stderr)


def test_multi_arch_index_and_docker_media_types(
    world: World, registry: RunningRegistry, test_images: PushedImages, tmp_path: Path
) -> None:
    busybox, tools = test_images.busybox_image, test_images.tools_image
    client = registry.client()
    repo = "corral/multi"
    with world.in_host():
        images_mod.push(client, registry.host, repo, busybox, "amd64-only")
        images_mod.push(client, registry.host, repo, tools, "other")
        docker_body = images_mod.docker_v2_manifest(busybox)
        docker_digest = images_mod.push_manifest(
            client, registry.host, repo, "docker", docker_body, images_mod.DOCKER_MANIFEST
        )
        # arm64 points at the tools manifest: picking it would be visible in the rootfs.
        entries = [
            (tools.manifest_digest, len(tools.manifest), images_mod.OCI_MANIFEST, "linux/arm64"),
            (docker_digest, len(docker_body), images_mod.DOCKER_MANIFEST, "linux/amd64"),
            (tools.manifest_digest, len(tools.manifest), images_mod.OCI_MANIFEST, "windows/amd64"),
        ]
        index_body = images_mod.index(entries, images_mod.DOCKER_MANIFEST_LIST)
        index_digest = images_mod.push_manifest(
            client, registry.host, repo, "multi", index_body, images_mod.DOCKER_MANIFEST_LIST
        )
        store = _store(tmp_path, registry)
        img = store.pull(f"{registry.host}/{repo}:multi")
        assert img.digest == docker_digest  # the linux/amd64 entry, a Docker v2 manifest
        _assert_busybox(img)
        assert not (img.rootfs / "usr/bin/python3.11").exists()
        # The index digest is an alias of the pulled image: resolving it needs no network.
        pinned = f"{registry.host}/{repo}@{index_digest}"
    assert store.resolve(pinned).digest == docker_digest
    assert store.lookup(f"{registry.host}/{repo}@{docker_digest}") is not None


@pytest.mark.parametrize("variant", ["registry_tls", "registry_basic", "registry_token"])
def test_pull_from_secured_registries(
    variant: str,
    request: pytest.FixtureRequest,
    world: World,
    built_images: tuple[images_mod.BuiltImage, images_mod.BuiltImage],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reg: RunningRegistry = request.getfixturevalue(variant)
    busybox = built_images[0]
    if reg.username:
        monkeypatch.setenv("CORRAL_REGISTRY_USER", reg.username)
        monkeypatch.setenv("CORRAL_REGISTRY_PASSWORD", reg.password or "")
    with world.in_host():
        images_mod.push(reg.client(), reg.host, "team/busybox", busybox, "v1")
        img = _store(tmp_path, reg).pull(f"{reg.host}/team/busybox:v1")
    _assert_busybox(img)


def test_tls_registry_without_ca_is_refused(
    world: World, registry_tls: RunningRegistry, tmp_path: Path
) -> None:
    store = ImageStore(tmp_path / "images")
    with world.in_host(), pytest.raises(ImageError, match="not trusted"):
        store.pull(f"{registry_tls.host}/team/busybox:v1")
    assert os.listdir(tmp_path / "images" / "tmp") == []


def test_basic_registry_without_credentials_names_the_fix(
    world: World, registry_basic: RunningRegistry, tmp_path: Path
) -> None:
    with world.in_host(), pytest.raises(ImageError, match="requires a login"):
        _store(tmp_path, registry_basic).pull(f"{registry_basic.host}/team/busybox:v1")


def test_token_registry_with_wrong_password(
    world: World,
    registry_token: RunningRegistry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CORRAL_REGISTRY_USER", "tester")
    monkeypatch.setenv("CORRAL_REGISTRY_PASSWORD", "wrong")
    with world.in_host(), pytest.raises(ImageError, match="refused credentials"):
        _store(tmp_path, registry_token).pull(f"{registry_token.host}/team/busybox:v1")


def test_credentials_from_auth_json(
    world: World,
    registry_basic: RunningRegistry,
    built_images: tuple[images_mod.BuiltImage, images_mod.BuiltImage],
    tmp_path: Path,
) -> None:
    auth = base64.b64encode(f"{registry_basic.username}:{registry_basic.password}".encode())
    (tmp_path / "auth.json").write_text(
        json.dumps({"auths": {registry_basic.host: {"auth": auth.decode()}}})
    )
    store = _store(tmp_path, registry_basic)  # auth.json sits next to the images dir
    with world.in_host():
        images_mod.push(store.client, registry_basic.host, "team/authjson", built_images[0])
        img = store.pull(f"{registry_basic.host}/team/authjson")
    _assert_busybox(img)


def test_unknown_image_and_registry_down(
    world: World, registry: RunningRegistry, test_images: PushedImages, tmp_path: Path
) -> None:
    store = _store(tmp_path, registry)
    with world.in_host():
        with pytest.raises(ImageError, match="not found") as info:
            store.pull(f"{registry.host}/corral/nope:latest")
        assert str(info.value).count(".") >= 1 and "\n" not in str(info.value)
        with pytest.raises(ImageError, match="cannot be reached"):
            store.pull(f"{registry.host.split(':')[0]}:5999/corral/busybox")
    assert store.list() == []


def test_corrupted_blob_is_rejected_and_nothing_is_kept(
    world: World,
    registry: RunningRegistry,
    built_images: tuple[images_mod.BuiltImage, images_mod.BuiltImage],
    tmp_path: Path,
) -> None:
    busybox = built_images[0]
    # A distinct image (own config) so corrupting its layer does not break the shared one.
    corrupt = images_mod.finish("corrupt", "latest", busybox.layers, {"Cmd": ["/bin/true"]})
    layer = busybox.layers[0]
    store = _store(tmp_path, registry)
    data_file = registry.blob_data(layer.digest)
    with world.in_host():
        images_mod.push(registry.client(), registry.host, "corral/corrupt", corrupt)
        original = data_file.read_bytes()
        try:
            flipped = bytearray(original)
            flipped[len(flipped) // 2] ^= 0xFF
            data_file.write_bytes(bytes(flipped))
            with pytest.raises(ImageError, match="failed verification"):
                store.pull(f"{registry.host}/corral/corrupt")
            data_file.write_bytes(original[: len(original) // 2])  # truncated
            with pytest.raises(ImageError, match="truncated|broke off"):
                store.pull(f"{registry.host}/corral/corrupt")
        finally:
            data_file.write_bytes(original)
    assert not (store.blob_path(layer.digest)).exists()
    assert os.listdir(store.root / "tmp") == []
    assert os.listdir(store.root / "images") == []


def test_concurrent_pulls_of_one_image(
    world: World, registry: RunningRegistry, test_images: PushedImages, tmp_path: Path
) -> None:
    results: list[Image | BaseException] = []

    def pull() -> None:
        try:
            with world.in_host():
                results.append(_store(tmp_path, registry).pull(test_images.tools))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=pull) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 3
    assert all(isinstance(r, Image) for r in results), results
    digests = {r.digest for r in results if isinstance(r, Image)}
    assert digests == {test_images.tools_image.manifest_digest}
    assert len(os.listdir(tmp_path / "images" / "images")) == 1
    assert os.listdir(tmp_path / "images" / "tmp") == []


def test_concurrent_pulls_from_two_processes(
    world: World, registry: RunningRegistry, test_images: PushedImages, tmp_path: Path
) -> None:
    code = (
        "import sys; from corral.runtime.images import ImageStore; "
        "s = ImageStore(__import__('pathlib').Path(sys.argv[1]), insecure_registries=[sys.argv[2]]); "
        "print(s.pull(sys.argv[3]).digest)"
    )
    argv = [
        sys.executable,
        "-c",
        code,
        str(tmp_path / "images"),
        registry.host,
        test_images.busybox,
    ]
    with world.in_host():
        procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == [test_images.busybox_image.manifest_digest] * 2


def test_disk_full_during_unpack(
    world: World, registry: RunningRegistry, test_images: PushedImages, tmp_path: Path
) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        store = ImageStore(mnt / "images", **registry.store_options())
        with world.in_host(), pytest.raises(ImageError, match="disk full") as info:
            store.pull(test_images.busybox)
        message = str(info.value)
        assert message.startswith("disk full while unpacking layer 1/1 (sha256:")
        assert message.endswith(f"of {test_images.busybox} into the image store {mnt / 'images'}.")
        assert "\n" not in str(info.value)
        assert os.listdir(mnt / "images" / "tmp") == []
        assert os.listdir(mnt / "images" / "images") == []
        assert store.list() == []
        # Full already while downloading (the tools image's first layer is ~30 MB).
        with world.in_host(), pytest.raises(ImageError, match="disk full") as info:
            store.pull(test_images.tools)
        assert str(info.value).startswith("disk full while storing blob sha256:")
        assert os.listdir(mnt / "images" / "tmp") == []
        assert os.listdir(mnt / "images" / "images") == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_measure_pull_and_resolve(
    world: World, registry: RunningRegistry, test_images: PushedImages, tmp_path: Path
) -> None:
    """Not a timed assertion: prints the numbers the report quotes (run with -s)."""
    store = _store(tmp_path, registry)
    with world.in_host():
        t0 = time.perf_counter()
        img = store.pull(test_images.tools)
        pulled = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(100):
        store.resolve(test_images.tools)
    resolved = (time.perf_counter() - t0) / 100
    print(f"\ntools image ({img.size / 1e6:.1f} MB compressed): pull+unpack {pulled:.2f} s, "
          f"cached resolve {resolved * 1e3:.3f} ms")  # fmt: skip
    assert img.rootfs.is_dir()
