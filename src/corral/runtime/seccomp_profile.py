"""The seccomp filter of every sandbox: allow by default, deny what a container must not do.

A deny list (not an allow list) because sandboxes run arbitrary distributions and toolchains
whose syscall needs are unknown in advance; the list is what Docker's and bubblewrap's
profiles refuse, plus io_uring (a large kernel attack surface that Docker also blocks).
Denied calls fail with EPERM, so programs see an ordinary "operation not permitted" instead of
being killed. ``clone3`` fails with ENOSYS instead: its flags live in memory a filter cannot
inspect, and ENOSYS makes glibc fall back to ``clone``, whose flags the filter *can* check.

Syscalls from other architectures' ABIs (i386 via int 0x80, x32) kill the process: they would
bypass a filter written for x86_64 numbers.
"""

from __future__ import annotations

import ctypes.util
import errno
import tempfile

from corral.kernel.libc import LIBC_SONAME
from corral.runtime import syscalls

#: Sonames pyseccomp looks up at import. It calls ``ctypes.util.find_library``, which runs
#: ``ldconfig -p`` in a subprocess for each (two processes, ~10 ms each, in every fork server's
#: start); for these two the answer is fixed (Debian's libc6 and libseccomp2).
_SONAMES = {"c": LIBC_SONAME, "seccomp": "libseccomp.so.2"}
_find_library = ctypes.util.find_library
ctypes.util.find_library = lambda name: _SONAMES.get(name) or _find_library(name)
try:
    import pyseccomp
finally:
    ctypes.util.find_library = _find_library

#: Syscalls refused outright, and why.
DENIED: dict[str, str] = {
    # Filesystems: the sandbox gets its mounts from the launcher and makes none of its own.
    "mount": "new mounts",
    "umount2": "unmounting what the launcher set up",
    "pivot_root": "changing the root",
    "move_mount": "new mount API",
    "open_tree": "new mount API",
    "fsopen": "new mount API",
    "fsconfig": "new mount API",
    "fsmount": "new mount API",
    "fspick": "new mount API",
    "mount_setattr": "new mount API",
    "swapon": "swap",
    "swapoff": "swap",
    "quotactl": "disk quotas",
    "quotactl_fd": "disk quotas",
    "open_by_handle_at": "opens files by handle, bypassing the mount tree (shocker)",
    "name_to_handle_at": "the other half of open_by_handle_at",
    # The kernel itself.
    "kexec_load": "replacing the kernel",
    "kexec_file_load": "replacing the kernel",
    "init_module": "kernel modules",
    "finit_module": "kernel modules",
    "delete_module": "kernel modules",
    "reboot": "rebooting",
    "acct": "process accounting",
    "syslog": "kernel log",
    "bpf": "eBPF programs",
    "perf_event_open": "performance counters (side channels, kernel attack surface)",
    "userfaultfd": "stalls kernel page faults, a classic exploit helper",
    "keyctl": "kernel keyrings are not namespaced",
    "add_key": "kernel keyrings are not namespaced",
    "request_key": "kernel keyrings are not namespaced",
    "io_uring_setup": "io_uring: large attack surface, bypasses seccomp for its operations",
    "io_uring_enter": "io_uring",
    "io_uring_register": "io_uring",
    # Clocks are global.
    "settimeofday": "the system clock",
    "clock_settime": "the system clock",
    "clock_adjtime": "the system clock",
    "adjtimex": "the system clock",
    # Legacy and hardware access.
    "iopl": "I/O ports",
    "ioperm": "I/O ports",
    "uselib": "obsolete",
    "lookup_dcookie": "obsolete",
    "nfsservctl": "obsolete",
    "vhangup": "terminal hangup of the host's tty",
    "setns": "joining other namespaces",
}

#: unshare/clone flags refused: a nested user namespace would give the sandbox a fresh full
#: capability set over new namespaces, the most common road to kernel exploits from containers.
DENIED_CLONE_FLAGS = syscalls.CLONE_NEWUSER


def build() -> pyseccomp.SyscallFilter:
    flt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    flt.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
    deny = pyseccomp.ERRNO(errno.EPERM)
    for name in DENIED:
        if pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name) < 0:
            continue  # unknown to this libseccomp (and so to the kernels it targets)
        flt.add_rule(deny, name)
    for name in ("unshare", "clone"):
        flt.add_rule(
            deny,
            name,
            pyseccomp.Arg(0, pyseccomp.MASKED_EQ, DENIED_CLONE_FLAGS, DENIED_CLONE_FLAGS),
        )
    flt.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    return flt


_compiled: bytes | None = None


def compiled() -> bytes:
    """The filter as raw BPF, compiled once per process.

    The launcher calls this before it forks, so the sandbox's init only has to install the
    program (libseccomp's compile step took about 2 ms inside a fresh fork, a tenth of
    a sandbox start).
    """
    global _compiled
    if _compiled is None:
        with tempfile.TemporaryFile() as f:
            build().export_bpf(f)
            f.seek(0)
            _compiled = f.read()
    return _compiled


def load(program: bytes | None = None) -> None:
    """Install the filter on the calling thread (needs no_new_privs or CAP_SYS_ADMIN)."""
    syscalls.seccomp_filter(program if program is not None else compiled())
