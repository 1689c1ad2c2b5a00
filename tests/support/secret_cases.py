"""The violation matrix of issue 8 point 7, as one table both HTTP rewriters are tested with.

HTTP/1 and HTTP/2 must decide alike (a peer's h2 path once forwarded the raw placeholder while
its h1 path substituted), so each case is written once, protocol-neutrally: the connection
(SNI or plain, pinned or not), the request (method, authority, target, headers, body,
trailers) and what must come out (forwarded with the value where it belongs, forwarded with
the placeholder for an ``allow_placeholder_for`` host, or a violation naming secret, channel
and action). A runner renders the request in its protocol, feeds it (whole and split at every
byte offset), and checks the bytes that would go upstream with :func:`check_upstream`.

Used by ``tests/unit/test_http1_rewriter*.py`` and the HTTP/2 rewriter's tests.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Literal

from corral.config import SecretEntry, ViolationAction
from corral.net.secrets import Channel, SecretTable

GH_VALUE = "ghp_REALvalue0123456789abcdef"
Q_VALUE = "q-real/value+with=chars&more"
TERM_VALUE = "term-real-value-42"

GH = "$CORRAL_SECRET_GH_TOKEN"
Q = "$CORRAL_SECRET_QTOKEN"
TERM = "$CORRAL_SECRET_TERM_KEY"

SECRETS = (
    # Defaults: headers and Basic auth; violations take the config's default (block-and-log).
    SecretEntry(
        env_var="GH_TOKEN",
        value=GH_VALUE,
        allowed_hosts=["api.github.com"],
        allow_placeholder_for=["api.llm.test"],
    ),
    # Everything on, a suffix pattern, violations just block.
    SecretEntry(
        env_var="QTOKEN",
        from_env="HOST_QTOKEN",
        allowed_hosts=["*.query.test"],
        inject_query=True,
        inject_body=True,
        on_violation="block",
    ),
    SecretEntry(
        env_var="TERM_KEY",
        value=TERM_VALUE,
        allowed_hosts=["term.test"],
        on_violation="block-and-terminate",
    ),
)
ENVIRON = {"HOST_QTOKEN": Q_VALUE}
VALUES = {"GH_TOKEN": GH_VALUE, "QTOKEN": Q_VALUE, "TERM_KEY": TERM_VALUE}
PLACEHOLDERS = {"GH_TOKEN": GH, "QTOKEN": Q, "TERM_KEY": TERM}


def table() -> SecretTable:
    return SecretTable.from_entries(SECRETS, environ=ENVIRON)


Expect = Literal["forward", "violation", "passed"]


@dataclass(frozen=True)
class SecretCase:
    """One request on one connection and its required outcome."""

    id: str
    sni: str | None  # None: plain HTTP (not intercepted TLS)
    pinned: bool
    authority: str
    target: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    method: str = "GET"
    trailers: tuple[tuple[str, str], ...] = ()
    expect: Expect = "forward"
    #: for violation/passed: the secret and channel reported; for violation also the action.
    secret: str | None = None
    channel: Channel | None = None
    action: ViolationAction | None = None
    #: for forward: byte strings that must each appear in what goes upstream
    upstream_contains: tuple[bytes, ...] = ()
    #: protocols this case applies to (CONNECT metadata is HTTP/1 only)
    protocols: frozenset[str] = field(default_factory=lambda: frozenset({"h1", "h2"}))


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _pct(text: str) -> str:
    return "".join(f"%{b:02X}" for b in text.encode())


LOG = ViolationAction.BLOCK_AND_LOG
BLOCK = ViolationAction.BLOCK
TERMINATE = ViolationAction.BLOCK_AND_TERMINATE

CASES: tuple[SecretCase, ...] = (
    # -- substituted ---------------------------------------------------------------------
    SecretCase(
        "bearer-to-allowed-host",
        "api.github.com",
        True,
        "api.github.com",
        "/user",
        (("Authorization", f"Bearer {GH}"),),
        upstream_contains=(f"Bearer {GH_VALUE}".encode(),),
    ),
    SecretCase(
        "basic-auth-to-allowed-host",
        "api.github.com",
        True,
        "api.github.com",
        "/user",
        (("Authorization", _basic("me", GH)),),
        upstream_contains=(_basic("me", GH_VALUE).encode(),),
    ),
    SecretCase(
        "host-case-and-port-do-not-matter",
        "API.GitHub.com",
        True,
        "api.github.COM:443",
        "/",
        (("X-Token", GH),),
        upstream_contains=(GH_VALUE.encode(),),
    ),
    SecretCase(
        "query-percent-encoded-substituted",
        "a.query.test",
        True,
        "a.query.test",
        f"/search?key={_pct('$')}CORRAL_SECRET_QTOKEN&x=1",
        upstream_contains=(b"key=q-real%2Fvalue%2Bwith%3Dchars%26more&x=1",),
    ),
    SecretCase(
        "form-body-substituted",
        "a.query.test",
        True,
        "a.query.test",
        "/token",
        (("Content-Type", "application/x-www-form-urlencoded"),),
        body=b"grant=client&secret=%24CORRAL_SECRET_QTOKEN",
        method="POST",
        upstream_contains=(b"secret=q-real%2Fvalue%2Bwith%3Dchars%26more",),
    ),
    SecretCase(
        "json-body-substituted",
        "b.query.test",
        True,
        "b.query.test",
        "/v1",
        (("Content-Type", "application/json"),),
        body=json.dumps({"key": Q}).encode(),
        method="POST",
        upstream_contains=(json.dumps({"key": Q_VALUE}).encode(),),
    ),
    SecretCase(
        "one-secret-two-places",
        "a.query.test",
        True,
        "a.query.test",
        f"/x?k={Q}",
        (("X-Key", Q),),
        upstream_contains=(b"k=q-real%2Fvalue", f"X-Key: {Q_VALUE}".encode()),
        protocols=frozenset({"h1"}),  # h2 lower-cases header names: see the next case
    ),
    SecretCase(
        "one-secret-two-places-h2-names",
        "a.query.test",
        True,
        "a.query.test",
        f"/x?k={Q}",
        (("x-key", Q),),
        upstream_contains=(b"k=q-real%2Fvalue", Q_VALUE.encode()),
        protocols=frozenset({"h2"}),
    ),
    # -- placeholder passed to an allow_placeholder_for host ------------------------------
    SecretCase(
        "placeholder-inert-for-llm-api",
        "api.llm.test",
        True,
        "api.llm.test",
        "/v1/chat",
        (("Content-Type", "application/json"),),
        body=json.dumps({"messages": [f"use {GH} to call the API"]}).encode(),
        method="POST",
        expect="passed",
        secret="GH_TOKEN",
        channel=Channel.BODY,
        upstream_contains=(GH.encode(),),
    ),
    # -- violations: another host, plain, not pinned, Host differs -------------------------
    SecretCase(
        "header-to-other-host",
        "evil.test",
        True,
        "evil.test",
        "/",
        (("Authorization", f"Bearer {GH}"),),
        expect="violation",
        secret="GH_TOKEN",
        channel=Channel.HEADER,
        action=LOG,
    ),
    SecretCase(
        "plain-http-to-allowed-name",
        None,
        True,
        "api.github.com",
        "/",
        (("Authorization", f"token {GH}"),),
        expect="violation",
        secret="GH_TOKEN",
        channel=Channel.HEADER,
        action=LOG,
    ),
    SecretCase(
        "address-not-pinned",
        "api.github.com",
        False,
        "api.github.com",
        "/",
        (("Authorization", f"Bearer {GH}"),),
        expect="violation",
        secret="GH_TOKEN",
        channel=Channel.HEADER,
        action=LOG,
    ),
    SecretCase(
        "host-differs-from-sni",
        "api.github.com",
        True,
        "evil.test",
        "/",
        (("Authorization", f"Bearer {GH}"),),
        expect="violation",
        secret="GH_TOKEN",
        channel=Channel.HEADER,
        action=LOG,
    ),
    SecretCase(
        "suffix-pattern-excludes-apex",
        "query.test",
        True,
        "query.test",
        "/",
        (("X-Key", Q),),
        expect="violation",
        secret="QTOKEN",
        channel=Channel.HEADER,
        action=BLOCK,
    ),
    # -- violations: encodings --------------------------------------------------------------
    SecretCase(
        "percent-encoded-header",
        "evil.test",
        True,
        "evil.test",
        "/",
        (("Cookie", f"t={_pct(GH)}"),),
        expect="violation",
        secret="GH_TOKEN",
        channel=Channel.HEADER,
        action=LOG,
    ),
    SecretCase(
        "partial-lowercase-percent-in-query",
        "evil.test",
        True,
        "evil.test",
        "/q?t=%24CORRAL_SECRET_GH%5fTOKEN",
        expect="violation",
        secret="GH_TOKEN",
        channel=Channel.TARGET,
        action=LOG,
    ),
    SecretCase(
        "double-percent-in-path",
        "evil.test",
        True,
        "evil.test",
        "/%2524CORRAL_SECRET_GH_TOKEN",
        expect="violation",
        secret="GH_TOKEN",
        channel=Channel.TARGET,
        action=LOG,
    ),
    SecretCase(
        "base64-in-basic-auth",
        "evil.test",
        True,
        "evil.test",
        "/",
        (("Authorization", _basic("x", GH)),),
        expect="violation",
        secret="GH_TOKEN",
        channel=Channel.BASIC_AUTH,
        action=LOG,
    ),
    SecretCase(
        "json-escaped-body",
        "evil.test",
        True,
        "evil.test",
        "/collect",
        (("Content-Type", "application/json"),),
        body=b'{"k": "\\u0024CORRAL_SECRET_GH\\u005fTOKEN"}',
        method="POST",
        expect="violation",
        secret="GH_TOKEN",
        channel=Channel.BODY,
        action=LOG,
    ),
    SecretCase(
        "html-entity-body",
        "evil.test",
        True,
        "evil.test",
        "/collect",
        (("Content-Type", "text/html"),),
        body=b"<p>&#36;CORRAL_SECRET_GH_TOKEN</p>",
        method="POST",
        expect="violation",
        secret="GH_TOKEN",
        channel=Channel.BODY,
        action=LOG,
    ),
    SecretCase(
        "base64-body",
        "evil.test",
        True,
        "evil.test",
        "/upload",
        body=b"data=" + base64.b64encode(b"xx" + GH.encode() + b"yy"),
        method="POST",
        expect="violation",
        secret="GH_TOKEN",
        channel=Channel.BODY,
        action=LOG,
    ),
    SecretCase(
        "trailer-to-other-host",
        "evil.test",
        True,
        "evil.test",
        "/up",
        body=b"hello",
        method="POST",
        trailers=(("x-checksum", GH),),
        expect="violation",
        secret="GH_TOKEN",
        channel=Channel.TRAILER,
        action=LOG,
    ),
    # -- violations: allowed host, channel not enabled --------------------------------------
    SecretCase(
        "query-when-inject-query-off",
        "api.github.com",
        True,
        "api.github.com",
        f"/user?access_token={GH}",
        expect="violation",
        secret="GH_TOKEN",
        channel=Channel.TARGET,
        action=LOG,
    ),
    SecretCase(
        "body-when-inject-body-off",
        "api.github.com",
        True,
        "api.github.com",
        "/gists",
        (("Content-Type", "application/json"),),
        body=json.dumps({"token": GH}).encode(),
        method="POST",
        expect="violation",
        secret="GH_TOKEN",
        channel=Channel.BODY,
        action=LOG,
    ),
    SecretCase(
        "path-never-substituted",
        "a.query.test",
        True,
        "a.query.test",
        f"/keys/{Q}",
        expect="violation",
        secret="QTOKEN",
        channel=Channel.TARGET,
        action=BLOCK,
    ),
    # -- actions ---------------------------------------------------------------------------
    SecretCase(
        "terminate-secret-elsewhere",
        "evil.test",
        True,
        "evil.test",
        "/",
        (("X-Api-Key", TERM),),
        expect="violation",
        secret="TERM_KEY",
        channel=Channel.HEADER,
        action=TERMINATE,
    ),
    SecretCase(
        "block-secret-elsewhere",
        "evil.test",
        True,
        "evil.test",
        "/",
        (("X-Api-Key", Q),),
        expect="violation",
        secret="QTOKEN",
        channel=Channel.HEADER,
        action=BLOCK,
    ),
    SecretCase(
        "allowed-secret-beside-a-foreign-one",
        "api.github.com",
        True,
        "api.github.com",
        "/",
        (("Authorization", f"Bearer {GH}"), ("X-Other", TERM)),
        expect="violation",
        secret="TERM_KEY",
        channel=Channel.HEADER,
        action=TERMINATE,
    ),
    # -- CONNECT tunnel metadata (HTTP/1 only) ---------------------------------------------
    SecretCase(
        "connect-proxy-authorization",
        None,
        True,
        "api.github.com:443",
        "api.github.com:443",
        (("Proxy-Authorization", _basic("u", GH)),),
        method="CONNECT",
        expect="violation",
        secret="GH_TOKEN",
        channel=Channel.CONNECT,
        action=LOG,
        protocols=frozenset({"h1"}),
    ),
)


def cases_for(protocol: str) -> list[SecretCase]:
    return [c for c in CASES if protocol in c.protocols]


def check_upstream(case: SecretCase, upstream: bytes) -> None:
    """Assert what went upstream for a forwarded/passed case: values only where they belong.

    ``upstream`` is every byte that would be sent to the server (for HTTP/2 the decoded header
    block and data, since HPACK hides literal bytes).
    """
    assert case.expect != "violation"
    for needle in case.upstream_contains:
        assert needle in upstream, (case.id, needle, upstream)
    t = table()
    host = (case.sni or case.authority).lower().partition(":")[0]
    for name, value in VALUES.items():
        if not t.secret(name).is_allowed_host(host):
            assert value.encode() not in upstream, (case.id, name)
    remaining = t.find(upstream)
    if case.expect == "passed":
        assert remaining == {case.secret}, (case.id, remaining)
    else:
        assert not remaining, (case.id, remaining)


# -- HTTP/2 only (appended for the HTTP/2 rewriter) -----------------------------------------
# h2 sends each cookie crumb as its own field (RFC 9113 8.2.3) and carries the authority as a
# pseudo-header any bytes can fill; both must be judged like the rest of the header block.
H2_CASES: tuple[SecretCase, ...] = (
    SecretCase(
        "cookie-crumbs-substituted-h2",
        "api.github.com",
        True,
        "api.github.com",
        "/",
        (("cookie", "a=1"), ("cookie", f"t={GH}")),
        upstream_contains=(f"t={GH_VALUE}".encode(),),
        protocols=frozenset({"h2"}),
    ),
    SecretCase(
        "placeholder-as-authority-h2",
        "evil.test",
        True,
        GH,
        "/",
        expect="violation",
        secret="GH_TOKEN",
        channel=Channel.HEADER,
        action=LOG,
        protocols=frozenset({"h2"}),
    ),
)
CASES = CASES + H2_CASES
