"""The channel's sans-I/O frame codec: round trips, limits, and random bytes (fuzz)."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.errors import SandboxError
from corral.runtime.channel import (
    FRAME_PREFIX,
    KIND_CONTROL,
    KIND_FILE,
    KIND_STDERR,
    KIND_STDIN,
    KIND_STDOUT,
    MAX_CONTROL_SIZE,
    MAX_DATA_SIZE,
    ChannelProtocolError,
    FileInfo,
    Frame,
    FrameReader,
    encode_control,
    encode_data,
    error_from_reply,
)

DATA_KINDS = [KIND_STDIN, KIND_STDOUT, KIND_STDERR, KIND_FILE]


def _decode_all(data: bytes, step: int | None = None) -> list[Frame]:
    reader = FrameReader()
    frames: list[Frame] = []
    pieces = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
    for piece in pieces:
        reader.feed(piece)
        frames.extend(reader.frames())
    assert reader.buffered == 0
    return frames


def test_control_round_trip() -> None:
    obj = {"op": "exec", "argv": ["sh", "-c", "echo ü"], "env": {"A": "1"}, "timeout": None}
    (frame,) = _decode_all(encode_control(obj))
    assert frame.kind == KIND_CONTROL and frame.control() == obj


@pytest.mark.parametrize("kind", DATA_KINDS)
def test_data_round_trip_and_empty_means_eof(kind: int) -> None:
    frames = _decode_all(encode_data(kind, b"abc") + encode_data(kind, b""))
    assert frames == [Frame(kind, b"abc"), Frame(kind, b"")]


def test_partial_input_waits_for_more() -> None:
    wire = encode_data(KIND_STDOUT, b"x" * 1000)
    reader = FrameReader()
    reader.feed(wire[:3])
    assert reader.next_frame() is None
    reader.feed(wire[3:500])
    assert reader.next_frame() is None
    reader.feed(wire[500:])
    assert reader.next_frame() == Frame(KIND_STDOUT, b"x" * 1000)


def test_unknown_kind_is_a_protocol_error() -> None:
    reader = FrameReader()
    reader.feed(FRAME_PREFIX.pack(9, 0))
    with pytest.raises(ChannelProtocolError, match="unknown kind 9"):
        reader.next_frame()


def test_oversized_frames_are_refused_before_buffering() -> None:
    reader = FrameReader()
    reader.feed(FRAME_PREFIX.pack(KIND_STDOUT, MAX_DATA_SIZE + 1))
    with pytest.raises(ChannelProtocolError, match="over the limit"):
        reader.next_frame()
    reader = FrameReader()
    reader.feed(FRAME_PREFIX.pack(KIND_CONTROL, MAX_CONTROL_SIZE + 1))
    with pytest.raises(ChannelProtocolError, match="over the limit"):
        reader.next_frame()


def test_encoders_enforce_limits() -> None:
    with pytest.raises(ValueError):
        encode_data(KIND_FILE, b"x" * (MAX_DATA_SIZE + 1))
    with pytest.raises(SandboxError, match="request too large"):
        encode_control({"env": {"X": "y" * MAX_CONTROL_SIZE}})


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b"\xff\xfe", b'"str"'])
def test_control_must_be_a_json_object(body: bytes) -> None:
    with pytest.raises(ChannelProtocolError):
        Frame(KIND_CONTROL, body).control()


def test_data_frame_is_not_control() -> None:
    with pytest.raises(ChannelProtocolError, match="data frame"):
        Frame(KIND_STDOUT, b"{}").control()


def test_error_sentences() -> None:
    assert str(error_from_reply({"t": "error", "kind": "not_found", "subject": "/x"})) == (
        "no such file or directory in the sandbox: '/x'"
    )
    assert str(error_from_reply(
        {"t": "error", "kind": "command_not_found", "subject": "foo"}
    )) == "command not found in the sandbox: 'foo'"
    assert str(error_from_reply(
        {"t": "error", "kind": "weird", "op": "read", "subject": "/y", "message": "I/O error"}
    )) == "read failed in the sandbox for '/y': I/O error"


def test_file_info_from_wire_rejects_garbage() -> None:
    with pytest.raises(ChannelProtocolError):
        FileInfo.from_wire({"path": "/x"})
    info = FileInfo.from_wire(
        {"path": "/x", "name": "x", "kind": "file", "size": 1, "mode": 420, "mtime": 1.5}
    )
    assert info.size == 1 and info.mode == 0o644


frames_strategy = st.lists(
    st.one_of(
        st.builds(lambda k, b: encode_data(k, b), st.sampled_from(DATA_KINDS),
                  st.binary(max_size=2000)),
        st.builds(lambda d: encode_control(d),
                  st.dictionaries(st.text(max_size=10), st.text(max_size=50), max_size=5)),
    ),
    max_size=20,
)


@given(frames_strategy, st.integers(min_value=1, max_value=64))
@settings(max_examples=200, deadline=None)
def test_any_split_of_valid_frames_decodes_the_same(wires: list[bytes], step: int) -> None:
    data = b"".join(wires)
    assert _decode_all(data, step) == _decode_all(data)
    assert len(_decode_all(data)) == len(wires)


@given(st.binary(max_size=4096), st.integers(min_value=1, max_value=512))
@settings(max_examples=500, deadline=None)
def test_random_bytes_never_crash_the_reader(data: bytes, step: int) -> None:
    """Bytes from a hostile init: frames or ChannelProtocolError, nothing else, bounded memory."""
    reader = FrameReader()
    try:
        for i in range(0, len(data), step):
            reader.feed(data[i:i + step])
            for frame in reader.frames():
                assert len(frame.body) <= max(MAX_CONTROL_SIZE, MAX_DATA_SIZE)
                if frame.kind == KIND_CONTROL:
                    with contextlib.suppress(ChannelProtocolError):
                        assert isinstance(frame.control(), dict)
    except ChannelProtocolError:
        pass


@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
))
@settings(max_examples=200, deadline=None)
def test_control_bodies_that_are_valid_json(value: object) -> None:
    body = json.dumps(value).encode()
    frame = Frame(KIND_CONTROL, body)
    if isinstance(value, dict):
        assert frame.control() == value
    else:
        with pytest.raises(ChannelProtocolError):
            frame.control()
