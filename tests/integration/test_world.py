"""The test world itself: built, reachable, hermetic, and gone afterwards."""

from __future__ import annotations

import socket

from tests.support import world as world_mod
from tests.support.waiting import wait_for


def test_host_reaches_internet_servers(world: world_mod.World) -> None:
    srv = world.spawn_inet(["python3", "-c", _ECHO_SERVER])
    try:
        with world.in_host():

            def connected() -> socket.socket | None:
                try:  # refused until the server listens
                    return socket.create_connection((world_mod.SERVER_V4, 7007), timeout=2)
                except ConnectionRefusedError:
                    return None

            s = wait_for(connected, timeout=10, what="the echo server to listen")
            with s:
                s.sendall(b"ping")
                assert s.recv(4) == b"ping"
    finally:
        world.stop_process(srv)


def test_host_has_no_route_but_the_internet_namespace(world: world_mod.World) -> None:
    routes = world.run_host(["ip", "route"]).stdout
    assert "default via 198.51.100.1" in routes
    res = world.run_host(["ip", "route", "get", "192.0.2.1"])
    assert "uplink" in res.stdout  # only way out is the world's own link
    inet_routes = world.run_inet(["ip", "route"]).stdout
    assert "default" not in inet_routes


def test_world_teardown_leaves_nothing() -> None:
    w = world_mod.build(tag="tdown")
    assert world_mod.debris("tdown")
    world_mod.destroy(w)
    assert world_mod.debris("tdown") == []


_ECHO_SERVER = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7007)); s.listen()
while True:
    c, _ = s.accept(); c.sendall(c.recv(4)); c.close()
"""
