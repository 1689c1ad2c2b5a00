"""``corral policy check`` and ``corral policy explain`` through click's CliRunner."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from corral.cli.policy import parse_to, register
from corral.config import PolicyProtocol
from corral.errors import ConfigError

CONFIG = {
    "policy": "public-only",
    "rules": [
        {"action": "deny", "destination": "203.0.113.66"},
        {"action": "allow", "destination": "10.0.0.0/8", "protocol": "tcp", "port": "5432"},
        {"action": "allow", "destination": "10.1.0.0/16", "protocol": "tcp", "port": "5432"},
        {"action": "deny", "direction": "ingress", "destination": "2001:db8::/32"},
        {"action": "deny", "destination": "evil.example"},
    ],
    "deny_domains": ["tracker.example"],
}


@pytest.fixture
def root() -> click.Group:
    @click.group()
    def cli() -> None:
        pass

    register(cli)
    return cli


@pytest.fixture
def config_file(tmp_path: Path) -> str:
    path = tmp_path / "net.json"
    path.write_text(json.dumps(CONFIG))
    return str(path)


def _run(root: click.Group, *args: str) -> tuple[int, str, str]:
    result = CliRunner(mix_stderr=False).invoke(root, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def _json(root: click.Group, *args: str) -> dict[str, object]:
    code, out, err = _run(root, "policy", "explain", *args, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert set(doc) == {"action", "rule", "reason", "names", "revealed", "wait_for_name", "handled_by", "stage"}
    return doc  # type: ignore[no-any-return]


def test_check_prints_warnings_and_exits_0(root: click.Group, config_file: str) -> None:
    code, out, _ = _run(root, "policy", "check", config_file)
    assert code == 0
    assert "rule 2 (deny egress 203.0.113.66) never matches" in out
    assert "the preset's rule 1 (allow egress public)" in out
    assert "rule 4 (allow egress 10.1.0.0/16 tcp 5432) never matches: rule 3" in out
    assert "never decides a DNS query" in out  # deny evil.example under public-only
    assert out.endswith("7 rules (2 from preset 'public-only'), 3 warnings\n")


def test_check_json(root: click.Group, config_file: str) -> None:
    code, out, _ = _run(root, "policy", "check", "--json", config_file)
    assert code == 0
    doc = json.loads(out)
    assert [(w["rule"], w["kind"]) for w in doc] == [
        (2, "shadowed"),
        (4, "shadowed"),
        (6, "dns-shadowed"),
    ]


def test_check_clean_file(root: click.Group, tmp_path: Path) -> None:
    path = tmp_path / "ok.json"
    path.write_text('{"policy": "non-local"}')
    code, out, _ = _run(root, "policy", "check", str(path))
    assert code == 0 and "0 warnings" in out


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            '{"rules": [{"action": "allow", "port": "70000"}]}',
            "rules[0].port: '70000' is not a port",
        ),
        ('{"rules": [{"action": "allow", "port": "9-1"}]}', "is an empty range"),
        ('{"polcy": "none"}', "polcy: unknown field"),
        ("{not json", "not valid JSON"),
        (
            '{"rules": [{"action": "allow", "direction": "ingress", "protocol": "icmpv4"}]}',
            "cannot be used in an ingress rule",
        ),
    ],
)
def test_check_invalid_file_is_one_sentence_and_exit_2(
    root: click.Group, tmp_path: Path, text: str, needle: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    code, out, err = _run(root, "policy", "check", str(path))
    assert code == 2 and out == ""
    assert err.startswith(f"corral: {path}: ") and needle in err
    assert len(err.strip().splitlines()) == 1


def test_check_missing_file(root: click.Group, tmp_path: Path) -> None:
    code, _, err = _run(root, "policy", "check", str(tmp_path / "nope.json"))
    assert code == 2 and "cannot read the file" in err


def test_explain_flows_json(root: click.Group, config_file: str) -> None:
    f = ("--network-file", config_file)
    assert _json(root, *f, "--to", "203.0.113.5:443") == {
        "action": "allow",
        "rule": 1,
        "reason": "rule 1 (allow egress public) matched",
        "names": [],
        "revealed": None,
        "wait_for_name": True,  # deny_domains: the name it reveals could be on the list
        "handled_by": "proxy",
        "stage": "held",
    }
    assert _json(root, *f, "--to", "10.1.2.3:5432")["rule"] == 3
    assert _json(root, *f, "--to", "10.1.2.3:5432/udp")["rule"] is None
    assert _json(root, *f, "--to", "[::ffff:10.1.2.3]:5432")["rule"] == 3
    assert _json(root, *f, "--to", "10.1.2.3/icmpv4")["action"] == "deny"
    doc = _json(root, *f, "--to", "[2001:db8::1]:8080", "--direction", "ingress")
    assert (doc["action"], doc["rule"]) == ("deny", 5)
    doc = _json(root, *f, "--to", "[2001:db9::1]:8080", "--direction", "ingress")
    assert {k: doc[k] for k in ("action", "rule", "reason")} == {
        "action": "allow",
        "rule": None,
        "reason": "no rule matched; default ingress allow",
    }
    assert _json(root, *f, "--to", "255.255.255.255:54/udp")["reason"].startswith(  # type: ignore[union-attr]
        "255.255.255.255 is in no group"
    )


def test_explain_names_sni_and_host(root: click.Group, tmp_path: Path) -> None:
    path = tmp_path / "n.json"
    path.write_text(
        json.dumps(
            {
                "rules": [
                    {"action": "deny", "destination": "evil.example"},
                    {"action": "allow", "destination": ".example.com", "port": "443"},
                    {"action": "allow", "destination": "host", "port": "8000"},
                ]
            }
        )
    )
    f = ("--network-file", str(path))
    assert _json(root, *f, "--to", "198.51.100.1:443", "--names", "a.example.com")["rule"] == 1
    assert (
        _json(root, *f, "--to", "198.51.100.1:443", "--names", "a.example.com", "--sni", "x.org")[
            "rule"
        ]
        is None
    )
    assert _json(root, *f, "--to", "198.51.100.1:443", "--sni", "evil.example")["rule"] == 0
    doc = _json(root, *f, "--to", "172.16.0.1:8000")
    assert doc["rule"] is None and doc["reason"] == "another sandbox's address is never reachable"
    assert _json(root, *f, "--to", "172.16.0.1:8000", "--host-address", "172.16.0.1")["rule"] == 2
    assert _json(root, *f, "--to", "172.16.0.1:8000", "--gateway", "172.16.0.1")["rule"] == 2


def test_explain_says_what_the_data_path_does(root: click.Group) -> None:
    """Port 53 of any address, another sandbox under allow-all, the kernel prefilter, a
    connection held for its first bytes: each as the data path carries it out."""
    doc = _json(root, "--net", "public-only", "--to", "172.16.0.1:53/udp", "--gateway", "172.16.0.1")
    assert doc["stage"] == "dns-interceptor" and doc["handled_by"] == "dns-interceptor"
    doc = _json(root, "--net", "public-only", "--to", "8.8.8.8:53")
    assert doc["stage"] == "dns-interceptor"
    doc = _json(root, "--net", "allow-all", "--to", "172.16.0.6:80", "--gateway", "172.16.0.1")
    assert (doc["action"], doc["stage"]) == ("deny", "kernel")
    doc = _json(root, "--net", "public-only", "--to", "10.0.0.1:22")
    assert (doc["action"], doc["stage"]) == ("deny", "kernel")
    doc = _json(root, "--net", "public-only", "--to", "203.0.113.9:853")
    assert (doc["action"], doc["stage"]) == ("deny", "kernel")
    rule = ("--rule", "allow:egress@api.example:tcp:443")
    doc = _json(root, "--net", "none", *rule, "--to", "203.0.113.9:443")
    assert (doc["action"], doc["stage"]) == ("deny", "kernel")  # never resolved
    doc = _json(root, "--net", "none", *rule, "--to", "203.0.113.9:443", "--names", "api.example")
    assert (doc["action"], doc["stage"], doc["wait_for_name"]) == ("allow", "held", True)
    doc = _json(
        root, "--net", "none", *rule, "--to", "203.0.113.9:443", "--names", "api.example",
        "--sni", "evil.example",
    )  # fmt: skip
    assert (doc["action"], doc["stage"]) == ("deny", "proxy")


def test_explain_query(root: click.Group, config_file: str) -> None:
    f = ("--network-file", config_file)
    doc = _json(root, *f, "--query", "tracker.example")
    assert (doc["action"], doc["rule"]) == ("deny", None)
    assert "deny_domains[0]" in doc["reason"]  # type: ignore[operator]
    assert _json(root, *f, "--query", "example.org")["rule"] == 0
    assert _json(root, "--net", "allow-all", "--query", "x.org")["rule"] is None
    doc = _json(root, "--net", "allow-all", "--rule", "deny@.org", "--query", "x.org")
    assert (doc["action"], doc["rule"]) == ("deny", 0)


def test_explain_net_preset_and_human_output(root: click.Group) -> None:
    code, out, _ = _run(root, "policy", "explain", "--net", "non-local", "--to", "10.0.0.1:22")
    assert code == 0
    assert "allow egress tcp 10.0.0.1:22 (group private)" in out
    assert "rule:   2  allow:egress@private" in out
    assert "reason: rule 2 (allow egress private) matched" in out
    code, out, _ = _run(root, "policy", "explain", "--net", "public-only", "--to", "10.0.0.1:22")
    assert code == 0 and "deny" in out and "rule:   none" in out
    code, out, _ = _run(root, "policy", "explain", "--net", "none", "--to", "203.0.113.1:443")
    assert code == 0 and "no network interface" in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--to", "10.0.0.1"), "--to: '10.0.0.1' needs a port for tcp"),
        (("--to", "10.0.0.1:99999"), "--to: '10.0.0.1:99999': '99999' is not a port"),
        (("--to", "10.0.0.1:80/sctp"), "'sctp' is not a protocol"),
        (("--to", "10.0.0.1:7/icmpv4"), "icmpv4 has no ports"),
        (("--to", "example.com:443"), "'example.com' is not an IP address"),
        (("--to", "[2001:db8::1:443"), "is not [ipv6]:port"),
        ((), "give either --to"),
        (("--to", "10.0.0.1:1", "--query", "x.org"), "give either --to"),
        (("--net", "bogus", "--to", "10.0.0.1:1"), "--net: 'bogus' is not a preset"),
        (("--host-address", "nope", "--to", "10.0.0.1:1"), "--host-address: 'nope'"),
        (("--rule", "allow@", "--to", "10.0.0.1:1"), "--rule"),
    ],
)
def test_explain_errors_name_the_flag_and_exit_2(
    root: click.Group, args: tuple[str, ...], needle: str
) -> None:
    code, out, err = _run(root, "policy", "explain", *args)
    assert code == 2 and out == ""
    assert err.startswith("corral: ") and needle in err
    assert len(err.strip().splitlines()) == 1


def test_explain_bad_network_file(root: click.Group, tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"rules": [{"action": "maybe"}]}')
    code, _, err = _run(root, "policy", "explain", "--network-file", str(path), "--to", "1.1.1.1:1")
    assert code == 2 and "--network-file" in err and "rules[0].action" in err


def test_parse_to_forms() -> None:
    ip = ipaddress.ip_address
    assert parse_to("203.0.113.5:443") == (ip("203.0.113.5"), 443, PolicyProtocol.TCP)
    assert parse_to("[2001:db8::1]:53/UDP") == (ip("2001:db8::1"), 53, PolicyProtocol.UDP)
    assert parse_to("2001:db8::1/icmpv6") == (ip("2001:db8::1"), None, PolicyProtocol.ICMPV6)
    assert parse_to("[2001:db8::1]/icmpv6") == (ip("2001:db8::1"), None, PolicyProtocol.ICMPV6)
    with pytest.raises(ConfigError, match="--to"):
        parse_to("2001:db8::1")  # tcp needs a port
