"""What a stack of seccomp classic-BPF programs returns for one system call. Pure.

A classic-BPF interpreter over ``struct seccomp_data`` (include/uapi/linux/seccomp.h: ``int nr; __u32 arch;
__u64 instruction_pointer; __u64 args[6]``, 64 bytes, read as 32-bit words in host byte order), accepting
exactly the instructions the kernel's ``seccomp_check_filter`` (kernel/seccomp.c) lets a filter hold:
``ld`` of a seccomp_data word, ``ld``/``ldx`` of the length, of an immediate or of scratch memory,
``st``/``stx``, the ALU operations (add sub mul div and or xor lsh rsh with a constant or X, neg; no mod),
``ja`` and the conditional jumps ``jeq``/``jgt``/``jge``/``jset`` with a constant or X, ``ret`` of a
constant or A, ``tax``/``txa``. Anything else is refused as the kernel
refuses it (:class:`BpfError`), so a program this module evaluates is one the kernel would have loaded.

Several filters: the kernel runs every installed filter, newest first, and keeps the return value whose
action has the lowest ``(s32)(ret & SECCOMP_RET_ACTION_FULL)`` (``seccomp_run_filters``; KILL_PROCESS is
0x80000000, the most negative), the first seen on a tie. :func:`run_stack` takes the programs in load
order (oldest first), as ``compile_policy`` and :mod:`pytest_sandbox.seccomp.readback` give them.

The evaluation never executes a system call: it says what the filter would answer, nothing more.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

__all__ = [
    "ACTION_NAMES", "AUDIT_ARCH_I386", "AUDIT_ARCH_X86_64", "X32_SYSCALL_BIT",
    "BpfError", "FilterResult", "Instruction", "Trace", "decode", "run_program", "run_stack", "seccomp_data",
]  # fmt: skip

AUDIT_ARCH_X86_64 = 0xC000003E  # include/uapi/linux/audit.h: EM_X86_64 | __AUDIT_ARCH_64BIT | LE
AUDIT_ARCH_I386 = 0x40000003  # EM_386 | __AUDIT_ARCH_LE
X32_SYSCALL_BIT = 0x40000000  # arch/x86/include/uapi/asm/unistd.h: x32 calls carry it in nr
SECCOMP_DATA_SIZE = 64
BPF_MEMWORDS = 16  # include/uapi/linux/filter.h
BPF_MAXINSNS = 4096
RET_ACTION_FULL = 0xFFFF0000
RET_DATA = 0x0000FFFF
RET_ALLOW = 0x7FFF0000
# include/uapi/linux/seccomp.h SECCOMP_RET_* (full action values)
ACTION_NAMES = {
    0x80000000: "kill_process", 0x00000000: "kill_thread", 0x00030000: "trap", 0x00050000: "errno",
    0x7FC00000: "user_notif", 0x7FF00000: "trace", 0x7FFC0000: "log", 0x7FFF0000: "allow",
}  # fmt: skip
# The actions that stop the call from running, whatever else happens: a kill, a trap (SIGSYS) or an errno.
# TRACE and USER_NOTIF hand the decision to a tracer or a supervisor; LOG and ALLOW let the call run.
REFUSING_ACTIONS = frozenset({"kill_process", "kill_thread", "trap", "errno"})
U32 = 0xFFFFFFFF


class BpfError(ValueError):
    """A program the kernel would not load (an instruction seccomp_check_filter refuses, a bad jump)."""


@dataclass(frozen=True)
class Instruction:
    code: int
    jt: int
    jf: int
    k: int


@dataclass(frozen=True)
class FilterResult:
    """One return value of a filter (or of the stack): the action and its 16-bit data (errno, trace msg)."""

    ret: int

    @property
    def action(self) -> str:
        return ACTION_NAMES.get(self.ret & RET_ACTION_FULL, "kill_process")  # unknown actions: as the kernel

    @property
    def data(self) -> int:
        return self.ret & RET_DATA

    @property
    def refuses(self) -> bool:
        return self.action in REFUSING_ACTIONS

    def describe(self) -> str:
        if self.action in ("errno", "trace"):
            return f"{self.action.upper()}({self.data})"
        return self.action.upper()


@dataclass(frozen=True)
class Comparison:
    """One conditional jump taken during an evaluation: A held ``word`` (a 32-bit seccomp_data word index,
    or None when A held anything else) masked by ``mask``, was compared with ``op`` to ``value``."""

    word: int | None
    mask: int
    op: str  # jeq | jgt | jge | jset
    value: int
    taken: bool


@dataclass
class Trace:
    """Filled by :func:`run_program` when given: the comparisons one evaluation made, in order."""

    comparisons: list[Comparison]


def seccomp_data(nr: int, arch: int, args: Sequence[int], instruction_pointer: int = 0) -> bytes:
    """``struct seccomp_data`` as the kernel fills it (little-endian on x86)."""
    padded = [a & 0xFFFFFFFFFFFFFFFF for a in [*args, 0, 0, 0, 0, 0, 0][:6]]
    return struct.pack("<iIQ6Q", _s32(nr), arch & U32, instruction_pointer & 0xFFFFFFFFFFFFFFFF, *padded)


@lru_cache(maxsize=512)
def decode(program: bytes) -> tuple[Instruction, ...]:
    """``struct sock_filter`` records (u16 code, u8 jt, u8 jf, u32 k); checked as seccomp_check_filter and
    bpf_check_classic (net/core/filter.c) check them: length, jump targets, last instruction a return."""
    if not program or len(program) % 8:
        raise BpfError(f"a BPF program is a non-empty multiple of 8 bytes, not {len(program)}")
    instructions = tuple(Instruction(*fields) for fields in struct.iter_unpack("<HBBI", program))
    if len(instructions) > BPF_MAXINSNS:
        raise BpfError(f"{len(instructions)} instructions, more than BPF_MAXINSNS ({BPF_MAXINSNS})")
    for pc, ins in enumerate(instructions):
        if ins.code not in _ALLOWED:
            raise BpfError(f"instruction {pc}: code {ins.code:#06x} is not allowed in a seccomp filter")
        if ins.code == _LD_W_ABS and (ins.k >= SECCOMP_DATA_SIZE or ins.k % 4):
            raise BpfError(f"instruction {pc}: load at offset {ins.k} outside struct seccomp_data or unaligned")
        if ins.code in _MEM_CODES and ins.k >= BPF_MEMWORDS:
            raise BpfError(f"instruction {pc}: scratch memory slot {ins.k} >= {BPF_MEMWORDS}")
        if ins.code == _DIV_K and ins.k == 0:
            raise BpfError(f"instruction {pc}: division by the constant 0")
        if ins.code in (0x64, 0x74) and ins.k >= 32:  # lsh/rsh #k (bpf_check_classic)
            raise BpfError(f"instruction {pc}: shift by {ins.k}")
        if ins.code == _JA:
            if pc + 1 + ins.k >= len(instructions):
                raise BpfError(f"instruction {pc}: jump out of the program")
        elif ins.code & 0x07 == 0x05 and max(pc + 1 + ins.jt, pc + 1 + ins.jf) >= len(instructions):
            raise BpfError(f"instruction {pc}: jump out of the program")
    if instructions[-1].code not in (_RET_K, _RET_A):
        raise BpfError("the last instruction is not a return")
    _check_loads_after_stores(instructions)
    return instructions


def _check_loads_after_stores(instructions: tuple[Instruction, ...]) -> None:
    """net/core/filter.c ``check_load_and_stores``: scratch memory is read only where every path stored it."""
    masks = [0xFFFF] * len(instructions)
    valid = 0
    for pc, ins in enumerate(instructions):
        valid &= masks[pc]
        if ins.code in (_ST, _STX):
            valid |= 1 << ins.k
        elif ins.code in (_LD_MEM, _LDX_MEM) and not valid & (1 << ins.k):
            raise BpfError(f"instruction {pc}: reads scratch memory slot {ins.k} before any store on some path")
        elif ins.code == _JA:
            masks[pc + 1 + ins.k] &= valid
            valid = 0xFFFF
        elif ins.code & 0x07 == 0x05:
            masks[pc + 1 + ins.jt] &= valid
            masks[pc + 1 + ins.jf] &= valid
            valid = 0xFFFF


def run_program(program: bytes, data: bytes, trace: Trace | None = None) -> int:
    """The 32-bit value one program returns for ``data`` (a 64-byte seccomp_data)."""
    words = struct.unpack("<16I", data)
    instructions = decode(program)
    a = x = 0
    source: int | None = None  # the seccomp_data word A holds unchanged (or masked), for the trace
    mask = U32
    memory = [0] * BPF_MEMWORDS
    pc = 0
    while True:  # classic BPF only jumps forward (decode checked the targets), so this ends
        ins = instructions[pc]
        code, k = ins.code, ins.k
        pc += 1
        if code == _LD_W_ABS:
            a, source, mask = words[k >> 2], k >> 2, U32
        elif code == _LD_W_LEN:
            a, source = SECCOMP_DATA_SIZE, None
        elif code == _LD_IMM:
            a, source = k, None
        elif code == _LD_MEM:
            a, source = memory[k], None
        elif code == _LDX_W_LEN:
            x = SECCOMP_DATA_SIZE
        elif code == _LDX_IMM:
            x = k
        elif code == _LDX_MEM:
            x = memory[k]
        elif code == _ST:
            memory[k] = a
        elif code == _STX:
            memory[k] = x
        elif code & 0x07 == 0x04:  # BPF_ALU
            operand = x if code & 0x08 else k
            op = code & 0xF0
            if op == 0x50 and source is not None and not code & 0x08:  # and #k keeps the word, masked
                mask &= k
            else:
                source = None
            if op == 0x30 and operand == 0:  # div by X == 0: the converted filter returns 0 (bpf_convert_filter)
                return 0
            a = _ALU[op](a, operand) & U32
        elif code == _JA:
            pc += k
        elif code & 0x07 == 0x05:  # conditional jumps
            operand = x if code & 0x08 else k
            name = _JUMPS[code & 0xF0]
            taken = _CONDITIONS[name](a, operand)
            if trace is not None:
                trace.comparisons.append(Comparison(source, mask, name, operand, taken))
            pc += ins.jt if taken else ins.jf
        elif code == _RET_K:
            return k
        elif code == _RET_A:
            return a
        elif code == _TAX:
            x = a
        elif code == _TXA:
            a, source = x, None


def _s32(value: int) -> int:
    value &= U32
    return value - (1 << 32) if value & 0x80000000 else value


def _precedence(ret: int) -> int:
    """The kernel's ordering key: lower wins (kernel/seccomp.c ``ACTION_ONLY``, compared as s32)."""
    return _s32(ret & RET_ACTION_FULL)


def run_stack(programs: Sequence[bytes], nr: int, arch: int, args: Sequence[int], instruction_pointer: int = 0,
              traces: Sequence[Trace] | None = None) -> FilterResult:
    """What the kernel does with this call when ``programs`` are installed in this order (oldest first).

    No program installed means no filter: the call is allowed. ``traces``, when given, holds one
    :class:`Trace` per program (same order) to record the comparisons each made."""
    data = seccomp_data(nr, arch, args, instruction_pointer)
    best = RET_ALLOW
    for index in reversed(range(len(programs))):  # newest first; the first seen wins a tie
        current = run_program(programs[index], data, traces[index] if traces is not None else None)
        if _precedence(current) < _precedence(best):
            best = current
    return FilterResult(best)


# Opcodes (include/uapi/linux/bpf_common.h + filter.h), named as classic BPF assembler does.
_LD_W_ABS, _LD_W_LEN, _LD_IMM, _LD_MEM = 0x20, 0x80, 0x00, 0x60
_LDX_W_LEN, _LDX_IMM, _LDX_MEM = 0x81, 0x01, 0x61
_ST, _STX = 0x02, 0x03
_JA, _RET_K, _RET_A, _TAX, _TXA = 0x05, 0x06, 0x16, 0x07, 0x87
_DIV_K = 0x34
_MEM_CODES = (_LD_MEM, _LDX_MEM, _ST, _STX)
_ALU: dict[int, Callable[[int, int], int]] = {
    0x00: lambda a, b: a + b, 0x10: lambda a, b: a - b, 0x20: lambda a, b: a * b, 0x30: lambda a, b: a // b,
    0x40: lambda a, b: a | b, 0x50: lambda a, b: a & b, 0x60: lambda a, b: a << (b & 31),
    0x70: lambda a, b: a >> (b & 31), 0x80: lambda a, b: -a, 0xA0: lambda a, b: a ^ b,
}  # fmt: skip
_JUMPS = {0x10: "jeq", 0x20: "jgt", 0x30: "jge", 0x40: "jset"}
_CONDITIONS: dict[str, Callable[[int, int], bool]] = {
    "jeq": lambda a, b: a == b, "jgt": lambda a, b: a > b, "jge": lambda a, b: a >= b, "jset": lambda a, b: bool(a & b),
}  # fmt: skip
# seccomp_check_filter's list: only 32-bit loads from seccomp_data (ld/ldx W ABS are rewritten, H/B and
# IND refused), every ALU op with K or X (neg has no operand), ja, the four conditional jumps with K or X.
_ALLOWED = frozenset({
    _LD_W_ABS, _LD_W_LEN, _LD_IMM, _LD_MEM, _LDX_W_LEN, _LDX_IMM, _LDX_MEM, _ST, _STX,
    _JA, _RET_K, _RET_A, _TAX, _TXA,
    *(0x04 | op | src for op in _ALU if op != 0x80 for src in (0x00, 0x08)), 0x84,
    *(0x05 | op | src for op in _JUMPS for src in (0x00, 0x08)),
})  # fmt: skip
