"""Packaging (issue 10, point 9): compatible ranges in pyproject.toml with the exact CI pins in
constraints.txt, ``corral version``, and shell completion that knows sandbox and image names."""

from __future__ import annotations

import json
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from click.shell_completion import BashComplete
from click.testing import CliRunner
from packaging.requirements import Requirement
from packaging.version import Version

from corral.cli.main import cli

ROOT = Path(__file__).resolve().parents[2]


def requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = project["dependencies"] + project["optional-dependencies"]["dev"]
    return [Requirement(text) for text in listed]


def pins() -> dict[str, Version]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt: {line!r} is not an exact pin (NAME==VERSION)"
            out[name.lower().replace("_", "-")] = Version(version)
    return out


def test_dependencies_are_compatible_ranges() -> None:
    for req in requirements():
        ops = {spec.operator for spec in req.specifier}
        assert "==" not in ops and ">=" in ops and "<" in ops, (
            f"pyproject.toml: {req} should be a range (>=low,<next-major); its exact CI "
            "version belongs in constraints.txt"
        )


def test_constraints_pin_every_dependency_inside_its_range() -> None:
    pinned = pins()
    for req in requirements():
        name = req.name.lower().replace("_", "-")
        assert name in pinned, f"constraints.txt has no pin for {req.name}"
        assert pinned[name] in req.specifier, f"{req.name}=={pinned[name]} is outside {req}"


def test_install_script_uses_the_constraints() -> None:
    assert "-c constraints.txt" in (ROOT / "scripts" / "install.sh").read_text()


def test_version_command() -> None:
    res = CliRunner(mix_stderr=False).invoke(cli, ["version"])
    assert res.exit_code == 0
    first, python, kernel = res.stdout.splitlines()
    assert first == f"corral {metadata.version('corral')}"
    assert python.startswith("python 3.") and kernel.startswith("kernel Linux ")


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts(shell: str) -> None:
    res = CliRunner(mix_stderr=False).invoke(cli, ["completion", shell])
    assert res.exit_code == 0 and "_CORRAL_COMPLETE" in res.stdout


def test_completion_offers_sandbox_and_image_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path))
    for name in ("web-1", "web-2", "db"):
        (tmp_path / "sandboxes" / name).mkdir(parents=True)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "refs.json").write_text(json.dumps({
        "docker.io/library/alpine:latest": "sha256:1",
        "docker.io/library/alpine@sha256:1": "sha256:1",
        "docker.io/library/python:3.12": "sha256:2",
        "localhost/tools:latest": "sha256:3",
    }))  # fmt: skip
    complete = BashComplete(cli, {}, "corral", "_CORRAL_COMPLETE")

    def values(args: list[str], incomplete: str) -> list[str]:
        return [item.value for item in complete.get_completions(args, incomplete)]

    assert values(["exec"], "we") == ["web-1", "web-2"]
    assert values(["rm"], "") == ["db", "web-1", "web-2"]
    assert values(["stop", "db"], "web-") == ["web-1", "web-2"]
    assert values(["run", "--net", "none"], "") == ["alpine", "localhost/tools", "python:3.12"]
    assert values(["create"], "py") == ["python:3.12"]
    assert "db:" in values(["cp"], "d")
    assert values(["port"], "d") == ["db"]
