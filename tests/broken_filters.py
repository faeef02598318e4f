"""Hand-built filters with one classic mistake each (syscalls.md §3, §5), shared by the mutation tests."""

from __future__ import annotations

import errno
import tempfile
from dataclasses import replace

import pyseccomp

from pytest_sandbox.compiler import CompiledFilter, compile_policy
from pytest_sandbox.policy import Policy


def export(flt: pyseccomp.SyscallFilter) -> bytes:
    with tempfile.TemporaryFile() as handle:
        flt.export_bpf(handle)
        handle.seek(0)
        return handle.read()


def hand_built(policy: Policy, mode: str, *, arch_after_rules: bool = False, drop: str | None = None,
               full_64bit_eq: bool = False) -> CompiledFilter:
    """The same policy compiled by hand with one classic mistake (syscalls.md §3, §5)."""
    real = compile_policy(policy, mode)
    main = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    main.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
    if policy.seccomp.extra_arches and not arch_after_rules:
        main.add_arch(pyseccomp.Arch.X86)
    for name in policy.seccomp.deny:
        if name != drop:
            main.add_rule(pyseccomp.ERRNO(errno.EPERM), name)
    for rule in policy.rules_for_mode(mode):
        if rule.op == "eq" and full_64bit_eq:
            arg = pyseccomp.Arg(rule.arg, pyseccomp.EQ, rule.value)  # compares all 64 bits
        elif rule.op == "eq":
            arg = pyseccomp.Arg(rule.arg, pyseccomp.MASKED_EQ, 0xFFFFFFFF, rule.value)
        else:
            arg = pyseccomp.Arg(rule.arg, pyseccomp.MASKED_EQ, rule.mask, rule.value)
        main.add_rule(pyseccomp.ERRNO(errno.EPERM), rule.syscall, arg)
    if policy.seccomp.extra_arches and arch_after_rules:
        main.add_arch(pyseccomp.Arch.X86)  # too late: the x86 branch gets no rules
    return replace(real, programs=(real.programs[0], export(main)))
