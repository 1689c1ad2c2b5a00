"""The rule parser's fast paths give the answers of the slow ones.

A 10,000-rule policy is parsed at every create, so `parse_destination` skips the address
parse for text that cannot be an address, `coerce_enum` looks the wire spelling up before it
normalises, and the rule loop pauses the garbage collector. Each shortcut is checked here
against what the full path answers.
"""

from __future__ import annotations

import gc
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.config import NetworkConfig, PolicyProtocol, PolicyRule
from corral.config.enums import coerce_enum
from corral.config.values import DestinationKind, parse_destination, unmap
from corral.errors import ConfigError


def _as_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return unmap(ipaddress.ip_address(text.strip().strip("[]")))
    except ValueError:
        return None


_address_text = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
    st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}"),
    st.text(alphabet="0123456789abcdefABCDEF.:[]x-٣ ", min_size=1, max_size=24),
)


@given(_address_text)
def test_a_destination_is_an_address_exactly_when_it_parses_as_one(text: str) -> None:
    expected = _as_address(text)
    try:
        got = parse_destination(text, "destination")
    except ConfigError:
        assert expected is None  # not an address, and not a valid name either
        return
    if expected is None:
        assert got.kind is not DestinationKind.IP
    else:
        assert got.kind is DestinationKind.IP
        assert got.value == str(expected)


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("10.0.0.1", DestinationKind.IP),
        ("[10.0.0.1]", DestinationKind.IP),
        ("::1", DestinationKind.IP),
        ("example.com", DestinationKind.DOMAIN),
        ("host-9", DestinationKind.DOMAIN),
        ("10.0.0.1.example", DestinationKind.DOMAIN),
    ],
)
def test_destination_kinds_at_the_shortcut_edges(text: str, kind: DestinationKind) -> None:
    assert parse_destination(text, "destination").kind is kind


@given(st.sampled_from([m.value for m in PolicyProtocol]), st.sampled_from(["", " ", "\t"]))
def test_enum_wire_spelling_and_its_variants_agree(value: str, pad: str) -> None:
    exact = coerce_enum(PolicyProtocol, value, "protocol")
    assert exact is PolicyProtocol(value)
    assert coerce_enum(PolicyProtocol, pad + value.upper() + pad, "protocol") is exact


def test_rule_parse_leaves_the_collector_as_it_found_it() -> None:
    assert gc.isenabled()
    NetworkConfig(rules=[PolicyRule(action="allow", destination="*")])
    assert gc.isenabled()
    with pytest.raises(ConfigError) as err:
        NetworkConfig(rules=[{"action": "allow"}, {"action": "allow", "destination": "a..b"}])
    assert err.value.path.startswith("rules[1]")
    assert gc.isenabled()
    gc.disable()
    try:
        NetworkConfig(rules=[{"action": "allow", "destination": "*"}])
        assert not gc.isenabled()  # a caller's own pause is not ended for it
    finally:
        gc.enable()


def test_list_and_tuple_fields_are_stored_as_tuples() -> None:
    r = PolicyRule(action="allow", protocols=["tcp"], ports=("443",))
    assert r.protocols == (PolicyProtocol.TCP,)
    assert r.ports == ("443",)
    with pytest.raises(ConfigError) as err:
        PolicyRule(action="allow", ports="443")
    assert err.value.path == "ports"
