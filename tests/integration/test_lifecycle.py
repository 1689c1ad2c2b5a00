"""Sandbox lifecycle through the SDK (network ``none``): create, exec, files, stop, remove,
reattach from another process, names, failures, and a crashed supervisor cleaned by gc."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import corral.sync
from corral import NetworkPolicy, Sandbox
from corral.errors import ConfigError, SandboxError, SandboxExists, SandboxNotFound
from corral.kernel import procfs
from corral.lifecycle import gc, spawn
from corral.runtime import cgroups, spare_idle, state
from tests.integration.lifecycle_support import (  # noqa: F401 - fixtures
    ROOT,
    corral_home_fixture,
    image_fixture,
    in_world_fixture,
    supervisor_processes,
    unique,
)
from tests.support import world as world_mod
from tests.support.servers import HTTP_PORT, start_servers
from tests.support.waiting import wait_for
from tests.support.world import SERVER_V4

pytestmark = pytest.mark.usefixtures("in_world")

NONE = NetworkPolicy.none()


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def cgroup_dirs(name: str) -> list[str]:
    found = subprocess.run(
        ["find", "/sys/fs/cgroup", "-maxdepth", "8", "-type", "d", "-name", f"corral-{name}-*"],
        capture_output=True,
        text=True,
    ).stdout.split()
    return found


def test_full_lifecycle(image: str, tmp_path: Path) -> None:
    name = unique("life")

    async def scenario() -> None:
        sb = await Sandbox.create(name, image=image, network=NONE, env={"GREETING": "hi"})
        try:
            assert sb.status == state.RUNNING
            res = await sb.exec("sh", ["-c", 'echo "$GREETING $(hostname)"; echo err >&2; exit 3'])
            assert (res.exit_code, res.stdout_text, res.stderr_text) == (3, f"hi {name}\n", "err\n")
            res = await sb.exec("cat", stdin=b"piped", env={"X": "1"}, cwd="/tmp")
            assert res.stdout == b"piped"
            res = await sb.exec("pwd", cwd="/tmp")
            assert res.stdout_text == "/tmp\n"
            res = await sb.exec("sleep", ["10"], timeout=0.3)
            assert res.exit_code == 124

            chunks = []
            stream = await sb.exec_stream("sh", ["-c", "echo a; sleep 0.1; echo b >&2"])
            async for which, data in stream:
                chunks.append((which, data))
            assert await stream.wait() == 0
            assert ("stdout", b"a\n") in chunks and ("stderr", b"b\n") in chunks

            await sb.fs.mkdir("/work/sub", parents=True)
            await sb.fs.write("/work/sub/f.txt", "content")
            assert await sb.fs.read("/work/sub/f.txt") == b"content"
            assert await sb.fs.exists("/work/sub/f.txt")
            assert [e.name for e in await sb.fs.list("/work/sub")] == ["f.txt"]
            assert (await sb.fs.stat("/work/sub/f.txt")).size == 7
            big = tmp_path / "big.bin"
            big.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
            await sb.fs.copy_in(big, "/work/big.bin")
            await sb.fs.copy_out("/work/big.bin", tmp_path / "back.bin")
            assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()
            await sb.fs.remove("/work", recursive=True)
            assert not await sb.fs.exists("/work")

            again = await Sandbox.get(name)
            assert (await again.exec("true")).exit_code == 0
            assert name in [s.name for s in await Sandbox.list()]
            info = await sb.info()
            assert info["status"] == "running" and info["supervisor_pid"] in supervisor_processes()

            await sb.stop()
            assert sb.status == state.STOPPED
            with pytest.raises(SandboxError, match="is stopped"):
                await sb.exec("true")
            with pytest.raises(SandboxError, match="is stopped"):
                await again.exec("true")
            assert cgroup_dirs(name) == []
            await sb.stop()  # stopping a stopped sandbox does nothing
        finally:
            await sb.remove()
        assert not state.sandbox_dir(name).exists()
        with pytest.raises(SandboxNotFound, match=name):
            await Sandbox.get(name)

    run(scenario())


def test_async_context_manager_removes(image: str) -> None:
    name = unique("ctx")

    async def scenario() -> int:
        async with await Sandbox.create(name, image=image, network=NONE) as sb:
            pid = sb.state.init_pid
            assert (await sb.exec("true")).ok
        return pid or 0

    init_pid = run(scenario())
    assert not state.sandbox_dir(name).exists()
    assert not os.path.exists(f"/proc/{init_pid}/ns") or True  # pid may be reused; cgroup:
    assert cgroup_dirs(name) == []


def test_sync_twin(image: str) -> None:
    name = unique("sync")
    with corral.sync.Sandbox.create(name, image=image, network=NONE, memory="64m") as sb:
        assert sb.exec("echo", ["ok"]).stdout_text == "ok\n"
        sb.fs.write("/tmp/x", b"1")
        assert sb.fs.read("/tmp/x") == b"1"
        assert [w for w, _ in sb.exec_stream("echo", ["s"])] == ["stdout"]
        assert corral.sync.Sandbox.get(name).status == "running"
    assert not state.sandbox_dir(name).exists()


def _sandbox_pids(sb: corral.sync.Sandbox) -> set[int]:
    pids: set[int] = set()
    for path in (sb.state.cgroup or "").split():
        with contextlib.suppress(OSError):
            pids |= {int(p) for p in Path(path, "cgroup.procs").read_text().split()}
    return pids


def test_an_idle_sandbox_lets_its_spare_worker_go_and_still_serves(
    image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After spare_idle.SPARE_IDLE ($CORRAL_SPARE_IDLE, 1 s here) without a connection the init
    lets its spare worker go (the sandbox is its init alone, ~0.9 MiB less); the next exec
    waits for a fork of the init instead, works, and brings a spare back."""
    monkeypatch.setenv(spare_idle.SPARE_IDLE_ENV, "1")
    spawn.close_fork_server()  # the next create starts one that inherits the variable
    name = unique("idle")
    try:
        with corral.sync.Sandbox.create(name, image=image, network=NONE) as sb:
            init_pid = sb.state.init_pid
            assert init_pid
            wait_for(lambda: _sandbox_pids(sb) == {init_pid}, timeout=10,
                     what="the idle spare to be let go")  # fmt: skip
            out = [sb.exec("echo", [str(i)]).stdout_text for i in range(3)]
            assert out == ["0\n", "1\n", "2\n"]
            wait_for(lambda: len(_sandbox_pids(sb)) >= 2, timeout=5, what="a spare ahead again")
            assert spare_idle.SPARE_IDLE_ENV not in sb.exec("env").stdout_text  # the host's own
    finally:
        spawn.close_fork_server()  # later tests get a fork server with the default


def test_a_bad_spare_idle_setting_is_one_sentence_and_claims_nothing(
    image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(spare_idle.SPARE_IDLE_ENV, "soon")
    name = unique("badidle")
    with pytest.raises(ConfigError, match=r"^CORRAL_SPARE_IDLE: must be a positive number"):
        corral.sync.Sandbox.create(name, image=image, network=NONE)
    assert not state.sandbox_dir(name).exists()
    assert cgroup_dirs(name) == []


def test_reattach_from_a_second_process(image: str) -> None:
    """The sandbox outlives the process that created it; another process drives it."""
    name = unique("reattach")
    code = textwrap.dedent(
        f"""
        import corral.sync
        from corral import NetworkPolicy
        sb = corral.sync.Sandbox.create({name!r}, image={image!r}, network=NetworkPolicy.none())
        sb.fs.write("/tmp/mark", b"from the first process")
        print(sb.state.init_pid)
        """
    )
    created = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert created.returncode == 0, created.stderr
    try:
        sb = corral.sync.Sandbox.get(name)
        assert sb.status == "running"
        assert sb.fs.read("/tmp/mark") == b"from the first process"
        assert sb.exec("true").exit_code == 0
    finally:
        corral.sync.Sandbox.get(name).remove()
    assert not state.sandbox_dir(name).exists()


def test_name_taken_and_invalid(image: str) -> None:
    name = unique("taken")
    with corral.sync.Sandbox.create(name, image=image, network=NONE) as first:
        with pytest.raises(SandboxExists, match=f"a sandbox named '{name}' already exists"):
            corral.sync.Sandbox.create(name, image=image, network=NONE)
        assert first.exec("true").ok  # the first one is untouched
    with pytest.raises(ConfigError, match="not a valid sandbox name"):
        corral.sync.Sandbox.create("Bad/Name", image=image, network=NONE)


def test_command_not_found_is_one_sentence(image: str) -> None:
    with corral.sync.Sandbox.create(unique("nocmd"), image=image, network=NONE) as sb:
        with pytest.raises(SandboxError, match="command not found in the sandbox: 'no-such-cmd'"):
            sb.exec("no-such-cmd")
        assert sb.exec("true").ok


def test_unknown_image_leaves_nothing() -> None:
    """An image that cannot be had is one ImageError naming the registry, and no sandbox.
    (A registry on the world's loopback that refuses at once: a name the world cannot
    resolve would cost the system resolver's 10 s of retries per run, for the same path.)"""
    name = unique("noimg")
    with pytest.raises(corral.ImageError, match="registry localhost:1 cannot be reached"):
        corral.sync.Sandbox.create(
            name, image="localhost:1/corral-test/does-not-exist:1", network=NONE
        )
    assert not state.sandbox_dir(name).exists()


def test_failed_start_leaves_nothing(image: str) -> None:
    """A start that fails (a published host port already in use) is one sentence of the
    right class and leaves no debris: no directory, cgroup, netns or supervisor."""
    name = unique("badstart")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(corral.NetworkError, match=f"sandbox '{name}' did not start: .*{port}"):
            corral.sync.Sandbox.create(
                name, image=image, network=NetworkPolicy.public_only(), ports={port: 80}
            )
    assert not state.sandbox_dir(name).exists()
    assert cgroup_dirs(name) == []
    assert not os.path.exists(f"/run/netns/corral-{name}")


def test_public_only_sandbox_reaches_the_world_and_nothing_private(
    image: str, world: world_mod.World
) -> None:
    """End to end through the SDK: the data path is wired by the supervisor."""
    if "10.66.0.10/32" not in world.extra_addresses:
        world.add_server_address("10.66.0.10/32")
    servers = start_servers(world.spawn_inet, [SERVER_V4, "10.66.0.10"])
    request = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {{}} {HTTP_PORT}"
    try:
        with corral.sync.Sandbox.create(
            unique("net"), image=image, network=NetworkPolicy.public_only()
        ) as sb:
            ok = sb.exec("sh", ["-c", request.format(SERVER_V4)])
            assert f"reached {SERVER_V4}:{HTTP_PORT}" in ok.stdout_text, ok
            denied = sb.exec("sh", ["-c", request.format("10.66.0.10")])
            assert "reached" not in denied.stdout_text, denied
            events = list(sb.logs())
            assert any(
                e.destination == "10.66.0.10" and e.action == "deny" for e in events
            ), events
        allow_all = NetworkPolicy.allow_all()
        with corral.sync.Sandbox.create(unique("net"), image=image, network=allow_all) as sb:
            ok = sb.exec("sh", ["-c", request.format("10.66.0.10")])
            assert "reached 10.66.0.10" in ok.stdout_text, ok  # the positive control
    finally:
        world.stop_process(servers)


def test_kill9_supervisor_then_gc_leaves_nothing(image: str) -> None:
    name = unique("crash")
    sb = corral.sync.Sandbox.create(name, image=image, network=NONE)
    directory = sb.directory
    recorded = state.read_supervisor_pid(directory)
    assert recorded is not None
    os.kill(recorded[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while state.supervisor_alive(directory) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sb.status == state.CRASHED
    with pytest.raises(SandboxError):
        sb.exec("true")
    removed = gc.collect([name])
    assert any("cgroup" in line for line in removed), removed
    assert any("state directory" in line for line in removed), removed
    assert not directory.exists()
    assert cgroup_dirs(name) == []
    # Including the directories that kept a spare's name (v2 ones cannot be renamed).
    assert sb.state.cgroup and not any(Path(p).exists() for p in sb.state.cgroup.split())
    assert recorded[0] not in supervisor_processes()
    assert gc.collect([name]) == []  # nothing left the second time


def _spares_of(server_pid: int) -> dict[int, list[Path]]:
    """Spare cgroups (made ahead of time) whose maker is a child of the fork server."""
    found: dict[int, list[Path]] = {}
    for parent in cgroups.spare_parents():
        for entry in parent.iterdir():
            owner = cgroups.parse_spare_name(entry.name)
            if owner is None:
                continue
            stat = procfs.read_stat(owner[0])
            if stat is not None and stat.ppid == server_pid:
                found.setdefault(owner[0], []).append(entry)
    return found


def test_a_killed_spare_leaves_nothing_for_long(image: str) -> None:
    """The fork server's spare supervisor holds a cgroup with stage A parked in it
    (launcher.Zygote). SIGKILLed, it leaves that cgroup (its zygote dies with it): the spare
    that replaces it removes it (or gc does), and creates keep working."""
    with corral.sync.Sandbox.create(unique("warm"), image=image, network=NONE) as sb:
        assert sb.exec("true").ok
    client = spawn._fork_server_client
    assert client is not None
    server_pid = client._proc.pid
    deadline = time.monotonic() + 10
    while not (spares := _spares_of(server_pid)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(spares) == 1, spares
    (spare_pid, paths), = spares.items()
    assert len(paths) == len(cgroups.spare_parents())
    os.kill(spare_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(p.exists() for p in paths) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(p.exists() for p in paths)
    with corral.sync.Sandbox.create(unique("after"), image=image, network=NONE) as sb:
        assert sb.exec("true").ok


def test_gc_removes_spare_cgroups_whose_maker_is_dead() -> None:
    dead = cgroups.spare_name(2**22 + 7, 1)  # above pid_max's default: no such process
    paths = [parent / dead for parent in cgroups.spare_parents()]
    for path in paths:
        path.mkdir()
    try:
        assert not any(dead in line for line in gc.collect())  # no sandbox's: not reported
        assert not any(p.exists() for p in paths)
    finally:
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                path.rmdir()


def test_create_cleans_a_crashed_namesake(image: str) -> None:
    name = unique("phoenix")
    sb = corral.sync.Sandbox.create(name, image=image, network=NONE)
    recorded = state.read_supervisor_pid(sb.directory)
    assert recorded is not None
    os.kill(recorded[0], signal.SIGKILL)
    wait_for(lambda: not state.supervisor_alive(sb.directory), timeout=10,
             what="the supervisor to die")
    with corral.sync.Sandbox.create(name, image=image, network=NONE) as again:
        assert again.exec("true").ok
    assert cgroup_dirs(name) == []


def test_stop_by_sigterm_to_the_supervisor(image: str) -> None:
    name = unique("term")
    sb = corral.sync.Sandbox.create(name, image=image, network=NONE)
    try:
        recorded = state.read_supervisor_pid(sb.directory)
        assert recorded is not None
        os.kill(recorded[0], signal.SIGTERM)
        deadline = time.monotonic() + 30
        while state.supervisor_alive(sb.directory) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sb.status == state.STOPPED
        assert "signal 15" in (state.stopped_reason(sb.directory) or "")
        assert cgroup_dirs(name) == []
    finally:
        sb.remove()


def test_world_is_still_clean_of_this_module(world: world_mod.World) -> None:
    assert gc.collect() == []


def test_exec_started_supervisor_works_the_same(image: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the fork server (CORRAL_FORK_SERVER=0) the supervisor is a fresh interpreter."""
    monkeypatch.setenv("CORRAL_FORK_SERVER", "0")
    with corral.sync.Sandbox.create(unique("execd"), image=image, network=NONE) as sb:
        assert sb.exec("echo", ["x"]).stdout_text == "x\n"
        recorded = state.read_supervisor_pid(sb.directory)
        assert recorded is not None
        with open(f"/proc/{recorded[0]}/cmdline", "rb") as f:
            assert b"corral.lifecycle.supervisor" in f.read()


def test_supervisor_runs_in_the_creators_network_namespace(image: str) -> None:
    with corral.sync.Sandbox.create(unique("netns"), image=image, network=NONE) as sb:
        recorded = state.read_supervisor_pid(sb.directory)
        assert recorded is not None
        assert os.readlink(f"/proc/{recorded[0]}/ns/net") == os.readlink("/proc/thread-self/ns/net")


def test_stop_then_start_keeps_the_writable_layer(image: str) -> None:
    name = unique("restart")
    sb = corral.sync.Sandbox.create(name, image=image, network=NONE)
    try:
        sb.fs.write("/root/kept.txt", b"still here")
        first_init = sb.state.init_pid
        sb.stop()
        assert sb.status == state.STOPPED
        sb.start()
        assert sb.status == state.RUNNING
        assert sb.state.init_pid != first_init
        assert sb.fs.read("/root/kept.txt") == b"still here"
        again = corral.sync.Sandbox.get(name)  # another handle sees the new init
        assert again.exec("cat", ["/root/kept.txt"]).stdout == b"still here"
        sb.start()  # running: nothing to do
    finally:
        sb.remove()
    assert cgroup_dirs(name) == []


def test_concurrent_creates_of_one_name_make_one_sandbox(image: str) -> None:
    import threading

    name = unique("race")
    outcomes: list[object] = []

    def attempt() -> None:
        try:
            outcomes.append(corral.sync.Sandbox.create(name, image=image, network=NONE))
        except SandboxExists as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=attempt) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    made = [o for o in outcomes if isinstance(o, corral.sync.Sandbox)]
    try:
        assert len(made) == 1 and len(outcomes) == 4, outcomes
        assert made[0].exec("true").ok
    finally:
        for sb in made:
            sb.remove()


def test_a_process_that_removes_and_exits_leaves_no_trash(image: str) -> None:
    """remove() deletes in a background thread; the process must finish it before exiting
    (the sync API's threads are daemons: the deleting thread must not inherit that)."""
    name = unique("trash")
    code = textwrap.dedent(
        f"""
        import corral.sync
        from corral import NetworkPolicy
        corral.sync.Sandbox.create({name!r}, image={image!r}, network=NetworkPolicy.none()).remove()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    trash = state.paths.sandboxes_dir() / gc.TRASH_DIR
    assert not any(p.name.startswith(f"{name}.") for p in trash.iterdir())


def test_logs_follow_yields_new_events_and_ends_when_the_sandbox_stops(image: str) -> None:
    async def scenario() -> list[str]:
        sb = await Sandbox.create(unique("follow"), image=image,
                                  network=NetworkPolicy.public_only())  # fmt: skip
        seen: list[str] = []
        try:

            async def follow() -> None:
                async for event in sb.logs(follow=True):
                    seen.append(f"{event.destination}:{event.port}:{event.action}")

            task = asyncio.create_task(follow())
            await sb.exec("sh", ["-c", "nc -w 1 10.66.0.98 9 </dev/null"])
            deadline = time.monotonic() + 10
            while not seen and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await sb.stop()
            await asyncio.wait_for(task, 10)  # ends by itself once the sandbox stopped
        finally:
            await sb.remove()
        return seen

    seen = run(scenario())
    assert "10.66.0.98:9:deny" in seen, seen  # type: ignore[operator]


def test_kill9_of_a_networked_supervisor_then_gc_removes_the_network(image: str) -> None:
    """netns, veth, nftables table and address lease of a crashed sandbox go with gc."""
    from corral.net import plumbing

    name = unique("netcrash")
    sb = corral.sync.Sandbox.create(name, image=image, network=NetworkPolicy.public_only())
    names = plumbing.names_for(name)
    assert os.path.exists(f"/run/netns/{names.netns}")
    recorded = state.read_supervisor_pid(sb.directory)
    assert recorded is not None
    os.kill(recorded[0], signal.SIGKILL)
    wait_for(lambda: not state.supervisor_alive(sb.directory), timeout=10,
             what="the supervisor to die")
    assert sb.status == state.CRASHED
    removed = gc.collect([name])
    assert any("network of" in line for line in removed), removed
    assert not os.path.exists(f"/run/netns/{names.netns}")
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f"{names.link}:" not in links and f"{names.link}@" not in links
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert names.table not in tables
    assert cgroup_dirs(name) == []
    # The address slot is free again: a new sandbox of the same name starts.
    with corral.sync.Sandbox.create(name, image=image, network=NetworkPolicy.public_only()) as again:
        assert again.exec("true").ok


def test_supervisors_follow_the_callers_network_namespace(
    image: str, world: world_mod.World
) -> None:
    """The sync twin's loop thread is shared and stays where it was created; supervisors
    must still start in the namespace of the thread that calls create (sync and async)."""
    corral.sync.Sandbox.list()  # the sync loop thread now exists, in some namespace

    async def async_create(name: str) -> str:
        sb = await Sandbox.create(name, image=image, network=NONE)
        try:
            recorded = state.read_supervisor_pid(sb.directory)
            assert recorded is not None
            return os.readlink(f"/proc/{recorded[0]}/ns/net")
        finally:
            await sb.remove()

    for enter in (world.in_inet, world.in_host, world.in_inet):
        with enter():
            want = os.readlink("/proc/thread-self/ns/net")
            with corral.sync.Sandbox.create(unique("ns"), image=image, network=NONE) as sb:
                recorded = state.read_supervisor_pid(sb.directory)
                assert recorded is not None
                assert os.readlink(f"/proc/{recorded[0]}/ns/net") == want
            loop = asyncio.new_event_loop()
            try:
                assert loop.run_until_complete(async_create(unique("ns"))) == want
            finally:
                loop.close()


@pytest.mark.parametrize("delay", [0.0, 0.005, 0.02, 0.06])
def test_a_cancelled_create_leaves_nothing(image: str, delay: float) -> None:
    name = unique("cancel")

    async def scenario() -> None:
        task = asyncio.create_task(Sandbox.create(name, image=image, network=NONE))
        await asyncio.sleep(delay)
        task.cancel()
        try:
            sb = await task
        except asyncio.CancelledError:
            return
        await sb.remove()  # it finished before the cancel arrived

    run(scenario())
    # The abandoned create goes on in its thread ("corral-step") until it has stopped
    # before claiming the name, or has started the sandbox and taken it down: only then can
    # "nothing left" be checked (polling the directory alone passed at once when the thread
    # had not yet created it, and proved nothing).
    wait_for(lambda: not _create_threads(), timeout=60, what="the cancelled create's thread")
    assert not state.sandbox_dir(name).exists()
    assert cgroup_dirs(name) == []


def _create_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "corral-step" and t.is_alive()]


def test_memory_limit_hit_oom_kills_only_the_command_and_says_so(image: str) -> None:
    """A command over the memory limit is OOM-killed (137, ``oom_killed``); the sandbox lives on.

    Through the SDK the init is a fork of the small fork-server zygote, as in production
    (a launcher-level test would fork the init from the large test runner instead).
    """
    name = unique("oom")
    with corral.sync.Sandbox.create(name, image=image, network=NONE, memory="64m") as sb:
        res = sb.exec("dd", ["if=/dev/zero", "of=/dev/null", "bs=200M", "count=1"])
        assert res.exit_code == 137 and res.oom_killed, res.stderr_text
        ok = sb.exec("echo", ["alive"])
        assert ok.stdout_text == "alive\n" and not ok.oom_killed
        killed = sb.exec("sh", ["-c", "kill -9 $$"])
        assert killed.exit_code == 137 and not killed.oom_killed  # a plain SIGKILL is not OOM
        assert sb.status == "running"
