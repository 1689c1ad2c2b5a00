"""Nothing left behind (issue 10, point 1): real signals to `corral run` and to a process
using the SDK, and everything the sandbox held checked gone, thing by thing (tests/support/
leftovers.py). Sandboxes run in the test world's host namespace; some publish a port, so that
"the next identical run fails with port already in use" would show as a port still bound."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

import corral.sync
from corral import NetworkPolicy
from corral.runtime import state
from tests.integration.lifecycle_support import (  # noqa: F401 - fixtures
    ROOT,
    corral_cli,
    corral_home_fixture,
    image_fixture,
    in_world_fixture,
    unique,
)
from tests.support.leftovers import Footprint
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.usefixtures("in_world"), pytest.mark.timeout(300)]

#: Seconds a sandbox may take to come up on this loaded 2-core machine.
START_TIMEOUT = 60.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 of the world's host namespace (where -p binds)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class RunningCli:
    """`corral run ...` as a user starts it, with its stdout read line by line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corral.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            cwd=str(ROOT),
        )
        self.lines: list[bytes] = []
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self._buffer = b""

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with contextlib.suppress(BlockingIOError, TypeError):
            chunk = self.proc.stdout.read()
            if chunk:
                self._buffer += chunk
        *done, self._buffer = self._buffer.split(b"\n")
        self.lines += done

    def wait_line(self, text: bytes, timeout: float = START_TIMEOUT) -> None:
        def seen() -> bool:
            self._read()
            if self.proc.poll() is not None and not any(text in line for line in self.lines):
                stderr = self.proc.stderr.read() if self.proc.stderr else b""
                raise AssertionError(f"corral exited {self.proc.returncode}: {stderr!r}")
            return any(text in line for line in self.lines)

        wait_for(seen, timeout=timeout, what=f"{text!r} from the command")

    def finish(self, timeout: float = 60.0) -> tuple[int, bytes, bytes]:
        code = self.proc.wait(timeout)
        self._read()
        out = b"\n".join(self.lines) + self._buffer
        err = self.proc.stderr.read() if self.proc.stderr else b""
        return code, out, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@contextlib.contextmanager
def cli_run(*args: str) -> Iterator[RunningCli]:
    run = RunningCli("run", *args)
    try:
        yield run
    finally:
        run.kill()
        name = args[args.index("--name") + 1] if "--name" in args else None
        if name and state.sandbox_dir(name).exists():
            corral_cli("rm", "-f", name)


def footprint_when_running(name: str) -> Footprint:
    wait_for(lambda: state.status(state.sandbox_dir(name)) == state.RUNNING,
             timeout=START_TIMEOUT, what=f"sandbox {name} to run")  # fmt: skip
    return Footprint.of(name)


TRAP_ALL = 'for s in TERM HUP INT; do trap "echo got-$s; exit 3" $s; done'


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_to_run_reaches_the_command_and_the_sandbox_goes(
    image: str, signum: signal.Signals
) -> None:
    name, port = unique("sig"), free_port()
    script = f"{TRAP_ALL}; echo ready; while :; do sleep 1; done"
    with cli_run("--name", name, "--net", "public-only", "-p", f"{port}:8080", image,
                 "--", "sh", "-c", script) as run:  # fmt: skip
        run.wait_line(b"ready")
        footprint = footprint_when_running(name)
        assert len(footprint.things()) >= 8  # dir, supervisor, init, cgroups, netns, ...
        assert not port_is_free(port)
        run.proc.send_signal(signum)
        code, out, err = run.finish()
    # The command got the signal (its trap ran) and its exit code is corral's.
    assert f"got-{signum.name[3:]}".encode() in out, (out, err)
    assert code == 3, err
    footprint.wait_gone()
    assert port_is_free(port)


def test_a_command_killed_by_the_forwarded_signal_gives_128_plus_n(image: str) -> None:
    name = unique("sigdef")
    with cli_run("--name", name, "--net", "none", image,
                 "--", "sh", "-c", "echo ready; exec sleep 1000") as run:  # fmt: skip
        run.wait_line(b"ready")
        footprint = footprint_when_running(name)
        run.proc.send_signal(signal.SIGTERM)
        code, _out, err = run.finish()
    assert code == 128 + signal.SIGTERM, err
    footprint.wait_gone()


def test_a_second_signal_kills_the_command(image: str) -> None:
    """The command survives the first SIGTERM (its trap says so and it carries on); the
    SIGINT after it kills everything and corral exits 128+SIGINT."""
    name = unique("sig2")
    script = "trap 'echo got-first' TERM; echo ready; while :; do sleep 1; done"
    with cli_run("--name", name, "--net", "none", image, "--", "sh", "-c", script) as run:
        run.wait_line(b"ready")
        footprint = footprint_when_running(name)
        run.proc.send_signal(signal.SIGTERM)
        run.wait_line(b"got-first")
        assert run.proc.poll() is None
        run.proc.send_signal(signal.SIGINT)
        code, _out, err = run.finish()
    assert code == 128 + signal.SIGINT, err
    footprint.wait_gone()


def test_sigkill_of_run_still_leaves_nothing(image: str) -> None:
    """SIGKILL cannot be caught: the supervisor sees its creator die (auto_remove)."""
    name, port = unique("sig9"), free_port()
    with cli_run("--name", name, "--net", "public-only", "-p", f"{port}:8080", image,
                 "--", "sh", "-c", "echo ready; exec sleep 1000") as run:  # fmt: skip
        run.wait_line(b"ready")
        footprint = footprint_when_running(name)
        run.proc.kill()
        assert run.proc.wait(30) == -signal.SIGKILL
    footprint.wait_gone()
    assert port_is_free(port)


def test_a_signal_while_the_sandbox_starts_leaves_nothing(image: str) -> None:
    """SIGTERM as soon as the sandbox's directory exists (its create is under way): corral
    exits 128+15 and takes the sandbox down, wherever the start had got to."""
    name = unique("sigstart")
    with cli_run("--name", name, "--net", "public-only", image, "--", "sleep", "1000") as run:
        wait_for(lambda: state.sandbox_dir(name).exists() or run.proc.poll() is not None,
                 timeout=START_TIMEOUT, what="the create to begin")  # fmt: skip
        run.proc.send_signal(signal.SIGTERM)
        code, _out, err = run.finish()
    assert code == 128 + signal.SIGTERM, err
    wait_for(lambda: not state.sandbox_dir(name).exists(), timeout=60, what="its directory to go")


def test_keep_survives_a_signal_and_says_so(image: str) -> None:
    name = unique("sigkeep")
    try:
        with cli_run("--keep", "--name", name, "--net", "none", image,
                     "--", "sh", "-c", "echo ready; exec sleep 1000") as run:  # fmt: skip
            run.wait_line(b"ready")
            run.proc.send_signal(signal.SIGTERM)
            code, _out, err = run.finish()
            assert code == 128 + signal.SIGTERM
            assert f"kept sandbox '{name}'".encode() in err
            assert state.status(state.sandbox_dir(name)) == state.RUNNING
    finally:
        corral_cli("rm", "-f", name)


# -- a process using the SDK ---------------------------------------------------------------

SDK_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import corral.sync
    from corral import NetworkPolicy
    image, offline, networked, kept, port = sys.argv[1:6]
    corral.sync.Sandbox.create(offline, image=image, network=NetworkPolicy.none(),
                               auto_remove=True)
    corral.sync.Sandbox.create(networked, image=image, network=NetworkPolicy.public_only(),
                               ports={int(port): 8080}, auto_remove=True)
    corral.sync.Sandbox.create(kept, image=image, network=NetworkPolicy.none())
    print("ready", flush=True)
    time.sleep(1000)
    """
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGKILL])
def test_auto_remove_sandboxes_go_when_their_sdk_process_is_signalled(
    image: str, signum: signal.Signals
) -> None:
    """Nobody removes them but their supervisors, which watch the creator through a pidfd;
    the sandbox created without auto_remove outlives the process, as it always did."""
    offline, networked, kept = unique("sdkoff"), unique("sdknet"), unique("sdkkeep")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", SDK_SCRIPT, image, offline, networked, kept, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=str(ROOT),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == b"ready\n", proc.stderr.read() if proc.stderr else b""
        footprints = [Footprint.of(offline), Footprint.of(networked)]
        counted = sum(len(f.things()) for f in footprints)
        assert counted >= 12
        assert not port_is_free(port)
        proc.send_signal(signum)
        proc.wait(60)
        for footprint in footprints:
            footprint.wait_gone()
        assert sum(len(f.remaining()) for f in footprints) == 0
        assert port_is_free(port)
        assert state.status(state.sandbox_dir(kept)) == state.RUNNING
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        for name in (offline, networked, kept):
            if state.sandbox_dir(name).exists():
                corral_cli("rm", "-f", name)


def test_auto_remove_sandbox_is_removed_when_it_stops(image: str) -> None:
    sb = corral.sync.Sandbox.create(
        unique("autostop"), image=image, network=NetworkPolicy.none(), auto_remove=True
    )
    try:
        footprint = Footprint.of(sb.name)
        assert sb.info()["auto_remove"] is True
        assert sb.exec("true").exit_code == 0
        started = time.monotonic()
        sb.stop()
        assert not sb.directory.exists()  # gone when stop() returns
        footprint.wait_gone(timeout=max(1.0, 60 - (time.monotonic() - started)))
    finally:
        if sb.directory.exists():
            sb.remove()


def test_auto_remove_is_a_bool(image: str) -> None:
    from corral.errors import ConfigError

    with pytest.raises(ConfigError, match="auto_remove"):
        corral.sync.Sandbox.create(unique("autobad"), image=image,
                                   network=NetworkPolicy.none(), auto_remove="yes")  # type: ignore[arg-type]  # fmt: skip
