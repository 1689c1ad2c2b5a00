"""Sandbox density: host memory per idle sandbox, and whether create slows down with many.

Run as root:  .venv/bin/python bench/density_bench.py [--count 100] [--network both]

Creates COUNT idle sandboxes (busybox test image) through the async SDK, first with network
``none``, then (``--network both``, the default, or ``public-only``) COUNT networked ones
(``public-only``: a netns, veth, nftables table and proxies each), inside the host namespace
of a private test world (tests/support/world.py), and measures, with all of a kind running:

* PSS (proportional set size, /proc/<pid>/smaps_rollup) of each sandbox's supervisor plus
  every process in its cgroup (the init and its pre-forked spare worker): shared pages are
  split between the processes sharing them, so the sum over sandboxes is what they cost;
* the drop of MemAvailable (/proc/meminfo) from before the first create to after the last,
  divided by COUNT: the host's view, including kernel memory (page tables, namespaces,
  cgroups, the overlay mounts) that PSS does not show;
* create time of the COUNT-th sandbox relative to the first (and of the last ten relative
  to the first ten, less noisy).

Targets: issue 3, network none: under 30 MiB per sandbox, ratio under 2; issue 9, networked:
under 10 MiB of host memory per sandbox, the COUNT-th create no slower than 1.5x the first.
Every sandbox is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MIB = 1024 * 1024
#: (MiB per sandbox, last/first create) targets per network kind.
TARGETS = {"none": (30.0, 2.0), "public-only": (10.0, 1.5)}


def pss_bytes(pid: int) -> int:
    """PSS of one process in bytes (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def sandbox_pids(cgroup_paths: str) -> set[int]:
    pids: set[int] = set()
    for path in cgroup_paths.split():
        try:
            pids |= {int(p) for p in Path(path, "cgroup.procs").read_text().split()}
        except OSError:
            continue
    return pids


async def run(count: int, kind: str) -> None:
    from corral import NetworkPolicy, Sandbox
    from corral.runtime import state

    network = NetworkPolicy.none() if kind == "none" else NetworkPolicy.public_only()
    # Warm up once (fork server start, image store, page cache) so sandbox 1 is typical.
    warm = await Sandbox.create(f"density-warm-{os.getpid()}", image=IMAGE, network=network)
    await warm.remove()
    await asyncio.sleep(0.5)
    before = mem_available()
    sandboxes = []
    create_ms: list[float] = []
    try:
        for i in range(count):
            start = time.perf_counter()
            sb = await Sandbox.create(f"density-{os.getpid()}-{kind[0]}{i}", image=IMAGE,
                                      network=network)  # fmt: skip
            create_ms.append((time.perf_counter() - start) * 1000)
            sandboxes.append(sb)
        await asyncio.sleep(1.0)  # let the sandboxes settle into idle
        after = mem_available()
        per_sandbox = []
        supervisors = []
        for sb in sandboxes:
            recorded = state.read_supervisor_pid(sb.directory)
            assert recorded is not None
            pids = {recorded[0]} | sandbox_pids(sb.state.cgroup or "")
            supervisors.append(pss_bytes(recorded[0]))
            per_sandbox.append(sum(pss_bytes(p) for p in pids))
    finally:
        for sb in sandboxes:
            await sb.remove()

    pss = statistics.mean(per_sandbox) / MIB
    avail = (before - after) / count / MIB
    first, last = create_ms[0], create_ms[-1]
    head = statistics.median(create_ms[:10])
    tail = statistics.median(create_ms[-10:])
    target_mib, target_ratio = TARGETS[kind]
    print(f"{count} idle sandboxes (network {kind})")
    print(f"PSS per sandbox (supervisor + sandbox processes): {pss:6.2f} MiB "
          f"(supervisor alone {statistics.mean(supervisors) / MIB:.2f} MiB)")  # fmt: skip
    print(f"MemAvailable drop per sandbox:                    {avail:6.2f} MiB")
    print(f"create time: first {first:.1f} ms, {count}th {last:.1f} ms, "
          f"ratio {last / first:.2f}")  # fmt: skip
    print(f"create time: median of first 10 {head:.1f} ms, of last 10 {tail:.1f} ms, "
          f"ratio {tail / head:.2f}")  # fmt: skip
    worst = max(pss, avail)
    print(f"target < {target_mib:g} MiB per sandbox: "
          f"{'meets' if worst < target_mib else 'misses'}"
          f" ({worst:.1f} MiB, the larger of the two measures)")  # fmt: skip
    print(f"target ratio <= {target_ratio:g}: "
          f"{'meets' if tail / head <= target_ratio else 'misses'}"
          f" (last 10 vs first 10; single first/last: {last / first:.2f})")  # fmt: skip
    print(f"load average during the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


IMAGE = "corral-bench/busybox:1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--network", choices=("none", "public-only", "both"), default="both")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("density_bench needs root (sandboxes use namespaces and cgroups)")
    home = tempfile.mkdtemp(prefix="corral-density-home-")
    os.environ["CORRAL_HOME"] = home
    try:
        from tests.support import images, netns
        from tests.support import world as world_mod

        from corral.runtime.images import ImageStore

        layout = images.write_oci_layout(
            images.build_busybox(), Path(home) / "busybox-oci", "bench"
        )
        ImageStore().import_path(layout, IMAGE)
        kinds = ["none", "public-only"] if args.network == "both" else [args.network]
        w = world_mod.build(f"bd{os.getpid() % 10000}")
        back = netns.enter_for_good(w.host_ns)
        try:
            for kind in kinds:
                asyncio.run(run(args.count, kind))
        finally:
            from corral.lifecycle import spawn

            spawn.close_fork_server()
            netns.leave(back)
            world_mod.destroy(w)
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
