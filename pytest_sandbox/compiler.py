"""Policy → seccomp BPF, with pyseccomp (libseccomp), compiled once per policy and cached.

Two programs per policy and network mode, loaded in this order like OpenShell #819
(syscalls.md §1.1): first the ENOSYS filter (clone3), then the main filter, which blocks
``seccomp(SECCOMP_SET_MODE_FILTER)`` and so must come last.

Traps handled here (syscalls.md §5):
- every extra arch is added *before* any rule; rules are not copied to arches added later;
- the bad-arch action is set to KILL_PROCESS (libseccomp's default KILL only kills the thread);
- eq/masked_eq argument rules compare the low 32 bits (MASKED_EQ with 0xffffffff), so setting high
  bits in an int argument cannot slip past the rule;
- a *sentinel* build gives every ERRNO rule its own errno (1000 + n) so a probe can tell the filter's
  refusal from the kernel's (syscalls.md §4 "Sentinel builds"). ENOSYS rules keep ENOSYS even there:
  glibc falls back from clone3 to clone only on exactly ENOSYS.
"""

from __future__ import annotations

import errno as errno_module
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pytest_sandbox.errors import HostUnsupportedError, PolicyError
from pytest_sandbox.policy import ArgRule, Policy

SENTINEL_ERRNO_BASE = 1000
DEFAULT_KEY = "default"  # the rule key of an allowlist's default action

_OPERATORS = {"eq": "MASKED_EQ", "masked_eq": "MASKED_EQ", "ne": "NE", "lt": "LT", "le": "LE", "gt": "GT", "ge": "GE"}


@dataclass(frozen=True)
class RuleAction:
    """What the compiled filter does when one rule fires: an errno, or a signal death."""

    rule: str  # "deny:ptrace", "enosys:clone3", "arg:clone(arg0&0x10000000 masked_eq 0x10000000)"
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

    def errno_for(self, rule: str) -> int | None:
        for action in self.actions:
            if action.rule == rule:
                return action.errno
        return None

    @property
    def instruction_count(self) -> int:
        return sum(len(p) // 8 for p in self.programs)


def deny_key(syscall: str) -> str:
    return f"deny:{syscall}"


def enosys_key(syscall: str) -> str:
    return f"enosys:{syscall}"


def arg_key(rule: ArgRule) -> str:
    return f"arg:{rule.key}"


def compile_policy(policy: Policy, mode: str | None = None, *, sentinel: bool = False) -> CompiledFilter:
    """Compile ``policy`` for a network mode (default: the policy's own); cached per input."""
    return _compile(policy, mode or policy.network.mode, sentinel)


@lru_cache(maxsize=64)
def _compile(policy: Policy, mode: str, sentinel: bool) -> CompiledFilter:
    seccomp = policy.seccomp
    actions: list[RuleAction] = []
    next_sentinel = iter(range(SENTINEL_ERRNO_BASE, 4096))

    def errno_of(rule: str, configured: int) -> int:
        # ENOSYS stays ENOSYS: glibc's clone3 -> clone fallback needs exactly that errno.
        number = next(next_sentinel) if sentinel and configured != errno_module.ENOSYS else configured
        actions.append(RuleAction(rule, number))
        return number

    filters = _build_filters(_pyseccomp(), policy, mode, errno_of)
    programs = tuple(_export_bpf(f) for f in filters)
    return CompiledFilter(policy.name, mode, sentinel, programs, tuple(actions), seccomp.bad_arch_action,
                          seccomp.extra_arches, seccomp.no_new_privs and bool(programs))


def export_pfc(policy: Policy, mode: str | None = None) -> str:
    """Human-readable pseudo filter code of the programs, in load order (libseccomp's PFC)."""
    parts = []
    for flt in _build_filters(_pyseccomp(), policy, mode or policy.network.mode, lambda _rule, n: n):
        with tempfile.TemporaryFile() as handle:
            flt.export_pfc(handle)
            handle.seek(0)
            parts.append(handle.read().decode())
    return "\n".join(parts)


def _build_filters(pyseccomp, policy: Policy, mode: str, errno_of: Callable[[str, int], int]):  # type: ignore[no-untyped-def]
    """The libseccomp filters for ``mode`` in load order; none when the policy skips seccomp there."""
    if not policy.filter_applies(mode):
        return ()
    seccomp = policy.seccomp
    filters = []
    if seccomp.enosys:
        enosys_filter = _new_filter(pyseccomp, policy, default_action=pyseccomp.ALLOW)
        for name in seccomp.enosys:
            enosys_filter.add_rule(pyseccomp.ERRNO(errno_of(enosys_key(name), errno_module.ENOSYS)), name)
        filters.append(enosys_filter)
    default_errno = errno_of(DEFAULT_KEY, seccomp.default_errno) if seccomp.default_action == "errno" else None
    default = _action(pyseccomp, seccomp.default_action, default_errno or seccomp.default_errno)
    main = _new_filter(pyseccomp, policy, default_action=default)

    def deny(number: int, syscall: str, *args: Any) -> None:
        # libseccomp refuses a rule whose action equals the default action; such a rule is redundant.
        if number != default_errno:
            main.add_rule(pyseccomp.ERRNO(number), syscall, *args)

    if seccomp.is_allowlist:
        # The main filter is loaded last, so among equal-precedence ERRNO results its errno wins
        # (seccomp(2)); it must let the ENOSYS calls through or glibc never sees ENOSYS.
        for name in dict.fromkeys(seccomp.allow + seccomp.enosys):
            main.add_rule(pyseccomp.ALLOW, name)
        for rule in seccomp.allow_rules:
            main.add_rule(pyseccomp.ALLOW, rule.syscall, _argument(pyseccomp, rule))
    for name in seccomp.deny:
        deny(errno_of(deny_key(name), seccomp.errno), name)
    for rule in policy.rules_for_mode(mode):
        deny(errno_of(arg_key(rule), rule.errno or seccomp.errno), rule.syscall, _argument(pyseccomp, rule))
    filters.append(main)
    return tuple(filters)


def _pyseccomp() -> Any:
    try:
        import pyseccomp
    except (ImportError, RuntimeError) as exc:  # RuntimeError: "Unable to find libseccomp"
        raise HostUnsupportedError(
            f"cannot compile a seccomp filter: {exc}; install libseccomp2 (Debian: apt-get install libseccomp2)"
        ) from None
    return pyseccomp


def _action(pyseccomp, name: str, errno: int):  # type: ignore[no-untyped-def]
    return {
        "allow": lambda: pyseccomp.ALLOW,
        "errno": lambda: pyseccomp.ERRNO(errno),
        "kill_process": lambda: pyseccomp.KILL_PROCESS,
        "kill_thread": lambda: pyseccomp.KILL_THREAD,
        "trap": lambda: pyseccomp.TRAP,
        "log": lambda: pyseccomp.LOG,
    }[name]()


def _new_filter(pyseccomp, policy: Policy, *, default_action):  # type: ignore[no-untyped-def]
    flt = pyseccomp.SyscallFilter(default_action)
    flt.set_attr(pyseccomp.Attr.ACT_BADARCH, _action(pyseccomp, policy.seccomp.bad_arch_action,
                                                     policy.seccomp.errno))
    # Arches first: rules added before add_arch are not copied to the new arch (syscalls.md §5 trap 4).
    for arch in policy.seccomp.extra_arches:
        flt.add_arch({"x86": pyseccomp.Arch.X86, "x32": pyseccomp.Arch.X32}[arch])
    return flt


def _argument(pyseccomp, rule: ArgRule):  # type: ignore[no-untyped-def]
    operator = getattr(pyseccomp, _OPERATORS[rule.op])
    if rule.op == "eq":
        return pyseccomp.Arg(rule.arg, operator, 0xFFFFFFFF, rule.value)
    if rule.op == "masked_eq":
        return pyseccomp.Arg(rule.arg, operator, rule.mask & 0xFFFFFFFF, rule.value)
    return pyseccomp.Arg(rule.arg, operator, rule.value)


def _export_bpf(flt) -> bytes:  # type: ignore[no-untyped-def]
    # export_bpf needs an object with a real file descriptor (syscalls.md §5 trap 2).
    with tempfile.TemporaryFile() as handle:
        try:
            flt.export_bpf(handle)
        except OSError as exc:
            raise PolicyError(f"libseccomp could not compile the filter: {os.strerror(exc.errno or 0)}") from None
        handle.seek(0)
        return handle.read()

