"""A real terminal (issue 10, point 3): the `pty` module plays the user's terminal around
`corral run -it IMAGE sh` and `corral exec -it`, and the SDK's `tty=True`.

The shell is busybox ash: it shows a prompt and does job control on its terminal, so
Ctrl-C and Ctrl-Z reach `sleep` only if they arrive as keystrokes on a pty whose foreground
process group is the job's. (ash also asks the terminal where the cursor is, ``ESC[6n``;
this terminal does not answer, as a dumb one would not: ash then carries on. An answer that
arrives together with the next keystrokes makes ash drop those keystrokes, which a person
typing never provokes but a test would.)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator

import pytest

import corral.sync
from corral import NetworkPolicy
from corral.errors import ConfigError
from tests.integration.lifecycle_support import (  # noqa: F401 - fixtures
    ROOT,
    corral_cli,
    corral_home_fixture,
    image_fixture,
    in_world_fixture,
    unique,
)

pytestmark = [pytest.mark.usefixtures("in_world"), pytest.mark.timeout(300)]

#: Seconds to wait for an expected piece of terminal output (a create included).
OUTPUT_TIMEOUT = 60.0


def set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class Terminal:
    """The master side of a pty whose slave is corral's controlling terminal."""

    def __init__(self, argv: list[str], rows: int = 30, cols: int = 100) -> None:
        self.master, self.slave = os.openpty()
        set_size(self.master, rows, cols)
        self.saved = termios.tcgetattr(self.slave)
        self.proc = subprocess.Popen(
            argv,
            stdin=self.slave,
            stdout=self.slave,
            stderr=self.slave,
            start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
            cwd=str(ROOT),
        )
        self.seen = b""

    def expect(self, pattern: bytes, timeout: float = OUTPUT_TIMEOUT) -> bytes:
        """Read until ``pattern`` shows up after what earlier calls consumed."""
        deadline = time.monotonic() + timeout
        while pattern not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} on the terminal; it shows {self.seen!r}")
            ready, _, _ = select.select([self.master], [], [], left)
            if not ready:
                continue
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: every slave is closed
                data = b""
            if not data:
                raise AssertionError(f"the terminal closed before {pattern!r}: {self.seen!r}")
            self.seen += data
        before, _, self.seen = self.seen.partition(pattern)
        return before

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def resize(self, rows: int, cols: int) -> None:
        set_size(self.master, rows, cols)  # the kernel sends SIGWINCH to corral

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        os.close(self.master)
        os.close(self.slave)


@contextlib.contextmanager
def terminal(*args: str, rows: int = 30, cols: int = 100) -> Iterator[Terminal]:
    term = Terminal([sys.executable, "-m", "corral.cli", *args], rows, cols)
    try:
        yield term
    finally:
        term.close()


PROMPT = b"/ # "


def shell_session(term: Terminal) -> None:
    """The checks a user would make in a shell on the sandbox's terminal, then exit 5."""
    term.expect(PROMPT)
    term.type(b"tty; stty size\r")
    term.expect(b"/dev/pts/0\r\n")
    term.expect(b"30 100\r\n")  # the window size of our terminal
    term.expect(PROMPT)
    term.resize(50, 132)
    term.type(b"stty size\r")
    term.expect(b"50 132\r\n")  # the resize was carried to the sandbox's pty
    term.expect(PROMPT)
    term.type(b"sleep 1000\r")
    # Keys typed before the job runs would reach the shell's line editor, not the job:
    # press Ctrl-C when sleep is there, as a person would.
    wait_for_process("sleep", "1000")
    term.type(b"\x03")  # Ctrl-C, a byte like any other in raw mode
    term.expect(PROMPT)
    term.type(b"echo rc=$?\r")
    term.expect(b"rc=130\r\n")  # sleep died of SIGINT; the shell did not
    term.expect(PROMPT)
    term.type(b"sleep 1001\r")
    wait_for_process("sleep", "1001")
    term.type(b"\x1a")  # Ctrl-Z
    term.expect(b"Stopped")
    wait_for_process("sleep", "1001", state="T")
    term.expect(PROMPT)
    term.type(b"fg\r")  # back in front, running again
    wait_for_process("sleep", "1001", state="S")
    term.type(b"\x03")
    term.expect(PROMPT)
    term.type(b"echo rc=$?\r")
    term.expect(b"rc=130\r\n")
    term.expect(PROMPT)
    term.type(b"exit 5\r")


def test_run_it_gives_a_shell_a_real_terminal(image: str) -> None:
    name = unique("tty")
    with terminal("run", "-it", "--name", name, "--net", "none", image, "--", "sh") as term:
        shell_session(term)
        assert term.wait() == 5
        # Our terminal is back in the mode corral found it in.
        assert termios.tcgetattr(term.slave) == term.saved
    assert not (ROOT / name).exists()
    res = corral_cli("inspect", name)
    assert b"no sandbox named" in res.stderr  # run removed it


def test_exec_it_into_a_running_sandbox(image: str) -> None:
    name = unique("ttyexec")
    assert corral_cli("create", "--net", "none", "--name", name, image).returncode == 0
    try:
        with terminal("exec", "-it", name, "--", "sh") as term:
            shell_session(term)
            assert term.wait() == 5
            assert termios.tcgetattr(term.slave) == term.saved
    finally:
        corral_cli("rm", "-f", name)


def test_a_signal_to_run_it_reaches_the_foreground_job(image: str) -> None:
    """SIGTERM to corral (not a keystroke) goes to the terminal's foreground process group:
    the `sleep` in front of the shell, which dies of it while the shell carries on."""
    with terminal("run", "-it", "--net", "none", image, "--", "sh") as term:
        term.expect(PROMPT)
        term.type(b"sleep 1000\r")
        wait_for_process("sleep", "1000")
        term.proc.send_signal(signal.SIGTERM)
        term.expect(PROMPT)
        term.type(b"echo rc=$?; exit 4\r")
        term.expect(b"rc=143\r\n")
        assert term.wait() == 4


def wait_for_process(*argv: str, state: str | None = None) -> None:
    """Wait until a process runs ``argv`` (in ``state``, a /proc stat letter, if given)."""
    from corral.kernel import procfs
    from tests.support.waiting import wait_for

    wanted = "\0".join(argv).encode()

    def running() -> bool:
        for entry in os.listdir("/proc"):
            with contextlib.suppress(OSError), open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read().rstrip(b"\0") == wanted:
                    stat = procfs.read_stat(entry)
                    if stat is not None and (state is None or stat.state == state):
                        return True
        return False

    wait_for(running, timeout=OUTPUT_TIMEOUT, what=f"{argv} to run (state {state})")


def test_tty_without_i_still_gives_the_command_a_terminal(image: str) -> None:
    res = corral_cli("run", "-t", "--net", "none", image, "--", "sh", "-c", "tty; echo x >&2")
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"/dev/pts/0\r\nx\r\n"  # stderr shares the terminal, as docker -t


def test_it_without_a_terminal_is_one_sentence(image: str) -> None:
    res = corral_cli("run", "-it", "--net", "none", image, "--", "sh", stdin=b"")
    assert res.returncode == ConfigError.exit_code
    assert res.stderr == b"corral: --tty: the input is not a terminal (use -i alone to pipe " \
        b"stdin into the command)\n"


def test_sdk_tty_exec_and_stream(image: str) -> None:
    with corral.sync.Sandbox.create(unique("sdktty"), image=image,
                                    network=NetworkPolicy.none()) as sb:  # fmt: skip
        res = sb.exec("sh", ["-c", "tty; stty size; echo err >&2"], tty=True, tty_size=(40, 120))
        assert res.exit_code == 0
        assert res.stdout == b"/dev/pts/0\r\n40 120\r\nerr\r\n" and res.stderr == b""
        assert sb.exec("tty").stdout == b"not a tty\n"  # without tty: pipes, as before
        # A stream: resize it, then interrupt it as Ctrl-C would.
        stream = sb.exec_stream(
            "sh", ["-c", "trap 'stty size' WINCH; echo ready; while :; do sleep 1; done"],
            tty=True,
        )
        chunks = iter(stream)
        seen = b""
        while b"ready" not in seen:
            seen += next(chunks)[1]
        stream.resize(33, 77)
        while b"33 77" not in seen:
            seen += next(chunks)[1]
        stream.send_signal(signal.SIGINT)
        assert stream.wait() == 128 + signal.SIGINT
        # Without a terminal the signal goes to the command's process group.
        piped = sb.exec_stream("sleep", ["1000"])
        piped.send_signal(signal.SIGTERM)
        assert piped.wait() == 128 + signal.SIGTERM
        with pytest.raises(ConfigError, match="tty_size"):
            sb.exec("true", tty_size=(10, 10))
        with pytest.raises(ConfigError, match="tty_size"):
            sb.exec("true", tty=True, tty_size=(0, 10))
