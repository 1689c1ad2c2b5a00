"""Images offline, the way users expect (issue 10, point 5): ``corral run ./dir``,
``/abs/dir``, an OCI layout or a docker-save tar run directly (imported once, cached by
content, no tag taken); a local image is found before any registry; a damaged local image is
an error naming it, never a silent pull."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from corral.errors import ImageError
from corral.runtime import paths
from tests.integration.lifecycle_support import (  # noqa: F401 - fixtures
    ROOT,
    corral_cli,
    corral_home_fixture,
    image_fixture,
    in_world_fixture,
    unique,
)
from tests.support import images

pytestmark = [pytest.mark.usefixtures("in_world"), pytest.mark.timeout(300)]


def make_rootfs(parent: Path, marker: str, name: str = "rootfs") -> Path:
    """A minimal rootfs directory: busybox, sh and cat, and /etc/marker."""
    root = parent / name
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    for applet in ("sh", "cat", "echo", "ls"):
        os.symlink("busybox", root / "bin" / applet)
    (root / "etc" / "marker").write_text(marker + "\n")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    return root


def corral_in(cwd: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """The corral command run from ``cwd`` (for relative image paths)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, "-m", "corral.cli", *args], cwd=cwd,
                          capture_output=True, timeout=120, env=env)  # fmt: skip


def store_refs() -> dict[str, str]:
    refs: dict[str, str] = json.loads((paths.images_dir() / "refs.json").read_text())
    return refs


def test_run_a_directory_relative_and_absolute_cached_by_content(
    corral_home: Path, tmp_path: Path
) -> None:
    root = make_rootfs(tmp_path, "first")
    res = corral_in(tmp_path, "run", "--net", "none", "./rootfs", "--", "cat", "/etc/marker")
    assert (res.returncode, res.stdout) == (0, b"first\n"), res.stderr
    sources = json.loads((paths.images_dir() / "sources.json").read_text())
    digest = sources[str(root)]["digest"]
    tags_before = {k for k in store_refs() if "@" not in k}
    # The same directory by its absolute path, from elsewhere: the cached image, no import.
    images_before = sorted(os.listdir(paths.images_dir() / "images"))
    res = corral_in(Path("/"), "run", "--net", "none", str(root), "--", "cat", "/etc/marker")
    assert (res.returncode, res.stdout) == (0, b"first\n"), res.stderr
    assert sorted(os.listdir(paths.images_dir() / "images")) == images_before
    assert json.loads((paths.images_dir() / "sources.json").read_text())[str(root)]["digest"] \
        == digest
    # Running a path takes over no tag; the image is there by digest only.
    assert {k for k in store_refs() if "@" not in k} == tags_before
    assert any(k.endswith("@" + digest) for k in store_refs())
    # A change in the tree is seen: imported again, a new digest, the new content.
    (root / "etc" / "marker").write_text("second\n")
    res = corral_in(tmp_path, "run", "--net", "none", "./rootfs", "--", "cat", "/etc/marker")
    assert (res.returncode, res.stdout) == (0, b"second\n"), res.stderr
    assert json.loads((paths.images_dir() / "sources.json").read_text())[str(root)]["digest"] \
        != digest
    # ls shows the path as the sandbox's image.
    name = unique("pathimg")
    res = corral_in(tmp_path, "create", "--net", "none", "--name", name, "./rootfs")
    assert res.returncode == 0, res.stderr
    try:
        rows = [json.loads(line) for line in corral_cli("ls", "--json").stdout.splitlines()]
        assert next(r for r in rows if r["name"] == name)["image"] == str(root)
    finally:
        corral_cli("rm", "-f", name)


def test_run_an_oci_layout_and_a_docker_save_tar(corral_home: Path, tmp_path: Path) -> None:
    busybox = images.build_busybox()
    layout = images.write_oci_layout(busybox, tmp_path / "layout", "v1")
    saved = images.write_docker_save(busybox, tmp_path / "saved.tar", "corral-test/saved:1")
    for source in (str(layout), str(saved)):
        res = corral_cli("run", "--net", "none", source, "--", "sh", "-c", "echo from $0")
        assert (res.returncode, res.stdout) == (0, b"from sh\n"), (source, res.stderr)
    # docker save's RepoTags are not taken over by a run (only by 'images import').
    assert "docker.io/corral-test/saved:1" not in store_refs()
    res = corral_in(tmp_path, "run", "--net", "none", "./saved.tar", "--", "true")
    assert res.returncode == 0, res.stderr
    res = corral_cli("run", "--net", "none", str(tmp_path / "missing"), "--", "true")
    assert res.returncode == ImageError.exit_code and b"does not exist" in res.stderr


def test_an_imported_name_is_found_before_any_registry(corral_home: Path, tmp_path: Path) -> None:
    base = unique("offline")
    make_rootfs(tmp_path, "imported", name=base)
    res = corral_cli("images", "import", str(tmp_path / base))
    assert res.returncode == 0, res.stderr
    assert f"localhost/{base}:latest".encode() in res.stdout
    # The bare name: docker.io/library/<base> is not local, localhost/<base> is: no pull
    # (there is no registry for docker.io in the test world; a pull would fail).
    res = corral_cli("run", "--net", "none", base, "--", "cat", "/etc/marker")
    assert (res.returncode, res.stdout) == (0, b"imported\n"), res.stderr
    res = corral_cli("run", "--net", "none", f"{base}:latest", "--", "cat", "/etc/marker")
    assert res.returncode == 0, res.stderr
    assert corral_cli("images", "rm", f"localhost/{base}").returncode == 0


def test_a_damaged_local_image_is_an_error_naming_it(corral_home: Path, tmp_path: Path) -> None:
    ref = f"corral-test/{unique('damaged')}:1"
    make_rootfs(tmp_path, "x")
    assert corral_cli("images", "import", "--name", ref, str(tmp_path / "rootfs")).returncode == 0
    digest = store_refs()[f"docker.io/{ref}"]
    image_dir = paths.images_dir() / "images" / digest.split(":")[1]
    try:
        (image_dir / "image.json").write_text("{not json")
        res = corral_cli("run", "--net", "none", ref, "--", "true")
        assert res.returncode == ImageError.exit_code
        assert b"is damaged" in res.stderr and ref.encode() in res.stderr, res.stderr
        assert b"registry" not in res.stderr  # not a failed pull: no pull was tried
        shutil.rmtree(image_dir / "rootfs")
        (image_dir / "image.json").write_text("{}")
        res = corral_cli("run", "--net", "none", ref, "--", "true")
        assert res.returncode == ImageError.exit_code and b"rootfs" in res.stderr
    finally:
        corral_cli("images", "rm", ref)
