"""Fixtures of the integration tests: root, the hermetic world, a private CORRAL_HOME.

Every test here needs root; without it they are skipped with the reason. Under ``CI=true``
a skip is an error instead: CI has root and the tools by construction, so a skipped
integration test there means the run did not test what it claims (a run where all of them
were skipped would otherwise be green). The world is built once per run and torn down at
the end, also when tests fail.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest

from tests.support import debris
from tests.support import world as world_mod
from tests.support.fixtures_images import *  # noqa: F403  (image and registry fixtures)

_REASON = world_mod.have_root_tools()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Under CI, an integration test that skips (the root check, or a ``pytest.skip`` of its
    own) is reported as failed, with the skip's reason."""
    report = yield
    if report.skipped and debris.in_ci() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where nothing may be: {reason}"
    return report


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
        from corral.lifecycle import spawn

        spawn.close_fork_server()
        with w.in_host():
            debris.check_namespace_before_it_goes(f"the test world's {w.host_ns}")
        world_mod.destroy(w)
