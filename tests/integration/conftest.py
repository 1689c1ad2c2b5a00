"""Fixtures of the integration tests: root, the hermetic world, a private CORRAL_HOME.

Every test here needs root; without it they are skipped with the reason. The world is built
once per run and torn down at the end, also when tests fail.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import world as world_mod
from tests.support.fixtures_images import *  # noqa: F403  (image and registry fixtures)

_REASON = world_mod.have_root_tools()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _REASON is None:
        return
    skip = pytest.mark.skip(reason=f"integration test skipped: {_REASON}")
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def world() -> Iterator[world_mod.World]:
    w = world_mod.build()
    try:
        yield w
    finally:
        # The fork server and its spare live in the host netns; stop them properly before the
        # teardown SIGKILLs what is left there (a killed spare would leave an empty cgroup).
        from corral.sdk import lifecycle

        lifecycle.close_fork_server()
        world_mod.destroy(w)
