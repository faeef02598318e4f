"""Detection proof: the syscall conformance suite FAILS against weakened policies, broken filters and a
launcher that skips the filter, and names the hole. A suite that passed these would be worthless."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from broken_filters import docker_like_profile_with_af_packet_rule, hand_built, legacy_real_build

from pytest_sandbox.policy.load import load_policy
from pytest_sandbox.policy.model import Policy
from pytest_sandbox.probes.syscall import (
    SandboxTarget,
    control_cases,
    denial_cases,
    judge,
    requirements_of,
)
from pytest_sandbox.seccomp.compiler import CompiledFilter, compile_policy
from pytest_sandbox.seccomp.launcher import Identity, NetworkPlacement
from pytest_sandbox.session import SandboxOptions, SandboxSession
from pytest_sandbox.verdicts.judgement import Judgement, Verdict

ROOT = Path(__file__).resolve().parents[1]
ADDED_BY_819 = (
    "process_vm_writev", "pidfd_open", "pidfd_getfd", "pidfd_send_signal", "fsopen", "fsconfig", "fsmount",
    "fspick", "move_mount", "open_tree", "setns", "umount2", "pivot_root", "userfaultfd", "perf_event_open",
)  # fmt: skip


def verdicts_against(policy: Policy, mode: str, filter_under_test: CompiledFilter | None,
                     *, intended: CompiledFilter) -> dict[str, Verdict]:
    """Run the suite for ``policy`` against ``filter_under_test``, judged by what ``intended`` promises."""
    requirements = requirements_of(policy, mode)
    cases = denial_cases(requirements) + control_cases(requirements, mode)
    placement, identity = NetworkPlacement(mode), Identity.current()
    probes = [c.runner_probe() for c in cases]
    baseline = SandboxTarget("baseline", None, placement, identity).run(probes)
    observed = SandboxTarget("under test", filter_under_test, placement, identity).run(probes)
    return {c.case_id: judge(c, baseline[c.case_id], observed[c.case_id], compiled=intended, policy=policy).verdict
            for c in cases}


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


def test_an_arch_added_after_the_rules_lets_i386_calls_through(baseline, tmp_path):
    text = (ROOT / "fixtures/policies/baseline.toml").read_text().replace(
        'bad_arch_action = "kill_process"', 'bad_arch_action = "kill_process"\nextra_arches = ["x86"]')
    (tmp_path / "policy.toml").write_text(text)
    with_i386 = load_policy(tmp_path / "policy.toml")
    intended = compile_policy(with_i386, "proxy")
    assert failing(verdicts_against(with_i386, "proxy", intended, intended=intended)) == set()
    holes = failing(verdicts_against(with_i386, "proxy", hand_built(with_i386, "proxy", arch_after_rules=True),
                                     intended=intended))
    assert holes and all(case.endswith("-i386") for case in holes), holes
    assert {f"{name}-i386" for name in ("ptrace", "setns", "pidfd_getfd")} <= holes


def test_a_launcher_that_skips_the_filter_in_one_mode_is_caught(baseline):
    intended = compile_policy(baseline, "proxy")
    verdicts = verdicts_against(baseline, "proxy", None, intended=intended)
    assert verdicts["filter-present"] is Verdict.BROKEN
    denials = [c for c in verdicts if not c.endswith(("-starts", "-opens", "-present", "-reaches-kernel"))]
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
    assert new_holes and all(case.startswith("socket[AF_PACKET]-") for case in new_holes), new_holes
    assert {"socket[AF_PACKET]-native", "socket[AF_PACKET]-i386"} <= new_holes
    for case in new_holes:
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
