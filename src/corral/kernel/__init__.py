"""Each Linux interface corral reads or calls, written once: procfs, mountinfo, libc, netns,
and the atomic replacement of a file (files).

Both :mod:`corral.runtime` (the launcher, the init, gc) and :mod:`corral.net` (the data path)
need the same kernel details: a process's start time from ``/proc/<pid>/stat``, the mount
points of ``/proc/self/mountinfo``, ``setns``/``umount2`` through libc, entering a network
namespace. This package sits below both and imports nothing of corral, so neither has to
import the other for them (docs/design.md, "Layers").

The supervisor imports some of these modules on its start-up path, and the sandbox's init
uses them after ``pivot_root``: so they import only small builtin modules at the top (no
``typing``, ``dataclasses``, ``re`` or ``enum``), and never import anything late. This
``__init__`` imports nothing, so ``corral.kernel.procfs`` costs only its own module.
"""
