"""The libnftables binding: what can be checked without touching the kernel's ruleset.

nft's parser runs before anything is sent to the kernel, so a syntax error is reported with
nft's own text and nothing is applied; the kernel-facing behaviour (atomic transactions,
threads, fork, network namespaces) is in tests/integration/test_net_nftables.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from corral.errors import NetworkError
from corral.net import nftables


def test_the_library_is_loaded_by_its_soname() -> None:
    assert nftables.LIBRARY == "libnftables.so.1"
    assert nftables.available()


def test_a_syntax_error_carries_nfts_text_naming_the_token() -> None:
    with pytest.raises(NetworkError) as info:
        nftables.run("add tabel inet corral-unit-test")
    message = str(info.value)
    assert message.startswith("nftables: Error: syntax error")
    assert "add tabel inet corral-unit-test" in message


def test_an_error_in_multi_line_input_names_its_line_and_quotes_it() -> None:
    # libnftables quotes the first line of a buffer under any error; run() avoids that.
    with pytest.raises(NetworkError) as info:
        nftables.run(
            "add table inet corral-unit-test\n"
            "add rule inet corral-unit-test c tcp dport frobnicate accept\n"
        )
    message = str(info.value)
    assert message.startswith("nftables: line 2, columns 44-53: Error:")
    assert "add rule inet corral-unit-test c tcp dport frobnicate accept" in message
    assert "/proc/self/fd" not in message


def test_a_nul_byte_is_refused_before_the_library_sees_it() -> None:
    with pytest.raises(NetworkError, match="NUL byte"):
        nftables.run("list tables\0flush ruleset")


def test_errors_do_not_leak_into_the_next_call() -> None:
    with pytest.raises(NetworkError):
        nftables.run("this is not nft")
    with pytest.raises(NetworkError) as info:
        nftables.run("neither is this")
    assert "this is not nft" not in str(info.value)


def test_importing_and_using_the_binding_starts_no_process() -> None:
    # An audit hook sees every process start of the interpreter (subprocess, os.exec*,
    # os.posix_spawn, os.system), including ctypes.util.find_library's ldconfig.
    script = (
        "import sys\n"
        "events = []\n"
        "def hook(event, args):\n"
        "    if event in ('subprocess.Popen', 'os.exec', 'os.posix_spawn', 'os.system',\n"
        "                 'os.spawn', 'os.fork'):\n"
        "        events.append(event)\n"
        "sys.addaudithook(hook)\n"
        "from corral.errors import NetworkError\n"
        "from corral.net import firewall, nftables\n"
        "try:\n"
        "    nftables.run('not nft')\n"
        "except NetworkError:\n"
        "    pass\n"
        "print(events)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_netlink_attributes_are_padded_to_four_bytes_and_length_excludes_padding() -> None:
    attr = nftables._attr(1, b"corral-x\0")  # 9 bytes of payload
    assert attr[:4] == (13).to_bytes(2, "little") + (1).to_bytes(2, "little")
    assert len(attr) == 16 and attr.endswith(b"\0\0\0\0")
    nest = nftables._nest(3, attr)
    assert int.from_bytes(nest[2:4], "little") == 3 | 0x8000  # NLA_F_NESTED
    assert int.from_bytes(nest[:2], "little") == 4 + len(attr)


def test_an_nf_tables_message_has_the_subsystem_family_and_big_endian_res_id() -> None:
    msg = nftables._message(0x10, 1, 0, 7, b"", res_id=10)  # a batch begin
    length, kind, flags, seq, pid = (
        int.from_bytes(msg[0:4], "little"),
        int.from_bytes(msg[4:6], "little"),
        int.from_bytes(msg[6:8], "little"),
        int.from_bytes(msg[8:12], "little"),
        int.from_bytes(msg[12:16], "little"),
    )
    assert (length, kind, flags, seq, pid) == (20, 0x10, 1, 7, 0)
    assert msg[16:20] == bytes([0, 0, 0, 10])  # family, version, res_id in network order
