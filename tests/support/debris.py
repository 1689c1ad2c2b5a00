"""The leak check: after the whole test run, nothing corral or the test world made is left.

A pytest plugin (``tests/conftest.py`` imports its hooks; a subprocess run can load it with
``-p tests.support.debris``). It runs in ``pytest_sessionfinish``, after every test and
every fixture's teardown (the world included), whatever order the tests ran in. Debris is
printed and makes the run's exit status non-zero; the tests themselves keep their outcome
(a finished test cannot be turned into a failure afterwards).

What counts: a corral netns (``/run/netns/corral-*``), a corral veth (``cr-*``) or nftables
table in the root namespace or in the test world's host namespace (looked at just before
the world is torn down, :func:`check_namespace_before_it_goes`), a corral cgroup, a mount of
a sandbox, a corral supervisor process, a sandbox directory (or trash) left in a CORRAL_HOME
the tests registered with :func:`watch_home`, and this run's test world namespaces.

Kernel object names are global, and on a shared development machine other people's test
runs make the same kinds of objects at the same time. So, outside CI, the check excuses:
what existed when the session started (a snapshot), and what demonstrably belongs to another
live run: a netns whose veth peer is in another live process's test world or whose processes
do not descend from this one, a cgroup whose
processes or spare's maker descend from another process, a supervisor whose log is not under
this run's temporary directory. What appeared during the run gets :data:`SETTLE_SECONDS` to
go away. Excused objects are counted in the report, never silently dropped. Under
``CI=true`` nothing is excused: CI has one run on a fresh machine.

It runs when the session ran an integration test (or ``CORRAL_DEBRIS_CHECK=1``), as root
with ``ip`` and ``nft`` present: a unit-only run creates none of these objects.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corral.kernel import mountinfo, procfs
from tests.support.world import PREFIX as WORLD_PREFIX

#: Seconds what appeared during the run gets to disappear before it counts as debris. The
#: old in-suite check gave cgroups 10 s (fork servers of CLI runs that just exited discard
#: their spare's cgroup asynchronously); the same bound for everything.
SETTLE_SECONDS = float(os.environ.get("CORRAL_DEBRIS_SETTLE", "10"))

#: Set to 1 to check even when no integration test ran (the check's own test does).
FORCE_ENV = "CORRAL_DEBRIS_CHECK"

_HOMES: list[Path] = []
_IN_OUR_NAMESPACES: list[str] = []
_BASELINE_KEY = pytest.StashKey[frozenset[str]]()
_TEMP_KEY = pytest.StashKey[Path]()
_REPORT_KEY = pytest.StashKey[str]()

_LINK_NETNS = re.compile(rf"link-netns {WORLD_PREFIX}(\d+)h\b")
_SPARE = re.compile(r"corral-spare-(\d+)-\d+$")


def watch_home(home: Path) -> None:
    """Have the final check require ``home``'s sandboxes directory to be empty."""
    _HOMES.append(home)


def in_ci() -> bool:
    """``CI=true`` (GitHub Actions, GitLab, Buildkite and most others set it; 1/yes too)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _lines(argv: list[str]) -> list[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return []


# -- what is there ------------------------------------------------------------------------------


def _links_and_tables() -> set[str]:
    """corral's veths and nftables tables in the calling thread's network namespace."""
    found = set()
    for line in _lines(["ip", "-o", "link", "show"]):
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if name.startswith("cr-"):
            found.add(f"link {name}")
    found |= {f"nft {t}" for t in _lines(["nft", "list", "tables"]) if "corral" in t}
    return found


def check_namespace_before_it_goes(label: str) -> None:
    """Record corral links and tables in the calling thread's netns, one of this run's own
    (the test world's host) that is about to be deleted and would take them along unseen."""
    _IN_OUR_NAMESPACES.extend(f"{thing} (in {label})" for thing in sorted(_links_and_tables()))


def _supervisors() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"corral.lifecycle.supervisor" in f.read():
                    pids.append(int(entry))
    return pids


def _kernel_objects() -> set[str]:
    """Every corral object on the machine and this run's world namespaces, one string each."""
    found: set[str] = set()
    names = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    # Test worlds are named after the pytest process that built them (tests/support/world.py).
    mine = f"{WORLD_PREFIX}{os.getpid()}"
    found |= {f"netns {n}" for n in names if n.startswith(("corral-", mine))}
    found |= _links_and_tables()
    cgroups = _lines(["find", "/sys/fs/cgroup", "-maxdepth", "8", "-type", "d", "-name", "corral-*"])
    found |= {f"cgroup {c}" for c in cgroups}
    found |= {
        f"mount {p}" for p in mountinfo.mount_points() if "corral" in p or "/sandboxes/" in p
    }
    found |= {f"supervisor process {pid}" for pid in _supervisors()}
    return found


def _home_leftovers() -> list[str]:
    out = []
    for home in _HOMES:
        sandboxes = home / "sandboxes"
        if not sandboxes.is_dir():
            continue
        out += [f"sandbox {p}" for p in sandboxes.iterdir() if not p.name.startswith(".")]
        trash = sandboxes / ".trash"
        if trash.is_dir():
            out += [f"trash {p}" for p in trash.iterdir()]
    return out


# -- whose is it --------------------------------------------------------------------------------


def _descends_from_us(pid: int) -> bool:
    me = os.getpid()
    for _ in range(64):  # ancestry depth bound (init is reached in a handful)
        if pid == me:
            return True
        if pid <= 1:
            return False
        try:
            stat = procfs.read_stat(pid)
        except (OSError, ValueError):
            return False
        if stat is None:
            return False
        pid = stat.ppid
    return False


def _processes_in(netns_file: str) -> list[int]:
    """Pids of the processes whose network namespace is the one at ``netns_file``."""
    try:
        want = os.stat(netns_file).st_ino
    except OSError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}/ns/net").st_ino == want:
                    pids.append(int(entry))
    return pids


def _another_runs(thing: str, temp: Path | None) -> bool:
    """Whether ``thing`` demonstrably belongs to another live process's test run."""
    kind, _, rest = thing.partition(" ")
    if kind == "mount" and rest.startswith("/run/netns/"):
        kind, rest = "netns", rest.removeprefix("/run/netns/")
    if kind == "netns":
        for line in _lines(["ip", "-n", rest, "-o", "link", "show"]):
            match = _LINK_NETNS.search(line)
            if match and int(match[1]) != os.getpid() and Path(f"/proc/{match[1]}").exists():
                return True  # its veth peer is in another live run's test world
        inside = _processes_in(f"/run/netns/{rest}")
        return bool(inside) and not any(_descends_from_us(pid) for pid in inside)
    if kind == "cgroup":
        spare = _SPARE.search(rest)
        if spare:
            maker = int(spare[1])
            return Path(f"/proc/{maker}").exists() and not _descends_from_us(maker)
        try:
            procs = [int(p) for p in Path(rest, "cgroup.procs").read_text().split()]
        except OSError:
            return False
        return bool(procs) and not any(_descends_from_us(p) for p in procs)
    if kind == "supervisor":
        pid = int(rest.split()[1])
        if _descends_from_us(pid):
            return False
        try:
            log = os.readlink(f"/proc/{pid}/fd/2")  # <state dir>/supervisor.log
        except OSError:
            return False
        mine = [str(p) for p in (*_HOMES, *([temp] if temp else []))]
        return not any(log.startswith(p + "/") for p in mine)
    if kind == "mount":
        return temp is not None and not rest.startswith(str(temp))
    return False


# -- the hooks ----------------------------------------------------------------------------------


def _can_check() -> bool:
    return os.geteuid() == 0 and all(shutil.which(t) for t in ("ip", "nft"))


def _wanted(session: pytest.Session) -> bool:
    if os.environ.get(FORCE_ENV) == "1":
        return True
    return any("integration" in Path(str(item.path)).parts for item in session.items)


def pytest_sessionstart(session: pytest.Session) -> None:
    if not _can_check():
        return
    session.stash[_BASELINE_KEY] = frozenset(() if in_ci() else _kernel_objects())
    factory = getattr(session.config, "_tmp_path_factory", None)  # the tmpdir plugin's
    if factory is not None:
        session.stash[_TEMP_KEY] = factory.getbasetemp().resolve()


def _summary(label: str, things: list[str]) -> str:
    kinds: dict[str, int] = {}
    for thing in things:
        kind = thing.split()[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    return f"{label}: " + ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())) + "\n"


@pytest.hookimpl(trylast=True)  # after the runner's own, which tears the session fixtures down
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    baseline = session.stash.get(_BASELINE_KEY, None)
    if baseline is None or not _wanted(session):
        return
    temp = session.stash.get(_TEMP_KEY, None)
    if "corral.lifecycle.gc" in sys.modules:  # removals of this process delete in a thread
        sys.modules["corral.lifecycle.gc"].wait_for_deletions(timeout=30)
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        now = _kernel_objects()
        others = [] if in_ci() else sorted(t for t in now - baseline if _another_runs(t, temp))
        left = sorted(now - baseline - set(others)) + _home_leftovers() + _IN_OUR_NAMESPACES
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    report = ""
    before = sorted(baseline & now)
    if before:
        report += _summary("not counted, there before this run started", before)
    if others:
        report += _summary("not counted, another live test run's", others)
    if left:
        report += (f"FAILED: the test run left {len(left)} object(s) behind:\n"
                   + "".join(f"  {x}\n" for x in left))
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    else:
        report += "the test run left nothing behind\n"
    session.config.stash[_REPORT_KEY] = report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    report = terminalreporter.config.stash.get(_REPORT_KEY, None)
    if report:
        terminalreporter.section("debris check")
        terminalreporter.write(report)
