"""cgroup limits for a sandbox on cgroup v1, v2, and the v1/v2 hybrid.

The layout is detected from the cgroup filesystem and ``/proc/self/cgroup`` (both passed in,
so the unit tests run the v2 path against a plain directory tree):

* **v2** (``<root>/cgroup.controllers`` exists): one directory ``<root>/corral/<name>``
  with ``memory.max``, ``memory.swap.max``, ``cpu.max``, ``pids.max``; ``cgroup.kill`` ends
  it. It sits under a ``corral`` directory at the top of the hierarchy (like the cgroupfs
  drivers of runc and podman) because v2 forbids enabling controllers for children of a
  cgroup that holds processes, which our own cgroup does.
* **v1** (``<root>/<controller>`` directories): ``memory``, ``cpu`` and ``pids`` each get
  ``<root>/<controller>/<our own cgroup there>/<name>``. They are created below the cgroup
  this process is in because the machine may confine us there (PLATFORM.md).
* **hybrid**: v1 for the limits plus a cgroup in the v2 tree (``<root>/unified``), whose
  ``cgroup.kill`` ends every process at once even though it has no controllers.

The directories are recorded (``record``) before they are created, so that
``cleanup(recorded)`` can remove what a dead supervisor left behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from corral.errors import SandboxError
from corral.kernel import procfs
from corral.runtime import cgroupfs

#: Where the cgroup filesystems are mounted on every mainstream distribution.
CGROUP_ROOT = Path("/sys/fs/cgroup")

#: The CFS period for ``cpus``: the kernel default (100 ms); quota = cpus * period.
CPU_PERIOD_US = 100_000

#: Below this a memory limit cannot even hold the init's own dirty pages plus a shell; a
#: smaller value is a user mistake we report rather than a sandbox that OOMs at start.
MIN_MEMORY = 4 * 1024 * 1024

#: How long ``remove`` retries rmdir while the kernel finishes tearing down exited tasks.
REMOVE_TIMEOUT = 5.0

#: v1 controllers corral sets limits with.
V1_CONTROLLERS = ("memory", "cpu", "pids")


@dataclass(frozen=True)
class CgroupLimits:
    cpus: float | None = None
    memory: int | None = None
    pids_max: int | None = None


@dataclass(frozen=True)
class Cgroup:
    """The directories of one sandbox's cgroup, one per hierarchy it lives in."""

    layout: str  # "v1" | "v2" | "hybrid"
    paths: tuple[Path, ...]
    #: The v2 directory (pure v2 or the hybrid's unified tree), for cgroup.kill; or None.
    unified: Path | None = None
    v1: dict[str, Path] = field(default_factory=dict)

    def procs_files(self) -> list[Path]:
        return [p / "cgroup.procs" for p in self.paths]

    def add(self, pid: int, gone_ok: bool = False) -> None:
        """Move ``pid`` into every hierarchy (``0`` means the calling process).

        ``gone_ok``: a process that exits meanwhile is not an error (an early, speculative
        move of a short-lived process).
        """
        for procs in self.procs_files():
            try:
                procs.write_text(str(pid))
            except ProcessLookupError:
                if gone_ok:
                    return
                raise SandboxError(f"join cgroup: process {pid} is gone") from None
            except OSError as e:
                raise SandboxError(
                    f"join cgroup: write {pid} to {str(procs)!r}: {e.strerror}"
                ) from None

    def pids(self) -> set[int]:
        found: set[int] = set()
        for procs in self.procs_files():
            with contextlib.suppress(OSError):
                found.update(int(x) for x in procs.read_text().split())
        return found

    def kill(self) -> None:
        """SIGKILL every process in the cgroup (cgroup.kill where the kernel has it)."""
        if self.unified is not None and (self.unified / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                (self.unified / "cgroup.kill").write_text("1")
        for _ in range(100):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)

    def remove(self, timeout: float = REMOVE_TIMEOUT) -> None:
        """rmdir every directory; retries while exited tasks are still being torn down."""
        deadline = time.monotonic() + timeout
        for path in self.paths:
            while True:
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise SandboxError(f"remove cgroup {str(path)!r}: {e.strerror}") from None
                    time.sleep(0.005)

    def oom_kills(self) -> int:
        """Processes the OOM killer has killed in this cgroup so far (0 if unknown).

        Lets the supervisor tell "exit 137 because the memory limit was hit" from any other
        SIGKILL: compare the count before and after a command.
        """
        if self.layout == "v2":
            path, key = self.paths[0] / "memory.events", "oom_kill"
        elif "memory" in self.v1:
            path, key = self.v1["memory"] / "memory.oom_control", "oom_kill"
        else:
            return 0
        try:
            for line in path.read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def exists(self) -> bool:
        return any(p.exists() for p in self.paths)

    def to_json(self) -> str:
        return json.dumps(
            {
                "layout": self.layout,
                "paths": [str(p) for p in self.paths],
                "unified": str(self.unified) if self.unified else None,
                "v1": {k: str(v) for k, v in self.v1.items()},
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Cgroup:
        obj = json.loads(text)
        return cls(
            layout=obj["layout"],
            paths=tuple(Path(p) for p in obj["paths"]),
            unified=Path(obj["unified"]) if obj.get("unified") else None,
            v1={k: Path(v) for k, v in obj.get("v1", {}).items()},
        )


def _write(path: Path, value: str, step: str) -> None:
    try:
        path.write_text(value)
    except OSError as e:
        raise SandboxError(f"{step}: write {value!r} to {str(path)!r}: {e.strerror}") from None


def own_cgroups(proc_self_cgroup: str) -> dict[str, str]:
    """Controller (or "" for v2) -> our path, from the text of /proc/self/cgroup."""
    own: dict[str, str] = {}
    for line in proc_self_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            own[""] = path
        for c in controllers.split(","):
            if c:
                own[c] = path
    return own


def detect_layout(root: Path) -> str:
    if (root / "cgroup.controllers").exists():
        return "v2"
    if (root / "unified" / "cgroup.procs").exists():
        return "hybrid"
    return "v1"


def plan(name: str, root: Path = CGROUP_ROOT, proc_self_cgroup: str | None = None) -> Cgroup:
    """Where the cgroup named ``name`` goes; touches nothing, except that at the default
    root a hierarchy missing from this mount namespace is mounted first (cgroupfs.ensure)."""
    if root == CGROUP_ROOT:
        cgroupfs.ensure(str(root))
    if proc_self_cgroup is None:
        proc_self_cgroup = Path("/proc/self/cgroup").read_text()
    own = own_cgroups(proc_self_cgroup)
    layout = detect_layout(root)
    if layout == "v2":
        path = root / "corral" / name
        return Cgroup(layout, (path,), unified=path)
    v1: dict[str, Path] = {}
    for controller in V1_CONTROLLERS:
        base = root / controller
        if not base.is_dir():
            raise SandboxError(
                f"create cgroup: the cgroup v1 controller {controller!r} is not mounted at "
                f"{str(base)!r}"
            )
        v1[controller] = base / own.get(controller, "/").lstrip("/") / name
    unified = None
    if layout == "hybrid":
        unified = root / "unified" / own.get("", "/").lstrip("/") / name
    paths = tuple(v1.values()) + ((unified,) if unified else ())
    return Cgroup(layout, paths, unified=unified, v1=v1)


def create(cgroup: Cgroup, limits: CgroupLimits) -> None:
    """Make the directories of ``cgroup`` and write ``limits``; undone on failure."""
    _check_limits(limits)
    made: list[Path] = []
    try:
        if cgroup.layout == "v2":
            _create_v2(cgroup.paths[0], limits, made)
        else:
            for path in cgroup.paths:
                _mkdir(path, made)
            _limit_v1(cgroup, limits)
    except BaseException:
        for path in reversed(made):
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


def _mkdir(path: Path, made: list[Path]) -> None:
    try:
        path.mkdir()
    except FileExistsError:
        raise SandboxError(
            f"create cgroup {str(path)!r}: it already exists (a sandbox with this state "
            "directory is running, or `corral gc` has not cleaned up after a crash)"
        ) from None
    except OSError as e:
        raise SandboxError(f"create cgroup {str(path)!r}: {e.strerror}") from None
    made.append(path)


def _create_v2(path: Path, limits: CgroupLimits, made: list[Path]) -> None:
    parent = path.parent
    if not parent.exists():
        _mkdir(parent, [])  # shared by all sandboxes; never removed by one of them
    wanted = ["memory", "cpu", "pids"]
    for level in (parent.parent, parent):
        available = (level / "cgroup.controllers").read_text().split()
        enabled = (level / "cgroup.subtree_control").read_text().split()
        missing = [c for c in wanted if c in available and c not in enabled]
        if missing:
            _write(
                level / "cgroup.subtree_control",
                " ".join(f"+{c}" for c in missing),
                "enable cgroup controllers",
            )
    _mkdir(path, made)
    _limit_v2(path, limits)


def _limit_v2(path: Path, limits: CgroupLimits) -> None:
    if limits.memory is not None:
        _write(path / "memory.max", str(limits.memory), "set memory limit")
        if (path / "memory.swap.max").exists():
            _write(path / "memory.swap.max", "0", "set swap limit")
    if limits.cpus is not None:
        quota = max(1000, int(limits.cpus * CPU_PERIOD_US))
        _write(path / "cpu.max", f"{quota} {CPU_PERIOD_US}", "set cpu limit")
    if limits.pids_max is not None:
        _write(path / "pids.max", str(limits.pids_max), "set pids limit")


def _limit_v1(cgroup: Cgroup, limits: CgroupLimits) -> None:
    if limits.memory is not None:
        mem = cgroup.v1["memory"]
        _write(mem / "memory.limit_in_bytes", str(limits.memory), "set memory limit")
        # memsw is memory+swap: equal to the memory limit means no swap, so the OOM killer
        # acts instead of the sandbox swapping the host to a crawl.
        if (mem / "memory.memsw.limit_in_bytes").exists():
            _write(mem / "memory.memsw.limit_in_bytes", str(limits.memory), "set swap limit")
    if limits.cpus is not None:
        cpu = cgroup.v1["cpu"]
        quota = max(1000, int(limits.cpus * CPU_PERIOD_US))
        _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US), "set cpu period")
        _write(cpu / "cpu.cfs_quota_us", str(quota), "set cpu limit")
    if limits.pids_max is not None:
        _write(cgroup.v1["pids"] / "pids.max", str(limits.pids_max), "set pids limit")


def _check_limits(limits: CgroupLimits) -> None:
    if limits.memory is not None and limits.memory < MIN_MEMORY:
        raise SandboxError(
            f"memory limit {limits.memory} bytes is below the minimum of {MIN_MEMORY}"
        )
    if limits.cpus is not None and limits.cpus <= 0:
        raise SandboxError(f"cpus must be positive, not {limits.cpus}")


# -- cgroups made ahead of time -------------------------------------------------------------
#
# Moving a process into a v1 cgroup waits for an RCU grace period (6-15 ms here), the
# largest single cost of a start. A spare supervisor therefore makes a cgroup *before* any
# request, under a spare name, and parks a process in it (corral.runtime.launcher.Zygote);
# the launch then renames the v1 directories to the sandbox's names (v1 allows a rename
# within the parent, even with processes inside) and writes the limits. v2 directories
# cannot be renamed (EPERM): they keep the spare name, which is recorded like any other.

#: Name prefix of a cgroup made ahead of time: ``corral-spare-<pid>-<start time>`` names
#: the process that made it, so gc can tell an abandoned one (its maker is dead).
SPARE_PREFIX = "corral-spare-"


def spare_name(pid: int, start_time: int) -> str:
    return f"{SPARE_PREFIX}{pid}-{start_time}"


def parse_spare_name(name: str) -> tuple[int, int] | None:
    """(pid, start time) of the process that made spare cgroup ``name``; None if not one."""
    if not name.startswith(SPARE_PREFIX):
        return None
    pid, sep, start = name[len(SPARE_PREFIX) :].partition("-")
    if not (sep and pid.isascii() and pid.isdigit() and start.isascii() and start.isdigit()):
        return None
    return int(pid), int(start)


def adopted(spare: Cgroup, final: Cgroup) -> Cgroup:
    """The cgroup a sandbox ends up in when it takes over ``spare`` (planned as ``final``):
    v1 directories under their final names, the v2 one (which cannot be renamed) as is."""
    if spare.layout != final.layout:
        raise SandboxError(
            f"adopt cgroup: the spare is a {spare.layout} cgroup, the sandbox needs {final.layout}"
        )
    if final.layout == "v2":
        return spare
    paths = tuple(final.v1.values()) + ((spare.unified,) if spare.unified else ())
    return Cgroup(final.layout, paths, unified=spare.unified, v1=dict(final.v1))


def adopt(spare: Cgroup, target: Cgroup, limits: CgroupLimits) -> None:
    """Rename ``spare``'s v1 directories to ``target``'s (see :func:`adopted`), then write
    ``limits``. The limits come after the processes are in, which v1 and v2 both allow."""
    _check_limits(limits)
    for controller, path in spare.v1.items():
        new = target.v1[controller]
        if new == path:
            continue
        try:
            path.rename(new)
        except OSError as e:
            raise SandboxError(
                f"adopt cgroup: rename {str(path)!r} to {str(new)!r}: {e.strerror}"
            ) from None
    if target.layout == "v2":
        _limit_v2(target.paths[0], limits)
    else:
        _limit_v1(target, limits)


#: How deep below each hierarchy's root (``memory/process_api/<id>/``) gc looks for abandoned spare cgroups. Cgroups are
#: made below the creating process's own cgroup (``/process_api/<id>/`` here), which differs
#: between processes, so a spare abandoned by one process is not below another's.
SPARE_SEARCH_DEPTH = 4


def spare_parents(
    root: Path = CGROUP_ROOT,
    proc_self_cgroup: str | None = None,
    everywhere: bool = False,
    prefix: str = SPARE_PREFIX,
) -> list[Path]:
    """Where to look for abandoned spare cgroups: the directories :func:`plan` puts cgroups
    in for this process and, ``everywhere`` (gc), every directory down to SPARE_SEARCH_DEPTH
    that holds one. The full search costs milliseconds with many sandboxes: only gc does it,
    not every spare as it starts."""
    probe = plan("probe", root, proc_self_cgroup)
    parents = [p.parent for p in probe.paths]
    if not everywhere:
        return parents
    for parent in _dirs_holding(root, SPARE_SEARCH_DEPTH + 1, prefix):
        if parent not in parents:
            parents.append(parent)
    return parents


def _dirs_holding(top: Path, depth: int, prefix: str) -> list[Path]:
    found: list[Path] = []
    try:
        entries = [e for e in os.scandir(top) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return found
    if any(e.name.startswith(prefix) for e in entries):
        found.append(top)
    if depth > 1:
        for e in entries:
            if not e.name.startswith("corral-"):
                found.extend(_dirs_holding(Path(e.path), depth - 1, prefix))
    return found


def abandoned_spares(
    root: Path = CGROUP_ROOT,
    proc_self_cgroup: str | None = None,
    alive: Callable[[int, int], bool] | None = None,
    everywhere: bool = False,
) -> list[Path]:
    """Spare cgroup directories whose maker is dead (``alive(pid, start)`` is False)."""
    if alive is None:
        alive = _process_alive
    found = []
    for parent in spare_parents(root, proc_self_cgroup, everywhere):
        try:
            entries = sorted(parent.iterdir())
        except OSError:
            continue
        for entry in entries:
            owner = parse_spare_name(entry.name)
            if owner is not None and entry.is_dir() and not alive(*owner):
                found.append(entry)
    return found


#: An empty sandbox cgroup younger than this is left alone by gc: a launch without a zygote
#: makes its cgroup empty and moves its first process in a few milliseconds later.
ORPHAN_MIN_AGE = 60.0


def is_sandbox_cgroup_name(name: str) -> bool:
    """Whether ``name`` has the form :func:`cgroup_name` gives (``corral-<name>-<12 hex>``)."""
    if not name.startswith("corral-") or name.startswith(SPARE_PREFIX):
        return False
    sandbox, sep, digest = name[len("corral-") :].rpartition("-")
    hexdigits = "0123456789abcdef"
    return bool(sandbox and sep) and len(digest) == 12 and all(c in hexdigits for c in digest)


def orphaned_sandbox_cgroups(
    root: Path = CGROUP_ROOT,
    proc_self_cgroup: str | None = None,
    min_age: float = ORPHAN_MIN_AGE,
    now: float | None = None,
) -> list[Path]:
    """Empty sandbox cgroup directories (no process, no child cgroup) older than ``min_age``,
    below any process's cgroup: a sandbox's cgroup holds its init while it runs and goes with
    its stop, so an empty one is what a supervisor left that died before it could remove it,
    also one whose CORRAL_HOME no longer exists (gc finds no state directory to start from
    then). Removing an empty cgroup loses nothing."""
    now = time.time() if now is None else now
    found: list[Path] = []
    for parent in spare_parents(root, proc_self_cgroup, everywhere=True, prefix="corral-"):
        try:
            entries = sorted(
                (e for e in os.scandir(parent) if e.is_dir(follow_symlinks=False)),
                key=lambda e: e.name,
            )
        except OSError:
            continue
        for entry in entries:
            if not is_sandbox_cgroup_name(entry.name):
                continue
            path = Path(entry.path)
            try:
                if now - path.stat().st_mtime < min_age:
                    continue
                if (path / "cgroup.procs").read_text().strip():
                    continue
                if any(e.is_dir(follow_symlinks=False) for e in os.scandir(path)):
                    continue
            except OSError:
                continue
            found.append(path)
    return found


def cleanup_orphans(root: Path = CGROUP_ROOT, min_age: float = ORPHAN_MIN_AGE) -> list[Path]:
    """Remove every :func:`orphaned_sandbox_cgroups` directory; returns what went (a
    directory that a process entered meanwhile is busy and stays)."""
    return _remove_each(lambda: orphaned_sandbox_cgroups(root, min_age=min_age), Path.rmdir)


def _remove_each(find: Callable[[], list[Path]], remove: Callable[[Path], None]) -> list[Path]:
    """gc's sweep of cgroup directories nobody owns: ``remove`` each that ``find`` lists,
    skipping one that fails; returns what went."""
    try:
        found = find()
    except SandboxError:
        return []  # no cgroups here we could have made
    removed: list[Path] = []
    for path in found:
        try:
            remove(path)
        except (OSError, SandboxError):
            continue
        removed.append(path)
    return removed


def _process_alive(pid: int, start_time: int) -> bool:
    try:
        return procfs.live_start_time(pid) == start_time
    except OSError:
        return False  # unreadable: not one of ours (ours run as the same user)


def cleanup_spares(root: Path = CGROUP_ROOT, everywhere: bool = False) -> list[Path]:
    """Kill what is in every abandoned spare cgroup and remove it; returns what went."""

    def kill_and_remove(path: Path) -> None:
        unified = path if (path / "cgroup.kill").exists() else None  # a v2 directory
        cleanup(Cgroup("spare", (path,), unified=unified))

    return _remove_each(lambda: abandoned_spares(root, everywhere=everywhere), kill_and_remove)


def cleanup(cgroup: Cgroup) -> None:
    """Kill what is left in ``cgroup`` and remove it (gc after a dead supervisor)."""
    if cgroup.exists():
        cgroup.kill()
        cgroup.remove()


def cgroup_name(sandbox: str, state_dir: Path) -> str:
    """A directory name unique per state directory (two CORRAL_HOMEs may reuse a name)."""
    # crc32 rather than hashlib: importing OpenSSL's hashlib costs the supervisor's start-up
    # several ms, and this only has to tell apart the few homes that may reuse a name (a
    # collision is a clear "already exists" error, not a shared cgroup).
    raw = os.fsencode(str(state_dir.resolve()))
    digest = f"{zlib.crc32(raw):08x}{zlib.adler32(raw) & 0xFFFF:04x}"
    return f"corral-{sandbox}-{digest}"
