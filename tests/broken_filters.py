"""Hand-built filters with one classic mistake each (syscalls.md §3, §5), shared by the mutation tests."""

from __future__ import annotations

import errno
import json
import struct
import tempfile
from dataclasses import replace
from pathlib import Path

import pyseccomp

from pytest_sandbox.policy.model import ArgRule, Policy
from pytest_sandbox.seccomp.compiler import CompiledFilter, compile_plan, compile_policy
from pytest_sandbox.seccomp.filter_plan import implied_rules, plan_policy

DOCKER_LIKE = Path(__file__).resolve().parents[1] / "fixtures/oci/docker-like-default.json"


def export(flt: pyseccomp.SyscallFilter) -> bytes:
    with tempfile.TemporaryFile() as handle:
        flt.export_bpf(handle)
        handle.seek(0)
        return handle.read()


def hand_built(policy: Policy, mode: str, *, arch_after_rules: bool = False, drop: str | None = None,
               full_64bit_eq: bool = False, errno_number: int = errno.EPERM, implied: bool = True) -> CompiledFilter:
    """The same policy compiled by hand with one classic mistake (syscalls.md §3, §5). Its ne/lt/le/gt/ge
    rules always compare all 64 bits (libseccomp's plain LT, ..., on x86_64): the mistake our TOML compile
    no longer makes (filter_plan.low32_blocks), which the high-bit variants and controls must catch.
    ``implied=False``: without the rules a refusal implies on another path (filter_plan.implied_rules), the
    mistake of a filter that denies userfaultfd(2) and leaves USERFAULTFD_IOC_NEW on /dev/userfaultfd."""
    real = compile_policy(policy, mode)
    main = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    main.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
    if policy.seccomp.extra_arches and not arch_after_rules:
        main.add_arch(pyseccomp.Arch.X86)
    for name in policy.seccomp.deny:
        if name != drop:
            main.add_rule(pyseccomp.ERRNO(errno_number), name)
    extra = tuple(rule for _refused, rule in implied_rules(policy)) if implied else ()
    for rule in (*policy.rules_for_mode(mode), *extra):
        if rule.op == "eq" and full_64bit_eq:
            arg = pyseccomp.Arg(rule.arg, pyseccomp.EQ, rule.value)  # compares all 64 bits
        elif rule.op == "eq":
            arg = pyseccomp.Arg(rule.arg, pyseccomp.MASKED_EQ, 0xFFFFFFFF, rule.value)
        elif rule.op != "masked_eq":
            arg = _argument(rule)  # a 64-bit compare, where the kernel reads an int as 32 bits
        else:
            arg = pyseccomp.Arg(rule.arg, pyseccomp.MASKED_EQ, rule.mask, rule.value)
        main.add_rule(pyseccomp.ERRNO(errno_number), rule.syscall, arg)
    if policy.seccomp.extra_arches and arch_after_rules:
        main.add_arch(pyseccomp.Arch.X86)  # too late: the x86 branch gets no rules
    return replace(real, programs=(real.programs[0], export(main)))


def docker_like_profile_with_af_packet_rule(directory: Path) -> Path:
    """The Docker-like allowlist (fixtures/oci) as a TOML policy, plus ``socket(AF_PACKET) -> EPERM``, the
    default's errno. TOML, not OCI: runc silently drops a profile rule whose action equals the default
    (seccomp_linux.go matchCall), and so does an OCI profile here, so there the refusal would not exist."""
    from pytest_sandbox.policy.load import load_policy
    from pytest_sandbox.policy.model import resolve_native_syscall

    seccomp = load_policy(DOCKER_LIKE).seccomp
    lines = ["[seccomp]", 'default_action = "errno"', f"default_errno = {seccomp.default_errno}",
             f"extra_arches = {json.dumps(list(seccomp.extra_arches))}",
             f"allow = {json.dumps([n for n in seccomp.allow if resolve_native_syscall(n) is not None])}",
             f"enosys = {json.dumps(list(seccomp.enosys))}"]
    for rule in seccomp.allow_rules:
        lines += ["[[seccomp.allow_rules]]", f'syscall = "{rule.syscall}"', f"arg = {rule.arg}", f'op = "{rule.op}"',
                  f"value = {rule.value}"] + ([f"mask = {rule.mask}"] if rule.op == "masked_eq" else [])
    lines += ["[[seccomp.arg_rules]]", 'syscall = "socket"', "arg = 0", 'op = "eq"', "value = 17",
              f"errno = {errno.EPERM}"]
    path = directory / "docker-af-packet.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def legacy_real_build(policy: Policy, mode: str) -> CompiledFilter:
    """The real build as the old compile path made it (issue #8 item 4): in an allowlist, the deny rules
    share the allowlist's filter, and a deny whose errno equals the default errno is dropped (libseccomp
    refuses a rule whose action is the default). ``socket(AF_PACKET) -> EPERM`` next to the conditional
    allow ``socket(arg0 < 38)`` then lets AF_PACKET through. The sentinel build never had this hole, so a
    suite that probes only the sentinel build passes this filter."""
    real = compile_policy(policy, mode)
    seccomp = policy.seccomp
    main = pyseccomp.SyscallFilter(pyseccomp.ERRNO(seccomp.default_errno) if seccomp.is_allowlist
                                   else pyseccomp.ALLOW)
    main.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
    for arch in seccomp.extra_arches:
        main.add_arch({"x86": pyseccomp.Arch.X86, "x32": pyseccomp.Arch.X32}[arch])
    if seccomp.is_allowlist:
        for name in dict.fromkeys(seccomp.allow + seccomp.enosys):
            main.add_rule(pyseccomp.ALLOW, name)
        for rule in seccomp.allow_rules:
            main.add_rule(pyseccomp.ALLOW, rule.syscall, _argument(rule))
    default_errno = seccomp.default_errno if seccomp.is_allowlist else None
    for name in seccomp.deny:
        if seccomp.errno != default_errno:
            main.add_rule(pyseccomp.ERRNO(seccomp.errno), name)
    for rule in policy.rules_for_mode(mode):
        number = rule.errno or seccomp.errno
        if number != default_errno:  # the hole: "redundant", yet an allow rule above also matches
            main.add_rule(pyseccomp.ERRNO(number), rule.syscall, _argument(rule))
    roles = [planned.role for planned in plan_policy(policy, mode).filters]
    enosys = tuple(p for p, role in zip(real.programs, roles, strict=True) if role == "enosys")
    return replace(real, programs=(*enosys, export(main)))


def _argument(rule: ArgRule) -> pyseccomp.Arg:
    if rule.op in ("eq", "masked_eq"):
        mask = rule.mask if rule.op == "masked_eq" else 0xFFFFFFFF
        return pyseccomp.Arg(rule.arg, pyseccomp.MASKED_EQ, mask, rule.value)
    return pyseccomp.Arg(rule.arg, getattr(pyseccomp, rule.op.upper()), rule.value)


# -- the runc + Docker hole: direct i386 calls refused, the i386 multiplexers let through ------------------

_AUDIT_ARCH_X86_64, _AUDIT_ARCH_I386 = 0xC000003E, 0x40000003
_RET_KILL_PROCESS, _RET_ALLOW, _RET_ERRNO = 0x80000000, 0x7FFF0000, 0x00050000


def _insn(code: int, k: int = 0, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)  # struct sock_filter


def _refuse_on(nr: int, arg0: int | None) -> list[bytes]:
    """``if nr == NR [and low 32 bits of arg0 == arg0]: return ERRNO(EPERM)`` (A holds nr on entry and exit)."""
    if arg0 is None:
        return [_insn(0x15, nr, 0, 1), _insn(0x06, _RET_ERRNO | errno.EPERM)]
    return [_insn(0x15, nr, 0, 4), _insn(0x20, 16), _insn(0x15, arg0, 0, 1),  # ld args[0] (low word)
            _insn(0x06, _RET_ERRNO | errno.EPERM), _insn(0x20, 0)]  # ld nr again


def direct_calls_only(policy: Policy, mode: str, refusals: list[tuple[int, int, int | None]]) -> CompiledFilter:
    """A filter as runc builds from a profile that names only the direct calls: each ``(x86_64 nr, i386
    nr, arg0 or None)`` is refused with EPERM natively and through the direct i386 call (socket is 359,
    shmctl 396), while i386 ``socketcall(102)`` and ``ipc(117)`` are allowed whatever they carry. Under
    runc, Docker's default profile leaves ``socketcall(SYS_SOCKET, [AF_VSOCK, ...])`` open this way."""
    native = [i for nr, _, arg0 in refusals for i in _refuse_on(nr, arg0)]
    i386 = [i for _, nr, arg0 in refusals for i in _refuse_on(nr, arg0)]
    allow, kill = _insn(0x06, _RET_ALLOW), _insn(0x06, _RET_KILL_PROCESS)
    native_block = [_insn(0x20, 0), _insn(0x35, 0x40000000, 0, 1), kill, *native, allow]  # x32 numbers: kill
    i386_block = [_insn(0x20, 0), *i386, allow]
    head = [_insn(0x20, 4), _insn(0x15, _AUDIT_ARCH_X86_64, 0, len(native_block)), *native_block,
            _insn(0x20, 4), _insn(0x15, _AUDIT_ARCH_I386, 1, 0), kill, *i386_block]
    return replace(compile_policy(policy, mode), programs=(b"".join(head),))


# -- ipc(2) matched on the whole argument 0: the version in its high 16 bits slips past -------------------

def ipc_whole_arg0(policy: Policy, mode: str) -> CompiledFilter:
    """The reference build of ``policy`` as libseccomp alone compiles its i386 rules on SysV IPC calls:
    ``ipc(arg0 == N)`` on the whole argument, without our ``ipc(arg0 & 0xffff == N)`` twin (every other rule,
    action and filter unchanged). ipc(2) drops the version in the high 16 bits (ipc/syscall.c
    compat_ksys_ipc), so ``ipc((1 << 16) | SHMCTL, ...)`` runs shmctl through this filter."""
    return compile_plan(replace(plan_policy(policy, mode), ipc_versions_masked=False))


# -- a rule of several ANDed conditions with one condition dropped -----------------------------------------

def one_condition_kept(policy: Policy, mode: str, keep: int) -> CompiledFilter:
    """The policy's filters with every multi-condition argument rule reduced to its condition ``keep``
    (0: the first, 1: the second): a runtime that drops the other conditions refuses calls the rule does
    not match. clone3 keeps its ENOSYS so that processes start; everything else is allowed."""
    main = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    main.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
    main.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    for rule in policy.rules_for_mode(mode):
        kept = (rule, *rule.also)[keep] if rule.also else rule
        arg = (pyseccomp.Arg(kept.arg, pyseccomp.MASKED_EQ, kept.mask, kept.value) if kept.op == "masked_eq"
               else pyseccomp.Arg(kept.arg, getattr(pyseccomp, kept.op.upper()), kept.value))
        main.add_rule(pyseccomp.ERRNO(rule.errno or errno.EPERM), rule.syscall, arg)
    return replace(compile_policy(policy, mode), programs=(export(main),))
