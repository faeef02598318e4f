"""Detection proof: the syscall conformance suite FAILS against weakened policies, broken filters and a
launcher that skips the filter, and names the hole. A suite that passed these would be worthless."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from broken_filters import (
    direct_calls_only,
    docker_like_profile_with_af_packet_rule,
    hand_built,
    ipc_whole_arg0,
    legacy_real_build,
    one_condition_kept,
)

from pytest_sandbox.policy.load import load_policy
from pytest_sandbox.policy.model import Policy
from pytest_sandbox.probes.syscall import SandboxTarget
from pytest_sandbox.probes.syscall_cases import control_cases, denial_cases, requirements_of
from pytest_sandbox.seccomp.compiler import CompiledFilter, compile_policy
from pytest_sandbox.seccomp.launcher import Identity, NetworkPlacement
from pytest_sandbox.session import SandboxOptions, SandboxSession
from pytest_sandbox.verdicts.judgement import Judgement, Verdict
from pytest_sandbox.verdicts.syscall import judge

ROOT = Path(__file__).resolve().parents[1]
DOCKER_LIKE = "fixtures/oci/docker-like-default.json"
ADDED_BY_819 = (
    "process_vm_writev", "pidfd_open", "pidfd_getfd", "pidfd_send_signal", "fsopen", "fsconfig", "fsmount",
    "fspick", "move_mount", "open_tree", "setns", "umount2", "pivot_root", "userfaultfd", "perf_event_open",
)  # fmt: skip


def judgements_against(policy: Policy, mode: str, filter_under_test: CompiledFilter | None,
                       *, intended: CompiledFilter | None) -> dict[str, Judgement]:
    """Run the suite for ``policy`` against ``filter_under_test``, judged by what ``intended`` promises
    (``None``: as a third party's sandbox is judged, from the requirement alone)."""
    requirements = requirements_of(policy, mode)
    # Not the witness rows: no filter decides them, and they need the session's witness (tests/test_witness_paths.py).
    cases = tuple(c for c in denial_cases(requirements) + control_cases(requirements, mode) if not c.witness_access)
    placement, identity = NetworkPlacement(mode), Identity.current()
    probes = [c.runner_probe() for c in cases]
    baseline = SandboxTarget("baseline", None, placement, identity).run(probes)
    observed = SandboxTarget("under test", filter_under_test, placement, identity).run(probes)
    judged_by = policy if intended is not None else None
    return {c.case_id: judge(c, baseline[c.case_id], observed[c.case_id], compiled=intended, policy=judged_by)
            for c in cases}


def verdicts_against(policy: Policy, mode: str, filter_under_test: CompiledFilter | None,
                     *, intended: CompiledFilter | None) -> dict[str, Verdict]:
    return {case: j.verdict for case, j in judgements_against(policy, mode, filter_under_test,
                                                              intended=intended).items()}


def failing(verdicts: dict[str, Verdict]) -> set[str]:
    return {case for case, v in verdicts.items() if v not in (Verdict.BLOCKED, Verdict.WORKS)}


@pytest.fixture(scope="module")
def baseline() -> Policy:
    return load_policy("baseline")


def test_reference_build_passes_everything_it_is_checked_against(baseline):
    intended = compile_policy(baseline, "block")
    assert failing(verdicts_against(baseline, "block", intended, intended=intended)) == set()


def test_a_dropped_rule_is_caught_and_named(baseline):
    intended = compile_policy(baseline, "proxy")
    holes = failing(verdicts_against(baseline, "proxy", hand_built(baseline, "proxy", drop="pidfd_getfd"),
                                     intended=intended))
    assert holes == {"pidfd_getfd-native"}


def test_a_64bit_equality_rule_is_caught_by_the_high_bit_variants(baseline):
    intended = compile_policy(baseline, "block")
    holes = failing(verdicts_against(baseline, "block", hand_built(baseline, "block", full_64bit_eq=True),
                                     intended=intended))
    assert holes
    assert all(re.search(r"-native-hi(32|-ones)$", case) for case in holes), holes
    assert "socket[AF_INET]-native-hi32" in holes and "seccomp[arg0=0x1]-native-hi32" in holes


RANGE_POLICY = ROOT / "tests/range_operators.toml"


def test_every_operator_compiles_to_a_32bit_comparison_and_a_64bit_one_is_caught():
    """tests/range_operators.toml has one rule per operator, each on an argument the kernel reads as 32 bits.
    The reference build passes every high-bit variant (denials and controls); a filter comparing all 64
    bits (libseccomp's plain LT/LE/GT/GE/NE) lets ``(1 << 32) | v`` through for lt/le and refuses the
    kernel's not-matched ``v`` for ne/gt/ge, on the high-bit rows and nowhere else."""
    policy = load_policy(RANGE_POLICY)
    assert {rule.op for rule in policy.seccomp.arg_rules} == {"eq", "masked_eq", "ne", "lt", "le", "gt", "ge"}
    intended = compile_policy(policy, "block")
    judged = judgements_against(policy, "block", intended, intended=intended)
    assert failing({case: j.verdict for case, j in judged.items()}) == set()
    for op in ("ne", "lt", "le", "gt", "ge"):  # every range rule has its high-bit rows, denials and controls
        assert sum(re.search(rf"\[arg\d {op} .*-native-hi(32|-ones)(-reaches-kernel)?$", c) is not None
                   for c in judged) == 4, op
    broken = judgements_against(policy, "block", hand_built(policy, "block"), intended=intended)
    holes = failing({case: j.verdict for case, j in broken.items()})
    expected = {f"{label}-native-{variant}" for label in ("seccomp[arg0 le 0x1]", "ioctl[arg1 lt 0x5413]")
                for variant in ("hi32", "hi-ones")}
    expected |= {f"{label}-not-matching-native-{variant}-reaches-kernel"
                 for label in ("execveat[arg4 gt 0x0]", "socket[arg0 ge 0x2]", "personality[arg0 ne 0xffffffff]")
                 for variant in ("hi32", "hi-ones")}
    assert holes == expected, holes ^ expected
    assert broken["seccomp[arg0 le 0x1]-native-hi32"].verdict is Verdict.ALLOWED
    assert broken["socket[arg0 ge 0x2]-not-matching-native-hi32-reaches-kernel"].verdict is Verdict.BROKEN


def test_a_rule_of_two_anded_conditions_is_attempted_with_both_and_each_control_misses_one():
    """An OCI rule ``socket(arg0 == AF_PACKET && arg2 == 0x300)``: the attempt sets both arguments (the old
    plan set arg0 only, an attempt the rule does not match), and each control leaves exactly one condition
    unmet. A runtime that keeps one condition only refuses the control missing the other."""
    policy = load_policy(ROOT / "tests/two_conditions.json")
    label = "socket[AF_PACKET && arg2=0x300]"
    requirements = requirements_of(policy, "block")
    cases = {c.case_id: c for c in denial_cases(requirements) + control_cases(requirements, "block")}
    assert cases[f"{label}-native"].args == (17, 0xFFFF, 0x300)
    controls = {f"{label}-only-arg0-unmet-reaches-kernel": (1, 0xFFFF, 0x300),
                f"{label}-only-arg2-unmet-reaches-kernel": (17, 0xFFFF, 0)}
    assert {case: cases[case].args for case in controls} == controls
    intended = compile_policy(policy, "block")
    judged = verdicts_against(policy, "block", intended, intended=intended)
    assert judged[f"{label}-native"] is Verdict.BLOCKED and judged[f"{label}-x32"] is Verdict.BLOCKED
    # runc compares 64 bits (an OCI profile is enforced as runc enforces it): the high-bit rows show that hole
    assert failing(judged) == {f"{label}-native{where}-{variant}" for where in ("", "-arg2")
                               for variant in ("hi32", "hi-ones")}
    for keep, missed in ((0, "arg2"), (1, "arg0")):
        verdicts = verdicts_against(policy, "block", one_condition_kept(policy, "block", keep), intended=intended)
        assert verdicts[f"{label}-only-{missed}-unmet-reaches-kernel"] is Verdict.BROKEN, keep
        assert verdicts[f"{label}-native"] is Verdict.BLOCKED


def test_a_trace_rule_without_a_tracer_is_a_refusal_with_enosys():
    """seccomp(2): SECCOMP_RET_TRACE with no tracer attached fails the call with ENOSYS. The requirement,
    the plan's expected refusal, the live probe and the evaluator's prediction all say ENOSYS; an
    unfiltered run (a filter without the rule) is ALLOWED."""
    import errno as errno_module

    from pytest_sandbox.seccomp.bpf_eval import FilterResult
    from pytest_sandbox.seccomp.filter_plan import Action
    from pytest_sandbox.verdicts.judgement import Outcome
    from pytest_sandbox.verdicts.loaded_filter import predicted_outcome
    from pytest_sandbox.verdicts.syscall import expected_refusal, outcome_of

    enosys = Outcome.errno(errno_module.ENOSYS)
    policy = load_policy(ROOT / "tests/trace_rule.json")
    intended = compile_policy(policy, "block")
    assert outcome_of(Action("trace"), intended) == enosys
    assert predicted_outcome(FilterResult(0x7FF00000), Outcome.errno(errno_module.EBADF)) == enosys
    item = next(r for r in requirements_of(policy, "block") if r.syscall == "pidfd_getfd")
    assert item.own_refusal == enosys
    case = next(c for c in denial_cases((item,)) if c.abi == "native")
    assert expected_refusal(case, intended, policy) == frozenset({enosys})
    judged = judgements_against(policy, "block", intended, intended=intended)
    assert judged["pidfd_getfd-native"].verdict is Verdict.BLOCKED, judged["pidfd_getfd-native"]
    assert "ENOSYS" in judged["pidfd_getfd-native"].observed
    without_rule = compile_policy(load_policy(ROOT / "tests/two_conditions.json"), "block")
    unfiltered = judgements_against(policy, "block", without_rule, intended=intended)
    assert unfiltered["pidfd_getfd-native"].verdict is Verdict.ALLOWED


def test_an_arch_added_after_the_rules_lets_i386_calls_through(baseline, tmp_path):
    text = (ROOT / "fixtures/policies/baseline.toml").read_text().replace(
        'bad_arch_action = "kill_process"', 'bad_arch_action = "kill_process"\nextra_arches = ["x86"]')
    (tmp_path / "policy.toml").write_text(text)
    with_i386 = load_policy(tmp_path / "policy.toml")
    intended = compile_policy(with_i386, "proxy")
    assert failing(verdicts_against(with_i386, "proxy", intended, intended=intended)) == set()
    holes = failing(verdicts_against(with_i386, "proxy", hand_built(with_i386, "proxy", arch_after_rules=True),
                                     intended=intended))
    # every hole is on the i386 ABI: the direct calls, and the socketcall path (its control included:
    # the intended build refuses every socketcall(SYS_SOCKET) there, this one lets it through)
    assert holes and all(case.endswith(("-i386", "-i386-socketcall", "-i386-socketcall-reaches-kernel"))
                         for case in holes), holes
    assert {f"{name}-i386" for name in ("ptrace", "setns", "pidfd_getfd")} <= holes
    assert "socket[AF_VSOCK]-i386-socketcall" in holes


def policy_file(tmp_path: Path, text: str) -> Policy:
    (tmp_path / "policy.toml").write_text(text)
    return load_policy(tmp_path / "policy.toml")


VSOCK_OVER_I386 = """
[seccomp]
extra_arches = ["x86"]
[network.socket_domains]
all_modes = ["AF_VSOCK"]
"""


def test_the_runc_docker_socketcall_hole_is_caught_on_the_multiplexed_path_only(tmp_path):
    """A filter refusing socket(AF_VSOCK) natively and through the direct i386 call 359, but letting i386
    socketcall(2) through (what runc builds from Docker's default profile): the socketcall row is
    ALLOWED, every other path stays BLOCKED."""
    policy = policy_file(tmp_path, VSOCK_OVER_I386)
    intended = compile_policy(policy, "proxy")
    assert failing(verdicts_against(policy, "proxy", intended, intended=intended)) == set()
    broken = direct_calls_only(policy, "proxy", [(41, 359, 40)])
    for judged_by in (intended, None):  # our own build's plan, and a third party's requirement alone
        judgements = judgements_against(policy, "proxy", broken, intended=judged_by)
        holes = failing({case: j.verdict for case, j in judgements.items()})
        hole = judgements["socket[AF_VSOCK]-i386-socketcall"]
        assert hole.verdict is Verdict.ALLOWED and "reached the kernel" in hole.reason, hole
        assert judgements["socket[AF_VSOCK]-i386"].verdict is Verdict.BLOCKED
        assert judgements["socket[AF_VSOCK]-native"].verdict is Verdict.BLOCKED
        if judged_by is None:  # the unruled socketcall reaches the kernel under a third party's filter: fine
            assert holes == {"socket[AF_VSOCK]-i386-socketcall"}, holes
        else:  # libseccomp refuses every socketcall(SYS_SOCKET) once x86 is admitted: this one did not
            assert holes == {"socket[AF_VSOCK]-i386-socketcall",
                             "socket-without-ruled-flag-i386-socketcall-reaches-kernel"}, holes


def test_the_evaluation_maps_a_denylist_requirement_onto_the_i386_multiplexers(tmp_path):
    """A requirement that refuses socket(AF_VSOCK) and shmctl and fences the i386 ABI off (no extra_arches)
    still names what a sandbox admitting i386 must refuse there: socketcall(SYS_SOCKET) and ipc(SHMCTL), whose
    arguments a filter cannot read. The read-back evaluation of the direct-calls-only filter (what runc builds
    from Docker's profile) names both holes; the reference build (i386 killed) has none."""
    from pytest_sandbox.fixtures.loaded_filter import requirement_stack
    from pytest_sandbox.seccomp.behaviour import compare, summarise

    policy = policy_file(tmp_path, '[seccomp]\ndeny = ["shmctl"]\n[network.socket_domains]\nall_modes = ["AF_VSOCK"]\n')
    required = requirement_stack(policy, "proxy")
    broken = direct_calls_only(policy, "proxy", [(41, 359, 40), (31, 396, None)])
    weaker = compare(required, broken.programs).weaker
    holes = {(c.abi, c.syscall) for c in weaker}
    assert {("i386", "socketcall"), ("i386", "ipc")} <= holes, summarise(weaker)
    assert not {h for h in holes if h[1] in ("socket", "shmctl")}, holes  # the direct calls are refused
    lines = " ".join(summarise(weaker))
    assert "socketcall (i386) when arg0 == 0x1" in lines and "ipc (i386) when arg0 & 0xffff == 0x18" in lines, lines
    assert not compare(required, compile_policy(policy, "proxy").programs).weaker


def test_the_sysv_ipc_multiplexer_is_probed_and_its_hole_caught(tmp_path):
    policy = policy_file(tmp_path, '[seccomp]\nextra_arches = ["x86"]\ndeny = ["shmctl", "msgctl", "semctl"]\n')
    intended = compile_policy(policy, "proxy")
    verdicts = verdicts_against(policy, "proxy", intended, intended=intended)
    assert {f"{name}-i386-ipc" for name in ("shmctl", "msgctl", "semctl")} <= set(verdicts)
    assert failing(verdicts) == set()
    broken = direct_calls_only(policy, "proxy", [(31, 396, None), (71, 402, None), (66, 394, None)])
    assert failing(verdicts_against(policy, "proxy", broken, intended=None)) == {
        f"{name}-i386-ipc{version}" for name in ("shmctl", "msgctl", "semctl") for version in ("", "-v1", "-vffff")}


SYSV_IPC_I386 = ROOT / "tests/sysv_ipc_i386.toml"
IPC_VERSION_VARIANTS = {f"{name}-i386-ipc-{version}" for name in ("shmctl", "msgctl", "semctl")
                        for version in ("v1", "vffff")}


def test_every_sysv_ipc_row_is_probed_with_versions_that_reach_the_same_call():
    from pytest_sandbox.catalogues.syscalls import SYSCALL_PROBES

    ipc_rows = [probe for probe in SYSCALL_PROBES if probe.mux is not None and probe.mux.name == "ipc"]
    assert {probe.name for probe in ipc_rows} == {"shmctl", "msgctl", "semctl"}
    for probe in ipc_rows:  # (semctl/msgctl/shmctl ignore the version; shmat's version 1 would be iBCS2's EINVAL)
        assert probe.mux is not None and probe.mux.versions and 0 not in probe.mux.versions
        assert all(probe.mux.call_with_version(v) & 0xFFFF == probe.mux.call for v in probe.mux.versions)
    socket_rows = [probe for probe in SYSCALL_PROBES if probe.mux is not None and probe.mux.name == "socketcall"]
    assert socket_rows and not any(probe.mux.versions for probe in socket_rows if probe.mux is not None), (
        "socketcall(2) compares its whole call number (net/compat.c: call < SYS_SOCKET || call > SYS_SENDMMSG)")


def test_an_ipc_version_in_the_high_16_bits_is_refused_and_a_whole_argument_compare_is_caught():
    """ipc(2) runs ``(1 << 16) | SHMCTL`` as SHMCTL. The reference refuses every version; libseccomp's own
    ``ipc(arg0 == 24)`` (ipc_whole_arg0) lets exactly the version variants through: ALLOWED, named."""
    policy = load_policy(SYSV_IPC_I386)
    intended = compile_policy(policy, "block")
    judgements = judgements_against(policy, "block", intended, intended=intended)
    assert IPC_VERSION_VARIANTS <= set(judgements)
    assert failing({case: j.verdict for case, j in judgements.items()}) == set()
    assert all(judgements[case].observed == "EPERM" for case in IPC_VERSION_VARIANTS)
    broken = ipc_whole_arg0(policy, "block")
    for judged_by in (intended, None):  # our own build's plan, and a third party's requirement alone
        judgements = judgements_against(policy, "block", broken, intended=judged_by)
        assert failing({case: j.verdict for case, j in judgements.items()}) == IPC_VERSION_VARIANTS
        for case in IPC_VERSION_VARIANTS:
            assert judgements[case].verdict is Verdict.ALLOWED and "reached the kernel" in judgements[case].reason
        assert judgements["shmctl-i386-ipc"].verdict is Verdict.BLOCKED  # version 0: ipc(arg0 == 24) holds
    from pytest_sandbox.probes.syscall_cases import denial_cases, requirements_of

    titles = {c.case_id: c.title for c in denial_cases(requirements_of(policy, "block"))}
    assert titles["shmctl-i386-ipc-v1"] == (
        "syscall shmctl via i386 ipc(0x10018): version 1 in the high 16 bits, which the kernel drops "
        "(call & 0xffff == 24), so a filter comparing the whole argument 0 lets it through")


def test_the_evaluation_and_the_plan_agree_with_the_live_probe_on_ipc_versions():
    """The BPF evaluation of both filters says what the live probe saw: the whole-argument compare lets
    ``ipc(0xffff0000 | N)`` through, the reference does not; the plan predicts both."""
    from pytest_sandbox.fixtures.loaded_filter import requirement_stack
    from pytest_sandbox.seccomp.behaviour import compare, summarise
    from pytest_sandbox.seccomp.filter_plan import plan_policy

    policy = load_policy(SYSV_IPC_I386)
    required = requirement_stack(policy, "block")
    assert not compare(required, compile_policy(policy, "block").programs).weaker
    weaker = compare(required, ipc_whole_arg0(policy, "block").programs).weaker
    assert {(c.abi, c.syscall) for c in weaker} == {("i386", "ipc")}, summarise(weaker)
    lines = " ".join(summarise(weaker))
    for call in (0x18, 0xE, 0x3):
        assert f"arg0 & 0xffff == {call:#x}" in lines
        assert f"e.g. arg0={0xFFFF0000 | call:#x}): ERRNO(1) -> ALLOW" in lines
    from dataclasses import replace

    from pytest_sandbox.seccomp.filter_plan import ALLOW, Action

    plan = plan_policy(policy, "block")
    refused = {Action("errno", "deny:shmctl")}
    assert plan.ipc_versions_masked
    assert plan.results("shmctl", (), "x86", multiplexed=True, version=1) == refused
    unmasked = replace(plan, ipc_versions_masked=False)  # the plan ipc_whole_arg0 compiles
    assert unmasked.results("shmctl", (), "x86", multiplexed=True, version=0) == refused
    assert unmasked.results("shmctl", (), "x86", multiplexed=True, version=1) == {ALLOW}
    from pytest_sandbox.policy.explain import explain_policy

    assert "ipc also with a version in the high 16 bits (call & 0xffff == N)" in explain_policy(policy, "block", 0)
    profile = load_policy(ROOT / "tests/broken_targets/ipc_whole_arg0.json")
    assert not plan_policy(profile, "block").ipc_versions_masked
    assert "NOT ipc((v << 16) | N), which the kernel runs as call N" in explain_policy(profile, "block", 0)


def test_the_bundled_policies_kill_the_i386_abi_multiplexers_included(baseline):
    intended = compile_policy(baseline, "proxy")
    judgements = judgements_against(baseline, "proxy", intended, intended=intended)
    for case in ("socket[AF_VSOCK]-i386-socketcall", "socket[AF_PACKET]-i386-socketcall"):
        assert judgements[case].verdict is Verdict.BLOCKED and judgements[case].observed == "killed by SIGSYS"
    control = judgements["socket-without-ruled-flag-i386-socketcall-reaches-kernel"]
    assert control.verdict is Verdict.WORKS and "refuses the whole i386 ABI" in control.reason
    from pytest_sandbox.policy.explain import explain_policy

    assert "i386 socketcall(102)/ipc(117): refused with the whole i386 ABI" in explain_policy(baseline, "proxy", 0)


def test_unprobed_refusals_are_covered_by_the_default_action_or_reported(tmp_path):
    from pytest_sandbox.probes.syscall_cases import BY_DEFAULT_ACTION, BY_EVALUATION, unprobed_refusals

    allowlist = {u.syscall: u.covered_by for u in unprobed_refusals(load_policy(str(ROOT / DOCKER_LIKE)))}
    for name in ("lookup_dcookie", "uselib", "clock_settime"):
        assert allowlist.get(name) == BY_DEFAULT_ACTION, name
    assert "syscall-evaluation" in BY_DEFAULT_ACTION and "no live probe" in BY_DEFAULT_ACTION
    denylist = policy_file(tmp_path, '[seccomp]\ndeny = ["chmod", "ptrace"]\n')
    assert [(u.syscall, u.covered_by) for u in unprobed_refusals(denylist)] == [("chmod", BY_EVALUATION)]


def test_a_denied_call_without_a_probe_is_judged_from_the_read_back_evaluation_never_from_nothing(tmp_path):
    """chmod has no harmless probe. Its denial row is formed from the evaluation of the loaded filter:
    BLOCKED when the loaded filter refuses chmod wherever the requirement does, ALLOWED naming the hole
    for a filter without the rule, and a failure with the reason when no evaluation could be made."""
    from pytest_sandbox.fixtures.loaded_filter import requirement_stack
    from pytest_sandbox.seccomp.behaviour import refusal_holes
    from pytest_sandbox.verdicts.syscall import UnprobedEvaluation, judge_unprobed

    policy = policy_file(tmp_path, '[seccomp]\ndeny = ["chmod", "ptrace"]\nenosys = ["clone3"]\n')
    case = next(c for c in denial_cases(requirements_of(policy, "proxy")) if c.syscall == "chmod")
    assert case.nr is None and "syscall-evaluation" in case.title
    required = requirement_stack(policy, "proxy")

    def judged(programs: tuple[bytes, ...]) -> Judgement:
        holes, refused, complete = refusal_holes(required, programs, "chmod")
        return judge_unprobed(case, UnprobedEvaluation(holes, refused, complete, "read back"))

    ok = judged(compile_policy(policy, "proxy").programs)
    assert ok.verdict is Verdict.BLOCKED and "no live probe" in ok.reason and "syscall-evaluation" in ok.reason
    hole = judged(hand_built(policy, "proxy", drop="chmod").programs)
    assert hole.verdict is Verdict.ALLOWED and "chmod (x86_64)" in hole.reason, hole.reason
    none = judge_unprobed(case, None, "proxy mode, as root: the loaded filter cannot be read back: EPERM")
    assert none.verdict is Verdict.INDETERMINATE and not none.passed and "cannot be read back" in none.reason


def test_a_filter_refusing_with_enosys_is_a_refusal_where_the_requirement_names_eperm(baseline):
    """Podman's defaultErrnoRet (38) and bubblewrap's ENOSYS: BLOCKED, with the errno difference said."""
    enosys = hand_built(baseline, "proxy", errno_number=errno.ENOSYS)
    judgements = judgements_against(baseline, "proxy", enosys, intended=None)
    assert not failing({case: j.verdict for case, j in judgements.items()})
    ptrace = judgements["ptrace-native"]
    assert ptrace.verdict is Verdict.BLOCKED and ptrace.observed == "ENOSYS"
    assert "the requirement names EPERM" in ptrace.reason
    clone3 = judgements["clone3-native"]  # the requirement itself names ENOSYS there: nothing to add
    assert clone3.verdict is Verdict.BLOCKED and "requirement names" not in clone3.reason


def test_a_refusal_the_kernel_gives_anyway_is_never_credited_even_when_the_requirement_names_it(tmp_path):
    from pytest_sandbox.probes.syscall_cases import Requirement
    from pytest_sandbox.verdicts.judgement import Outcome

    case = next(c for c in denial_cases([Requirement("deny", "kexec_load", refused_with=errno.ENOSYS)])
                if c.abi == "native")
    enosys = Outcome.errno(errno.ENOSYS)
    assert judge(case, enosys, enosys, compiled=None, policy=None).verdict is Verdict.INDETERMINATE
    assert judge(case, Outcome.errno(errno.EINVAL), enosys, compiled=None, policy=None).verdict is Verdict.BLOCKED
    assert judge(case, Outcome.errno(errno.EINVAL), Outcome.errno(errno.EINVAL), compiled=None,
                 policy=None).verdict is Verdict.ALLOWED


def test_high_bit_variants_follow_the_kernel_type_of_the_ruled_argument(baseline):
    ids = {c.case_id for c in denial_cases(requirements_of(load_policy("strict"), "proxy"))}
    # 32-bit arguments: seccomp's unsigned int op, clone's low 32 bits, prctl's int option, ioctl's cmd
    for label in ("seccomp[arg0=0x1]", "clone[arg0&0x10000000=0x10000000]", "prctl[arg0=0x16]",
                  "ioctl[arg1=0x5412]", "socket[AF_VSOCK]", "execveat[arg4&0x1000=0x1000]"):
        assert {f"{label}-native-hi32", f"{label}-native-hi-ones"} <= ids, label
    # unshare(unsigned long): high bits make another value, which the kernel refuses (EINVAL)
    assert not any(i.startswith("unshare[") and "-hi" in i for i in ids)


def test_a_launcher_that_skips_the_filter_in_one_mode_is_caught(baseline):
    intended = compile_policy(baseline, "proxy")
    verdicts = verdicts_against(baseline, "proxy", None, intended=intended)
    assert verdicts["filter-present"] is Verdict.BROKEN
    denials = [c for c in verdicts if not c.endswith(("-starts", "-opens", "-present", "-reaches-kernel", "-reads"))]
    assert all(verdicts[c] is Verdict.ALLOWED for c in denials if not c.endswith(("-x32", "-i386")))


def test_pre_819_policy_fails_the_suite_naming_each_hole():
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--sandbox",
         "--sandbox-policy", "fixtures/policies/openshell-pre-819.toml", "--sandbox-require", "baseline",
         "conformance/"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "1000"},
    )
    assert completed.returncode == 1, completed.stdout[-2000:]
    failed = set(re.findall(r"^FAILED [^[]+\[(\S+)\]", completed.stdout, re.MULTILINE))
    for name in ADDED_BY_819:
        assert f"proxy-root-{name}-native" in failed or f"proxy-user-{name}-native" in failed, name
    assert any("clone[arg0&0x10000000=0x10000000]-native" in t for t in failed)
    assert any(t.endswith("clone3-native") for t in failed)
    assert any(t.startswith("allow-") and t.endswith("filter-present") for t in failed)
    assert "ALLOWED, expected" in completed.stdout
    # the reference's own six denies still pass under the weakened policy
    assert not any(t.endswith("-memfd_create-native") for t in failed if t.startswith(("block", "proxy")))


# -- the filter users get: mutations of the real build only ----------------------------------------


def session_judgements(monkeypatch: pytest.MonkeyPatch, policy: str, mode: str, *,
                       real_build: CompiledFilter | None = None) -> dict[str, Judgement]:
    """The conformance suite's own judging (both builds), with the real build optionally replaced."""
    session = SandboxSession(SandboxOptions(policy=policy, require=policy, modes=(mode,), identities=("current",)))
    if real_build is not None:
        intended = session.compiled

        def compiled(each_mode: str, *, sentinel: bool) -> CompiledFilter | None:
            return intended(each_mode, sentinel=sentinel) if sentinel else real_build

        monkeypatch.setattr(session, "compiled", compiled)
    params = session.syscall_params("denial") + session.syscall_params("control")
    return {p.case.case_id: session.judge(p) for p in params}


def not_passed(judgements: dict[str, Judgement]) -> set[str]:
    return {case for case, j in judgements.items() if not j.passed}


def test_a_rule_dropped_from_the_real_build_only_is_caught_and_named(monkeypatch, baseline):
    broken = hand_built(baseline, "proxy", drop="pidfd_getfd")  # the sentinel build keeps the rule
    judgements = session_judgements(monkeypatch, "baseline", "proxy", real_build=broken)
    assert not_passed(judgements) == {"pidfd_getfd-native"}
    hole = judgements["pidfd_getfd-native"]
    assert hole.verdict is Verdict.ALLOWED
    assert hole.reason.startswith("real build: ") and "sentinel build refused with errno" in hole.reason


def test_the_old_real_build_of_an_allowlist_with_an_af_packet_rule_is_caught(monkeypatch, tmp_path):
    """Issue #8 item 4: the old compile path dropped ``socket(AF_PACKET) -> EPERM`` from the real build of
    an allowlist (its errno equals the default's) while the sentinel build kept it."""
    profile = str(docker_like_profile_with_af_packet_rule(tmp_path))
    fixed = session_judgements(monkeypatch, profile, "allow")
    legacy = session_judgements(monkeypatch, profile, "allow",
                                real_build=legacy_real_build(load_policy(profile), "allow"))
    new_holes = not_passed(legacy) - not_passed(fixed)
    # Through i386 socketcall(2) the legacy build shows a second hole: libseccomp turns the allow rule
    # socket(arg0 < 38) into socketcall(call == SYS_SOCKET) -> ALLOW, and with the deny rule gone nothing
    # refuses any family there (AF_ALG, refused natively by the default action, included). The fixed build's
    # deny filter refuses every socketcall(SYS_SOCKET); the socketcall control says so.
    multiplexed = {case for case in new_holes if case.endswith("-i386-socketcall")}
    control = "socket-without-ruled-flag-i386-socketcall-reaches-kernel"
    # The legacy build's allow rules compare 64 bits (socket(arg0 > 40), ...): socket(AF_ALG | 1 << 32) is
    # allowed there though the kernel reads AF_ALG. Our TOML compile compares the low 32 bits for every
    # operator on an int argument (filter_plan.low32_blocks), so the fixed build refuses those rows.
    high_bits = {case for case in new_holes if re.search(r"-native-hi(32|-ones)$", case)}
    assert {"socket[AF_ALG]-native-hi32", "socket[AF_ALG]-native-hi-ones"} <= high_bits
    assert all(fixed[case].verdict is Verdict.BLOCKED for case in high_bits)
    # The same drop takes the ioctl(USERFAULTFD_IOC_NEW) refusal that the allowlist's refusal of userfaultfd implies
    # (filter_plan.implied_rules): its errno is the default's, and the allowlist allows ioctl. Root opens the device.
    device = {case for case in new_holes if case.startswith("userfaultfd-dev-")}
    assert new_holes and all(case.startswith("socket[AF_PACKET]-")
                             for case in new_holes - multiplexed - high_bits - device - {control})
    assert {"socket[AF_PACKET]-native", "socket[AF_PACKET]-i386", "socket[AF_PACKET]-i386-socketcall",
            "socket[AF_ALG]-i386-socketcall"} <= new_holes
    assert legacy[control].verdict is Verdict.BROKEN and fixed[control].verdict is Verdict.WORKS
    for case in new_holes - {control}:
        assert legacy[case].verdict is Verdict.ALLOWED and legacy[case].reason.startswith("real build: "), case
        assert fixed[case].verdict is Verdict.BLOCKED, case
    # the fixed real build refuses AF_PACKET with EPERM itself, not only in the sentinel build
    assert "real build: EPERM" in fixed["socket[AF_PACKET]-native"].observed


def test_real_results_equal_to_the_baseline_rest_on_the_sentinel_evidence_and_say_so(monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("needs root to probe as nobody, whose unfiltered pivot_root answers EPERM")
    session = SandboxSession(SandboxOptions(policy="baseline", modes=("proxy",), identities=("current", "nobody")))
    params = [p for p in session.syscall_params("denial") if p.identity.name == "nobody"
              and p.case.case_id == "pivot_root-native"]
    assert len(params) == 1
    judgement = session.judge(params[0])
    assert judgement.verdict is Verdict.BLOCKED
    assert "the real build alone is ambiguous here" in judgement.reason


def test_the_multiplexer_registers_are_what_the_runner_passes_or_unknown(tmp_path):
    """The loaded-filter evaluation judges a multiplexed probe on ipc's own registers (the call number in
    argument 0), never on the carried call's arguments; a register holding an address only the runner knows
    (socketcall's block, semctl's "*3" word) makes the probe unevaluable, counted as skipped."""
    policy = load_policy(SYSV_IPC_I386)
    cases = {c.case_id: c for c in denial_cases(requirements_of(policy, "block"))}
    assert cases["shmctl-i386-ipc-v1"].registers() == (0x10018, -1, 0, 0, 0)  # (call, first, second, third, ptr)
    assert cases["msgctl-i386-ipc"].registers() == (14, -1, 0, 0, 0)
    assert cases["shmctl-native"].registers() == (-1, 0, 0)
    assert cases["semctl-i386-ipc-vffff"].registers() is None
    vsock = {c.case_id: c for c in denial_cases(requirements_of(policy_file(tmp_path, VSOCK_OVER_I386), "proxy"))}
    assert vsock["socket[AF_VSOCK]-i386-socketcall"].registers() is None


@pytest.mark.skipif(os.geteuid() != 0, reason="PTRACE_SECCOMP_GET_FILTER needs root")
def test_a_third_partys_whole_argument_ipc_rule_fails_live_and_in_the_read_back_evaluation():
    """End to end through ``--sandbox-exec``: tests/broken_targets/ipc_whole_arg0.json (an OCI profile: runc's
    ``ipc(arg0 == N)``) judged against tests/sysv_ipc_i386.toml. The live probes fail exactly the six version
    variants, the read-back evaluation names the three calls with a version, and the two agree."""
    target = ROOT / "tests/broken_targets/ipc_whole_arg0.json"
    command = f"{sys.executable} -m pytest_sandbox.cli run --policy {target} --"
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--sandbox", "--sandbox-modes=block",
         "--sandbox-identities=current", f"--sandbox-exec={command}", f"--sandbox-require={SYSV_IPC_I386}",
         "conformance/test_syscalls.py", "conformance/test_loaded_filter.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "1000"})
    failed = dict(re.findall(r"^FAILED \S+::(\w+\[\S+\]) - (.*)$", completed.stdout, re.MULTILINE))
    live = {re.sub(r"^test_forbidden_syscall_is_refused\[exec-[^-]+-[^-]+-", "", name).rstrip("]")
            for name in failed if name.startswith("test_forbidden_syscall_is_refused")}
    assert live == IPC_VERSION_VARIANTS, completed.stdout[-3000:]
    evaluation = [m for name, m in failed.items() if name.startswith("test_loaded_filter_refuses_what")]
    assert len(evaluation) == 1 and len(failed) == len(live) + 1, sorted(failed)
    for call in (0x18, 0xE, 0x3):
        assert f"(e.g. arg0={0xFFFF0000 | call:#x}): ERRNO(1) -> ALLOW" in evaluation[0], evaluation[0]
    assert "version 1 in the high 16 bits" in failed[next(n for n in failed if n.endswith("shmctl-i386-ipc-v1]"))]
