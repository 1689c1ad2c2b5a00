"""``corral pull`` / ``corral images`` through click, against the world's registry."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from corral.cli import images as images_cli
from corral.cli.main import CorralGroup
from tests.support.fixtures_images import PushedImages
from tests.support.registry import RunningRegistry
from tests.support.world import World


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> click.Group:
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path / "home"))

    @click.group(cls=CorralGroup)
    def group() -> None:
        pass

    images_cli.register(group)
    return group


def test_pull_list_rm(
    cli: click.Group, world: World, registry: RunningRegistry, test_images: PushedImages
) -> None:
    runner = CliRunner()
    with world.in_host():
        res = runner.invoke(
            cli, ["pull", "--insecure-registry", registry.host, test_images.busybox]
        )
    assert res.exit_code == 0, res.output
    assert res.output.strip() == (
        f"pulled {test_images.busybox} {test_images.busybox_image.manifest_digest} (1.0 MB)"
    )
    listing = runner.invoke(cli, ["images"])
    assert listing.exit_code == 0
    assert test_images.busybox in listing.output
    assert test_images.busybox_image.manifest_digest.split(":")[1][:12] in listing.output
    assert "2026-01-01" in listing.output
    assert runner.invoke(cli, ["images", "-q"]).output.strip() == test_images.busybox
    assert runner.invoke(cli, ["images", "rm", test_images.busybox]).exit_code == 0
    assert runner.invoke(cli, ["images", "-q"]).output.strip() == ""


def test_errors_are_one_sentence_and_exit_3(
    cli: click.Group, world: World, registry: RunningRegistry, test_images: PushedImages
) -> None:
    runner = CliRunner()
    with world.in_host():
        res = runner.invoke(
            cli, ["pull", "--insecure-registry", registry.host, f"{registry.host}/corral/nope"]
        )
    assert res.exit_code == 3
    assert res.output.startswith("corral: manifest latest of image")
    assert res.output.count("\n") == 1
    bad = runner.invoke(cli, ["pull", "Not/Valid"])
    assert bad.exit_code == 3 and "repository component" in bad.output


def test_import(cli: click.Group, test_images: PushedImages) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["images", "import", str(test_images.busybox_docker_save)])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("imported docker.io/corral/busybox:saved sha256:")
