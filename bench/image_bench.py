"""Pull + unpack of the tools test image from a local registry, and a cached resolve().

    .venv/bin/python bench/image_bench.py [--runs N]     (root: builds a test world)

The image (about 38 MB compressed in four gzip/zstd/plain layers, about 120 MB unpacked) is
pushed to Debian's docker-registry inside a hermetic test world. The baseline, measured in the
same run, is what a shell script would do: ``curl`` every blob and ``tar -x`` it with GNU tar
(no digest checks, no whiteouts, no uid shift, no safety). corral's figure includes verifying
every digest and diff_id, fsyncing blobs, whiteouts, the uid shift and the atomic renames.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import images as images_mod
from tests.support import registry as registry_mod
from tests.support import world as world_mod

from corral.runtime.images import ImageStore

TAR_FLAGS = {"gzip": ["-z"], "zstd": ["--zstd"], "none": []}


def _compression(media_type: str) -> str:
    return (
        "gzip" if media_type.endswith("gzip") else "zstd" if media_type.endswith("zstd") else "none"
    )


def baseline(world: world_mod.World, host: str, image: images_mod.BuiltImage, work: Path) -> float:
    root = work / "rootfs"
    root.mkdir()
    t0 = time.perf_counter()
    for layer in image.layers:
        blob = work / layer.digest.split(":")[1]
        url = f"http://{host}/v2/corral/tools/blobs/{layer.digest}"
        world.run_host(["curl", "-sfL", "-o", str(blob), url], check=True)
        subprocess.run(
            ["tar", "-x", *TAR_FLAGS[_compression(layer.media_type)], "-f", str(blob),
             "-C", str(root), "--numeric-owner"],
            check=True,
        )  # fmt: skip
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("image_bench: needs root (builds network namespaces)")
    image = images_mod.build_tools()
    w = world_mod.build()
    work = Path(tempfile.mkdtemp(prefix="corral-image-bench-"))
    try:
        reg = registry_mod.start(w, "plain", work / "registry")
        with w.in_host():
            images_mod.push(reg.client(), reg.host, "corral/tools", image)
        ref = f"{reg.host}/corral/tools:latest"
        base_times, pull_times = [], []
        for i in range(args.runs):
            run_dir = work / f"base-{i}"
            run_dir.mkdir()
            base_times.append(baseline(w, reg.host, image, run_dir))
            shutil.rmtree(run_dir)
            store = ImageStore(work / f"store-{i}", insecure_registries=[reg.host])
            with w.in_host():
                t0 = time.perf_counter()
                store.pull(ref)
                pull_times.append(time.perf_counter() - t0)
        resolve_times = []
        for _ in range(1000):
            t0 = time.perf_counter()
            store.resolve(ref)
            resolve_times.append(time.perf_counter() - t0)
        base, pull = statistics.median(base_times), statistics.median(pull_times)
        res = statistics.median(resolve_times)
        size = sum(layer.size for layer in image.layers) / 1e6
        print(f"tools image: {len(image.layers)} layers, {size:.1f} MB compressed")
        print(f"baseline curl + GNU tar  median {base:.2f} s over {args.runs} runs")
        print(f"corral pull + unpack     median {pull:.2f} s  ratio {pull / base:.2f}x baseline")
        print(f"corral resolve (cached)  median {res * 1e6:.0f} us  "
              f"({pull / res:,.0f}x faster than a pull)")  # fmt: skip
        registry_mod.stop(w, reg)
    finally:
        world_mod.destroy(w)
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
