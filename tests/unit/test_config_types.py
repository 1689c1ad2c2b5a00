"""The config model: every reference type, field, constant and default exists and validates."""

from __future__ import annotations

import ipaddress

import pytest

from corral.config import (
    DEFAULT_IPV4_POOL,
    DEFAULT_IPV6_POOL,
    ConfigError,
    DestinationKind,
    DNSConfig,
    Group,
    NetworkConfig,
    NetworkPolicy,
    NetworkPolicyPreset,
    PolicyAction,
    PolicyDirection,
    PolicyProtocol,
    PolicyRule,
    PortBinding,
    PortProtocol,
    SecretEntry,
    TLSConfig,
    ViolationAction,
    validate_secrets,
)


# -- enums: the reference's constants and their wire values --------------------------------
@pytest.mark.parametrize(
    ("enum", "values"),
    [
        (PolicyAction, {"ALLOW": "allow", "DENY": "deny"}),
        (PolicyDirection, {"EGRESS": "egress", "INGRESS": "ingress", "ANY": "any"}),
        (PolicyProtocol, {"TCP": "tcp", "UDP": "udp", "ICMPV4": "icmpv4", "ICMPV6": "icmpv6"}),
        (PortProtocol, {"TCP": "tcp", "UDP": "udp"}),
        (
            NetworkPolicyPreset,
            {
                "NONE": "none",
                "PUBLIC_ONLY": "public-only",
                "ALLOW_ALL": "allow-all",
                "NON_LOCAL": "non-local",
            },
        ),
        (
            ViolationAction,
            {
                "BLOCK": "block",
                "BLOCK_AND_LOG": "block-and-log",
                "BLOCK_AND_TERMINATE": "block-and-terminate",
            },
        ),
    ],
)
def test_enum_members_and_wire_values(enum: type, values: dict[str, str]) -> None:
    assert {m.name: m.value for m in enum} == values  # type: ignore[attr-defined]


def test_groups_are_the_references_destination_groups() -> None:
    assert {g.value for g in Group} == {
        "public",
        "private",
        "loopback",
        "link-local",
        "metadata",
        "multicast",
        "host",
    }


# -- presets -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("factory", "preset"),
    [
        (NetworkPolicy.public_only, NetworkPolicyPreset.PUBLIC_ONLY),
        (NetworkPolicy.none, NetworkPolicyPreset.NONE),
        (NetworkPolicy.allow_all, NetworkPolicyPreset.ALLOW_ALL),
        (NetworkPolicy.non_local, NetworkPolicyPreset.NON_LOCAL),
    ],
)
def test_preset_factories(factory: object, preset: NetworkPolicyPreset) -> None:
    cfg = factory()  # type: ignore[operator]
    assert cfg.policy is preset
    assert cfg.rules == ()
    assert cfg.is_offline == (preset is NetworkPolicyPreset.NONE)


# -- NetworkConfig fields and defaults -----------------------------------------------------
def test_network_config_defaults() -> None:
    c = NetworkConfig()
    assert c.policy is None and c.rules == ()
    assert c.default_egress is None and c.default_ingress is None
    assert c.deny_domains == () and c.deny_domain_suffixes == ()
    assert c.dns is None and c.dns_rebind_protection is None and c.tls is None
    assert c.ports == {} and c.port_bindings == ()
    assert c.ipv4_pool == DEFAULT_IPV4_POOL == "172.16.0.0/12"
    assert c.ipv6_pool == DEFAULT_IPV6_POOL == "fd42:6d73:62::/48"
    assert c.max_connections is None and c.effective_max_connections == 256
    assert c.on_secret_violation is None
    assert c.effective_on_secret_violation is ViolationAction.BLOCK_AND_LOG
    assert c.trust_host_cas is None
    assert c.deny_response is None
    assert c.effective_rebind_protection is True


def test_deny_response_formats() -> None:
    assert NetworkConfig(deny_response="JSON").deny_response == "json"
    assert NetworkConfig(deny_response="text").deny_response == "text"
    assert NetworkConfig(deny_response="").deny_response is None
    for bad in ("html", True, 1):
        with pytest.raises(ConfigError) as err:
            NetworkConfig(deny_response=bad)  # type: ignore[arg-type]
        assert err.value.path == "deny_response"


def test_enum_fields_accept_wire_strings() -> None:
    c = NetworkConfig(
        policy="public-only",
        default_egress="ALLOW",
        default_ingress="deny",
        on_secret_violation="block-and-terminate",
    )
    assert c.policy is NetworkPolicyPreset.PUBLIC_ONLY
    assert c.default_egress is PolicyAction.ALLOW
    assert c.default_ingress is PolicyAction.DENY
    assert c.on_secret_violation is ViolationAction.BLOCK_AND_TERMINATE


@pytest.mark.parametrize(
    ("kwargs", "path"),
    [
        ({"policy": "closed"}, "policy"),
        ({"default_egress": "maybe"}, "default_egress"),
        ({"default_ingress": 1}, "default_ingress"),
        ({"on_secret_violation": "log"}, "on_secret_violation"),
        ({"deny_domains": ["bad..name"]}, "deny_domains[0]"),
        ({"deny_domains": "example.com"}, "deny_domains"),
        ({"deny_domain_suffixes": ["ok", "-bad-"]}, "deny_domain_suffixes[1]"),
        ({"dns_rebind_protection": "yes"}, "dns_rebind_protection"),
        ({"ipv4_pool": "10.0.0.0/31"}, "ipv4_pool"),
        ({"ipv4_pool": "fd00::/48"}, "ipv4_pool"),
        ({"ipv4_pool": "10.0.0.1/8"}, "ipv4_pool"),
        ({"ipv6_pool": "fd42::/96"}, "ipv6_pool"),
        ({"ipv6_pool": "nonsense"}, "ipv6_pool"),
        ({"max_connections": 0}, "max_connections"),
        ({"max_connections": True}, "max_connections"),
        ({"trust_host_cas": "no"}, "trust_host_cas"),
        ({"ports": {70000: 80}}, "ports[70000]"),
        ({"ports": {8080: 0}}, "ports[8080]"),
        ({"rules": [{"action": "allow", "ports": ["1", "70000"]}]}, "rules[0].ports[1]"),
        ({"rules": [{"action": "allow"}, {"destination": "*"}]}, "rules[1].action"),
        ({"rules": [{"action": "allow", "colour": "red"}]}, "rules[0].colour"),
        ({"dns": {"nameservers": ["1.1.1.1:99999"]}}, "dns.nameservers[0]"),
        ({"tls": {"ca_cert": "/x.pem"}}, "tls.ca_key"),
        (
            {"port_bindings": [{"host_port": 1, "guest_port": 2, "bind": "localhost"}]},
            "port_bindings[0].bind",
        ),
    ],
)
def test_invalid_values_name_the_field(kwargs: dict[str, object], path: str) -> None:
    with pytest.raises(ConfigError) as err:
        NetworkConfig(**kwargs)  # type: ignore[arg-type]
    assert err.value.path == path, str(err.value)
    assert str(err.value).startswith(path + ": ")


def test_pools_accept_larger_and_exact_sizes() -> None:
    c = NetworkConfig(ipv4_pool="10.200.0.0/30", ipv6_pool="fd00:1::/64")
    assert c.ipv4_pool == "10.200.0.0/30" and c.ipv6_pool == "fd00:1::/64"


def test_rebind_protection_nested_value_wins_over_legacy() -> None:
    assert NetworkConfig(dns_rebind_protection=False).effective_rebind_protection is False
    c = NetworkConfig(dns_rebind_protection=False, dns=DNSConfig(rebind_protection=True))
    assert c.effective_rebind_protection is True
    c = NetworkConfig(dns_rebind_protection=True, dns=DNSConfig(rebind_protection=False))
    assert c.effective_rebind_protection is False
    assert NetworkConfig(dns=DNSConfig()).effective_rebind_protection is True


def test_suffixes_normalise_to_leading_dot() -> None:
    c = NetworkConfig(deny_domain_suffixes=["ads", ".Tracker.Example."])
    assert c.deny_domain_suffixes == (".ads", ".tracker.example")


# -- PolicyRule -----------------------------------------------------------------------------
def test_rule_defaults_and_merges() -> None:
    r = PolicyRule(
        action="allow",
        destination="API.Example.COM.",
        protocol="tcp",
        protocols=["udp"],
        port="443",
        ports=["8000-9000", 443],
    )
    assert r.direction is PolicyDirection.EGRESS
    assert r.destination == "api.example.com"
    assert r.target.kind is DestinationKind.DOMAIN
    assert r.protocol_set == {PolicyProtocol.TCP, PolicyProtocol.UDP}
    assert r.port_ranges == ((443, 443), (8000, 9000))
    assert hash(r) == hash(PolicyRule(**{**r.to_dict()}))


def test_rule_empty_protocol_and_port_mean_any() -> None:
    r = PolicyRule(action="deny", destination="*", protocol="", port="")
    assert r.protocol is None and r.port is None
    assert r.protocol_set == frozenset() and r.port_ranges == ()


@pytest.mark.parametrize(
    ("destination", "kind", "normal"),
    [
        ("*", DestinationKind.ANY, "*"),
        ("public", DestinationKind.GROUP, "public"),
        ("Link-Local", DestinationKind.GROUP, "link-local"),
        ("host", DestinationKind.GROUP, "host"),
        ("10.0.0.0/8", DestinationKind.CIDR, "10.0.0.0/8"),
        ("2001:db8::/32", DestinationKind.CIDR, "2001:db8::/32"),
        ("::ffff:10.0.0.0/104", DestinationKind.CIDR, "10.0.0.0/8"),
        ("10.0.0.5", DestinationKind.IP, "10.0.0.5"),
        ("::ffff:10.0.0.5", DestinationKind.IP, "10.0.0.5"),
        ("[2001:db8::1]", DestinationKind.IP, "2001:db8::1"),
        ("api.example.com", DestinationKind.DOMAIN, "api.example.com"),
        ("bücher.example", DestinationKind.DOMAIN, "xn--bcher-kva.example"),
        ("localhost", DestinationKind.DOMAIN, "localhost"),
        (".internal", DestinationKind.SUFFIX, ".internal"),
        (".Example.COM", DestinationKind.SUFFIX, ".example.com"),
    ],
)
def test_destination_forms(destination: str, kind: DestinationKind, normal: str) -> None:
    r = PolicyRule(action="allow", destination=destination)
    assert r.target.kind is kind
    assert r.destination == normal
    if kind in (DestinationKind.CIDR, DestinationKind.IP):
        assert r.target.network == ipaddress.ip_network(normal)


@pytest.mark.parametrize(
    "destination",
    [
        "",
        "   ",
        "10.0.0.5/8",
        "300.1.1.1/8",
        "*.example.com",
        "exa mple.com",
        "a..b",
        "-x.com",
        "1.2.3",
        "x" * 64 + ".com",
        ("a." * 127) + "com",
        "ex*mple.com",
    ],
)
def test_bad_destinations(destination: str) -> None:
    with pytest.raises(ConfigError) as err:
        PolicyRule(action="allow", destination=destination)
    assert err.value.path == "destination"


@pytest.mark.parametrize(
    ("kwargs", "path"),
    [
        ({"action": "permit"}, "action"),
        ({"action": "allow", "direction": "sideways"}, "direction"),
        ({"action": "allow", "protocol": "sctp"}, "protocol"),
        ({"action": "allow", "protocols": ["tcp", "gre"]}, "protocols[1]"),
        ({"action": "allow", "protocols": "tcp"}, "protocols"),
        ({"action": "allow", "port": "0"}, "port"),
        ({"action": "allow", "port": "9000-8000"}, "port"),
        ({"action": "allow", "port": "80-"}, "port"),
        ({"action": "allow", "port": "http"}, "port"),
        ({"action": "allow", "ports": ["1-65536"]}, "ports[0]"),
        (
            {"action": "allow", "direction": "ingress", "protocols": ["tcp", "icmpv6"]},
            "protocols[1]",
        ),
        ({"action": "allow", "direction": "ingress", "protocol": "icmpv4"}, "protocol"),
    ],
)
def test_bad_rules(kwargs: dict[str, object], path: str) -> None:
    with pytest.raises(ConfigError) as err:
        PolicyRule(**kwargs)  # type: ignore[arg-type]
    assert err.value.path == path, str(err.value)


def test_icmp_allowed_on_egress_and_any() -> None:
    PolicyRule(action="allow", protocols=["icmpv4", "icmpv6"])
    PolicyRule(action="deny", direction="any", protocol="icmpv4")


def test_port_range_edges() -> None:
    assert PolicyRule(action="allow", port="1-65535").port_ranges == ((1, 65535),)
    assert PolicyRule(action="allow", port="7-7").port == "7"


# -- DNSConfig ------------------------------------------------------------------------------
def test_dns_config_fields() -> None:
    d = DNSConfig(
        rebind_protection=False,
        nameservers=["1.1.1.1:53", "[2606:4700::1111]:53", "9.9.9.9", "2606:4700::1001"],
        query_timeout_ms=1500,
    )
    assert d.effective_query_timeout_ms == 1500
    assert [str(a) + f"#{p}" for a, p in d.upstreams()] == [
        "1.1.1.1#53",
        "2606:4700::1111#53",
        "9.9.9.9#53",
        "2606:4700::1001#53",
    ]
    assert DNSConfig().effective_query_timeout_ms == 5000


@pytest.mark.parametrize(
    ("kwargs", "path"),
    [
        ({"nameservers": ["dns.google:53"]}, "nameservers[0]"),
        ({"nameservers": ["[::1]53"]}, "nameservers[0]"),
        ({"nameservers": ["1.1.1.1:0"]}, "nameservers[0]"),
        ({"query_timeout_ms": 0}, "query_timeout_ms"),
        ({"query_timeout_ms": 600_000}, "query_timeout_ms"),
        ({"rebind_protection": 1}, "rebind_protection"),
    ],
)
def test_bad_dns_config(kwargs: dict[str, object], path: str) -> None:
    with pytest.raises(ConfigError) as err:
        DNSConfig(**kwargs)  # type: ignore[arg-type]
    assert err.value.path == path


# -- TLSConfig ------------------------------------------------------------------------------
def test_tls_config_fields_and_defaults() -> None:
    t = TLSConfig()
    assert t.effective_intercepted_ports == (443,)
    assert t.effective_verify_upstream is True
    assert t.block_quic is None and t.ca_cert is None and t.ca_key is None
    t = TLSConfig(
        bypass=["*.GoogleAPIs.com", "pinned.example"],
        verify_upstream=False,
        intercepted_ports=[443, 8443],
        block_quic=True,
        ca_cert="/ca.pem",
        ca_key="/ca.key",
        upstream_ca_certs=["/extra.pem"],
    )
    assert t.bypass == ("*.googleapis.com", "pinned.example")
    assert t.effective_verify_upstream is False
    assert t.effective_intercepted_ports == (443, 8443)


@pytest.mark.parametrize(
    ("kwargs", "path"),
    [
        ({"bypass": ["foo.*.com"]}, "bypass[0]"),
        ({"intercepted_ports": [443, 443]}, "intercepted_ports[1]"),
        ({"intercepted_ports": [0]}, "intercepted_ports[0]"),
        ({"ca_key": "/k.pem"}, "ca_cert"),
        ({"ca_cert": "", "ca_key": "/k"}, "ca_cert"),
        ({"upstream_ca_certs": [""]}, "upstream_ca_certs[0]"),
        ({"block_quic": "true"}, "block_quic"),
    ],
)
def test_bad_tls_config(kwargs: dict[str, object], path: str) -> None:
    with pytest.raises(ConfigError) as err:
        TLSConfig(**kwargs)  # type: ignore[arg-type]
    assert err.value.path == path


# -- PortBinding and published ports ----------------------------------------------------------
def test_port_binding_defaults() -> None:
    b = PortBinding(host_port=8001, guest_port=8001)
    assert b.bind == "127.0.0.1" and b.protocol is PortProtocol.TCP
    assert PortBinding(bind="", host_port=1, guest_port=2, protocol="").protocol is PortProtocol.TCP
    assert PortBinding(bind="::", host_port=1, guest_port=2).bind == "::"


def test_duplicate_host_ports_rejected() -> None:
    with pytest.raises(
        ConfigError,
        match=r"port_bindings\[0\]: tcp port 127.0.0.1:8080 is already published by ports\[8080\]",
    ):
        NetworkConfig(ports={8080: 80}, port_bindings=[PortBinding(host_port=8080, guest_port=81)])
    with pytest.raises(ConfigError, match=r"port_bindings\[1\]"):
        NetworkConfig(
            port_bindings=[
                PortBinding(bind="0.0.0.0", host_port=9000, guest_port=1),
                PortBinding(bind="127.0.0.1", host_port=9000, guest_port=2),
            ]
        )
    # same port on other protocols or other specific addresses is fine
    NetworkConfig(
        ports={53: 53},
        port_bindings=[
            PortBinding(host_port=53, guest_port=53, protocol="udp"),
            PortBinding(bind="127.0.0.2", host_port=53, guest_port=53),
        ],
    )


def test_ports_under_policy_none_rejected() -> None:
    with pytest.raises(ConfigError, match="policy 'none' has no network interface"):
        NetworkConfig(policy="none", ports={8080: 80})


def test_merged_ports_like_with_ports() -> None:
    c = NetworkConfig(ports={8080: 80})
    m = c.merged_ports(
        ports={8080: 8080, 9090: 90},
        ports_udp={5353: 53},
        port_bindings=[PortBinding(bind="0.0.0.0", host_port=8001, guest_port=8001)],
    )
    assert m.ports == {8080: 8080, 9090: 90}
    assert {(b.bind, b.host_port, b.guest_port, str(b.protocol)) for b in m.all_port_bindings} == {
        ("127.0.0.1", 8080, 8080, "tcp"),
        ("127.0.0.1", 9090, 90, "tcp"),
        ("127.0.0.1", 5353, 53, "udp"),
        ("0.0.0.0", 8001, 8001, "tcp"),
    }
    again = m.merged_ports(ports_udp={5353: 5353}).port_bindings
    assert [b.guest_port for b in again if b.protocol is PortProtocol.UDP] == [5353]


# -- SecretEntry ------------------------------------------------------------------------------
def test_secret_entry_defaults() -> None:
    s = SecretEntry(env_var="GITHUB_TOKEN", value="ghp_realvalue", allowed_hosts=["api.github.com"])
    assert s.placeholder == "$CORRAL_SECRET_GITHUB_TOKEN"
    assert s.on_violation is None
    assert (s.inject_headers, s.inject_basic_auth, s.inject_query, s.inject_body) == (
        True,
        True,
        False,
        False,
    )
    assert "ghp_realvalue" not in repr(s)
    assert s.allow_placeholder_for == ()


def test_secret_allow_placeholder_for_is_normalised() -> None:
    s = SecretEntry(
        env_var="T",
        value="v",
        allowed_hosts=["a.com"],
        allow_placeholder_for=["API.OpenAI.com.", "*.Anthropic.com"],
    )
    assert s.allow_placeholder_for == ("api.openai.com", "*.anthropic.com")


@pytest.mark.parametrize(
    ("kwargs", "path"),
    [
        ({"env_var": "1BAD", "value": "v", "allowed_hosts": ["a.com"]}, "env_var"),
        ({"env_var": "T", "allowed_hosts": ["a.com"]}, "value"),
        ({"env_var": "T", "value": "v", "from_env": "T", "allowed_hosts": ["a.com"]}, "value"),
        ({"env_var": "T", "value": "v"}, "allowed_hosts"),
        ({"env_var": "T", "value": "v", "allowed_hosts": ["*"]}, "allowed_hosts[0]"),
        (
            {"env_var": "T", "value": "v", "allowed_hosts": ["a.com"], "placeholder": "x"},
            "placeholder",
        ),
        (
            {
                "env_var": "T",
                "value": "secret-value",
                "allowed_hosts": ["a.com"],
                "placeholder": "secret-value-x",
            },
            "placeholder",
        ),
        (
            {"env_var": "T", "value": "v", "allowed_hosts": ["a.com"], "on_violation": "ignore"},
            "on_violation",
        ),
        (
            {"env_var": "T", "value": "v", "allowed_hosts": ["a.com"], "inject_body": "yes"},
            "inject_body",
        ),
        (
            {
                "env_var": "T",
                "value": "v",
                "allowed_hosts": ["a.com"],
                "allow_placeholder_for": ["ok.com", "bad host"],
            },
            "allow_placeholder_for[1]",
        ),
        (
            {
                "env_var": "T",
                "value": "v",
                "allowed_hosts": ["a.com"],
                "allow_placeholder_for": "llm.com",
            },
            "allow_placeholder_for",
        ),
    ],
)
def test_bad_secrets(kwargs: dict[str, object], path: str) -> None:
    with pytest.raises(ConfigError) as err:
        SecretEntry(**kwargs)  # type: ignore[arg-type]
    assert err.value.path == path


def test_colliding_secrets() -> None:
    a = SecretEntry(env_var="A", value="1", placeholder="PLACEHOLDER_A", allowed_hosts=["x.com"])
    b = SecretEntry(
        env_var="B", value="2", placeholder="PLACEHOLDER_A_LONGER", allowed_hosts=["x.com"]
    )
    with pytest.raises(ConfigError, match=r"secrets\[1\].placeholder"):
        validate_secrets([a, b])
    with pytest.raises(ConfigError, match=r"secrets\[1\].env_var"):
        validate_secrets([a, {"env_var": "A", "from_env": "HOME", "allowed_hosts": ["y.com"]}])
    assert (
        len(validate_secrets([a, {"env_var": "C", "value": "3", "allowed_hosts": ["*.y.com"]}]))
        == 2
    )
