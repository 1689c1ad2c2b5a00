"""Where the cgroup hierarchy is missing from a mount namespace, what corral mounts (pure).

The mountinfo and /proc/self/cgroup texts are those of real layouts: this machine's v1/v2
hybrid (one hierarchy per controller, seen from `ip netns exec`: a fresh /sys without
/sys/fs/cgroup), a systemd hybrid (cpu and cpuacct co-mounted), pure v2, and a mount
namespace that already shows the hierarchy.
"""

from __future__ import annotations

import pytest

from corral.errors import SandboxError
from corral.kernel import mountinfo
from corral.runtime import cgroupfs
from corral.runtime.cgroupfs import HierarchyMount

ROOT = "/sys/fs/cgroup"

#: /proc/self/cgroup of this machine's processes.
HERE_SELF = """9:name=systemd:/
8:pids:/
7:blkio:/
6:freezer:/
5:devices:/
4:memory:/process_api/5eac98a8e5ea6f711cfc7cd621e2894c
3:cpuset:/
2:cpuacct:/
1:cpu:/
0::/
"""

SYSTEMD_HYBRID_SELF = """12:pids:/user.slice/user-0.slice/session-1.scope
11:memory:/user.slice/user-0.slice/session-1.scope
4:cpu,cpuacct:/user.slice
1:name=systemd:/user.slice/user-0.slice/session-1.scope
0::/user.slice/user-0.slice/session-1.scope
"""

V2_SELF = "0::/user.slice/user-0.slice/session-1.scope\n"

#: /proc/self/mountinfo under `ip netns exec`: a fresh sysfs on /sys, no cgroup mounts.
NETNS_EXEC_MOUNTINFO = b"""48 47 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
50 48 0:21 / /proc rw,relatime - proc proc rw
63 48 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw,size=12334096k,mode=755
51 48 0:40 / /sys rw,relatime - sysfs uxa-p rw
"""

#: The same, in the host's namespace: the hierarchies are there.
HOST_MOUNTINFO = b"""27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
23 27 0:22 / /sys rw,relatime - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""

V2_HOST_MOUNTINFO = b"""27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
23 27 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:3 - cgroup2 cgroup2 rw
"""

#: A container whose /sys is a shared mount (propagates to the host's peer group).
SHARED_SYS_MOUNTINFO = b"""48 47 254:0 / / rw,relatime master:1 - ext4 /dev/vda rw
51 48 0:40 / /sys rw,relatime shared:7 - sysfs sysfs rw
"""


def test_this_machine_under_ip_netns_exec_gets_tmpfs_then_each_wanted_hierarchy() -> None:
    plan = cgroupfs.mount_plan(HERE_SELF, NETNS_EXEC_MOUNTINFO, ROOT)
    assert plan == [
        HierarchyMount(ROOT, "tmpfs", cgroupfs.TMPFS_OPTIONS),
        HierarchyMount(f"{ROOT}/pids", "cgroup", "pids"),
        HierarchyMount(f"{ROOT}/memory", "cgroup", "memory"),
        HierarchyMount(f"{ROOT}/cpu", "cgroup", "cpu"),
        HierarchyMount(f"{ROOT}/unified", "cgroup2", ""),
    ]
    assert cgroupfs.describe(plan) == "pids, memory, cpu, unified"


def test_co_mounted_controllers_keep_their_exact_set_and_get_systemd_links() -> None:
    plan = cgroupfs.mount_plan(SYSTEMD_HYBRID_SELF, NETNS_EXEC_MOUNTINFO, ROOT)
    assert (
        HierarchyMount(f"{ROOT}/cpu,cpuacct", "cgroup", "cpu,cpuacct", ("cpu", "cpuacct")) in plan
    )
    assert [m.target for m in plan if m.fstype == "cgroup"] == [
        f"{ROOT}/pids",
        f"{ROOT}/memory",
        f"{ROOT}/cpu,cpuacct",
    ]
    assert not any("systemd" in m.target for m in plan)  # named hierarchies are not ours


def test_pure_v2_mounts_cgroup2_at_the_root_itself() -> None:
    plan = cgroupfs.mount_plan(V2_SELF, NETNS_EXEC_MOUNTINFO, ROOT)
    assert plan == [HierarchyMount(ROOT, "cgroup2", "")]


@pytest.mark.parametrize(("own", "mountinfo"), [(HERE_SELF, HOST_MOUNTINFO),
                                                (V2_SELF, V2_HOST_MOUNTINFO)])  # fmt: skip
def test_nothing_is_mounted_where_the_hierarchy_is_visible(own: str, mountinfo: bytes) -> None:
    assert cgroupfs.mount_plan(own, mountinfo, ROOT) == []


def test_a_shared_covering_mount_is_refused_with_what_to_do() -> None:
    with pytest.raises(SandboxError) as err:
        cgroupfs.mount_plan(V2_SELF, SHARED_SYS_MOUNTINFO, ROOT)
    text = str(err.value)
    assert "/sys is a shared mount" in text and "unshare -m" in text


def test_no_hierarchy_at_all_is_one_sentence() -> None:
    with pytest.raises(SandboxError, match="lists no cgroup hierarchy"):
        cgroupfs.mount_plan("", NETNS_EXEC_MOUNTINFO, ROOT)


def test_mountinfo_parsing_unescapes_points_and_reads_the_fstype_after_the_dash() -> None:
    entries = mountinfo.parse_entries(
        b"31 23 0:28 / /sys/fs/with\\040space rw shared:3 master:2 - cgroup2 cgroup2 rw\n"
        b"garbage line\n"
    )
    assert len(entries) == 1
    assert entries[0].point == "/sys/fs/with space"
    assert entries[0].fstype == "cgroup2" and entries[0].shared


def test_hierarchies_reads_wanted_v1_controllers_and_the_v2_line() -> None:
    assert cgroupfs.hierarchies(SYSTEMD_HYBRID_SELF) == (
        [("pids",), ("memory",), ("cpu", "cpuacct")],
        True,
    )
    assert cgroupfs.hierarchies(V2_SELF) == ([], True)
