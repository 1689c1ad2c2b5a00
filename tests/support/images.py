"""Test images built from this machine's own files, as OCI blobs ready to push or save.

Two images:

* ``busybox``: Debian's busybox-static as /bin/busybox plus a symlink per applet, /etc/passwd,
  /etc/group, /tmp, /root. One gzip layer. Cmd ["/bin/sh"].
* ``tools``: real clients (curl, python3 with a trimmed stdlib, dig, openssl, nc, sh) plus every
  shared library ``ldd`` finds for them, /etc/ssl/certs, in four layers of three compressions
  (gzip, zstd, none), the last of which whiteouts /opt/gone.txt and makes /opt/old opaque, so
  pulling it exercises every unpack path. After unpacking: /opt/keep.txt and /opt/old/new.txt
  exist, /opt/gone.txt and /opt/old/stale.txt do not.

Layers are cached as files under /var/tmp/corral-test-cache keyed by a hash of their inputs
(source paths, sizes, mtimes, modes, the builder version), so a test run builds each once.
The same ``BuiltImage`` can be pushed to a registry (monolithic uploads), written as a
``docker save`` tar, or written as an OCI image layout directory.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from corral.runtime.images.registry import RegistryClient

#: Where built layers are cached between runs (outside any test's temp dir on purpose).
CACHE_DIR = Path(os.environ.get("CORRAL_TEST_CACHE", "/var/tmp/corral-test-cache"))
#: Bump when the way layers are built changes, so stale cache entries are not reused.
BUILDER_VERSION = "3"
#: Fixed mtime of synthetic entries, so the same inputs give the same digests.
EPOCH = 1_700_000_000

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
LAYER_TYPES = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}

PYTHON_LIB = Path("/usr/lib/python3.11")
#: Stdlib parts the tools image leaves out: tests, GUI, build config, pip bootstrap.
PYTHON_SKIP = {
    "test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "pydoc_data",
    "site-packages", "dist-packages", "config-3.11-x86_64-linux-gnu", "venv", "unittest",
}  # fmt: skip
TOOL_BINARIES = ["/usr/bin/curl", "/usr/bin/dig", "/usr/bin/openssl", "/usr/bin/nc", "/bin/sh",
                 "/usr/bin/python3.11"]  # fmt: skip


@dataclass(frozen=True)
class Entry:
    """One tar member: a host file copied in, a directory, a symlink or literal bytes."""

    name: str
    kind: str  # "file", "dir", "symlink", "bytes"
    source: str | None = None
    data: bytes = b""
    target: str = ""
    mode: int = 0o755
    uid: int = 0
    gid: int = 0

    def fingerprint(self) -> str:
        if self.kind == "file" and self.source:
            st = os.stat(self.source)
            extra = f"{st.st_size}:{st.st_mtime_ns}:{st.st_mode}"
        else:
            extra = hashlib.sha256(self.data).hexdigest()
        return f"{self.name}|{self.kind}|{self.source}|{self.target}|{self.mode}|{self.uid}|{self.gid}|{extra}"


@dataclass(frozen=True)
class BuiltLayer:
    path: Path  # the (compressed) blob
    digest: str
    size: int
    diff_id: str
    media_type: str


@dataclass
class BuiltImage:
    name: str
    tag: str
    layers: list[BuiltLayer]
    config: bytes
    manifest: bytes = b""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def config_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.config).hexdigest()

    @property
    def manifest_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def build_layer(entries: Iterable[Entry], compression: str, cache: Path = CACHE_DIR) -> BuiltLayer:
    """A layer blob for ``entries`` (cached by content), compressed with gzip/zstd/none."""
    entries = list(entries)
    key_src = "\n".join([BUILDER_VERSION, compression, *(e.fingerprint() for e in entries)])
    key = hashlib.sha256(key_src.encode()).hexdigest()[:32]
    cache.mkdir(parents=True, exist_ok=True)
    blob, meta = cache / f"{key}.blob", cache / f"{key}.json"
    if blob.is_file() and meta.is_file():
        info = json.loads(meta.read_text())
        return BuiltLayer(blob, info["digest"], info["size"], info["diff_id"], info["media_type"])
    tmp_tar = Path(tempfile.mkstemp(dir=cache, prefix="tar-")[1])
    tmp_blob = Path(tempfile.mkstemp(dir=cache, prefix="blob-")[1])
    try:
        with tarfile.open(tmp_tar, "w", format=tarfile.PAX_FORMAT) as tar:
            for e in entries:
                info = tarfile.TarInfo(e.name)
                info.mode, info.uid, info.gid, info.mtime = e.mode, e.uid, e.gid, EPOCH
                if e.kind == "dir":
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif e.kind == "symlink":
                    info.type, info.linkname = tarfile.SYMTYPE, e.target
                    tar.addfile(info)
                elif e.kind == "bytes":
                    info.size = len(e.data)
                    tar.addfile(info, io.BytesIO(e.data))
                else:
                    assert e.source is not None
                    info.size = os.path.getsize(e.source)
                    with open(e.source, "rb") as f:
                        tar.addfile(info, f)
        diff_id = _sha256(tmp_tar)
        with open(tmp_tar, "rb") as src, open(tmp_blob, "wb") as dst:
            if compression == "gzip":
                with gzip.GzipFile(fileobj=dst, mode="wb", mtime=0, compresslevel=6) as gz:
                    shutil.copyfileobj(src, gz, 1 << 20)
            elif compression == "zstd":
                zstandard.ZstdCompressor(level=3).copy_stream(src, dst)
            else:
                shutil.copyfileobj(src, dst, 1 << 20)
        digest = _sha256(tmp_blob)
        size = tmp_blob.stat().st_size
        os.replace(tmp_blob, blob)
        info_doc = {"digest": digest, "size": size, "diff_id": diff_id,
                    "media_type": LAYER_TYPES[compression]}  # fmt: skip
        meta.write_text(json.dumps(info_doc))
        return BuiltLayer(blob, digest, size, diff_id, LAYER_TYPES[compression])
    finally:
        tmp_tar.unlink(missing_ok=True)
        tmp_blob.unlink(missing_ok=True)


def finish(
    name: str, tag: str, layers: list[BuiltLayer], run_config: dict[str, object]
) -> BuiltImage:
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2026-01-01T00:00:00Z",
        "config": run_config,
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created_by": f"corral test image {name}"} for _ in layers],
    }
    image = BuiltImage(name, tag, layers, json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": image.config_digest,
            "size": len(image.config),
        },  # fmt: skip
        "layers": [
            {"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}
            for layer in layers
        ],  # fmt: skip
    }
    image.manifest = json.dumps(manifest, sort_keys=True).encode()
    return image


def _etc_entries() -> list[Entry]:
    passwd = (b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:"
              b"/bin/false\nuser:x:1000:1000:user:/home/user:/bin/sh\n")  # fmt: skip
    group = b"root:x:0:\nnogroup:x:65534:\nuser:x:1000:\n"
    return [
        Entry("etc", "dir"),
        Entry("etc/passwd", "bytes", data=passwd, mode=0o644),
        Entry("etc/group", "bytes", data=group, mode=0o644),
        Entry("tmp", "dir", mode=0o1777),
        Entry("root", "dir", mode=0o700),
        Entry("home", "dir"),
        Entry("home/user", "dir", uid=1000, gid=1000),
    ]


def build_busybox(cache: Path = CACHE_DIR) -> BuiltImage:
    """The busybox image (one gzip layer)."""
    applets = subprocess.run(
        ["/usr/bin/busybox", "--list-full"], capture_output=True, text=True, check=True
    ).stdout.split()
    dirs = sorted({str(Path(a).parent) for a in applets} | {"bin"})
    entries = [Entry(d, "dir") for d in _with_parents(dirs)]
    entries.append(Entry("bin/busybox", "file", source="/usr/bin/busybox", mode=0o755))
    entries += [Entry(a, "symlink", target="/bin/busybox") for a in applets if a != "bin/busybox"]
    entries += _etc_entries()
    layer = build_layer(entries, "gzip", cache)
    return finish("busybox", "latest", [layer], {
        "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/",
    })  # fmt: skip


def _with_parents(dirs: Iterable[str]) -> list[str]:
    out: set[str] = set()
    for d in dirs:
        p = Path(d)
        while str(p) not in (".", "/", ""):
            out.add(str(p))
            p = p.parent
    return sorted(out, key=lambda s: (s.count("/"), s))


def _ldd(paths: Iterable[str]) -> set[str]:
    libs: set[str] = set()
    for path in paths:
        res = subprocess.run(["ldd", path], capture_output=True, text=True)
        for line in res.stdout.splitlines():
            m = re.search(r"(/\S+) \(0x", line)
            if m:
                libs.add(m.group(1))
    return libs


def _file_and_links(path: str, entries: dict[str, Entry]) -> None:
    """Add ``path`` to ``entries``: each symlink on the way as a symlink, the file at the end."""
    seen = 0
    current = path
    while True:
        seen += 1
        parent = os.path.realpath(os.path.dirname(current))
        current = os.path.join(parent, os.path.basename(current))
        rel = current.lstrip("/")
        if os.path.islink(current) and seen < 20:
            target = os.readlink(current)
            entries[rel] = Entry(rel, "symlink", target=target)
            current = os.path.join(parent, target) if not target.startswith("/") else target
            continue
        mode = stat.S_IMODE(os.stat(current).st_mode)
        entries[rel] = Entry(rel, "file", source=current, mode=mode)
        return


def _dir_entries(files: dict[str, Entry]) -> list[Entry]:
    dirs = _with_parents(str(Path(name).parent) for name in files)
    merged = {"bin", "lib", "lib64", "sbin"}  # Debian's merged /usr: these are symlinks
    return [Entry(d, "dir") for d in dirs if d not in merged]


def build_tools(cache: Path = CACHE_DIR) -> BuiltImage:
    """The tools image (four layers: gzip, zstd, none, gzip with whiteouts)."""
    # Layer 1: binaries and their shared libraries.
    files: dict[str, Entry] = {}
    dynload = sorted(str(p) for p in (PYTHON_LIB / "lib-dynload").glob("*.so"))
    for binary in TOOL_BINARIES:
        _file_and_links(binary, files)
    for lib in sorted(_ldd([*TOOL_BINARIES, *dynload])):
        _file_and_links(lib, files)
    files = {k: v for k, v in files.items() if k.split("/")[0] not in ("bin", "lib", "lib64", "sbin")
             or v.kind == "file"}  # fmt: skip
    top_links = [Entry(n, "symlink", target=f"usr/{n}") for n in ("bin", "lib", "lib64", "sbin")]
    bin_entries = [Entry("usr/bin/python3", "symlink", target="python3.11")]
    layer1 = build_layer(
        [
            *_dir_entries(files),
            *top_links,
            *sorted(files.values(), key=lambda e: e.name),
            *bin_entries,
        ],
        "gzip",
        cache,
    )
    # Layer 2: the Python standard library (trimmed), zstd.
    py_entries: list[Entry] = [Entry("usr/lib/python3.11", "dir")]
    for dirpath, dirnames, filenames in os.walk(PYTHON_LIB):
        rel_dir = os.path.relpath(dirpath, "/")
        dirnames[:] = sorted(d for d in dirnames if d not in PYTHON_SKIP)
        for d in dirnames:
            py_entries.append(Entry(f"{rel_dir}/{d}", "dir"))
        for f in sorted(filenames):
            full = os.path.join(dirpath, f)
            if os.path.islink(full):
                py_entries.append(Entry(f"{rel_dir}/{f}", "symlink", target=os.readlink(full)))
            elif f.endswith((".py", ".so")) or (
                dirpath.endswith("__pycache__") and f.endswith(".cpython-311.pyc")
            ):
                mode = stat.S_IMODE(os.stat(full).st_mode)
                py_entries.append(Entry(f"{rel_dir}/{f}", "file", source=full, mode=mode))
    layer2 = build_layer(py_entries, "zstd", cache)
    # Layer 3: /etc, certificates, and files that layer 4 hides; uncompressed.
    etc = [
        *_etc_entries(),
        Entry("etc/nsswitch.conf", "bytes", data=b"hosts: files dns\n", mode=0o644),
        Entry("etc/ssl", "dir"),
        Entry("etc/ssl/certs", "dir"),
        Entry(
            "etc/ssl/certs/ca-certificates.crt",
            "file",
            source="/etc/ssl/certs/ca-certificates.crt",
            mode=0o644,
        ),  # fmt: skip
        Entry("opt", "dir"),
        Entry("opt/keep.txt", "bytes", data=b"kept\n", mode=0o644),
        Entry("opt/gone.txt", "bytes", data=b"whited out\n", mode=0o644),
        Entry("opt/old", "dir"),
        Entry("opt/old/stale.txt", "bytes", data=b"hidden by opaque\n", mode=0o644),
        Entry("opt/old/sub", "dir"),
        Entry("opt/old/sub/deep.txt", "bytes", data=b"hidden too\n", mode=0o644),
        Entry("usr/local", "dir"),
        Entry("usr/local/bin", "dir"),
        Entry("usr/local/bin/suid-demo", "bytes", data=b"#!/bin/sh\nid\n", mode=0o4755),
    ]
    layer3 = build_layer(etc, "none", cache)
    # Layer 4: whiteout and opaque directory.
    layer4 = build_layer(
        [
            Entry("opt", "dir"),
            Entry("opt/.wh.gone.txt", "bytes", mode=0o644),
            Entry("opt/old", "dir"),
            Entry("opt/old/.wh..wh..opq", "bytes", mode=0o644),
            Entry("opt/old/new.txt", "bytes", data=b"new\n", mode=0o644),
        ],
        "gzip",
        cache,
    )
    return finish("tools", "latest", [layer1, layer2, layer3, layer4], {
        "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"],
        "Cmd": ["/bin/sh"], "WorkingDir": "/",
    })  # fmt: skip


# -- getting images out ------------------------------------------------------------------------
def push(client: RegistryClient, host: str, repository: str, image: BuiltImage,
         tag: str | None = None) -> str:  # fmt: skip
    """Upload ``image`` to ``host`` (monolithic uploads); returns the manifest digest."""
    blobs = [(image.config_digest, None, image.config)]
    blobs += [(layer.digest, layer.path, b"") for layer in image.layers]
    for digest, path, data in blobs:
        head = client.request("HEAD", host, repository, f"blobs/{digest}", actions=("pull", "push"))
        head.close()
        if head.status == 200:
            continue
        start = client.request("POST", host, repository, "blobs/uploads/", body=b"",
                               actions=("pull", "push"))  # fmt: skip
        start.close()
        if start.status != 202:
            raise RuntimeError(f"push {repository}: upload start answered {start.status}")
        location = start.headers["Location"]
        sep = "&" if "?" in location else "?"
        body = path.read_bytes() if path is not None else data
        put = client.request(
            "PUT", host, repository, f"{location}{sep}digest={digest}", body=body,
            headers={"Content-Type": "application/octet-stream"}, actions=("pull", "push"),
        )  # fmt: skip
        put.close()
        if put.status != 201:
            raise RuntimeError(f"push {repository}: blob {digest} answered {put.status}")
    return push_manifest(client, host, repository, tag or image.tag, image.manifest, OCI_MANIFEST)


def push_manifest(client: RegistryClient, host: str, repository: str, tag: str, body: bytes,
                  media_type: str) -> str:  # fmt: skip
    """PUT a manifest or index (its blobs/manifests must be there); returns its digest."""
    resp = client.request(
        "PUT", host, repository, f"manifests/{tag}", body=body,
        headers={"Content-Type": media_type}, actions=("pull", "push"),
    )  # fmt: skip
    resp.close()
    if resp.status != 201:
        raise RuntimeError(f"push {repository}: manifest {tag} answered {resp.status}")
    return "sha256:" + hashlib.sha256(body).hexdigest()


def docker_v2_manifest(image: BuiltImage) -> bytes:
    """The same image described with Docker's v2 schema 2 media types (gzip layers only)."""
    doc = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "digest": image.config_digest, "size": len(image.config)},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                    "digest": layer.digest, "size": layer.size} for layer in image.layers],
    }  # fmt: skip
    return json.dumps(doc).encode()


def index(entries: list[tuple[str, int, str, str]], media_type: str = OCI_INDEX) -> bytes:
    """An index / manifest list of (manifest digest, size, manifest media type, "os/arch")."""
    manifests = []
    for digest, size, mtype, plat in entries:
        os_name, arch = plat.split("/")
        manifests.append({"mediaType": mtype, "digest": digest, "size": size,
                          "platform": {"os": os_name, "architecture": arch}})  # fmt: skip
    return json.dumps(
        {"schemaVersion": 2, "mediaType": media_type, "manifests": manifests}
    ).encode()


def write_docker_save(image: BuiltImage, path: Path, repo_tag: str) -> Path:
    """A ``docker save`` (v1.x format) tar: manifest.json, <config>.json, <id>/layer.tar."""
    with tarfile.open(path, "w") as tar:
        layer_names = []
        for layer in image.layers:
            # docker save stores layers uncompressed: decompress to the tar that diff_id names.
            name = f"{layer.diff_id.split(':')[1]}/layer.tar"
            data = _uncompressed(layer)
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), EPOCH
            tar.addfile(info, io.BytesIO(data))
            layer_names.append(name)
        config_name = f"{image.config_digest.split(':')[1]}.json"
        manifest = [{"Config": config_name, "RepoTags": [repo_tag], "Layers": layer_names}]
        for name, data in ((config_name, image.config),
                           ("manifest.json", json.dumps(manifest).encode())):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), EPOCH
            tar.addfile(info, io.BytesIO(data))
    return path


def _uncompressed(layer: BuiltLayer) -> bytes:
    raw = layer.path.read_bytes()
    if raw.startswith(b"\x1f\x8b"):
        return gzip.decompress(raw)
    if raw.startswith(b"\x28\xb5\x2f\xfd"):
        return zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    return raw


def write_oci_layout(image: BuiltImage, directory: Path, tag: str) -> Path:
    """An OCI image layout directory (oci-layout, index.json, blobs/sha256/...)."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (blobs / image.config_digest.split(":")[1]).write_bytes(image.config)
    (blobs / image.manifest_digest.split(":")[1]).write_bytes(image.manifest)
    for layer in image.layers:
        target = blobs / layer.digest.split(":")[1]
        if not target.exists():
            shutil.copyfile(layer.path, target)
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": OCI_MANIFEST, "digest": image.manifest_digest,
            "size": len(image.manifest),
            "annotations": {"org.opencontainers.image.ref.name": tag},
            "platform": {"os": "linux", "architecture": "amd64"},
        }],
    }  # fmt: skip
    (directory / "index.json").write_text(json.dumps(index))
    return directory
