"""A sandbox's life as the SDK and the CLI see it: its record, create, start, stop, remove.

The blocking steps run in the calling process (the SDK runs them in a worker thread in the
caller's network namespace, :mod:`corral.lifecycle.steps`). Each one composes the parts a
sandbox is made of: its directory and record (:mod:`corral.runtime.state`), its image
(:mod:`corral.runtime.images`), its supervisor (:mod:`corral.lifecycle.spawn`, which owns
the launch and the network), what a dead supervisor left (:mod:`corral.lifecycle.gc`).

The record's names (``SandboxState``, the statuses, ``read_state``...) are
:mod:`corral.runtime.state`'s own, named here so that the SDK and the CLI read a sandbox
through this layer only (docs/design.md, "Layers").
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from corral.config import NetworkConfig, SecretEntry
from corral.errors import SandboxError
from corral.kernel import procfs
from corral.lifecycle import gc, hostnetns, spawn
from corral.runtime import cgroupfs, control, spare_idle, state
from corral.runtime.state import (
    COMMAND_LOG,
    CRASHED,
    CREATING,
    LOG_FILE,
    NAME_PATTERN,
    REMOVED,
    RUNNING,
    STOPPED,
    SandboxState,
    list_names,
    read_state,
    sandbox_dir,
    status,
    validate_name,
)

__all__ = [
    "COMMAND_LOG", "CRASHED", "CREATING", "DEFAULT_STOP_TIMEOUT", "LOG_FILE", "NAME_PATTERN",
    "REMOVED", "RUNNING", "STOPPED", "SandboxState", "abandon", "collect_crashed",
    "creator_identity", "discard", "info", "list_names", "oom_kills", "prepare", "read_state",
    "remove", "restart", "sandbox_dir", "start", "status", "stop", "validate_name",
]  # fmt: skip

#: Seconds of grace a stop gives the sandbox's processes before they are killed.
DEFAULT_STOP_TIMEOUT = control.DEFAULT_STOP_TIMEOUT


def creator_identity() -> list[int]:
    """[pid, start time] of this process: what an ``auto_remove`` sandbox's supervisor
    watches (the start time tells this process from a later one with its pid)."""
    return [os.getpid(), procfs.own_start_time()]


def discard(
    name: str, directory: Path, *, kill: bool = False, background: bool = False
) -> None:
    """Take away everything of sandbox ``name``: with ``kill`` its supervisor first (SIGKILL),
    then what a dead supervisor left (processes, cgroup, network, mounts), then its directory.

    The one clean-up sequence of a failed or cancelled create, a crashed namesake and a
    remove. A sandbox whose supervisor stopped it cleanly left nothing to release, so that
    step only runs when it did not (a crash, or the supervisor just killed). Hold
    ``state.name_lock(name)``. A leftover that could not be removed is a SandboxError and the
    directory stays, for the next gc."""
    if kill:
        spawn.kill_supervisor(directory)
    if kill or state.status(directory) == state.CRASHED:
        gc.release_leftovers(name, directory)
    gc.remove_directory(directory, background=background)


def collect_crashed(name: str) -> list[str]:
    """gc of a crashed ``name`` that keeps its state (a ``stop`` of a crashed sandbox)."""
    return gc.collect([name], keep_state=True)


def abandon(sandbox_state: SandboxState) -> None:
    """Take down a sandbox whose create was cancelled after it started."""
    directory = state.sandbox_dir(sandbox_state.name)
    with state.name_lock(sandbox_state.name):
        discard(sandbox_state.name, directory, kill=True)


# -- images ----------------------------------------------------------------------------------

_image_stores: dict[tuple[Path, tuple[str | None, ...]], Any] = {}
_image_stores_lock = threading.Lock()

#: Environment variables an ImageStore reads when it is built (registry trust and
#: credentials); a change of any of them gets a new store.
_IMAGE_STORE_ENV = (
    "CORRAL_INSECURE_REGISTRIES",
    "CORRAL_REGISTRY_CA_FILE",
    "CORRAL_REGISTRY_USER",
    "CORRAL_REGISTRY_PASSWORD",
    "CORRAL_REGISTRY_MIRROR",
)


def image_store() -> Any:
    """One ImageStore per image directory and registry settings: building one (registry
    client, TLS context) costs tens of milliseconds, more than a whole sandbox start should."""
    from corral.runtime import paths
    from corral.runtime.images import ImageStore

    key = (paths.images_dir(), tuple(os.environ.get(v) for v in _IMAGE_STORE_ENV))
    with _image_stores_lock:
        store = _image_stores.get(key)
        if store is None:
            store = _image_stores[key] = ImageStore(key[0])
        return store


def resolve_image(image_ref: str) -> Any:
    """The image for ``image_ref``: a path (``./rootfs``, ``/abs/dir``, an OCI layout or a
    docker-save tar) is imported, cached by content; a name is looked up locally first."""
    from corral.runtime.images import local

    if local.looks_like_path(image_ref):
        return local.import_cached(image_store(), Path(image_ref))
    return image_store().resolve(image_ref)


def _env_list_to_dict(entries: Iterable[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for entry in entries:
        key, sep, val = entry.partition("=")
        if sep and key:
            out[key] = val
    return out


def absolute_tls_paths(config: NetworkConfig) -> NetworkConfig:
    """``config`` with its TLS files (``ca_cert``, ``ca_key``, ``upstream_ca_certs``) made
    absolute against the caller's working directory.

    Why: users name them as they name any file (``--tls-upstream-ca-cert ca.pem``), relative
    to where they run corral, but the supervisor that reads them runs in the sandbox's
    directory and may read them again at ``corral start``; state.json keeps the absolute
    form, so both read the file the user meant."""
    tls = config.tls
    if tls is None:
        return config

    def absolute(path: str) -> str:
        return os.path.abspath(os.path.expanduser(path))

    return dataclasses.replace(
        config,
        tls=dataclasses.replace(
            tls,
            ca_cert=absolute(tls.ca_cert) if tls.ca_cert is not None else None,
            ca_key=absolute(tls.ca_key) if tls.ca_key is not None else None,
            upstream_ca_certs=tuple(absolute(p) for p in tls.upstream_ca_certs),
        ),
    )


def prepare(
    name: str,
    image_ref: str,
    config: NetworkConfig,
    secrets: tuple[SecretEntry, ...],
    user_env: dict[str, str],
    cpus: float | None,
    memory: int | None,
    workdir: str | None,
) -> SandboxState:
    """Resolve the image (pulling it if needed) and compute what the supervisor launches."""
    image = resolve_image(image_ref)
    image_config = image.config.get("config", image.config) or {}
    env = _env_list_to_dict(image_config.get("Env") or ())
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env.setdefault("HOME", "/root")
    env.update(user_env)
    for secret in secrets:
        assert secret.placeholder is not None
        env[secret.env_var] = secret.placeholder
    return state.SandboxState(
        name=name,
        image=image.reference,
        image_digest=image.digest,
        rootfs=str(image.rootfs),
        network=absolute_tls_paths(config).to_dict(),
        offline=config.is_offline,
        # Values never go into state.json: start hands them to the supervisor, whose
        # memory is the only place they live (SPEC "Secrets and violations").
        secrets=[{k: v for k, v in s.to_dict().items() if k != "value"} for s in secrets],
        env=env,
        workdir=workdir or image_config.get("WorkingDir") or "/",
        user=image_config.get("User") or "0",
        cpus=cpus,
        memory=memory,
        entrypoint=list(image_config.get("Entrypoint") or []),
        cmd=list(image_config.get("Cmd") or []),
        created_at=time.time(),
    )


# -- create, start, stop, remove -------------------------------------------------------------


def start(
    new_state: SandboxState, secret_values: dict[str, str] | None = None
) -> SandboxState:
    """Claim the name (after gc of a crashed namesake), write state, spawn, wait for ready.

    ``secret_values`` (env var -> value) go to the supervisor through a 0600 hand-off file
    in the state directory that it reads and unlinks before anything else (never in
    state.json; see docs/network.md "Secrets: where values live")."""
    name = new_state.name
    spare_idle.spare_idle()  # a bad $CORRAL_SPARE_IDLE is one sentence, before any claim
    # Where this thread's mount namespace shows no cgroup hierarchy (ip netns exec), mount
    # it now, so that the note about it comes from the creating process.
    cgroupfs.ensure()
    new_state = dataclasses.replace(new_state, host_netns=hostnetns.identify())
    with state.name_lock(name):
        directory = state.sandbox_dir(name)
        if directory.exists() and state.status(directory) == state.CRASHED:
            discard(name, directory)
        directory = state.claim(name)
        try:
            state.write_state(directory, new_state)
            if secret_values:
                from corral.net.secret_handoff import write_handoff

                write_handoff(directory, secret_values)
            new_state = _with_runtime(new_state, spawn.spawn_supervisor(directory))
            state.write_state(directory, new_state)
        except BaseException:
            discard(name, directory, kill=True)
            raise
    return new_state


def _with_runtime(sandbox_state: SandboxState, ready: dict[str, object]) -> SandboxState:
    """The state with the runtime fields of a supervisor's ready message."""
    return dataclasses.replace(
        sandbox_state,
        init_pid=int(ready.get("init_pid") or 0) or None,  # type: ignore[call-overload]
        channel_path=str(ready.get("channel_path") or "") or None,
        cgroup=str(ready.get("cgroup") or "") or None,
        netns_path=str(ready.get("netns_path") or "") or None,
        published=[dict(p) for p in ready.get("published") or () if isinstance(p, dict)],  # type: ignore[attr-defined]
    )


def restart(name: str) -> SandboxState:
    """Start a stopped or crashed ``name`` again (same record, a new supervisor and init)."""
    spare_idle.spare_idle()  # a bad $CORRAL_SPARE_IDLE is one sentence, before any change
    with state.name_lock(name):
        directory = state.sandbox_dir(name)
        sandbox_state = state.read_state(name)
        status = state.status(directory)
        if status == state.RUNNING:
            return sandbox_state
        if status == state.CREATING:
            raise SandboxError(f"sandbox {name!r} is being started by another process")
        if status == state.CRASHED:
            gc.release_leftovers(name, directory)
        for leftover in (state.STOPPED_FILE, state.PID_FILE, state.CONTROL_SOCKET):
            (directory / leftover).unlink(missing_ok=True)
        # The network is built where this start runs, which may be another namespace.
        cgroupfs.ensure()
        sandbox_state = dataclasses.replace(sandbox_state, host_netns=hostnetns.identify())
        state.write_state(directory, sandbox_state)
        try:
            ready = spawn.spawn_supervisor(directory)
        except BaseException:
            if not (directory / state.STOPPED_FILE).exists():
                (directory / state.STOPPED_FILE).write_text("failed to start again\n")
            raise
        sandbox_state = _with_runtime(sandbox_state, ready)
        state.write_state(directory, sandbox_state)
        return sandbox_state


async def stop(directory: Path, timeout: float) -> bool:
    """Ask the running (or starting) sandbox in ``directory`` to stop: SIGTERM to its
    processes, SIGKILL after ``timeout`` s. Returns False when it was not running.

    A supervisor answers the stop once the sandbox's processes, cgroup, network and lease are
    gone and "stopped" is written; what it still does after (close the sockets whose close
    waits for the kernel, exit) holds nothing of the sandbox, so its exit is not waited for,
    unless it is this process's child (reaped) or it did not answer."""
    if state.status(directory) not in (state.RUNNING, state.CREATING):
        return False
    recorded = state.read_supervisor_pid(directory)
    answered = False
    try:
        await control.call(
            str(directory / state.CONTROL_SOCKET),
            control.stop_request(timeout),
            timeout + spawn.EXIT_MARGIN,
        )
        answered = True
    except SandboxError:
        # Stopping by itself (its init exited, a violation), it may have removed its
        # control socket already: then it is not an error, only an exit to wait for.
        if state.supervisor_alive(directory) and not only_exiting(directory):
            raise
    if recorded is not None and (not answered or spawn.is_child(recorded[0])):
        await _wait_exit(*recorded, spawn.EXIT_MARGIN)
    return True


async def _wait_exit(pid: int, start_time: int, timeout: float) -> None:
    """Wait (on the event loop, through a pidfd) until process ``pid`` started at
    ``start_time`` has exited; reap it if it is our child. Gives up after ``timeout``."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if state.process_start_time(pid) == start_time:  # not a recycled pid
            loop = asyncio.get_running_loop()
            exited = loop.create_future()

            def on_exit() -> None:
                if not exited.done():
                    exited.set_result(None)

            loop.add_reader(pidfd, on_exit)
            try:
                await asyncio.wait_for(exited, timeout)
            except TimeoutError:
                pass
            finally:
                loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)
    spawn.reap(pid)


def only_exiting(directory: Path) -> bool:
    """Whether the sandbox's supervisor, though still a live process, has finished.

    A supervisor's last steps are: release everything (its control socket first), write the
    ``stopped`` record, answer its stop waiters, exit. Its exit (closing a networked
    supervisor's sockets, freeing its memory) can outlast ``stop()``'s wait on a loaded
    machine; ``remove()`` then reported a stopped sandbox as "still running". A live
    supervisor with a ``stopped`` record and no control socket touches nothing of its
    directory any more (``start`` deletes a stale record, under the name's lock, before it
    spawns a new supervisor).
    """
    return (
        state.stopped_reason(directory) is not None
        and not (directory / state.CONTROL_SOCKET).exists()
    )


def remove(name: str) -> None:
    """Delete stopped ``name`` and its writable layer (a crashed one's leftovers first)."""
    with state.name_lock(name):
        directory = state.sandbox_dir(name)
        if not directory.exists():
            return
        if state.supervisor_alive(directory) and not only_exiting(directory):
            raise SandboxError(f"sandbox {name!r} is still running; stop it before removing it")
        discard(name, directory, background=True)


# -- what the record does not say ------------------------------------------------------------


def info(directory: Path) -> dict[str, Any]:
    """The live part of ``Sandbox.info``: supervisor pid, why it stopped, TLS interception
    (the CA fingerprint and the secrets' names, never values)."""
    from corral.net.secret_handoff import read_tls_summary

    recorded = state.read_supervisor_pid(directory)
    return {
        "supervisor_pid": recorded[0] if recorded else None,
        "stopped_reason": state.stopped_reason(directory),
        "tls": read_tls_summary(directory),
    }


def oom_kills(directory: Path) -> int:
    """OOM kills in the sandbox's cgroup so far (0 when it cannot be read)."""
    # Imported here: the launcher's modules are not on the SDK's import path otherwise.
    from corral.runtime.cgroups import Cgroup
    from corral.runtime.launcher import CGROUP_RECORD

    try:
        record = (directory / CGROUP_RECORD).read_text()
        cgroupfs.ensure()  # another process's sandbox, seen from under ip netns exec
        return Cgroup.from_json(record).oom_kills()
    except (OSError, ValueError, KeyError, SandboxError):
        return 0
