"""The wire format (SPEC section 3): every example round-trips, unknown keys are errors."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.config import (
    ConfigError,
    DNSConfig,
    NetworkConfig,
    NetworkPolicy,
    PolicyRule,
    PortBinding,
    SecretEntry,
    TLSConfig,
    parse_publish,
    parse_rule,
    parse_secret,
)

# The examples of seed-network-reference.txt and SPEC.md, in corral's Python form.
EXAMPLES = {
    "reference: preset public-only": NetworkPolicy.public_only(),
    "reference: preset none": NetworkPolicy.none(),
    "reference: preset allow-all": NetworkPolicy.allow_all(),
    "reference: preset non-local": NetworkPolicy.non_local(),
    "reference and SPEC section 1: typical custom firewall": NetworkConfig(
        default_egress="deny",
        default_ingress="allow",
        rules=[
            PolicyRule(
                action="allow",
                direction="egress",
                destination="api.example.com",
                protocol="tcp",
                port="443",
            )
        ],
    ),
    "reference: specific first, broad fallthrough": NetworkConfig(
        default_egress="deny",
        default_ingress="allow",
        rules=[
            PolicyRule(action="deny", destination="10.0.0.5"),
            PolicyRule(action="allow", destination="10.0.0.0/8"),
            PolicyRule(
                action="allow",
                direction="egress",
                destination=".internal",
                protocols=["tcp"],
                ports=["8000-9000"],
            ),
        ],
    ),
    "reference: TLS inspect": NetworkConfig(
        tls=TLSConfig(bypass=["*.googleapis.com"], intercepted_ports=[443]),
    ),
    "reference: WithPorts": NetworkConfig(ports={8080: 8080}),
    "reference: WithPortsUDP": NetworkConfig().merged_ports(ports_udp={5353: 53}),
    "reference: WithPortBindings": NetworkConfig(
        port_bindings=[
            PortBinding(bind="0.0.0.0", host_port=8001, guest_port=8001),
            PortBinding(bind="127.0.0.1", host_port=5353, guest_port=53, protocol="udp"),
        ]
    ),
    "everything at once": NetworkConfig(
        policy="public-only",
        rules=[
            PolicyRule(action="deny", direction="any", destination="metadata"),
            PolicyRule(
                action="allow",
                direction="ingress",
                destination="192.168.0.0/16",
                protocols=["tcp", "udp"],
                ports=["22", "8000-9000"],
            ),
            PolicyRule(action="allow", destination="2001:db8::1", protocol="icmpv6"),
        ],
        default_egress="deny",
        default_ingress="deny",
        deny_domains=["evil.example"],
        deny_domain_suffixes=[".ads"],
        dns=DNSConfig(
            rebind_protection=False,
            nameservers=["1.1.1.1:53", "[2606:4700::1111]:53"],
            query_timeout_ms=2000,
        ),
        dns_rebind_protection=True,
        tls=TLSConfig(
            bypass=["pinned.example", "*.bank.example"],
            verify_upstream=False,
            intercepted_ports=[443, 8443],
            block_quic=True,
            ca_cert="/etc/ca.pem",
            ca_key="/etc/ca.key",
            upstream_ca_certs=["/etc/corp.pem"],
        ),
        ports={8080: 80, 8443: 443},
        port_bindings=[PortBinding(bind="::", host_port=9000, guest_port=9000, protocol="udp")],
        ipv4_pool="10.200.0.0/16",
        ipv6_pool="fd99::/48",
        max_connections=1024,
        on_secret_violation="block-and-terminate",
        trust_host_cas=True,
        deny_response="json",
    ),
}


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_examples_round_trip(name: str) -> None:
    cfg = EXAMPLES[name]
    text = cfg.to_json()
    again = NetworkConfig.from_json(text)
    assert again == cfg
    assert again.to_json() == text
    assert json.loads(text) == cfg.to_dict()


def test_wire_values_are_the_references_strings() -> None:
    d = EXAMPLES["everything at once"].to_dict()
    assert d["policy"] == "public-only"
    assert d["on_secret_violation"] == "block-and-terminate"
    assert d["rules"][0] == {"action": "deny", "direction": "any", "destination": "metadata"}
    assert d["rules"][1]["ports"] == ["22", "8000-9000"]
    assert d["ports"] == {"8080": 80, "8443": 443}
    assert d["port_bindings"] == [
        {"bind": "::", "host_port": 9000, "guest_port": 9000, "protocol": "udp"}
    ]
    assert set(d) == {
        "policy",
        "rules",
        "default_egress",
        "default_ingress",
        "deny_domains",
        "deny_domain_suffixes",
        "dns",
        "dns_rebind_protection",
        "tls",
        "ports",
        "port_bindings",
        "ipv4_pool",
        "ipv6_pool",
        "max_connections",
        "on_secret_violation",
        "trust_host_cas",
        "deny_response",
    }


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        ({"polcy": "none"}, "polcy"),
        ({"rules": [{"action": "allow", "dst": "x"}]}, "rules[0].dst"),
        ({"dns": {"servers": []}}, "dns.servers"),
        ({"tls": {"bypass": [], "mitm": True}}, "tls.mitm"),
        (
            {"port_bindings": [{"host_port": 1, "guest_port": 1, "proto": "tcp"}]},
            "port_bindings[0].proto",
        ),
        ({"ports": {"http": 80}}, "ports['http']"),
        ({"rules": "allow everything"}, "rules"),
        ({"dns": []}, "dns"),
    ],
)
def test_unknown_or_malformed_keys_are_errors(doc: dict[str, object], path: str) -> None:
    with pytest.raises(ConfigError) as err:
        NetworkConfig.from_json(json.dumps(doc))
    assert err.value.path == path, str(err.value)


def test_not_json_and_not_an_object() -> None:
    with pytest.raises(ConfigError, match="not valid JSON"):
        NetworkConfig.from_json("{")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        NetworkConfig.from_json("[]")


def test_secret_entry_round_trips() -> None:
    s = SecretEntry(
        env_var="TOKEN",
        from_env="HOST_TOKEN",
        allowed_hosts=["*.example.com"],
        on_violation="block",
        inject_query=True,
        allow_placeholder_for=["api.llm.example", "*.llm.example"],
    )
    assert SecretEntry.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert s.to_dict()["allow_placeholder_for"] == ["api.llm.example", "*.llm.example"]
    plain = SecretEntry(env_var="T", value="v", allowed_hosts=["a.example"])
    assert "allow_placeholder_for" not in plain.to_dict()
    assert SecretEntry.from_dict(plain.to_dict()) == plain


# -- property: any config the strategies build survives the wire ----------------------------
_dest = st.sampled_from(
    [
        "*",
        "public",
        "private",
        "host",
        "metadata",
        "10.0.0.0/8",
        "10.1.2.3",
        "2001:db8::/32",
        "::1",
        "api.example.com",
        ".example.org",
        "bücher.example",
    ]
)
_port = st.one_of(
    st.integers(1, 65535).map(str),
    st.tuples(st.integers(1, 65535), st.integers(0, 1000)).map(
        lambda t: f"{t[0]}-{min(65535, t[0] + t[1])}"
    ),
)
_rule = st.builds(
    PolicyRule,
    action=st.sampled_from(["allow", "deny"]),
    destination=_dest,
    direction=st.sampled_from(["egress", "any"]),
    protocol=st.sampled_from([None, "tcp", "udp", "icmpv4"]),
    protocols=st.lists(st.sampled_from(["tcp", "udp", "icmpv6"]), max_size=2),
    port=st.one_of(st.none(), _port),
    ports=st.lists(_port, max_size=3),
)
_config = st.builds(
    NetworkConfig,
    policy=st.sampled_from([None, "public-only", "allow-all", "non-local"]),
    rules=st.lists(_rule, max_size=5),
    default_egress=st.sampled_from([None, "allow", "deny"]),
    default_ingress=st.sampled_from([None, "allow", "deny"]),
    deny_domains=st.lists(st.sampled_from(["a.example", "b.example"]), max_size=2),
    max_connections=st.one_of(st.none(), st.integers(1, 100000)),
    dns=st.one_of(
        st.none(),
        st.builds(DNSConfig, query_timeout_ms=st.one_of(st.none(), st.integers(1, 60000))),
    ),
    ports=st.dictionaries(st.integers(1, 65535), st.integers(1, 65535), max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(_config)
def test_random_configs_round_trip(cfg: NetworkConfig) -> None:
    assert NetworkConfig.from_json(cfg.to_json()) == cfg


# -- CLI shorthands -------------------------------------------------------------------------
def test_parse_rule_forms() -> None:
    r = parse_rule("allow:egress@api.example.com:tcp:443")
    assert r == PolicyRule(
        action="allow",
        direction="egress",
        destination="api.example.com",
        protocols=["tcp"],
        ports=["443"],
    )
    assert parse_rule("deny@10.0.0.5") == PolicyRule(action="deny", destination="10.0.0.5")
    r = parse_rule("allow:ingress@[2001:db8::/32]:tcp,udp:22,8000-9000")
    assert r.destination == "2001:db8::/32" and r.port_ranges == ((22, 22), (8000, 9000))
    assert parse_rule("allow@host:any:8080").protocol_set == frozenset()


@pytest.mark.parametrize(
    "bad",
    ["allow", "allow@", "permit@*", "allow@[::1", "allow@*:tcp:99999", "allow:ingress@*:icmpv4"],
)
def test_parse_rule_errors_name_the_flag(bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_rule(bad)
    assert err.value.path == "--rule"


def test_parse_publish_forms() -> None:
    assert parse_publish("8080:80") == PortBinding(host_port=8080, guest_port=80)
    assert parse_publish("0.0.0.0:8080:80") == PortBinding(
        bind="0.0.0.0", host_port=8080, guest_port=80
    )
    assert parse_publish("[::1]:5353:53/udp") == PortBinding(
        bind="::1", host_port=5353, guest_port=53, protocol="udp"
    )
    for bad in ("a:b", "1:2:3:4", "8080:80/sctp", "[::1:53:53", "", "[::1]:80"):
        with pytest.raises(ConfigError) as err:
            parse_publish(bad)
        assert err.value.path == "-p"


def test_parse_secret() -> None:
    s = parse_secret("GITHUB_TOKEN@api.github.com,*.githubusercontent.com")
    assert s.from_env == "GITHUB_TOKEN" and s.allowed_hosts == (
        "api.github.com",
        "*.githubusercontent.com",
    )
    with pytest.raises(ConfigError, match="--secret"):
        parse_secret("TOKEN")
