"""An authoritative DNS server for the test world's internet namespace, with fault modes.

    python -m tests.support.dns_server --zones zones.json --log queries.log ADDR [ADDR...]

serves UDP and TCP port 53 (``--port``) on every address, prints ``ready`` once bound, and
appends one JSON line per query it receives to the log, flushed at once (``transport``,
``type``, ``name`` in lower case without the trailing dot, ``id``, the client's ``port``, and
the number of EDNS ``options``), so a test can prove a name never reached it and what a
query carried.

``zones.json``::

    {"zones": ["example.test"],                      # apexes this server is authoritative for
     "records": [["www.example.test", "A", 300, "203.0.113.10"],   # "*.x" answers below x
                 ["alias.example.test", "CNAME", 60, "www.example.test"], ...],
     "faults": {"slow.example.test": "silent", ...}}

Answers follow RFC 1034's algorithm inside the zones: the name's RRset, or its CNAME and then
the target's answer (chased inside the zones, loops stop), NXDOMAIN/NODATA with the zone's SOA
(minimum 30 s); names outside every zone get REFUSED. Over UDP an answer larger than the
client can take (512, or its EDNS size) is sent with TC set and no records.

Fault modes, per queried name:

- ``silent``: never answers;
- ``garbage``: answers 64 random bytes; ``garbage-id``: the query's ID, then random bytes;
- ``wrong-id``: the right answer under another ID;
- ``many:N``: N A records (198.18.0.0 upwards);
- ``chain:N``: a CNAME chain of N links ending in an A record (``<i>.<name>``);
- ``loop``: a CNAME to ``loop2.<name>``, which is a CNAME back;
- ``flip:A,B``: answers A, then B, then A... (one address per answer);
- ``delay:S``: the normal answer after S seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import random
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

ROOT = Path(__file__).resolve().parent.parent.parent

DNS_PORT = 53
SOA_MINIMUM = 30


class Zones:
    """The records and faults of one server."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.apexes = [dns.name.from_text(z) for z in spec.get("zones", [])]
        self.records: dict[tuple[dns.name.Name, int], dns.rrset.RRset] = {}
        for name, rtype, ttl, data in spec.get("records", []):
            rrset = dns.rrset.from_text_list(
                dns.name.from_text(name),
                int(ttl),
                "IN",
                rtype,
                [data],
                origin=dns.name.root,
                relativize=False,
            )
            key = (rrset.name, rrset.rdtype)
            if key in self.records:
                self.records[key].union_update(rrset)
            else:
                self.records[key] = rrset
        self.faults = {dns.name.from_text(n): f for n, f in spec.get("faults", {}).items()}
        self.flips: dict[dns.name.Name, int] = {}

    def apex_of(self, name: dns.name.Name) -> dns.name.Name | None:
        best = None
        for apex in self.apexes:
            if name.is_subdomain(apex) and (best is None or len(apex) > len(best)):
                best = apex
        return best

    def _wildcard(self, name: dns.name.Name, rdtype: int) -> dns.rrset.RRset | None:
        """``*.<parent>`` records answer any name directly below the parent (RFC 4592, the
        simple case), owned by the queried name."""
        if name == dns.name.root or len(name) < 2:
            return None
        found = self.records.get((dns.name.from_text("*", name.parent()), rdtype))
        if found is None:
            return None
        return dns.rrset.from_rdata_list(name, found.ttl, list(found))

    def soa(self, apex: dns.name.Name) -> dns.rrset.RRset:
        return dns.rrset.from_text(
            apex, 300, "IN", "SOA", f"ns.{apex} hostmaster.{apex} 1 7200 900 1209600 {SOA_MINIMUM}"
        )

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        resp = dns.message.make_response(query)
        resp.flags |= dns.flags.AA
        q = query.question[0]
        name, rdtype = q.name, q.rdtype
        fault = self.faults.get(name, "")
        if fault.startswith("many:"):
            count = int(fault.split(":")[1])
            rrset = dns.rrset.RRset(name, dns.rdataclass.IN, dns.rdatatype.A)
            rrset.update_ttl(60)
            for i in range(count):
                rrset.add(dns.rdata.from_text("IN", "A", f"198.18.{i // 256}.{i % 256}"))
            if rdtype == dns.rdatatype.A:
                resp.answer.append(rrset)
            return resp
        if fault.startswith("chain:"):
            links = int(fault.split(":")[1])
            current = name
            for i in range(links):
                target = dns.name.from_text(f"{i}.{name}")
                resp.answer.append(dns.rrset.from_text(current, 60, "IN", "CNAME", str(target)))
                current = target
            if rdtype == dns.rdatatype.A:
                resp.answer.append(dns.rrset.from_text(current, 60, "IN", "A", "203.0.113.10"))
            return resp
        if fault == "loop":
            other = dns.name.from_text(f"loop2.{name}")
            resp.answer.append(dns.rrset.from_text(name, 60, "IN", "CNAME", str(other)))
            resp.answer.append(dns.rrset.from_text(other, 60, "IN", "CNAME", str(name)))
            return resp
        if fault.startswith("flip:"):
            choices = fault.split(":", 1)[1].split(",")
            n = self.flips.get(name, 0)
            self.flips[name] = n + 1
            addr = choices[n % len(choices)]
            rtype = "AAAA" if ":" in addr else "A"
            if dns.rdatatype.from_text(rtype) == rdtype:
                resp.answer.append(dns.rrset.from_text(name, 0, "IN", rtype, addr))
            return resp
        apex = self.apex_of(name)
        if apex is None:
            resp.set_rcode(dns.rcode.REFUSED)
            resp.flags &= ~dns.flags.AA
            return resp
        seen = set()
        current = name
        while True:
            rrset = self.records.get((current, rdtype)) or self._wildcard(current, rdtype)
            if rrset is not None:
                resp.answer.append(rrset)
                return resp
            cname = self.records.get((current, dns.rdatatype.CNAME))
            if cname is None or current in seen or rdtype == dns.rdatatype.CNAME:
                break
            seen.add(current)
            resp.answer.append(cname)
            current = next(iter(cname)).target
            if self.apex_of(current) is None:
                return resp
        exists = any(n == current for n, _ in self.records) or any(
            n == dns.name.from_text("*", current.parent()) for n, _ in self.records
        )
        if not exists:
            resp.set_rcode(dns.rcode.NXDOMAIN)
        soa_apex = self.apex_of(current) or apex
        resp.authority.append(self.soa(soa_apex))
        return resp


class Server:
    def __init__(self, zones: Zones, log_path: Path) -> None:
        self.zones = zones
        self.log = open(log_path, "a", buffering=1)  # noqa: SIM115  (lives as long as the server)
        self.rng = random.Random()

    def handle(self, data: bytes, transport: str, port: int) -> tuple[bytes | None, float]:
        """The reply (None: none) and how long to wait before sending it."""
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return None, 0.0
        if len(query.question) != 1:
            return None, 0.0
        q = query.question[0]
        text = q.name.to_text(omit_final_dot=True).lower()
        entry = {
            "transport": transport,
            "type": dns.rdatatype.to_text(q.rdtype),
            "name": text,
            "id": query.id,
            "port": port,
            "options": len(query.options),
        }
        self.log.write(json.dumps(entry) + "\n")
        fault = self.zones.faults.get(q.name, "")
        if fault == "silent":
            return None, 0.0
        if fault == "garbage":
            return self.rng.randbytes(64), 0.0
        if fault == "garbage-id":
            return data[:2] + self.rng.randbytes(62), 0.0
        resp = self.zones.answer(query)
        if fault == "wrong-id":
            resp.id = (resp.id + 1) % 65536
        delay = float(fault.split(":")[1]) if fault.startswith("delay:") else 0.0
        limit = 65535
        if transport == "udp":
            limit = max(512, query.payload if query.edns >= 0 else 512)
        try:
            return resp.to_wire(max_size=limit), delay
        except dns.exception.TooBig:
            resp.answer.clear()
            resp.authority.clear()
            resp.flags |= dns.flags.TC
            return resp.to_wire(), delay


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        reply, delay = self.server.handle(data, "udp", int(addr[1]))
        if reply is None or self.transport is None:
            return
        loop = asyncio.get_running_loop()
        loop.call_later(delay, self.transport.sendto, reply, addr)


async def _tcp(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    port = int(writer.get_extra_info("peername")[1])
    try:
        while True:
            head = await reader.readexactly(2)
            data = await reader.readexactly(struct.unpack("!H", head)[0])
            reply, delay = server.handle(data, "tcp", port)
            if reply is None:
                continue
            if delay:
                await asyncio.sleep(delay)
            writer.write(struct.pack("!H", len(reply)) + reply)
            await writer.drain()
    except (asyncio.IncompleteReadError, OSError):
        pass
    finally:
        writer.close()


async def _serve(addresses: Sequence[str], port: int, zones: Zones, log_path: Path) -> None:
    server = Server(zones, log_path)
    loop = asyncio.get_running_loop()
    keep: list[Any] = []
    for addr in addresses:
        keep.append(
            await asyncio.start_server(
                lambda r, w: _tcp(server, r, w), addr, port, reuse_address=True
            )
        )
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Udp(server), local_addr=(addr, port)
        )
        keep.append(transport)
    print("ready", flush=True)
    await asyncio.Event().wait()


# -- the test side ------------------------------------------------------------------------------


class RunningDnsServer:
    """A started server: its query log and its process."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path, stop: Callable[[], None]) -> None:
        self.proc = proc
        self.log = log
        self._stop = stop

    def queries(self, name: str | None = None) -> list[dict[str, Any]]:
        """Every query received so far (of ``name`` only, when given)."""
        if not self.log.exists():
            return []
        out = []
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if name is None or entry["name"] == name:
                    out.append(entry)
        return out

    def names(self) -> set[str]:
        return {q["name"] for q in self.queries()}

    def stop(self) -> None:
        self._stop()


def start_dns_server(
    spawn: Callable[..., subprocess.Popen[bytes]],
    addresses: Sequence[str],
    zones: dict[str, Any],
    workdir: Path,
    *,
    stop: Callable[[subprocess.Popen[bytes]], None],
    port: int = DNS_PORT,
) -> RunningDnsServer:
    """Start the server with ``spawn`` (``world.spawn_inet``); ``stop`` (``world.stop_process``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    zone_file = workdir / "zones.json"
    zone_file.write_text(json.dumps(zones))
    log = workdir / "queries.log"
    log.write_text("")
    proc = spawn(
        [sys.executable, "-m", "tests.support.dns_server", "--zones", str(zone_file),
         "--log", str(log), "--port", str(port), *addresses],
        stdout=subprocess.PIPE,
        cwd=str(ROOT),
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if b"ready" not in line:
        stop(proc)
        raise RuntimeError(f"the test DNS server on {addresses} did not start")
    return RunningDnsServer(proc, log, lambda: stop(proc))


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.support.dns_server")
    parser.add_argument("--zones", required=True, type=Path)
    parser.add_argument("--log", required=True, type=Path)
    parser.add_argument("--port", type=int, default=DNS_PORT)
    parser.add_argument("addresses", nargs="+")
    args = parser.parse_args(argv)
    for a in args.addresses:
        ipaddress.ip_address(a)
    zones = Zones(json.loads(args.zones.read_text()))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.addresses, args.port, zones, args.log))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main(sys.argv[1:])
