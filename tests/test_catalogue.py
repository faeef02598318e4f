"""The syscall catalogue's numbers agree with libseccomp's tables for every ABI."""

from __future__ import annotations

import pyseccomp
import pytest

from pytest_sandbox.catalogues.syscalls import SYSCALL_PROBES

X32_BIT = 0x40000000
DIRECT_I386_SOCKET_CALLS = {"socket": 359, "socketpair": 360}  # libseccomp 2.5 reports socketcall pseudo-numbers


@pytest.mark.parametrize("probe", SYSCALL_PROBES, ids=lambda p: p.name)
def test_catalogue_numbers_match_libseccomp(probe):
    assert pyseccomp.resolve_syscall(pyseccomp.Arch.X86_64, probe.name) == probe.nr
    i386 = pyseccomp.resolve_syscall(pyseccomp.Arch.X86, probe.name)
    if probe.name in DIRECT_I386_SOCKET_CALLS:
        assert probe.i386_nr == DIRECT_I386_SOCKET_CALLS[probe.name]
    elif i386 < 0:
        assert probe.i386_nr is None
    else:
        assert probe.i386_nr == i386
    x32 = pyseccomp.resolve_syscall(pyseccomp.Arch.X32, probe.name)
    assert probe.x32_nr == (x32 & ~X32_BIT if x32 > 0 else None)


def test_probe_names_are_unique_and_never_use_dangerous_arguments():
    names = [p.name for p in SYSCALL_PROBES]
    assert len(names) == len(set(names))
    by_name = {p.name: p for p in SYSCALL_PROBES}
    assert by_name["ptrace"].args[0] != 0  # never PTRACE_TRACEME
    assert by_name["acct"].args[0] != 0  # acct(NULL) switches host accounting off
    assert by_name["userfaultfd"].args[0] != 0  # userfaultfd(0) creates a real fd as root
    assert by_name["unshare"].args[0] & 0x80 == 0  # CLONE_NEWTIME is a valid unshare flag
    assert by_name["kexec_load"].args[3] != 0  # flags 0 would unload the crash kernel
