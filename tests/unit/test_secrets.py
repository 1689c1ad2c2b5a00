"""The secret table, the placeholder detector and the echo masker (corral.net.secrets)."""

from __future__ import annotations

import base64
import json
import urllib.parse

import pytest

from corral.config import ConfigError, SecretEntry, ViolationAction
from corral.net.secrets import (
    MAX_SUBSTITUTED_BODY_BYTES,
    Channel,
    EchoMasker,
    PlaceholderPassed,
    SecretTable,
    Violation,
    most_severe,
    normalize_host,
)
from tests.support import secret_cases as sc

P = sc.GH.encode()


@pytest.fixture(scope="module")
def table() -> SecretTable:
    return sc.table()


# -- the table ------------------------------------------------------------------------------
def test_table_resolves_values_and_actions(table: SecretTable) -> None:
    assert table.names == ("GH_TOKEN", "QTOKEN", "TERM_KEY")
    assert table.secret("QTOKEN").value == sc.Q_VALUE.encode()
    assert table.secret("GH_TOKEN").on_violation is ViolationAction.BLOCK_AND_LOG
    assert table.secret("QTOKEN").on_violation is ViolationAction.BLOCK
    assert table.secret("TERM_KEY").on_violation is ViolationAction.BLOCK_AND_TERMINATE
    assert table.guest_environment()["GH_TOKEN"] == sc.GH


def test_config_default_action_applies() -> None:
    t = SecretTable.from_entries(
        sc.SECRETS, on_secret_violation="block-and-terminate", environ=sc.ENVIRON
    )
    assert t.secret("GH_TOKEN").on_violation is ViolationAction.BLOCK_AND_TERMINATE
    assert t.secret("QTOKEN").on_violation is ViolationAction.BLOCK  # its own wins


def test_values_are_never_printed(table: SecretTable) -> None:
    for s in table.secrets:
        assert s.value.decode() not in repr(s)
    assert sc.GH_VALUE not in repr(table)
    scope = table.scope(sni="api.github.com", pinned=True, authority="api.github.com")
    assert sc.GH_VALUE not in repr(scope)


def test_missing_host_variable_names_the_field() -> None:
    with pytest.raises(ConfigError) as err:
        SecretTable.from_entries(sc.SECRETS, environ={})
    assert err.value.path == "secrets[1].from_env"
    assert "HOST_QTOKEN" in str(err.value)


def test_host_value_containing_placeholder_is_refused() -> None:
    e = SecretEntry(env_var="T", from_env="H", allowed_hosts=["a.test"])
    with pytest.raises(ConfigError) as err:
        SecretTable.from_entries([e], environ={"H": "x$CORRAL_SECRET_Tx"})
    assert err.value.path == "secrets[0].placeholder"


def test_bad_default_action_names_the_field() -> None:
    with pytest.raises(ConfigError) as err:
        SecretTable.from_entries(sc.SECRETS, on_secret_violation="log", environ=sc.ENVIRON)
    assert err.value.path == "on_secret_violation"


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("API.Example.com.", "api.example.com"),
        (b"api.example.com:443", "api.example.com"),
        ("[::1]:8443", "::1"),
        ("::1", "::1"),
        ("", None),
        (None, None),
    ],
)
def test_normalize_host(raw: str | bytes | None, want: str | None) -> None:
    assert normalize_host(raw) == want


# -- scope ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sni", "pinned", "authority", "injectable"),
    [
        ("api.github.com", True, "api.github.com", {"GH_TOKEN"}),
        ("api.github.com", True, "API.GITHUB.COM:443", {"GH_TOKEN"}),
        ("api.github.com", False, "api.github.com", set()),
        ("api.github.com", True, "other.github.com", set()),
        (None, True, "api.github.com", set()),
        ("x.query.test", True, "x.query.test", {"QTOKEN"}),
        ("query.test", True, "query.test", set()),
        ("evil.test", True, "evil.test", set()),
    ],
)
def test_scope_needs_allowed_sni_pin_and_matching_authority(
    table: SecretTable, sni: str | None, pinned: bool, authority: str, injectable: set[str]
) -> None:
    scope = table.scope(sni=sni, pinned=pinned, authority=authority)
    assert {s.name for s in scope.injectable} == injectable


def test_judge_reasons_name_the_cause(table: SecretTable) -> None:
    cases = [
        (dict(sni=None, pinned=True, authority="api.github.com"), "not intercepted TLS"),
        (dict(sni="evil.test", pinned=True, authority="evil.test"), "not one of"),
        (dict(sni="api.github.com", pinned=False, authority="api.github.com"), "sandbox's DNS"),
        (dict(sni="api.github.com", pinned=True, authority="x.test"), "differs"),
        (dict(sni="api.github.com", pinned=True, authority="api.github.com"), "inject_body"),
    ]
    for kw, reason in cases:
        (v,) = table.scope(**kw).judge({"GH_TOKEN"}, Channel.BODY)  # type: ignore[arg-type]
        assert isinstance(v, Violation) and reason in v.reason, (kw, v)
        assert sc.GH_VALUE not in v.describe()


def test_allow_placeholder_for_passes(table: SecretTable) -> None:
    scope = table.scope(sni="api.llm.test", pinned=True, authority="api.llm.test")
    assert scope.judge({"GH_TOKEN"}, Channel.HEADER) == [
        PlaceholderPassed("GH_TOKEN", "api.llm.test", Channel.HEADER)
    ]


def test_most_severe() -> None:
    mk = lambda a: Violation("S", "h", Channel.HEADER, a, "r")  # noqa: E731
    vs = [mk(ViolationAction.BLOCK), mk(ViolationAction.BLOCK_AND_TERMINATE), mk("block-and-log")]
    assert most_severe(vs).action is ViolationAction.BLOCK_AND_TERMINATE  # type: ignore[union-attr]
    assert most_severe([]) is None


# -- substitution ---------------------------------------------------------------------------
def test_header_and_basic_substitution(table: SecretTable) -> None:
    scope = table.scope(sni="api.github.com", pinned=True, authority="api.github.com")
    v, used = scope.substitute_header(b"Authorization", b"Bearer " + P)
    assert v == b"Bearer " + sc.GH_VALUE.encode() and used == {"GH_TOKEN"}
    token = base64.b64encode(b"me:" + P)
    v, used = scope.substitute_header(b"authorization", b"basic " + token)
    assert v == b"basic " + base64.b64encode(b"me:" + sc.GH_VALUE.encode())
    # Not valid base64: left alone (and so found by the detector afterwards).
    v, used = scope.substitute_header(b"Authorization", b"Basic !!" + token)
    assert used == frozenset() and table.find(v) == {"GH_TOKEN"}


def test_basic_auth_off_leaves_the_token() -> None:
    e = SecretEntry(env_var="T", value="val", allowed_hosts=["a.test"], inject_basic_auth=False)
    t = SecretTable.from_entries([e], environ={})
    scope = t.scope(sni="a.test", pinned=True, authority="a.test")
    token = b"Basic " + base64.b64encode(b"u:$CORRAL_SECRET_T")
    assert scope.substitute_header(b"Authorization", token) == (token, frozenset())
    assert [v.channel for v in scope.judge(t.find(token), Channel.BASIC_AUTH)] == [
        Channel.BASIC_AUTH
    ]


def test_query_substitution_any_percent_mix(table: SecretTable) -> None:
    scope = table.scope(sni="a.query.test", pinned=True, authority="a.query.test")
    quoted = urllib.parse.quote(sc.Q_VALUE, safe="-._~").encode()
    for form in (
        sc.Q,
        urllib.parse.quote(sc.Q),
        "%24CORRAL%5fSECRET_QTOKEN",
        "".join(f"%{b:02x}" for b in sc.Q.encode()),
    ):
        target, used = scope.substitute_target(b"/p?a=" + form.encode() + b"&b")
        assert target == b"/p?a=" + quoted + b"&b" and used == {"QTOKEN"}, form
    # The path is never rewritten.
    target, used = scope.substitute_target(b"/" + sc.Q.encode())
    assert used == frozenset()


def test_body_substitution_by_content_type(table: SecretTable) -> None:
    scope = table.scope(sni="a.query.test", pinned=True, authority="a.query.test")
    assert scope.wants_body and scope.wants_query
    body, _ = scope.substitute_body(
        b"k=%24CORRAL_SECRET_QTOKEN", b"application/x-www-form-urlencoded"
    )
    assert body == b"k=" + urllib.parse.quote_plus(sc.Q_VALUE).encode()
    body, _ = scope.substitute_body(
        json.dumps({"k": sc.Q}).encode(), b"application/json; charset=utf-8"
    )
    assert json.loads(body) == {"k": sc.Q_VALUE}
    body, _ = scope.substitute_body(b"raw " + sc.Q.encode(), None)
    assert body == b"raw " + sc.Q_VALUE.encode()
    assert MAX_SUBSTITUTED_BODY_BYTES >= 64 * 1024


def test_json_value_with_quotes_stays_json() -> None:
    e = SecretEntry(env_var="J", value='a"b\\c', allowed_hosts=["a.test"], inject_body=True)
    t = SecretTable.from_entries([e], environ={})
    scope = t.scope(sni="a.test", pinned=True, authority="a.test")
    body, _ = scope.substitute_body(b'{"k": "$CORRAL_SECRET_J"}', b"application/json")
    assert json.loads(body) == {"k": 'a"b\\c'}


# -- the detector ---------------------------------------------------------------------------
ENCODINGS = {
    "raw": P,
    "percent": urllib.parse.quote(P, safe="").encode(),
    "percent-lower": "".join(f"%{b:02x}" for b in P).encode(),
    "percent-partial": b"%24CORRAL%5fSECRET_GH_TOKEN",
    "percent-twice": urllib.parse.quote(urllib.parse.quote(P, safe=""), safe="").encode(),
    "json-u": b"\\u0024CORRAL_SECRET_GH_TOKEN",
    "json-all-u": "".join(f"\\u{b:04x}" for b in P).encode(),
    "js-x": b"\\x24CORRAL_SECRET_GH_TOKEN",
    "html-dec": b"&#36;CORRAL_SECRET_GH_TOKEN",
    "html-hex": b"&#x24;CORRAL&#X5F;SECRET_GH_TOKEN",
    "json-then-percent": b"%5Cu0024CORRAL_SECRET_GH_TOKEN",
    "basic": b"Basic " + base64.b64encode(b"user:" + P),
    "b64-align-1": base64.b64encode(b"x" + P + b"yz"),
    "b64-align-2": base64.b64encode(b"xy" + P),
    "b64-urlsafe": base64.urlsafe_b64encode(b"\xfb\xff" + P + b"\xff"),
    "b64-then-percent": urllib.parse.quote(base64.b64encode(b"\xfb" + P), safe="").encode(),
}


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_detector_finds_every_encoding(table: SecretTable, name: str) -> None:
    data = b"prefix \x00\xff " + ENCODINGS[name] + b" suffix"
    assert table.find(data) == {"GH_TOKEN"}


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_detector_split_at_every_offset_reports_on_the_completing_chunk(
    table: SecretTable, name: str
) -> None:
    data = b"ab%" + ENCODINGS[name] + b"\\"
    enc_end = 3 + len(ENCODINGS[name])
    for cut in range(len(data) + 1):
        det = table.detector()
        first = det.feed(data[:cut])
        if cut >= enc_end:
            assert first == {"GH_TOKEN"}, (name, cut)
        second = det.feed(data[cut:])
        assert second == {"GH_TOKEN"}, (name, cut)


def test_detector_byte_at_a_time(table: SecretTable) -> None:
    for name, enc in ENCODINGS.items():
        det = table.detector()
        for i in range(len(enc)):
            det.feed(enc[i : i + 1])
        assert det.finish() == {"GH_TOKEN"}, name


@pytest.mark.parametrize(
    "clean",
    [
        b"",
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"$CORRAL_SECRET_GH_TOKE",  # one short
        b"$CORRAL_SECRET_OTHER",
        b"%24CORRAL_SECRET_GH_TOKE%",
        b"&#36CORRAL_SECRET_GH_TOKEN",  # no ';': not a character reference
        base64.b64encode(P[:-1]),
        bytes(range(256)) * 4,
    ],
)
def test_detector_has_no_false_positives_here(table: SecretTable, clean: bytes) -> None:
    assert table.find(clean) == frozenset()


def test_detector_finds_each_secret(table: SecretTable) -> None:
    data = f"{sc.GH} and {urllib.parse.quote(sc.TERM)}".encode()
    assert table.find(data) == {"GH_TOKEN", "TERM_KEY"}


def test_empty_table_detects_nothing() -> None:
    t = SecretTable([])
    assert not t and t.find(P) == frozenset() and not t.detector().active


# -- echo masking ---------------------------------------------------------------------------
def test_masker_only_for_hosts_that_receive_the_secret(table: SecretTable) -> None:
    assert not table.masker_for("evil.test").active
    assert table.masker_for("API.github.com").active


def test_masker_forms(table: SecretTable) -> None:
    m = table.masker_for("a.query.test")
    v = sc.Q_VALUE
    assert m.mask(v.encode()) == sc.Q.encode()
    assert m.mask(json.dumps({"k": v}).encode()) == json.dumps({"k": sc.Q}).encode()
    assert (
        m.mask(urllib.parse.quote(v, safe="").encode())
        == urllib.parse.quote(sc.Q, safe="").encode()
    )
    assert m.mask(urllib.parse.quote_plus(v).encode()) == urllib.parse.quote_plus(sc.Q).encode()
    assert m.may_change_length


def test_masker_across_every_chunk_boundary(table: SecretTable) -> None:
    body = b"<html>your key: " + sc.GH_VALUE.encode() + b" (keep it safe)</html>"
    want = body.replace(sc.GH_VALUE.encode(), P)
    for cut in range(len(body) + 1):
        m = table.masker_for("api.github.com")
        out = m.feed(body[:cut]) + m.feed(body[cut:]) + m.flush()
        assert out == want, cut
        assert sc.GH_VALUE.encode() not in out


def test_masker_holds_back_only_a_partial_match() -> None:
    m = EchoMasker([(b"secret-value", b"$PLACEHOLDER")])
    assert m.feed(b"data: token\n\n") == b"data: token\n\n"  # SSE is not delayed
    assert m.feed(b"x secr") == b"x "
    assert m.feed(b"ecy") == b"secrecy"
    assert m.flush() == b""


def test_masker_added_pair(table: SecretTable) -> None:
    m = table.masker_for("api.github.com")
    real, shown = base64.b64encode(b"me:" + sc.GH_VALUE.encode()), base64.b64encode(b"me:" + P)
    m.add_pair(real, shown)
    assert (
        m.mask(b'"Authorization": "Basic ' + real + b'"')
        == b'"Authorization": "Basic ' + shown + b'"'
    )
