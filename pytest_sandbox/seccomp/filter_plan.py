"""What a policy compiles to, as data: the seccomp filters, their load order, their rules. Pure.

Both builds of a policy come from one :class:`FilterPlan`: the *real* build (the policy's errnos, what a
sandboxed program meets) and the *sentinel* build (every errno slot gets its own number, 1000 + n, so a
probe can tell which rule refused it: syscalls.md §4). The plan fixes every rule, every action and the
load order; the two builds differ in the numbers :meth:`FilterPlan.errnos` gives the slots, and in
nothing else (tests/test_compiler_equivalence.py proves it over generated policies).

Everything that libseccomp would otherwise decide silently, differently per build, is decided here:

- A rule whose action equals the filter's default is refused by libseccomp (``seccomp_rule_add`` returns
  EACCES). In an allowlist, ``socket(AF_PACKET) -> EPERM`` has the default's action, yet it must still
  beat the conditional allow ``socket(arg0 < 38)``. So an allowlist with refusals compiles to two
  filters: a *deny* filter (default ALLOW, the refusals) and the *allowlist* filter (default refuse, the
  allows, plus an ALLOW for exactly what the deny filter refuses). The kernel runs every filter and the
  most severe action wins (seccomp(2) "return value precedence"); as the allowlist lets the deny
  filter's calls through, each refusal carries its own errno whatever the load order.
- Rules on one syscall with identical comparisons but different actions make libseccomp fail with
  EEXIST; with equal actions it merges them. Identical rules therefore share one errno slot, and
  different errnos there are a policy error.
- An unconditional rule absorbs the conditional rules on the same syscall (libseccomp drops them).
- On i386 (``extra_arches = ["x86"]``) libseccomp also routes the socket and SysV IPC calls through the
  multiplexers ``socketcall(2)`` / ``ipc(2)``, rewriting argument 0 to the call number and keeping the
  other comparisons, which then read socketcall's pointer (libseccomp src/syscalls.c ``abi_rule_add``).
  Every refusal of such a call lands on the one ``socketcall(call == N)`` rule, so they share one slot
  (else EEXIST whenever their errnos differ); a refusal conditioned on another argument would compare
  a pointer there, and is a policy error.
- ipc(2) reads only the low 16 bits of its call number, the high 16 are a version (ipc/syscall.c
  ``compat_ksys_ipc``: ``version = call >> 16; call &= 0xffff``), but libseccomp's rule is ``ipc(arg0 == N)``
  on the whole argument: ``ipc((1 << 16) | SHMCTL)`` is SHMCTL to the kernel and passes it. A TOML policy's
  plan therefore masks (``ipc_versions_masked``): every i386 rule on a SysV IPC call gets a twin
  ``ipc(arg0 & 0xffff == N)`` with the same action (:func:`ipc_version_twin`). An OCI profile keeps
  libseccomp's rule, as runc compiles it, hole included.
- i386 and x32 are 32-bit ABIs: libseccomp compares only the low 32 bits there (``gt 0x200000007``
  becomes ``gt 7``), so a comparison value above 32 bits with x86 or x32 admitted is a policy error.
- On x86_64 libseccomp compares all 64 bits, but the kernel reads an ``int`` argument as its low 32 bits
  (``SYSCALL_DEFINEn``'s ``__SC_CAST``; the catalogue's ``arg_types``). A TOML rule's ``ne``/``lt``/
  ``le``/``gt``/``ge`` on such an argument is therefore planned as a 32-bit comparison (``bits = 32``),
  which the compiler emits as the few ``masked_eq`` blocks covering the same low-32-bit values (a range
  of 32-bit values is a union of at most 62 aligned prefix blocks; ``ne v`` is 32): ``arg0 le 5`` then
  refuses ``(1 << 32) | 3`` as the kernel reads it, 3. An OCI profile keeps libseccomp's 64-bit
  compares, as runc compiles it, holes included.
"""

from __future__ import annotations

import errno as errno_module
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from itertools import product

from pytest_sandbox.catalogues.syscalls import DEVICE_PATHS, PROBES_BY_NAME
from pytest_sandbox.errors import PolicyError
from pytest_sandbox.policy.model import SOCKET_FAMILY_NAMES, ArgRule, Policy

SENTINEL_ERRNO_BASE = 1000
MAX_ERRNO = 4094  # the kernel caps errno data at 4095, and libseccomp refuses SCMP_ACT_ERRNO(4095) (policy.py)
DEFAULT_KEY = "default"  # the errno slot of an allowlist's default action
BAD_ARCH_KEY = "bad_arch"  # the errno slot of bad_arch_action = "errno"
LOW32 = 0xFFFFFFFF

# seccomp(2) "return value precedence": the kernel runs every installed filter, newest first, and keeps
# the first-seen action of the highest precedence. (USER_NOTIF is never compiled here; TRACE only from an
# OCI profile: with no tracer attached the kernel fails the call with ENOSYS.)
PRECEDENCE: Mapping[str, int] = {"kill_process": 6, "kill_thread": 5, "trap": 4, "errno": 3, "trace": 2, "log": 1,
                                 "allow": 0}

# libseccomp src/syscalls.c (_abi_syscall_mux): on x86 these calls also enter through socketcall(2) or
# ipc(2) with the call number in argument 0; a rule on one of them becomes a rule on the multiplexer.
_SOCKETCALL = ("socket", "bind", "connect", "listen", "accept", "getsockname", "getpeername", "socketpair",
               "send", "recv", "sendto", "recvfrom", "shutdown", "setsockopt", "getsockopt", "sendmsg", "recvmsg",
               "accept4", "recvmmsg", "sendmmsg")
# include/uapi/linux/ipc.h: the call numbers ipc(2) reads from the low 16 bits of its argument 0.
IPC_CALLS: Mapping[str, int] = {"semop": 1, "semget": 2, "semctl": 3, "semtimedop": 4, "msgsnd": 11, "msgrcv": 12,
                                "msgget": 13, "msgctl": 14, "shmat": 21, "shmdt": 22, "shmget": 23, "shmctl": 24}
IPC_CALL_MASK = 0xFFFF  # the high 16 bits are the version (ipc/syscall.c: ``call &= 0xffff``)
X86_MULTIPLEXED: Mapping[str, str] = {**dict.fromkeys(_SOCKETCALL, "socketcall"), **dict.fromkeys(IPC_CALLS, "ipc")}

# prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ...): how the launcher installs each filter after the first.
_PRCTL_LOAD_FILTER = (22, 2)


def deny_key(syscall: str) -> str:
    return f"deny:{syscall}"


def enosys_key(syscall: str) -> str:
    return f"enosys:{syscall}"


def arg_key(rule: ArgRule) -> str:
    return f"arg:{rule.key}"


RANGE_OPERATORS = ("ne", "lt", "le", "gt", "ge")


def kernel_arg_bits(syscall: str, arg: int) -> int:
    """How many bits of argument ``arg`` the kernel reads (catalogues/syscalls.py ``arg_types``). A call
    with no catalogue row is taken as 32, TOML's safer reading (its ``eq`` is a low-32-bit compare too)."""
    probe = PROBES_BY_NAME.get(syscall)
    return probe.arg_bits(arg) if probe is not None else 32


def _prefix_blocks(low: int, high: int) -> list[tuple[int, int]]:
    """``[low, high]`` within 32 bits as aligned blocks ``(mask, value)``: ``x & mask == value``."""
    blocks = []
    while low <= high:
        size = low & -low if low else 1 << 32
        while size > high - low + 1:
            size //= 2
        blocks.append((LOW32 & ~(size - 1), low))
        low += size
    return blocks


def low32_blocks(op: str, value: int) -> tuple[tuple[int, int], ...]:
    """The ``masked_eq`` blocks ``(mask, value)`` whose union is ``low32(x) op value``. Pure."""
    if op == "ne":  # x differs from value: agree above bit i, differ at bit i (32 disjoint blocks)
        return tuple((LOW32 & ~((1 << i) - 1), (value ^ (1 << i)) & LOW32 & ~((1 << i) - 1)) for i in range(32))
    low, high = {"lt": (0, value - 1), "le": (0, value), "gt": (value + 1, LOW32), "ge": (value, LOW32)}[op]
    return tuple(_prefix_blocks(low, high))


@dataclass(frozen=True)
class Condition:
    """One argument comparison as libseccomp compiles it, and ``also`` the conditions ANDed with it.

    A TOML rule's ``eq`` is ``masked_eq`` with the low-32-bit mask: int arguments are read as 32 bits by
    the kernel, so high bits must not let a call past (model.py ``ArgRule``); its ``ne``/``lt``/``le``/
    ``gt``/``ge`` on an argument the kernel reads as 32 bits has ``bits = 32`` (compiled as the
    :func:`low32_blocks`). An OCI profile's rule keeps libseccomp's 64-bit compares, as runc compiles it
    (``ArgRule.bits == 64``)."""

    arg: int
    op: str  # eq (64-bit, OCI only) | masked_eq | ne | lt | le | gt | ge
    value: int
    mask: int = LOW32
    also: tuple[Condition, ...] = ()
    bits: int = 64  # 32: a range comparison of the low 32 bits only (a TOML rule on an int argument)

    @classmethod
    def of(cls, rule: ArgRule) -> Condition:
        also = tuple(cls.of(other) for other in rule.also)
        if rule.bits == 64:
            mask = rule.mask if rule.op == "masked_eq" else 0
            return cls(rule.arg, rule.op, rule.value, mask, also)
        if rule.op in ("eq", "masked_eq"):
            mask = (rule.mask if rule.op == "masked_eq" else LOW32) & LOW32
            return cls(rule.arg, "masked_eq", rule.value, mask, also)
        return cls(rule.arg, rule.op, rule.value, 0, also, kernel_arg_bits(rule.syscall, rule.arg))

    @property
    def parts(self) -> tuple[Condition, ...]:
        """Every comparison of the rule (this one first), each without ``also``."""
        return (Condition(self.arg, self.op, self.value, self.mask, bits=self.bits),
                *(p for c in self.also for p in c.parts))

    def alternatives(self) -> tuple[tuple[Condition, ...], ...]:
        """The rule as libseccomp rules: each a tuple of comparisons ANDed, the tuples ORed. A 32-bit range
        comparison becomes its :func:`low32_blocks`; every other comparison is itself."""
        each = [tuple(Condition(p.arg, "masked_eq", value, mask) for mask, value in low32_blocks(p.op, p.value))
                if p.bits == 32 else (p,) for p in self.parts]
        return tuple(product(*each))

    def matches(self, args: tuple[int, ...], *, width: int = 64) -> bool:
        """BPF semantics; ``width`` 32 for a 32-bit ABI, whose arguments (and libseccomp's datum) are 32 bits."""
        full = (1 << min(width, self.bits)) - 1
        raw = (args[self.arg] if self.arg < len(args) else 0) & full
        value = self.value & full
        if self.op == "masked_eq":
            hit = (raw & self.mask & full) == value
        else:
            hit = {"eq": raw == value, "ne": raw != value, "lt": raw < value, "le": raw <= value,
                   "gt": raw > value, "ge": raw >= value}[self.op]  # fmt: skip
        return hit and all(other.matches(args, width=width) for other in self.also)

    def describe(self) -> str:
        return " && ".join(part.describe_one() for part in self.parts)

    def describe_one(self) -> str:
        if self.op == "masked_eq":
            mask = "" if self.mask == LOW32 else f" & {self.mask:#x}"
            return f"arg{self.arg}{mask} == {self.value:#x}"
        symbol = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}[self.op]
        width = " (64-bit)" if self.op == "eq" else " (low 32 bits)" if self.bits == 32 else ""
        return f"arg{self.arg} {symbol} {self.value:#x}{width}"


@dataclass(frozen=True)
class Action:
    """What a filter returns: ``kind`` as in policy ACTIONS; ``slot`` names the errno of an ERRNO action."""

    kind: str
    slot: str | None = None


ALLOW = Action("allow")


@dataclass(frozen=True)
class PlannedRule:
    syscall: str
    action: Action
    condition: Condition | None
    sources: tuple[str, ...]  # the policy entries it stands for: "seccomp.deny ptrace", ...

    def describe(self) -> str:
        where = f"({self.condition.describe()})" if self.condition else ""
        return f"{self.syscall}{where}"

    def fires(self, syscall: str, args: tuple[int, ...], width: int) -> bool:
        return self.syscall == syscall and (self.condition is None or self.condition.matches(args, width=width))


@dataclass(frozen=True)
class PlannedFilter:
    role: str  # "enosys" | "main" (a denylist) | "deny" + "allowlist" (an allowlist with refusals)
    default: Action
    rules: tuple[PlannedRule, ...]


@dataclass(frozen=True)
class ErrnoSlot:
    """One errno a compiled filter returns, and every policy rule that returns it."""

    key: str
    errno: int  # as the policy configures it (the real build)
    members: tuple[str, ...]
    rule: bool = True  # False for the default and bad-arch actions, which are one per filter, not per arch

    @property
    def keeps_number(self) -> bool:
        # glibc's clone3 -> clone fallback needs exactly ENOSYS, so ENOSYS stays ENOSYS in a sentinel build
        # for native calls. Foreign-ABI calls (x32, i386) come only from probes, so there a rule's ENOSYS
        # gets a sentinel too: on a kernel without x32 every x32 call fails with ENOSYS anyway.
        return self.errno == errno_module.ENOSYS


@dataclass(frozen=True)
class FilterPlan:
    policy_name: str
    source: str
    mode: str
    extra_arches: tuple[str, ...]
    bad_arch: Action
    filters: tuple[PlannedFilter, ...]  # load order; empty when the policy skips seccomp in this mode
    slots: tuple[ErrnoSlot, ...]
    no_new_privs: bool = True
    # i386 rules on SysV IPC calls also match ipc(2) whatever the version in argument 0's high 16 bits
    # (the module docstring): True for a TOML policy admitting x86, False for an OCI profile (runc's hole)
    ipc_versions_masked: bool = False

    def errnos(self, *, sentinel: bool) -> dict[str, int]:
        """Errno of every slot and of every rule key in it: the policy's own, or one sentinel per slot.
        Keys ``slot@arch`` give a rule slot's errno on an extra arch where it differs from native
        (an ENOSYS slot of a sentinel build); :func:`errno_on` reads them."""
        numbers: dict[str, int] = {}
        sentinels = iter(range(SENTINEL_ERRNO_BASE, MAX_ERRNO + 1))

        def assign(slot: ErrnoSlot, suffix: str, keep: bool) -> None:
            number = next(sentinels, None) if sentinel and not keep else slot.errno
            if number is None:
                raise PolicyError(f"{self.source}: more than {MAX_ERRNO - SENTINEL_ERRNO_BASE} distinct rules; "
                                  "a sentinel build cannot give each its own errno")
            for key in (slot.key, *slot.members):
                numbers.setdefault(key + suffix, number)

        for slot in self.slots:
            assign(slot, "", slot.keeps_number)
        for arch in self.extra_arches:
            for slot in self.slots:
                if slot.rule and slot.keeps_number:
                    assign(slot, f"@{arch}", False)
        return numbers

    def results(self, syscall: str, args: tuple[int, ...], arch: str = "native", *,
                multiplexed: bool = False, version: int = 0) -> frozenset[Action]:
        """What the loaded filters may return for this call: one action, or several where rules with
        different errnos overlap in one filter (libseccomp's evaluation order between them is unspecified).

        ``arch`` is "native", "x86" (i386) or "x32". ``multiplexed``: the call enters through i386
        socketcall(2)/ipc(2), where libseccomp's rule is ``mux(call == N)``, so every rule on it fires
        whatever the arguments (the module docstring); ``version``: ipc(2)'s version in the high 16 bits of
        that call number, which only a masked plan (``ipc_versions_masked``) refuses as the call."""
        if not self.filters:
            return frozenset({ALLOW})
        if arch != "native" and arch not in self.extra_arches:
            return frozenset({self.bad_arch})
        width = 32 if arch in ("x86", "x32") else 64  # libseccomp: ARCH_SIZE_32 for both
        reaches_rules = not multiplexed or version == 0 or self.ipc_versions_masked
        per_filter = []
        for planned in self.filters:
            fired = {rule.action for rule in planned.rules if reaches_rules and (
                     rule.syscall == syscall if multiplexed else rule.fires(syscall, args, width))}
            per_filter.append(fired or {planned.default})
        return frozenset(strongest(combination) for combination in product(*per_filter))


    def start_problem(self) -> str | None:
        """Why no process can be started under these filters, or None. glibc (2.34+) creates processes and
        threads with clone3 and falls back to clone only when clone3 fails with exactly ENOSYS
        (sysdeps/unix/sysv/linux/clone-internal.c): any other refusal of clone3 makes posix_spawn and
        pthread_create fail. Docker up to 20.10.9 refused clone3 with EPERM (moby fixed it in 20.10.10 with
        a clone3 -> ENOSYS rule)."""
        real = self.errnos(sentinel=False)
        for action in sorted(self.results("clone3", (0,) * 6), key=lambda a: (a.kind, a.slot or "")):
            if action.kind == "errno" and real.get(action.slot or "") != errno_module.ENOSYS:
                number = real.get(action.slot or "", 0)
                name = errno_module.errorcode.get(number, str(number))
                rule = "the default action" if action.slot in (DEFAULT_KEY, None) else f"rule {action.slot}"
                return (f"{self.source}: clone3 refused with {name}: glibc's posix_spawn and pthread_create "
                        f"need ENOSYS there to fall back to clone, so no process can start under this policy "
                        f"({rule} refuses it; Docker <= 20.10.9 had this bug); refuse clone3 with ENOSYS "
                        '(OCI: {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}; TOML: '
                        'seccomp.enosys = ["clone3"])')
            if action.kind in ("kill_process", "kill_thread", "trap", "trace"):
                return (f"{self.source}: clone3 answered with {action.kind.upper()}: glibc's posix_spawn needs "
                        "ENOSYS there to fall back to clone, so no process can start under this policy; refuse "
                        "clone3 with ENOSYS instead")
        return None


def ipc_version_twin(syscall: str, parts: tuple[Condition, ...]) -> tuple[Condition, ...] | None:
    """The comparisons of the i386 ``ipc`` rule that stands next to libseccomp's ``ipc(arg0 == N)`` for one
    rule on a SysV IPC call (``parts``: its comparisons), or None for any other call. libseccomp replaces
    argument 0 by the call number and keeps the other comparisons (src/arch-x86.c ``x86_rule_add``); the twin
    does the same but compares only the low 16 bits, which is all the kernel reads (ipc/syscall.c)."""
    call = IPC_CALLS.get(syscall)
    if call is None:
        return None
    return (Condition(0, "masked_eq", call, IPC_CALL_MASK), *(p for p in parts if p.arg != 0))


def errno_on(numbers: Mapping[str, int], key: str, arch: str) -> int | None:
    """The errno ``key`` returns on ``arch`` ("native", "x86", "x32") in a build's :meth:`FilterPlan.errnos`."""
    return numbers.get(f"{key}@{arch}", numbers.get(key))


def strongest(actions_in_load_order: Iterable[Action]) -> Action:
    """The kernel's choice: filters run newest first; the first-seen action of highest precedence wins."""
    best: Action | None = None
    for action in reversed(tuple(actions_in_load_order)):
        if best is None or PRECEDENCE[action.kind] > PRECEDENCE[best.kind]:
            best = action
    assert best is not None
    return best


# --------------------------------------------------------------------------------------------
# Planning


@dataclass(frozen=True)
class _Refusal:
    key: str
    syscall: str
    condition: Condition | None
    errno: int
    source: str
    kind: str = "errno"  # or kill_process, kill_thread, trap, trace (OCI profiles)


class _Planner:
    def __init__(self, policy: Policy, mode: str) -> None:
        self.policy = policy
        self.mode = mode
        self.x86 = "x86" in policy.seccomp.extra_arches
        self.arch32 = [arch for arch in policy.seccomp.extra_arches if arch in ("x86", "x32")]
        self.slots: dict[str, ErrnoSlot] = {}

    def fail(self, where: str, message: str) -> PolicyError:
        return PolicyError(f"{self.policy.source}: {where}: {message}")

    def slot(self, key: str, number: int, members: tuple[str, ...] = (), *, rule: bool = True) -> Action:
        if not 1 <= number <= MAX_ERRNO:
            raise self.fail(key, f"errno {number} is outside 1..{MAX_ERRNO}: 0 makes a refusal look like success and "
                                 "libseccomp refuses 4095 and above")
        self.slots.setdefault(key, ErrnoSlot(key, number, tuple(dict.fromkeys((key, *members))), rule))
        return Action("errno", key)

    def filter_action(self, kind: str, key: str, number: int) -> Action:
        return self.slot(key, number, rule=False) if kind == "errno" else Action(kind)

    def rule_source(self, rule: ArgRule, table: str) -> str:
        if self.policy.origin == "oci":
            return f"profile rule {rule.key}"
        if table == "arg_rules" and rule not in self.policy.seccomp.arg_rules:
            family = SOCKET_FAMILY_NAMES.get(rule.value, str(rule.value))
            return f"network.socket_domains {family} ({self.mode} mode)"
        return f"seccomp.{table} {rule.key}"

    def check_width(self, condition: Condition | None, source: str) -> None:
        for part in condition.parts if condition is not None else ():
            if part.bits == 32 and part.value > LOW32:
                raise self.fail(source, f"value {part.value:#x} exceeds 32 bits, but the kernel reads argument "
                                        f"{part.arg} as a 32-bit int, so no call can carry it; use the 32-bit value "
                                        f"{part.value & LOW32:#x}")
            if part.bits == 32 and not low32_blocks(part.op, part.value):
                raise self.fail(source, f"arg{part.arg} {part.op} {part.value:#x} matches no 32-bit value, so the "
                                        "rule would never fire; fix the operator or the value")
        # libseccomp compares only the low 32 bits of the value on x86 and x32 (see the module docstring).
        # An OCI profile is compiled as runc compiles it, holes included: no check there.
        if (self.policy.origin != "oci" and self.arch32 and condition is not None
                and condition.op != "masked_eq" and condition.value > LOW32):
            arches = " and ".join(self.arch32)
            raise self.fail(source, f"value {condition.value:#x} exceeds 32 bits, and with extra_arches {arches} "
                                    f"libseccomp compares only its low 32 bits on those 32-bit ABIs, so there the "
                                    f"rule would mean {condition.value & LOW32:#x}; use a value below 2**32 or "
                                    f"drop {arches}")

    def plan(self) -> FilterPlan:
        policy, seccomp = self.policy, self.policy.seccomp
        filters: list[PlannedFilter] = []
        applies = policy.filter_applies(self.mode)
        if applies and seccomp.enosys:
            rules = tuple(PlannedRule(name, self.slot(enosys_key(name), errno_module.ENOSYS), None,
                                      (f"seccomp.enosys {name}",)) for name in seccomp.enosys)
            filters.append(PlannedFilter("enosys", ALLOW, rules))
        default = self.filter_action(seccomp.default_action, DEFAULT_KEY, seccomp.default_errno)
        bad_arch = self.filter_action(seccomp.bad_arch_action, BAD_ARCH_KEY, seccomp.errno)
        if applies:
            refusals = self.refusal_rules()
            if not seccomp.is_allowlist:  # default allow, or log (allow and write an audit line)
                filters.append(PlannedFilter("main", default if seccomp.default_action == "log" else ALLOW,
                                             refusals))
            else:
                if refusals:
                    self.check_loadable(refusals)
                    filters.append(PlannedFilter("deny", ALLOW, refusals))
                filters.append(PlannedFilter("allowlist", default, self.allow_rules(refusals)))
        return FilterPlan(policy.name, policy.source, self.mode, seccomp.extra_arches, bad_arch, tuple(filters),
                          tuple(self.slots.values()), seccomp.no_new_privs and bool(filters),
                          self.x86 and policy.origin != "oci")

    def allow_rules(self, refusals: tuple[PlannedRule, ...]) -> tuple[PlannedRule, ...]:
        seccomp = self.policy.seccomp
        rules: dict[tuple[str, Condition | None], PlannedRule] = {}

        def allow(syscall: str, condition: Condition | None, source: str) -> None:
            self.check_width(condition, source)
            found = rules.get((syscall, condition))
            sources = (found.sources if found else ()) + (source,)
            rules[(syscall, condition)] = PlannedRule(syscall, ALLOW, condition, tuple(dict.fromkeys(sources)))

        # The ENOSYS calls must get through: among equal-precedence ERRNO results the filter loaded last
        # wins, and glibc falls back from clone3 only on exactly ENOSYS.
        for name in seccomp.allow:
            allow(name, None, f"seccomp.allow {name}")
        for name in seccomp.enosys:
            allow(name, None, f"seccomp.enosys {name}")
        for rule in seccomp.allow_rules:
            allow(rule.syscall, Condition.of(rule), self.rule_source(rule, "allow_rules"))
        # What the deny filter refuses, the allowlist lets through, so that the refusal's own errno wins.
        for refusal in refusals:
            allow(refusal.syscall, refusal.condition, "refused by the deny filter: " + ", ".join(refusal.sources))
        unconditional = {syscall for syscall, condition in rules if condition is None}
        return tuple(rule for (syscall, condition), rule in rules.items()
                     if condition is None or syscall not in unconditional)

    def refusals(self) -> list[_Refusal]:
        seccomp = self.policy.seccomp
        found = [_Refusal(deny_key(name), name, None, seccomp.deny_action(name)[1],
                          f"seccomp.deny {name}" if self.policy.origin != "oci" else f"profile rule {name}",
                          seccomp.deny_action(name)[0]) for name in seccomp.deny]
        for rule in self.policy.rules_for_mode(self.mode):
            found.append(_Refusal(arg_key(rule), rule.syscall, Condition.of(rule), rule.errno or seccomp.errno,
                                  self.rule_source(rule, "arg_rules"), rule.action))
        for refused, rule in implied_rules(self.policy):
            found.append(_Refusal(arg_key(rule), rule.syscall, Condition.of(rule), rule.errno or seccomp.errno,
                                  f"implied by the refusal of {refused}: {DEVICE_PATHS[refused].note}", rule.action))
        for refusal in found:
            self.check_width(refusal.condition, refusal.source)
            # runc compiles such a rule as it is, and libseccomp applies it to socketcall/ipc on i386:
            # the hole is the profile's, and the suite must show it (no refusal here for OCI profiles).
            multiplexed = self.x86 and refusal.syscall in X86_MULTIPLEXED
            if self.policy.origin != "oci" and multiplexed and refusal.condition and refusal.condition.arg:
                raise self.fail(refusal.source, f"with extra_arches x86, libseccomp also applies this rule to "
                                                f"{X86_MULTIPLEXED[refusal.syscall]}(2), where argument "
                                                f"{refusal.condition.arg} is a pointer to the real arguments, so "
                                                "the refusal would not exist on that path; drop x86 or refuse "
                                                "on argument 0 only")
        return found

    def refusal_rules(self) -> tuple[PlannedRule, ...]:
        """The refusals as libseccomp will hold them: merged where libseccomp merges, one slot per group."""
        found = self.refusals()
        groups = _Groups(found, self.fail)
        by_rule: dict[tuple[str, Condition | None], list[int]] = {}
        for index, refusal in enumerate(found):
            by_rule.setdefault((refusal.syscall, refusal.condition), []).append(index)
        for same in by_rule.values():
            for other in same[1:]:
                groups.join(same[0], other, "refuse exactly the same calls")
        unconditional = {syscall: same[0] for (syscall, condition), same in by_rule.items() if condition is None}
        for (syscall, condition), same in by_rule.items():
            if condition is not None and syscall in unconditional:
                groups.join(unconditional[syscall], same[0],
                            "overlap, and the unconditional rule decides every call (libseccomp drops the other)")
        if self.x86:
            first_on: dict[str, int] = {}
            for (syscall, _condition), same in by_rule.items():
                if syscall in X86_MULTIPLEXED:
                    groups.join(first_on.setdefault(syscall, same[0]), same[0],
                                f"become the one rule {X86_MULTIPLEXED[syscall]}(call == {syscall}) on i386 "
                                "(extra_arches x86), where a filter cannot read the call's arguments")
        rules = []
        for (syscall, condition), same in by_rule.items():
            if condition is not None and syscall in unconditional:
                continue
            root = found[groups.root(same[0])]
            action = (self.slot(root.key, root.errno, groups.member_keys(same[0])) if root.kind == "errno"
                      else Action(root.kind))
            sources = tuple(dict.fromkeys(found[i].source for i in same))
            rules.append(PlannedRule(syscall, action, condition, sources))
        return tuple(rules)

    def check_loadable(self, refusals: tuple[PlannedRule, ...]) -> None:
        # The deny filter is loaded before the allowlist filter, through prctl(PR_SET_SECCOMP).
        for rule in refusals:
            if rule.fires("prctl", _PRCTL_LOAD_FILTER, 64):
                raise self.fail(rule.sources[0], "in an allowlist, refusing prctl(PR_SET_SECCOMP) would stop the "
                                                 "allowlist filter from loading; leave prctl out of seccomp.allow "
                                                 "instead")


class _Groups:
    """Union-find over refusals that must return one errno; joining two with different errnos fails."""

    def __init__(self, refusals: list[_Refusal], fail: Callable[[str, str], PolicyError]) -> None:
        self.refusals = refusals
        self.parent = list(range(len(refusals)))
        self.fail = fail

    def root(self, index: int) -> int:
        while self.parent[index] != index:
            index = self.parent[index]
        return index

    def join(self, first: int, second: int, why: str) -> None:
        a, b = sorted((self.root(first), self.root(second)))  # the earliest rule names the slot
        if a == b:
            return
        one, other = self.refusals[first], self.refusals[second]
        if (self.refusals[a].kind, self.refusals[a].errno) != (self.refusals[b].kind, self.refusals[b].errno):
            raise self.fail(other.source, f"returns {_answer(other)} but {one.source} returns "
                                          f"{_answer(one)}, and the two {why}; give them one errno")
        self.parent[b] = a

    def member_keys(self, index: int) -> tuple[str, ...]:
        root = self.root(index)
        return tuple(dict.fromkeys(r.key for i, r in enumerate(self.refusals) if self.root(i) == root))


def _errno_name(number: int) -> str:
    return errno_module.errorcode.get(number, str(number))


def _answer(refusal: _Refusal) -> str:
    return _errno_name(refusal.errno) if refusal.kind == "errno" else refusal.kind.upper()


@lru_cache(maxsize=128)
def implied_rules(policy: Policy) -> tuple[tuple[str, ArgRule], ...]:
    """The refusals a policy's refusal of a syscall implies on another path to the same kernel object
    (:data:`~pytest_sandbox.catalogues.syscalls.DEVICE_PATHS`): ``ioctl(fd, USERFAULTFD_IOC_NEW, ...)``, with the
    refused syscall's own action, wherever ``userfaultfd`` is refused whatever its arguments. Pure.

    The reference launcher leaves the host's /dev in place, where root opens /dev/userfaultfd: without this rule
    a policy that denies userfaultfd(2) hands the same userfaultfd out through the device. The ioctl request is an
    ``unsigned int`` (fs/ioctl.c), so the rule compares its low 32 bits like every TOML rule. An OCI profile gets
    it too: runc gives its container a /dev of its own without the device, so the profile never had to say it, and
    the reference, which shares the host's /dev, enforces the profile as runc does only with this rule (the suite's
    device rows hold both to it: tests/test_runc.py)."""
    seccomp = policy.seccomp
    refused = set(seccomp.effective_denies())
    found = []
    for name, path in DEVICE_PATHS.items():
        if name not in refused:
            continue
        if name in seccomp.deny:
            kind, number = seccomp.deny_action(name)
        else:  # refused by an allowlist's default action
            kind, number = seccomp.default_action, seccomp.default_errno
        found.append((name, ArgRule("ioctl", 1, "eq", path.request, errno=number if kind == "errno" else None,
                                    why=f"{name} through {path.device}", action=kind)))
    return tuple(found)


@lru_cache(maxsize=64)
def plan_policy(policy: Policy, mode: str) -> FilterPlan:
    """The filters ``policy`` compiles to in network ``mode``; raises PolicyError for what cannot compile.

    Cached (both arguments and the plan are frozen): the judge of every syscall row asks the plan of its run's policy
    what the filter answers that row (verdicts/syscall.py), 2,801 plans of ~0.8 ms each in a conformance session."""
    return _Planner(policy, mode).plan()
