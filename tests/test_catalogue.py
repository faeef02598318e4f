"""The syscall catalogue's numbers agree with libseccomp's tables for every ABI."""

from __future__ import annotations

import pyseccomp
import pytest

from pytest_sandbox.catalogues.syscalls import ARG_TYPE_BITS, IPC_NR, SOCKETCALL_NR, SYSCALL_PROBES

X32_BIT = 0x40000000
# libseccomp 2.5 names these on x86 by pseudo-numbers (-100 - socketcall call, -200 - ipc call); the direct
# i386 numbers (Linux >= 4.3 for sockets, >= 5.1 for SysV IPC) are arch/x86/entry/syscalls/syscall_32.tbl's.
DIRECT_I386_MULTIPLEXED_CALLS = {"socket": 359, "socketpair": 360, "bind": 361, "connect": 362, "semctl": 394,
                                 "shmctl": 396, "msgctl": 402}
PSEUDO_BASE = {"socketcall": -100, "ipc": -200}


@pytest.mark.parametrize("probe", SYSCALL_PROBES, ids=lambda p: p.name)
def test_catalogue_numbers_match_libseccomp(probe):
    assert pyseccomp.resolve_syscall(pyseccomp.Arch.X86_64, probe.name) == probe.nr
    i386 = pyseccomp.resolve_syscall(pyseccomp.Arch.X86, probe.name)
    if probe.name in DIRECT_I386_MULTIPLEXED_CALLS:
        assert probe.i386_nr == DIRECT_I386_MULTIPLEXED_CALLS[probe.name]
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


@pytest.mark.parametrize("probe", [p for p in SYSCALL_PROBES if p.mux is not None], ids=lambda p: p.name)
def test_multiplexed_calls_carry_the_call_number_libseccomp_knows(probe):
    assert probe.mux is not None
    assert pyseccomp.resolve_syscall(pyseccomp.Arch.X86, probe.mux.name) == probe.mux.nr
    assert probe.mux.nr == {"socketcall": SOCKETCALL_NR, "ipc": IPC_NR}[probe.mux.name]
    assert pyseccomp.resolve_syscall(pyseccomp.Arch.X86, probe.name) == PSEUDO_BASE[probe.mux.name] - probe.mux.call


def test_every_socket_and_sysv_ipc_row_has_its_multiplexer():
    for probe in SYSCALL_PROBES:
        pseudo = pyseccomp.resolve_syscall(pyseccomp.Arch.X86, probe.name)
        assert (probe.mux is not None) == (-300 < pseudo <= -100), probe.name


@pytest.mark.parametrize("probe", SYSCALL_PROBES, ids=lambda p: p.name)
def test_every_argument_is_typed_as_the_kernel_prototype(probe):
    assert len(probe.arg_types) >= len(probe.args)
    assert probe.control_args is None or len(probe.arg_types) >= len(probe.control_args)
    assert all(t in ARG_TYPE_BITS for t in probe.arg_types)


def test_the_kernel_reads_these_ruled_arguments_as_32_bits():
    by_name = {p.name: p for p in SYSCALL_PROBES}
    # seccomp(unsigned int op, ...), socket(int family, ...), prctl(int option, ...), ioctl(.., unsigned int cmd,
    # ..), clone's flags through lower_32_bits(), execveat(..., int flags): 32 bits.
    for name, arg in (("seccomp", 0), ("socket", 0), ("prctl", 0), ("ioctl", 1), ("clone", 0), ("execveat", 4),
                      ("personality", 0)):
        assert by_name[name].arg_bits(arg) == 32, name
    # unshare(unsigned long flags), ptrace(long request, ...): the whole 64 bits.
    assert by_name["unshare"].arg_bits(0) == 64 and by_name["ptrace"].arg_bits(0) == 64
