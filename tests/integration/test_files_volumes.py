"""Files and volumes the way docker users reach for them (issue 10, point 4), with real
processes: ``corral cp`` of directory trees both ways (modes, symlinks, owners, the hostile
cases), the SDK's copy_in/copy_out of directories, ``fs.write(parents=True)``, bind mounts
read-only and read-write with the uid shift, ``--user``, ``--entrypoint``, ``--hostname``,
``--env-file``, ``run -d`` and ``exec -d``."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import corral.sync
from corral import NetworkPolicy
from corral.errors import ChannelProtocolError, ConfigError, SandboxError
from corral.runtime import state
from tests.integration.lifecycle_support import (  # noqa: F401 - fixtures
    corral_cli,
    corral_home_fixture,
    image_fixture,
    in_world_fixture,
    unique,
)
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.usefixtures("in_world"), pytest.mark.timeout(300)]

NONE = NetworkPolicy.none()

#: An unprivileged host user that owns the volumes of these tests (no such user needs to
#: exist: ids are numbers).
OWNER = 4242


@pytest.fixture(name="box")
def box_fixture(image: str) -> Iterator[corral.sync.Sandbox]:
    with corral.sync.Sandbox.create(unique("files"), image=image, network=NONE) as sb:
        yield sb


def make_tree(root: Path) -> Path:
    """A small tree with every kind cp carries: modes (sticky, exec, set-uid), a nested
    empty directory, relative and dangling symlinks, a name with a space and non-ASCII."""
    tree = root / "tree"
    (tree / "sub" / "deeper" / "empty").mkdir(parents=True)
    (tree / "a.txt").write_text("alpha\n")
    (tree / "sub" / "run.sh").write_text("#!/bin/sh\necho run\n")
    (tree / "sub" / "deeper" / "näme with space").write_bytes(os.urandom(300_000))
    (tree / "setuid").write_text("x")
    os.chmod(tree / "sub" / "run.sh", 0o750)
    os.chmod(tree / "setuid", 0o4755)
    os.chmod(tree / "sub" / "deeper", 0o1777)
    os.symlink("sub/run.sh", tree / "link")
    os.symlink("/nonexistent/target", tree / "dangling")
    return tree


def snapshot(root: Path) -> dict[str, tuple[str, int, str]]:
    """relative path -> (kind, permission bits, content or link target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            st = full.lstat()
            rel = str(full.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", 0, os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), "")
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), full.read_bytes().hex()[:64])
    return out


def test_cp_tree_round_trip_keeps_modes_and_symlinks(box: corral.sync.Sandbox,
                                                     tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    os.utime(tree / "a.txt", (1_600_000_000, 1_600_000_000))
    box.fs.mkdir("/srv")  # an existing directory: the tree lands in it as /srv/tree
    res = corral_cli("cp", str(tree), f"{box.name}:/srv")
    assert res.returncode == 0, res.stderr
    # Inside: the sandbox's root owns it all; modes and links as on the host.
    out = box.exec("sh", ["-c", "cd /srv/tree && stat -c '%n %a %u' a.txt sub/run.sh "
                                "sub/deeper setuid && readlink link && readlink dangling"]).stdout_text
    assert out.split("\n") == [
        "a.txt 644 0", "sub/run.sh 750 0", "sub/deeper 1777 0", "setuid 4755 0",
        "sub/run.sh", "/nonexistent/target", "",
    ]  # fmt: skip
    assert box.exec("/srv/tree/link").stdout_text == "run\n"
    # Back out: the same tree, except that the set-uid bit is dropped on the host.
    back = tmp_path / "back"
    res = corral_cli("cp", f"{box.name}:/srv/tree", str(back))
    assert res.returncode == 0, res.stderr
    expected = snapshot(tree)
    expected["setuid"] = ("file", 0o755, expected["setuid"][2])
    assert snapshot(back) == expected
    assert int((back / "a.txt").stat().st_mtime) == 1_600_000_000
    # Into an existing directory: the tree lands under its own name (docker's rule).
    res = corral_cli("cp", f"{box.name}:/srv/tree", str(back))
    assert res.returncode == 0, res.stderr
    assert snapshot(back / "tree") == expected
    # A second copy onto what exists is refused, and nothing of it is left behind.
    res = corral_cli("cp", f"{box.name}:/srv/tree", str(back))
    assert res.returncode == SandboxError.exit_code
    assert b"already exists on the host" in res.stderr
    assert snapshot(back / "tree") == expected


def test_cp_contents_files_and_docker_rules(box: corral.sync.Sandbox, tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    # SRC/. copies the contents into DST (created).
    assert corral_cli("cp", f"{tree}/.", f"{box.name}:/flat").returncode == 0
    assert box.exec("ls", ["/flat"]).stdout_text.split() == sorted(
        ["a.txt", "dangling", "link", "setuid", "sub"]
    )
    # A file onto a new name, then onto an existing file (replaced).
    assert corral_cli("cp", str(tree / "a.txt"), f"{box.name}:/tmp/renamed").returncode == 0
    (tmp_path / "v2").write_text("second\n")
    assert corral_cli("cp", str(tmp_path / "v2"), f"{box.name}:/tmp/renamed").returncode == 0
    assert box.fs.read("/tmp/renamed") == b"second\n"
    host_file = tmp_path / "out.txt"
    host_file.write_text("old")
    assert corral_cli("cp", f"{box.name}:/tmp/renamed", str(host_file)).returncode == 0
    assert host_file.read_text() == "second\n"
    # DST ending in / must exist; a directory cannot go onto a file; one side is a sandbox.
    res = corral_cli("cp", str(tree), f"{box.name}:/no/such/")
    assert res.returncode == SandboxError.exit_code and b"does not exist" in res.stderr
    res = corral_cli("cp", str(tree), f"{box.name}:/tmp/renamed")
    assert res.returncode == SandboxError.exit_code and b"onto the file" in res.stderr
    res = corral_cli("cp", str(tree), str(tmp_path / "x"))
    assert res.returncode == ConfigError.exit_code
    # The tar stream itself: to stdout and back in from stdin.
    res = corral_cli("cp", f"{box.name}:/flat/sub", "-")
    listing = subprocess.run(["tar", "-tvf", "-"], input=res.stdout, capture_output=True,
                             check=True).stdout.decode()  # fmt: skip
    assert "sub/run.sh" in listing and "sub/deeper/empty" in listing
    res = corral_cli("cp", "-", f"{box.name}:/tmp", stdin=res.stdout)
    assert res.returncode == 0, res.stderr
    assert box.exec("/tmp/sub/run.sh").stdout_text == "run\n"


def test_cp_archive_keeps_numeric_owners(box: corral.sync.Sandbox, tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    os.chown(tree / "a.txt", 1000, 100)
    os.chown(tree / "sub", 7, 8)
    os.lchown(tree / "link", 99, 99)
    assert corral_cli("cp", "-a", str(tree), f"{box.name}:/own").returncode == 0
    # /own did not exist: it is the copy of the tree itself.
    out = box.exec("stat", ["-c", "%u:%g", "/own/a.txt", "/own/sub"]).stdout_text
    assert out.split() == ["1000:100", "7:8"]
    assert corral_cli("cp", str(tree), f"{box.name}:/plain").returncode == 0
    assert box.exec("stat", ["-c", "%u:%g", "/plain/a.txt"]).stdout_text.strip() == "0:0"
    back = tmp_path / "back"
    assert corral_cli("cp", "-a", f"{box.name}:/own", str(back)).returncode == 0
    assert ((back / "a.txt").stat().st_uid, (back / "a.txt").stat().st_gid) == (1000, 100)
    assert (back / "link").lstat().st_uid == 99
    plain = tmp_path / "plain"
    assert corral_cli("cp", f"{box.name}:/own", str(plain)).returncode == 0
    assert (plain / "a.txt").stat().st_uid == os.geteuid()


def test_copy_out_never_writes_through_what_the_sandbox_planted(
    box: corral.sync.Sandbox, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("host data")
    # A symlink to a host directory, then a file "under" it: the host must not follow it.
    box.exec("sh", ["-c", f"mkdir -p /evil && ln -s {victim} /evil/a && "
                          "mkdir -p /evil2/a && echo pwned > /evil2/a/keep"])  # fmt: skip
    dest = tmp_path / "dest"
    dest.mkdir()
    box.fs.copy_out("/evil", dest / "evil")
    assert os.readlink(dest / "evil" / "a") == str(victim)
    # Merge the second tree onto the first: a/ is a symlink on the host now.
    res = corral_cli("cp", f"{box.name}:/evil2/.", str(dest / "evil"))
    assert res.returncode != 0
    assert (victim / "keep").read_text() == "host data"
    assert sorted(p.name for p in victim.iterdir()) == ["keep"]


def test_sdk_copy_in_out_directories_and_write_parents(
    box: corral.sync.Sandbox, tmp_path: Path
) -> None:
    tree = make_tree(tmp_path)
    box.fs.copy_in(tree, "/opt/app")
    assert box.fs.read("/opt/app/a.txt") == b"alpha\n"
    assert box.fs.stat("/opt/app/link").target == "sub/run.sh"
    out = tmp_path / "copied"
    box.fs.copy_out("/opt/app", out)
    expected = snapshot(tree)
    expected["setuid"] = ("file", 0o755, expected["setuid"][2])
    assert snapshot(out) == expected
    with pytest.raises(SandboxError, match="already exists"):
        box.fs.copy_out("/opt/app", out)
    # A single file still works as before, and write(parents=True) makes the directories.
    box.fs.write("/app/deep/main.py", "print('hi')\n", parents=True)
    assert box.fs.read("/app/deep/main.py") == b"print('hi')\n"
    with pytest.raises(SandboxError):
        box.fs.write("/nowhere/x.txt", "x")


def test_volumes_read_write_and_read_only_with_the_uid_shift(image: str, tmp_path: Path) -> None:
    rw = tmp_path / "rw"
    ro = tmp_path / "ro"
    for d in (rw, ro):
        d.mkdir()
        (d / "host.txt").write_text(f"from {d.name}\n")
        os.chown(d, OWNER, OWNER)
        os.chown(d / "host.txt", OWNER, OWNER)
    (rw / "roots").write_text("host root's file\n")  # owned by host root: not the owner
    single = tmp_path / "config.ini"
    single.write_text("[x]\n")
    name = unique("vol")
    res = corral_cli(
        "run", "--net", "none", "--name", name, "-v", f"{rw}:/work", "-v", f"{ro}:/data:ro",
        "-v", f"{single}:/etc/app.ini:ro", image, "--", "sh", "-c",
        "stat -c '%u %n' /work /work/host.txt /work/roots /data/host.txt;"
        "echo made > /work/new.txt && mkdir /work/dir && echo ok-rw;"
        "echo x > /data/nope 2>/dev/null || echo ro-refused;"
        "echo x >> /work/roots 2>/dev/null || echo roots-refused;"
        "cat /etc/app.ini; grep -c ' /work ' /proc/mounts",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.decode().split("\n") == [
        "0 /work", "0 /work/host.txt", "65534 /work/roots", "0 /data/host.txt",
        "ok-rw", "ro-refused", "roots-refused", "[x]", "1", "",
    ]  # fmt: skip
    # What the sandbox's root made belongs to the volume's owner on the host.
    assert (rw / "new.txt").read_text() == "made\n"
    assert ((rw / "new.txt").stat().st_uid, (rw / "dir").stat().st_gid) == (OWNER, OWNER)
    assert sorted(p.name for p in ro.iterdir()) == ["host.txt"]
    assert (rw / "roots").read_text() == "host root's file\n"
    assert not state.sandbox_dir(name).exists()


def test_volume_errors_name_the_flag(image: str, tmp_path: Path) -> None:
    for volume, words in (
        (f"{tmp_path}/missing:/x", b"cannot be used"),
        (f"{tmp_path}:relative", b"not an absolute path"),
        (f"{tmp_path}:/", b"cannot be mounted on /"),
        (f"{tmp_path}:/proc/x", b"/proc or /dev"),
        ("nocolon", b"HOST:GUEST"),
    ):
        res = corral_cli("run", "--net", "none", "-v", volume, image, "--", "true")
        assert res.returncode == ConfigError.exit_code, (volume, res.stderr)
        assert res.stderr.startswith(b"corral: -v: ") and words in res.stderr, res.stderr
    with pytest.raises(ConfigError, match=r"volumes\[1\].*mounted twice"):
        corral.sync.Sandbox.create(unique("v"), image=image, network=NONE,
                                   volumes=[f"{tmp_path}:/a", f"{tmp_path}:/a/"])  # fmt: skip


def test_user_entrypoint_hostname_env_file(image: str, tmp_path: Path) -> None:
    env_file = tmp_path / "env"
    env_file.write_text("# comment\nGREETING=hello world\n\nEMPTY=\nFROM_HOST\n")
    res = corral_cli(
        "run", "--net", "none", "--hostname", "web-1", "--user", "1234:5678",
        "--env-file", str(env_file), "-e", "EXTRA=1", "--entrypoint", "/bin/sh", image,
        "-c", 'echo "$(hostname) $(id -u):$(id -g) $GREETING|$EMPTY|${FROM_HOST-unset} $EXTRA";'
        "grep web-1 /etc/hosts",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.decode() == "web-1 1234:5678 hello world||unset 1\n127.0.1.1\tweb-1\n"
    res = corral_cli("run", "--net", "none", "--hostname", "bad name", image, "--", "true")
    assert res.returncode == ConfigError.exit_code and b"hostname" in res.stderr
    res = corral_cli("run", "--net", "none", "--env-file", str(tmp_path / "nope"), image)
    assert res.returncode == ConfigError.exit_code and b"--env-file" in res.stderr
    # exec -u runs one command as another user.
    name = unique("user")
    assert corral_cli("create", "--net", "none", "--name", name, image).returncode == 0
    try:
        res = corral_cli("exec", "-u", "99", name, "--", "id", "-u")
        assert res.stdout == b"99\n", res.stderr
    finally:
        corral_cli("rm", "-f", name)


def test_run_detached_and_exec_detached(image: str) -> None:
    name = unique("detach")
    res = corral_cli("run", "-d", "--net", "none", "--name", name, image, "--",
                     "sh", "-c", "echo started; echo to-stderr >&2; exec sleep 600")  # fmt: skip
    assert (res.returncode, res.stdout) == (0, f"{name}\n".encode()), res.stderr
    try:
        log = state.sandbox_dir(name) / state.COMMAND_LOG
        wait_for(lambda: b"to-stderr" in log.read_bytes(), timeout=20, what="detached output")
        assert corral_cli("logs", name).stdout == b"started\nto-stderr\n"
        assert b"ready" in corral_cli("logs", "--supervisor", name).stdout
        # It outlived the CLI process that started it.
        assert b"sleep 600" in corral_cli("exec", name, "--", "ps").stdout
        assert corral_cli("exec", "-d", name, "--", "sh", "-c", "echo second").returncode == 0
        wait_for(lambda: b"second" in log.read_bytes(), timeout=20, what="exec -d output")
        res = corral_cli("exec", "-d", name, "--", "no-such-cmd")
        assert res.returncode == 127 and b"command not found" in res.stderr
        res = corral_cli("run", "-d", "-i", "--net", "none", image, "--", "true")
        assert res.returncode == ConfigError.exit_code and b"-i" in res.stderr
    finally:
        corral_cli("rm", "-f", name)
    res = corral_cli("run", "-d", "--net", "none", image, "--", "no-such-cmd")
    assert res.returncode == 127


def test_channel_protocol_error_is_a_sandbox_error() -> None:
    assert issubclass(ChannelProtocolError, SandboxError)
