"""What the kernel returns for one call under a stack of compiled seccomp programs. Pure; for tests.

A classic-BPF interpreter over ``struct seccomp_data`` (include/uapi/linux/seccomp.h) and the kernel's
way of combining several filters (kernel/seccomp.c ``seccomp_run_filters``): every filter runs, newest
first, and the action with the lowest ``(s32)(ret & SECCOMP_RET_ACTION_FULL)`` wins, the first seen on
a tie. It lets a test compare two builds of a policy as functions, not as bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import pyseccomp

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
X32_SYSCALL_BIT = 0x40000000
RET_ACTION_FULL = 0xFFFF0000
RET_DATA = 0x0000FFFF
ACTION_NAMES = {
    0x80000000: "kill_process", 0x00000000: "kill_thread", 0x00030000: "trap", 0x00050000: "errno",
    0x7FC00000: "user_notif", 0x7FF00000: "trace", 0x7FFC0000: "log", 0x7FFF0000: "allow",
}  # fmt: skip
ARCH_TOKENS = {"native": AUDIT_ARCH_X86_64, "x32": AUDIT_ARCH_X86_64, "x86": AUDIT_ARCH_I386}


@dataclass(frozen=True)
class Result:
    action: str
    data: int

    @classmethod
    def of(cls, ret: int) -> Result:
        return cls(ACTION_NAMES[ret & RET_ACTION_FULL], ret & RET_DATA)


def seccomp_data(nr: int, arch: int, args: Sequence[int]) -> bytes:
    padded = [a & 0xFFFFFFFFFFFFFFFF for a in [*args, 0, 0, 0, 0, 0, 0][:6]]
    return struct.pack("<iIQ6Q", nr, arch, 0, *padded)


@lru_cache(maxsize=256)
def _decode(program: bytes) -> tuple[tuple[int, int, int, int], ...]:
    return tuple(struct.iter_unpack("<HBBI", program))


def run_program(program: bytes, data: bytes) -> int:
    """One program's return value; raises on an instruction libseccomp never emits."""
    words = struct.unpack("<16I", data)  # seccomp_data as 32-bit words: ld [k] reads words[k // 4]
    instructions = _decode(program)
    a = x = 0
    memory = [0] * 16
    pc = 0
    while True:  # cBPF only jumps forward, so this ends
        code, jt, jf, k = instructions[pc]
        pc += 1
        if code == 0x20:  # ld [k]
            a = words[k >> 2]
        elif code == 0x15:  # jeq #k
            pc += jt if a == k else jf
        elif code == 0x25:  # jgt #k
            pc += jt if a > k else jf
        elif code == 0x35:  # jge #k
            pc += jt if a >= k else jf
        elif code == 0x45:  # jset #k
            pc += jt if a & k else jf
        elif code == 0x06:  # ret #k
            return k
        elif code == 0x05:  # ja
            pc += k
        elif code == 0x54:  # and #k
            a &= k
        elif code == 0x00:  # ld #k
            a = k
        elif code == 0x60:  # ld M[k]
            a = memory[k]
        elif code == 0x02:  # st M[k]
            memory[k] = a
        elif code == 0x07:  # tax
            x = a
        elif code == 0x87:  # txa
            a = x
        elif code == 0x16:  # ret a
            return a
        else:
            raise ValueError(f"unexpected BPF instruction {code:#x} at {pc - 1}")


def run_stack(programs: Sequence[bytes], nr: int, arch: int, args: Sequence[int]) -> Result:
    """The kernel's answer with ``programs`` installed in this order (kernel/seccomp.c)."""
    data = seccomp_data(nr, arch, args)
    ret = 0x7FFF0000  # SECCOMP_RET_ALLOW
    for program in reversed(programs):  # newest first
        current = run_program(program, data)

        def signed(value: int) -> int:
            value &= RET_ACTION_FULL
            return value - (1 << 32) if value & 0x80000000 else value

        if signed(current) < signed(ret):
            ret = current
    return Result.of(ret)


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
