"""The ``corral`` command as a user runs it (a new process each time), network ``none``
unless a test says otherwise: run, create, exec, ls, inspect, logs, stop, rm, gc, exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from corral.errors import ConfigError, SandboxError
from corral.runtime import state
from tests.integration.lifecycle_support import (  # noqa: F401 - fixtures
    ROOT,
    corral_cli,
    corral_home_fixture,
    image_fixture,
    in_world_fixture,
    unique,
)
from tests.support import world as world_mod
from tests.support.fixtures_images import PushedImages
from tests.support.registry import RunningRegistry
from tests.support.waiting import wait_for

pytestmark = pytest.mark.usefixtures("in_world")


def test_run_streams_output_and_exits_with_the_command_code(image: str) -> None:
    res = corral_cli(
        "run", "--net", "none", "--env", "WHO=corral", image, "--",
        "sh", "-c", 'echo "hello $WHO"; echo oops >&2; exit 7',
    )  # fmt: skip
    assert res.returncode == 7, res.stderr
    assert res.stdout == b"hello corral\n"
    assert res.stderr == b"oops\n"
    assert state.list_names() == [] or all(
        not n.startswith("busybox-") for n in state.list_names()
    )


def test_run_without_command_uses_the_image_cmd_and_stdin(image: str) -> None:
    # The test image's Cmd is a shell: with -i it reads the script from our stdin.
    res = corral_cli("run", "--net", "none", "-i", image, stdin=b"echo from-stdin\nexit 4\n")
    assert (res.returncode, res.stdout) == (4, b"from-stdin\n"), res.stderr


def test_run_keep_then_exec_ls_inspect_stop_rm(image: str) -> None:
    name = unique("cli")
    res = corral_cli("run", "--net", "none", "--keep", "--name", name, "--memory", "64m",
                     "--cpus", "0.5", image, "--", "true")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert f"kept sandbox '{name}'".encode() in res.stderr
    try:
        res = corral_cli("exec", name, "--", "sh", "-c", "cat /proc/self/cgroup >/dev/null; echo $0")
        assert (res.returncode, res.stdout) == (0, b"sh\n"), res.stderr
        res = corral_cli("ls", "--json")
        rows = [json.loads(line) for line in res.stdout.splitlines()]
        assert {"name": name, "status": "running"}.items() <= next(
            r for r in rows if r["name"] == name
        ).items()
        assert name.encode() in corral_cli("ls").stdout
        info = json.loads(corral_cli("inspect", name).stdout)
        assert info["memory"] == 64 * 1024 * 1024 and info["cpus"] == 0.5
        assert info["network"] == {"policy": "none"} or info["network"]["policy"] == "none"
        assert b"ready" in corral_cli("logs", name).stdout
        res = corral_cli("rm", name)
        assert res.returncode == SandboxError.exit_code
        assert b"is running" in res.stderr
        assert corral_cli("stop", name).returncode == 0
        assert json.loads(corral_cli("inspect", name).stdout)["status"] == "stopped"
        res = corral_cli("exec", name, "--", "true")
        assert res.returncode == SandboxError.exit_code
        assert res.stderr.startswith(b"corral: ") and b"is stopped" in res.stderr
    finally:
        corral_cli("rm", "-f", name)
    assert not state.sandbox_dir(name).exists()


def test_create_prints_the_name_and_rm_force_stops(image: str) -> None:
    name = unique("created")
    res = corral_cli("create", "--net", "none", "--name", name, image)
    assert (res.returncode, res.stdout) == (0, f"{name}\n".encode()), res.stderr
    res = corral_cli("rm", "-f", name)
    assert res.returncode == 0, res.stderr
    assert not state.sandbox_dir(name).exists()


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["exec", "ghost", "--", "true"], SandboxError.exit_code, b"no sandbox named 'ghost'"),
        (["rm", "ghost"], SandboxError.exit_code, b"no sandbox named 'ghost'"),
        (["run", "--net", "none", "--memory", "lots", "IMAGE", "--", "true"],
         ConfigError.exit_code, b"memory: 'lots' is not a memory size"),
        (["run", "--name", "Bad Name", "IMAGE", "--", "true"], ConfigError.exit_code,
         b"not a valid sandbox name"),
        (["run", "--rule", "allow", "IMAGE", "--", "true"], ConfigError.exit_code, b"--rule"),
        (["run", "-p", "99999:80", "IMAGE", "--", "true"], ConfigError.exit_code, b"-p"),
        (["run", "--net", "none", "localhost:1/corral-test/nope:1", "--", "true"], 3,
         b"corral: registry localhost:1 cannot be reached"),
        (["run", "--net", "none", "IMAGE", "--", "no-such-command"], 127,
         b"command not found in the sandbox: 'no-such-command'"),
        (["run", "--net", "none", "IMAGE", "--", "/etc/passwd"], 126, b"not executable"),
    ],
)  # fmt: skip
def test_errors_are_one_sentence_with_the_documented_exit_code(
    image: str, args: list[str], code: int, words: bytes
) -> None:
    res = corral_cli(*(image if a == "IMAGE" else a for a in args))
    assert res.returncode == code, res.stderr
    assert words in res.stderr
    lines = res.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("corral: "), lines


def test_name_taken_in_the_cli(image: str) -> None:
    name = unique("dup")
    assert corral_cli("create", "--net", "none", "--name", name, image).returncode == 0
    try:
        res = corral_cli("create", "--net", "none", "--name", name, image)
        assert res.returncode == SandboxError.exit_code
        assert f"a sandbox named '{name}' already exists".encode() in res.stderr
        assert corral_cli("exec", name, "--", "true").returncode == 0
    finally:
        corral_cli("rm", "-f", name)


def test_gc_after_kill9_prints_what_it_removed(image: str) -> None:
    name = unique("gc")
    assert corral_cli("create", "--net", "none", "--name", name, image).returncode == 0
    directory = state.sandbox_dir(name)
    recorded = state.read_supervisor_pid(directory)
    assert recorded is not None
    os.kill(recorded[0], signal.SIGKILL)
    wait_for(lambda: not state.supervisor_alive(directory), timeout=10, what="the supervisor to die")
    assert json.loads(corral_cli("inspect", name).stdout)["status"] == "crashed"
    res = corral_cli("gc")
    assert res.returncode == 0, res.stderr
    assert f"removed {name}: cgroup".encode() in res.stdout
    assert f"removed {name}: state directory".encode() in res.stdout
    assert not directory.exists()
    res = corral_cli("gc")
    assert (res.returncode, res.stdout) == (0, b"")
    assert b"nothing to remove" in res.stderr


def test_logs_net_prints_denied_flows_as_json_lines(image: str) -> None:
    name = unique("netlog")
    res = corral_cli("create", "--net", "public-only", "--name", name, image)
    assert res.returncode == 0, res.stderr
    try:
        corral_cli("exec", name, "--", "sh", "-c", "nc -w 2 10.66.0.99 8080 </dev/null")
        events = [json.loads(line) for line in corral_cli("logs", "--net", name).stdout.splitlines()]
        assert any(
            e["destination"] == "10.66.0.99" and e["port"] == 8080 and e["action"] == "deny"
            for e in events
        ), events
    finally:
        corral_cli("rm", "-f", name)


def test_stop_and_start_from_the_cli(image: str) -> None:
    name = unique("clistart")
    assert corral_cli("create", "--net", "none", "--name", name, image).returncode == 0
    try:
        assert corral_cli("exec", name, "--", "sh", "-c", "echo x > /root/f").returncode == 0
        assert corral_cli("stop", name).returncode == 0
        assert corral_cli("start", name).returncode == 0
        res = corral_cli("exec", name, "--", "cat", "/root/f")
        assert (res.returncode, res.stdout) == (0, b"x\n"), res.stderr
    finally:
        corral_cli("rm", "-f", name)


def test_run_pulls_from_a_registry_and_uses_the_image_config(
    world: world_mod.World, registry: RunningRegistry, test_images: PushedImages
) -> None:
    """`corral run REF` on an image that is not in the store pulls it first (plain-HTTP
    registry in the test world), then runs with the image's Cmd when no command is given."""
    env = {**os.environ, "CORRAL_INSECURE_REGISTRIES": ",".join(registry.insecure)}
    res = subprocess.run(
        [sys.executable, "-m", "corral.cli", "run", "--net", "none", "-i", test_images.busybox],
        input=b"echo pulled-and-ran\n",
        capture_output=True,
        timeout=120,
        env=env,
        cwd=str(ROOT),
    )
    assert (res.returncode, res.stdout) == (0, b"pulled-and-ran\n"), res.stderr


def test_memory_limit_hit_is_one_sentence_and_exit_137(image: str) -> None:
    res = corral_cli(
        "run", "--net", "none", "--memory", "64m", image, "--",
        "dd", "if=/dev/zero", "of=/dev/null", "bs=200M", "count=1",
    )  # fmt: skip
    assert res.returncode == 137
    assert res.stderr.decode().strip().splitlines()[-1].endswith("hit its memory limit")
