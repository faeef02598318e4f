"""Policy → seccomp BPF, with pyseccomp (libseccomp): one compile path, two errno mappings.

:func:`~pytest_sandbox.seccomp.filter_plan.plan_policy` decides every filter, rule, action and the load order;
this module only emits that plan through libseccomp, with either the policy's errnos (the *real* build,
what a sandboxed program meets) or one sentinel errno per slot (the *sentinel* build, syscalls.md §4).
So the two builds differ in errno numbers and nothing else. Load order: the ENOSYS filter (clone3)
first, the main filter last (OpenShell #819, syscalls.md §1.1); an allowlist with refusals has a deny
filter between them (filter_plan.py explains why).

Traps handled here (syscalls.md §5):
- every arch gets its own context, set up *before* any rule (rules are not copied to arches added
  later), then the contexts are merged;
- the bad-arch action is set to KILL_PROCESS (libseccomp's default KILL only kills the thread);
- a TOML policy's eq/masked_eq argument rules compare the low 32 bits (MASKED_EQ with 0xffffffff), and
  its ne/lt/le/gt/ge on an argument the kernel reads as 32 bits become the MASKED_EQ blocks covering the
  same low-32-bit values (filter_plan.low32_blocks: one libseccomp rule per block, same action, which
  libseccomp ORs), so setting high bits in an int argument can neither slip past a rule nor be refused
  by one it does not match; an OCI profile's compare all 64 bits, as runc compiles them (its ANDed
  conditions become one rule with several comparisons);
- on i386 a TOML policy's rule on a SysV IPC call also gets an ``ipc(arg0 & 0xffff == N)`` twin next to
  libseccomp's ``ipc(arg0 == N)``: ipc(2) drops the version in the high 16 bits (filter_plan.py);
- every libseccomp error becomes a PolicyError naming the rule (never a raw OSError traceback).
"""

from __future__ import annotations

import errno as errno_module
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any, TypeVar

from pytest_sandbox.errors import HostUnsupportedError, PolicyError
from pytest_sandbox.policy.checks import program_size_problem
from pytest_sandbox.policy.model import Policy
from pytest_sandbox.seccomp.filter_plan import (
    BAD_ARCH_KEY,
    DEFAULT_KEY,
    SENTINEL_ERRNO_BASE,
    Action,
    Condition,
    FilterPlan,
    PlannedFilter,
    arg_key,
    deny_key,
    enosys_key,
    errno_on,
    ipc_version_twin,
    plan_policy,
)

__all__ = [
    "BAD_ARCH_KEY", "DEFAULT_KEY", "SENTINEL_ERRNO_BASE", "CompiledFilter", "RuleAction", "arg_key",
    "compile_plan", "compile_policy", "deny_key", "enosys_key", "export_pfc",
]  # fmt: skip

_OPERATORS = {"eq": "EQ", "masked_eq": "MASKED_EQ", "ne": "NE", "lt": "LT", "le": "LE", "gt": "GT", "ge": "GE"}
_ARCHES = {"x86": "X86", "x32": "X32"}
# What libseccomp's documented error codes mean for one call (seccomp_rule_add(3), seccomp_arch_add(3)).
_LIBSECCOMP_ERRORS = {
    errno_module.EACCES: "its action is the filter's default action",
    errno_module.EEXIST: "another rule on the same syscall and arguments has a different action",
    errno_module.EDOM: "the syscall or architecture is not available here",
    errno_module.EINVAL: "invalid for this syscall or architecture",
    errno_module.EOPNOTSUPP: "not supported by this libseccomp",
    errno_module.ENOMEM: "out of memory",
}
T = TypeVar("T")


@dataclass(frozen=True)
class RuleAction:
    """What the compiled filter returns when one rule fires: its errno in this build."""

    rule: str  # "deny:ptrace", "enosys:clone3", "arg:clone(arg0&0x10000000 masked_eq 0x10000000)", "default"
    errno: int


@dataclass(frozen=True)
class CompiledFilter:
    policy_name: str
    network_mode: str
    sentinel: bool
    programs: tuple[bytes, ...]  # load order; empty when the policy skips seccomp in this mode
    actions: tuple[RuleAction, ...]
    bad_arch_action: str
    extra_arches: tuple[str, ...]
    no_new_privs: bool
    # why no process can start under these filters (clone3 refused otherwise than ENOSYS), or None
    start_problem: str | None = None

    def errno_for(self, rule: str, arch: str = "native") -> int | None:
        """The errno ``rule`` returns in this build on ``arch`` ("native", "x86", "x32")."""
        return errno_on({a.rule: a.errno for a in self.actions}, rule, arch)

    @property
    def build(self) -> str:
        return "sentinel" if self.sentinel else "real"

    @property
    def instruction_count(self) -> int:
        return sum(len(p) // 8 for p in self.programs)


def compile_policy(policy: Policy, mode: str | None = None, *, sentinel: bool = False) -> CompiledFilter:
    """Compile ``policy`` for a network mode (default: the policy's own); cached per input.

    Raises PolicyError (one line, naming the rule) for anything the plan or libseccomp refuses."""
    return compile_plan(plan_policy(policy, mode or policy.network.mode), sentinel=sentinel)


@lru_cache(maxsize=64)
def compile_plan(plan: FilterPlan, *, sentinel: bool = False) -> CompiledFilter:
    """The one compile path: emit ``plan`` through libseccomp with the real or the sentinel errnos."""
    numbers = plan.errnos(sentinel=sentinel)
    programs = tuple(_export(plan, role, flt, "bpf") for role, flt in _emit(_pyseccomp(), plan, numbers))
    too_long = program_size_problem(plan.source, plan.mode, programs)
    if too_long is not None:  # the kernel would refuse it at load time with a bare EINVAL / ENOMEM
        raise PolicyError(too_long)
    actions = tuple(RuleAction(key, number) for key, number in numbers.items())
    return CompiledFilter(plan.policy_name, plan.mode, sentinel, programs, actions, plan.bad_arch.kind,
                          plan.extra_arches, plan.no_new_privs, plan.start_problem())


def export_pfc(policy: Policy, mode: str | None = None, *, sentinel: bool = False) -> str:
    """Human-readable pseudo filter code of the programs, in load order (libseccomp's PFC)."""
    plan = plan_policy(policy, mode or policy.network.mode)
    filters = _emit(_pyseccomp(), plan, plan.errnos(sentinel=sentinel))
    return "\n".join(_export(plan, role, flt, "pfc").decode() for role, flt in filters)


def _pyseccomp() -> Any:
    try:
        import pyseccomp
    except (ImportError, RuntimeError) as exc:  # RuntimeError: "Unable to find libseccomp"
        raise HostUnsupportedError(
            f"cannot compile a seccomp filter: {exc}; install libseccomp2 (Debian: apt-get install libseccomp2)"
        ) from None
    return pyseccomp


def _libseccomp(plan: FilterPlan, what: str, call: Callable[[], T]) -> T:
    """Run one libseccomp call; its error becomes a PolicyError naming ``what`` (a rule or a field)."""
    try:
        return call()
    except OSError as exc:
        number = exc.errno or 0
        meaning = _LIBSECCOMP_ERRORS.get(number, os.strerror(number))
        name = errno_module.errorcode.get(number, str(number))
        raise PolicyError(f"{plan.source}: {what}: libseccomp refused it ({name}: {meaning})") from None


def _emit(pyseccomp: Any, plan: FilterPlan, numbers: Mapping[str, int]) -> list[tuple[str, Any]]:
    """The libseccomp filters of ``plan`` in load order, with ``numbers`` as the errno of each slot.

    Each filter is built once per arch and merged (``seccomp_merge``): the same BPF as adding the arches
    to one context, but a rule's errno may differ per arch (ENOSYS rules in a sentinel build)."""

    def action(planned: Action, arch: str) -> Any:
        if planned.kind == "errno":
            number = errno_on(numbers, planned.slot or "", arch)
            assert number is not None
            return pyseccomp.ERRNO(number)
        if planned.kind == "trace":
            return pyseccomp.TRACE(0)  # no tracer attached: the kernel answers ENOSYS (seccomp(2))
        return {"allow": pyseccomp.ALLOW, "kill_process": pyseccomp.KILL_PROCESS,
                "kill_thread": pyseccomp.KILL_THREAD, "trap": pyseccomp.TRAP, "log": pyseccomp.LOG}[planned.kind]

    filters = []
    for planned in plan.filters:
        merged = None
        for arch in ("native", *plan.extra_arches):
            flt = _new_filter(pyseccomp, plan, planned, arch, action)
            for rule in planned.rules:
                alternatives = ((),) if rule.condition is None else rule.condition.alternatives()
                for syscall, parts in _libseccomp_rules(plan, arch, rule.syscall, alternatives):
                    _libseccomp(plan, f"{', '.join(rule.sources)}: rule {rule.describe()} in the {planned.role} "
                                      "filter", partial(flt.add_rule, action(rule.action, arch), syscall,
                                                        *_arguments(pyseccomp, parts)))
            if merged is None:
                merged = flt
            else:
                _libseccomp(plan, f"seccomp.extra_arches {arch}", partial(merged.merge, flt))
        filters.append((planned.role, merged))
    return filters


def _libseccomp_rules(plan: FilterPlan, arch: str, syscall: str, alternatives: tuple[tuple[Condition, ...], ...]
                      ) -> list[tuple[str, tuple[Condition, ...]]]:
    """The ``seccomp_rule_add`` calls of one planned rule on ``arch``: each alternative, and on i386, for a SysV
    IPC call of a masked plan, its ``ipc(arg0 & 0xffff == N)`` twin (filter_plan.ipc_version_twin): libseccomp's
    own ``ipc(arg0 == N)`` misses ``(1 << 16) | N``, which the kernel runs as call N."""
    found = [(syscall, parts) for parts in alternatives]
    if arch == "x86" and plan.ipc_versions_masked:
        twins = (ipc_version_twin(syscall, parts) for parts in alternatives)
        found += [("ipc", twin) for twin in dict.fromkeys(twins) if twin is not None]
    return found


def _new_filter(pyseccomp: Any, plan: FilterPlan, planned: PlannedFilter, arch: str,
                action: Callable[[Action, str], Any]) -> Any:
    flt = _libseccomp(plan, "seccomp.default_action",
                      partial(pyseccomp.SyscallFilter, action(planned.default, "native")))
    _libseccomp(plan, "seccomp.bad_arch_action",
                partial(flt.set_attr, pyseccomp.Attr.ACT_BADARCH, action(plan.bad_arch, "native")))
    if arch != "native":
        # One arch per context, set before any rule: rules are not copied to arches added later
        # (syscalls.md §5 trap 4).
        _libseccomp(plan, f"seccomp.extra_arches {arch}", partial(flt.remove_arch, pyseccomp.Arch.NATIVE))
        _libseccomp(plan, f"seccomp.extra_arches {arch}", partial(flt.add_arch, getattr(pyseccomp.Arch, _ARCHES[arch])))
    return flt


def _arguments(pyseccomp: Any, parts: tuple[Condition, ...]) -> tuple[Any, ...]:
    """The comparisons of one libseccomp rule (it ANDs the comparisons given to one seccomp_rule_add)."""
    found = []
    for part in parts:
        operator = getattr(pyseccomp, _OPERATORS[part.op])
        if part.op == "masked_eq":
            found.append(pyseccomp.Arg(part.arg, operator, part.mask, part.value))
        else:
            found.append(pyseccomp.Arg(part.arg, operator, part.value))
    return tuple(found)


def _export(plan: FilterPlan, role: str, flt: Any, form: str) -> bytes:
    # export_bpf needs an object with a real file descriptor (syscalls.md §5 trap 2).
    with tempfile.TemporaryFile() as handle:
        _libseccomp(plan, f"the {role} filter", lambda: (flt.export_bpf if form == "bpf" else flt.export_pfc)(handle))
        handle.seek(0)
        return handle.read()
