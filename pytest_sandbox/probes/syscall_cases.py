"""The syscall category's case plan: requirements → probe cases. Pure (stdlib, the policy model, the catalogue).

A :class:`Requirement` is one thing that must be proven refused (a syscall, an argument rule, an ENOSYS
rule) together with the refusal the requirement itself names (an errno, ENOSYS included, or a kill).
Each requirement becomes :class:`ProbeCase`\\ s: every ABI path (native, x32, i386 direct, and the i386
multiplexers socketcall(2) / ipc(2) for the socket-family and SysV IPC calls, ipc(2) also with a version in
the high 16 bits of its call number), and high-bit variants for every ruled argument the kernel reads as 32 bits.
"""

from __future__ import annotations

import errno as errno_module
import signal
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pytest_sandbox.catalogues.syscalls import DEVICE_PATHS, PROBES_BY_NAME, SYSCALL_PROBES, WITNESS_PATHS, SyscallProbe
from pytest_sandbox.policy.model import SOCKET_FAMILIES, SOCKET_FAMILY_NAMES, ArgRule, Policy
from pytest_sandbox.seccomp.filter_plan import RANGE_OPERATORS, Condition, arg_key, deny_key, enosys_key
from pytest_sandbox.verdicts.judgement import Outcome

ABIS = ("native", "x32", "i386")
# High bits in a 32-bit argument (syscalls.md §2.1): garbage above bit 31, and the sign extension of a
# negative int. Only for arguments the kernel reads as 32 bits (catalogues/syscalls.py ARG_TYPE_BITS):
# for a long or a pointer the high bits make another value, which the kernel itself refuses.
HIGH_BIT_VARIANTS = (("hi32", 1 << 32), ("hi-ones", 0xFFFFFFFF << 32))
KILL = "kill"  # a requirement whose refusal is death by SIGSYS (kill_process, kill_thread, trap)
# In a device path's arguments (device_path_cases): the fd the runner's ``open:<device>`` setup step opened.
FD = "fd"
_KILLING = ("kill_process", "kill_thread", "trap")
SIGSYS = Outcome.killed_by(signal.SIGSYS)
# What counts as a refusal of a call by a filter whatever the requirement names: EPERM (the usual
# SECCOMP_RET_ERRNO), ENOSYS (Podman's defaultErrnoRet, bubblewrap's and glibc-friendly filters: a
# caller sees the call fail as if the kernel lacked it), death by SIGSYS (a kill or trap). Each is a
# refusal of the call only where the unfiltered kernel answers something else (verdicts.judgement).
GENERIC_REFUSALS = frozenset({Outcome.errno(errno_module.EPERM), Outcome.errno(errno_module.ENOSYS), SIGSYS})


@dataclass(frozen=True)
class Requirement:
    """One thing that must be proven refused: a syscall, an argument rule, or an ENOSYS rule.

    ``refused_with`` is the refusal the requirement names: an errno number, or :data:`KILL`."""

    kind: str  # "deny" | "arg" | "enosys"
    syscall: str
    rule: ArgRule | None = None
    refused_with: int | str = errno_module.EPERM

    @property
    def device_path(self) -> bool:
        """Whether the syscall's other way to the same kernel object (catalogues/syscalls.py DEVICE_PATHS) must be
        refused too: wherever the syscall is refused whatever its arguments."""
        return self.kind == "deny" and self.syscall in DEVICE_PATHS

    @property
    def witness_path(self) -> bool:
        """Whether its cross-process access must be refused by another path too (catalogues/syscalls.py
        WITNESS_PATHS)."""
        return self.kind == "deny" and self.syscall in WITNESS_PATHS

    @property
    def key(self) -> str:
        if self.kind == "arg":
            assert self.rule is not None
            return arg_key(self.rule)
        return enosys_key(self.syscall) if self.kind == "enosys" else deny_key(self.syscall)

    @property
    def label(self) -> str:
        """Short, test-id friendly: ``pidfd_getfd``, ``clone[arg0&0x10000000]``, ``socket[AF_INET]``."""
        if self.rule is None:
            return self.syscall
        return f"{self.syscall}[{' && '.join(_condition_label(self.syscall, c) for c in (self.rule, *self.rule.also))}]"

    @property
    def own_refusal(self) -> Outcome:
        """The refusal the requirement names for this rule."""
        if self.kind == "enosys":
            return Outcome.errno(errno_module.ENOSYS)
        return SIGSYS if self.refused_with == KILL else Outcome.errno(int(self.refused_with))

    @property
    def refusal(self) -> frozenset[Outcome]:
        """What counts as refused when nothing more precise is known (third-party sandboxes): the
        requirement's own refusal, and any other refusal of the call by a filter (GENERIC_REFUSALS)."""
        return GENERIC_REFUSALS | {self.own_refusal}


def _condition_label(syscall: str, rule: ArgRule) -> str:
    if syscall == "socket" and rule.arg == 0 and rule.op == "eq":
        return SOCKET_FAMILY_NAMES.get(rule.value, str(rule.value))
    mask = f"&{rule.mask:#x}" if rule.op == "masked_eq" else ""
    operator = "" if rule.op in ("eq", "masked_eq") else f" {rule.op} "
    return f"arg{rule.arg}{mask}{operator or '='}{rule.value:#x}"


def _action_refusal(action: str, number: int) -> int | str:
    """The refusal a rule's action names: death by SIGSYS, ENOSYS for TRACE (seccomp(2): with no tracer
    attached the call is not executed and fails with ENOSYS; a probe runner is never traced), else its errno."""
    if action == "trace":
        return errno_module.ENOSYS
    return KILL if action in _KILLING else number


def requirements_of(policy: Policy, mode: str) -> tuple[Requirement, ...]:
    seccomp = policy.seccomp
    items = [Requirement("deny", name, refused_with=_action_refusal(*seccomp.deny_action(name)))
             for name in seccomp.deny]
    items += [Requirement("arg", rule.syscall, rule, _action_refusal(rule.action, rule.errno or seccomp.errno))
              for rule in policy.rules_for_mode(mode)]
    items += [Requirement("enosys", name, refused_with=errno_module.ENOSYS) for name in seccomp.enosys]
    if seccomp.is_allowlist:
        items += _allowlist_refusals(policy)
    return merge_requirements(items)


def _allowlist_refusals(policy: Policy) -> list[Requirement]:
    """What an allowlist refuses, in probe-able terms: every catalogue syscall it does not allow, and
    for conditionally allowed calls the argument values no allow rule accepts (each socket family;
    each flag bit of a ``(arg & mask) == 0`` rule, the Docker clone pattern). They are refused by the
    default action, so that is the refusal they carry."""
    seccomp = policy.seccomp
    by_default = _action_refusal(seccomp.default_action, seccomp.default_errno)
    items: list[Requirement] = []
    for probe in SYSCALL_PROBES:
        name = probe.name
        if name in seccomp.allow or name in seccomp.enosys or name == "getppid":
            continue
        rules = [r for r in seccomp.allow_rules if r.syscall == name]
        if not rules:
            items.append(Requirement("deny", name, refused_with=by_default))
        elif name == "socket":
            items += [Requirement("arg", "socket", ArgRule("socket", 0, "eq", family,
                                                           why=f"not allowed: {SOCKET_FAMILY_NAMES[family]}"),
                                  by_default)
                      for family in sorted(SOCKET_FAMILY_NAMES) if not seccomp.allows("socket", (family,))]
        elif all(r.op == "masked_eq" and r.value == 0 and r.arg == rules[0].arg for r in rules):
            mask = rules[0].mask
            items += [Requirement("arg", name, ArgRule(name, rules[0].arg, "masked_eq", bit, mask=bit,
                                                       why="flag outside the allowed mask"), by_default)
                      for bit in (1 << b for b in range(32)) if mask & bit]
        elif not seccomp.allows(name, tuple(a if isinstance(a, int) else 0 for a in probe.args)):
            # the catalogue's harmless call is not an allowed form
            items.append(Requirement("deny", name, refused_with=by_default))
    return items


def merge_requirements(*groups: Iterable[Requirement]) -> tuple[Requirement, ...]:
    """Union by meaning (the rule's key), keeping the first occurrence; ``why`` texts may differ."""
    merged: dict[str, Requirement] = {}
    for group in groups:
        for item in group:
            merged.setdefault(item.key, item)
    return tuple(merged.values())


BY_EVALUATION = "the read-back evaluation (syscall-evaluation), no live probe"
BY_DEFAULT_ACTION = "the default action / the read-back evaluation (syscall-evaluation), no live probe"


@dataclass(frozen=True)
class Unprobed:
    """A syscall a requirement refuses that has no harmless live probe in the catalogue, and what covers it."""

    syscall: str
    covered_by: str  # BY_DEFAULT_ACTION (an allowlist that does not allow it) or BY_EVALUATION (named)

    def describe(self) -> str:
        return f"{self.syscall}: covered by {self.covered_by}"


def unprobed_refusals(policy: Policy) -> tuple[Unprobed, ...]:
    """Every syscall ``policy`` refuses whatever its arguments that no catalogue row can attempt.

    Never silent, never a pass from nothing. An allowlist refuses every syscall it does not allow by its
    default action: those are covered by that one action (proven live on every probed call it refuses)
    and by the read-back evaluation of the loaded filter, which checks each of them. A denylist names
    calls one by one: one without a probe (chmod) gets a denial row judged from the read-back
    evaluation (verdicts.syscall.judge_unprobed), which fails with the reason when no evaluation ran."""
    seccomp = policy.seccomp
    named = set(seccomp.deny) | set(seccomp.enosys)
    found = []
    for name in seccomp.effective_denies() if seccomp.is_allowlist else sorted(named):
        if name in PROBES_BY_NAME:
            continue
        by_default = seccomp.is_allowlist and name not in named
        found.append(Unprobed(name, BY_DEFAULT_ACTION if by_default else BY_EVALUATION))
    return tuple(found)


@dataclass(frozen=True)
class ProbeCase:
    """One attempt. ``kind``: ``denial`` (must be refused), ``reaches_kernel`` (must behave as unfiltered),
    ``works`` (ordinary work must succeed) or ``status`` (the filter and no_new_privs are present).
    ``via`` names the i386 multiplexer the call goes through (``socketcall``, ``ipc``), else ``""``."""

    case_id: str
    kind: str
    title: str
    requirement: Requirement | None = None
    abi: str = "native"
    nr: int | None = None
    args: tuple[int | str, ...] = ()
    setup: tuple[str, ...] = ()
    extra: tuple[tuple[str, Any], ...] = ()
    via: str = ""
    mux_call: int = 0
    mux_layout: tuple[int | str | None, ...] = ()
    # The syscall actually made, where it is not the requirement's: ``ioctl`` on a device path (DEVICE_PATHS).
    call: str = ""
    # Another way to a process outside the sandbox (WITNESS_PATHS): its ``access``; the runner is told the witness.
    witness_access: str = ""

    def runner_probe(self) -> dict[str, Any]:
        if self.witness_access:  # the witness's pid, addresses and fd are added per run (process_witness.witness_plan)
            return {"id": self.case_id, "kind": "witness_path", "access": self.witness_access}
        if self.kind in ("denial", "reaches_kernel"):
            probe: dict[str, Any] = {"id": self.case_id, "kind": "syscall", "abi": self.abi, "nr": self.nr,
                                     "args": list(self.args), "setup": list(self.setup)}
            if self.via:
                probe.update(mux=self.via, call=self.mux_call, layout=list(self.mux_layout))
            if self.kind != "denial":  # a control runs alone in a fresh runner child (syscall_runner)
                probe["control"] = True
            return probe
        return {"id": self.case_id, **dict(self.extra)}

    def registers(self) -> tuple[int, ...] | None:
        """The argument registers of the attempt as the runner makes it (the multiplexer's own for ``via``:
        ipc(call, first, second, third, ptr, fifth) by ``mux_layout``), for evaluating a filter on the very same
        call; None where one holds what only the runner knows: its pid, or the address of socketcall's argument
        block or of an ipc ``"*n"`` word."""
        if not all(isinstance(a, int) for a in self.args):
            return None
        args = tuple(int(a) for a in self.args)
        if not self.via:
            return args
        places = [place for place in self.mux_layout if not isinstance(place, str)]
        if self.via != "ipc" or len(places) != len(self.mux_layout):
            return None
        return (self.mux_call, *(0 if place is None else args[place] for place in places))

    @property
    def category(self) -> str:
        return "syscall" if self.kind == "denial" else "syscall-controls"

    @property
    def live(self) -> bool:
        """Whether a runner attempts it (every row but a denial with no harmless probe in the catalogue, which the
        read-back evaluation covers)."""
        return self.kind != "denial" or self.nr is not None or bool(self.witness_access)

    @property
    def syscall(self) -> str:
        """The call attempted (the requirement's, or the control's catalogue row)."""
        return self.requirement.syscall if self.requirement is not None else ""

    @property
    def attempted(self) -> str:
        """The syscall the runner makes: :attr:`syscall`, or ``ioctl`` on a device path."""
        return self.call or self.syscall


def _abi_number(probe: SyscallProbe, abi: str) -> int | None:
    return {"native": probe.nr, "x32": probe.x32_nr, "i386": probe.i386_nr}[abi]


def _matching_args(probe: SyscallProbe, rule: ArgRule) -> tuple[int | str, ...]:
    """The catalogue's harmless call with every ruled argument set so the rule fires: the rule's own
    condition and each condition ANDed with it (an OCI rule with several ``args``), so the attempt really
    is the call the rule refuses."""
    args = list(probe.args) + [0] * (max(c.arg for c in (rule, *rule.also)) + 1 - len(probe.args))
    for condition in (rule, *rule.also):
        args[condition.arg] = _matching_value(args[condition.arg], condition)
    return tuple(args)


def _matching_value(current: int | str, condition: ArgRule) -> int:
    base = 0 if isinstance(current, str) else current & 0xFFFFFFFF
    if condition.op == "masked_eq":
        return (base & ~condition.mask) | condition.value
    if condition.op in ("eq", "ge", "le"):
        return condition.value
    if condition.op == "gt":
        return condition.value + 1
    if condition.op == "lt":
        return max(condition.value - 1, 0)
    return base if base != condition.value else condition.value ^ 1  # ne


def one_condition_unmet(probe: SyscallProbe, rule: ArgRule) -> list[tuple[ArgRule, tuple[int | str, ...]]]:
    """For a rule of several ANDed conditions: for each condition, the matching call with exactly that
    condition unmet, its argument taken from the catalogue's control or harmless form (never a value made
    up here), so a filter that drops a condition (refusing when the others hold) is caught. A condition
    the catalogue offers no unmatched value for gets no such call."""
    matching = _matching_args(probe, rule)
    found = []
    for condition in (rule, *rule.also):
        for source in (probe.control_args, probe.args):
            if source is None or condition.arg >= len(source) or not isinstance(source[condition.arg], int):
                continue
            args = tuple(source[i] if i == condition.arg else a for i, a in enumerate(matching))
            if not _fires(condition, args):
                found.append((condition, args))
                break
    return found


def _with_high_bits(args: tuple[int | str, ...], index: int, bits: int) -> tuple[int | str, ...]:
    value = args[index]
    assert isinstance(value, int)
    return tuple((a & 0xFFFFFFFF) | bits if i == index and isinstance(a, int) else a for i, a in enumerate(args))


def high_bit_variants(probe: SyscallProbe, rule: ArgRule) -> tuple[tuple[str, int], ...]:
    """The high-bit variants a rule gets: all of them where the kernel reads the ruled argument as 32
    bits (``int``, ``unsigned int``; a 64-bit compare there lets ``value | 1 << 32`` through), none where
    it reads 64 (there the high bits make a different value, which is not the ruled call). A value the
    32 bits cannot hold is left alone: only the low 32 bits of the matching form are kept."""
    if probe.arg_bits(rule.arg) != 32 or rule.value > 0xFFFFFFFF:
        return ()
    return HIGH_BIT_VARIANTS


def multiplexed_case(item: Requirement, probe: SyscallProbe, args: tuple[int | str, ...], kind: str,
                     case_id: str, title: str, *, version: int = 0) -> ProbeCase:
    """The call through its i386 multiplexer; ``version`` in the high 16 bits of ipc's call number."""
    assert probe.mux is not None
    return ProbeCase(case_id, kind, title, item, "i386", probe.mux.nr, args, probe.setup, via=probe.mux.name,
                     mux_call=probe.mux.call_with_version(version), mux_layout=probe.mux.layout)


def denial_cases(requirements: Sequence[Requirement]) -> tuple[ProbeCase, ...]:
    """Every path for every requirement: each ABI, the i386 multiplexer where the call has one, and
    high bits in every ruled argument the kernel reads as 32 bits."""
    cases: list[ProbeCase] = []
    for item in requirements:
        probe = PROBES_BY_NAME.get(item.syscall)
        if probe is None:
            cases.append(ProbeCase(f"{item.label}-native", "denial",
                                   f"{item.label}: no harmless probe in the catalogue; covered by {BY_EVALUATION}",
                                   item, nr=None))
            continue
        args = _matching_args(probe, item.rule) if item.rule else probe.args
        for abi in ABIS:
            number = _abi_number(probe, abi)
            if number is None:
                continue
            cases.append(ProbeCase(f"{item.label}-{abi}", "denial", f"syscall {item.label} via {abi} ABI",
                                   item, abi, number, args, probe.setup))
        if probe.mux is not None:
            cases.append(multiplexed_case(item, probe, args, "denial", f"{item.label}-i386-{probe.mux.name}",
                                          f"syscall {item.label} via i386 {probe.mux.name}({probe.mux.call})"))
            for version in probe.mux.versions:  # ipc(2) ignores the high 16 bits (catalogues/syscalls.py)
                call = probe.mux.call_with_version(version)
                cases.append(multiplexed_case(
                    item, probe, args, "denial", f"{item.label}-i386-{probe.mux.name}-v{version:x}",
                    f"syscall {item.label} via i386 {probe.mux.name}({call:#x}): version {version} in the high "
                    f"16 bits, which the kernel drops (call & 0xffff == {probe.mux.call}), so a filter comparing "
                    "the whole argument 0 lets it through", version=version))
        if item.device_path:
            cases += device_path_cases(item)
        if item.witness_path:
            cases.append(witness_path_case(item))
        for index, condition in enumerate((item.rule, *item.rule.also) if item.rule is not None else ()):
            where = "" if index == 0 else f"-arg{condition.arg}"  # every ANDed condition's argument too
            for variant, bits in high_bit_variants(probe, condition):
                cases.append(ProbeCase(
                    f"{item.label}-native{where}-{variant}", "denial",
                    f"syscall {item.label} with high bits ({variant}) in arg{condition.arg}",
                    item, "native", probe.nr, _with_high_bits(args, condition.arg, bits), probe.setup))
    return tuple(cases)


def device_path_cases(item: Requirement) -> list[ProbeCase]:
    """The requirement's syscall by its device path (DEVICE_PATHS): open the device, then its ioctl in the harmless
    form, on every ABI with an ioctl, and natively with high bits in the request (an ``unsigned int`` to the kernel,
    fs/ioctl.c: a filter comparing all 64 bits lets ``1 << 32 | request`` through)."""
    path = DEVICE_PATHS[item.syscall]
    ioctl = PROBES_BY_NAME["ioctl"]
    setup = (f"open:{path.device}",)
    args: tuple[int | str, ...] = (FD, path.request, path.arg)
    cases = []
    for abi in ABIS:
        number = _abi_number(ioctl, abi)
        if number is not None:
            cases.append(ProbeCase(f"{item.label}-dev-{abi}", "denial", f"{item.label} via {path.note}, {abi} ABI",
                                   item, abi, number, args, setup, call="ioctl"))
    for variant, bits in HIGH_BIT_VARIANTS:
        cases.append(ProbeCase(f"{item.label}-dev-native-{variant}", "denial",
                               f"{item.label} via {path.note}, with high bits ({variant}) in the request", item,
                               "native", ioctl.nr, _with_high_bits(args, 1, bits), setup, call="ioctl"))
    return cases


def witness_path_case(item: Requirement) -> ProbeCase:
    """The requirement's cross-process access by another path (WITNESS_PATHS), against the witness: a process
    outside the sandbox, run as the same caller, which the unfiltered baseline reaches the same way."""
    path = WITNESS_PATHS[item.syscall]
    return ProbeCase(f"{item.label}-{path.row}", "denial", f"{item.label} by another path: {path.note} outside the "
                     "sandbox", item, witness_access=path.access)


def _fires(rule: ArgRule, args: tuple[int | str, ...]) -> bool:
    """Whether ``rule`` as the TOML compile plans it (32-bit where the kernel reads 32) fires for ``args``."""
    return Condition.of(rule).matches(tuple(a if isinstance(a, int) else 0 for a in args))


def _refused_by_any(requirements: Sequence[Requirement], syscall: str, args: tuple[int | str, ...]) -> bool:
    return any(item.syscall == syscall and (item.rule is None or _fires(item.rule, args)) for item in requirements)


def complement_args(probe: SyscallProbe, rule: ArgRule) -> tuple[int | str, ...] | None:
    """A harmless form of the call whose ruled argument the rule does NOT match, from the catalogue (its
    control form first, then its harmless form): never a value made up here, so a control stays a call the
    catalogue reviewed (never PTRACE_TRACEME and the like). None when the catalogue has no such form."""
    for args in (probe.control_args, probe.args):
        if args is not None and rule.arg < len(args) and isinstance(args[rule.arg], int) and not _fires(rule, args):
            return args
    return None


def range_controls(requirements: Sequence[Requirement]) -> list[ProbeCase]:
    """For every ``ne``/``lt``/``le``/``gt``/``ge`` rule of our TOML (``bits`` 32) on an argument the kernel reads
    as 32 bits: the call with a value the rule does not match must reach the kernel, also with high bits
    set in that argument. The kernel reads the low 32 bits, so a filter comparing all 64 refuses
    ``(1 << 32) | v`` for ``ne``/``gt``/``ge`` though the kernel sees ``v``, which the rule allows (an
    over-refusal the denial rows cannot show; for ``lt``/``le`` the denial rows' high-bit variants show
    the hole)."""
    cases: list[ProbeCase] = []
    for item in requirements:
        rule = item.rule
        probe = PROBES_BY_NAME.get(item.syscall)
        if rule is None or probe is None or rule.bits != 32 or rule.op not in RANGE_OPERATORS:
            continue
        args = complement_args(probe, rule)
        if args is None or probe.arg_bits(rule.arg) != 32 or _refused_by_any(requirements, item.syscall, args):
            continue
        if args != probe.control_args:  # (else the catalogue's own control above is this attempt)
            cases.append(ProbeCase(f"{item.label}-not-matching-reaches-kernel", "reaches_kernel",
                                   f"{item.syscall} with arg{rule.arg} = {args[rule.arg]:#x} (not matched by "
                                   f"{item.label}) reaches the kernel", item, "native", probe.nr, args, probe.setup))
        for variant, bits in HIGH_BIT_VARIANTS:
            cases.append(ProbeCase(f"{item.label}-not-matching-native-{variant}-reaches-kernel", "reaches_kernel",
                                   f"{item.syscall} with arg{rule.arg} = {args[rule.arg]:#x} and high bits ({variant}) "
                                   f"reaches the kernel: the kernel reads the low 32 bits, which {item.label} does "
                                   "not match", item, "native", probe.nr, _with_high_bits(args, rule.arg, bits),
                                   probe.setup))
    return cases


def control_cases(requirements: Sequence[Requirement], mode: str) -> tuple[ProbeCase, ...]:
    """Positive controls: proof that ordinary work still functions under the same filter."""
    cases = [
        ProbeCase("thread-starts", "works", "a thread starts (clone3 -> ENOSYS -> clone fallback)",
                  extra=(("kind", "thread_start"),)),
        ProbeCase("process-starts", "works", "posix_spawn and fork start processes",
                  extra=(("kind", "process_start"),)),
        ProbeCase("af_unix-socket-opens", "works", "an AF_UNIX socket opens",
                  extra=(("kind", "socket_open"), ("family", SOCKET_FAMILIES["AF_UNIX"]))),
        ProbeCase("filter-present", "status", "/proc/self/status shows the filters and NoNewPrivs",
                  extra=(("kind", "proc_status"),)),
    ]
    if mode in ("proxy", "allow"):
        for family in ("AF_INET", "AF_INET6"):
            cases.append(ProbeCase(f"{family.lower()}-socket-opens", "works",
                                   f"an {family} socket opens in {mode} mode",
                                   extra=(("kind", "socket_open"), ("family", SOCKET_FAMILIES[family]))))
    if any(item.witness_path for item in requirements):
        cases.append(ProbeCase("own-memory-reads", "works", "a process reads its own memory through /proc/self/mem",
                               extra=(("kind", "own_memory"),)))
    getppid = PROBES_BY_NAME["getppid"]
    cases.append(ProbeCase("getppid-reaches-kernel", "reaches_kernel", "getppid() still works",
                           nr=getppid.nr, args=()))
    seen: set[str] = set()
    for item in requirements:
        probe = PROBES_BY_NAME.get(item.syscall)
        if item.rule is None or probe is None or probe.control_args is None or probe.name in seen:
            continue
        seen.add(probe.name)
        if _refused_by_any(requirements, probe.name, probe.control_args):
            continue  # a rule of this requirement refuses the catalogue's control form too (e.g. arg0 ge 1)
        cases.append(ProbeCase(f"{probe.name}-without-ruled-flag-reaches-kernel", "reaches_kernel",
                               f"{probe.name} without the ruled argument reaches the kernel",
                               item, "native", probe.nr, probe.control_args, probe.setup))
        if probe.mux is not None:
            cases.append(multiplexed_case(
                item, probe, probe.control_args, "reaches_kernel",
                f"{probe.name}-without-ruled-flag-i386-{probe.mux.name}-reaches-kernel",
                f"{probe.name} without the ruled argument via i386 {probe.mux.name}({probe.mux.call}) reaches "
                "the kernel (or the policy refuses that path outright)"))
    cases += range_controls(requirements)
    for item in requirements:
        probe = PROBES_BY_NAME.get(item.syscall)
        if probe is None or item.rule is None or not item.rule.also:
            continue
        for condition, args in one_condition_unmet(probe, item.rule):
            if _refused_by_any(requirements, item.syscall, args):
                continue
            cases.append(ProbeCase(f"{item.label}-only-arg{condition.arg}-unmet-reaches-kernel", "reaches_kernel",
                                   f"{item.syscall} matching every condition of {item.label} but arg{condition.arg} "
                                   "reaches the kernel (the conditions are ANDed)", item, "native", probe.nr, args,
                                   probe.setup))
    return tuple(cases)
