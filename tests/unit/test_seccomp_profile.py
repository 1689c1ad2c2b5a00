"""The seccomp profile compiles and denies what docs/isolation.md says (not loaded here)."""

from __future__ import annotations

import tempfile

from corral.runtime import capabilities, seccomp_profile


def _pfc() -> str:
    with tempfile.TemporaryFile() as f:
        seccomp_profile.build().export_pfc(f)
        f.seek(0)
        return f.read().decode()


def test_profile_denies_the_documented_calls() -> None:
    pfc = _pfc()
    for name in ("keyctl", "bpf", "kexec_load", "init_module", "userfaultfd",
                 "perf_event_open", "mount", "open_by_handle_at", "io_uring_setup"):
        assert f'"{name}"' in pfc, name
    assert "action ERRNO(1)" in pfc  # EPERM
    assert "action ERRNO(38)" in pfc  # clone3 -> ENOSYS


def test_capability_set_excludes_the_dangerous_ones() -> None:
    for name in ("CHOWN", "SETUID", "NET_BIND_SERVICE"):
        assert name in capabilities.SANDBOX_CAPABILITIES
    mask = capabilities.mask_of(capabilities.SANDBOX_CAPABILITIES)
    for dangerous in (21, 12, 16, 19, 25, 39):  # SYS_ADMIN NET_ADMIN SYS_MODULE SYS_PTRACE
        assert not mask & (1 << dangerous)  # SYS_TIME BPF
