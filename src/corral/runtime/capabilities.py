"""The capabilities a sandbox keeps, and the call that drops everything else.

All of these are capabilities *in the sandbox's user namespace*: they act only on objects that
namespace owns (its files, its processes, its network namespace when the policy is "none").
The set is Docker's default minus ``MKNOD`` and ``AUDIT_WRITE``, which do nothing useful in a
user namespace (the kernel refuses device nodes and audit messages from one anyway). Notably
absent: ``SYS_ADMIN`` (mount, namespaces), ``NET_ADMIN`` (the sandbox must not reconfigure the
interface corral's data path relies on), ``SYS_PTRACE``, ``SYS_MODULE``, ``SYS_TIME``,
``SYS_BOOT``, ``SYS_RESOURCE``, ``BPF``, ``PERFMON``.
"""

from __future__ import annotations

from corral.runtime import syscalls

#: Capability numbers from linux/capability.h.
CAP_NUMBERS = {
    "CHOWN": 0,
    "DAC_OVERRIDE": 1,
    "FOWNER": 3,
    "FSETID": 4,
    "KILL": 5,
    "SETGID": 6,
    "SETUID": 7,
    "SETPCAP": 8,
    "NET_BIND_SERVICE": 10,
    "NET_RAW": 13,
    "SYS_CHROOT": 18,
    "SETFCAP": 31,
}

#: What root in the sandbox keeps (documented in docs/isolation.md).
SANDBOX_CAPABILITIES = frozenset(CAP_NUMBERS)

#: Held by the init a little longer than the rest, for the one step that needs it after its
#: cgroup move (creating the cgroup namespace); see ``drop_last``.
CAP_SYS_ADMIN = 21


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40  # CAP_CHECKPOINT_RESTORE, the last one of Linux 6.x


def drop_last(keep: frozenset[str] = SANDBOX_CAPABILITIES) -> None:
    """After ``drop_to(keep, extra=CAP_SYS_ADMIN)``: give up SYS_ADMIN too (two syscalls)."""
    syscalls.prctl(syscalls.PR_CAPBSET_DROP, CAP_SYS_ADMIN)
    mask = mask_of(keep)
    syscalls.capset(mask, mask, 0)


def mask_of(names: frozenset[str]) -> int:
    mask = 0
    for name in names:
        mask |= 1 << CAP_NUMBERS[name]
    return mask


def drop_to(
    keep: frozenset[str] = SANDBOX_CAPABILITIES, top: int | None = None, extra: int = 0
) -> None:
    """Shrink the bounding set, clear ambient and inheritable, keep ``keep`` in eff/perm.

    The bounding set matters most: when root execs a binary, its permitted set becomes the
    bounding set, so without this the commands would regain what the init gave up.
    ``extra`` (a capability number) is kept as well, to be dropped by ``drop_last``.
    """
    keep_mask = mask_of(keep) | ((1 << extra) if extra else 0)
    for cap in range((top if top is not None else last_cap()) + 1):
        if not keep_mask & (1 << cap):
            syscalls.prctl(syscalls.PR_CAPBSET_DROP, cap)
    syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_CLEAR_ALL)
    syscalls.capset(keep_mask, keep_mask, 0)
