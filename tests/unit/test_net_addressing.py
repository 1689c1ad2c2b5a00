"""Address slots: the pure choice (lowest free, aligned, skipping leases and host routes) and
the on-disk lease registry shared by supervisor processes."""

from __future__ import annotations

import fcntl
import ipaddress
import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.errors import NetworkError
from corral.net.addressing import AddressPool, Slot, choose_slot, next_lease_number

V4 = ipaddress.IPv4Network
V6 = ipaddress.IPv6Network
POOL = V4("172.16.0.0/12")


def test_lowest_slot_first() -> None:
    assert choose_slot(POOL, 30, [], []) == V4("172.16.0.0/30")


def test_taken_and_routes_are_skipped() -> None:
    taken = [V4("172.16.0.0/30")]
    routes = [V4("172.16.0.4/31"), V4("172.16.0.8/32")]
    assert choose_slot(POOL, 30, taken, routes) == V4("172.16.0.12/30")


def test_a_route_covering_the_start_of_the_pool_is_jumped_over() -> None:
    assert choose_slot(POOL, 30, [], [V4("172.16.0.0/16")]) == V4("172.17.0.0/30")


def test_default_routes_are_ignored_and_other_families_too() -> None:
    routes = [V4("0.0.0.0/0"), V6("::/0"), V6("fd42::/16")]
    assert choose_slot(POOL, 30, [], routes) == V4("172.16.0.0/30")


def test_a_route_containing_the_whole_pool_leaves_nothing() -> None:
    assert choose_slot(V4("10.0.0.0/24"), 30, [], [V4("10.0.0.0/8")]) is None


def test_full_pool() -> None:
    pool = V4("10.9.0.0/29")
    assert choose_slot(pool, 30, [V4("10.9.0.0/30"), V4("10.9.0.4/30")], []) is None


def test_ipv6_slots() -> None:
    pool = V6("fd42:6d73:62::/48")
    assert choose_slot(pool, 64, [V6("fd42:6d73:62::/64")], []) == V6("fd42:6d73:62:1::/64")


@settings(max_examples=300, deadline=None)
@given(
    blockers=st.lists(st.tuples(st.integers(0, 255), st.integers(24, 32)), max_size=12),
)
def test_choice_is_free_aligned_and_lowest(blockers: list[tuple[int, int]]) -> None:
    pool = V4("10.1.2.0/24")
    nets = [V4((int(pool.network_address) + off, plen), strict=False) for off, plen in blockers]
    got = choose_slot(pool, 30, nets, [])
    candidates = list(pool.subnets(new_prefix=30))
    free = [c for c in candidates if not any(c.overlaps(n) for n in nets)]
    assert got == (free[0] if free else None)


def test_lease_numbers_fill_gaps() -> None:
    assert next_lease_number([]) == 1
    assert next_lease_number([1, 2, 4]) == 3


def test_slot_addresses() -> None:
    s = Slot(V4("172.16.0.4/30"), V6("fd42:6d73:62:1::/64"), 1)
    assert str(s.gateway_ipv4) == "172.16.0.5" and str(s.guest_ipv4) == "172.16.0.6"
    assert str(s.gateway_ipv6) == "fd42:6d73:62:1::1" and str(s.guest_ipv6) == "fd42:6d73:62:1::2"
    assert Slot.from_json(s.to_json()) == s


def test_pool_leases_persist_and_are_released(tmp_path: Path) -> None:
    pool = AddressPool(tmp_path)
    a = pool.lease("a", POOL, V6("fd42:6d73:62::/48"), routes=[])
    b = pool.lease("b", POOL, V6("fd42:6d73:62::/48"), routes=[])
    assert a.ipv4 != b.ipv4 and a.ipv6 != b.ipv6 and a.number != b.number
    assert AddressPool(tmp_path).get("a") == a  # another process sees the same lease
    assert pool.lease("a", POOL, None, routes=[]) == a  # idempotent
    pool.release("a")
    c = pool.lease("c", POOL, None, routes=[])
    assert c.ipv4 == a.ipv4 and c.number == a.number and c.ipv6 is None


def test_full_pool_is_one_clear_sentence(tmp_path: Path) -> None:
    pool = AddressPool(tmp_path)
    small = V4("10.9.0.0/30")
    pool.lease("a", small, None, routes=[])
    with pytest.raises(NetworkError, match=r"^ipv4_pool 10.9.0.0/30 has no free /30 left"):
        pool.lease("b", small, None, routes=[])


def _lease_many(args: tuple[str, int]) -> list[str]:
    directory, worker = args
    pool = AddressPool(Path(directory))
    return [str(pool.lease(f"w{worker}-{i}", POOL, None, routes=[]).ipv4) for i in range(10)]


def test_concurrent_processes_never_share_a_slot(tmp_path: Path) -> None:
    with multiprocessing.get_context("fork").Pool(4) as workers:
        results = workers.map(_lease_many, [(str(tmp_path), w) for w in range(4)])
    slots = [s for r in results for s in r]
    assert len(slots) == 40 and len(set(slots)) == 40


def test_a_write_interrupted_between_unlink_and_rename_is_finished_by_the_next(
    tmp_path: Path,
) -> None:
    pool = AddressPool(tmp_path)
    slot = pool.lease("a", POOL, None, routes=[])
    # What a writer that died after unlinking leases.json and before its rename leaves:
    pool.leases_path.rename(pool.leases_path.with_suffix(".tmp"))
    assert AddressPool(tmp_path).get("a") == slot
    assert pool.leases_path.exists() and not pool.leases_path.with_suffix(".tmp").exists()


def test_a_write_interrupted_while_writing_the_new_file_committed_nothing(
    tmp_path: Path,
) -> None:
    pool = AddressPool(tmp_path)
    tmp_path.joinpath("leases.tmp").write_text('{"a": {"ipv4": "172.16')
    assert pool.all() == {}
    assert pool.lease("b", POOL, None, routes=[]).ipv4 == V4("172.16.0.0/30")


def test_the_lock_free_view_waits_for_a_writer_between_unlink_and_rename(
    tmp_path: Path,
) -> None:
    pool = AddressPool(tmp_path)
    pool.lease("a", POOL, None, routes=[])
    reader = AddressPool(tmp_path)
    assert reader.leased_networks() == [V4("172.16.0.0/30")]
    fd = os.open(pool.lock_path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a writer, in the middle of _write
    text = pool.leases_path.read_text().replace("172.16.0.0/30", "172.16.0.4/30")
    pool.leases_path.unlink()
    seen: list[object] = []
    thread = threading.Thread(target=lambda: seen.append(reader.leased_networks()))
    thread.start()
    time.sleep(0.05)  # the reader is blocked on the lock now (or will be)
    pool.leases_path.write_text(text)
    os.close(fd)
    thread.join(10)
    assert seen == [[V4("172.16.0.4/30")]]
