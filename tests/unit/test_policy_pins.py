"""PinSet: names pinned to addresses by DNS answers, with TTLs (corral.policy.pins)."""

from __future__ import annotations

import ipaddress
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.policy import pins as pins_mod
from corral.policy.pins import MAX_PIN_SECONDS, MIN_PIN_SECONDS, PinSet

A = ipaddress.ip_address("203.0.113.1")
B = ipaddress.ip_address("203.0.113.2")
C = ipaddress.ip_address("2001:db8::1")
MAPPED_A = ipaddress.ip_address("::ffff:203.0.113.1")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make() -> tuple[PinSet, Clock]:
    clock = Clock()
    return PinSet(clock=clock), clock


def test_every_address_is_pinned_to_every_name_of_the_chain() -> None:
    p, _ = make()
    grown = p.add(["www.Example.COM.", "cdn.example.net"], [A, C], 60)
    assert [a for a, _ in grown] == [A, C]
    assert all(s == 60 for _, s in grown)
    assert p.names_for(A) == {"www.example.com", "cdn.example.net"}
    assert p.names_for(C) == {"www.example.com", "cdn.example.net"}
    assert p.is_pinned(A) and not p.is_pinned(B)
    assert p.names_for(B) == frozenset()


def test_ipv4_mapped_is_its_ipv4_address() -> None:
    p, _ = make()
    p.add(["a.example"], [MAPPED_A], 60)
    assert p.names_for(A) == {"a.example"}
    assert p.is_pinned(MAPPED_A)
    assert p.add(["a.example"], [A], 30) == []  # the same pin, not extended
    assert len(p) == 1


def test_expiry_after_ttl_and_minimum() -> None:
    p, clock = make()
    p.add(["a.example"], [A], 0)  # TTL 0: pinned MIN_PIN_SECONDS anyway
    clock.now += MIN_PIN_SECONDS - 0.01
    assert p.names_for(A) == {"a.example"}
    clock.now += 0.02
    assert p.names_for(A) == frozenset()
    assert not p.is_pinned(A)
    p.add(["b.example"], [B], 100)
    clock.now += 99.9
    assert p.is_pinned(B)
    clock.now += 0.2
    assert not p.is_pinned(B)
    p.expire()
    assert len(p) == 0


def test_ttl_is_capped() -> None:
    p, _ = make()
    ((_, seconds),) = p.add(["a.example"], [A], 2**31 - 1)
    assert seconds == MAX_PIN_SECONDS


def test_never_shortened_and_growth_is_reported() -> None:
    p, clock = make()
    assert p.add(["a.example"], [A], 300) == [(A, 300.0)]
    assert p.add(["a.example"], [A], 10) == []  # a shorter answer does not shorten the pin
    clock.now += 250
    assert p.names_for(A) == {"a.example"}
    assert p.add(["a.example"], [A], 100) == [(A, 100.0)]  # now + 100 > the old expiry
    clock.now += 99
    assert p.is_pinned(A)


def test_names_expire_separately_on_one_address() -> None:
    p, clock = make()
    p.add(["short.example"], [A], 10)
    p.add(["long.example"], [A], 100)
    assert p.names_for(A) == {"short.example", "long.example"}
    clock.now += 11
    assert p.names_for(A) == {"long.example"}
    assert p.is_pinned(A)


def test_rotating_answers_keep_earlier_addresses_until_their_own_expiry() -> None:
    p, clock = make()
    p.add(["cdn.example"], [A], 30)
    clock.now += 10
    p.add(["cdn.example"], [B], 30)
    assert p.names_for(A) == {"cdn.example"} and p.names_for(B) == {"cdn.example"}
    clock.now += 21
    assert p.names_for(A) == frozenset()
    assert p.names_for(B) == {"cdn.example"}


def test_no_names_or_no_addresses_pin_nothing() -> None:
    p, _ = make()
    assert p.add([], [A], 60) == []
    assert p.add(["a.example"], [], 60) == []
    assert len(p) == 0


def test_bound_evicts_the_oldest_expiring(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pins_mod, "MAX_PINS", 4)
    p, _ = make()
    base = int(ipaddress.ip_address("198.18.0.0"))
    for i in range(4):
        p.add(["n.example"], [ipaddress.ip_address(base + i)], 100 + i)
    grown = p.add(["n.example"], [ipaddress.ip_address(base + 9)], 500)
    assert grown == [(ipaddress.ip_address(base + 9), 500.0)]
    assert len(p) == 4
    assert p.evicted == 1
    assert not p.is_pinned(ipaddress.ip_address(base))  # expires first: evicted
    assert p.is_pinned(ipaddress.ip_address(base + 1))


def test_names_per_address_are_bounded() -> None:
    p, _ = make()
    for i in range(pins_mod.MAX_NAMES_PER_ADDRESS + 10):
        p.add([f"n{i}.wild.example"], [A], 100 + i)
    names = p.names_for(A)
    assert len(names) == pins_mod.MAX_NAMES_PER_ADDRESS
    assert "n0.wild.example" not in names  # the earliest-expiring went first
    assert f"n{pins_mod.MAX_NAMES_PER_ADDRESS + 9}.wild.example" in names


def test_entries_and_heap_compaction_stay_bounded() -> None:
    p, clock = make()
    for i in range(5000):
        clock.now += 0.001
        p.add(["a.example"], [A, B], 10 + i * 0.01)  # each add extends both
    assert len(p._heap) <= 2 * len(p) + 64 + 2
    assert {str(a) for a, _ in p.entries()} == {str(A), str(B)}


# -- property: PinSet agrees with a naive model -------------------------------------------------

_ADDRS = [ipaddress.ip_address(f"203.0.113.{i}") for i in range(6)] + [
    ipaddress.ip_address(f"2001:db8::{i}") for i in range(3)
]
_NAMES = ["a.example", "b.example", "c.example", "d.example"]

_op = st.one_of(
    st.tuples(
        st.just("add"),
        st.lists(st.sampled_from(_NAMES), max_size=3),
        st.lists(st.sampled_from(_ADDRS), max_size=4),
        st.floats(min_value=-5, max_value=200, allow_nan=False),
    ),
    st.tuples(st.just("tick"), st.floats(min_value=0, max_value=60, allow_nan=False)),
    st.tuples(st.just("ask"), st.sampled_from(_ADDRS)),
    st.tuples(st.just("expire")),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=60))
def test_matches_a_naive_model(ops: list[tuple[object, ...]]) -> None:
    p, clock = make()
    model: dict[tuple[str, object], float] = {}  # (name, address) -> expiry
    for op in ops:
        if op[0] == "add":
            _, names, addrs, ttl = op
            assert isinstance(ttl, float) and isinstance(names, list) and isinstance(addrs, list)
            until = clock.now + min(max(ttl, MIN_PIN_SECONDS), MAX_PIN_SECONDS)
            before = {
                a: max((t for (n, b), t in model.items() if b == a), default=None) for a in addrs
            }
            grown = dict(p.add(names, addrs, ttl))
            for a in addrs:
                if names:
                    for n in names:
                        model[(n, a)] = max(model.get((n, a), 0.0), until)
                old = before[a]
                expect_grow = bool(names) and (old is None or old <= clock.now or old < until)
                assert (a in grown) == expect_grow, (a, old, until)
        elif op[0] == "tick":
            assert isinstance(op[1], float)
            clock.now += op[1]
        elif op[0] == "expire":
            p.expire()
        else:
            a = op[1]
            live = {n for (n, b), t in model.items() if b == a and t > clock.now}
            assert p.names_for(a) == live  # type: ignore[arg-type]
            assert p.is_pinned(a) == bool(live)  # type: ignore[arg-type]


def test_lookup_is_cheap_at_the_bound() -> None:
    """Not a timing assertion: the number of heap entries and the size of what a lookup
    returns stay bounded when the set is full."""
    p, clock = make()
    rnd = random.Random(7)
    base = int(ipaddress.ip_address("198.18.0.0"))
    for i in range(pins_mod.MAX_PINS + 500):
        p.add([f"n{i}.example"], [ipaddress.ip_address(base + i)], rnd.uniform(5, 500))
    assert len(p) == pins_mod.MAX_PINS
    assert p.evicted == 500
    assert len(p._heap) <= 2 * len(p) + 64
