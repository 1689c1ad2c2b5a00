"""Start a sandbox: namespaces, overlay rootfs, /proc and /dev, pivot_root, limits, init.

The sequence reads top to bottom in the order the kernel requires, like bubblewrap's
``main()``; every step that can fail raises SandboxError naming the step and the path.

    supervisor (host root)            stage A (forked)                  stage B = sandbox pid 1
    ─────────────────────             ───────────────                   ──────────────────────
    cgroup dirs + limits
    channel.sock (listening)
    fork A ──────────────────────────▶ join netns (if given)
    (thread: move A into the cgroup)
                                       new mount ns, / private
                                       mount overlay on state/root
                                       unshare(user, pid, uts, ipc,
                                               mount[, net])
    write uid_map/gid_map ◀──────────  "unshared"
    ─────────────────────────────────▶ "mapped": become root inside
                                       fork B ──────────────────────────▶ (waits)
    join the thread ◀────────────────  init pid; exit
    reap A; move B too
    oom_score_adj -1000 on B
                                                                          hostname, lo up
                                                                          /proc, /dev, /tmp
                                                                          pivot_root, detach old
                                                                          /etc/hosts, resolv...
                                                                          caps but SYS_ADMIN,
                                                                          no_new_privs, seccomp
    "go" ────────────────────────────────────────────────────────────────▶ cgroup ns,
                                                                          drop SYS_ADMIN,
                                                                          die-with-parent
    Launched ◀───────────────────────────────────────────────────────────  "ready"; serve()

Why this shape:

* The overlay is mounted by stage A as real root in a mount namespace of its own, *before*
  the user namespace exists: overlayfs then needs no ``userxattr`` and no idmapped mounts, the
  image's lower dir is already uid-shifted (corral.runtime.images.idmap), and the mount is
  invisible to the host. When the sandbox's last process exits, the kernel frees that mount
  namespace and the overlay with it: a crashed supervisor can never leak mounts.
* The netns is joined before the user namespace is created (the other order is EPERM:
  the joined netns belongs to the initial user namespace).
* uid_map/gid_map are written by the supervisor, a privileged process in the parent
  namespace, so ``setgroups`` stays allowed in the sandbox (su, apt's privilege drop).
* B is created by A after ``unshare(CLONE_NEWPID)`` so B is pid 1; A exits and B is
  reparented to the supervisor, which marks itself a child subreaper for that. So the
  supervisor can wait for the init like any child.
* The init itself runs with the sandbox's capabilities, no_new_privs and seccomp filter: it
  needs nothing more after the pivot (fork, exec, setuid, files), and a compromised init then
  has no more power than any root process in the sandbox.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import os
import re
import select
import signal
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from corral.errors import SandboxError
from corral.kernel import mountinfo, netns, procfs
from corral.runtime import capabilities, cgroups, init, seccomp_profile, syscalls, volumes
from corral.runtime.cgroups import Cgroup, CgroupLimits
from corral.runtime.channel_wire import short_unix_path
from corral.runtime.images.idmap import ID_RANGE, UID_BASE

#: Files in the state directory.
CHANNEL_SOCKET = "channel.sock"
CGROUP_RECORD = "cgroup.json"
#: Output of commands started detached (``corral run -d``, ``exec(..., detach=True)``).
COMMAND_LOG = "command.log"
ROOT_DIR = "root"
UPPER_DIR = "upper"
WORK_DIR = "work"

#: Pending connections the init's socket queues while the init forks a worker for each.
CHANNEL_BACKLOG = 128

#: How long launch() waits for the sandbox to report ready (a stalled mount, a hung kernel).
LAUNCH_TIMEOUT = 30.0

#: Host devices bind-mounted into the sandbox's /dev (what the OCI runtime spec requires,
#: minus console: the sandbox has no terminal of its own).
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")

#: oom_score_adj of the init (and its workers): never the OOM killer's choice. Lowering it
#: needs CAP_SYS_RESOURCE on the host; without it the init stays at 0 and is protected only by
#: the commands' higher adj (corral.runtime.init.COMMAND_OOM_SCORE_ADJ).
INIT_OOM_SCORE_ADJ = -1000

#: The sysctl that lets unprivileged users bind low ports, in the netns of whoever opens it.
UNPRIVILEGED_PORT_START = "/proc/sys/net/ipv4/ip_unprivileged_port_start"

#: Kernel hostname limit (HOST_NAME_MAX).
MAX_HOSTNAME = 64

#: Sandbox names: they become the hostname and part of the cgroup directory names.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # 64 = MAX_HOSTNAME

#: Characters overlayfs' option parser treats specially in lowerdir/upperdir/workdir.
_OVERLAY_UNSAFE = (",", ":", "\\", "\n")

# Network interface flags for bringing "lo" up in a fresh netns.
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start one sandbox; see docs/isolation.md."""

    name: str
    rootfs: Path
    state_dir: Path
    netns_path: str | None
    env: Mapping[str, str]
    workdir: str = "/"
    user: str | None = None
    cpus: float | None = None
    memory: int | None = None
    pids_max: int = 4096
    hosts: Sequence[tuple[str, str]] = ()
    resolv_conf: str | None = None
    extra_files: Mapping[str, bytes] = field(default_factory=dict)
    #: SIGKILL the sandbox when the process that called launch() dies (no orphaned sandboxes
    #: without a network stack); `corral gc` then only has cgroups left to remove. The kernel
    #: ties this to the caller's main thread: it must live as long as the process.
    die_with_parent: bool = True
    #: The sandbox's hostname (default: its name); also in /etc/hostname and /etc/hosts.
    hostname: str | None = None
    #: Host directories or files mounted into the sandbox (corral.runtime.volumes).
    volumes: Sequence[volumes.Volume] = ()


@dataclass
class Launched:
    init_pid: int
    channel_path: Path
    cgroup: Cgroup
    state_dir: Path
    _pidfd: int = -1

    def alive(self) -> bool:
        """True while the sandbox's init runs (pidfd-based: immune to pid reuse)."""
        if self._pidfd < 0:
            try:
                self._pidfd = os.pidfd_open(self.init_pid)
            except OSError:
                return False
        readable, _, _ = select.select([self._pidfd], [], [], 0)
        if readable:
            _reap(self.init_pid)
            return False
        return True


class _Fail(Exception):
    """Raised inside a launch stage; its message is the one sentence sent to the supervisor."""


def _step(what: str, path: str | Path, e: OSError) -> _Fail:
    """The sentence for a failed step; relative paths are relative to the sandbox's root
    (stage B works from there) and are shown as the sandbox sees them."""
    shown = str(path) if str(path).startswith("/") else "/" + str(path).lstrip("./")
    return _Fail(f"{what} {shown!r}: {e.strerror or e}")


# --- the supervisor's side ----------------------------------------------------------------------


def launch(
    spec: LaunchSpec,
    zygote: Zygote | None = None,
    cgroup_done: Callable[[], object] | None = None,
    before_fork: Callable[[], object] | None = None,
) -> Launched:
    """Start the sandbox; returns when its init serves the channel. Call before threads exist,
    or give ``before_fork``.

    ``zygote`` (from :func:`prepare_zygote`, made ahead of time) becomes stage A, already in
    a cgroup: no process is moved into a cgroup on this path. It is used up either way (a
    failed launch discards it); without one, stage A is forked here and moved.

    ``cgroup_done`` is called once this launch needs the kernel's cgroup lock no more (its
    cgroup is made or adopted and, with a zygote, nothing is moved later): from then on,
    another process may move one into a cgroup (which holds that lock for a grace period)
    without delaying this launch.

    ``before_fork`` is called before this process forks (only when there is no usable zygote:
    with one, the zygote forks the init): a caller that started a thread beside the launch
    makes it quiescent there (no lock held, nothing half-done), so that the forked stage A
    inherits a consistent copy.
    """
    try:
        _validate(spec)
        state = spec.state_dir
        root = state / ROOT_DIR
        _prepare_state_dir(state)
        limits = CgroupLimits(spec.cpus, spec.memory, spec.pids_max)
        final = cgroups.plan(cgroups.cgroup_name(spec.name, state))
        cgroup = _adopt(zygote, final, limits, state) if zygote is not None else None
    except BaseException:
        if zygote is not None:
            zygote.discard()
        raise
    if cgroup is None:
        zygote = None
        cgroup = final
        (state / CGROUP_RECORD).write_text(cgroup.to_json())
        cgroups.create(cgroup, limits)
    if cgroup_done is not None and zygote is not None:
        cgroup_done()

    listener: socket.socket | None = None
    early_move: _CgroupMove | None = None
    pid_a = pid_b = 0
    to_child_r = to_child_w = from_child_r = from_child_w = -1
    try:
        listener = _listen(state / CHANNEL_SOCKET)
        to_child_r, to_child_w = os.pipe2(os.O_CLOEXEC)
        from_child_r, from_child_w = os.pipe2(os.O_CLOEXEC)
        syscalls.prctl(syscalls.PR_SET_CHILD_SUBREAPER, 1)
        if signal.getsignal(signal.SIGCHLD) == signal.SIG_IGN:
            # Ignored SIGCHLD makes the kernel reap our children itself: the init could not
            # be waited for (and stage A's waitpid would fail).
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        if zygote is not None:
            pid_a = zygote.pid
            zygote.start(spec, listener, to_child_r, from_child_w)
        else:
            if before_fork is not None:
                before_fork()
            seccomp = seccomp_profile.compiled()
            gc.freeze()  # keep the garbage collector from dirtying pages the init shares
            try:
                pid_a = os.fork()
                if pid_a == 0:
                    os.close(to_child_w)
                    os.close(from_child_r)
                    _stage_a(spec, root, listener, seccomp, to_child_r, from_child_w)
            finally:
                gc.unfreeze()
        os.close(to_child_r)
        os.close(from_child_w)
        to_child_r = from_child_w = -1
        messages = _Messages(from_child_r, time.monotonic() + LAUNCH_TIMEOUT)
        if zygote is None:
            # Moving a process between v1 cgroups waits for an RCU grace period (6-10 ms
            # here). Without a zygote, a helper thread moves stage A right away, in parallel
            # with everything below; moving the init later is then cheap (the kernel skips
            # the wait while the previous one is fresh). No fork happens in this process
            # while the thread lives: the init is forked by stage A, a thread-free process.
            early_move = _CgroupMove(cgroup, pid_a)

        messages.expect("unshared")
        _write_id_maps(pid_a)
        _tell(to_child_w, b"m", messages)

        pid_b = int(str(messages.expect("init")["pid"]))
        if early_move is not None:
            # Joined before stage A is reaped: until then its pid cannot be reused, so the
            # thread can never move an unrelated process into the sandbox's cgroup.
            early_move.join()
        os.waitpid(pid_a, 0)
        pid_a = 0
        if early_move is not None:
            # The init may have been forked before stage A's move completed: move it too (it
            # creates its cgroup namespace and forks its first child only after "go"). A
            # zygote's init was forked inside the cgroup: nothing to move.
            cgroup.add(pid_b)
        if cgroup_done is not None and early_move is not None:
            cgroup_done()
        with contextlib.suppress(SandboxError):  # needs CAP_SYS_RESOURCE; best effort
            _write_proc(pid_b, "oom_score_adj", str(INIT_OOM_SCORE_ADJ))
        _tell(to_child_w, b"g", messages)
        messages.expect("ready")
    except BaseException:
        if early_move is not None:
            early_move.thread.join()  # before the cgroup is removed under it
        if zygote is not None:
            zygote.discard()  # before its pid is reaped below
        for pid in (pid_a, pid_b):
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _reap(pid, block=True)
        with contextlib.suppress(SandboxError):
            cgroups.cleanup(cgroup)
        with contextlib.suppress(FileNotFoundError):
            (state / CHANNEL_SOCKET).unlink()
        raise
    finally:
        for fd in (to_child_r, to_child_w, from_child_r, from_child_w):
            if fd >= 0:
                os.close(fd)
        if listener is not None:
            listener.close()
    launched = Launched(pid_b, state / CHANNEL_SOCKET, cgroup, state)
    launched._pidfd = os.pidfd_open(pid_b)
    return launched


def _adopt(zygote: Zygote, final: Cgroup, limits: CgroupLimits, state: Path) -> Cgroup | None:
    """Give the zygote's cgroup the sandbox's names and limits; None (zygote discarded) if
    that fails, so the launch falls back to making a cgroup of its own."""
    if not zygote.waiting():
        zygote.discard()  # killed while it waited (an OOM of the host, an admin)
        return None
    try:
        cgroup = cgroups.adopted(zygote.cgroup, final)
    except SandboxError:
        zygote.discard()
        return None
    # Recorded before the rename, for gc: a crash in between leaves spare-named
    # directories, which gc removes as abandoned spares (their maker is dead).
    (state / CGROUP_RECORD).write_text(cgroup.to_json())
    try:
        cgroups.adopt(zygote.cgroup, cgroup, limits)
    except SandboxError:
        zygote.discard(also=cgroup)
        return None
    return cgroup


def _validate(spec: LaunchSpec) -> None:
    if not _NAME.fullmatch(spec.name):
        raise SandboxError(
            f"sandbox name {spec.name!r} is not a valid hostname (1-{MAX_HOSTNAME} letters, "
            "digits, '.', '_' or '-', starting with a letter or digit)"
        )
    if not spec.rootfs.is_dir():
        raise SandboxError(f"rootfs {str(spec.rootfs)!r} is not a directory")
    for what, path in (("rootfs", spec.rootfs), ("state_dir", spec.state_dir)):
        if not path.is_absolute():
            raise SandboxError(f"{what} {str(path)!r} must be an absolute path")
        if any(c in str(path) for c in _OVERLAY_UNSAFE):
            raise SandboxError(
                f"{what} {str(path)!r} contains a character overlayfs cannot take in a path "
                "(, : \\ or newline)"
            )
    if spec.hostname is not None and not _NAME.fullmatch(spec.hostname):
        raise SandboxError(
            f"hostname {spec.hostname!r} is not a valid hostname (1-{MAX_HOSTNAME} letters, "
            "digits, '.', '_' or '-', starting with a letter or digit)"
        )
    if spec.pids_max < 8:
        raise SandboxError(f"pids_max {spec.pids_max} is too small to run the init and a command")
    if not spec.workdir.startswith("/"):
        raise SandboxError(f"workdir {spec.workdir!r} must be an absolute path in the sandbox")


def _prepare_state_dir(state: Path) -> None:
    """state/ 0700 root; upper/ owned by the sandbox's root so its writes land as its own."""
    try:
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(state, 0o700)
        for sub in (UPPER_DIR, WORK_DIR, ROOT_DIR):
            (state / sub).mkdir(mode=0o755, exist_ok=True)
        os.chown(state / UPPER_DIR, UID_BASE, UID_BASE)
    except OSError as e:
        raise SandboxError(
            f"prepare state directory {str(state)!r}: {e.strerror or e}"
        ) from None


def _listen(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        old = os.umask(0o177)
        try:
            with short_unix_path(path) as address:
                sock.bind(address)
        finally:
            os.umask(old)
        sock.listen(CHANNEL_BACKLOG)
    except OSError as e:
        sock.close()
        raise SandboxError(f"listen on channel socket {str(path)!r}: {e.strerror}") from None
    return sock


def _write_id_maps(pid: int) -> None:
    line = f"0 {UID_BASE} {ID_RANGE}\n"
    try:
        procfs.write_id_maps(pid, line, line)
    except OSError as e:
        raise SandboxError(f"write /proc/{pid}/uid_map, gid_map: {e.strerror}") from None


def _write_proc(pid: int, name: str, value: str) -> None:
    path = f"/proc/{pid}/{name}"
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        raise SandboxError(f"write {path}: {e.strerror}") from None


class _CgroupMove:
    """Move a process into the sandbox's cgroup from a short-lived thread (see launch())."""

    def __init__(self, cgroup: Cgroup, pid: int):
        self.error: SandboxError | None = None
        self.thread = threading.Thread(target=self._run, args=(cgroup, pid), daemon=True)
        self.thread.start()

    def _run(self, cgroup: Cgroup, pid: int) -> None:
        try:
            cgroup.add(pid, gone_ok=True)  # stage A may exit before the move is done
        except SandboxError as e:
            self.error = e

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


class _Messages:
    """JSON lines from the launch stages; an ``error`` line becomes the SandboxError."""

    def __init__(self, fd: int, deadline: float):
        self.fd = fd
        self.deadline = deadline
        self.buf = b""

    def expect(self, kind: str) -> dict[str, object]:
        while b"\n" not in self.buf:
            remaining = self.deadline - time.monotonic()
            ready, _, _ = select.select([self.fd], [], [], max(0.0, remaining))
            if not ready:
                raise SandboxError(f"launch sandbox: no {kind!r} from the sandbox within "
                                   f"{LAUNCH_TIMEOUT} s")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise SandboxError(f"launch sandbox: the sandbox exited before {kind!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        msg = json.loads(line)
        if msg.get("t") == "error":
            raise SandboxError(str(msg.get("message")))
        if msg.get("t") != kind:
            raise SandboxError(f"launch sandbox: expected {kind!r}, got {msg.get('t')!r}")
        return dict(msg)


def _tell(fd: int, byte: bytes, messages: _Messages) -> None:
    """Send a go-ahead to the stages; if they are gone, raise the error they reported."""
    try:
        os.write(fd, byte)
    except BrokenPipeError:
        messages.expect("ready")  # raises the stage's own error sentence (or "exited before")
        raise


def _send(fd: int, kind: str, **fields: object) -> None:
    os.write(fd, json.dumps({"t": kind, **fields}).encode() + b"\n")


def _wait_byte(fd: int, what: str) -> None:
    if os.read(fd, 1) == b"":
        raise _Fail(f"launch sandbox: the supervisor went away before {what}")


# --- the zygote: stage A made ahead of time -------------------------------------------------


class Zygote:
    """A stage-A process forked ahead of time and already moved into a fresh cgroup.

    Moving a process into a v1 cgroup waits for an RCU grace period (6-15 ms here, more
    under load): the largest single cost of a launch. A spare supervisor (the fork server's,
    corral.lifecycle.forkserver) pays it before any request: it makes a cgroup under a spare
    name and parks a forked child in it, blocked on a socket. ``launch(spec, zygote)``
    renames the cgroup's v1 directories to the sandbox's (cgroups.adopt), writes the limits,
    and sends the spec; the zygote then runs stage A, whose init is forked inside the cgroup.

    The zygote dies with its parent (PDEATHSIG), closes every other descriptor, and holds
    nothing of any sandbox until the spec arrives. :meth:`discard` undoes it.
    """

    def __init__(self, pid: int, cgroup: Cgroup, sock: socket.socket):
        self.pid = pid
        self.cgroup = cgroup
        self.sock = sock
        self.started = False
        self.reaped = False

    def start(self, spec: LaunchSpec, listener: socket.socket, rd: int, wr: int) -> None:
        """Hand the spec and the launch's descriptors over: the zygote becomes stage A."""
        payload = _spec_to_wire(spec)
        self.started = True  # from here on, launch() owns the process (kill and reap)
        try:
            socket.send_fds(
                self.sock, [_SPEC_LENGTH.pack(len(payload)) + payload],
                [listener.fileno(), rd, wr],
            )
        except OSError as e:
            raise SandboxError(f"launch sandbox: hand the spec to stage A: {e.strerror}") from None
        finally:
            self.sock.close()

    def waiting(self) -> bool:
        """True while the zygote lives and has not been handed a spec."""
        if self.started:
            return False
        try:
            pid, _status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid != 0:
            self.reaped = True  # discard() must not signal that pid again
            return False
        return True

    def discard(self, also: Cgroup | None = None) -> None:
        """Kill and reap the zygote (unless a launch took it) and remove its cgroup."""
        self.sock.close()
        if self.started:
            return
        self.started = True
        if not self.reaped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            _reap(self.pid, block=True)
            self.reaped = True
        for cgroup in (self.cgroup, also):
            if cgroup is not None:
                with contextlib.suppress(SandboxError):
                    cgroups.cleanup(cgroup)


#: Length prefix of the spec a zygote receives (JSON, any size: env and extra files).
_SPEC_LENGTH = struct.Struct("=I")

#: Descriptors a zygote receives with the spec: listener, go-ahead pipe, message pipe.
_ZYGOTE_FDS = 3


def prepare_zygote() -> Zygote:
    """Make a spare cgroup and park a forked stage A in it (see :class:`Zygote`).

    Blocking for one cgroup move (an RCU grace period): call it when nothing waits, before
    threads exist. SandboxError if the cgroup cannot be made or joined.

    The zygote is forked first, its cgroup made after: every page this process writes before
    the fork is one the sandbox's init inherits as a private copy, and keeps once this
    process (its supervisor-to-be) writes the page again. Forked right away, the zygote
    shares the fork server's pages instead (the cgroup steps and the filter's compile dirtied
    ~1.2 MiB here, most of which every idle sandbox's init then held; docs/design.md).
    """
    seccomp = seccomp_profile.compiled()  # the fork server compiled it: no work here
    parent_pid = os.getpid()
    try:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    except OSError as e:
        raise SandboxError(f"prepare stage A: socketpair: {e.strerror}") from None
    if signal.getsignal(signal.SIGCHLD) == signal.SIG_IGN:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the zygote must be waitable
    gc.freeze()
    try:
        pid = os.fork()
        if pid == 0:
            _zygote_main(theirs, seccomp, parent_pid)
    except OSError as e:
        ours.close()
        raise SandboxError(f"prepare stage A: fork: {e.strerror}") from None
    finally:
        gc.unfreeze()
        theirs.close()
    try:
        # Spare cgroups of makers that were SIGKILLed (nothing else removes them, and a test
        # world's teardown kills every process of its namespace): cheap, and nobody waits.
        cgroups.cleanup_spares()
        cgroup = cgroups.plan(cgroups.spare_name(os.getpid(), procfs.own_start_time()))
    except BaseException:
        ours.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _reap(pid, block=True)
        raise
    zygote = Zygote(pid, cgroup, ours)
    try:
        cgroups.create(cgroup, CgroupLimits())
        cgroup.add(pid)
    except BaseException:
        zygote.discard()  # also removes what create() made of the cgroup
        raise
    return zygote


def _zygote_main(sock: socket.socket, seccomp: bytes, parent_pid: int) -> NoReturn:
    """The zygote: wait for a spec, then run stage A; exit on EOF (discarded)."""
    try:
        syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:
            os._exit(0)  # the parent died before PDEATHSIG was armed
        _close_fds_except({sock.fileno()})
        _redirect_stdio()
        data, fds, _flags, _addr = socket.recv_fds(sock, 65536, _ZYGOTE_FDS)
        if len(fds) != _ZYGOTE_FDS or len(data) < _SPEC_LENGTH.size:
            os._exit(0)  # EOF: discarded
        (length,) = _SPEC_LENGTH.unpack_from(data)
        payload = bytearray(data[_SPEC_LENGTH.size :])
        while len(payload) < length:
            chunk = sock.recv(length - len(payload))
            if not chunk:
                os._exit(1)
            payload += chunk
        sock.close()
        spec = _spec_from_wire(bytes(payload))
        listener = socket.socket(fileno=fds[0])
    except BaseException:
        os._exit(1)
    _stage_a(spec, spec.state_dir / ROOT_DIR, listener, seccomp, fds[1], fds[2])


def _spec_to_wire(spec: LaunchSpec) -> bytes:
    return json.dumps(
        {
            "name": spec.name,
            "rootfs": str(spec.rootfs),
            "state_dir": str(spec.state_dir),
            "netns_path": spec.netns_path,
            "env": dict(spec.env),
            "workdir": spec.workdir,
            "user": spec.user,
            "cpus": spec.cpus,
            "memory": spec.memory,
            "pids_max": spec.pids_max,
            "hosts": [list(h) for h in spec.hosts],
            "resolv_conf": spec.resolv_conf,
            "extra_files": {k: v.hex() for k, v in spec.extra_files.items()},
            "die_with_parent": spec.die_with_parent,
            "hostname": spec.hostname,
            "volumes": [v.to_wire() for v in spec.volumes],
        }
    ).encode()


def _spec_from_wire(data: bytes) -> LaunchSpec:
    obj = json.loads(data)
    return LaunchSpec(
        name=obj["name"],
        rootfs=Path(obj["rootfs"]),
        state_dir=Path(obj["state_dir"]),
        netns_path=obj["netns_path"],
        env=obj["env"],
        workdir=obj["workdir"],
        user=obj["user"],
        cpus=obj["cpus"],
        memory=obj["memory"],
        pids_max=obj["pids_max"],
        hosts=[(str(a), str(b)) for a, b in obj["hosts"]],
        resolv_conf=obj["resolv_conf"],
        extra_files={k: bytes.fromhex(v) for k, v in obj["extra_files"].items()},
        die_with_parent=obj["die_with_parent"],
        hostname=obj["hostname"],
        volumes=[volumes.Volume.from_wire(v) for v in obj["volumes"]],
    )


# --- stage A: joins, overlay, namespaces ---------------------------------------------------------


def _stage_a(
    spec: LaunchSpec,
    root: Path,
    listener: socket.socket,
    seccomp: bytes,
    rd: int,
    wr: int,
) -> NoReturn:
    code = 1
    try:
        if spec.netns_path is not None:
            try:
                netns.join_path(spec.netns_path)
            except OSError as e:
                raise _step("join network namespace", spec.netns_path, e) from None
            # The netns belongs to the host's user namespace, so the sandbox's root has no
            # CAP_NET_BIND_SERVICE there: let every user bind every port, as docker does
            # (the policy, not the port number, decides who may reach it).
            try:
                with open(UNPRIVILEGED_PORT_START, "w") as f:
                    f.write("0")
            except OSError as e:
                raise _step("allow low ports in the network namespace:", UNPRIVILEGED_PORT_START,
                            e) from None

        try:
            syscalls.unshare(syscalls.CLONE_NEWNS)
            syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
        except OSError as e:
            raise _step("make a private mount namespace for", "/", e) from None

        state = spec.state_dir
        options = (
            f"lowerdir={spec.rootfs},upperdir={state / UPPER_DIR},workdir={state / WORK_DIR}"
        )
        try:
            syscalls.mount("overlay", str(root), "overlay", syscalls.MS_NODEV, options)
        except OSError as e:
            raise _step("mount overlay on", root, e) from None
        try:
            # Stage B runs as the sandbox's root, which cannot traverse the 0700 state
            # directory: it works relative to this cwd, the overlay's root.
            os.chdir(root)
        except OSError as e:
            raise _step("enter", root, e) from None
        # Host-side things stage B needs, opened while we are still the host's root: the
        # volumes' detached mounts and the log of detached commands.
        trees = _open_volumes(spec)
        try:
            command_log = os.open(state / COMMAND_LOG,
                                  os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise _step("open the log of detached commands", state / COMMAND_LOG, e) from None

        flags = (
            syscalls.CLONE_NEWUSER
            | syscalls.CLONE_NEWPID
            | syscalls.CLONE_NEWUTS
            | syscalls.CLONE_NEWIPC
            | syscalls.CLONE_NEWNS
        )
        if spec.netns_path is None:
            flags |= syscalls.CLONE_NEWNET
        try:
            syscalls.unshare(flags)
        except OSError as e:
            raise _step("create namespaces (user, pid, uts, ipc, mount) for", root,
                        e) from None
        _send(wr, "unshared")
        _wait_byte(rd, "the uid map")
        try:
            os.setresgid(0, 0, 0)
            os.setgroups([])
            os.setresuid(0, 0, 0)
        except OSError as e:
            raise _step("become root in the user namespace of", root, e) from None

        pid = os.fork()
        if pid == 0:
            _stage_b(spec, listener, seccomp, rd, wr, trees, command_log)
        _send(wr, "init", pid=pid)
        code = 0
    except _Fail as e:
        _report(wr, str(e))
    except BaseException as e:
        _report(wr, f"launch sandbox (stage A): {type(e).__name__}: {e}")
    finally:
        os._exit(code)


def _open_volumes(spec: LaunchSpec) -> list[tuple[int, bool]]:
    """(detached mount fd, is a directory) of each volume, made by stage A as host root."""
    if not spec.volumes:
        return []
    uid, gid = _volume_owner(spec)
    trees: list[tuple[int, bool]] = []
    for volume in spec.volumes:
        try:
            is_dir = os.path.isdir(volume.host)
            trees.append((volumes.open_volume(volume, uid, gid, UID_BASE), is_dir))
        except OSError as e:
            for tree, _ in trees:
                os.close(tree)
            raise _step("prepare volume", volume.host, e) from None
    return trees


def _volume_owner(spec: LaunchSpec) -> tuple[int, int]:
    """The sandbox's (uid, gid) that owns its volumes: its user's, as far as stage A can
    tell without trusting the image (numeric ids as given; a name from the image's own
    /etc/passwd, unless that is a symlink, which would point at the host's files here)."""
    etc = spec.rootfs / "etc"
    if any(os.path.islink(p) for p in (etc, etc / "passwd", etc / "group")):
        return 0, 0
    try:
        uid, gid, _groups = init.resolve_user(spec.user, etc=str(etc))
    except LookupError:
        return 0, 0  # stage B refuses such a user with its own sentence
    if not (0 <= uid < ID_RANGE and 0 <= gid < ID_RANGE):
        return 0, 0
    return uid, gid


def _report(wr: int, message: str) -> None:
    with contextlib.suppress(OSError):
        _send(wr, "error", message=message)


# --- stage B: the sandbox's pid 1 -----------------------------------------------------------------


def _stage_b(
    spec: LaunchSpec,
    listener: socket.socket,
    seccomp: bytes,
    rd: int,
    wr: int,
    trees: Sequence[tuple[int, bool]] = (),
    command_log: int = -1,
) -> NoReturn:
    root = Path(".")  # the overlay's root, entered by stage A
    try:
        os.setsid()
        try:
            syscalls.sethostname(spec.hostname or spec.name)
        except OSError as e:
            raise _step("set hostname", spec.hostname or spec.name, e) from None
        if spec.netns_path is None:
            _loopback_up()

        _mount_proc(root)
        _mount_dev(root)
        _mount_tmpfs(root / "tmp", "mode=1777")
        _pivot(root)

        _write_etc(spec)
        for path, data in spec.extra_files.items():
            _write_file(path, data)
        for volume, (tree, is_dir) in zip(spec.volumes, trees, strict=True):
            try:
                volumes.attach_volume(tree, volume, is_dir)
            except OSError as e:
                raise _step(f"mount volume {volume.host} on", volume.guest, e) from None
            os.close(tree)
        try:
            init.resolve_user(spec.user)  # fail at create, not at every exec
        except LookupError as e:
            raise _Fail(f"user {spec.user!r}: {e.args[0]!r} is not in the image's /etc/passwd "
                        "or /etc/group") from None
        if not os.path.isdir(spec.workdir):
            os.makedirs(spec.workdir, mode=0o755, exist_ok=True)  # as Docker does for WORKDIR

        # Everything but SYS_ADMIN goes now, while the supervisor moves us into the cgroup;
        # SYS_ADMIN is needed for the cgroup namespace, created only after that move. (The
        # seccomp filter does not refuse that unshare: it only refuses new user namespaces.)
        try:
            capabilities.drop_to(extra=capabilities.CAP_SYS_ADMIN)
            syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
            syscalls.prctl(syscalls.PR_SET_DUMPABLE, 0)
        except OSError as e:
            raise _Fail(f"drop capabilities: {e.strerror}") from None
        try:
            seccomp_profile.load(seccomp)
        except OSError as e:
            raise _Fail(f"load seccomp filter: {e.strerror}") from None

        _wait_byte(rd, "start")  # A has exited, we are the supervisor's child, in our cgroup
        try:
            syscalls.unshare(syscalls.CLONE_NEWCGROUP)
        except OSError as e:
            raise _Fail(f"create cgroup namespace: {e.strerror}") from None
        try:
            capabilities.drop_last()
        except OSError as e:
            raise _Fail(f"drop capabilities: {e.strerror}") from None
        if spec.die_with_parent:
            syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
        config = init.InitConfig(
            env=dict(spec.env), workdir=spec.workdir, user=spec.user, command_log=command_log
        )
        os.set_inheritable(listener.fileno(), False)
        _close_fds_except({listener.fileno(), wr, command_log})
        _redirect_stdio()
    except _Fail as e:
        _report(wr, str(e))
        os._exit(1)
    except BaseException as e:
        _report(wr, f"launch sandbox (init): {type(e).__name__}: {e}")
        os._exit(1)
    try:
        init.serve(listener, config, ready_fd=wr)  # sends "ready" once it can serve
    finally:
        os._exit(1)


def _loopback_up() -> None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            ifreq = struct.pack("16sH14x", b"lo", 0)
            flags = struct.unpack("16sH14x", fcntl.ioctl(s, _SIOCGIFFLAGS, ifreq))[1]
            fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | _IFF_UP))
    except OSError as e:
        raise _step("bring up loopback interface", "lo", e) from None


def _ensure_dir(path: Path, mode: int = 0o755) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        try:
            os.mkdir(path, mode)
        except OSError as e:
            raise _step("create mount point", path, e) from None
        return
    except OSError as e:
        raise _step("inspect mount point", path, e) from None
    if not stat.S_ISDIR(st.st_mode):
        # A symlink here would point outside before the pivot: refuse rather than follow.
        raise _Fail(f"mount point {str(path)!r} in the image is not a directory")


def _mount_proc(root: Path) -> None:
    target = root / "proc"
    _ensure_dir(target)
    try:
        syscalls.mount("proc", str(target), "proc",
                       syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC)
    except OSError as e:
        raise _step("mount proc on", target, e) from None


def _mount_tmpfs(target: Path, options: str, flags: int = 0) -> None:
    _ensure_dir(target)
    try:
        syscalls.mount("tmpfs", str(target), "tmpfs",
                       syscalls.MS_NOSUID | syscalls.MS_NODEV | flags, options)
    except OSError as e:
        raise _step("mount tmpfs on", target, e) from None


def _mount_dev(root: Path) -> None:
    """A minimal /dev: bind mounts of harmless host devices, devpts, shm, the usual links."""
    dev = root / "dev"
    _ensure_dir(dev)
    try:
        syscalls.mount("tmpfs", str(dev), "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NOEXEC,
                       "mode=755,size=64k")
    except OSError as e:
        raise _step("mount tmpfs on", dev, e) from None
    for name in DEVICES:
        target = dev / name
        try:
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o666))
            syscalls.mount(f"/dev/{name}", str(target), None, syscalls.MS_BIND)
        except OSError as e:
            raise _step("bind-mount device", target, e) from None
    pts = dev / "pts"
    _ensure_dir(pts)
    try:
        syscalls.mount("devpts", str(pts), "devpts", syscalls.MS_NOSUID | syscalls.MS_NOEXEC,
                       "newinstance,ptmxmode=0666,mode=0620,gid=5")
    except OSError as e:
        raise _step("mount devpts on", pts, e) from None
    _mount_tmpfs(dev / "shm", "mode=1777", syscalls.MS_NOEXEC)
    for link, target_name in (
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        try:
            os.symlink(target_name, dev / link)
        except OSError as e:
            raise _step("create", dev / link, e) from None


def _pivot(root: Path) -> None:
    """Make the rootfs a mount of our own, pivot_root into it, detach the old root.

    The overlay was mounted before the user namespace existed, so in this mount namespace it
    is a *locked* mount, and the kernel refuses to pivot into one (EINVAL). A recursive clone
    of it (open_tree) made here is ours: attach it on top of the overlay, enter it through the
    clone's fd (the path above it is a 0700 host directory we cannot walk), and pivot with
    pivot_root(".", "."), which needs no directory in the image for the old root.
    """
    try:
        tree = syscalls.open_tree(
            str(root),
            syscalls.OPEN_TREE_CLONE | syscalls.OPEN_TREE_CLOEXEC | syscalls.AT_RECURSIVE,
        )
        try:
            syscalls.move_mount(tree, "", str(root), syscalls.MOVE_MOUNT_F_EMPTY_PATH)
            os.fchdir(tree)
        finally:
            os.close(tree)
        syscalls.pivot_root(".", ".")
        syscalls.umount2(".", syscalls.MNT_DETACH)
        os.chdir("/")
    except OSError as e:
        raise _step("pivot_root into", root, e) from None


def hosts_lines(entries: Sequence[tuple[str, str]]) -> list[str]:
    """/etc/hosts lines for (name, address) pairs: the address first, as hosts(5) wants,
    then every name of that address, in the order given."""
    names: dict[str, list[str]] = {}
    for name, address in entries:
        names.setdefault(address, []).append(name)
    return [f"{address}\t{' '.join(group)}" for address, group in names.items()]


def _write_etc(spec: LaunchSpec) -> None:
    """/etc/hostname, /etc/hosts, /etc/resolv.conf as corral decides them (replaced, never
    written through: an image may ship them as symlinks)."""
    hostname = spec.hostname or spec.name
    hosts = [
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        *hosts_lines(spec.hosts),
        f"127.0.1.1\t{hostname}",
    ]
    resolv = spec.resolv_conf
    if resolv is None:
        resolv = "# corral: this sandbox has no network (policy none)\n"
    _write_file("/etc/hostname", f"{hostname}\n".encode())
    _write_file("/etc/hosts", ("\n".join(hosts) + "\n").encode())
    _write_file("/etc/resolv.conf", resolv.encode())


def _write_file(path: str, data: bytes) -> None:
    """Write a file inside the sandbox (after the pivot), replacing whatever is there."""
    if not path.startswith("/"):
        raise _Fail(f"extra file path {path!r} must be absolute")
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            os.unlink(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    except OSError as e:
        raise _step("write file in the sandbox", path, e) from None


def _close_fds_except(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _redirect_stdio() -> None:
    """The init never writes to the supervisor's terminal or log: stdio is /dev/null."""
    fd = os.open("/dev/null", os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(fd, target)
    if fd > 2:
        os.close(fd)


# --- stop and cleanup ------------------------------------------------------------------------------


def _reap(pid: int, block: bool = False) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0 if block else os.WNOHANG)


def stop(launched: Launched, grace: float = 5.0) -> None:
    """SIGTERM the init (it forwards to everything), SIGKILL the rest after ``grace`` s.

    Then remove the cgroup and the socket. Idempotent. Mounts need no unmounting: they live
    in the sandbox's own mount namespace, which the kernel frees with its last process.
    """
    pidfd = launched._pidfd
    if pidfd < 0:
        with contextlib.suppress(OSError):
            pidfd = os.pidfd_open(launched.init_pid)
    if pidfd >= 0:
        if not select.select([pidfd], [], [], 0)[0]:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGTERM)
            if not select.select([pidfd], [], [], grace)[0]:
                launched.cgroup.kill()
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                select.select([pidfd], [], [], grace)
        _reap(launched.init_pid)
        os.close(pidfd)
        launched._pidfd = -1
    launched.cgroup.kill()
    launched.cgroup.remove()
    with contextlib.suppress(FileNotFoundError):
        launched.channel_path.unlink()


def cleanup_leftovers(state_dir: Path) -> None:
    """Remove what a dead supervisor left for the sandbox in ``state_dir``: its cgroup (and
    any process still in it), a stale socket, and mounts on the host under the directory
    (there are none unless something outside corral made them)."""
    record = state_dir / CGROUP_RECORD
    if record.exists():
        cgroups.cleanup(Cgroup.from_json(record.read_text()))
        record.unlink()
    with contextlib.suppress(FileNotFoundError):
        (state_dir / CHANNEL_SOCKET).unlink()
    for target in mountinfo.mounts_under(state_dir):
        with contextlib.suppress(OSError):
            syscalls.umount2(target, syscalls.MNT_DETACH)


__all__ = [
    "LaunchSpec",
    "Launched",
    "Zygote",
    "cleanup_leftovers",
    "launch",
    "prepare_zygote",
    "stop",
]


# Compile the seccomp filter at import: the fork server imports this module once and forks
# every supervisor from it, so they inherit the compiled program instead of paying for
# libseccomp at each launch. A failure here resurfaces, as a clear error, in launch().
with contextlib.suppress(OSError, ValueError, RuntimeError):
    seccomp_profile.compiled()
