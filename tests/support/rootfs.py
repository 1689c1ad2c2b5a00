"""A busybox root filesystem for launcher tests, built once and cached.

Made from Debian's busybox-static (``/bin/busybox``): the binary, one symlink per applet, a
minimal /etc, and every file owned by UID_BASE + its container id, exactly as an unpacked
image is on disk (corral.runtime.images.idmap). The cache key is the busybox binary's hash and
the layout version, so a changed binary or layout rebuilds; concurrent builders race on a
rename and the loser's copy is discarded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from corral.runtime.images.idmap import UID_BASE

BUSYBOX = Path("/bin/busybox")

#: Where built rootfs trees are kept between test runs.
CACHE_DIR = Path(os.environ.get("CORRAL_TEST_CACHE", "/var/tmp/corral-test-cache"))

#: Bump when the layout below changes.
LAYOUT_VERSION = "3"

PASSWD = """root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
app:x:1000:1000:app:/home/app:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""
GROUP = """root:x:0:
daemon:x:1:
tty:x:5:
app:x:1000:
extra:x:2000:app
nogroup:x:65534:
"""


def busybox_rootfs() -> Path:
    """The cached rootfs directory (read-only use: it is every test sandbox's lower dir)."""
    digest = hashlib.sha256(BUSYBOX.read_bytes()).hexdigest()[:16]
    target = CACHE_DIR / f"busybox-{digest}-v{LAYOUT_VERSION}"
    if target.is_dir():
        return target
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=CACHE_DIR))
    try:
        _build(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def _build(root: Path) -> None:
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "home/app", "tmp", "proc",
              "dev", "var/tmp", "sys"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    applets = subprocess.run([str(BUSYBOX), "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        link = root / applet
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
    (root / "etc/passwd").write_text(PASSWD)
    (root / "etc/group").write_text(GROUP)
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    (root / "etc/os-release").write_text("ID=corral-test-busybox\n")
    os.chmod(root / "tmp", 0o1777)
    os.chmod(root / "root", 0o700)
    os.chmod(root / "etc/shadow", 0o600)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), UID_BASE, UID_BASE)
    os.lchown(root, UID_BASE, UID_BASE)
    os.lchown(root / "home/app", UID_BASE + 1000, UID_BASE + 1000)
    os.chmod(root, 0o755)
