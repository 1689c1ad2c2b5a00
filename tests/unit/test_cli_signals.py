"""The signal policy of `corral run`/`exec` (pure), the terminal and signal wire values, and
the namespace record gc uses to find its way back (against plain files)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from corral.cli import sandbox as cli_sandbox
from corral.cli.terminal import CANCEL, FORWARD, IGNORE, KILL, SignalRelay
from corral.errors import ConfigError
from corral.lifecycle import hostnetns
from corral.runtime import channel_wire


def test_a_signal_during_start_up_cancels_and_sets_the_exit_code() -> None:
    relay = SignalRelay()
    assert relay.on_signal(signal.SIGTERM) == CANCEL
    assert relay.on_signal(signal.SIGINT) == CANCEL
    assert relay.exit_code(None) == 128 + signal.SIGTERM  # the first one ended corral


def test_the_first_signal_is_forwarded_and_the_command_code_stands() -> None:
    relay = SignalRelay()
    relay.running()
    assert relay.on_signal(signal.SIGHUP) == FORWARD
    assert relay.exit_code(3) == 3  # the command caught it and exited 3
    assert relay.exit_code(128 + signal.SIGHUP) == 129


def test_a_second_signal_kills_and_corral_exits_128_plus_n() -> None:
    relay = SignalRelay()
    relay.running()
    assert relay.on_signal(signal.SIGTERM) == FORWARD
    assert relay.on_signal(signal.SIGINT) == KILL
    assert relay.exit_code(137) == 128 + signal.SIGINT


def test_signals_while_the_sandbox_is_removed_are_ignored() -> None:
    relay = SignalRelay()
    relay.running()
    relay.cleaning()
    assert relay.on_signal(signal.SIGTERM) == IGNORE
    assert relay.exit_code(0) == 0


def test_dash_it_needs_a_terminal_on_stdin() -> None:
    with pytest.raises(ConfigError, match="--tty: the input is not a terminal"):
        cli_sandbox.check_terminal_flags(tty=True, interactive=True, stdin_is_terminal=False)
    cli_sandbox.check_terminal_flags(tty=True, interactive=False, stdin_is_terminal=False)
    cli_sandbox.check_terminal_flags(tty=False, interactive=True, stdin_is_terminal=False)
    cli_sandbox.check_terminal_flags(tty=True, interactive=True, stdin_is_terminal=True)


@pytest.mark.parametrize(
    ("rows", "cols", "expected"),
    [(50, 132, (50, 132)), (1, 1, (1, 1)), (65535, 65535, (65535, 65535)),
     (0, 80, (24, 80)), (24, 65536, (24, 80)), (None, 80, (24, 80)), ("24", 80, (24, 80)),
     (True, 80, (24, 80)), (-1, 80, (24, 80))],
)  # fmt: skip
def test_terminal_size_falls_back_to_24x80_outside_struct_winsize(
    rows: object, cols: object, expected: tuple[int, int]
) -> None:
    assert channel_wire.terminal_size(rows, cols) == expected


@pytest.mark.parametrize(("value", "expected"), [(2, 2), (15, 15), (64, 64), (0, None),
                                                 (65, None), ("9", None), (True, None),
                                                 (signal.SIGHUP, 1)])  # fmt: skip
def test_exec_signal_accepts_linux_signal_numbers_only(value: object, expected: int | None) -> None:
    assert channel_wire.exec_signal(value) == expected


def test_hostnetns_locates_a_namespace_file_by_identity(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("")
    b.write_text("")
    st = os.stat(b)
    record = {hostnetns.DEV: st.st_dev, hostnetns.INO: st.st_ino, hostnetns.PATH: str(a)}
    # The recorded path now names something else: the search goes on and finds b.
    assert hostnetns.locate(record, [str(a), str(tmp_path / "gone"), str(b)]) == str(b)
    assert hostnetns.locate(record, [str(a)]) is None
    assert hostnetns.fd_link_names(4026531840) == ("net:[4026531840]",)


def test_hostnetns_identify_records_the_calling_threads_namespace() -> None:
    record = hostnetns.identify()
    assert hostnetns.is_current(record)
    assert hostnetns.locate(record) is not None
