"""What seccomp programs do, as behaviour: every syscall number on x86_64, x32 and i386, and for each the
argument classes the programs themselves tell apart. Pure (libseccomp's name table aside).

The space. Every number 0..511 on x86_64 and i386 and 0..547 on x32 (with ``__X32_SYSCALL_BIT``; 512..547
are x32's own compat entries), named from libseccomp's tables where a name exists: a number no table
names is evaluated too (a filter may let it through, the kernel then answers ENOSYS).

Argument classes. A filter only tells calls apart by the 32-bit words of ``seccomp_data`` it compares
(libseccomp compares a 64-bit argument as its high word, then its low word). :func:`classes` explores
each call concolically: it evaluates an all-zero argument vector, records every comparison each program
made on an argument or instruction-pointer word (:class:`~pytest_sandbox.seccomp.bpf_eval.Trace`), and
tries for each one the values that flip it (the constant, one above and below, the mask's bits set and
cleared); every new path found is expanded the same way, up to a bound. Each distinct path is one class,
with a representative vector and the conditions that define it. Several stacks explored together share
one set of classes, so two programs are compared on the same points (:func:`compare`).

Weaker and stronger. A result *refuses* when the call cannot run (kill, trap, errno); TRACE and
USER_NOTIF hand the decision to someone else and LOG lets the call run, so they do not refuse.
A point is weaker when the old stack refused and the new one does not; stronger the other way round;
two refusals that differ (an errno number, errno against a kill) are a change, neither weaker nor stronger.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from pytest_sandbox.seccomp.bpf_eval import (
    AUDIT_ARCH_I386,
    AUDIT_ARCH_X86_64,
    U32,
    X32_SYSCALL_BIT,
    Comparison,
    FilterResult,
    Trace,
    run_stack,
)
from pytest_sandbox.seccomp.filter_plan import IPC_CALL_MASK, IPC_CALLS

__all__ = ["ABIS", "Abi", "ArgClass", "BehaviourDiff", "Change", "Stack", "classes", "compare", "explore", "number_of",
           "summarise", "syscall_name", "syscall_numbers"]

FIRST_ARG_WORD = 2  # seccomp_data words: 0 nr, 1 arch, 2-3 instruction_pointer, 4.. args[i] low, high
MAX_PATHS_PER_CALL = 64  # distinct argument classes explored per syscall number (the bound)
MAX_EVALUATIONS_PER_CALL = 512


@dataclass(frozen=True)
class Abi:
    name: str  # "x86_64" | "x32" | "i386" (the probe catalogue calls x86_64 "native")
    audit_arch: int
    nr_base: int
    count: int  # numbers evaluated: nr_base + 0 .. nr_base + count - 1
    libseccomp: str  # pyseccomp.Arch member naming this ABI's table
    width: int  # argument width: a 32-bit ABI's arguments are zero-extended 32-bit registers


ABIS: tuple[Abi, ...] = (
    Abi("x86_64", AUDIT_ARCH_X86_64, 0, 512, "X86_64", 64),
    Abi("x32", AUDIT_ARCH_X86_64, X32_SYSCALL_BIT, 548, "X32", 32),
    Abi("i386", AUDIT_ARCH_I386, 0, 512, "X86", 32),
)
ABI_BY_NAME = {abi.name: abi for abi in ABIS} | {"native": ABIS[0]}


@lru_cache(maxsize=8)
def _names(abi_name: str) -> dict[int, str]:
    import pyseccomp  # libseccomp's syscall tables; the only non-pure part of this module

    abi = ABI_BY_NAME[abi_name]
    arch = getattr(pyseccomp.Arch, abi.libseccomp)
    names = {}
    for offset in range(abi.count):
        try:
            names[abi.nr_base + offset] = pyseccomp.resolve_syscall(arch, abi.nr_base + offset).decode()
        except ValueError:
            continue
    return names


def syscall_name(abi: Abi, nr: int) -> str:
    return _names(abi.name).get(nr, f"nr {nr - abi.nr_base}")


def syscall_numbers(abi: Abi) -> range:
    return range(abi.nr_base, abi.nr_base + abi.count)


def number_of(abi: Abi, name: str) -> int | None:
    """The nr ``name`` carries in seccomp_data on ``abi`` (x32 with its bit); None if the table has none."""
    return _numbers(abi.name).get(name)


@lru_cache(maxsize=8)
def _numbers(abi_name: str) -> dict[str, int]:
    numbers: dict[str, int] = {}
    for nr, name in _names(abi_name).items():
        numbers.setdefault(name, nr)
    return numbers


@dataclass(frozen=True)
class ArgClass:
    """One path through the programs: a representative argument vector, what defines it, the results."""

    args: tuple[int, ...]  # args[0..5]
    instruction_pointer: int
    conditions: tuple[str, ...]  # "arg0 == 0x11", "arg1.hi != 0x0", ... (empty: every argument value)
    results: tuple[FilterResult, ...]  # one per stack explored

    def describe(self) -> str:
        if not self.conditions:
            return "any arguments"
        shown = ", ".join(f"arg{i}={value:#x}" for i, value in enumerate(self.args) if value)
        return " and ".join(self.conditions) + (f" (e.g. {shown})" if shown else " (e.g. all zero)")


def _word_name(word: int) -> str:
    if word in (2, 3):
        return "ip" + (".hi" if word == 3 else "")
    index, high = divmod(word - 4, 2)
    return f"arg{index}" + (".hi" if high else "")


def _condition(c: Comparison) -> str:
    assert c.word is not None
    left = _word_name(c.word) + (f" & {c.mask:#x}" if c.mask != U32 else "")
    if c.op == "jset":
        return f"{left} has {'some' if c.taken else 'none'} of {c.value:#x}"
    op = {("jeq", True): "==", ("jeq", False): "!=", ("jgt", True): ">", ("jgt", False): "<=",
          ("jge", True): ">=", ("jge", False): "<"}[(c.op, c.taken)]  # fmt: skip
    return f"{left} {op} {c.value:#x}"


def _conditions(compared: Sequence[Comparison], abi: Abi) -> tuple[str, ...]:
    """The path's conditions, without the ones that say nothing: a comparison under mask 0 (libseccomp's
    high word of a 32-bit masked compare), a 32-bit ABI's high words (always 0), and on a word known equal
    to a value every other full-word condition on it."""
    useful = [c for c in compared if c.mask and not (abi.width == 32 and c.word is not None and c.word >= 4
                                                      and c.word % 2)]
    equal = {c.word for c in useful if c.op == "jeq" and c.taken and c.mask == U32}
    kept = [c for c in useful if c.word not in equal or c.mask != U32 or (c.op == "jeq" and c.taken)]
    return tuple(dict.fromkeys(_condition(c) for c in kept))


def _flips(c: Comparison, current: int) -> set[int]:
    """Values of the compared word that may take the other branch (and its neighbours): tried, not assumed."""
    m, k = c.mask, c.value
    low_bit = m & -m
    kept = current & ~m & U32
    # (k & m) | ~m: the masked compare's value with every bit it ignores set, where a compare of the whole
    # word with k differs (ipc(2)'s call & 0xffff against libseccomp's ipc(arg0 == N): a version in the high bits)
    candidates = {k, k + 1, k - 1, kept | (k & m), kept | ((k + 1) & m), kept | ((k - 1) & m),
                  current ^ low_bit, current | m, kept, current | k, current & ~k & U32, (k & m) | (~m & U32)}
    if c.op == "jset":
        candidates |= {current | (k & -k), (current & ~k & U32) | (k & -k)}
    return {value & U32 for value in candidates}


def _as_args(words: Sequence[int]) -> tuple[int, tuple[int, ...]]:
    ip = words[0] | words[1] << 32
    return ip, tuple(words[2 + 2 * i] | words[3 + 2 * i] << 32 for i in range(6))


@dataclass(frozen=True)
class Stack:
    """Programs in load order. ``native_rules_on``: ABIs ("x32", "i386") on which this stack answers what its
    x86_64 rules answer for the call of the same name (a requirement that fences an ABI off with its
    bad-arch action still names which calls it refuses there); a name with no x86_64 number meets the
    rules of an unknown number (an allowlist's default action, a denylist's allow)."""

    programs: tuple[bytes, ...]
    native_rules_on: frozenset[str] = frozenset()

    def call(self, abi: Abi, nr: int) -> tuple[int, int]:
        """(audit arch, nr) this stack is evaluated at for the call ``nr`` on ``abi``."""
        if abi.name not in self.native_rules_on:
            return abi.audit_arch, nr
        native = number_of(ABIS[0], syscall_name(abi, nr))
        return AUDIT_ARCH_X86_64, UNKNOWN_NR if native is None else native


UNKNOWN_NR = 1023  # no x86_64 syscall has this number (the table ends below 512)

# The i386 multiplexers and the call numbers in their argument 0: include/uapi/linux/net.h SYS_SOCKET (1) ..
# SYS_SENDMMSG (20); include/uapi/linux/ipc.h SEMOP (1) .. SHMCTL (24). ipc(2) reads only the low 16 bits
# of its call (the high 16 are a version: ipc/syscall.c ``compat_ksys_ipc``).
MULTIPLEXED_CALLS: dict[str, dict[int, str]] = {
    "socketcall": dict(enumerate(("socket", "bind", "connect", "listen", "accept", "getsockname", "getpeername",
                                  "socketpair", "send", "recv", "sendto", "recvfrom", "shutdown", "setsockopt",
                                  "getsockopt", "sendmsg", "recvmsg", "accept4", "recvmmsg", "sendmmsg"), 1)),
    "ipc": {number: name for name, number in IPC_CALLS.items()},
}
_CALL_MASK = {"socketcall": U32, "ipc": IPC_CALL_MASK}


@lru_cache(maxsize=256)
def _refusal_anywhere(programs: tuple[bytes, ...], nr: int) -> FilterResult | None:
    """The first refusal the x86_64 rules of ``programs`` give call ``nr`` in any argument class, or None."""
    found = explore((Stack(programs),), ABIS[0], nr)[0]
    return next((c.results[0] for c in found if c.results[0].refuses), None)


def _evaluate(stack: Stack, abi: Abi, nr: int, args: tuple[int, ...], ip: int, traces: list[Trace]) -> FilterResult:
    """``stack``'s answer for one point. Where the stack answers an ABI with its x86_64 rules
    (``native_rules_on``), i386 socketcall(2) and ipc(2) answer as the call they carry: a filter cannot read
    the arguments behind socketcall's pointer, so ``socketcall(SYS_SOCKET, ...)`` is refused wherever the x86_64
    rules refuse ``socket`` for some arguments (libseccomp compiles such a rule as ``socketcall(call == 1)``);
    the comparisons on argument 0 are recorded so that the exploration tries every call number."""
    name = syscall_name(abi, nr) if abi.name == "i386" and abi.name in stack.native_rules_on else ""
    calls = MULTIPLEXED_CALLS.get(name)
    if calls is None or not traces:
        arch, number = stack.call(abi, nr)
        return run_stack(stack.programs, number, arch, args, ip, traces)
    selector = args[0] & _CALL_MASK[name]
    # (a matched call number is the whole condition; otherwise each number is a comparison not taken)
    tried = (selector,) if selector in calls else tuple(calls)
    traces[0].comparisons.extend(Comparison(4, _CALL_MASK[name], "jeq", call, selector == call) for call in tried)
    carried = number_of(ABIS[0], calls.get(selector, ""))
    refusal = _refusal_anywhere(stack.programs, carried) if carried is not None else None
    return refusal or run_stack(stack.programs, UNKNOWN_NR, AUDIT_ARCH_X86_64, args, ip)


def _stack(programs: Stack | Sequence[bytes]) -> Stack:
    return programs if isinstance(programs, Stack) else Stack(tuple(programs))


def classes(stacks: Sequence[Stack | Sequence[bytes]], abi: Abi, nr: int) -> tuple[ArgClass, ...]:
    """The argument classes of one call, explored over every stack at once (see the module docstring)."""
    return explore(stacks, abi, nr)[0]


def explore(stacks: Sequence[Stack | Sequence[bytes]], abi: Abi, nr: int) -> tuple[tuple[ArgClass, ...], bool]:
    """(the classes, whether the exploration finished within its bounds: False means some may be missing)."""
    stacks_ = [_stack(stack) for stack in stacks]
    start: tuple[int, ...] = (0,) * 14  # ip lo/hi, args lo/hi: seccomp_data words 2..15
    queue = [start]
    seen = {start}
    found: dict[tuple[tuple[object, ...], ...], ArgClass] = {}
    evaluations = 0
    while queue and len(found) < MAX_PATHS_PER_CALL and evaluations < MAX_EVALUATIONS_PER_CALL:
        words = queue.pop(0)
        evaluations += 1
        ip, args = _as_args(words)
        traces = [[Trace([]) for _ in stack.programs] for stack in stacks_]
        results = tuple(_evaluate(stack, abi, nr, args, ip, trace)
                        for stack, trace in zip(stacks_, traces, strict=True))
        compared = [c for per_stack in traces for trace in per_stack for c in trace.comparisons
                    if c.word is not None and c.word >= FIRST_ARG_WORD]
        path = tuple((c.word, c.mask, c.op, c.value, c.taken) for c in compared)
        if path in found:
            continue
        found[path] = ArgClass(args, ip, _conditions(compared, abi), results)
        for c in compared:
            assert c.word is not None
            index = c.word - FIRST_ARG_WORD
            if abi.width == 32 and c.word >= 4 and c.word % 2:
                continue  # args.hi on i386/x32: never anything but 0 (the kernel zero-extends 32-bit registers)
            for value in _flips(c, words[index]):
                candidate = (*words[:index], value, *words[index + 1:])
                if candidate not in seen:
                    seen.add(candidate)
                    queue.append(candidate)
    return tuple(found.values()), not queue


# --------------------------------------------------------------------------------------------
# Comparing two stacks


@dataclass(frozen=True)
class Change:
    """One point (syscall, ABI, argument class) where two stacks answer differently."""

    abi: str
    nr: int
    syscall: str
    arg_class: ArgClass
    old: FilterResult
    new: FilterResult
    unconditional: bool  # the syscall has one class only: the change holds for every argument value

    @property
    def direction(self) -> str:
        if self.old.refuses and not self.new.refuses:
            return "weaker"
        if self.new.refuses and not self.old.refuses:
            return "stronger"
        return "changed"

    def describe(self) -> str:
        where = f"{self.syscall} ({self.abi})"
        if not self.unconditional:
            where += f" when {self.arg_class.describe()}"
        return f"{where}: {self.old.describe()} -> {self.new.describe()}"


@dataclass(frozen=True)
class BehaviourDiff:
    changes: tuple[Change, ...]
    points: int  # (syscall, ABI, class) points evaluated
    calls: int  # syscall numbers evaluated
    incomplete: tuple[str, ...] = ()  # "name (abi)" whose argument classes hit the exploration bound

    def of(self, direction: str) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if c.direction == direction)

    @property
    def weaker(self) -> tuple[Change, ...]:
        return self.of("weaker")

    @property
    def stronger(self) -> tuple[Change, ...]:
        return self.of("stronger")


def compare(old: Stack | Sequence[bytes], new: Stack | Sequence[bytes], abis: Iterable[Abi] = ABIS) -> BehaviourDiff:
    """Evaluate both stacks (programs in load order) on every syscall number and argument class."""
    changes: list[Change] = []
    incomplete: list[str] = []
    points = calls = 0
    for abi in abis:
        for nr in syscall_numbers(abi):
            calls += 1
            found, complete = explore((old, new), abi, nr)
            if not complete:
                incomplete.append(f"{syscall_name(abi, nr)} ({abi.name})")
            points += len(found)
            for arg_class in found:
                before, after = arg_class.results
                if before != after:
                    changes.append(Change(abi.name, nr, syscall_name(abi, nr), arg_class, before, after,
                                          len(found) == 1))
    return BehaviourDiff(tuple(changes), points, calls, tuple(incomplete))


def summarise(changes: Sequence[Change], *, names_shown: int | None = None) -> list[str]:
    """Readable lines: unconditional changes with the same ABI and results are listed as one line of names;
    conditional ones get one line per syscall and class."""
    lines: list[str] = []
    grouped: dict[tuple[str, str, str], list[str]] = {}
    for change in changes:
        if change.unconditional:
            grouped.setdefault((change.abi, change.old.describe(), change.new.describe()), []).append(change.syscall)
        else:
            lines.append(change.describe())
    for (abi, old, new), names in grouped.items():
        if len(names) == 1:
            lines.append(f"{names[0]} ({abi}): {old} -> {new}")
            continue
        limit = len(names) if names_shown is None else names_shown
        shown = ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
        lines.append(f"{len(names)} syscalls ({abi}): {old} -> {new}: {shown}")
    return lines


def refusal_holes(required: Stack | Sequence[bytes], loaded: Stack | Sequence[bytes],
                  name: str) -> tuple[tuple[str, ...], int, bool]:
    """One named call on every ABI whose table has it: (each point where ``required`` refuses it and
    ``loaded`` lets it run, described; how many points ``required`` refuses; whether every exploration
    finished within its bound). For a call with no harmless live probe (verdicts.syscall.judge_unprobed)."""
    holes: list[str] = []
    refused, complete = 0, True
    for abi in ABIS:
        nr = number_of(abi, name)
        if nr is None:
            continue
        found, finished = explore((required, loaded), abi, nr)
        complete = complete and finished
        for arg_class in found:
            before, after = arg_class.results
            if before.refuses:
                refused += 1
                if not after.refuses:
                    holes.append(Change(abi.name, nr, name, arg_class, before, after, len(found) == 1).describe())
    return tuple(holes), refused, complete
