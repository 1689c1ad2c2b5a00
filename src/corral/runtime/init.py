"""The sandbox's pid 1: reaps, forwards SIGTERM, serves exec and files on the channel.

It is not exec'd: the launcher forks it from the supervisor (before any thread or event loop
exists) and, once the namespaces, mounts and pivot are done, calls :func:`serve`. So the init
is a copy-on-write twin of the supervisor's Python and costs only the pages it dirties.

Rules this module keeps because it runs *inside* the sandbox, after pivot_root:

* Every module it uses is imported at the top of this file. After the pivot, ``sys.path``
  names directories of the sandbox's filesystem, so a late import would execute files the
  sandbox controls; :func:`serve` empties ``sys.path`` so that a missed import fails loudly.
* Nothing goes through NSS (``pwd``, ``grp``, ``socket.getaddrinfo``): those ``dlopen`` the
  sandbox's libraries. Users are looked up by reading the sandbox's /etc/passwd as text.
* Single-threaded, blocking I/O with ``selectors``: the init forks one worker per connection
  and each worker forks commands; forking is only safe because no thread ever exists.

The init process and every worker are non-dumpable, so sandbox processes cannot ptrace them,
and commands get a higher oom_score_adj than the init, so the OOM killer picks commands.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import selectors
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from corral.errors import ConfigError
from corral.kernel import procfs
from corral.runtime import spare_idle, syscalls, tree_serve
from corral.runtime.channel_wire import (
    EXIT_TIMED_OUT,
    FRAME_PREFIX,
    KIND_CONTROL,
    KIND_FILE,
    KIND_STDERR,
    KIND_STDIN,
    KIND_STDOUT,
    LIST_BATCH,
    MAX_DATA_SIZE,
    ChannelProtocolError,
    Frame,
    FrameReader,
    encode_control,
    exec_signal,
    terminal_size,
)

#: PATH for commands when neither the image nor the exec sets one (Docker's default).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: Bytes of stdin buffered in a worker before it stops reading the socket (backpressure).
STDIN_BUFFER_LIMIT = 4 * MAX_DATA_SIZE

#: oom_score_adj of every command: raising it needs no privilege, so commands are picked by
#: the OOM killer before the init and its workers (whose adj is -1000 where the host allows
#: it, else 0), and before host processes in a host-wide OOM. The maximum, because the
#: adjustment is scaled to the cgroup's limit: +1000 outweighs any process whose resident
#: set fits in the limit, and the init's can look larger than it is (it is a fork of the
#: launching process, whose shared pages count in its RSS; a test runner's are ~100 MB).
COMMAND_OOM_SCORE_ADJ = 1000

#: How long a worker waits for the next request on an idle connection before it exits (and
#: the client, which sees the EOF while the connection sits in its pool, opens a new one).
#: Bounds the processes an idle client pins in the sandbox.
WORKER_IDLE_TIMEOUT = 120.0

#: Bound on the rounds of killing an exec's processes (each round is a few syscalls; the
#: loop ends as soon as nothing is left, this only guards against a pathological fork race).
KILL_TREE_TIMEOUT = 2.0

#: Pause before the init retries forking a spare worker that failed (pids limit reached).
SPARE_RETRY = 0.05

#: How long the init waits for its children after forwarding SIGTERM before it exits
#: anyway (the launcher's stop() kills the whole cgroup after its own grace period).
TERM_GRACE = 30.0


@dataclass(frozen=True)
class InitConfig:
    """What every exec starts from: the sandbox's base environment, cwd and user."""

    env: Mapping[str, str]
    workdir: str
    user: str | None
    #: A host file (launcher.COMMAND_LOG) that detached commands write their output to;
    #: -1 when there is none.
    command_log: int = -1


# --- pid 1 ------------------------------------------------------------------------------------


def serve(listener: socket.socket, config: InitConfig, ready_fd: int = -1) -> NoReturn:
    """Run as the sandbox's pid 1 until SIGTERM; never returns.

    The init does not accept connections itself: it keeps one *spare* worker forked ahead,
    waiting for a connection, and forks the next spare when that one reports (through a
    pipe) that it took a connection. So a request never waits for a fork of this process
    (except, briefly, the very first: ``ready_fd``, the launcher's pipe, gets
    ``{"t": "ready"}`` just before the first spare is forked, which overlaps the rest of the
    create). A spare that waited :func:`~corral.runtime.spare_idle.spare_idle` seconds is
    let go (closing its stop pipe: it exits unless a connection reached it first); the init
    then watches the listener itself and forks a spare for the next connection.
    """
    sys.path[:] = []
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    taken_r, taken_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    terminating = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal terminating
        terminating = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGCHLD, lambda s, f: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    sel = selectors.DefaultSelector()
    sel.register(wake_r, selectors.EVENT_READ)
    sel.register(taken_r, selectors.EVENT_READ)
    if ready_fd >= 0:
        # Before the first spare is forked: that fork (a copy of a large process) then runs
        # while the supervisor and the SDK finish the create, and a first connection waits
        # in the listener's backlog for it at worst.
        with contextlib.suppress(OSError):
            os.write(ready_fd, b'{"t": "ready"}\n')
        os.close(ready_fd)
    inherited = (wake_r, wake_w, taken_r)
    spare = 0  # forked by the loop below
    spare_born = 0.0
    stop_w = -1  # the current spare's stop pipe; -1 once it was let go (or there is none)
    want_spare = True  # False after an idle spare was let go, until a connection waits
    watching = False  # whether the init watches the listener itself
    term_deadline = 0.0
    try:
        idle_limit = spare_idle.spare_idle()
    except ConfigError:  # refused at the SDK's start already; pid 1 cannot report it
        idle_limit = spare_idle.SPARE_IDLE

    def spare_gone() -> None:
        nonlocal spare, stop_w
        spare = 0
        if stop_w >= 0:
            os.close(stop_w)
            stop_w = -1

    while True:
        if spare in _reap_all():
            spare_gone()  # died without taking a connection (let go, or killed from inside)
        if terminating and term_deadline == 0.0:
            term_deadline = time.monotonic() + TERM_GRACE
            if watching:
                sel.unregister(listener)
                watching = False
            listener.close()
            with contextlib.suppress(OSError):
                os.kill(-1, signal.SIGTERM)  # every process of the pid namespace but us
        wait: float | None = None
        if terminating:
            if not _has_children() or time.monotonic() > term_deadline:
                os._exit(0)
            wait = 1.0
        elif spare == 0 and want_spare:
            try:
                spare, stop_w = _fork_spare(listener, config, taken_w, inherited)
                spare_born = time.monotonic()
            except OSError:
                # EAGAIN at the pids limit (a fork bomb in the sandbox): the init must
                # survive it; connections wait in the backlog until a fork succeeds.
                wait = SPARE_RETRY
        if not terminating and spare != 0 and stop_w >= 0:
            idle = time.monotonic() - spare_born
            if idle >= idle_limit:
                os.close(stop_w)  # let it go: it exits, or takes a connection that came first
                stop_w = -1
                want_spare = False
            else:
                wait = idle_limit - idle
        watch = not terminating and not want_spare
        if watch != watching:
            if watch:
                sel.register(listener, selectors.EVENT_READ)
            else:
                sel.unregister(listener)
            watching = watch
        for key, _ in sel.select(timeout=wait):
            if key.fileobj is listener:
                want_spare = True  # a connection waits: fork a spare for it (once none lives)
                continue
            with contextlib.suppress(BlockingIOError):
                data = os.read(key.fd, 4096)
                if key.fd == taken_r:
                    # Each record is the pid of a spare that took a connection; only the
                    # current spare's counts (an older one may report late).
                    for (pid,) in _PID_RECORD.iter_unpack(data[: len(data) // 4 * 4]):
                        if pid == spare:
                            spare_gone()
                            want_spare = True


def _reap_all() -> set[int]:
    reaped: set[int] = set()
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.add(pid)


def _has_children() -> bool:
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


#: What a spare writes to the init when it takes a connection: its pid (pipe writes of 4
#: bytes are atomic, so records from several workers never interleave).
_PID_RECORD = struct.Struct("=I")

#: Signals the init handles (or ignores) and its workers take with the default action.
_WORKER_DEFAULT_SIGNALS = {signal.SIGTERM, signal.SIGCHLD, signal.SIGINT, signal.SIGHUP}


def _fork_spare(
    listener: socket.socket, config: InitConfig, taken_w: int, close: tuple[int, ...]
) -> tuple[int, int]:
    """Fork a spare worker; returns its pid and the write end of its stop pipe (closing
    that end asks the spare to exit if no connection has reached it)."""
    stop_r, stop_w = os.pipe2(os.O_CLOEXEC)
    # Signals stay blocked across the fork until the child has default handlers again: a
    # SIGTERM (stop) arriving in between would otherwise run the init's handler in the child,
    # which would then ignore it and keep the sandbox from ever stopping gracefully.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_DEFAULT_SIGNALS)
    try:
        pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(stop_r)
        os.close(stop_w)
        raise
    if pid != 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(stop_r)
        return pid, stop_w
    # The spare worker: default signals, wait for one connection, tell the init, serve it.
    status = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in _WORKER_DEFAULT_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        for fd in (*close, stop_w):
            os.close(fd)
        waiting = select.poll()
        waiting.register(listener.fileno(), select.POLLIN)
        waiting.register(stop_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in waiting.poll()}
            if listener.fileno() in ready:  # a waiting connection wins over the stop
                try:
                    conn, _ = listener.accept()
                    break
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue
            if stop_r in ready:
                os._exit(0)  # let go by the init before any connection reached it
        os.close(stop_r)
        listener.close()
        os.write(taken_w, _PID_RECORD.pack(os.getpid()))
        os.close(taken_w)
        conn.setblocking(True)
        Worker(conn, config).serve()
        status = 0
    except BaseException:
        status = 1
    finally:
        os._exit(status)


# --- worker -----------------------------------------------------------------------------------

#: errno -> error kind understood by the client (corral.runtime.channel._ERROR_SENTENCES).
_ERRNO_KINDS = {
    errno.ENOENT: "not_found",
    errno.EEXIST: "exists",
    errno.ENOTDIR: "not_dir",
    errno.EISDIR: "is_dir",
    errno.EACCES: "permission",
    errno.EPERM: "permission",
    errno.ENOTEMPTY: "not_empty",
}


class _Disconnected(Exception):
    """The client went away; the worker cleans up and exits."""


class Worker:
    """Serves the requests of one connection, one after another."""

    def __init__(self, conn: socket.socket, config: InitConfig):
        self.conn = conn
        self.config = config
        self.frames = FrameReader()

    # -- framing --

    def recv(self) -> Frame:
        while True:
            frame = self.frames.next_frame()
            if frame is not None:
                return frame
            data = self.conn.recv(1024 * 1024)
            if not data:
                raise _Disconnected
            self.frames.feed(data)

    def send(self, data: bytes) -> None:
        try:
            self.conn.sendall(data)
        except OSError:
            raise _Disconnected from None

    def send_data(self, kind: int, data: bytes | memoryview) -> None:
        """One data frame without copying ``data`` into a new buffer first."""
        prefix = FRAME_PREFIX.pack(kind, len(data))
        try:
            sent = self.conn.sendmsg([prefix, data])
            if sent < len(prefix):
                self.conn.sendall(prefix[sent:])
                sent = len(prefix)
            if sent - len(prefix) < len(data):
                self.conn.sendall(memoryview(data)[sent - len(prefix):])
        except OSError:
            raise _Disconnected from None

    def reply(self, **obj: Any) -> None:
        self.send(encode_control(obj))

    def error(self, op: str, subject: str, exc: OSError | None = None, kind: str = "") -> None:
        if not kind and exc is not None:
            kind = _ERRNO_KINDS.get(exc.errno or 0, "other")
        message = (exc.strerror or str(exc)) if exc is not None else ""
        self.reply(t="error", op=op, kind=kind or "other", subject=subject, message=message)

    # -- dispatch --

    def serve(self) -> None:
        try:
            while True:
                try:
                    self.conn.settimeout(WORKER_IDLE_TIMEOUT)
                    frame = self.recv()
                    self.conn.settimeout(None)
                    request = frame.control()
                except (ChannelProtocolError, TimeoutError):
                    return
                op = request.get("op")
                handler = _HANDLERS.get(str(op))
                if handler is None:
                    self.reply(t="error", op=str(op), kind="other", subject="",
                               message=f"unknown operation {op!r}")
                    continue
                if handler(self, request) is False:
                    return
        except _Disconnected:
            return

    def path_of(self, request: Mapping[str, Any]) -> str:
        path = str(request.get("path", ""))
        return path if path.startswith("/") else os.path.join(self.config.workdir, path)

    # -- files --

    def op_stat(self, request: Mapping[str, Any]) -> None:
        path = self.path_of(request)
        try:
            info = _file_info(path, os.lstat(path))
        except OSError as e:
            return self.error("stat", path, e)
        self.reply(t="ok", info=info)

    def op_exists(self, request: Mapping[str, Any]) -> None:
        self.reply(t="ok", exists=os.path.exists(self.path_of(request)))

    def op_mkdir(self, request: Mapping[str, Any]) -> None:
        path = self.path_of(request)
        try:
            if request.get("parents"):
                os.makedirs(path, exist_ok=True)
            else:
                os.mkdir(path)
        except OSError as e:
            return self.error("mkdir", path, e)
        self.reply(t="ok")

    def op_remove(self, request: Mapping[str, Any]) -> None:
        path = self.path_of(request)
        try:
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                if request.get("recursive"):
                    shutil.rmtree(path)
                else:
                    os.rmdir(path)
            else:
                os.unlink(path)
        except OSError as e:
            return self.error("remove", path, e)
        self.reply(t="ok")

    def op_symlink(self, request: Mapping[str, Any]) -> None:
        path = self.path_of(request)
        try:
            os.symlink(str(request.get("target", "")), path)
        except OSError as e:
            return self.error("symlink", path, e)
        self.reply(t="ok")

    def op_list(self, request: Mapping[str, Any]) -> None:
        path = self.path_of(request)
        try:
            with os.scandir(path) as it:
                entries = []
                for entry in it:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue  # removed while listing
                    entries.append(_file_info(os.path.join(path, entry.name), st))
        except OSError as e:
            return self.error("list", path, e)
        entries.sort(key=lambda e: str(e["name"]))
        for i in range(0, max(len(entries), 1), LIST_BATCH):
            batch = entries[i:i + LIST_BATCH]
            self.reply(t="ok", entries=batch, more=i + LIST_BATCH < len(entries))

    def op_read(self, request: Mapping[str, Any]) -> None:
        path = self.path_of(request)
        try:
            # O_NONBLOCK: opening a FIFO must not hang this worker until a writer appears.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            return self.error("read", path, e)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                return self.error("read", path, kind="is_dir")
            if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode):
                return self.error("read", path, OSError(errno.EINVAL, "not a regular file"))
            os.set_blocking(fd, True)
            self.reply(t="ok", size=st.st_size)
            buf = bytearray(MAX_DATA_SIZE)
            view = memoryview(buf)
            while True:
                try:
                    n = os.readv(fd, [buf])
                except OSError as e:
                    return self.error("read", path, e)
                if n == 0:
                    break
                self.send_data(KIND_FILE, view[:n])
            self.send_data(KIND_FILE, b"")
        finally:
            os.close(fd)

    def op_write(self, request: Mapping[str, Any]) -> bool | None:
        path = self.path_of(request)
        mode = int(request.get("mode", 0o644)) & 0o7777
        directory, name = os.path.split(path)
        if not name:
            self.error("write", path, kind="is_dir")
            return None
        if os.path.isdir(path):
            self.error("write", path, kind="is_dir")
            return None
        tmp = os.path.join(directory, f".{name}.corral-{os.getpid()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            self.error("write", path if e.errno != errno.ENOENT else directory, e)
            return None
        done = False
        try:
            self.reply(t="ready")
            failure: OSError | None = None
            while True:
                frame = self.recv()
                if frame.kind != KIND_FILE:
                    return False  # protocol violation: drop the connection
                if not frame.body:
                    break
                if failure is None:
                    try:
                        view = memoryview(frame.body)
                        while view:
                            view = view[os.write(fd, view):]
                    except OSError as e:
                        failure = e  # keep reading until EOF so the stream stays in sync
            if failure is None:
                try:
                    os.fchmod(fd, mode)
                    os.close(fd)
                    fd = -1
                    os.rename(tmp, path)
                    done = True
                except OSError as e:
                    failure = e
            if failure is not None:
                self.error("write", path, failure)
                return None
            self.reply(t="ok")
            return None
        finally:
            if fd >= 0:
                os.close(fd)
            if not done:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    # -- exec --

    def op_exec(self, request: Mapping[str, Any]) -> bool:
        argv = [str(a) for a in request.get("argv") or []]
        env = dict(self.config.env)
        env.update({str(k): str(v) for k, v in (request.get("env") or {}).items()})
        env.setdefault("PATH", DEFAULT_PATH)
        cwd = str(request.get("cwd") or self.config.workdir)
        timeout = request.get("timeout")
        user_spec = request.get("user") or self.config.user
        want_stdin = bool(request.get("stdin"))
        want_tty = bool(request.get("tty"))
        try:
            uid, gid, groups = resolve_user(str(user_spec) if user_spec else None)
        except LookupError:
            self.error("exec", str(user_spec), kind="bad_user")
            return False
        env.setdefault("HOME", _home_of(uid))
        if not os.path.isdir(cwd):
            self.error("exec", cwd, kind="cwd_not_found")
            return False
        # Orphans of the command come to this worker (not to the init) while it runs, so
        # that a timeout or kill can find processes that left the command's process group.
        # When the worker exits, they go on to the init like any orphan.
        with contextlib.suppress(OSError):
            syscalls.prctl(syscalls.PR_SET_CHILD_SUBREAPER, 1)
        try:
            proc, master = _spawn(
                argv, cwd, env, uid, gid, groups, want_stdin,
                terminal_size(request.get("rows"), request.get("cols")) if want_tty else None,
            )  # fmt: skip
        except FileNotFoundError:
            self.error("exec", argv[0], kind="command_not_found")
            return False
        except PermissionError:
            self.error("exec", argv[0], kind="not_executable")
            return False
        except BlockingIOError:  # EAGAIN from fork: the cgroup's pids.max is reached
            self.error("exec", argv[0], kind="pids_limit")
            return False
        except (OSError, ValueError) as e:  # ValueError: a NUL byte in argv or env
            self.error("exec", argv[0], e if isinstance(e, OSError) else OSError(0, str(e)))
            return False
        except subprocess.SubprocessError as e:  # the terminal could not be taken
            self.error("exec", argv[0], OSError(0, str(e)))
            return False
        _raise_oom_score(proc.pid)
        limit = timeout if isinstance(timeout, int | float) else None
        try:
            self.reply(t="started", pid=proc.pid)
            if master >= 0:
                code, timed_out = self._pump_terminal(proc, master, limit)
            else:
                code, timed_out = self._pump(proc, limit)
        except BaseException:
            # Client gone, protocol violation, or a bug: never leave the command running
            # unattended.
            _kill_tree(proc.pid)
            proc.wait()
            return False
        finally:
            if master >= 0:
                os.close(master)
        self.reply(t="exit", code=code, timed_out=timed_out)
        self._linger_after_exit()
        return False  # exec connections are single-use (see corral.runtime.channel)

    def _linger_after_exit(self) -> None:
        """Keep the connection open, reading and dropping what the client still sends, until
        the client closes it (it does as soon as it reads the exit).

        A command may exit before its stdin is all sent (``sh`` reading ``exit 4`` ahead of
        the EOF frame, a terminal's client typing on). Were the worker to close right after
        the exit frame, the client's next STDIN (or kill/signal) frame would meet a closed
        socket: EPIPE, which asyncio turns into a fatal error of the whole transport, so the
        exit and the output still unread on the client's side were lost and ``wait()``
        raised BrokenPipeError (``corral run -i`` exited 1 with no output, about one run in
        three on a loaded machine). Our write side is shut so that the client sees EOF
        after the exit; only the read side stays open, bounded like an idle connection.
        """
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + WORKER_IDLE_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            try:
                self.conn.settimeout(left)
                if not self.conn.recv(1024 * 1024):
                    return
            except OSError:  # TimeoutError included: the client kept it open too long
                return

    def _pump(self, proc: subprocess.Popen[bytes], timeout: float | None) -> tuple[int, bool]:
        """Move stdin/stdout/stderr between the socket and the command until it exits."""
        assert proc.stdout is not None and proc.stderr is not None
        deadline = time.monotonic() + timeout if timeout is not None else None
        pidfd = os.pidfd_open(proc.pid)
        sel = selectors.DefaultSelector()
        outputs = {proc.stdout.fileno(): KIND_STDOUT, proc.stderr.fileno(): KIND_STDERR}
        for fd in outputs:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        sel.register(pidfd, selectors.EVENT_READ)
        sel.register(self.conn, selectors.EVENT_READ)
        stdin_fd = proc.stdin.fileno() if proc.stdin is not None else -1
        if stdin_fd >= 0:
            os.set_blocking(stdin_fd, False)
        pending = bytearray()
        stdin_eof = False
        socket_registered = True
        timed_out = False
        exited = False
        # Frames that came in the same read as the request (stdin typed ahead): no socket
        # event will announce them, so they are taken before the first wait.
        arrived = list(self.frames.frames())
        try:
            while not exited:
                wait = None
                if deadline is not None:
                    wait = max(0.0, deadline - time.monotonic())
                if arrived:
                    wait = 0.0
                events = sel.select(wait)
                if deadline is not None and time.monotonic() >= deadline:
                    # Checked on every wakeup, not only on an idle one: a command that
                    # prints without pause must time out too.
                    timed_out = True
                    _kill_tree(proc.pid)
                    deadline = None
                for key, _ in events:
                    fd = key.fd
                    if fd == pidfd:
                        exited = True
                    elif fd in outputs:
                        self._forward_output(fd, outputs[fd], sel)
                    elif key.fileobj is self.conn:
                        data = self.conn.recv(1024 * 1024)
                        if not data:
                            raise _Disconnected
                        self.frames.feed(data)
                        arrived.extend(self.frames.frames())
                for frame in arrived:
                    if frame.kind == KIND_STDIN and stdin_fd >= 0 and not stdin_eof:
                        if frame.body:
                            pending += frame.body
                        else:
                            stdin_eof = True
                    elif frame.kind == KIND_CONTROL:
                        _exec_control(frame.control(), proc.pid, -1)
                arrived.clear()
                if stdin_fd >= 0:
                    stdin_fd = self._push_stdin(stdin_fd, pending, stdin_eof, sel)
                    if stdin_fd < 0 and proc.stdin is not None:
                        proc.stdin.close()  # through the file object: no stale fd later
                    over = len(pending) > STDIN_BUFFER_LIMIT
                    if over and socket_registered:
                        sel.unregister(self.conn)
                        socket_registered = False
                    elif not over and not socket_registered:
                        sel.register(self.conn, selectors.EVENT_READ)
                        socket_registered = True
            # The command has exited: forward what it wrote before exiting. Background
            # processes may keep the pipes open; their later output is not part of this exec.
            for fd, kind in outputs.items():
                with contextlib.suppress(KeyError):
                    while self._forward_output(fd, kind, sel):
                        pass
            for kind in outputs.values():
                self.send_data(kind, b"")
        finally:
            sel.close()
            os.close(pidfd)
        status = proc.wait()
        code = 128 - status if status < 0 else status
        if timed_out:
            code = EXIT_TIMED_OUT
        return code, timed_out

    def _pump_terminal(
        self, proc: subprocess.Popen[bytes], master: int, timeout: float | None
    ) -> tuple[int, bool]:
        """Move bytes between the socket and the pty until the command exits.

        The terminal merges stdout and stderr (as on any terminal and as ``docker -t``):
        everything comes back as STDOUT frames. Stdin bytes go to the pty as typed, so
        Ctrl-C (0x03) and Ctrl-Z (0x1a) become signals through the line discipline. The end
        of the client's stdin ends nothing: a terminal has no end of input but ^D, which
        arrives as a byte like any other.
        """
        deadline = time.monotonic() + timeout if timeout is not None else None
        pidfd = os.pidfd_open(proc.pid)
        sel = selectors.DefaultSelector()
        sel.register(master, selectors.EVENT_READ)
        sel.register(pidfd, selectors.EVENT_READ)
        sel.register(self.conn, selectors.EVENT_READ)
        pending = bytearray()
        reading = True  # the pty still has a reader side open (EIO once every slave closed)
        socket_registered = True
        timed_out = False
        exited = False
        arrived = list(self.frames.frames())  # typed ahead (see _pump)
        try:
            while not exited:
                wait = None
                if deadline is not None:
                    wait = max(0.0, deadline - time.monotonic())
                if arrived:
                    wait = 0.0
                events = sel.select(wait)
                if deadline is not None and time.monotonic() >= deadline:
                    timed_out = True
                    _kill_tree(proc.pid)
                    deadline = None
                for key, mask in events:
                    if key.fd == pidfd:
                        exited = True
                    elif key.fd == master:
                        if mask & selectors.EVENT_READ and reading:
                            reading = self._forward_terminal(master)
                        if pending:
                            _write_some(master, pending)
                    elif key.fileobj is self.conn:
                        data = self.conn.recv(1024 * 1024)
                        if not data:
                            raise _Disconnected
                        self.frames.feed(data)
                        arrived.extend(self.frames.frames())
                for frame in arrived:
                    if frame.kind == KIND_STDIN:
                        pending += frame.body
                    elif frame.kind == KIND_CONTROL:
                        _exec_control(frame.control(), proc.pid, master)
                arrived.clear()
                if pending:
                    _write_some(master, pending)
                events_wanted = selectors.EVENT_READ if reading else 0
                if pending:
                    events_wanted |= selectors.EVENT_WRITE
                if master in sel.get_map():
                    if events_wanted:
                        sel.modify(master, events_wanted)
                    else:
                        sel.unregister(master)
                elif events_wanted:
                    sel.register(master, events_wanted)
                over = len(pending) > STDIN_BUFFER_LIMIT
                if over and socket_registered:
                    sel.unregister(self.conn)
                    socket_registered = False
                elif not over and not socket_registered:
                    sel.register(self.conn, selectors.EVENT_READ)
                    socket_registered = True
            # What the command wrote before exiting; background processes that still hold
            # the terminal may write on, which is not part of this exec.
            drained = 0
            while reading and drained < TERMINAL_DRAIN_LIMIT:
                before = drained
                drained += self._forward_terminal_counted(master)
                if drained == before:
                    break
            self.send_data(KIND_STDOUT, b"")
            self.send_data(KIND_STDERR, b"")
        finally:
            sel.close()
            os.close(pidfd)
        status = proc.wait()
        code = 128 - status if status < 0 else status
        if timed_out:
            code = EXIT_TIMED_OUT
        return code, timed_out

    def _forward_terminal(self, master: int) -> bool:
        """Send what the pty has; False once no writer is left (EIO: every slave closed)."""
        try:
            data = os.read(master, MAX_DATA_SIZE)
        except BlockingIOError:
            return True
        except OSError:  # EIO
            return False
        if not data:
            return False
        self.send_data(KIND_STDOUT, data)
        return True

    def _forward_terminal_counted(self, master: int) -> int:
        """Send what the pty has buffered right now; the number of bytes sent (0: none)."""
        try:
            data = os.read(master, MAX_DATA_SIZE)
        except OSError:  # EAGAIN (nothing buffered) or EIO (no writer left)
            return 0
        if data:
            self.send_data(KIND_STDOUT, data)
        return len(data)

    def _forward_output(self, fd: int, kind: int, sel: selectors.BaseSelector) -> bool:
        try:
            data = os.read(fd, MAX_DATA_SIZE)
        except BlockingIOError:
            return False
        if not data:
            sel.unregister(fd)
            return False
        self.send_data(kind, data)
        return True

    def _push_stdin(
        self, fd: int, pending: bytearray, eof: bool, sel: selectors.BaseSelector
    ) -> int:
        """Write pending stdin without blocking; returns -1 once it should be closed."""
        registered = fd in sel.get_map()
        while pending:
            try:
                n = os.write(fd, pending)
            except BlockingIOError:
                break
            except OSError:  # EPIPE: the command closed its stdin
                pending.clear()
                break
            del pending[:n]
        if pending and not registered:
            sel.register(fd, selectors.EVENT_WRITE)
        elif not pending and registered:
            sel.unregister(fd)
        if not pending and eof:
            if fd in sel.get_map():
                sel.unregister(fd)
            return -1
        return fd


def _write_some(fd: int, pending: bytearray) -> None:
    """Write what the pty takes now; the rest stays in ``pending``."""
    while pending:
        try:
            n = os.write(fd, pending)
        except BlockingIOError:
            return
        except OSError:  # the terminal is gone (the command exited): drop the input
            pending.clear()
            return
        del pending[:n]


def _exec_control(request: Mapping[str, Any], pid: int, master: int) -> None:
    """A control frame the client sent during an exec: kill, signal or resize."""
    op = request.get("op")
    if op == "kill":
        _kill_tree(pid)
    elif op == "signal":
        signum = exec_signal(request.get("signum"))
        if signum is not None:
            _signal_command(pid, master, signum)
    elif op == "resize" and master >= 0:
        _set_terminal_size(master, terminal_size(request.get("rows"), request.get("cols")))


def _op_exec_detached(worker: Worker, request: Mapping[str, Any]) -> bool | None:
    """Start a command that outlives its connection (``corral run -d``): stdin /dev/null,
    stdout and stderr appended to the sandbox's command log, a session of its own; when
    this worker exits it is reparented to the init, which reaps it. Replies ``started``."""
    argv = [str(a) for a in request.get("argv") or []]
    env = dict(worker.config.env)
    env.update({str(k): str(v) for k, v in (request.get("env") or {}).items()})
    env.setdefault("PATH", DEFAULT_PATH)
    cwd = str(request.get("cwd") or worker.config.workdir)
    user_spec = request.get("user") or worker.config.user
    try:
        uid, gid, groups = resolve_user(str(user_spec) if user_spec else None)
    except LookupError:
        worker.error("exec", str(user_spec), kind="bad_user")
        return None
    env.setdefault("HOME", _home_of(uid))
    if not os.path.isdir(cwd):
        worker.error("exec", cwd, kind="cwd_not_found")
        return None
    log = worker.config.command_log
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log if log >= 0 else subprocess.DEVNULL,
            stderr=log if log >= 0 else subprocess.DEVNULL,
            cwd=cwd,
            env=env,
            start_new_session=True,
            user=uid if uid != 0 else None,
            group=gid if gid != 0 else None,
            extra_groups=groups or None,
            close_fds=True,
        )
    except FileNotFoundError:
        worker.error("exec", argv[0] if argv else "", kind="command_not_found")
        return None
    except PermissionError:
        worker.error("exec", argv[0], kind="not_executable")
        return None
    except BlockingIOError:
        worker.error("exec", argv[0], kind="pids_limit")
        return None
    except (OSError, ValueError, IndexError) as e:
        worker.error("exec", argv[0] if argv else "", e if isinstance(e, OSError) else OSError(0, str(e)))
        return None
    _raise_oom_score(proc.pid)
    worker.reply(t="started", pid=proc.pid)
    return None  # the connection stays usable: nothing of the command is tied to it


_HANDLERS: dict[str, Any] = {
    "exec": Worker.op_exec,
    "exec_detached": _op_exec_detached,
    **tree_serve.HANDLERS,
    "read": Worker.op_read,
    "write": Worker.op_write,
    "list": Worker.op_list,
    "stat": Worker.op_stat,
    "exists": Worker.op_exists,
    "mkdir": Worker.op_mkdir,
    "remove": Worker.op_remove,
    "symlink": Worker.op_symlink,
}


#: Bytes of terminal output still forwarded after the command exited: what it wrote just
#: before exiting (a pty buffers a few KiB) and no more, because a background process that
#: keeps the terminal could write forever.
TERMINAL_DRAIN_LIMIT = 4 * MAX_DATA_SIZE

#: TERM of a terminal exec when neither the image nor the exec sets one (as docker -t).
TERMINAL_TYPE = "xterm"


def _spawn(
    argv: list[str],
    cwd: str,
    env: dict[str, str],
    uid: int,
    gid: int,
    groups: list[int],
    want_stdin: bool,
    tty_size: tuple[int, int] | None,
) -> tuple[subprocess.Popen[bytes], int]:
    """Start the command of an exec: (process, pty master or -1).

    With pipes (``tty_size`` None) the command leads a new process group. With a terminal
    it leads a new session whose controlling terminal is a fresh pty of the sandbox's own
    devpts, so the line discipline turns Ctrl-C and Ctrl-Z into signals for its foreground
    process group and a resize into SIGWINCH, as on any terminal.
    """
    ids: dict[str, Any] = {
        "user": uid if uid != 0 else None,
        "group": gid if gid != 0 else None,
        "extra_groups": groups or None,
    }
    if tty_size is None:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if want_stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            process_group=0,
            # No preexec_fn and, for root, no id changes: then CPython spawns with
            # vfork(), which matters because this worker is a copy of a large process.
            close_fds=True,
            **ids,
        )
        return proc, -1
    master, slave = os.openpty()
    try:
        _set_terminal_size(master, tty_size)
        if uid != 0:
            os.fchown(slave, uid, gid)  # the command's user owns its terminal
        env.setdefault("TERM", TERMINAL_TYPE)
        proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=cwd,
            env=env,
            start_new_session=True,
            # preexec_fn rules out vfork: a terminal exec pays for one fork of the worker.
            preexec_fn=_take_controlling_terminal,
            close_fds=True,
            **ids,
        )
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    os.set_blocking(master, False)
    return proc, master


def _take_controlling_terminal() -> None:
    """In the child, after setsid: make the pty on fd 0 the session's controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _set_terminal_size(master: int, size: tuple[int, int]) -> None:
    """TIOCSWINSZ on the pty: the kernel then sends SIGWINCH to its foreground group."""
    rows, cols = size
    with contextlib.suppress(OSError):
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _signal_command(pid: int, master: int, signum: int) -> None:
    """Deliver a forwarded signal as a terminal would: to the terminal's foreground process
    group (the job in front, under a shell), else to the command's own process group."""
    group = pid
    if master >= 0:
        with contextlib.suppress(OSError):
            group = os.tcgetpgrp(master)
    try:
        os.killpg(group, signum)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signum)


def _raise_oom_score(pid: int) -> None:
    """Make a just-started command the OOM killer's choice over the init and workers.

    Done from the worker after the exec: before it the child is non-dumpable like the init
    (so that sandbox processes cannot ptrace the init), which makes its /proc files the
    host root's; after execve an ordinary binary is dumpable and its file is writable here.
    """
    with contextlib.suppress(OSError), open(f"/proc/{pid}/oom_score_adj", "w") as f:
        f.write(str(COMMAND_OOM_SCORE_ADJ))


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _kill_tree(pid: int) -> None:
    """SIGKILL everything an exec started: its process group, and every process that left
    the group (setsid, daemons) but was orphaned below this worker, a child subreaper for
    the duration of the exec. Repeats until nothing is left but the command's own zombie,
    which Popen.wait() reaps."""
    deadline = time.monotonic() + KILL_TREE_TIMEOUT
    while time.monotonic() < deadline:
        _kill_group(pid)
        orphans = [child for child in _children() if child != pid]
        for child in orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        for child in orphans:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child, 0)
        if not orphans and not _live_group_members(pid):
            return
        if not orphans:
            time.sleep(0.001)  # group members still dying; their orphans come to us next


def _children() -> list[int]:
    tid = os.getpid()  # single-threaded: the main thread's id is the pid
    try:
        with open(f"/proc/self/task/{tid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _live_group_members(pgid: int) -> bool:
    """Whether a non-zombie process of process group ``pgid`` exists (in our pid namespace)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = procfs.read_stat(name)
        except (OSError, ValueError):
            continue
        if stat is not None and stat.pgrp == pgid and stat.alive:
            return True
    return False


def _file_info(path: str, st: os.stat_result) -> dict[str, Any]:
    if stat.S_ISREG(st.st_mode):
        kind = "file"
    elif stat.S_ISDIR(st.st_mode):
        kind = "dir"
    elif stat.S_ISLNK(st.st_mode):
        kind = "symlink"
    else:
        kind = "other"
    info: dict[str, Any] = {
        "path": path,
        "name": os.path.basename(path.rstrip("/")) or "/",
        "kind": kind,
        "size": st.st_size,
        "mode": stat.S_IMODE(st.st_mode),
        "mtime": st.st_mtime,
    }
    if kind == "symlink":
        with contextlib.suppress(OSError):
            info["target"] = os.readlink(path)
    return info


# --- users, read as text from the sandbox's own files --------------------------------------------


def _read_db(path: str) -> list[list[str]]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n").split(":") for line in f if line.strip()]
    except OSError:
        return []


def resolve_user(spec: str | None, etc: str = "/etc") -> tuple[int, int, list[int]]:
    """(uid, gid, supplementary gids) for an image User ("name", "uid", "uid:gid", ...).

    Raises LookupError for a name the sandbox's /etc/passwd (or /etc/group) does not have.
    A numeric uid absent from /etc/passwd is fine; its gid is then 0 unless given (both as in
    Docker).
    """
    if not spec:
        return 0, 0, []
    user, _, group = spec.partition(":")
    passwd = _read_db(f"{etc}/passwd")
    uid: int | None = None
    gid: int | None = None
    name: str | None = None
    if user.isdigit():
        uid = int(user)
        for row in passwd:
            if len(row) >= 4 and row[2] == user and row[3].isdigit():
                gid, name = int(row[3]), row[0]
                break
    else:
        for row in passwd:
            if len(row) >= 4 and row[0] == user and row[2].isdigit() and row[3].isdigit():
                uid, gid, name = int(row[2]), int(row[3]), user
                break
        if uid is None:
            raise LookupError(user)
    groups_db = _read_db(f"{etc}/group")
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            found = [r for r in groups_db if len(r) >= 3 and r[0] == group and r[2].isdigit()]
            if not found:
                raise LookupError(group)
            gid = int(found[0][2])
    if gid is None:
        gid = 0
    extra: list[int] = []
    if name is not None:
        for row in groups_db:
            if len(row) >= 4 and row[2].isdigit() and name in row[3].split(","):
                extra.append(int(row[2]))
    return uid, gid, sorted(set(extra) - {gid})


def _home_of(uid: int) -> str:
    for row in _read_db("/etc/passwd"):
        if len(row) >= 6 and row[2] == str(uid) and row[5]:
            return row[5]
    return "/root" if uid == 0 else "/"

