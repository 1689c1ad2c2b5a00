"""cgroup layout and limits against fake cgroupfs directory trees (plain files, no kernel).

The real v1/hybrid path runs in tests/integration/test_isolation.py on this machine; pure v2
(what most users have) is only available here as a file layout, which is all corral touches.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from corral.errors import SandboxError
from corral.runtime import cgroups
from corral.runtime.cgroups import Cgroup, CgroupLimits

V2_SELF = "0::/user.slice/user-0.slice/session-1.scope\n"
HYBRID_SELF = """12:pids:/
11:memory:/process_api/abc
4:cpu,cpuacct:/
1:name=systemd:/
0::/
"""


def _v2_tree(root: Path) -> Path:
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    (root / "cgroup.subtree_control").write_text("")
    (root / "cgroup.procs").write_text("")
    return root


def _fake_kernel_v2(path: Path) -> None:
    """What the kernel creates in a new v2 cgroup directory (mkdir makes only the dir here)."""
    for name in ("cgroup.procs", "cgroup.kill", "memory.max", "memory.swap.max", "cpu.max",
                 "pids.max", "cgroup.controllers", "cgroup.subtree_control"):
        (path / name).write_text("")
    (path / "cgroup.controllers").write_text("cpu memory pids\n")


def test_own_cgroups_parses_v1_and_v2_lines() -> None:
    own = cgroups.own_cgroups(HYBRID_SELF)
    assert own["memory"] == "/process_api/abc"
    assert own["cpu"] == own["cpuacct"] == "/"
    assert own[""] == "/"
    assert "name=systemd" in own


def test_v2_plan_is_under_a_top_level_corral_directory(tmp_path: Path) -> None:
    root = _v2_tree(tmp_path / "cg")
    cg = cgroups.plan("corral-x-1", root, V2_SELF)
    assert cg.layout == "v2"
    assert cg.paths == (root / "corral" / "corral-x-1",)
    assert cg.unified == root / "corral" / "corral-x-1"


def test_v2_create_enables_controllers_and_writes_limits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _v2_tree(tmp_path / "cg")
    cg = cgroups.plan("sb", root, V2_SELF)
    real_mkdir = cgroups._mkdir

    def mkdir_like_kernel(path: Path, made: list[Path]) -> None:
        real_mkdir(path, made)
        _fake_kernel_v2(path)

    monkeypatch.setattr(cgroups, "_mkdir", mkdir_like_kernel)
    cgroups.create(cg, CgroupLimits(cpus=1.5, memory=256 << 20, pids_max=100))
    path = cg.paths[0]
    assert (root / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    assert (root / "corral" / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    assert (path / "memory.max").read_text() == str(256 << 20)
    assert (path / "memory.swap.max").read_text() == "0"
    assert (path / "cpu.max").read_text() == "150000 100000"
    assert (path / "pids.max").read_text() == "100"


def test_v2_existing_cgroup_is_a_clear_error(tmp_path: Path) -> None:
    root = _v2_tree(tmp_path / "cg")
    (root / "corral" / "sb").mkdir(parents=True)
    (root / "corral" / "cgroup.controllers").write_text("cpu memory pids")
    (root / "corral" / "cgroup.subtree_control").write_text("cpu memory pids")
    cg = cgroups.plan("sb", root, V2_SELF)
    with pytest.raises(SandboxError, match="it already exists"):
        cgroups.create(cg, CgroupLimits())


def _v1_tree(root: Path, hybrid: bool) -> Path:
    for c in ("memory", "cpu", "pids"):
        (root / c).mkdir(parents=True)
    (root / "memory" / "process_api" / "abc").mkdir(parents=True)
    if hybrid:
        (root / "unified").mkdir()
        (root / "unified" / "cgroup.procs").write_text("")
    return root


@pytest.mark.parametrize("hybrid", [False, True])
def test_v1_plan_nests_under_our_own_cgroup_per_controller(tmp_path: Path, hybrid: bool) -> None:
    root = _v1_tree(tmp_path / "cg", hybrid)
    cg = cgroups.plan("sb", root, HYBRID_SELF)
    assert cg.layout == ("hybrid" if hybrid else "v1")
    assert cg.v1 == {
        "memory": root / "memory" / "process_api" / "abc" / "sb",
        "cpu": root / "cpu" / "sb",
        "pids": root / "pids" / "sb",
    }
    assert cg.unified == ((root / "unified" / "sb") if hybrid else None)


def test_v1_create_writes_limits_including_swap(tmp_path: Path) -> None:
    root = _v1_tree(tmp_path / "cg", hybrid=True)
    cg = cgroups.plan("sb", root, HYBRID_SELF)
    # The kernel would create these files in the new directories; create them afterwards.
    cgroups.create(cg, CgroupLimits())
    (cg.v1["memory"] / "memory.memsw.limit_in_bytes").write_text("")
    cgroups._limit_v1(cg, CgroupLimits(cpus=0.25, memory=64 << 20, pids_max=50))
    assert (cg.v1["memory"] / "memory.limit_in_bytes").read_text() == str(64 << 20)
    assert (cg.v1["memory"] / "memory.memsw.limit_in_bytes").read_text() == str(64 << 20)
    assert (cg.v1["cpu"] / "cpu.cfs_quota_us").read_text() == "25000"
    assert (cg.v1["cpu"] / "cpu.cfs_period_us").read_text() == "100000"
    assert (cg.v1["pids"] / "pids.max").read_text() == "50"


def test_missing_v1_controller_is_named(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    (root / "memory").mkdir(parents=True)
    with pytest.raises(SandboxError, match="controller 'cpu' is not mounted"):
        cgroups.plan("sb", root, HYBRID_SELF)


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (CgroupLimits(memory=1024), "below the minimum"),
        (CgroupLimits(cpus=0), "cpus must be positive"),
    ],
)
def test_bad_limits_are_refused_before_anything_is_made(
    tmp_path: Path, limits: CgroupLimits, message: str
) -> None:
    root = _v1_tree(tmp_path / "cg", hybrid=False)
    cg = cgroups.plan("sb", root, HYBRID_SELF)
    with pytest.raises(SandboxError, match=message):
        cgroups.create(cg, limits)
    assert not cg.exists()


def test_failed_create_removes_what_it_made(tmp_path: Path) -> None:
    root = _v1_tree(tmp_path / "cg", hybrid=False)
    cg = cgroups.plan("sb", root, HYBRID_SELF)
    (root / "pids" / "sb").mkdir()  # a leftover makes the third mkdir fail
    with pytest.raises(SandboxError, match="already exists"):
        cgroups.create(cg, CgroupLimits())
    assert not cg.v1["memory"].exists() and not cg.v1["cpu"].exists()


def test_record_round_trip(tmp_path: Path) -> None:
    root = _v1_tree(tmp_path / "cg", hybrid=True)
    cg = cgroups.plan("sb", root, HYBRID_SELF)
    assert Cgroup.from_json(cg.to_json()) == cg


def test_cgroup_name_is_unique_per_state_dir(tmp_path: Path) -> None:
    a = cgroups.cgroup_name("box", tmp_path / "home1" / "box")
    b = cgroups.cgroup_name("box", tmp_path / "home2" / "box")
    assert a != b and a.startswith("corral-box-")


def test_oom_kills_reads_v1_and_v2_counters(tmp_path: Path) -> None:
    v1_root = _v1_tree(tmp_path / "v1", hybrid=False)
    v1 = cgroups.plan("sb", v1_root, HYBRID_SELF)
    cgroups.create(v1, CgroupLimits())
    assert v1.oom_kills() == 0
    (v1.v1["memory"] / "memory.oom_control").write_text(
        "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"
    )
    assert v1.oom_kills() == 3
    v2 = Cgroup("v2", (tmp_path / "v2cg",), unified=tmp_path / "v2cg")
    v2.paths[0].mkdir()
    (v2.paths[0] / "memory.events").write_text("low 0\nhigh 0\nmax 5\noom 2\noom_kill 2\n")
    assert v2.oom_kills() == 2


# -- cgroups made ahead of time (spares) ---------------------------------------------------


def test_spare_names_round_trip_and_reject_others() -> None:
    assert cgroups.parse_spare_name(cgroups.spare_name(123, 456789)) == (123, 456789)
    for other in ("corral-sb-1234abcd", "corral-spare-", "corral-spare-12", "corral-spare-x-1",
                  "corral-spare-1-2x", "corral-spare-١-2"):
        assert cgroups.parse_spare_name(other) is None


def test_hybrid_adopt_renames_v1_dirs_keeps_v2_and_writes_limits(tmp_path: Path) -> None:
    root = _v1_tree(tmp_path / "cg", hybrid=True)
    spare = cgroups.plan(cgroups.spare_name(1, 2), root, HYBRID_SELF)
    cgroups.create(spare, CgroupLimits())
    final = cgroups.plan("corral-sb-1", root, HYBRID_SELF)
    target = cgroups.adopted(spare, final)
    assert target.v1 == final.v1
    assert target.unified == spare.unified  # v2 directories cannot be renamed
    assert target.paths == (*final.v1.values(), spare.unified)
    cgroups.adopt(spare, target, CgroupLimits(memory=64 << 20, pids_max=50))
    assert all(p.is_dir() for p in target.paths)
    assert not any(p.exists() for p in spare.v1.values())
    assert (target.v1["memory"] / "memory.limit_in_bytes").read_text() == str(64 << 20)
    assert (target.v1["pids"] / "pids.max").read_text() == "50"


def test_v2_adopt_keeps_the_spare_directory(tmp_path: Path) -> None:
    root = _v2_tree(tmp_path / "cg")
    spare = cgroups.plan(cgroups.spare_name(1, 2), root, V2_SELF)
    (spare.paths[0]).mkdir(parents=True)
    target = cgroups.adopted(spare, cgroups.plan("corral-sb-1", root, V2_SELF))
    assert target == spare
    cgroups.adopt(spare, target, CgroupLimits(cpus=0.5, pids_max=10))
    assert (spare.paths[0] / "cpu.max").read_text() == "50000 100000"
    assert (spare.paths[0] / "pids.max").read_text() == "10"


def test_adopt_refuses_bad_limits_before_renaming(tmp_path: Path) -> None:
    root = _v1_tree(tmp_path / "cg", hybrid=False)
    spare = cgroups.plan(cgroups.spare_name(1, 2), root, HYBRID_SELF)
    cgroups.create(spare, CgroupLimits())
    target = cgroups.adopted(spare, cgroups.plan("corral-sb-1", root, HYBRID_SELF))
    with pytest.raises(SandboxError, match="below the minimum"):
        cgroups.adopt(spare, target, CgroupLimits(memory=1024))
    assert all(p.is_dir() for p in spare.paths)


def test_abandoned_spares_are_those_whose_maker_is_dead(tmp_path: Path) -> None:
    root = _v1_tree(tmp_path / "cg", hybrid=True)
    for owner in ((10, 1), (11, 1)):
        cgroups.create(cgroups.plan(cgroups.spare_name(*owner), root, HYBRID_SELF),
                       CgroupLimits())
    cgroups.create(cgroups.plan("corral-sb-1", root, HYBRID_SELF), CgroupLimits())
    found = cgroups.abandoned_spares(root, HYBRID_SELF, alive=lambda pid, start: pid == 11)
    assert sorted(str(p.relative_to(root)) for p in found) == [
        "cpu/corral-spare-10-1",
        "memory/process_api/abc/corral-spare-10-1",
        "pids/corral-spare-10-1",
        "unified/corral-spare-10-1",
    ]


def test_gc_finds_spares_below_another_process_cgroup(tmp_path: Path) -> None:
    """Spares are made below their maker's cgroup (``/process_api/<id>``); gc looks everywhere."""
    root = _v1_tree(tmp_path / "cg", hybrid=True)
    other_self = HYBRID_SELF.replace("/process_api/abc", "/process_api/xyz")
    (root / "memory/process_api/xyz").mkdir(parents=True)
    cgroups.create(cgroups.plan(cgroups.spare_name(10, 1), root, other_self), CgroupLimits())
    dead = lambda pid, start: False  # noqa: E731
    mine = cgroups.abandoned_spares(root, HYBRID_SELF, alive=dead)
    assert "memory/process_api/xyz/corral-spare-10-1" not in [
        str(p.relative_to(root)) for p in mine
    ]
    everywhere = cgroups.abandoned_spares(root, HYBRID_SELF, alive=dead, everywhere=True)
    assert "memory/process_api/xyz/corral-spare-10-1" in [
        str(p.relative_to(root)) for p in everywhere
    ]


def test_sandbox_cgroup_names_are_told_from_spares_and_others() -> None:
    name = cgroups.cgroup_name("my-box", Path("/var/lib/corral/sandboxes/my-box"))
    assert cgroups.is_sandbox_cgroup_name(name)
    assert not cgroups.is_sandbox_cgroup_name(cgroups.spare_name(10, 123456789012))
    assert not cgroups.is_sandbox_cgroup_name("corral-box")  # no digest
    assert not cgroups.is_sandbox_cgroup_name("corral--0123456789ab")  # no sandbox name
    assert not cgroups.is_sandbox_cgroup_name("corral-box-0123456789AB")  # not ours: upper case
    assert not cgroups.is_sandbox_cgroup_name("other-box-0123456789ab")


def test_orphaned_sandbox_cgroups_are_empty_old_and_anywhere(tmp_path: Path) -> None:
    """gc removes a sandbox cgroup no state directory leads to only when nothing is in it
    and it is not being set up right now (younger than the minimum age)."""
    root = _v1_tree(tmp_path / "cg", hybrid=True)
    other_self = HYBRID_SELF.replace("/process_api/abc", "/process_api/xyz")
    (root / "memory/process_api/xyz").mkdir(parents=True)
    names = {k: cgroups.cgroup_name(k, tmp_path / k) for k in ("empty", "busy", "nested")}
    for key, name in names.items():
        cg = cgroups.plan(name, root, other_self if key == "empty" else HYBRID_SELF)
        cgroups.create(cg, CgroupLimits())
        for p in cg.paths:
            (p / "cgroup.procs").write_text("4242\n" if key == "busy" else "")
            if key == "nested":
                (p / "leaf").mkdir()
    spare = cgroups.plan(cgroups.spare_name(10, 1), root, HYBRID_SELF)
    cgroups.create(spare, CgroupLimits())
    later = time.time() + cgroups.ORPHAN_MIN_AGE + 1
    found = cgroups.orphaned_sandbox_cgroups(root, HYBRID_SELF, now=later)
    assert sorted(str(p.relative_to(root)) for p in found) == [
        f"cpu/{names['empty']}",
        f"memory/process_api/xyz/{names['empty']}",
        f"pids/{names['empty']}",
        f"unified/{names['empty']}",
    ]
    assert cgroups.orphaned_sandbox_cgroups(root, HYBRID_SELF, now=time.time()) == []  # young
