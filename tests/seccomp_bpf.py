"""What the kernel returns for one call under a stack of compiled seccomp programs, for tests.

The evaluator is :mod:`pytest_sandbox.seccomp.bpf_eval` (cross-checked against libseccomp's own
simulator in tests/test_bpf_eval.py); this module names its results and resolves syscall numbers, so
tests compare two builds of a policy as functions, not as bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import pyseccomp

from pytest_sandbox.seccomp import bpf_eval

AUDIT_ARCH_X86_64 = bpf_eval.AUDIT_ARCH_X86_64
AUDIT_ARCH_I386 = bpf_eval.AUDIT_ARCH_I386
X32_SYSCALL_BIT = bpf_eval.X32_SYSCALL_BIT
ARCH_TOKENS = {"native": AUDIT_ARCH_X86_64, "x32": AUDIT_ARCH_X86_64, "x86": AUDIT_ARCH_I386}


@dataclass(frozen=True)
class Result:
    action: str
    data: int


def run_stack(programs: Sequence[bytes], nr: int, arch: int, args: Sequence[int]) -> Result:
    """The kernel's answer with ``programs`` installed in this order (pytest_sandbox.seccomp.bpf_eval)."""
    result = bpf_eval.run_stack(programs, nr, arch, args)
    return Result(result.action, result.data)


@lru_cache(maxsize=1)
def _i386_numbers() -> dict[str, int]:
    """Direct i386 numbers by name, from libseccomp's own table (socket is 359 there, besides socketcall)."""
    numbers = {}
    for number in range(0, 512):
        try:
            numbers.setdefault(pyseccomp.resolve_syscall(pyseccomp.Arch.X86, number).decode(), number)
        except ValueError:
            continue
    return numbers


def syscall_number(name: str, arch: str) -> int | None:
    """The number a call of ``name`` carries in seccomp_data.nr on ``arch``; None if it has none there."""
    if arch == "x86":
        return _i386_numbers().get(name)
    number = pyseccomp.resolve_syscall(pyseccomp.Arch.X32 if arch == "x32" else pyseccomp.Arch.NATIVE, name)
    if number < 0:
        return None
    return number | X32_SYSCALL_BIT if arch == "x32" else number
