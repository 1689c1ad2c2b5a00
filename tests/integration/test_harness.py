"""The test harness's own guarantees, each shown failing a real pytest run in a subprocess:

- the debris check (tests/support/debris.py) fails a run that leaves a corral netns, after
  the run, whatever the tests' own outcome, and passes one that cleans up;
- under ``CI=true`` an integration test that would be skipped (here: run without root) is an
  error, while outside CI it is an ordinary skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent

_LEAKY = '''
import subprocess

def test_makes_a_netns():
    subprocess.run(["ip", "netns", "add", "{name}"], check=True)
    {cleanup}
'''


def _inner_pytest(
    args: list[str], *, cwd: Path, env: dict[str, str] | None = None,
    prefix: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    full_env.update({"PYTHONPATH": str(ROOT), **(env or {})})
    return subprocess.run(
        [*(prefix or []), sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=120,
    )


def _run_leaky(tmp_path: Path, name: str, cleanup: bool) -> subprocess.CompletedProcess[str]:
    tests = tmp_path / "inner"
    tests.mkdir()
    body = f'subprocess.run(["ip", "netns", "del", "{name}"], check=True)' if cleanup else "pass"
    (tests / "test_leaky.py").write_text(_LEAKY.format(name=name, cleanup=body))
    return _inner_pytest(
        ["-q", "-p", "tests.support.debris", str(tests)],
        cwd=tmp_path,
        env={"CORRAL_DEBRIS_CHECK": "1", "CORRAL_DEBRIS_SETTLE": "0.5"},
    )


def test_the_debris_check_fails_a_run_that_leaves_a_netns(tmp_path: Path) -> None:
    name = f"corral-leak-{uuid.uuid4().hex[:8]}"
    try:
        res = _run_leaky(tmp_path, name, cleanup=False)
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    assert "1 passed" in res.stdout, res.stdout  # the test itself passed ...
    assert res.returncode == 1, res.stdout  # ... and the run failed
    assert f"netns {name}" in res.stdout, res.stdout


def test_the_debris_check_passes_a_run_that_cleans_up(tmp_path: Path) -> None:
    name = f"corral-leak-{uuid.uuid4().hex[:8]}"
    try:
        res = _run_leaky(tmp_path, name, cleanup=True)
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    assert res.returncode == 0, res.stdout
    assert "left nothing behind" in res.stdout, res.stdout


def _as_nobody(ci: str | None, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """One integration test, run as nobody (so without root), with ``CI`` set or unset."""
    env = {"HOME": str(tmp_path)}
    os.chmod(tmp_path, 0o777)  # nobody's pytest writes its temporary files here
    return _inner_pytest(
        ["-q", "--basetemp", str(tmp_path / "base"),
         "tests/integration/test_world.py::test_host_has_no_route_but_the_internet_namespace"],
        cwd=ROOT,
        env={**env, "CI": ci} if ci is not None else env,
        prefix=["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"],
    )


def test_without_root_integration_tests_skip_outside_ci(tmp_path: Path) -> None:
    res = _as_nobody(None, tmp_path)
    assert res.returncode == 0 and "1 skipped" in res.stdout, res.stdout + res.stderr


def test_under_ci_a_skipped_integration_test_fails_the_run(tmp_path: Path) -> None:
    res = _as_nobody("true", tmp_path)
    assert res.returncode != 0, res.stdout + res.stderr
    assert "skipped under CI=true" in res.stdout and "needs root" in res.stdout, res.stdout
