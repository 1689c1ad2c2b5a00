"""The per-sandbox supervisor: ``python -m corral.lifecycle.supervisor <state_dir>``.

One supervisor process owns one sandbox for its whole life (SPEC section 5): it launches the
sandbox's init, runs its network data path, answers the control socket, and on ``stop`` (or
SIGTERM, or the init dying) releases everything and writes the ``stopped`` marker. There is no
global daemon; ``corral gc`` cleans up after a supervisor that died without doing so.

Start-up is on the path of every ``Sandbox.create``, and this machine's interpreter needs
about 11 ms to start and 5-20 ms more for each of ``typing``, ``dataclasses``, ``re``, ``enum``
or ``asyncio``. So this module imports only builtin C modules at the top (``_socket``,
``_signal``, ``select``, the lean JSON of :mod:`corral.runtime.leanjson`), and the control loop
is a plain ``epoll`` loop. Only a sandbox that has a network pays for ``asyncio``: its data path
runs on an asyncio loop in a second thread, started after ``launch()`` forked the init (forking
from a threaded process is what the launcher must not do).

Steps, in order (each failure is one sentence sent to the creator over the ready pipe):
    1. write ``supervisor.pid`` (pid + start time, so gc can tell a dead supervisor from a live
       one even after pid reuse);
    2. read ``state.json``;
    3. reserve the network (netns, addresses) unless the sandbox is offline;
    4. ``launch()`` the init into the rootfs (and the netns);
    5. start the network data path (thread with an asyncio loop);
    6. listen on ``control.sock`` and report ``ready`` on the pipe whose fd is in
       ``CORRAL_READY_FD``;
    7. serve until ``stop``, SIGTERM/SIGINT, or the init exiting; then stop the init (grace,
       then kill), close the network, remove the socket, write ``stopped``.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # no stub; ``signal`` would import enum
import _socket
import os
import select
import sys
import time

from corral.errors import CorralError, StartError
from corral.kernel import procfs
from corral.kernel.files import replace_file
from corral.runtime import control, leanjson

TYPE_CHECKING = False
if TYPE_CHECKING:
    from corral.runtime.launcher import Launched, Zygote

#: Environment variable carrying the fd of the pipe the creator waits on for "ready".
READY_FD_ENV = "CORRAL_READY_FD"

#: Argument that makes this program serve as the SDK process's fork server instead
#: (see corral.lifecycle.forkserver).
FORK_SERVER_ARG = "--fork-server"

#: Connections the control socket queues before accept: a handful of CLI/SDK clients.
CONTROL_BACKLOG = 16

#: Concurrent control connections served; more are refused so a stuck client cannot grow
#: the supervisor's memory without bound.
MAX_CONTROL_CLIENTS = 64

#: Bytes read from a control connection at once (requests are tens of bytes).
CONTROL_READ_SIZE = 65536

#: Seconds the network data path gets to start or close before the supervisor gives up.
NETWORK_START_TIMEOUT = 30.0
NETWORK_CLOSE_TIMEOUT = 10.0

#: Processes a sandbox may run at once unless its state says otherwise: a fork bomb stops
#: here, while builds with many parallel jobs (make -j, npm) stay far below it.
DEFAULT_PIDS_MAX = 4096


def _optional_int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def _optional_float(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def _log(message: str) -> None:
    """One line to supervisor.log (our stderr), timestamped for post-mortems."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    sys.stderr.write(f"{stamp} supervisor[{os.getpid()}]: {message}\n")
    sys.stderr.flush()


class NetworkThread:
    """The sandbox's network data path on an asyncio loop in its own thread."""

    def __init__(self, network: object) -> None:
        import asyncio
        import threading

        self._asyncio = asyncio
        self._network = network
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="corral-net", daemon=True)

    def begin(self) -> None:
        """Start the thread (the data path starts on it); :meth:`start` waits for it."""
        if not self._thread.is_alive() and not self._started.is_set():
            self._thread.start()

    def idle(self) -> None:
        """Block until the thread holds nothing: its start is over and it waits on its loop
        (or, after a failed start, it has ended). launch()'s before_fork."""
        if self._thread.is_alive() or self._started.is_set():
            self._started.wait(NETWORK_START_TIMEOUT)
            if self._start_error is not None:
                self._thread.join(NETWORK_CLOSE_TIMEOUT)

    def start(self) -> None:
        self.begin()
        if not self._started.wait(NETWORK_START_TIMEOUT):
            raise StartError(
                f"network: the data path did not start within {NETWORK_START_TIMEOUT:g} s"
            )
        if self._start_error is not None:
            error = self._start_error
            if isinstance(error, CorralError):
                raise error
            raise StartError(f"network: starting the data path failed: {error}")

    def _run(self) -> None:
        self._asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = self._asyncio.get_running_loop()
        self._stop_event = self._asyncio.Event()
        try:
            try:
                await self._network.start()  # type: ignore[attr-defined]
            except BaseException as exc:  # reported to the main thread, which fails the start
                self._start_error = exc
                return
            finally:
                self._started.set()
            await self._stop_event.wait()
        finally:
            # On the loop that started them: proxies and listeners belong to this loop. The
            # veth goes with the namespace once the init is gone, and the sockets whose
            # close waits for the kernel stay open until this process exits, after the
            # stop has been answered (see SandboxNetwork.close, linger).
            try:
                await self._network.close(linger=True)  # type: ignore[attr-defined]
            except BaseException as exc:
                _log(f"closing the network failed: {exc!r}")

    def close(self) -> None:
        """Stop serving and release the network (netns, veth, nft table, listeners)."""
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None and self._thread.is_alive():
            loop.call_soon_threadsafe(event.set)
        self._thread.join(NETWORK_CLOSE_TIMEOUT)
        if self._thread.is_alive():
            _log(f"the network did not close within {NETWORK_CLOSE_TIMEOUT:g} s")


class Supervisor:
    """The state of one supervisor run; :meth:`run` is steps 1-7 of the module docstring."""

    def __init__(
        self, state_dir: str, ready_fd: int, released_fd: int = -1, zygote: Zygote | None = None
    ) -> None:
        self.state_dir = state_dir
        self.ready_fd = ready_fd
        #: The fork server's pipe (corral.lifecycle.forkserver): told once the start is over,
        #: so that the server forks its next spare only then, not beside this launch.
        self.released_fd = released_fd
        #: Stage A made ahead of time by the fork server's spare (launcher.Zygote); used up
        #: by launch(), discarded if the start fails before it.
        self.zygote = zygote
        self.state: dict[str, object] = {}
        self.network: object | None = None
        self.network_thread: NetworkThread | None = None
        self.launched: Launched | None = None
        self.listener: _socket.socket | None = None
        self.control_path = os.path.join(state_dir, "control.sock")
        self.stop_reason: str | None = None
        self.stop_timeout = control.DEFAULT_STOP_TIMEOUT
        self.stop_waiters: list[_socket.socket] = []
        self.signal_pipe: tuple[int, int] | None = None
        self.launch_ms = 0.0

    # -- start ------------------------------------------------------------------------------
    def run(self) -> int:
        started = time.monotonic()
        replace_file(
            os.path.join(self.state_dir, "supervisor.pid"),
            f"{os.getpid()} {procfs.own_start_time()}\n".encode(),
        )
        self._install_signals()
        try:
            self._start()
        except BaseException as exc:
            message = str(exc) if isinstance(exc, CorralError) else f"supervisor: {exc!r}"
            _log(f"start failed: {message}")
            self._release()
            self._finish(f"failed to start: {message}")
            kind = type(exc).__name__ if isinstance(exc, CorralError) else "SandboxError"
            self._report(f"error\t{kind}\t{message}")
            return 1
        _log(
            f"ready: init pid {self._init_pid()} after {(time.monotonic() - started) * 1000:.1f} ms"
            f" (launch {self.launch_ms:.1f} ms)"
        )
        self._report(
            "ok\t"
            + leanjson.dumps(
                {
                    "init_pid": self._init_pid(),
                    "channel_path": str(getattr(self.launched, "channel_path", "")),
                    "cgroup": " ".join(
                        str(p) for p in getattr(getattr(self.launched, "cgroup", None), "paths", ())
                    ),
                    "netns_path": getattr(self.network, "netns_path", None),
                    "published": self._published(),
                }
            )
        )
        self._serve()
        self._release()
        self._finish(self.stop_reason or "stopped")
        if self.state.get("auto_remove"):
            self._remove_self()
        for client in self.stop_waiters:
            try:
                client.setblocking(True)
                client.sendall(control.encode(control.ok_reply(stopped=True)))
            except OSError:
                pass
            client.close()
        return 0

    def _start(self) -> None:
        try:
            with open(os.path.join(self.state_dir, "state.json")) as f:
                loaded = leanjson.loads(f.read())
        except (OSError, ValueError) as exc:
            raise StartError(f"state: cannot read {self.state_dir}/state.json: {exc}") from None
        if not isinstance(loaded, dict):
            raise StartError(f"state: {self.state_dir}/state.json is not a JSON object")
        self.state = loaded
        name = str(loaded["name"])
        hosts: list[tuple[str, str]] = []
        resolv_conf = None
        netns_path = None
        if not loaded.get("offline", True):
            self.network = self._reserve_network(name)
            netns_path = self.network.netns_path  # type: ignore[attr-defined]
            hosts = list(self.network.hosts_entries())  # type: ignore[attr-defined]
            resolv_conf = self.network.resolv_conf()  # type: ignore[attr-defined]
        from pathlib import Path

        from corral.runtime.launcher import LaunchSpec, launch
        from corral.runtime.volumes import Volume

        env = loaded.get("env") or {}
        assert isinstance(env, dict)
        trust_files: dict[str, bytes] = {}
        if self.network is not None:
            # TLS interception: the sandbox's CA (never its key) into the guest's trust
            # bundles and the variables that point at them (docs/network.md "TLS").
            trust_files = self.network.guest_files(Path(str(loaded["rootfs"])))  # type: ignore[attr-defined]
            env = {**env, **self.network.guest_environment()}  # type: ignore[attr-defined]
        spec = LaunchSpec(
            name=name,
            rootfs=Path(str(loaded["rootfs"])),
            state_dir=Path(self.state_dir),
            netns_path=netns_path,
            env={str(k): str(v) for k, v in env.items()},
            workdir=str(loaded.get("workdir") or "/"),
            user=str(loaded.get("user") or "0"),
            cpus=_optional_float(loaded.get("cpus")),
            memory=_optional_int(loaded.get("memory")),
            pids_max=_optional_int(loaded.get("pids_max")) or DEFAULT_PIDS_MAX,
            hosts=hosts,
            resolv_conf=resolv_conf,
            extra_files=trust_files,
            hostname=str(loaded["hostname"]) if loaded.get("hostname") else None,
            volumes=[Volume.from_wire(v) for v in loaded.get("volumes") or ()],
        )
        launch_start = time.monotonic()
        zygote, self.zygote = self.zygote, None
        if self.network is not None:
            self.network_thread = NetworkThread(self.network)
            if zygote is not None:
                # A launch with a zygote forks nothing in this process (the zygote forks the
                # init), so the data path may start beside it: its link, proxies and table
                # are made while the launch waits for the sandbox's mounts.
                self.network_thread.begin()
        self.launched = launch(
            spec,
            zygote,
            cgroup_done=self._release_fork_server,
            before_fork=None if self.network_thread is None else self.network_thread.idle,
        )
        self.launch_ms = (time.monotonic() - launch_start) * 1000
        if self.network_thread is not None:
            self.network_thread.start()
        self._listen()

    def _reserve_network(self, name: str) -> object:
        from corral.config import NetworkConfig
        from corral.net.datapath import SandboxNetwork

        network = self.state.get("network") or {}
        assert isinstance(network, dict)
        config = NetworkConfig.from_dict(network)
        from pathlib import Path

        from corral.net.secret_handoff import secret_table, take_handoff

        # Secret values: from the creator's hand-off into this process's memory only.
        secrets = secret_table(
            list(self.state.get("secrets") or ()),  # type: ignore[call-overload]
            take_handoff(Path(self.state_dir)),
            config.on_secret_violation,
        )
        network = SandboxNetwork.reserve(name, config, Path(self.state_dir), secrets=secrets)
        network.on_terminate = self._terminate_for_network
        summary = network.tls_summary()
        if summary is not None:
            from corral.net.secret_handoff import write_tls_summary

            write_tls_summary(Path(self.state_dir), summary)
        return network

    def _terminate_for_network(self, reason: str) -> None:
        """A secret's block-and-terminate fired (called on the network thread): stop the
        whole sandbox now. The serve loop wakes on the signal pipe and finds the reason."""
        if self.stop_reason is None:
            self.stop_reason = reason
        if self.signal_pipe is not None:
            try:  # noqa: SIM105 - contextlib is not on the lean import path
                os.write(self.signal_pipe[1], b"t")
            except OSError:
                pass

    def _listen(self) -> None:
        try:  # noqa: SIM105 - contextlib is not on the lean import path
            os.unlink(self.control_path)
        except FileNotFoundError:
            pass
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o077)  # the socket is as private as the state directory
        try:
            sock.bind(self.control_path)
        finally:
            os.umask(old_umask)
        sock.listen(CONTROL_BACKLOG)
        sock.setblocking(False)
        self.listener = sock

    def _install_signals(self) -> None:
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.signal_pipe = (read_end, write_end)
        _signal.set_wakeup_fd(write_end)
        for signum in (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP):
            _signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.stop_reason is None:
            self.stop_reason = f"stopped by signal {signum}"

    def _report(self, line: str) -> None:
        if self.ready_fd < 0:
            return
        try:
            os.write(self.ready_fd, (line.replace("\n", " ") + "\n").encode())
        except OSError:
            pass  # the creator is gone; the sandbox stays up and reachable through get()
        finally:
            os.close(self.ready_fd)
            self.ready_fd = -1
            self._release_fork_server()

    def _release_fork_server(self) -> None:
        """Tell the fork server it may fork its next spare now (once; see forkserver.serve).

        Called when the launch is past its cgroup steps: the next spare moves its zygote
        into a cgroup, which holds the kernel's cgroup lock for an RCU grace period, and this
        launch's own cgroup steps (and this sandbox's rmdir at stop) must not wait for that.
        """
        if self.released_fd >= 0:
            try:  # noqa: SIM105 - contextlib is not on the lean import path
                os.write(self.released_fd, b"r")
            except OSError:
                pass
            os.close(self.released_fd)
            self.released_fd = -1

    def _published(self) -> list[dict[str, object]]:
        """The published ports as bound (random host ports resolved), for state.json."""
        ports = getattr(self.network, "published_ports", None)
        if ports is None:
            return []
        return [
            {"bind": bind, "host_port": host, "guest_port": guest, "protocol": proto}
            for bind, host, guest, proto in ports()
        ]

    def _init_pid(self) -> int:
        return int(getattr(self.launched, "init_pid", 0) or 0)

    # -- serve ------------------------------------------------------------------------------
    def _serve(self) -> None:
        assert self.listener is not None and self.signal_pipe is not None
        poller = select.epoll()
        poller.register(self.listener.fileno(), select.EPOLLIN)
        poller.register(self.signal_pipe[0], select.EPOLLIN)
        pidfd = -1
        try:
            pidfd = os.pidfd_open(self._init_pid())
            poller.register(pidfd, select.EPOLLIN)
        except (OSError, ValueError):
            self.stop_reason = self.stop_reason or "the sandbox's init was gone at start"
        creator_fd = self._watch_creator(poller)
        clients: dict[int, tuple[_socket.socket, control.LineDecoder]] = {}
        while self.stop_reason is None:
            try:
                events = poller.poll()
            except InterruptedError:
                continue
            for fd, _mask in events:
                if fd == self.listener.fileno():
                    self._accept(poller, clients)
                elif fd == self.signal_pipe[0]:
                    try:  # noqa: SIM105 - contextlib is not on the lean import path
                        os.read(fd, 512)
                    except BlockingIOError:
                        pass
                elif fd == pidfd:
                    self.stop_reason = self.stop_reason or "the sandbox's init exited"
                elif fd == creator_fd:
                    self.stop_reason = self.stop_reason or self._creator_gone()
                elif fd in clients:
                    self._on_client(fd, poller, clients)
        if pidfd >= 0:
            os.close(pidfd)
        if creator_fd >= 0:
            os.close(creator_fd)
        for fd, (sock, _decoder) in clients.items():
            if sock not in self.stop_waiters:
                sock.close()
            poller.unregister(fd)
        poller.close()

    def _watch_creator(self, poller: select.epoll) -> int:
        """A pidfd of the process that created an ``auto_remove`` sandbox, registered with
        ``poller`` (it turns readable when that process exits); -1 when there is nothing to
        watch. A creator that is already gone (or whose pid now names another process: the
        start time differs) stops the sandbox at once."""
        creator = self.state.get("creator")
        if not self.state.get("auto_remove") or not isinstance(creator, list) or len(creator) != 2:
            return -1
        pid, start_time = int(creator[0]), int(creator[1])
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            self.stop_reason = self.stop_reason or self._creator_gone()
            return -1
        # Checked after opening: the pidfd then names this very process for good.
        if procfs.live_start_time(pid) != start_time:
            os.close(fd)
            self.stop_reason = self.stop_reason or self._creator_gone()
            return -1
        poller.register(fd, select.EPOLLIN)
        return fd

    def _creator_gone(self) -> str:
        creator = self.state.get("creator")
        pid = creator[0] if isinstance(creator, list) and creator else "?"
        return f"auto_remove: the process that created it (pid {pid}) exited"

    def _remove_self(self) -> None:
        """Delete this sandbox's directory (``auto_remove``), under the name's lock.

        The directory is renamed into the trash at once (the name is free when this
        supervisor exits) and deleted by a detached child at low priority, so that a
        ``remove()`` waiting for this process does not also wait for the writable layer's
        deletion. gc deletes what a killed deleter left in the trash.
        """
        from pathlib import Path

        from corral.kernel.mountinfo import mounts_under
        from corral.lifecycle import gc
        from corral.runtime import state

        directory = Path(self.state_dir)
        name = str(self.state.get("name"))
        try:
            if state.sandbox_dir(name) != directory:
                _log(f"auto_remove: {directory} is not where CORRAL_HOME keeps {name!r}; kept")
                return
            with state.name_lock(name):
                recorded = state.read_supervisor_pid(directory)
                if recorded is None or recorded[0] != os.getpid():
                    return  # removed already, or the name went to a new sandbox
                for point in mounts_under(directory):
                    gc.unmount(point)
                trash = directory.parent / gc.TRASH_DIR
                trash.mkdir(mode=0o700, exist_ok=True)
                target = trash / f"{directory.name}.{os.getpid()}.{os.urandom(4).hex()}"
                directory.rename(target)
        except (OSError, CorralError) as exc:
            _log(f"auto_remove: removing {directory} failed: {exc}")
            return
        _delete_detached(str(target))

    def _accept(
        self, poller: select.epoll, clients: dict[int, tuple[_socket.socket, control.LineDecoder]]
    ) -> None:
        assert self.listener is not None
        try:
            fd, _addr = self.listener._accept()  # type: ignore[attr-defined]
        except BlockingIOError:
            return
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM, fileno=fd)
        if len(clients) >= MAX_CONTROL_CLIENTS:
            sock.close()
            return
        sock.setblocking(False)
        clients[fd] = (sock, control.LineDecoder())
        poller.register(fd, select.EPOLLIN)

    def _on_client(
        self,
        fd: int,
        poller: select.epoll,
        clients: dict[int, tuple[_socket.socket, control.LineDecoder]],
    ) -> None:
        sock, decoder = clients[fd]
        try:
            data = sock.recv(CONTROL_READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        replies: list[dict[str, object]] = []
        if data:
            try:
                for message in decoder.feed(data):
                    reply = self._handle(message, sock)
                    if reply is not None:
                        replies.append(reply)
            except control.ControlProtocolError as exc:
                replies.append(control.error_reply(str(exc)))
                data = b""  # a peer that broke the protocol is disconnected
        try:
            if replies:
                sock.setblocking(True)
                sock.settimeout(1.0)  # a client that does not read its reply is dropped
                sock.sendall(b"".join(control.encode(r) for r in replies))
                sock.setblocking(False)
        except OSError:
            data = b""
        if not data and sock not in self.stop_waiters:
            poller.unregister(fd)
            del clients[fd]
            sock.close()

    def _handle(self, message: dict[str, object], sock: _socket.socket) -> dict[str, object] | None:
        try:
            op, args = control.parse_request(message)
        except control.ControlProtocolError as exc:
            return control.error_reply(str(exc))
        if op == control.OP_INFO:
            return control.ok_reply(
                name=self.state.get("name"),
                supervisor_pid=os.getpid(),
                init_pid=self._init_pid(),
                init_alive=bool(self.launched is not None and self.launched.alive()),
                network=self.network is not None,
            )
        timeout = args["timeout"]
        assert isinstance(timeout, float)
        self.stop_timeout = timeout
        self.stop_reason = self.stop_reason or "stopped on request"
        self.stop_waiters.append(sock)
        return None  # answered once everything is released

    # -- stop -------------------------------------------------------------------------------
    def _release(self) -> None:
        """Undo whatever of steps 3-6 happened; each part is attempted even if one fails.

        Logs how long the init's stop and the network's release took (bench/startup_bench.py
        reads that line, as it reads "ready")."""
        started = time.monotonic()
        init_ms = network_ms = 0.0
        if self.zygote is not None:  # the start failed before launch()
            self.zygote.discard()
            self.zygote = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            try:  # noqa: SIM105 - contextlib is not on the lean import path
                os.unlink(self.control_path)
            except FileNotFoundError:
                pass
        if self.launched is not None:
            try:
                from corral.runtime.launcher import stop

                stop(self.launched, grace=self.stop_timeout)
            except BaseException as exc:
                _log(f"stopping the sandbox's init failed: {exc!r}")
            init_ms = (time.monotonic() - started) * 1000
        network_started = time.monotonic()
        if self.network_thread is not None:
            self.network_thread.close()
        elif self.network is not None:
            import asyncio

            try:
                asyncio.run(self.network.close(linger=True))  # type: ignore[attr-defined]
            except BaseException as exc:
                _log(f"releasing the network failed: {exc!r}")
        if self.network is not None:
            network_ms = (time.monotonic() - network_started) * 1000
        _log(
            f"released after {(time.monotonic() - started) * 1000:.1f} ms"
            f" (init {init_ms:.1f} ms, network {network_ms:.1f} ms)"
        )

    def _finish(self, reason: str) -> None:
        replace_file(os.path.join(self.state_dir, "stopped"), (reason + "\n").encode())
        _log(reason)


#: Nice value of the process that deletes an auto-removed sandbox's directory: nobody waits
#: for it, while the next create usually does (as gc.DELETER_NICE).
DELETER_NICE = 19

#: Upper bound of the descriptors the deleter closes (os.closerange; a supervisor has tens).
MAX_FD = 65536


def _delete_detached(path: str) -> None:
    """Delete the tree at ``path`` in a child that outlives this process (best effort)."""
    try:
        pid = os.fork()
    except OSError:
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        return
    if pid == 0:
        try:
            import shutil

            # Nothing of this process's: the data path's lingering sockets (see
            # SandboxNetwork.close) must close when the supervisor exits, not with this.
            os.closerange(3, MAX_FD)
            os.setsid()
            os.nice(DELETER_NICE)
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os._exit(0)


def main(argv: list[str] | None = None) -> int:
    """Run one supervisor (``STATE_DIR``) or the fork server (``--fork-server FD``).

    Exits with ``os._exit``: the interpreter's teardown (tens of ms with the launcher's
    modules loaded) would only delay the ``remove`` that waits for this process to end.
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == FORK_SERVER_ARG:
        import socket

        from corral.lifecycle import forkserver

        status = forkserver.serve(socket.socket(fileno=int(args[1])))
    elif len(args) == 1:
        ready_fd = int(os.environ.pop(READY_FD_ENV, "-1"))
        status = Supervisor(os.path.abspath(args[0]), ready_fd).run()
    else:
        sys.stderr.write("usage: python -m corral.lifecycle.supervisor STATE_DIR\n")
        status = 2
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
