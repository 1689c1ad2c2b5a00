"""CORRAL_SPARE_IDLE: how long an unused spare worker waits (corral.runtime.spare_idle)."""

from __future__ import annotations

import pytest

from corral.errors import ConfigError
from corral.runtime.spare_idle import SPARE_IDLE, SPARE_IDLE_ENV, spare_idle


def test_default_when_unset() -> None:
    assert spare_idle({}) == SPARE_IDLE == 10.0


@pytest.mark.parametrize(("text", "seconds"), [("1", 1.0), ("0.25", 0.25), (" 30 ", 30.0)])
def test_positive_seconds(text: str, seconds: float) -> None:
    assert spare_idle({SPARE_IDLE_ENV: text}) == seconds


@pytest.mark.parametrize("text", ["", "x", "0", "-1", "inf", "nan", "1e400", "10s"])
def test_anything_else_is_one_sentence_naming_the_variable(text: str) -> None:
    with pytest.raises(ConfigError) as exc:
        spare_idle({SPARE_IDLE_ENV: text})
    assert exc.value.path == SPARE_IDLE_ENV
    assert str(exc.value) == (
        f"CORRAL_SPARE_IDLE: must be a positive number of seconds, not {text!r}"
    )
