"""Image reference parsing and normalisation (Docker's rules)."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from corral.errors import ImageError
from corral.runtime.images.reference import ImageRef, parse_reference

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alpine", ("docker.io", "library/alpine", "latest", None)),
        ("python:3.12", ("docker.io", "library/python", "3.12", None)),
        ("ubuntu/tool", ("docker.io", "ubuntu/tool", "latest", None)),
        ("index.docker.io/alpine", ("docker.io", "library/alpine", "latest", None)),
        ("docker.io/library/alpine:3", ("docker.io", "library/alpine", "3", None)),
        (f"host:5000/team/tool@{D}", ("host:5000", "team/tool", None, D)),
        (f"host:5000/team/tool:v1@{D}", ("host:5000", "team/tool", "v1", D)),
        ("localhost/x", ("localhost", "x", "latest", None)),
        ("localhost:5000/a/b/c:v1.2-rc_3", ("localhost:5000", "a/b/c", "v1.2-rc_3", None)),
        (
            "203.0.113.51:5000/corral/busybox",
            ("203.0.113.51:5000", "corral/busybox", "latest", None),
        ),
        ("[2001:db8::1]:5000/x", ("[2001:db8::1]:5000", "x", "latest", None)),
        ("registry.example/a__b/c-d.e", ("registry.example", "a__b/c-d.e", "latest", None)),
    ],
)
def test_normalisation(text: str, expected: tuple[str, str, str | None, str | None]) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == expected
    assert parse_reference(str(ref)) == ref


def test_api_host_and_identifier() -> None:
    assert parse_reference("alpine").api_host == "registry-1.docker.io"
    assert parse_reference("h:1/x").api_host == "h:1"
    assert parse_reference(f"x:t@{D}").identifier == D
    assert parse_reference("x:t").identifier == "t"
    assert str(parse_reference("alpine")) == "docker.io/library/alpine:latest"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("Alpine", "repository component 'Alpine'"),
        ("a b", "whitespace"),
        ("x:", "tag ''"),
        ("x:-bad", "tag '-bad'"),
        ("x@sha256:12", "64 lowercase hex"),
        ("x@md5:" + "a" * 32, "sha256:<hex>"),
        (f"x@sha256:{'A' * 64}", "lowercase hex"),
        ("host:99999/a", "port 99999"),
        (":tag", "no repository"),
        ("a//b", "repository component ''"),
        ("a/-b", "repository component '-b'"),
        ("bad_host!:5000/x", "registry host"),
        ("x" * 2000, "longer than"),
        ("h.io/" + "a" * 300, "longer than 255"),
    ],
)
def test_errors_name_the_part(text: str, message: str) -> None:
    with pytest.raises(ImageError, match=message.replace("(", r"\(")) as info:
        parse_reference(text)
    text_of = str(info.value)
    assert "\n" not in text_of and text_of.endswith(".")


@given(st.text(max_size=300))
def test_any_text_parses_or_raises_image_error(text: str) -> None:
    try:
        ref = parse_reference(text)
    except ImageError:
        return
    assert parse_reference(str(ref)) == ref  # normalisation is a fixed point


_component = st.from_regex(r"[a-z0-9]{1,5}([._-][a-z0-9]{1,5}){0,2}", fullmatch=True)


@given(
    st.sampled_from(["", "docker.io/", "localhost/", "h.example:5000/", "10.0.0.1:1/"]),
    st.lists(_component, min_size=1, max_size=4),
    st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)),
    st.one_of(st.none(), st.from_regex(r"[a-f0-9]{64}", fullmatch=True)),
)
def test_valid_references_round_trip(
    prefix: str, components: list[str], tag: str | None, hexdigest: str | None
) -> None:
    # Without a host, a dotted first component *is* a host (Docker's rule): not this case.
    assume(prefix or len(components) == 1 or "." not in components[0])
    text = prefix + "/".join(components)
    if tag:
        text += f":{tag}"
    if hexdigest:
        text += f"@sha256:{hexdigest}"
    ref = parse_reference(text)
    assert isinstance(ref, ImageRef)
    assert ref.repository.endswith("/".join(components))
    assert ref.tag == (tag or (None if hexdigest else "latest"))
    assert parse_reference(str(ref)) == ref
