"""Isolation: namespaces, users, host invisibility, limits, seccomp, capabilities, cleanup."""

from __future__ import annotations

import errno
import os
import select
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.errors import SandboxError
from corral.runtime import capabilities, launcher
from corral.runtime.channel import ChannelClient
from corral.runtime.images.idmap import UID_BASE
from tests.support.sandbox import assert_no_debris, launched, run, sh, spec_for
from tests.support.waiting import wait_for


@pytest.fixture(scope="module")
def sb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[launcher.Launched]:
    with launched(tmp_path_factory.mktemp("iso") / "sb", name="iso-box") as s:
        yield s


def _host_pid_of(sb: launcher.Launched, ns_pid: int) -> int:
    for pid in sb.cgroup.pids():
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:") and int(line.split()[-1]) == ns_pid:
                    return pid
    raise AssertionError(f"pid {ns_pid} of the sandbox not found in its cgroup")


def test_hostname_is_the_sandbox_name(sb: launcher.Launched) -> None:
    assert run(sh(sb, "hostname; cat /etc/hostname"))[1] == "iso-box\niso-box\n"


def test_etc_files_written_by_corral(tmp_path: Path) -> None:
    with launched(
        tmp_path / "sb",
        name="etc-box",
        hosts=[("db.internal", "10.1.2.3")],  # (name, address), as LaunchSpec.hosts has them
        resolv_conf="nameserver 10.0.0.1\n",
        extra_files={"/usr/local/share/ca.pem": b"PEM", "/etc/motd": b"hi"},
    ) as s:
        code, out, _ = run(sh(s, "cat /etc/hosts; cat /etc/resolv.conf; cat /usr/local/share/ca.pem"))
    assert "10.1.2.3\tdb.internal\n" in out and "127.0.1.1\tetc-box\n" in out
    assert "nameserver 10.0.0.1\n" in out and out.endswith("PEM")


def test_root_inside_is_uid_base_outside(sb: launcher.Launched) -> None:
    async def go() -> list[int]:
        c = await ChannelClient.connect(sb.channel_path)
        procs = []
        try:
            procs = [await c.exec(["sleep", "100"]), await c.exec(["sleep", "100"], user="app")]
            uids = []
            for p in procs:
                with open(f"/proc/{_host_pid_of(sb, p.pid)}/status") as f:
                    uids.append(next(int(x.split()[1]) for x in f if x.startswith("Uid:")))
            return uids
        finally:
            for p in procs:
                await p.kill()
                await p.wait()
            await c.close()

    assert run(go()) == [UID_BASE, UID_BASE + 1000]


def test_host_processes_are_invisible(sb: launcher.Launched) -> None:
    marker = f"{os.getpid() % 1000 + 70000}"
    host = subprocess.Popen(["sleep", marker])
    try:
        code, out, _ = run(sh(sb, "ps -o pid,args; ls /proc | grep -c '^[0-9]'"))
    finally:
        host.kill()
        host.wait()
    assert f"sleep {marker}" not in out
    assert int(out.split()[-1]) < 10  # init, a worker, sh, ps/ls


def test_host_files_are_invisible(sb: launcher.Launched) -> None:
    code, out, _ = run(sh(sb, "cat /etc/os-release; ls /work /var/lib/corral /home/app/.. 2>&1; "
                              "ls /proc/1/root/ | head -3; cat /proc/1/cmdline >/dev/null; echo"))
    assert "ID=corral-test-busybox" in out
    assert "ls: /work: No such file or directory" in out
    assert os.path.exists("/work")


def test_fresh_netns_has_only_loopback(sb: launcher.Launched) -> None:
    code, out, _ = run(sh(sb, "ls /sys/class/net 2>/dev/null; ip -o link | cut -d: -f2"))
    assert out.split() == ["lo"]


def test_joins_a_given_netns(tmp_path: Path) -> None:
    name = f"cwl-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1"], check=True)
        with launched(tmp_path / "sb", name="ns-box", netns_path=f"/run/netns/{name}") as s:
            _, links, _ = run(sh(s, "ip -o link | cut -d: -f2"))
            code, _, err = run(sh(s, "ip link set probe0 up"))
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)
    assert "probe0@probe1" in links.split()
    assert code != 0 and "Operation not permitted" in err  # cannot reconfigure corral's links


def test_capabilities_are_the_documented_set(sb: launcher.Launched) -> None:
    code, out, _ = run(sh(sb, "grep -E '^Cap(Eff|Bnd|Inh|Amb)|^NoNewPrivs|^Seccomp:' /proc/self/status"))
    fields = dict(line.split(":\t") for line in out.splitlines())
    mask = capabilities.mask_of(capabilities.SANDBOX_CAPABILITIES)
    assert int(fields["CapEff"], 16) == mask and int(fields["CapBnd"], 16) == mask
    assert int(fields["CapInh"], 16) == 0 and int(fields["CapAmb"], 16) == 0
    assert fields["NoNewPrivs"] == "1" and fields["Seccomp"] == "2"
    _, out, _ = run(sh(sb, "grep ^CapEff /proc/self/status", user="app"))
    assert int(out.split()[1], 16) == 0


def test_init_cannot_be_traced_or_read(sb: launcher.Launched) -> None:
    code, out, _ = run(sh(sb, "cat /proc/1/environ >/dev/null 2>&1 && echo readable || echo denied"))
    assert out == "denied\n"


SECCOMP_PROBE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <linux/perf_event.h>

static void report(const char *name, long rc) { printf("%s %d\n", name, rc < 0 ? errno : 0); }

int main(void) {
    struct perf_event_attr pe; memset(&pe, 0, sizeof pe); pe.size = sizeof pe;
    pe.type = PERF_TYPE_SOFTWARE; pe.config = PERF_COUNT_SW_CPU_CLOCK; pe.exclude_kernel = 1;
    char handle[128 + 8]; int mount_id; memset(handle, 0, sizeof handle);
    *(unsigned int *)handle = 128;
    struct timespec ts = {0, 0};
    long params[30]; memset(params, 0, sizeof params);
    report("keyctl", syscall(SYS_keyctl, 0 /*GET_KEYRING_ID*/, -3 /*SESSION*/, 1));
    report("add_key", syscall(SYS_add_key, "user", "k", "v", 1, -2));
    report("userfaultfd", syscall(SYS_userfaultfd, 1 /*UFFD_USER_MODE_ONLY*/));
    report("unshare_user", syscall(SYS_unshare, CLONE_NEWUSER));
    report("io_uring_setup", syscall(SYS_io_uring_setup, 4, params));
    report("name_to_handle_at", syscall(SYS_name_to_handle_at, AT_FDCWD, "/", handle, &mount_id, 0));
    report("perf_event_open", syscall(SYS_perf_event_open, &pe, 0, -1, -1, 0));
    report("bpf", syscall(SYS_bpf, 0, params, 0));
    report("kexec_load", syscall(SYS_kexec_load, 0, 0, 0, 0));
    report("init_module", syscall(SYS_init_module, 0, 0, ""));
    report("mount", syscall(SYS_mount, "none", "/tmp", "tmpfs", 0, 0));
    report("clock_settime", syscall(SYS_clock_settime, CLOCK_REALTIME, &ts));
    report("reboot", syscall(SYS_reboot, 0, 0, 0, 0));
    report("clone3", syscall(SYS_clone3, 0, 0));
    report("getpid", syscall(SYS_getpid));
    return 0;
}
"""


@pytest.fixture(scope="session")
def seccomp_probe(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    d = tmp_path_factory.mktemp("probe")
    (d / "probe.c").write_text(SECCOMP_PROBE)
    res = subprocess.run(["gcc", "-static", "-O1", "-o", str(d / "probe"), str(d / "probe.c")],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.fail(f"cannot compile the seccomp probe: {res.stderr}")
    return (d / "probe").read_bytes()


def _probe(sb: launcher.Launched, binary: bytes, user: str | None = None) -> dict[str, int]:
    async def go() -> str:
        c = await ChannelClient.connect(sb.channel_path)
        try:
            await c.write_file("/tmp/probe", binary, mode=0o755)
        finally:
            await c.close()
        return (await sh(sb, "/tmp/probe", user=user))[1]

    return {k: int(v) for k, v in (line.split() for line in run(go()).splitlines())}


def test_seccomp_denials(sb: launcher.Launched, seccomp_probe: bytes) -> None:
    results = _probe(sb, seccomp_probe)
    clone3 = results.pop("clone3")
    assert results.pop("getpid") == 0
    assert results == {name: errno.EPERM for name in results}, results
    assert clone3 == errno.ENOSYS


def test_without_seccomp_the_probe_would_succeed(seccomp_probe: bytes, tmp_path: Path) -> None:
    """Control: on the host several probed calls succeed, so EPERM above is the filter's."""
    (tmp_path / "probe").write_bytes(seccomp_probe)
    os.chmod(tmp_path / "probe", 0o755)
    out = subprocess.run([str(tmp_path / "probe")], capture_output=True, text=True).stdout
    results = {k: int(v) for k, v in (line.split() for line in out.splitlines())}
    for name in ("keyctl", "add_key", "name_to_handle_at", "io_uring_setup"):
        assert results[name] == 0, (name, results)


def test_cgroup_limits_are_written(tmp_path: Path) -> None:
    with launched(tmp_path / "sb", name="lim", cpus=0.5, memory=96 << 20, pids_max=77) as s:
        if s.cgroup.layout == "v2":
            base = s.cgroup.paths[0]
            assert (base / "memory.max").read_text().strip() == str(96 << 20)
            assert (base / "cpu.max").read_text().split() == ["50000", "100000"]
            assert (base / "pids.max").read_text().strip() == "77"
        else:
            mem = s.cgroup.v1["memory"]
            assert int((mem / "memory.limit_in_bytes").read_text()) == 96 << 20
            assert int((s.cgroup.v1["cpu"] / "cpu.cfs_quota_us").read_text()) == 50000
            assert (s.cgroup.v1["pids"] / "pids.max").read_text().strip() == "77"
        # The sandbox sees its own cgroup as the root (cgroup namespace).
        assert run(sh(s, "cat /proc/self/cgroup"))[1].count(":/\n") >= 3


def test_cpu_quota_throttles(tmp_path: Path) -> None:
    with launched(tmp_path / "sb", name="cpu", cpus=0.2) as s:
        run(sh(s, "timeout 1 sh -c 'while :; do :; done'"))
        stat_file = (s.cgroup.paths[0] / "cpu.stat") if s.cgroup.layout == "v2" else (
            s.cgroup.v1["cpu"] / "cpu.stat")
        stats = dict(line.split() for line in stat_file.read_text().splitlines())
    assert int(stats["nr_throttled"]) > 0


def test_fork_bomb_is_stopped_by_the_pids_limit(tmp_path: Path) -> None:
    with launched(tmp_path / "sb", name="bomb", pids_max=64) as s:
        code, _, _ = run(sh(s, "bomb() { bomb | bomb & }; bomb; sleep 1", timeout=3))
        pids_dir = s.cgroup.paths[0] if s.cgroup.layout == "v2" else s.cgroup.v1["pids"]
        events = (pids_dir / "pids.events").read_text()
        assert int(events.split()[-1]) > 0  # "max N": forks refused at the limit
        # The sandbox recovers and the host is fine. Until the bomb's last processes have
        # died, an exec may itself be refused at the limit: that is "not yet", not a failure.

        def recovered() -> bool:
            try:
                return run(sh(s, "true"))[0] == 0
            except SandboxError as exc:
                if "pids_max" not in str(exc):
                    raise
                return False

        wait_for(recovered, timeout=30, what="the sandbox to recover")
        assert run(sh(s, "echo ok"))[1] == "ok\n"
    assert subprocess.run(["true"]).returncode == 0


def test_stop_kills_processes_that_ignore_sigterm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The init forwards SIGTERM, the stubborn process ignores it and is still there when
    the grace period ends, so stop() SIGKILLs the cgroup, and then nothing is left. (No
    timing: a process that ignores SIGTERM and sleeps 1000 s can only have gone by the
    cgroup's SIGKILL.)"""
    with launched(tmp_path / "sb", name="stubborn") as s:
        run(sh(s, "(trap '' TERM; sleep 1000) > /dev/null 2>&1 & echo"))
        stubborn = wait_for(lambda: _sleepers(s), timeout=10, what="the stubborn sleep")
        assert all(_ignores_sigterm(pid) for pid in stubborn)
        pidfds = [os.pidfd_open(pid) for pid in stubborn]
        alive_at_kill: list[bool] = []
        kill = launcher.Cgroup.kill

        def spied_kill(cgroup: launcher.Cgroup) -> None:
            if not alive_at_kill:  # stop()'s first kill: the grace period is over
                alive_at_kill.append(all(not _exited(fd) for fd in pidfds))
            kill(cgroup)

        monkeypatch.setattr(launcher.Cgroup, "kill", spied_kill)
        try:
            launcher.stop(s, grace=0.5)
            assert alive_at_kill == [True], "SIGTERM alone took the stubborn process down"
            assert all(_exited(fd) for fd in pidfds)
        finally:
            for fd in pidfds:
                os.close(fd)
        monkeypatch.undo()
        assert_no_debris(s)
        launcher.stop(s)  # idempotent


def _sleepers(s: launcher.Launched) -> list[int]:
    """Host pids of the sandbox's `sleep 1000` processes."""
    found = []
    for pid in s.cgroup.pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().split(b"\0")[:2] == [b"sleep", b"1000"]:
                    found.append(pid)
        except OSError:
            continue
    return found


def _ignores_sigterm(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        ignored = next(line for line in f if line.startswith("SigIgn:")).split()[1]
    return bool(int(ignored, 16) & (1 << (signal.SIGTERM - 1)))


def _exited(pidfd: int) -> bool:
    return bool(select.select([pidfd], [], [], 0)[0])


def test_launch_failure_leaves_no_debris(tmp_path: Path) -> None:
    state = tmp_path / "sb"
    with pytest.raises(SandboxError, match="join network namespace '/nonexistent/netns'"):
        launcher.launch(spec_for(state, netns_path="/nonexistent/netns"))
    record = launcher.Cgroup.from_json((state / launcher.CGROUP_RECORD).read_text())
    assert not record.exists()
    assert not (state / launcher.CHANNEL_SOCKET).exists()
    with pytest.raises(SandboxError, match="rootfs '/nonexistent' is not a directory"):
        launcher.launch(spec_for(state, rootfs=Path("/nonexistent")))


def _launch_in_child(state: Path, die_with_parent: bool) -> tuple[int, int]:
    """Launch from a forked 'supervisor' that is then SIGKILLed; returns (supervisor, init)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            sb = launcher.launch(spec_for(state, name="orphan", die_with_parent=die_with_parent))
            os.write(w, str(sb.init_pid).encode())
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(w)
    init_pid = int(os.read(r, 64))
    os.close(r)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return pid, init_pid


@pytest.mark.parametrize("die_with_parent", [True, False])
def test_cleanup_leftovers_after_a_supervisor_crash(tmp_path: Path, die_with_parent: bool) -> None:
    state = tmp_path / "sb"
    _, init_pid = _launch_in_child(state, die_with_parent)
    record = launcher.Cgroup.from_json((state / launcher.CGROUP_RECORD).read_text())
    if die_with_parent:
        wait_for(lambda: not record.pids(), timeout=10, what="the sandbox to die with its supervisor")
    else:
        assert record.pids(), "the sandbox should survive when die_with_parent=False"
    launcher.cleanup_leftovers(state)
    assert not record.exists() and not record.pids()
    assert not (state / launcher.CHANNEL_SOCKET).exists()


def test_init_reaps_orphans(sb: launcher.Launched) -> None:
    """Orphans are reparented to the sandbox's pid 1, which must reap them (no zombies)."""
    run(sh(sb, "for i in 1 2 3 4 5; do (sleep 0.05 &) ; done; sleep 0.3"))
    # The orphans have exited (sleep 0.3 > 0.05); the init reaps them as their SIGCHLD comes.
    zombies = "ps -o stat,args | grep -c '^ *Z' || true"
    wait_for(lambda: run(sh(sb, zombies))[1].strip() == "0", timeout=10, what="no zombies")


def test_stop_sends_sigterm_first(tmp_path: Path) -> None:
    """A process that traps SIGTERM gets to run its handler before the sandbox goes away."""
    with launched(tmp_path / "sb", name="graceful") as s:
        code, _, _ = run(sh(s, "(trap 'echo bye > /var/tmp/bye; exit 0' TERM; "
                               "touch /var/tmp/trapped; "
                               "while :; do sleep 0.05; done) > /dev/null 2>&1 & echo"))
        trapped = tmp_path / "sb" / launcher.UPPER_DIR / "var/tmp/trapped"
        wait_for(trapped.exists, timeout=10, what="the trap to be installed")
        launcher.stop(s, grace=3.0)
    assert (tmp_path / "sb" / launcher.UPPER_DIR / "var/tmp/bye").read_text() == "bye\n"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"name": ""}, "sandbox name .. is not a valid hostname"),
        ({"name": "has space"}, "sandbox name .has space. is not a valid hostname"),
        ({"name": "a/b"}, "sandbox name 'a/b' is not a valid hostname"),
        ({"workdir": "relative"}, "workdir 'relative' must be an absolute path"),
        ({"pids_max": 2}, "pids_max 2 is too small"),
        ({"memory": 1000}, "memory limit 1000 bytes is below the minimum"),
        ({"user": "ghost"}, "user 'ghost': 'ghost' is not in the image's /etc/passwd"),
    ],
)
def test_bad_specs_are_refused_with_one_sentence(
    tmp_path: Path, overrides: dict[str, object], message: str
) -> None:
    state = tmp_path / "sb"
    with pytest.raises(SandboxError, match=message):
        launcher.launch(spec_for(state, **overrides))
    launcher.cleanup_leftovers(state)
    if (state / launcher.CGROUP_RECORD).exists():
        assert not launcher.Cgroup.from_json((state / launcher.CGROUP_RECORD).read_text()).exists()


def test_missing_workdir_is_created(tmp_path: Path) -> None:
    with launched(tmp_path / "sb", name="wd", workdir="/srv/app") as s:
        assert run(sh(s, "pwd"))[1] == "/srv/app\n"


def test_restart_keeps_the_writable_layer(tmp_path: Path) -> None:
    """stop + launch on the same state directory: what the sandbox wrote is still there."""
    with launched(tmp_path / "sb", name="again") as s:
        run(sh(s, "echo kept > /root/note"))
    with launched(tmp_path / "sb", name="again") as s:
        assert run(sh(s, "cat /root/note"))[1] == "kept\n"


def test_deep_state_directory_beyond_sun_path(tmp_path: Path) -> None:
    """A socket path longer than sun_path's 108 bytes still works (bound through the dir fd)."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with launched(deep / "sb", name="deep") as s:
        assert len(str(s.channel_path)) > 108
        assert run(sh(s, "echo deep"))[1] == "deep\n"


def test_nul_byte_in_env_is_an_error_not_a_dead_worker(sb: launcher.Launched) -> None:
    with pytest.raises(SandboxError, match="exec failed in the sandbox for 'sh': embedded null byte"):
        run(sh(sb, "true", env={"X": "a\0b"}))
    assert run(sh(sb, "echo still"))[1] == "still\n"


I386_PROBE = r"""
int main(void) {
    long ret;
    /* getpid through the i386 ABI: a filter for x86_64 numbers must not be bypassed so. */
    __asm__ volatile ("int $0x80" : "=a"(ret) : "a"(20) : "memory");
    return ret > 0 ? 0 : 1;
}
"""


def test_other_syscall_abis_are_killed(sb: launcher.Launched, tmp_path: Path) -> None:
    (tmp_path / "i386.c").write_text(I386_PROBE)
    subprocess.run(["gcc", "-static", "-O1", "-o", str(tmp_path / "i386"), str(tmp_path / "i386.c")],
                   check=True, capture_output=True)
    host = subprocess.run([str(tmp_path / "i386")])
    assert host.returncode == 0  # works outside the sandbox

    async def go() -> int:
        c = await ChannelClient.connect(sb.channel_path)
        try:
            await c.write_file("/tmp/i386", (tmp_path / "i386").read_bytes(), mode=0o755)
        finally:
            await c.close()
        return (await sh(sb, "/tmp/i386"))[0]

    assert run(go()) == 128 + signal.SIGSYS


def test_stop_after_the_init_was_killed(tmp_path: Path) -> None:
    with launched(tmp_path / "sb", name="crashed") as s:
        run(sh(s, "sleep 1000 > /dev/null 2>&1 & echo"))
        os.kill(s.init_pid, signal.SIGKILL)  # the kernel kills the whole pid namespace
        wait_for(lambda: not s.alive(), timeout=10, what="the sandbox to die with its init")
    # launched() stopped it and asserted: no process, cgroup, mount or socket left.


def test_commands_inherit_no_descriptor_of_the_init(sb: launcher.Launched) -> None:
    _, out, _ = run(sh(sb, "ls /proc/self/fd"))
    assert sorted(int(x) for x in out.split()) == [0, 1, 2, 3]  # 3: ls's own directory fd


@pytest.mark.parametrize(
    "script",
    [
        "echo 3 > /proc/sys/vm/drop_caches",
        "echo h > /proc/sysrq-trigger",
        "hostname other",
        "dmesg",
        "head -c 1 /proc/kcore",
    ],
)
def test_host_kernel_knobs_are_out_of_reach(sb: launcher.Launched, script: str) -> None:
    code, _, _ = run(sh(sb, script))
    assert code != 0
    assert run(sh(sb, "hostname"))[1] == "iso-box\n"


def test_init_survives_a_persistent_fork_bomb(tmp_path: Path) -> None:
    """At the pids limit, execs fail with a sentence (or succeed) but the init lives on."""
    with launched(tmp_path / "sb", name="bomb2", pids_max=32) as s:
        run(sh(s, "(while :; do sleep 1000 & done) > /dev/null 2>&1 &"))
        pids_dir = s.cgroup.paths[0] if s.cgroup.layout == "v2" else s.cgroup.v1["pids"]
        events = pids_dir / "pids.events"  # "max N": forks refused at the limit
        wait_for(lambda: int(events.read_text().split()[-1]) > 0, timeout=30,
                 what="the bomb to reach the pids limit")
        errors = []
        for _ in range(5):
            try:
                run(sh(s, "true"))
            except SandboxError as e:
                errors.append(str(e))
        assert s.alive()
        # Whether a given exec finds a free slot depends on timing; a refusal is a sentence.
        assert all(e == "cannot start 'sh': the sandbox's process limit (pids_max) is reached"
                   for e in errors), errors
    # launched() stopped it: the bomb, the init and the cgroup are gone.
