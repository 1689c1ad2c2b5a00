"""``corral gc``: remove everything a sandbox whose supervisor died left behind.

A supervisor that is SIGKILLed (or whose machine lost power) cannot clean up: the sandbox's
init may still run, its cgroup, netns, veth, nftables table and mounts stay. The supervisor's
pid file plus its start time tell a dead supervisor from a live one (pid reuse included), and
a missing ``stopped`` marker tells a crash from a clean stop (see :mod:`corral.runtime.state`).
Every step runs under the sandbox name's lock, so gc never races a ``create`` of that name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
from pathlib import Path

from corral.errors import CorralError, SandboxError
from corral.kernel import libc
from corral.kernel.mountinfo import mounts_under
from corral.runtime import paths, state


def unmount(point: str) -> None:
    """Detach ``point`` (a crashed sandbox's process may hold it a moment longer)."""
    try:
        libc.umount2(point, libc.MNT_DETACH)
    except OSError as e:
        raise SandboxError(f"gc: cannot unmount {point}: {e.strerror}") from None


def release_leftovers(name: str, directory: Path) -> list[str]:
    """Remove what a dead supervisor of ``name`` left: processes, cgroup, network, mounts.

    Returns one line per thing removed, each one checked to be gone afterwards (the network
    in the namespace the sandbox was created from: lifecycle/hostside.py). Something that
    could not be removed is a SandboxError, so that the caller keeps the directory and the
    next gc tries again. Hold ``state.name_lock(name)``.
    """
    removed: list[str] = []
    from corral.lifecycle import hostside
    from corral.runtime import cgroupfs, launcher
    from corral.runtime.cgroups import Cgroup

    cgroup_record = directory / launcher.CGROUP_RECORD
    cgroup = None
    if cgroup_record.exists():
        cgroupfs.ensure()  # the recorded paths must lead somewhere from here (ip netns exec)
        with contextlib.suppress(OSError, ValueError, KeyError):
            cgroup = Cgroup.from_json(cgroup_record.read_text())
    present = cgroup is not None and cgroup.exists()
    launcher.cleanup_leftovers(directory)
    if cgroup is not None:
        if cgroup.exists():
            raise SandboxError(f"gc: the cgroup of {name!r} could not be removed")
        if present:
            removed.append(f"cgroup of {name} (and any process left in it)")
    if not _is_offline(directory):
        removed += [
            f"network of {name}: {line}" for line in hostside.release(name, _host_netns(directory))
        ]
    for point in mounts_under(directory):
        unmount(point)
        removed.append(f"mount {point}")
    with contextlib.suppress(FileNotFoundError):
        (directory / state.CONTROL_SOCKET).unlink()
    return removed


def _host_netns(directory: Path) -> dict[str, object] | None:
    """The network namespace the sandbox was created from (state.json), if recorded."""
    try:
        found = json.loads((directory / state.STATE_FILE).read_text()).get("host_netns")
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, dict) else None


def _is_offline(directory: Path) -> bool:
    """True when the sandbox's state says it never had a network (nothing to clean there)."""
    try:
        return bool(json.loads((directory / state.STATE_FILE).read_text()).get("offline"))
    except (OSError, ValueError, AttributeError):
        return False  # unknown: clean the network too, which is harmless when absent


#: Where removed sandbox directories wait for deletion (inside sandboxes/, same filesystem,
#: so moving one there is a rename). Entries are ``<name>.<pid>.<random>``.
TRASH_DIR = ".trash"

_deleters: list[threading.Thread] = []


def remove_directory(directory: Path, *, background: bool = False) -> None:
    """Delete a sandbox's directory (its writable layer included), unmounting first.

    With ``background`` the directory is renamed into ``sandboxes/.trash`` (the name is free
    at once) and deleted by a thread of this process: deleting a sandbox's tree right after
    its mount namespace went away costs tens of milliseconds here, which a ``remove`` need
    not wait for. The process waits for that thread before exiting (it is not a daemon), and
    ``corral gc`` deletes entries whose process died first.
    """
    for point in mounts_under(directory):
        unmount(point)
    target = directory
    if background:
        trash = directory.parent / TRASH_DIR
        trash.mkdir(mode=0o700, exist_ok=True)
        target = trash / f"{directory.name}.{os.getpid()}.{os.urandom(4).hex()}"
        try:
            directory.rename(target)
        except FileNotFoundError:
            return
        except OSError:
            target = directory  # another filesystem or a busy directory: delete in place
        else:
            thread = threading.Thread(
                target=_delete_quietly, args=(target,), name="corral-rm", daemon=False
            )
            thread.start()
            _deleters[:] = [t for t in _deleters if t.is_alive()] + [thread]
            return
    try:
        shutil.rmtree(target)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise SandboxError(f"cannot remove {target}: {exc.strerror or exc}") from None


#: Nice value of the thread that deletes removed directories: the deletion is nobody's
#: critical path, while the ``create`` that typically follows a ``remove`` is (on a 2-core
#: machine an rmtree at normal priority took CPU from it).
DELETER_NICE = 19


def _delete_quietly(path: Path) -> None:
    # Linux keeps the nice value per thread: this lowers only the deleting thread.
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DELETER_NICE)
    shutil.rmtree(path, ignore_errors=True)


def wait_for_deletions(timeout: float | None = None) -> None:
    """Block until background deletions started by this process are done."""
    for thread in list(_deleters):
        thread.join(timeout)


def empty_trash() -> list[str]:
    """Delete trash entries whose deleting process is gone (it died mid-delete)."""
    trash = paths.sandboxes_dir() / TRASH_DIR
    removed: list[str] = []
    if not trash.is_dir():
        return removed
    for entry in trash.iterdir():
        parts = entry.name.rsplit(".", 2)
        owner = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else 0
        if owner == os.getpid() or (owner and state.process_start_time(owner) is not None):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(f"{parts[0]}: leftover of a removal ({entry})")
    return removed


def collect(
    names: list[str] | None = None,
    *,
    keep_state: bool = False,
    failures: list[str] | None = None,
) -> list[str]:
    """``corral gc``: clean up every sandbox (or those named) whose supervisor died.

    A crashed sandbox's leftovers are removed and, unless ``keep_state``, its directory too.
    Running sandboxes and cleanly stopped ones are left alone (``corral rm`` removes those).
    Returns one line per thing removed. A sandbox whose leftovers could not all be removed
    keeps its directory (the next gc tries again); its error is raised, or appended to
    ``failures`` (and the others are collected) when that list is given.
    """
    report: list[str] = []
    for name in names if names is not None else state.list_names():
        directory = state.sandbox_dir(name)
        with state.name_lock(name):
            if not directory.exists() or state.status(directory) != state.CRASHED:
                continue
            try:
                items = release_leftovers(name, directory)
            except CorralError as exc:
                if failures is None:
                    raise
                failures.append(str(exc))
                continue
            for item in items:
                report.append(f"{name}: {item}")
            if not keep_state:
                remove_directory(directory)
                report.append(f"{name}: state directory {directory}")
    if names is None:
        report += empty_trash()
        from corral.runtime import cgroups

        # Not reported: spare cgroups belong to no sandbox (nor to any CORRAL_HOME), they
        # are start-up machinery of SDK processes that were SIGKILLed.
        cgroups.cleanup_spares(everywhere=True)
        # Empty sandbox cgroups no state directory leads to (a home deleted under a dead
        # supervisor, say): reported, they were a sandbox's.
        report += [f"empty cgroup {p} of no sandbox" for p in cgroups.cleanup_orphans()]
    return report
