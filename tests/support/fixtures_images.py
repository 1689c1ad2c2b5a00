"""pytest fixtures for images and registries (star-imported by tests/integration/conftest.py).

Registries are session-scoped: each variant starts once per run in the world's internet
namespace and stops at the end (also on failure). ``test_images`` builds the busybox and tools
images once (layers cached under /var/tmp/corral-test-cache), pushes them to the plain
registry and writes them as a ``docker save`` tar and an OCI layout directory.
Pull from inside ``with world.in_host():``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import images as images_mod
from tests.support import registry as registry_mod
from tests.support.world import World

__all__ = [
    "PushedImages",
    "built_images",
    "registry",
    "registry_basic",
    "registry_tls",
    "registry_token",
    "test_images",
]


def _registry(
    world: World, tmp_path_factory: pytest.TempPathFactory, variant: str
) -> Iterator[registry_mod.RunningRegistry]:
    workdir = tmp_path_factory.mktemp(f"registry-{variant}")
    reg = registry_mod.start(world, variant, workdir)
    try:
        yield reg
    finally:
        registry_mod.stop(world, reg)


@pytest.fixture(scope="session")
def registry(
    world: World, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[registry_mod.RunningRegistry]:
    """Plain HTTP, anonymous registry at 203.0.113.51:5000."""
    yield from _registry(world, tmp_path_factory, "plain")


@pytest.fixture(scope="session")
def registry_tls(
    world: World, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[registry_mod.RunningRegistry]:
    """HTTPS registry (test CA in ``.ca_file``) at 203.0.113.52:5000."""
    yield from _registry(world, tmp_path_factory, "tls")


@pytest.fixture(scope="session")
def registry_basic(
    world: World, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[registry_mod.RunningRegistry]:
    """htpasswd (basic auth) registry at 203.0.113.53:5000; ``.username``/``.password``."""
    yield from _registry(world, tmp_path_factory, "basic")


@pytest.fixture(scope="session")
def registry_token(
    world: World, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[registry_mod.RunningRegistry]:
    """Token-auth registry at 203.0.113.54:5000 with its token server on :5001."""
    yield from _registry(world, tmp_path_factory, "token")


@dataclass(frozen=True)
class PushedImages:
    """Where the test images are: refs in the plain registry and local archives."""

    busybox: str  # "203.0.113.51:5000/corral/busybox:latest"
    tools: str
    busybox_image: images_mod.BuiltImage
    tools_image: images_mod.BuiltImage
    busybox_docker_save: Path
    busybox_oci_layout: Path
    tools_docker_save: Path
    tools_oci_layout: Path


@pytest.fixture(scope="session")
def built_images() -> tuple[images_mod.BuiltImage, images_mod.BuiltImage]:
    """(busybox, tools) built from host files; cached between runs."""
    return images_mod.build_busybox(), images_mod.build_tools()


@pytest.fixture(scope="session")
def test_images(
    world: World,
    registry: registry_mod.RunningRegistry,
    built_images: tuple[images_mod.BuiltImage, images_mod.BuiltImage],
    tmp_path_factory: pytest.TempPathFactory,
) -> PushedImages:
    busybox, tools = built_images
    client = registry.client()
    with world.in_host():
        images_mod.push(client, registry.host, "corral/busybox", busybox)
        images_mod.push(client, registry.host, "corral/tools", tools)
    out = tmp_path_factory.mktemp("image-archives")
    return PushedImages(
        busybox=f"{registry.host}/corral/busybox:latest",
        tools=f"{registry.host}/corral/tools:latest",
        busybox_image=busybox,
        tools_image=tools,
        busybox_docker_save=images_mod.write_docker_save(
            busybox, out / "busybox-save.tar", "corral/busybox:saved"
        ),
        busybox_oci_layout=images_mod.write_oci_layout(busybox, out / "busybox-oci", "v1"),
        tools_docker_save=images_mod.write_docker_save(
            tools, out / "tools-save.tar", "corral/tools:saved"
        ),
        tools_oci_layout=images_mod.write_oci_layout(tools, out / "tools-oci", "v1"),
    )
