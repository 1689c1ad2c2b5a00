"""Everything one running sandbox holds on the host, and what of it is still there later.

``Footprint.of(name)`` is taken while the sandbox runs: its directory, supervisor and init
(pid + start time, so a reused pid is not mistaken for them), cgroup directories, and, for a
networked one, its netns, host-side veth, nftables table (seen from the calling thread's
network namespace: run it where the sandbox was created) and address lease. ``remaining()``
lists what still exists; tests wait (with a deadline) for it to be empty and assert on the
count, so "nothing left" is checked thing by thing, not guessed from a directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from corral.kernel import procfs
from corral.net import plumbing
from corral.runtime import paths, state
from tests.support.waiting import POLL_INTERVAL

#: Seconds a sandbox gets to disappear after what should remove it (a stop's grace is 5 s,
#: a loaded 2-core machine has taken 10+ s to tear one down).
GONE_TIMEOUT = 60.0


def _start_time(pid: int | None) -> int | None:
    return procfs.live_start_time(pid) if pid else None


@dataclass
class Footprint:
    name: str
    directory: Path
    supervisor: tuple[int, int] | None
    init: tuple[int, int] | None
    cgroups: list[str] = field(default_factory=list)
    networked: bool = False
    ports: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, name: str) -> Footprint:
        directory = state.sandbox_dir(name)
        st = state.read_state(name)
        init_start = _start_time(st.init_pid)
        record = directory / "cgroup.json"
        cgroups = json.loads(record.read_text())["paths"] if record.exists() else []
        ports = [int(p["host_port"]) for p in st.network.get("port_bindings") or []]
        ports += [int(h) for h in (st.network.get("ports") or {})]
        return cls(
            name=name,
            directory=directory,
            supervisor=state.read_supervisor_pid(directory),
            init=(st.init_pid, init_start) if st.init_pid and init_start else None,
            cgroups=list(cgroups),
            networked=not st.offline,
            ports=ports,
        )

    def things(self) -> list[str]:
        """What this sandbox had when the footprint was taken (for the count)."""
        out = [f"directory {self.directory}"]
        out += [f"supervisor {self.supervisor[0]}"] if self.supervisor else []
        out += [f"init {self.init[0]}"] if self.init else []
        out += [f"cgroup {c}" for c in self.cgroups]
        if self.networked:
            names = plumbing.names_for(self.name)
            out += [f"netns {names.netns}", f"link {names.link}", f"nft table {names.table}",
                    "address lease"]  # fmt: skip
        return out

    def remaining(self) -> list[str]:
        """What of :meth:`things` still exists now."""
        left = []
        if self.directory.exists():
            left.append(f"directory {self.directory}")
        trash = self.directory.parent / ".trash"
        if trash.is_dir():
            left += [f"trash {e}" for e in trash.iterdir() if e.name.startswith(self.name + ".")]
        for label, recorded in (("supervisor", self.supervisor), ("init", self.init)):
            if recorded is not None and _start_time(recorded[0]) == recorded[1]:
                left.append(f"{label} {recorded[0]}")
        left += [f"cgroup {c}" for c in self.cgroups if os.path.exists(c)]
        if self.networked:
            names = plumbing.names_for(self.name)
            if os.path.exists(names.netns_path):
                left.append(f"netns {names.netns}")
            if _run(["ip", "-o", "link", "show", "dev", names.link]):
                left.append(f"link {names.link}")
            if _run(["nft", "list", "table", "inet", names.table]):
                left.append(f"nft table {names.table}")
            leases = paths.corral_home() / "net" / "leases.json"
            if leases.exists() and self.name in json.loads(leases.read_text() or "{}"):
                left.append("address lease")
        return left

    def wait_gone(self, timeout: float = GONE_TIMEOUT) -> None:
        """Wait until nothing of the sandbox is left; AssertionError listing what is."""
        deadline = time.monotonic() + timeout
        while (left := self.remaining()) and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
        assert left == [], f"sandbox {self.name} left {len(left)} things after {timeout:g} s: {left}"


def _run(argv: list[str]) -> bool:
    return subprocess.run(argv, capture_output=True, check=False).returncode == 0
