"""The supervisor's control protocol core and the lean JSON codec it rides on."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.errors import SandboxError
from corral.runtime import control, leanjson

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_leanjson_agrees_with_json(value: object) -> None:
    text = leanjson.dumps(value)
    assert json.loads(text) == value
    assert leanjson.loads(json.dumps(value)) == value
    assert "\n" not in text and text.isascii()


@given(st.text(max_size=200))
def test_leanjson_loads_rejects_or_agrees(text: str) -> None:
    try:
        expected = json.loads(text)
    except ValueError:
        with pytest.raises(ValueError):
            leanjson.loads(text)
        return
    except RecursionError:
        return
    assert leanjson.loads(text) == expected or expected != expected


def test_leanjson_refuses_what_json_cannot_carry() -> None:
    with pytest.raises(ValueError):
        leanjson.dumps(float("nan"))
    with pytest.raises(TypeError):
        leanjson.dumps({1: "x"})
    with pytest.raises(TypeError):
        leanjson.dumps(object())


def test_decoder_splits_lines_across_feeds() -> None:
    decoder = control.LineDecoder()
    wire = control.encode(control.stop_request(2)) + control.encode(control.info_request())
    out = []
    for byte in wire:
        out += decoder.feed(bytes([byte]))
    assert out == [{"op": "stop", "timeout": 2}, {"op": "info"}]
    assert decoder.pending == 0


@given(st.binary(max_size=300))
def test_decoder_survives_garbage(data: bytes) -> None:
    decoder = control.LineDecoder(limit=128)
    try:
        for message in decoder.feed(data):
            assert isinstance(message, dict)
    except control.ControlProtocolError:
        pass


def test_decoder_bounds_line_length() -> None:
    decoder = control.LineDecoder(limit=16)
    with pytest.raises(control.ControlProtocolError, match="longer than 16 bytes"):
        decoder.feed(b"x" * 17)
    with pytest.raises(control.ControlProtocolError, match="longer than 16 bytes"):
        control.LineDecoder(limit=16).feed(b'{"op": "info", "pad": "....."}\n')


@pytest.mark.parametrize("line", [b"[1]\n", b"nope\n", b"\xff\n"])
def test_decoder_rejects_non_objects(line: bytes) -> None:
    with pytest.raises(control.ControlProtocolError):
        control.LineDecoder().feed(line)


def test_parse_request_validates_each_op() -> None:
    assert control.parse_request({"op": "info"}) == ("info", {})
    assert control.parse_request({"op": "stop"}) == ("stop", {"timeout": 5.0})
    assert control.parse_request({"op": "stop", "timeout": 0}) == ("stop", {"timeout": 0.0})
    for bad in (
        {"op": "reboot"},
        {},
        {"op": "stop", "timeout": -1},
        {"op": "stop", "timeout": True},
        {"op": "stop", "timeout": "5"},
        {"op": "stop", "timeout": 1e9},
        {"op": "logs", "offset": 0},  # gone: audit events are read from the file
    ):
        with pytest.raises(control.ControlProtocolError):
            control.parse_request(bad)


def test_replies() -> None:
    assert control.check_reply(control.ok_reply(a=1), "info") == {"ok": True, "a": 1}
    with pytest.raises(SandboxError, match="^boom$"):
        control.check_reply(control.error_reply("boom"), "stop")
    with pytest.raises(SandboxError, match="without a reason"):
        control.check_reply({"ok": False}, "stop")


