"""The sentinel build and the real build are one program modulo errno numbers, over generated policies.

For every generated policy (denylists and allowlists, deny and ENOSYS lists, argument rules with each
operator, socket domains, extra arches, custom errnos, every bad-arch action) both builds are compiled
and then compared three ways:
- as functions: a BPF interpreter (tests/seccomp_bpf.py) runs both program stacks on every named call,
  on each ABI (x86_64, i386 direct and through socketcall/ipc, x32), with argument values at each
  rule's boundaries; the actions must be equal and each sentinel errno must stand for one real errno;
- as libseccomp's own pseudo filter code, with the sentinel errnos mapped back;
- against the plan: what :meth:`FilterPlan.results` predicts (the judge's expectation) is what the
  real BPF returns.
Hypothesis runs derandomized with a bounded number of examples, so the run is the same every time.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from seccomp_bpf import ARCH_TOKENS, run_stack, syscall_number

from pytest_sandbox.errors import PolicyError
from pytest_sandbox.policy.model import ArgRule, NetworkPolicy, Policy, SeccompPolicy
from pytest_sandbox.seccomp.compiler import CompiledFilter, compile_plan, export_pfc
from pytest_sandbox.seccomp.filter_plan import FilterPlan, plan_policy

SYSCALLS = ("ptrace", "memfd_create", "bpf", "mount", "setns", "unshare", "clone", "socket", "connect", "bind",
            "semget", "shmat", "personality", "execveat", "seccomp", "kexec_file_load", "getppid")
ENOSYS_CALLS = ("clone3", "io_uring_setup", "accept4")
ERRNOS = (errno.EPERM, errno.EACCES, errno.ENOSYS, 77, 4094)
FAMILIES = (2, 10, 16, 17, 31, 40)
ARCH_CHOICES = ((), ("x86",), ("x32",), ("x86", "x32"), ("x32", "x86"))
BOGUS_ARCH = 0x40000028  # AUDIT_ARCH_ARM: never admitted


@st.composite
def arg_rules(draw: st.DrawFn, *, with_errno: bool) -> ArgRule:
    syscall = draw(st.sampled_from(SYSCALLS))
    op = draw(st.sampled_from(("eq", "ne", "lt", "le", "gt", "ge", "masked_eq")))
    arg = draw(st.sampled_from((0, 0, 0, 1, 4)))
    mask = 0xFFFFFFFF
    if op == "masked_eq":
        mask = draw(st.sampled_from((0x10000000, 0x1000, 0xFF, 0xFFFFFFFF, 0x7E020000)))
        value = draw(st.sampled_from((0, mask)))
    elif op == "eq":
        value = draw(st.sampled_from((0, 1, 17, 0xFFFFFFFF)))
    else:
        value = draw(st.sampled_from((0, 1, 17, 38, 40, 0xFFFFFFFF, 1 << 32, (1 << 33) + 7)))
    number = draw(st.sampled_from((None, *ERRNOS))) if with_errno else None
    return ArgRule(syscall, arg, op, value, mask, number, "generated")


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    allowlist = draw(st.booleans())
    deny = tuple(draw(st.lists(st.sampled_from(SYSCALLS), max_size=4, unique=True)))
    enosys = tuple(n for n in draw(st.lists(st.sampled_from(ENOSYS_CALLS), max_size=2, unique=True)) if n not in deny)
    seccomp = SeccompPolicy(
        default_action=draw(st.sampled_from(("errno", "errno", "kill_process", "trap", "log"))) if allowlist
        else "allow",
        default_errno=draw(st.sampled_from(ERRNOS)),
        errno=draw(st.sampled_from(ERRNOS)),
        bad_arch_action=draw(st.sampled_from(("kill_process", "kill_thread", "trap", "errno"))),
        extra_arches=draw(st.sampled_from(ARCH_CHOICES)),
        deny=deny,
        enosys=enosys,
        arg_rules=tuple(draw(st.lists(arg_rules(with_errno=True), max_size=5))),
        allow=tuple(draw(st.lists(st.sampled_from(SYSCALLS), max_size=6, unique=True))) if allowlist else (),
        allow_rules=tuple(draw(st.lists(arg_rules(with_errno=False), max_size=4))) if allowlist else (),
    )
    domains = tuple(draw(st.lists(st.sampled_from(FAMILIES), max_size=3, unique=True)))
    network = NetworkPolicy(mode="proxy", socket_domains=(("all_modes", domains),) if domains else ())
    return Policy("generated", "generated.toml", "", seccomp, network)


def sentinel_to_real(sentinel: CompiledFilter, real: CompiledFilter) -> dict[int, int]:
    """Each sentinel errno and the one real errno it stands for (a failure if it stands for two)."""
    mapping: dict[int, int] = {}
    for action in sentinel.actions:
        real_number = real.errno_for(action.rule)
        assert real_number is not None, action.rule
        assert mapping.setdefault(action.errno, real_number) == real_number, (action, mapping)
    return mapping


def argument_vectors(policy: Policy, syscall: str) -> Iterator[tuple[int, ...]]:
    yield ()
    rules = [*policy.rules_for_mode("proxy"), *policy.seccomp.allow_rules]
    for rule in (r for r in rules if r.syscall == syscall):
        values = {0, rule.value, max(rule.value - 1, 0), rule.value + 1, rule.value | 1 << 32, 0xFFFFFFFF,
                  1 << 63, rule.mask, rule.value | (~rule.mask & 0xFFFFFFFF)}
        for value in values:
            yield tuple(value if i == rule.arg else 0 for i in range(rule.arg + 1))


def inputs(policy: Policy) -> Iterator[tuple[str | None, str, int, tuple[int, ...]]]:
    """(syscall name or None for a multiplexer, arch, nr, args) for every call worth asking about."""
    seccomp = policy.seccomp
    names = {*seccomp.deny, *seccomp.enosys, *seccomp.allow, "getppid", "read",
             *(r.syscall for r in (*policy.rules_for_mode("proxy"), *seccomp.allow_rules))}
    for name in sorted(names):
        for arch in ("native", "x86", "x32"):
            number = syscall_number(name, arch)
            if number is None:
                continue
            for args in argument_vectors(policy, name):
                yield name, arch, number, tuple(a & 0xFFFFFFFF for a in args) if arch == "x86" else args
    for multiplexer, number in (("socketcall", 102), ("ipc", 117)):  # i386 socketcall(2) / ipc(2)
        for call in range(0, 25):
            yield None, "x86", number, (call, 0x1000)
        del multiplexer


def plan_outcomes(plan: FilterPlan, build: CompiledFilter, name: str, args: tuple[int, ...],
                  arch: str) -> set[tuple[str, int]]:
    found = set()
    for action in plan.results(name, args, arch):
        number = build.errno_for(action.slot, arch) if action.kind == "errno" and action.slot else 0
        assert number is not None
        found.add((action.kind, number))
    return found


def normalised_pfc(text: str, mapping: dict[int, int]) -> str:
    return re.sub(r"ERRNO\((\d+)\)", lambda m: f"ERRNO({mapping.get(int(m.group(1)), int(m.group(1)))})", text)


def differences(policy: Policy, plan: FilterPlan, real: CompiledFilter, sentinel: CompiledFilter) -> list[str]:
    """Every input on which ``real`` is not ``sentinel`` with its errnos mapped back, or not what the plan
    predicts; empty when the two builds are one program modulo errno."""
    found: list[str] = []
    if len(real.programs) != len(sentinel.programs):
        found.append(f"{len(real.programs)} real programs, {len(sentinel.programs)} sentinel programs")
    mapping = sentinel_to_real(sentinel, real)
    for name, arch, number, args in inputs(policy):
        for token in (ARCH_TOKENS[arch], BOGUS_ARCH) if arch == "native" else (ARCH_TOKENS[arch],):
            on_real = run_stack(real.programs, number, token, args)
            on_sentinel = run_stack(sentinel.programs, number, token, args)
            where = f"{name or number} on {arch} (arch {token:#x}) with args {args}"
            mapped = mapping.get(on_sentinel.data, on_sentinel.data) if on_sentinel.action == "errno" else 0
            if (on_real.action, on_real.data) != (on_sentinel.action, mapped):
                found.append(f"{where}: real build {on_real}, sentinel build {on_sentinel} (= errno {mapped})")
            if name is None or token == BOGUS_ARCH:
                continue
            for build, seen in ((real, on_real), (sentinel, on_sentinel)):
                predicted = plan_outcomes(plan, build, name, args, arch)
                if (seen.action, seen.data if seen.action == "errno" else 0) not in predicted:
                    found.append(f"{where}: {build.build} build {seen}, the plan says {sorted(predicted)}")
    return found


@settings(max_examples=200, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies())
def test_sentinel_and_real_builds_are_one_program_modulo_errno(policy: Policy) -> None:
    try:
        plan = plan_policy(policy, "proxy")
    except PolicyError as exc:
        # Refused by the plan, so by both builds alike; the message names a policy entry.
        assert re.search(r"seccomp\.|network\.socket_domains|default|bad_arch", str(exc)), exc
        event("refused by the plan")
        return
    event(f"{'allowlist' if policy.seccomp.is_allowlist else 'denylist'}, {len(plan.filters)} filters, "
          f"arches {'+'.join(policy.seccomp.extra_arches) or 'native'}")
    real, sentinel = compile_plan(plan, sentinel=False), compile_plan(plan, sentinel=True)
    assert len(real.programs) == len(plan.filters)
    mapping = sentinel_to_real(sentinel, real)
    assert normalised_pfc(export_pfc(policy, "proxy", sentinel=True), mapping) == export_pfc(policy, "proxy")
    assert differences(policy, plan, real, sentinel) == []


@pytest.mark.parametrize("arches", ARCH_CHOICES)
def test_baseline_with_extra_arches_compiles_to_one_program_modulo_errno(arches: tuple[str, ...]) -> None:
    from dataclasses import replace

    from pytest_sandbox.policy.load import load_policy

    base = load_policy("baseline")
    policy = replace(base, seccomp=replace(base.seccomp, extra_arches=arches))
    for mode in ("block", "proxy", "allow"):
        plan = plan_policy(policy, mode)
        real, sentinel = compile_plan(plan, sentinel=False), compile_plan(plan, sentinel=True)
        mapping = sentinel_to_real(sentinel, real)
        assert normalised_pfc(export_pfc(policy, mode, sentinel=True), mapping) == export_pfc(policy, mode)
        x86 = "x86" in arches
        for name in ("socket", "ptrace", "clone", "clone3"):
            for arch in ("native", "x86", "x32"):
                number = syscall_number(name, arch)
                if number is None:
                    continue
                for args in ((17,), (2,), (0x10000000,), ()):
                    on_real = run_stack(real.programs, number, ARCH_TOKENS[arch], args)
                    on_sentinel = run_stack(sentinel.programs, number, ARCH_TOKENS[arch], args)
                    assert on_real.action == on_sentinel.action
                    assert mapping.get(on_sentinel.data, on_sentinel.data) == on_real.data
        if x86:  # every i386 socketcall(SYS_SOCKET) meets the one socket rule libseccomp makes of them
            assert run_stack(real.programs, 102, ARCH_TOKENS["x86"], (1, 0x1000)).data == errno.EPERM


def test_the_equivalence_check_catches_the_old_real_build_of_an_allowlist(tmp_path: Path) -> None:
    # The broken target: the real build the old compile path made (tests/broken_filters.py), which
    # dropped socket(AF_PACKET) -> EPERM because its errno equals the allowlist's default errno.
    from broken_filters import docker_like_profile_with_af_packet_rule, legacy_real_build

    from pytest_sandbox.policy.load import load_policy

    policy = load_policy(docker_like_profile_with_af_packet_rule(tmp_path))
    plan = plan_policy(policy, "allow")
    sentinel = compile_plan(plan, sentinel=True)
    assert differences(policy, plan, compile_plan(plan), sentinel) == []
    found = differences(policy, plan, legacy_real_build(policy, "allow"), sentinel)
    assert any(line.startswith("socket on native (arch 0xc000003e) with args (17,): real build "
                               "Result(action='allow'") for line in found), found[:5]
    assert any(line.startswith("socket on x86") and "(17,)" in line for line in found), found[:5]
