"""The uid/gid shift between an image's files and the disk.

A sandbox runs in a user namespace whose ids 0..ID_RANGE-1 map to host ids
UID_BASE..UID_BASE+ID_RANGE-1. The unpacked rootfs is the read-only lower dir of the
sandbox's overlay, so its files must already carry the *host* ids that the namespace maps
back to the image's ids: a file owned by uid N in a layer is owned by UID_BASE + N on disk.
Doing the shift once at unpack time (instead of idmapped mounts or a chown per sandbox) makes
sandbox start independent of image size and works on kernels/filesystems without idmapped
mounts.

UID_BASE is far above any uid a distribution hands out (useradd stops at 60000, systemd's
dynamic users end at 65519, and the subuid ranges useradd allocates start at 100000 in
steps of 65536), so a shifted file is never owned by a real host user; root on the host
still owns everything about it.
"""

from __future__ import annotations

#: First host id of the sandbox range: container uid/gid 0 is this host id.
UID_BASE = 1_000_000_000

#: Number of ids mapped into the sandbox (the classic 16-bit uid space).
ID_RANGE = 65536

#: Where ids that do not fit the range go: the conventional "nobody"/overflow id.
OVERFLOW_ID = 65534


def shift_id(image_id: int) -> int:
    """The host id for an id found in an image layer.

    Ids outside 0..ID_RANGE-1 cannot be represented inside the namespace; they become the
    overflow id (what the kernel itself shows for unmapped ids), shifted like any other.
    """
    if image_id < 0 or image_id >= ID_RANGE:
        image_id = OVERFLOW_ID
    return UID_BASE + image_id
