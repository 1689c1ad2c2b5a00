"""User resolution from the sandbox's own /etc/passwd and /etc/group, read as text."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.runtime.init import resolve_user


@pytest.fixture
def etc(tmp_path: Path) -> str:
    (tmp_path / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\n"
        "app:x:1000:1001:app:/home/app:/bin/sh\n"
        "broken:x:notanumber:1\n"
        "\n"
    )
    (tmp_path / "group").write_text(
        "root:x:0:\napp:x:1001:\nextra:x:2000:app,other\nwheel:x:10:other\n"
    )
    return str(tmp_path)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, (0, 0, [])),
        ("", (0, 0, [])),
        ("0", (0, 0, [])),
        ("root", (0, 0, [])),
        ("app", (1000, 1001, [2000])),
        ("1000", (1000, 1001, [2000])),
        ("app:wheel", (1000, 10, [2000])),
        ("app:55", (1000, 55, [2000])),
        ("4242", (4242, 0, [])),
        ("4242:4243", (4242, 4243, [])),
    ],
)
def test_resolve(etc: str, spec: str | None, expected: tuple[int, int, list[int]]) -> None:
    assert resolve_user(spec, etc) == expected


@pytest.mark.parametrize("spec", ["ghost", "app:nogroup", "broken"])
def test_unknown_names_raise(etc: str, spec: str) -> None:
    with pytest.raises(LookupError):
        resolve_user(spec, etc)


def test_missing_files_only_allow_numbers(tmp_path: Path) -> None:
    assert resolve_user("7:8", str(tmp_path)) == (7, 8, [])
    with pytest.raises(LookupError):
        resolve_user("app", str(tmp_path))
