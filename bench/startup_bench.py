"""Sandbox start-up: create -> exec ``true`` -> result -> remove, against baselines.

Run as root:  .venv/bin/python bench/startup_bench.py [--runs 50]

Measured in one run, on the same rootfs (the busybox test image, imported once; network
``none``, image cached):

* corral: ``Sandbox.create`` + ``exec("true")`` + ``remove()`` through the async SDK, with the
  supervisor forked by the SDK process's fork server (the default);
* corral with ``CORRAL_FORK_SERVER=0`` (every supervisor a fresh interpreter), fewer runs;
* bare bubblewrap: ``bwrap --unshare-all --ro-bind ROOTFS / true``;
* a bare process start: ``/bin/true`` through subprocess.

Prints median and p95 of each and the ratios corral/bwrap and corral/process. No packet
leaves the machine (network ``none``; bwrap unshares the network).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: Target of issue 3 for the median of create -> exec true -> remove on this machine.
TARGET_MS = 50.0


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def summary(label: str, values: list[float]) -> str:
    return (
        f"{label:<34} median {statistics.median(values):8.2f} ms   "
        f"p95 {percentile(values, 0.95):8.2f} ms   (n={len(values)})"
    )


def timed(func: Callable[[], object], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        func()
        out.append((time.perf_counter() - start) * 1000)
    return out


async def corral_cycles(image: str, runs: int, warmup: int) -> dict[str, list[float]]:
    from corral import NetworkPolicy, Sandbox

    phases: dict[str, list[float]] = {"total": [], "create": [], "exec": [], "remove": []}
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        sb = await Sandbox.create(f"bench-{os.getpid()}-{i}", image=image,
                                  network=NetworkPolicy.none())  # fmt: skip
        t1 = time.perf_counter()
        result = await sb.exec("true")
        t2 = time.perf_counter()
        await sb.remove()
        t3 = time.perf_counter()
        if result.exit_code != 0:
            raise SystemExit(f"exec true failed: {result}")
        if i >= warmup:
            phases["create"].append((t1 - t0) * 1000)
            phases["exec"].append((t2 - t1) * 1000)
            phases["remove"].append((t3 - t2) * 1000)
            phases["total"].append((t3 - t0) * 1000)
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("startup_bench needs root (sandboxes use namespaces and cgroups)")
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SystemExit("bubblewrap (bwrap) is not installed: run scripts/install.sh")

    home = tempfile.mkdtemp(prefix="corral-bench-home-")
    os.environ["CORRAL_HOME"] = home
    try:
        from tests.support import images

        from corral.runtime.images import ImageStore

        layout = images.write_oci_layout(
            images.build_busybox(), Path(home) / "busybox-oci", "bench"
        )
        image = "corral-bench/busybox:1"
        rootfs = ImageStore().import_path(layout, image).rootfs

        corral = asyncio.run(corral_cycles(image, args.runs, args.warmup))
        os.environ["CORRAL_FORK_SERVER"] = "0"
        exec_runs = max(5, args.runs // 5)
        no_fork_server = asyncio.run(corral_cycles(image, exec_runs, 1))["total"]
        del os.environ["CORRAL_FORK_SERVER"]

        bwrap_argv = [bwrap, "--unshare-all", "--ro-bind", str(rootfs), "/", "/bin/true"]
        subprocess.run(bwrap_argv, check=True)
        bare_bwrap = timed(lambda: subprocess.run(bwrap_argv, check=True), args.runs)
        bare_process = timed(lambda: subprocess.run(["/bin/true"], check=True), args.runs)
    finally:
        shutil.rmtree(home, ignore_errors=True)

    print("create -> exec true -> result -> remove (network none, image cached)")
    print(summary("corral (fork server)", corral["total"]))
    for phase in ("create", "exec", "remove"):
        print(summary(f"  of which {phase}", corral[phase]))
    print(summary("corral (CORRAL_FORK_SERVER=0)", no_fork_server))
    print(summary("bare bwrap --unshare-all true", bare_bwrap))
    print(summary("bare process (/bin/true)", bare_process))
    median = statistics.median(corral["total"])
    print(f"ratio corral / bwrap:   {median / statistics.median(bare_bwrap):6.1f}x")
    print(f"ratio corral / process: {median / statistics.median(bare_process):6.1f}x")
    verdict = "meets" if median < TARGET_MS else "misses"
    print(f"target median < {TARGET_MS:g} ms: {verdict} ({median:.1f} ms)")
    print(f"load average during the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
