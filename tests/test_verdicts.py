"""Verdict rules (syscalls.md §4): every path of judge_denial and the controls."""

from __future__ import annotations

import errno
import signal

from pytest_sandbox.verdicts.judgement import Outcome, Verdict, judge_denial, judge_reaches_kernel, judge_works

EPERM, EINVAL, ENOSYS = Outcome.errno(errno.EPERM), Outcome.errno(errno.EINVAL), Outcome.errno(errno.ENOSYS)
SIGSYS = Outcome.killed_by(signal.SIGSYS)
SENTINEL = Outcome.errno(1003)


def test_refusal_that_differs_from_baseline_is_blocked():
    assert judge_denial(frozenset({SENTINEL}), EINVAL, SENTINEL).verdict is Verdict.BLOCKED
    assert judge_denial(frozenset({SIGSYS}), EINVAL, SIGSYS, abi="i386").verdict is Verdict.BLOCKED


def test_same_result_as_unfiltered_is_allowed():
    judgement = judge_denial(frozenset({EPERM}), EINVAL, EINVAL)
    assert judgement.verdict is Verdict.ALLOWED
    assert "reached the kernel" in judgement.reason


def test_success_where_a_refusal_is_required_is_allowed():
    assert judge_denial(frozenset({EPERM}), EINVAL, Outcome("return", 0)).verdict is Verdict.ALLOWED


def test_baseline_equal_to_expected_refusal_is_indeterminate_never_blocked():
    judgement = judge_denial(frozenset({EPERM}), EPERM, EPERM)
    assert judgement.verdict is Verdict.INDETERMINATE
    assert "ambiguous" in judgement.reason


def test_refusal_that_differs_from_an_ambiguous_baseline_is_still_blocked():
    # x32 clone3: the kernel answers ENOSYS (no x32), a bad-arch action kills with SIGSYS
    assert judge_denial(frozenset({ENOSYS, SIGSYS}), ENOSYS, SIGSYS, abi="x32").verdict is Verdict.BLOCKED
    assert judge_denial(frozenset({ENOSYS, SIGSYS}), ENOSYS, ENOSYS, abi="x32").verdict is Verdict.INDETERMINATE


def test_unexpected_result_is_indeterminate():
    assert judge_denial(frozenset({EPERM}), EINVAL, Outcome.errno(errno.EACCES)).verdict is Verdict.INDETERMINATE
    assert judge_denial(frozenset({EPERM}), EINVAL, Outcome("timeout")).verdict is Verdict.INDETERMINATE


def test_unavailable_path_is_indeterminate():
    unavailable = Outcome("unavailable", None, "no IA32 emulation")
    assert judge_denial(frozenset({SIGSYS}), unavailable, SIGSYS).verdict is Verdict.INDETERMINATE


def test_x32_enosys_passthrough_is_reported_as_allowed_by_the_filter():
    judgement = judge_denial(frozenset({EPERM, SIGSYS}), ENOSYS, ENOSYS, abi="x32")
    assert judgement.verdict is Verdict.ALLOWED
    assert "stopped only by the kernel" in judgement.reason


def test_controls_must_behave_as_unfiltered():
    assert judge_reaches_kernel(EINVAL, EINVAL).verdict is Verdict.WORKS
    assert judge_reaches_kernel(Outcome("return", 10), Outcome("return", 12)).verdict is Verdict.WORKS
    assert judge_reaches_kernel(EINVAL, EPERM).verdict is Verdict.BROKEN
    assert judge_works(Outcome("ok"), what="thread").verdict is Verdict.WORKS
    assert judge_works(Outcome("failed", None, "x"), what="thread").verdict is Verdict.BROKEN


def test_outcomes_describe_themselves():
    assert EPERM.describe() == "EPERM"
    assert SENTINEL.describe() == "errno 1003 (sentinel)"
    assert SIGSYS.describe() == "killed by SIGSYS"
